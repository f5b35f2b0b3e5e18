//! Domain types both sides of a tunnel share: who a device is, and what is known about a flow
//! when it opens.
//!
//! Inputs: filled by the registry (identity) and the flow table (flow context). Outputs: read by
//! every policy stage and by the logs. Plain data; nothing here does I/O or keeps time.
#![deny(missing_docs)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub mod activity;
pub mod calendar;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

/// A peer's handle: the 24-bit index boringtun puts in the high bits of its receiver indices.
pub type PeerId = u32;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP / ICMPv6.
    Icmp,
}

impl Protocol {
    /// Name as policy fields spell it (`net.protocol`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

/// A device's identity and posture facts beyond email, name and group names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityExtras {
    /// Ids of its groups known to the registry.
    pub group_ids: Vec<String>,
    /// Emails of its groups that have one.
    pub group_emails: Vec<String>,
    /// The user's attributes, `name=value`.
    pub attributes: Vec<String>,
    /// Posture checks the device passed.
    pub posture_passed: Vec<String>,
    /// Posture checks the device failed.
    pub posture_failed: Vec<String>,
}

/// Identifies a flow for its whole life (never reused).
pub type FlowId = u64;

/// Who a device is: filled from the registry, shared by all of the device's flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Registry id.
    pub id: String,
    /// Device name.
    pub name: String,
    /// User's email.
    pub email: String,
    /// User's display name.
    pub user_name: Option<String>,
    /// User's groups.
    pub groups: Vec<String>,
    /// Group ids and emails, the user's attributes, posture results.
    pub extras: Arc<IdentityExtras>,
    /// Virtual network id.
    pub vnet_id: Option<String>,
    /// Tunnel IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Tunnel IPv6 address.
    pub ipv6: Ipv6Addr,
}

/// Everything known about a flow when it opens; stages decide on this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowCtx {
    /// Flow id.
    pub id: FlowId,
    /// The device's WireGuard peer.
    pub peer: PeerId,
    /// The device and its user.
    pub device: Arc<DeviceInfo>,
    /// The device's public address (its WireGuard endpoint).
    pub device_public: Option<SocketAddr>,
    /// Transport.
    pub protocol: Protocol,
    /// Source inside the tunnel.
    pub src: SocketAddr,
    /// Destination the device addressed.
    pub dst: SocketAddr,
    /// When the first packet arrived.
    pub opened: Instant,
    /// The rules that decided it, for its log line.
    pub rules: FlowRules,
}

/// Which rules decided a flow (`None`: no rule matched; the stage's default applied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowRules {
    /// The egress rule's id.
    pub egress: Option<String>,
    /// The network (l4) rule's id.
    pub l4: Option<String>,
    /// The virtual network route taken, as `CIDR via INTERFACE`.
    pub route: Option<String>,
    /// The name the device resolved, through the gateway's resolver, for the destination.
    pub name: Option<std::sync::Arc<str>>,
    /// The egress rule's id and name, for the activity logs (set only while they are kept).
    pub egress_ref: Option<Arc<activity::RuleRef>>,
    /// The network rule's id and name, for the activity logs (set only while they are kept).
    pub l4_ref: Option<Arc<activity::RuleRef>>,
    /// The TLS server name the client's first bytes carried.
    pub sni: Option<Arc<str>>,
    /// The protocol the client's first bytes showed.
    pub detected: Option<&'static str>,
    /// A network rule refused the flow after its first bytes were read.
    pub blocked: bool,
}

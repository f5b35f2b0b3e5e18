//! Domain types both sides of a tunnel share: who a device is, and what is known about a flow
//! when it opens.
//!
//! Inputs: filled by the registry (identity) and the flow table (flow context). Outputs: read by
//! every policy stage and by the logs. Plain data; nothing here does I/O or keeps time.
#![deny(missing_docs)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

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
    /// Its identity fields as log lines spell them, made at its first line.
    pub log_fields: LogFields,
}

/// A device's identity fields as its activity log lines spell them (JSON, escaped), rendered by
/// the log writer at the device's first line and kept as long as the [`DeviceInfo`] (one
/// registry snapshot: a changed device is a new `DeviceInfo`), so a DNS flood copies them
/// rather than escaping four strings per query.
///
/// A cache: equal to any other, and empty in a clone (whose fields may then be changed).
#[derive(Default)]
pub struct LogFields(OnceLock<Box<[u8]>>);

impl LogFields {
    /// The rendered fields, rendering them with `render` the first time.
    pub fn get_or_render(&self, render: impl FnOnce() -> Vec<u8>) -> &[u8] {
        self.0.get_or_init(|| render().into_boxed_slice())
    }
}

impl Clone for LogFields {
    fn clone(&self) -> Self {
        LogFields::default()
    }
}

impl PartialEq for LogFields {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for LogFields {}

impl std::fmt::Debug for LogFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogFields")
    }
}

/// The namespace of [`user_id`]'s name-based UUIDs (a random UUID, fixed forever: changing it
/// changes every user's id).
const USER_NAMESPACE: [u8; 16] = [
    0x5c, 0x1e, 0x8a, 0x43, 0x29, 0xd7, 0x4f, 0x0b, 0x9e, 0x61, 0x03, 0xb8, 0x7a, 0xc2, 0x55, 0xe4,
];

/// The user id of `email`, as the admin API's `/users` and the logs' `UserID` show it: a UUID
/// (Cloudflare's `UserID` is one) derived from the email, so it is the same on every gateway and
/// after a restore, and needs no registry column (a user is an email in the registry). Name-based
/// with SHA-256 as RFC 9562 (appendix B.2) builds a version 8 UUID: the first 16 bytes of
/// SHA-256(namespace || email), version and variant bits set.
pub fn user_id(email: &str) -> String {
    let mut h = Sha256::new();
    h.update(USER_NAMESPACE);
    h.update(email.as_bytes());
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{byte:02x}"));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_stable_version_8_uuids_per_email() {
        let id = user_id("ada@example.com");
        assert_eq!(id, user_id("ada@example.com"));
        assert_ne!(id, user_id("bob@example.com"));
        assert_eq!(id.len(), 36);
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(id
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        // Version 8, variant 10.
        assert!(groups[2].starts_with('8'), "{id}");
        assert!(
            matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "{id}"
        );
        // Fixed forever: a changed namespace or layout would renumber every user.
        assert_eq!(id, KNOWN_ADA);
    }

    const KNOWN_ADA: &str = "1fc24259-fef9-8a59-8ecb-7996f8201937";

    #[test]
    fn log_fields_are_a_cache_clones_do_not_share() {
        let a = LogFields::default();
        assert_eq!(a.get_or_render(|| b"x".to_vec()), b"x");
        assert_eq!(a.get_or_render(|| b"y".to_vec()), b"x");
        let b = a.clone();
        assert_eq!(b.get_or_render(|| b"y".to_vec()), b"y");
        assert_eq!(a, b);
    }
}

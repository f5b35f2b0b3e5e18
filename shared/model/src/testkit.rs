//! Test kit: builders for devices, flows and packets that every crate's tests share.
//!
//! Compiled for this crate's tests and, with the `testkit` feature, for other crates' tests and
//! benches; nothing in the product uses it. Defaults are one device, "laptop" (`dev-1`,
//! ada@example.com, [`DEV_V4`]), dialling [`ORIGIN`]; builders change only what a test is
//! about. Builders panic on malformed literals: they are for tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::{DeviceInfo, FlowCtx, FlowId, FlowRules, IdentityExtras, PeerId, Protocol};

/// The gateway's IPv4 tunnel address.
pub const GW_V4: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// The gateway's IPv6 tunnel address.
pub const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x6761, 0x7465, 0, 0, 0, 0, 1);
/// The default device's IPv4 tunnel address.
pub const DEV_V4: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
/// The default device's IPv6 tunnel address.
pub const DEV_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x6761, 0x7465, 0, 0, 0, 0, 2);
/// Another device's IPv4 tunnel address.
pub const OTHER_V4: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 3);
/// The default device's public (WireGuard) endpoint.
pub const DEVICE_ENDPOINT: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)), 40000);
/// A web origin on the Internet.
pub const ORIGIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)), 80);
/// The gateway's default egress address.
pub const EGRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The upstream DNS server of [`core_settings`].
pub const DNS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 53)), 53);
/// The tunnel MTU of [`core_settings`].
pub const MTU: u16 = 1420;

/// One real instant per process, where fake clocks start (any instant will do).
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    #[allow(clippy::disallowed_methods)] // the fake clocks start from one real instant
    *EPOCH.get_or_init(Instant::now)
}

/// Builds a [`DeviceInfo`]; see [`device`].
#[derive(Debug, Clone)]
pub struct DeviceBuilder(DeviceInfo);

/// The default device: `dev-1`, "laptop", ada@example.com, no groups, [`DEV_V4`], [`DEV_V6`].
pub fn device() -> DeviceBuilder {
    DeviceBuilder(DeviceInfo {
        id: "dev-1".into(),
        name: "laptop".into(),
        email: "ada@example.com".into(),
        user_name: None,
        groups: Vec::new(),
        extras: Arc::default(),
        vnet_id: None,
        ipv4: DEV_V4,
        ipv6: DEV_V6,
        log_fields: Default::default(),
    })
}

impl DeviceBuilder {
    /// Registry id.
    pub fn id(mut self, id: &str) -> Self {
        self.0.id = id.into();
        self
    }

    /// Device name.
    pub fn name(mut self, name: &str) -> Self {
        self.0.name = name.into();
        self
    }

    /// User's email.
    pub fn email(mut self, email: &str) -> Self {
        self.0.email = email.into();
        self
    }

    /// User's display name.
    pub fn user_name(mut self, name: &str) -> Self {
        self.0.user_name = Some(name.into());
        self
    }

    /// User's group names.
    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.0.groups = groups.iter().map(|g| g.to_string()).collect();
        self
    }

    /// Group ids, attributes, posture results.
    pub fn extras(mut self, extras: IdentityExtras) -> Self {
        self.0.extras = Arc::new(extras);
        self
    }

    /// Virtual network id.
    pub fn vnet(mut self, vnet_id: &str) -> Self {
        self.0.vnet_id = Some(vnet_id.into());
        self
    }

    /// Tunnel IPv4 address.
    pub fn ipv4(mut self, ipv4: Ipv4Addr) -> Self {
        self.0.ipv4 = ipv4;
        self
    }

    /// Tunnel IPv6 address.
    pub fn ipv6(mut self, ipv6: Ipv6Addr) -> Self {
        self.0.ipv6 = ipv6;
        self
    }

    /// The device.
    pub fn build(self) -> DeviceInfo {
        self.0
    }

    /// The device, shared as flows hold it.
    pub fn arc(self) -> Arc<DeviceInfo> {
        Arc::new(self.0)
    }
}

/// Builds a [`FlowCtx`]; see [`flow`].
#[derive(Debug, Clone)]
pub struct FlowBuilder(FlowCtx);

/// Flow 1 of peer 1: the default [`device`] dialling [`ORIGIN`] over TCP from port 40000,
/// opened at [`epoch`], no endpoint known, no rules.
pub fn flow() -> FlowBuilder {
    FlowBuilder(FlowCtx {
        id: 1,
        peer: 1,
        device: device().arc(),
        device_public: None,
        protocol: Protocol::Tcp,
        src: SocketAddr::new(IpAddr::V4(DEV_V4), 40000),
        dst: ORIGIN,
        opened: epoch(),
        rules: FlowRules::default(),
    })
}

impl FlowBuilder {
    /// Flow id.
    pub fn id(mut self, id: FlowId) -> Self {
        self.0.id = id;
        self
    }

    /// The device's peer.
    pub fn peer(mut self, peer: PeerId) -> Self {
        self.0.peer = peer;
        self
    }

    /// The device (its tunnel address becomes the source's).
    pub fn device(mut self, device: DeviceBuilder) -> Self {
        self.0.src.set_ip(IpAddr::V4(device.0.ipv4));
        self.0.device = device.arc();
        self
    }

    /// The device's public endpoint, e.g. `"198.51.100.11:40000"`.
    pub fn device_public(mut self, addr: &str) -> Self {
        self.0.device_public = Some(addr.parse().expect("a socket address"));
        self
    }

    /// Transport.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.0.protocol = protocol;
        self
    }

    /// Source inside the tunnel, e.g. `"100.96.0.2:40000"`.
    pub fn src(mut self, addr: &str) -> Self {
        self.0.src = addr.parse().expect("a socket address");
        self
    }

    /// Destination, e.g. `"203.0.113.10:443"`.
    pub fn dst(mut self, addr: &str) -> Self {
        self.0.dst = addr.parse().expect("a socket address");
        self
    }

    /// When the first packet arrived.
    pub fn opened(mut self, at: Instant) -> Self {
        self.0.opened = at;
        self
    }

    /// The flow context.
    pub fn build(self) -> FlowCtx {
        self.0
    }
}

/// An IPv4/UDP packet from port 5000 with valid IP header checksum (UDP checksum zero).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&5000u16.to_be_bytes());
    p[22..24].copy_from_slice(&dst_port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    fill_ipv4_checksum(&mut p);
    p
}

/// Writes the IPv4 header checksum of `p` (nothing if it is shorter than its header).
pub fn fill_ipv4_checksum(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if p.len() < ihl.max(20) {
        return;
    }
    p[10..12].copy_from_slice(&[0, 0]);
    let sum = p[..ihl]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    p[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
}

//! The flow table: device packets in, flows out.
//!
//! A flow's context is built once, from its first packet; policy stages decide on it; the
//! runtime carries out what the table asks for through [`Command`]s and reports back through
//! [`UpstreamEvent`]s. TCP is terminated in smoltcp ([`tcp`]); UDP and ICMP echo go through a NAT
//! table ([`udp`]). Packets for devices leave through a [`PacketSink`]. Nothing here does I/O.

use std::net::{IpAddr, SocketAddr};

pub mod device;
pub mod local;
pub mod packet;
pub mod tcp;
pub mod udp;

pub use local::{InspectTarget, LocalEndpoint, LocalService, LocalServices, DEVICE_API_PORT};
pub use waygate_model::{DeviceInfo, FlowCtx, FlowId, FlowRules, PeerId, Protocol};
pub use waygate_wire::sniff;

/// What names a flow of a device: its peer, the source and the destination it addressed.
pub type FlowKey = (PeerId, SocketAddr, SocketAddr);

/// Where and how a flow leaves the gateway, as decided by the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    /// Address to connect to (the destination, or a rewritten one such as the DNS upstream).
    pub dst: SocketAddr,
    /// Source address to bind before connecting; `None` lets the OS choose.
    pub bind: Option<IpAddr>,
    /// How the connection must leave: a virtual network's private route.
    pub via: Option<Via>,
    /// One of the gateway's own services instead of a connection: `dst` is then the gateway
    /// address the device dialled, and the runtime hands the flow over in memory.
    pub local: Option<LocalEndpoint>,
}

/// How a flow on a virtual network's private route leaves the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// Through this interface (index).
    Interface(std::num::NonZeroU32),
    /// By the routing table this firewall mark selects (a route through a next hop).
    Mark(std::num::NonZeroU32),
}

/// Work for the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open a TCP connection; answer with `TcpConnected` or `TcpConnectFailed`.
    TcpConnect {
        /// Flow.
        flow: FlowId,
        /// Where to.
        upstream: Upstream,
    },
    /// Hand the flow to one of the gateway's own services, in process, with its context (the
    /// device's identity); from then on it is a TCP upstream like any other: answer with
    /// `TcpConnected` (or `TcpConnectFailed`), and it takes the same commands.
    LocalConnect {
        /// Flow.
        flow: FlowId,
        /// Which service.
        endpoint: LocalEndpoint,
        /// The flow's context.
        ctx: Box<FlowCtx>,
    },
    /// Write bytes from the device to the upstream; answer with `TcpWritten` once written.
    TcpSend {
        /// Flow.
        flow: FlowId,
        /// Bytes, in order.
        data: bytes::Bytes,
    },
    /// The device will send no more: shut the upstream's write side.
    TcpShutdownWrite {
        /// Flow.
        flow: FlowId,
    },
    /// The device may take `bytes` more from the upstream.
    TcpCredit {
        /// Flow.
        flow: FlowId,
        /// Bytes.
        bytes: usize,
    },
    /// Forget the upstream connection (closing it if still open).
    TcpClose {
        /// Flow.
        flow: FlowId,
    },
    /// Open a UDP socket towards `upstream` (sends queue until it is ready).
    UdpOpen {
        /// Flow.
        flow: FlowId,
        /// Where to.
        upstream: Upstream,
    },
    /// Open an ICMP echo ("ping") socket towards `upstream.dst`; its datagrams are ICMP echo
    /// messages, sent and closed with `UdpSend` and `UdpClose`, answered with `UdpData`.
    PingOpen {
        /// Flow.
        flow: FlowId,
        /// Where to (the port is unused).
        upstream: Upstream,
    },
    /// Send one datagram upstream (for a ping flow: an echo request message).
    UdpSend {
        /// Flow.
        flow: FlowId,
        /// Payload.
        data: bytes::Bytes,
    },
    /// Close the flow's UDP socket.
    UdpClose {
        /// Flow.
        flow: FlowId,
    },
    /// A DNS query for the gateway's resolver; answer with `GatewayCore::handle_dns_answer`.
    DnsQuery {
        /// The device's peer, to answer.
        peer: PeerId,
        /// Who asked.
        device: std::sync::Arc<DeviceInfo>,
        /// The device's WireGuard endpoint.
        device_public: Option<SocketAddr>,
        /// The query's source (the device's tunnel address and port).
        client: SocketAddr,
        /// Where the device sent it (the answer's source).
        server: SocketAddr,
        /// The DNS message.
        payload: bytes::Bytes,
    },
}

/// What the runtime reports about upstream connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// TCP connection established.
    TcpConnected {
        /// Flow.
        flow: FlowId,
        /// Local address the connection uses (the egress address).
        local: SocketAddr,
    },
    /// TCP connection failed (refused, unreachable, timed out).
    TcpConnectFailed {
        /// Flow.
        flow: FlowId,
    },
    /// Bytes from the upstream, in order.
    TcpData {
        /// Flow.
        flow: FlowId,
        /// Bytes.
        data: bytes::Bytes,
    },
    /// The upstream finished sending.
    TcpEof {
        /// Flow.
        flow: FlowId,
    },
    /// The upstream connection broke (reset or I/O error).
    TcpError {
        /// Flow.
        flow: FlowId,
    },
    /// `bytes` of what the device sent were written upstream.
    TcpWritten {
        /// Flow.
        flow: FlowId,
        /// Bytes.
        bytes: usize,
    },
    /// A datagram from the upstream (for a ping flow: an echo reply message).
    UdpData {
        /// Flow.
        flow: FlowId,
        /// Payload.
        data: bytes::Bytes,
    },
}

/// Where packets for devices go (the WireGuard endpoint, in the gateway).
pub trait PacketSink {
    /// Sends one IP packet to `peer`.
    fn send(&mut self, peer: PeerId, packet: &[u8]);
}

/// Why a device packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowDrop {
    /// Could not be parsed.
    Malformed,
    /// IP fragment.
    Fragment,
    /// Transport not proxied.
    UnsupportedProtocol,
    /// Addressed to another device's tunnel address.
    DeviceToDevice,
    /// Addressed to loopback, multicast, broadcast or unspecified.
    ForbiddenDestination,
    /// Addressed to a gateway port nothing listens on.
    GatewayPortClosed,
    /// Non-SYN segment for no known connection (answered with RST).
    StrayTcp,
    /// ICMP other than echo requests.
    UnsupportedIcmp,
    /// The device holds as many flows of this kind as it may (`limits.*_per_device`).
    FlowLimit,
    /// Addressed to a private range of a virtual network the device is not in.
    OtherVnet,
    /// A network (l4) rule blocked it.
    PolicyBlocked,
    /// Addressed to one of the gateway host's own addresses (see [`crate::protect`]).
    HostAddress,
    /// Addressed to a link-local address (169.254.0.0/16, fe80::/10).
    LinkLocal,
    /// Addressed to a network the gateway host is directly connected to.
    ConnectedNetwork,
    /// Addressed to a private range no virtual network of the device routes.
    PrivateRange,
    /// The gateway's flow budget is spent, and this device already holds its guaranteed share.
    GatewayFlowLimit,
    /// The device's flows hold as much buffer memory as it may.
    MemoryLimit,
    /// UDP to port 443 (QUIC) while the HTTP stage decrypts TLS (`http.quic`).
    Quic,
}

impl FlowDrop {
    /// Every reason, for counters.
    pub const ALL: [FlowDrop; 18] = [
        FlowDrop::Malformed,
        FlowDrop::Fragment,
        FlowDrop::UnsupportedProtocol,
        FlowDrop::DeviceToDevice,
        FlowDrop::ForbiddenDestination,
        FlowDrop::GatewayPortClosed,
        FlowDrop::StrayTcp,
        FlowDrop::UnsupportedIcmp,
        FlowDrop::FlowLimit,
        FlowDrop::OtherVnet,
        FlowDrop::PolicyBlocked,
        FlowDrop::HostAddress,
        FlowDrop::LinkLocal,
        FlowDrop::ConnectedNetwork,
        FlowDrop::PrivateRange,
        FlowDrop::GatewayFlowLimit,
        FlowDrop::MemoryLimit,
        FlowDrop::Quic,
    ];
}

/// How many flows one device may hold, and all devices together.
///
/// Every flow holds an upstream descriptor, so the total follows the process's descriptor
/// limit. A device holding at least [`FlowLimits::GUARANTEED`] flows may not take the last
/// quarter of the total: one device at its caps leaves room for every device below them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Open TCP flows per device.
    pub tcp_per_device: usize,
    /// UDP and ping flows per device.
    pub udp_per_device: usize,
    /// Buffer memory of one device's TCP flows, in bytes (see [`tcp::TcpSettings`]).
    pub memory_per_device: usize,
    /// Flows of all devices together.
    pub total: usize,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            tcp_per_device: 1024,
            udp_per_device: 1024,
            memory_per_device: 256 * 1024 * 1024,
            total: 100_000,
        }
    }
}

impl FlowLimits {
    /// Flows a device may always open while the total is not spent.
    pub const GUARANTEED: usize = 64;

    /// Whether a device holding `held` flows of a kind capped at `cap` may open another while
    /// `open` flows of all devices are open.
    pub fn admit(&self, held: usize, cap: usize, open: usize) -> Result<(), FlowDrop> {
        if held >= cap {
            return Err(FlowDrop::FlowLimit);
        }
        let reserve = self.total / 4;
        if open >= self.total || (held >= Self::GUARANTEED && open + reserve >= self.total) {
            return Err(FlowDrop::GatewayFlowLimit);
        }
        Ok(())
    }
}

/// Per-reason counts of dropped device packets.
#[derive(Debug, Default, Clone)]
pub struct FlowDropCounters {
    counts: [u64; FlowDrop::ALL.len()],
}

impl FlowDropCounters {
    /// Adds one.
    pub fn add(&mut self, reason: FlowDrop) {
        self.counts[reason as usize] += 1;
    }

    /// Count for `reason`.
    pub fn get(&self, reason: FlowDrop) -> u64 {
        self.counts[reason as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_at_its_cap_is_refused_and_the_reserve_is_kept_for_small_devices() {
        let limits = FlowLimits {
            tcp_per_device: 100,
            udp_per_device: 100,
            memory_per_device: 1 << 20,
            total: 400,
        };
        assert_eq!(limits.admit(99, 100, 0), Ok(()));
        assert_eq!(limits.admit(100, 100, 0), Err(FlowDrop::FlowLimit));
        // Past three quarters of the total only devices below their guaranteed share open more.
        assert_eq!(limits.admit(80, 100, 299), Ok(()));
        assert_eq!(limits.admit(80, 100, 300), Err(FlowDrop::GatewayFlowLimit));
        assert_eq!(limits.admit(3, 100, 399), Ok(()));
        assert_eq!(limits.admit(3, 100, 400), Err(FlowDrop::GatewayFlowLimit));
    }
}

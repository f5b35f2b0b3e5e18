//! Datagram flows: a NAT table from (device, source, destination) to one upstream socket each,
//! for UDP and for ICMP echo (`ping`, keyed by its identifier in place of a source port).
//!
//! The runtime owns the sockets; this table decides when they open and close. A flow expires
//! after [`UDP_IDLE`] without traffic either way ([`DNS_IDLE`] for port 53 and pings, whose
//! exchanges are one round trip). Replies are written back as coming from the address the
//! device addressed.

use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::packet::{build_ping_reply, build_udp};
use super::{Command, FlowCtx, FlowId, FlowKey, PacketSink, Protocol, Upstream};
use waygate_model::activity::Activity;
use waygate_wg::PeerId;

/// Idle time after which a UDP flow is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(120);
/// Idle time for flows to port 53, and for pings.
pub const DNS_IDLE: Duration = Duration::from_secs(30);
/// How often expiry is checked.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct UdpFlow {
    ctx: FlowCtx,
    upstream: Upstream,
    idle: Duration,
    last_seen: Instant,
    datagrams_up: u64,
    bytes_up: u64,
    bytes_down: u64,
}

/// The UDP NAT table.
pub struct UdpNat {
    // As in the TCP table: our ids take Fx, the device-chosen key a seeded hasher.
    flows: FxHashMap<FlowId, UdpFlow>,
    by_key: HashMap<FlowKey, FlowId, RandomState>,
    /// Open flows per device.
    per_peer: FxHashMap<PeerId, usize>,
    next_sweep: Option<Instant>,
    scratch: Vec<u8>,
    /// Closed flows for the activity logs, while [`UdpNat::record_closed`] is on.
    closed: Option<Vec<Activity>>,
}

impl Default for UdpNat {
    fn default() -> Self {
        UdpNat {
            flows: FxHashMap::default(),
            by_key: HashMap::default(),
            per_peer: FxHashMap::default(),
            next_sweep: None,
            scratch: vec![0u8; 65_535 + 48],
            closed: None,
        }
    }
}

impl UdpNat {
    /// The flow for datagrams from `peer` with these addresses.
    pub fn lookup(&self, peer: PeerId, src: SocketAddr, dst: SocketAddr) -> Option<FlowId> {
        self.by_key.get(&(peer, src, dst)).copied()
    }

    /// Number of open flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Number of open flows of `peer`.
    pub fn flows_of(&self, peer: PeerId) -> usize {
        self.per_peer.get(&peer).copied().unwrap_or(0)
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Keeps a record of every flow that closes from now on (`true`), for
    /// [`UdpNat::drain_closed`], or stops keeping them.
    pub fn record_closed(&mut self, on: bool) {
        self.closed = on.then(Vec::new);
    }

    /// Hands over the records of the flows closed since the last call.
    pub fn drain_closed(&mut self, into: &mut VecDeque<Activity>) {
        if let Some(closed) = &mut self.closed {
            into.extend(closed.drain(..));
        }
    }

    /// Opens a flow: the runtime creates its socket.
    pub fn open(
        &mut self,
        ctx: FlowCtx,
        upstream: Upstream,
        now: Instant,
        out: &mut VecDeque<Command>,
    ) {
        let id = ctx.id;
        let ping = ctx.protocol == Protocol::Icmp;
        let idle = if ping || ctx.dst.port() == 53 {
            DNS_IDLE
        } else {
            UDP_IDLE
        };
        self.by_key.insert((ctx.peer, ctx.src, ctx.dst), id);
        *self.per_peer.entry(ctx.peer).or_default() += 1;
        self.flows.insert(
            id,
            UdpFlow {
                ctx,
                upstream,
                idle,
                last_seen: now,
                datagrams_up: 0,
                bytes_up: 0,
                bytes_down: 0,
            },
        );
        self.next_sweep.get_or_insert(now + SWEEP_EVERY);
        out.push_back(if ping {
            Command::PingOpen { flow: id, upstream }
        } else {
            Command::UdpOpen { flow: id, upstream }
        });
    }

    /// Sends a device's datagram upstream.
    pub fn send(&mut self, id: FlowId, payload: &[u8], now: Instant, out: &mut VecDeque<Command>) {
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.last_seen = now;
            flow.datagrams_up += 1;
            flow.bytes_up += payload.len() as u64;
            out.push_back(Command::UdpSend {
                flow: id,
                data: Bytes::copy_from_slice(payload),
            });
        }
    }

    /// Delivers an upstream datagram to the device.
    pub fn receive<S: PacketSink>(
        &mut self,
        id: FlowId,
        payload: &[u8],
        now: Instant,
        sink: &mut S,
    ) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.last_seen = now;
        flow.bytes_down += payload.len() as u64;
        let (src, dst) = (flow.ctx.dst, flow.ctx.src);
        let built = match flow.ctx.protocol {
            Protocol::Icmp => {
                build_ping_reply(&mut self.scratch, src.ip(), dst.ip(), dst.port(), payload)
            }
            _ => build_udp(&mut self.scratch, src, dst, payload),
        };
        if let Some(n) = built {
            sink.send(flow.ctx.peer, &self.scratch[..n]);
        }
    }

    /// Expires idle flows.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut VecDeque<Command>) {
        if self.next_sweep.is_none_or(|t| t > now) {
            return;
        }
        let expired: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last_seen) >= f.idle)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.close(id, "idle", now, out);
        }
        self.next_sweep = (!self.flows.is_empty()).then(|| now + SWEEP_EVERY);
    }

    /// When [`UdpNat::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Closes every flow of a removed peer.
    pub fn remove_peer(&mut self, peer: PeerId, now: Instant, out: &mut VecDeque<Command>) {
        let ids: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| f.ctx.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close(id, "device removed", now, out);
        }
    }

    fn close(&mut self, id: FlowId, why: &'static str, now: Instant, out: &mut VecDeque<Command>) {
        let Some(flow) = self.flows.remove(&id) else {
            return;
        };
        self.by_key
            .remove(&(flow.ctx.peer, flow.ctx.src, flow.ctx.dst));
        if let Some(n) = self.per_peer.get_mut(&flow.ctx.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer.remove(&flow.ctx.peer);
            }
        }
        out.push_back(Command::UdpClose { flow: id });
        let ctx = &flow.ctx;
        if let Some(closed) = &mut self.closed {
            let record = super::tcp::closed_record(
                ctx,
                &flow.upstream,
                flow.bytes_up,
                flow.bytes_down,
                why,
                now,
            );
            closed.push(record);
        }
        tracing::info!(
            target: "waygate::flow",
            flow = id,
            device = %ctx.device.name,
            user = %ctx.device.email,
            protocol = ctx.protocol.as_str(),
            src = %ctx.src,
            dst = %ctx.dst,
            upstream = %flow.upstream.dst,
            vnet = ctx.device.vnet_id.as_deref().unwrap_or("default"),
            egress_rule = ctx.rules.egress.as_deref(),
            l4_rule = ctx.rules.l4.as_deref(),
            route = ctx.rules.route.as_deref(),
            name = ctx.rules.name.as_deref(),
            egress = ?flow.upstream.bind,
            datagrams_up = flow.datagrams_up,
            bytes_up = flow.bytes_up,
            bytes_down = flow.bytes_down,
            duration_ms = now.saturating_duration_since(ctx.opened).as_millis() as u64,
            reason = why,
            "flow closed"
        );
    }
}

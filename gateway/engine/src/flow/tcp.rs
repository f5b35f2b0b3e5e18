//! TCP flows, terminated in smoltcp.
//!
//! smoltcp scans its whole socket set on every poll, so each flow owns a set with its one
//! socket and packets are dispatched to their flow before smoltcp sees them: the cost of a
//! packet does not grow with the number of open flows. One `Interface` (any-IP, the gateway's
//! tunnel addresses) is shared by all flows; it holds no per-socket state.
//!
//! A SYN is held, not answered, until the upstream connection succeeds: then a socket listening
//! on exactly the destination the device dialled is created and the SYN is fed to it, so the
//! device sees SYN-ACK only for reachable origins and a RST for refused ones.
//!
//! When a network rule ranked above the flow's first-packet match reads the client's first bytes
//! (`net.sni.host`, `net.detected_protocol`), the flow connects to its destination as usual but
//! holds the device's bytes: once [`sniff`] has seen enough of them (or the device sent nothing
//! for [`SNIFF_WAIT`]), the flow is listed in [`TcpFlows::poll_sniffed`] and waits for
//! [`TcpFlows::release`] to forward, reset or redirect it.
//!
//! Backpressure both ways: at most [`TcpSettings::upload_window`] bytes are in flight to the
//! upstream (the smoltcp receive window closes behind them), and the runtime reads from the
//! upstream only as far as [`Command::TcpCredit`] allows.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use foldhash::fast::RandomState;
use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, CongestionControl, SocketBuffer, State};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};

use super::device::FlowDevice;
use super::packet::{build_rst, TcpFlags};
use super::sniff::{sniff, Detected, Sniff, MAX_SNIFF};
use super::{Command, FlowCtx, FlowId, FlowKey, PacketSink, Upstream, UpstreamEvent};
use waygate_model::activity::{Activity, FlowAction, NetworkActivity};
use waygate_wg::PeerId;

/// Tuning of terminated connections.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    /// Tunnel MTU: smoltcp's segments and the MSS it advertises follow from it.
    pub mtu: usize,
    /// Smallest smoltcp receive buffer per flow (device -> upstream); flows get
    /// [`RECEIVE_BUFFER_BDPS`] bandwidth-delay products when that is more.
    pub rx_buffer_min: usize,
    /// Smallest smoltcp send buffer per flow (upstream -> device).
    pub tx_buffer_min: usize,
    /// Largest smoltcp receive buffer per flow.
    pub buffer_max: usize,
    /// Largest smoltcp send buffer per flow, and a device's cap on the bytes its flows have
    /// queued together.
    pub tx_buffer_max: usize,
    /// The rate one flow is sized for, in bytes per second: buffers hold this rate times the
    /// device's round-trip time.
    pub flow_rate: u64,
    /// Bytes handed to the upstream and not yet written, per flow.
    pub upload_window: usize,
    /// Largest chunk handed to the runtime at once.
    pub max_chunk: usize,
    /// How long smoltcp may delay an ACK.
    pub ack_delay: Duration,
    /// Bytes the runtime may read from a flow's upstream before the device has taken them.
    pub download_window: usize,
    /// Receive and send buffer of a flow whose device is short of buffer memory (its download
    /// window is then [`UPSTREAM_READ`]): enough for a few round trips on a LAN, so it still
    /// works, slowly.
    pub floor_buffers: usize,
    /// Buffer memory all flows of one device may hold (`limits.flow_memory_per_device`):
    /// each flow counts its two smoltcp buffers and its download window in full, what it
    /// could come to hold. With the default 256 MiB, a device on the LAN gets about 110 flows
    /// at full size (one 10 ms away about 12, one 40-100 ms away 5: a far flow's buffers
    /// are up to 8 and 16 MiB) and then about 1,000 at the floor, as many as its flow cap of 1,024.
    pub memory_per_device: usize,
    /// Buffer memory the flows of all devices together may hold, counted as for
    /// `memory_per_device`: past half of it new flows get the floor, so a few devices with
    /// large windows cannot take every other device's share.
    pub memory_total: usize,
    /// Lower bound of smoltcp's retransmission timeout (RFC 6298 says 1 s; Linux uses 200 ms).
    pub min_rto: Duration,
    /// Seeds smoltcp's generator of initial sequence numbers and ephemeral ports: a fixed seed
    /// makes them predictable to anyone who has seen one flow (the runtime draws it from the
    /// OS; tests fix it).
    pub random_seed: u64,
}

impl TcpSettings {
    /// Settings for a tunnel of `mtu` bytes.
    pub fn for_mtu(mtu: usize) -> Self {
        TcpSettings {
            mtu,
            rx_buffer_min: 512 * 1024,
            // Bytes in flight towards a device are bounded by the send buffer. A stock
            // wireguard-go device drains a ~200 KiB UDP socket buffer; overflowing it loses
            // packets in bursts. Measured in the lab (scripts/bench-throughput.sh, RTT < 1 ms,
            // before pacing and SACK recovery): 512 KiB collapsed downloads to 1-60 Mbit/s,
            // 256 KiB to 0.16 Gbit/s, 96 KiB gave 0.53-0.65 Gbit/s. Under a millisecond of RTT
            // smoltcp does not pace, so this bound stays for near devices. Far devices need
            // more (96 KiB per 40 ms is 19 Mbit/s): the buffer follows the device's measured
            // round-trip time (see `buffers_for`) and the socket paces what it sends.
            tx_buffer_min: 96 * 1024,
            buffer_max: 8 * 1024 * 1024,
            // A far download's send buffer holds what is in flight, the data the device
            // SACKed while holes are repaired, and what waits for its paced turn: 4 MiB is
            // 0.34 Gbit/s at 100 ms before any of the last two (scripts/bench-far.sh, issue
            // 15). Pages a flow never writes stay unbacked, and a device's flows share one
            // such buffer's worth (`cap`). Four downloads (two runs each), 8 MiB against
            // 16 MiB: 40 ms 0.57-0.62 against 0.61-0.65 Gbit/s, 100 ms 0.38-0.41 against
            // 0.45-0.49, 40 ms with 0.5% loss 0.41-0.53 against 0.57-0.59. At 100 ms a
            // flow's two buffers and download window come to 24.5 MiB: five flows (iperf3's
            // four and its control connection) still fit under half the device's 256 MiB.
            tx_buffer_max: 16 * 1024 * 1024,
            flow_rate: 1_000_000_000 / 8,
            upload_window: 512 * 1024,
            max_chunk: 64 * 1024,
            ack_delay: Duration::from_millis(1),
            download_window: 512 * 1024,
            floor_buffers: 32 * 1024,
            memory_per_device: 256 * 1024 * 1024,
            // Four devices' worth at their full per-device budget. Buffers cost what they
            // hold (pages a flow never wrote stay unbacked), so this bounds the worst case.
            memory_total: 1024 * 1024 * 1024,
            // smoltcp's default of 1 s turned every tail loss towards a 40 ms device into
            // 25 idle round trips (scripts/bench-far.sh, issue 15); Linux's 200 ms.
            min_rto: Duration::from_millis(200),
            random_seed: 0,
        }
    }

    /// Receive and send buffer sizes for a flow of a device whose round-trip time through the
    /// tunnel is `rtt` (unknown: the minimums): the bandwidth-delay product at `flow_rate`,
    /// [`RECEIVE_BUFFER_BDPS`] times that for the receive buffer and [`PACED_SEND_BUFFER_BDPS`]
    /// times for the send buffer of a paced (far) flow.
    pub fn buffers_for(&self, rtt: Option<Duration>) -> (usize, usize) {
        let bdp = rtt.map_or(0, |rtt| {
            (rtt.as_micros() as u64).saturating_mul(self.flow_rate) / 1_000_000
        });
        let bdp = usize::try_from(bdp).unwrap_or(usize::MAX);
        // smoltcp paces from a millisecond of RTT up. Near devices keep the minimum, which
        // bounds their unpaced bursts.
        let tx = if rtt.is_some_and(|rtt| rtt >= PACED_RTT) {
            bdp.saturating_mul(PACED_SEND_BUFFER_BDPS)
        } else {
            bdp
        };
        (
            bdp.saturating_mul(RECEIVE_BUFFER_BDPS)
                .clamp(self.rx_buffer_min, self.buffer_max.max(self.rx_buffer_min)),
            tx.clamp(
                self.tx_buffer_min,
                self.tx_buffer_max.max(self.tx_buffer_min),
            ),
        )
    }
}

/// The smallest round-trip time smoltcp paces at (its RTT estimate counts milliseconds).
const PACED_RTT: Duration = Duration::from_millis(1);

/// A paced flow's send buffer, and its device's cap on queued bytes, in bandwidth-delay
/// products at `flow_rate` (then clamped to `tx_buffer_max`, 16 MiB, which flows 23 ms away
/// and farther reach). Its BBR keeps up to two in flight, and while holes are repaired the buffer
/// also holds what the device SACKed above them: a device's WireGuard daemon that drops 8-12%
/// of a download at its socket buffer (a busy 2-core host) keeps holes open for several
/// round trips. One download at 10 ms (scripts/bench-far.sh, runs alternating): 2 products
/// 0.39-0.49 Gbit/s, 4 products 0.55-0.56, 6 products 0.54-0.62 (the reference 0.53-0.56).
const PACED_SEND_BUFFER_BDPS: usize = 6;

/// A flow's receive buffer (its advertised window) in bandwidth-delay products at
/// `flow_rate`, then clamped to `buffer_max`. An upload's round trip under load is longer
/// than the idle one its buffer is sized from (the device's WireGuard daemon and the path
/// queue): with one product, one upload at 10 ms kept exactly the window in flight and ran at
/// 0.56-0.60 Gbit/s; with two, 0.73-0.75 (scripts/bench-far.sh, two runs each, ACKs
/// coalesced). Before ACKs were coalesced a larger window only lost more: four products,
/// 0.48-0.50 against 0.54-0.57.
const RECEIVE_BUFFER_BDPS: usize = 2;

/// The runtime reads an upstream this much at a time, once the device has granted that much
/// credit: no flow's download window may be smaller, or its upstream is never read again.
pub const UPSTREAM_READ: usize = 64 * 1024;

/// Smallest allocation the runtime's allocator serves from a fresh mapping (it fixes glibc's
/// `M_MMAP_THRESHOLD` at this). Zeroed, such a block costs no memory until written, whatever
/// the heap holds; a smaller one is zero-filled in recycled heap memory and costs its whole
/// size at once.
pub const MAPPED_ALLOCATION: usize = 128 * 1024;

/// A zeroed socket buffer of `len` bytes that costs only the pages the flow writes: allocated
/// at least [`MAPPED_ALLOCATION`] long, then cut to `len` (which touches nothing). The floor
/// buffers (32 KiB) and the send buffer (96 KiB) are below the threshold: allocated at their
/// size, an idle inspected flow cost 64-96 KiB for them in `scripts/bench-http.sh`'s 1,000
/// idle connections; allocated this way, the few pages its handshake and one response wrote.
fn mapped_buffer(len: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; len.max(MAPPED_ALLOCATION)];
    buffer.truncate(len);
    buffer
}

/// How long a held flow waits for the client's first bytes before it is decided without them
/// (the protocol then counts as unknown): protocols where the server speaks first are not
/// stalled for longer than this, and they are not stalled at all in their download direction.
pub const SNIFF_WAIT: Duration = Duration::from_secs(1);

/// Where a flow is in waiting for its network decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Decided: bytes move.
    Off,
    /// Collecting the client's first bytes; `until` is set once the upstream is connected.
    Sniffing { until: Option<Instant> },
    /// Listed in `sniffed`, waiting for [`TcpFlows::release`].
    Deciding,
    /// Redirected: the first upstream is closed, the new one not yet connected.
    Reconnecting,
}

/// How a new flow starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Connect upstream; answer the device once connected; bytes move.
    Connect,
    /// Connect upstream as [`Opening::Connect`], but hold the device's bytes for the decision
    /// about the flow to `dialled` (the destination the stages were asked about).
    ConnectAndHold {
        /// The destination the decision is about.
        dialled: SocketAddr,
    },
    /// Answer the device at once without connecting (the flow would likely be blocked): the
    /// decision connects it, with [`Release::Redirect`], or resets it.
    AcceptAndHold {
        /// The destination the decision is about.
        dialled: SocketAddr,
    },
}

/// A held flow as the network stage sees it.
pub struct Held<'a> {
    /// Its context.
    pub ctx: &'a mut FlowCtx,
    /// The destination the decision is about.
    pub dialled: SocketAddr,
    /// Where it was opened to.
    pub opened: Upstream,
    /// Whether that upstream is connected.
    pub connected: bool,
}

/// What the network stage decided for a held flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Forward the held bytes to the connected upstream.
    Forward,
    /// Reset the device's connection and close the upstream.
    Reset,
    /// Close the upstream, connect here instead, then forward.
    Redirect(Upstream),
}

/// How long a device's smallest handshake round-trip time stays its estimate when later
/// handshakes are slower (they may be queued behind a busy flow, or the device moved).
const RTT_MEMORY: Duration = Duration::from_secs(60);

/// A handshake this slow, and over twice the estimate, replaces it at once: the device has
/// moved farther away (a laptop from Wi-Fi to a phone's hotspot), not queued a few
/// milliseconds behind its own download. Kept for the minute, the near estimate sized a far
/// device's buffers: at 40 ms after 10 ms, downloads and uploads stopped at 0.25 Gbit/s, the
/// 1.25 MB of a 10 ms buffer per round trip (scripts/bench-far.sh, issue 15).
const FAR_RTT: Duration = Duration::from_millis(5);

/// What the flows of one device share.
#[derive(Debug, Default)]
struct PeerState {
    /// Handshake round-trip time estimate.
    rtt: Option<RttEstimate>,
    /// Bytes in the send buffers of all the device's flows (sent and unacknowledged, or
    /// waiting to be sent).
    queued: usize,
    /// Flows holding upstream data that did not fit under the device's cap.
    waiting: Vec<FlowId>,
    /// Open flows.
    flows: usize,
    /// Buffer memory the device's flows may come to hold (see `TcpSettings::memory_per_device`).
    memory: usize,
}

impl PeerState {
    /// Most bytes the device's flows may have queued together: what one flow may (see
    /// `TcpSettings::buffers_for`). Several flows then share the device's path instead of each
    /// bursting into it, which a device drains no faster with four flows than with one.
    fn cap(&self, settings: &TcpSettings) -> usize {
        settings.buffers_for(self.rtt.map(|e| e.rtt)).1
    }
}

/// A device's round-trip time through the tunnel, from the TCP handshakes the gateway
/// answered: SYN-ACK sent to ACK received.
#[derive(Debug, Clone, Copy)]
struct RttEstimate {
    rtt: Duration,
    measured: Instant,
}

impl RttEstimate {
    /// Keeps the smaller sample, unless the kept one is old or the new one far slower.
    fn update(estimate: &mut Option<RttEstimate>, sample: Duration, now: Instant) {
        let replace = estimate.is_none_or(|e| {
            sample <= e.rtt
                || now.saturating_duration_since(e.measured) > RTT_MEMORY
                || sample >= FAR_RTT.max(e.rtt * 2)
        });
        if replace {
            *estimate = Some(RttEstimate {
                rtt: sample,
                measured: now,
            });
        }
    }
}

enum Phase {
    /// Waiting for the upstream connection; the device's SYN is kept to replay or refuse.
    Connecting { syn: Vec<u8>, flags: TcpFlags },
    /// Terminated: the flow's own one-socket set.
    Open {
        sockets: SocketSet<'static>,
        handle: SocketHandle,
    },
}

struct TcpFlow {
    ctx: FlowCtx,
    upstream: Upstream,
    /// The destination the network decision is about.
    dialled: SocketAddr,
    hold: Hold,
    upstream_local: Option<SocketAddr>,
    phase: Phase,
    upload_in_flight: usize,
    download: VecDeque<Bytes>,
    upstream_eof: bool,
    fin_forwarded: bool,
    closing: bool,
    next_poll: Option<Instant>,
    /// The earliest entry of this flow in the timer heap not yet popped: a later deadline is
    /// not pushed (the entry, when it pops, re-arms), so the heap grows only when a deadline
    /// moves earlier, not on every service call.
    armed: Option<Instant>,
    /// When the SYN-ACK went out, until the device's ACK arrives.
    synack_sent: Option<Instant>,
    /// Handshake round-trip time.
    rtt: Option<Duration>,
    /// The send buffer's fill when last looked at (counted in the device's `queued`).
    queued: usize,
    /// Listed in the device's `waiting`.
    waiting: bool,
    /// Listed in `TcpFlows::dirty`: segments arrived since the last flush.
    dirty: bool,
    /// Receive buffer, send buffer and download window, fixed when the flow opens.
    buffers: FlowBuffers,
    bytes_up: u64,
    bytes_down: u64,
    /// `bytes_up + bytes_down` at the last [`TcpFlows::release_idle_buffers`] pass, and when
    /// its buffers were last handed back: a flow is idle when the first has not moved for a
    /// pass, and its buffers need handing back only when the second is behind.
    idle_mark: u64,
    released_mark: u64,
}

/// The sizes of one flow's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowBuffers {
    rx: usize,
    tx: usize,
    window: usize,
}

impl FlowBuffers {
    fn total(&self) -> usize {
        self.rx + self.tx + self.window
    }
}

/// Outcome of servicing a flow.
#[derive(Debug, PartialEq, Eq)]
enum Liveness {
    Alive,
    Finished,
}

/// All terminated TCP flows.
pub struct TcpFlows {
    iface: Interface,
    epoch: Instant,
    settings: TcpSettings,
    // Flow ids and peer ids are ours (Fx); the key holds ports and addresses the device
    // chose, so it takes a randomly seeded hasher that a device cannot aim collisions at.
    flows: FxHashMap<FlowId, TcpFlow>,
    by_key: HashMap<FlowKey, FlowId, RandomState>,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    dirty: Vec<FlowId>,
    scratch: Vec<u8>,
    peers: FxHashMap<PeerId, PeerState>,
    /// Buffer memory all flows may come to hold (see `TcpSettings::memory_total`).
    memory: usize,
    /// Held flows whose first bytes are known, for [`TcpFlows::poll_sniffed`].
    sniffed: VecDeque<(FlowId, Detected)>,
    /// Closed flows for the activity logs, while [`TcpFlows::record_closed`] is on.
    closed: Option<Vec<Activity>>,
}

impl TcpFlows {
    /// An empty table answering for `addrs` (the gateway's tunnel addresses with their pools)
    /// and, through any-IP, for every destination.
    pub fn new(settings: TcpSettings, addrs: &[(IpAddr, u8)], now: Instant) -> Self {
        let mut scratch = vec![0u8; settings.mtu];
        let mut null = NullSink;
        let mut device = FlowDevice::new(None, &mut null, 0, settings.mtu, &mut scratch);
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        config.random_seed = settings.random_seed;
        let mut iface = Interface::new(config, &mut device, SmolInstant::ZERO);
        iface.set_any_ip(true);
        iface.update_ip_addrs(|list| {
            for (addr, prefix) in addrs {
                // The interface holds at most a handful of addresses; two always fit.
                let _ = list.push(IpCidr::new((*addr).into(), *prefix));
            }
        });
        TcpFlows {
            iface,
            epoch: now,
            settings,
            flows: FxHashMap::default(),
            by_key: HashMap::default(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            scratch,
            peers: FxHashMap::default(),
            memory: 0,
            sniffed: VecDeque::new(),
            closed: None,
        }
    }

    /// The flow a segment from `peer` with these addresses belongs to.
    pub fn lookup(&self, peer: PeerId, src: SocketAddr, dst: SocketAddr) -> Option<FlowId> {
        self.by_key.get(&(peer, src, dst)).copied()
    }

    /// Bytes queued towards `peer` by all its flows.
    pub fn queued_for(&self, peer: PeerId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.queued)
    }

    /// Number of open flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Number of open flows of `peer`.
    pub fn flows_of(&self, peer: PeerId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.flows)
    }

    /// Buffer memory `peer`'s flows may come to hold.
    pub fn memory_of(&self, peer: PeerId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.memory)
    }

    /// The buffers a new flow of `peer` gets: sized for the device's round-trip time while its
    /// flows hold less than half its memory cap and all flows less than half the gateway's,
    /// then the floor, so a device with many flows keeps opening them (slowly) up to its flow
    /// cap; `None` when even the floor would pass either cap.
    fn buffers_for_new(&self, peer: PeerId) -> Option<FlowBuffers> {
        let s = &self.settings;
        let state = self.peers.get(&peer);
        let held = state.map_or(0, |p| p.memory);
        let (rx, tx) = s.buffers_for(state.and_then(|p| p.rtt).map(|e| e.rtt));
        let full = FlowBuffers {
            rx,
            tx,
            window: s.download_window,
        };
        if held + full.total() <= s.memory_per_device / 2
            && self.memory + full.total() <= s.memory_total / 2
        {
            return Some(full);
        }
        let floor = self.floor_buffers();
        (held + floor.total() <= s.memory_per_device
            && self.memory + floor.total() <= s.memory_total)
            .then_some(floor)
    }

    /// What a flow of a device short of buffer memory gets.
    fn floor_buffers(&self) -> FlowBuffers {
        FlowBuffers {
            rx: self.settings.floor_buffers,
            tx: self.settings.floor_buffers,
            window: UPSTREAM_READ,
        }
    }

    /// Whether `peer` has the buffer memory for one more flow.
    pub fn has_memory_for_flow(&self, peer: PeerId) -> bool {
        self.buffers_for_new(peer).is_some()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Keeps a record of every flow that closes from now on (`true`), for
    /// [`TcpFlows::drain_closed`], or stops keeping them.
    pub fn record_closed(&mut self, on: bool) {
        self.closed = on.then(Vec::new);
    }

    /// Hands over the records of the flows closed since the last call.
    pub fn drain_closed(&mut self, into: &mut VecDeque<Activity>) {
        if let Some(closed) = &mut self.closed {
            into.extend(closed.drain(..));
        }
    }

    /// Starts a flow from its SYN: asks the runtime to connect and keeps the SYN until then.
    /// With `hold`, the device's bytes wait for the network decision (see the module doc).
    // The SYN, the decision and the sinks; a struct for them would only hide which is which.
    #[allow(clippy::too_many_arguments)]
    pub fn open<S: PacketSink>(
        &mut self,
        ctx: FlowCtx,
        upstream: Upstream,
        syn: &[u8],
        flags: TcpFlags,
        opening: Opening,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        let id = ctx.id;
        // A local service is handed the flow's context (who the device is) with the connect.
        let local_ctx = upstream.local.map(|_| ctx.clone());
        // The caller checked `has_memory_for_flow`; the floor is the fallback regardless.
        let buffers = self
            .buffers_for_new(ctx.peer)
            .unwrap_or_else(|| self.floor_buffers());
        let peer = self.peers.entry(ctx.peer).or_default();
        tracing::debug!(
            target: "waygate::flow",
            flow = id,
            rx = buffers.rx,
            tx = buffers.tx,
            window = buffers.window,
            device_memory = peer.memory,
            device_flows = peer.flows,
            device_rtt_us = peer.rtt.map(|e| e.rtt.as_micros() as u64),
            "flow buffers"
        );
        peer.flows += 1;
        peer.memory += buffers.total();
        self.memory += buffers.total();
        self.by_key.insert((ctx.peer, ctx.src, ctx.dst), id);
        self.flows.insert(
            id,
            TcpFlow {
                ctx,
                upstream,
                dialled: match opening {
                    Opening::Connect => upstream.dst,
                    Opening::ConnectAndHold { dialled } | Opening::AcceptAndHold { dialled } => {
                        dialled
                    }
                },
                hold: if opening == Opening::Connect {
                    Hold::Off
                } else {
                    Hold::Sniffing { until: None }
                },
                upstream_local: None,
                phase: Phase::Connecting {
                    syn: syn.to_vec(),
                    flags,
                },
                upload_in_flight: 0,
                download: VecDeque::new(),
                upstream_eof: false,
                fin_forwarded: false,
                closing: false,
                next_poll: None,
                armed: None,
                synack_sent: None,
                rtt: None,
                queued: 0,
                waiting: false,
                dirty: false,
                buffers,
                bytes_up: 0,
                bytes_down: 0,
                idle_mark: 0,
                released_mark: 0,
            },
        );
        if let Opening::AcceptAndHold { .. } = opening {
            self.accepted(id, None, now, sink, out);
        } else {
            connect(id, upstream, local_ctx, buffers.window, out);
        }
    }

    /// Feeds a device segment to its flow. smoltcp takes it (and may answer) at once; sending
    /// and moving the bytes it carries wait for [`TcpFlows::flush`], so a batch of segments
    /// becomes one upstream write instead of one per segment, and the socket sends only once
    /// it has seen every ACK of the batch: a gateway that was not scheduled for a while reads
    /// a backlog of ACKs at once, and sending after the first of them could resend data the
    /// later ones acknowledge, or fire a retransmission timeout they would have stopped.
    /// Captured at 40 ms on a loaded host (scripts/bench-far.sh, issue 15): before, 1,100
    /// spurious retransmissions and a timeout in the first 2 s; after, no timeout.
    pub fn deliver<S: PacketSink>(
        &mut self,
        id: FlowId,
        packet: &[u8],
        rst: bool,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        let snow = self.smol_now(now);
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if let Phase::Connecting { .. } = flow.phase {
            // Retransmitted SYNs wait with the first; a RST means the device gave up.
            if rst {
                self.finish(id, "device reset while connecting", now, out);
            }
            return;
        }
        let Phase::Open { sockets, .. } = &mut flow.phase else {
            return;
        };
        let mut device = FlowDevice::new(
            Some(packet),
            sink,
            flow.ctx.peer,
            self.settings.mtu,
            &mut self.scratch,
        );
        self.iface.poll_ingress_single(snow, &mut device, sockets);
        if !flow.dirty {
            flow.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Moves the bytes of every flow that received segments since the last flush. The runtime
    /// calls this after each batch of datagrams, before sending.
    pub fn flush<S: PacketSink>(
        &mut self,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        // Servicing a flow may free room under its device's cap and list the device's waiting
        // flows again; they are serviced in the next round. A round only lists flows when
        // acknowledgments shrank a queue, so this ends; the bound is a backstop.
        for _ in 0..4 {
            if self.dirty.is_empty() {
                return;
            }
            let mut dirty = std::mem::take(&mut self.dirty);
            for id in dirty.drain(..) {
                if let Some(flow) = self.flows.get_mut(&id) {
                    flow.dirty = false;
                    self.service(id, None, now, sink, out);
                }
            }
            if self.dirty.is_empty() {
                // Keep the allocation for the next batch.
                self.dirty = dirty;
            }
        }
    }

    /// Applies an upstream event.
    pub fn handle_event<S: PacketSink>(
        &mut self,
        event: UpstreamEvent,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        let stale = |f: FlowId| {
            self.flows
                .get(&f)
                .is_some_and(|f| f.hold == Hold::Reconnecting)
        };
        match event {
            // What the closed first upstream still reported before its redirect.
            UpstreamEvent::TcpData { flow, .. }
            | UpstreamEvent::TcpEof { flow }
            | UpstreamEvent::TcpError { flow }
            | UpstreamEvent::TcpWritten { flow, .. }
                if stale(flow) => {}
            UpstreamEvent::TcpConnected { flow, local } => {
                self.accepted(flow, Some(local), now, sink, out)
            }
            UpstreamEvent::TcpConnectFailed { flow } => self.refuse(flow, now, sink, out),
            UpstreamEvent::TcpData { flow, data } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.download.push_back(data);
                    self.service(flow, None, now, sink, out);
                }
            }
            UpstreamEvent::TcpEof { flow } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.upstream_eof = true;
                    self.service(flow, None, now, sink, out);
                }
            }
            UpstreamEvent::TcpError { flow } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    match &mut f.phase {
                        Phase::Open { sockets, handle } => {
                            sockets.get_mut::<tcp::Socket>(*handle).abort();
                            self.service(flow, None, now, sink, out);
                        }
                        Phase::Connecting { .. } => self.refuse(flow, now, sink, out),
                    }
                }
            }
            UpstreamEvent::TcpWritten { flow, bytes } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.upload_in_flight = f.upload_in_flight.saturating_sub(bytes);
                    self.service(flow, None, now, sink, out);
                }
            }
            UpstreamEvent::UdpData { .. } => {}
        }
    }

    /// Services flows whose smoltcp timers are due.
    pub fn handle_timeout<S: PacketSink>(
        &mut self,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(flow) = self.flows.get_mut(&id) else {
                continue;
            };
            if flow.armed != Some(at) {
                continue; // superseded by an earlier entry
            }
            flow.armed = None;
            let sniff_until = match flow.hold {
                Hold::Sniffing { until } => until,
                _ => None,
            };
            let due = [flow.next_poll, sniff_until]
                .into_iter()
                .flatten()
                .any(|t| t <= now);
            if due {
                self.service(id, None, now, sink, out);
            } else if let Some(next) = [flow.next_poll, sniff_until].into_iter().flatten().min() {
                arm(&mut self.timers, flow, id, next);
            }
        }
    }

    /// The next held flow whose first bytes are known, with what they showed.
    pub fn poll_sniffed(&mut self) -> Option<(FlowId, Detected)> {
        self.sniffed.pop_front()
    }

    /// A held flow, for deciding it.
    pub fn held(&mut self, id: FlowId) -> Option<Held<'_>> {
        self.flows.get_mut(&id).map(|f| Held {
            ctx: &mut f.ctx,
            dialled: f.dialled,
            opened: f.upstream,
            connected: f.upstream_local.is_some(),
        })
    }

    /// Applies the network decision to a flow listed by [`TcpFlows::poll_sniffed`].
    pub fn release<S: PacketSink>(
        &mut self,
        id: FlowId,
        release: Release,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if flow.hold != Hold::Deciding {
            return;
        }
        match release {
            Release::Forward => flow.hold = Hold::Off,
            Release::Reset => {
                if let Phase::Open { sockets, handle } = &mut flow.phase {
                    sockets.get_mut::<tcp::Socket>(*handle).abort();
                }
            }
            Release::Redirect(upstream) => {
                flow.hold = Hold::Reconnecting;
                flow.upstream = upstream;
                out.push_back(Command::TcpClose { flow: id });
                let local_ctx = upstream.local.map(|_| flow.ctx.clone());
                connect(id, upstream, local_ctx, flow.buffers.window, out);
                return;
            }
        }
        self.service(id, None, now, sink, out);
    }

    /// Entries in the timer heap (for tests: it must not grow with every service call).
    #[cfg(test)]
    pub(crate) fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    /// Hands `release` the socket buffers of flows that moved bytes since their last release
    /// and none since the pass before (one pass a second: idle for a second or more), when
    /// both hold nothing: their contents are then meaningless, so `release` may give their
    /// pages back to the system. Pages a flow wrote stay resident otherwise: an inspected
    /// HTTPS connection that made one request kept about 12 KiB of them while idle
    /// (scripts/bench-http.sh, 1,000 idle connections). Returns the buffers handed over.
    pub fn release_idle_buffers(&mut self, release: &mut dyn FnMut(&mut [u8])) -> usize {
        let mut released = 0;
        for flow in self.flows.values_mut() {
            let moved = flow.bytes_up + flow.bytes_down;
            let idle = moved == flow.idle_mark;
            flow.idle_mark = moved;
            if !idle || moved == flow.released_mark {
                continue;
            }
            let Phase::Open { sockets, handle } = &mut flow.phase else {
                continue;
            };
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            // Both or neither: a flow whose device or upstream stopped reading keeps one
            // buffer full, and would otherwise cost a system call every pass.
            let mut unused = 0;
            socket.with_unused_buffers(|_| unused += 1);
            if unused < 2 {
                continue;
            }
            socket.with_unused_buffers(&mut *release);
            released += 2;
            flow.released_mark = moved;
        }
        released
    }

    /// When [`TcpFlows::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Ends every flow of a peer that is gone (revoked): upstreams are closed, nothing is sent
    /// to the device.
    pub fn remove_peer(&mut self, peer: PeerId, now: Instant, out: &mut VecDeque<Command>) {
        let ids: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| f.ctx.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.finish(id, "device removed", now, out);
        }
        self.peers.remove(&peer);
    }

    /// Answers the held SYN: the upstream connected from `local`, or (`None`) the flow is held
    /// without one.
    fn accepted<S: PacketSink>(
        &mut self,
        id: FlowId,
        local: Option<SocketAddr>,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        let Some(flow) = self.flows.get_mut(&id) else {
            // The device gave up meanwhile; the runtime still holds a connection.
            out.push_back(Command::TcpClose { flow: id });
            return;
        };
        if flow.hold == Hold::Reconnecting {
            flow.hold = Hold::Off;
            flow.upstream_local = local;
            self.service(id, None, now, sink, out);
            return;
        }
        if matches!(flow.hold, Hold::Sniffing { .. }) {
            let at = now + SNIFF_WAIT;
            flow.hold = Hold::Sniffing { until: Some(at) };
            arm(&mut self.timers, flow, id, at);
        }
        let Phase::Connecting { syn, .. } = &mut flow.phase else {
            return;
        };
        let syn = std::mem::take(syn);
        let s = &self.settings;
        let mut socket = tcp::Socket::new(
            SocketBuffer::new(mapped_buffer(flow.buffers.rx)),
            SocketBuffer::new(mapped_buffer(flow.buffers.tx)),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(Some(s.ack_delay.into()));
        // Rate-based: a device's path loses packets that say nothing of congestion (radio,
        // a full UDP buffer in the device's WireGuard daemon), and Cubic halved its window
        // for each: at 40 ms and 0.5% random loss downloads ran at 0.01 of a BBR sender's
        // (scripts/bench-far.sh, issue 15).
        socket.set_congestion_control(CongestionControl::Bbr);
        // Far devices: spread each window over the round trip instead of bursting it into the
        // device's UDP socket buffer (issue 15); smoltcp does not pace under 1 ms of RTT.
        socket.set_pacing(true);
        socket.set_min_rto(s.min_rto.into());
        // Segments arrive in batches (`deliver`, then `flush` dispatches): one ACK per batch
        // for out-of-order data, with three SACK blocks, instead of one per segment.
        socket.set_coalesced_acks(true);
        // No TCP timestamps (RFC 7323), though a Linux device offers them: they take 12 of the
        // 1,380 bytes a segment carries (0.9%), and smoltcp times its round trips without
        // them. Behind a 100 Mbit/s link goodput is the link's payload share: three runs of
        // scripts/bench-far.sh gave 0.0932-0.0944 Gbit/s with them and 0.0940-0.0952 without,
        // the reference (whose ends use them) 0.0932-0.0959. Clean and lossy paths at 40 and
        // 100 ms moved within their run-to-run spread (two runs each). The device then sends
        // up to 4 SACK blocks and smoltcp reads the first 3, the newest.
        let endpoint = IpListenEndpoint {
            addr: Some(flow.ctx.dst.ip().into()),
            port: flow.ctx.dst.port(),
        };
        if socket.listen(endpoint).is_err() {
            // Port 0 cannot be listened on; such a SYN cannot be answered.
            self.refuse(id, now, sink, out);
            return;
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        flow.phase = Phase::Open { sockets, handle };
        flow.upstream_local = local;
        flow.synack_sent = Some(now);
        self.service(id, Some(&syn), now, sink, out);
    }

    /// The upstream refused: answer the held SYN with a RST.
    fn refuse<S: PacketSink>(
        &mut self,
        id: FlowId,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if let Phase::Open { sockets, handle } = &mut flow.phase {
            // A redirected flow whose new upstream refused: the device's connection is
            // established, so it is reset.
            sockets.get_mut::<tcp::Socket>(*handle).abort();
            self.service(id, None, now, sink, out);
            return;
        }
        if let Phase::Connecting { flags, .. } = &flow.phase {
            let mut buf = [0u8; 80];
            if let Some(n) = build_rst(&mut buf, flow.ctx.dst, flow.ctx.src, flags) {
                sink.send(flow.ctx.peer, &buf[..n]);
            }
        }
        self.finish(id, "upstream refused", now, out);
    }

    fn finish(&mut self, id: FlowId, why: &'static str, now: Instant, out: &mut VecDeque<Command>) {
        let Some(flow) = self.flows.remove(&id) else {
            return;
        };
        self.by_key
            .remove(&(flow.ctx.peer, flow.ctx.src, flow.ctx.dst));
        if let Some(peer) = self.peers.get_mut(&flow.ctx.peer) {
            peer.queued = peer.queued.saturating_sub(flow.queued);
            peer.waiting.retain(|w| *w != id);
            peer.flows = peer.flows.saturating_sub(1);
            peer.memory = peer.memory.saturating_sub(flow.buffers.total());
        }
        self.memory = self.memory.saturating_sub(flow.buffers.total());
        out.push_back(Command::TcpClose { flow: id });
        let ctx = &flow.ctx;
        if let Some(closed) = &mut self.closed {
            closed.push(closed_record(
                ctx,
                &flow.upstream,
                flow.bytes_up,
                flow.bytes_down,
                why,
                now,
            ));
        }
        tracing::info!(
            target: "waygate::flow",
            flow = id,
            device = %ctx.device.name,
            user = %ctx.device.email,
            protocol = "tcp",
            src = %ctx.src,
            dst = %ctx.dst,
            vnet = ctx.device.vnet_id.as_deref().unwrap_or("default"),
            egress_rule = ctx.rules.egress.as_deref(),
            l4_rule = ctx.rules.l4.as_deref(),
            route = ctx.rules.route.as_deref(),
            name = ctx.rules.name.as_deref(),
            egress = ?flow.upstream_local,
            bytes_up = flow.bytes_up,
            bytes_down = flow.bytes_down,
            rtt_us = flow.rtt.map(|r| r.as_micros() as u64),
            duration_ms = now.saturating_duration_since(ctx.opened).as_millis() as u64,
            reason = why,
            "flow closed"
        );
    }

    /// `now` in smoltcp's terms.
    fn smol_now(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    /// Moves what can move: the packet into smoltcp, bytes between smoltcp and the upstream,
    /// then reschedules the flow's timer.
    fn service<S: PacketSink>(
        &mut self,
        id: FlowId,
        rx: Option<&[u8]>,
        now: Instant,
        sink: &mut S,
        out: &mut VecDeque<Command>,
    ) {
        let snow = self.smol_now(now);
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let peer = self.peers.entry(flow.ctx.peer).or_default();
        let room = peer
            .cap(&self.settings)
            .saturating_sub(peer.queued.saturating_sub(flow.queued));
        let liveness = service_flow(
            &mut self.iface,
            flow,
            &self.settings,
            rx,
            room,
            (now, snow),
            sink,
            &mut self.scratch,
            &mut self.sniffed,
            out,
        );
        if liveness == Liveness::Finished {
            self.finish(id, "closed", now, out);
            return;
        }
        let Phase::Open { sockets, handle } = &flow.phase else {
            return;
        };
        let socket = sockets.get::<tcp::Socket>(*handle);
        if let Some(sent) = flow.synack_sent {
            if !matches!(socket.state(), State::Listen | State::SynReceived) {
                flow.synack_sent = None;
                let sample = now.saturating_duration_since(sent);
                flow.rtt = Some(sample);
                RttEstimate::update(&mut peer.rtt, sample, now);
            }
        }
        let queued = socket.send_queue();
        let freed = queued < flow.queued;
        peer.queued = (peer.queued + queued).saturating_sub(flow.queued);
        flow.queued = queued;
        if !flow.download.is_empty() && !flow.waiting {
            flow.waiting = true;
            peer.waiting.push(id);
        }
        if freed && !peer.waiting.is_empty() {
            // Room under the device's cap: the flows that were held back get their turn in
            // the next flush.
            for waiter in peer.waiting.drain(..) {
                if let Some(w) = self.flows.get_mut(&waiter) {
                    w.waiting = false;
                    if !w.dirty {
                        w.dirty = true;
                        self.dirty.push(waiter);
                    }
                }
            }
        }
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let Phase::Open { sockets, .. } = &flow.phase else {
            return;
        };
        let next = self
            .iface
            .poll_at(snow, sockets)
            .map(|t| self.epoch + Duration::from_micros(t.total_micros().max(0) as u64));
        let next = next.map(|t| t.max(now));
        flow.next_poll = next;
        // The flow wakes for smoltcp or for the end of its sniffing wait, whichever is first:
        // a popped entry re-arms only for what is still pending.
        let sniff_until = match flow.hold {
            Hold::Sniffing { until } => until,
            _ => None,
        };
        if let Some(at) = [next, sniff_until].into_iter().flatten().min() {
            arm(&mut self.timers, flow, id, at);
        }
    }
}

/// Makes sure `flow` is woken at `at`: pushes only when that is earlier than its armed entry.
fn arm(
    timers: &mut BinaryHeap<Reverse<(Instant, FlowId)>>,
    flow: &mut TcpFlow,
    id: FlowId,
    at: Instant,
) {
    if flow.armed.is_none_or(|armed| at < armed) {
        timers.push(Reverse((at, id)));
        flow.armed = Some(at);
    }
}

#[allow(clippy::too_many_arguments)]
fn service_flow<S: PacketSink>(
    iface: &mut Interface,
    flow: &mut TcpFlow,
    settings: &TcpSettings,
    rx: Option<&[u8]>,
    room: usize,
    (now, snow): (Instant, SmolInstant),
    sink: &mut S,
    scratch: &mut [u8],
    sniffed: &mut VecDeque<(FlowId, Detected)>,
    out: &mut VecDeque<Command>,
) -> Liveness {
    let id = flow.ctx.id;
    let peer = flow.ctx.peer;
    let Phase::Open { sockets, handle } = &mut flow.phase else {
        return Liveness::Alive;
    };
    {
        let mut device = FlowDevice::new(rx, sink, peer, settings.mtu, scratch);
        iface.poll(snow, &mut device, sockets);
    }
    let socket = sockets.get_mut::<tcp::Socket>(*handle);
    let mut progressed = false;

    if let Hold::Sniffing { until: Some(until) } = flow.hold {
        let device_done = !matches!(
            socket.state(),
            State::Listen | State::SynReceived | State::Established
        );
        let seen = socket.peek(MAX_SNIFF).unwrap_or(&[]);
        let enough = seen.len() >= MAX_SNIFF || device_done || now >= until;
        let detected = match sniff(seen) {
            Sniff::Done(detected) => Some(detected),
            Sniff::NeedMore if enough => Some(Detected::Unknown),
            Sniff::NeedMore => None,
        };
        if let Some(detected) = detected {
            flow.hold = Hold::Deciding;
            sniffed.push_back((id, detected));
        }
    }
    // Held flows keep the device's bytes in smoltcp (its window closes behind them) until the
    // decision; the download direction is never held.
    if flow.hold == Hold::Off {
        // Device -> upstream, within the upload window.
        while flow.upload_in_flight < settings.upload_window && socket.can_recv() {
            let room = (settings.upload_window - flow.upload_in_flight).min(settings.max_chunk);
            let chunk = socket.recv(|buf| {
                let n = buf.len().min(room);
                (n, Bytes::copy_from_slice(&buf[..n]))
            });
            match chunk {
                Ok(data) if !data.is_empty() => {
                    flow.upload_in_flight += data.len();
                    flow.bytes_up += data.len() as u64;
                    out.push_back(Command::TcpSend { flow: id, data });
                    progressed = true;
                }
                _ => break,
            }
        }
        // The device's FIN reaches the upstream only after all its data.
        if !flow.fin_forwarded
            && socket.recv_queue() == 0
            && matches!(
                socket.state(),
                State::CloseWait | State::LastAck | State::Closing | State::TimeWait
            )
        {
            flow.fin_forwarded = true;
            out.push_back(Command::TcpShutdownWrite { flow: id });
        }
    }

    // Upstream -> device, as far as the send buffer and the device's cap take it. Until the
    // device acknowledges the SYN-ACK (one round trip after the upstream connected) the socket
    // takes nothing: what a server says first waits in `download`.
    let mut credit = 0;
    let room = room.saturating_sub(socket.send_queue());
    let handshaking = matches!(socket.state(), State::Listen | State::SynReceived);
    while let Some(front) = flow.download.front_mut().filter(|_| !handshaking) {
        let allowed = front.len().min(room - credit);
        if allowed == 0 {
            break;
        }
        match socket.send_slice(&front[..allowed]) {
            Ok(0) => break,
            Ok(n) => {
                credit += n;
                if n == front.len() {
                    flow.download.pop_front();
                } else {
                    front.advance(n);
                    break;
                }
            }
            Err(_) => {
                // The device closed its side for good: nothing more can be delivered.
                flow.download.clear();
                break;
            }
        }
    }
    if credit > 0 {
        flow.bytes_down += credit as u64;
        out.push_back(Command::TcpCredit {
            flow: id,
            bytes: credit,
        });
        progressed = true;
    }
    if flow.upstream_eof && flow.download.is_empty() && !flow.closing {
        socket.close();
        flow.closing = true;
        progressed = true;
    }
    if progressed {
        let mut device = FlowDevice::new(None, sink, peer, settings.mtu, scratch);
        iface.poll(snow, &mut device, sockets);
    }
    let socket = sockets.get::<tcp::Socket>(*handle);
    match socket.state() {
        State::Closed | State::TimeWait => Liveness::Finished,
        _ => Liveness::Alive,
    }
}

/// Asks the runtime to connect a flow's upstream (or hand it to a local service, with `ctx`) and
/// lets it read `window` bytes ahead of the device.
/// The activity record of a flow that ends: allowed unless a rule reset it after its first bytes.
pub(crate) fn closed_record(
    ctx: &FlowCtx,
    upstream: &Upstream,
    bytes_sent: u64,
    bytes_received: u64,
    why: &'static str,
    now: Instant,
) -> Activity {
    let rewritten = upstream.local.is_none() && upstream.dst != ctx.dst;
    Activity::Network(Box::new(NetworkActivity {
        at: now,
        opened: ctx.opened,
        device: ctx.device.clone(),
        protocol: ctx.protocol,
        src: ctx.src,
        dst: ctx.dst,
        override_dst: rewritten.then_some(upstream.dst),
        action: if ctx.rules.blocked {
            FlowAction::Block
        } else {
            FlowAction::Allow
        },
        policy: ctx.rules.l4_ref.clone(),
        sni: ctx.rules.sni.clone(),
        detected_protocol: ctx.rules.detected,
        bytes_sent,
        bytes_received,
        reason: why,
    }))
}

fn connect(
    flow: FlowId,
    upstream: Upstream,
    ctx: Option<FlowCtx>,
    window: usize,
    out: &mut VecDeque<Command>,
) {
    match (upstream.local, ctx) {
        (Some(endpoint), Some(ctx)) => out.push_back(Command::LocalConnect {
            flow,
            endpoint,
            ctx: Box::new(ctx),
        }),
        _ => out.push_back(Command::TcpConnect { flow, upstream }),
    }
    out.push_back(Command::TcpCredit {
        flow,
        bytes: window,
    });
}

/// A sink for the one poll during setup that never transmits.
struct NullSink;

impl PacketSink for NullSink {
    fn send(&mut self, _peer: PeerId, _packet: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_follow_the_round_trip_time_within_bounds() {
        let s = TcpSettings::for_mtu(1420);
        assert_eq!(s.buffers_for(None), (512 * 1024, 96 * 1024));
        // A LAN-near device keeps the minimums that suit a stock wireguard-go device.
        assert_eq!(
            s.buffers_for(Some(Duration::from_micros(600))),
            (512 * 1024, 96 * 1024)
        );
        // 40 ms at 1 Gbit/s is 5 MB (two of them for the receive buffer, six for the send
        // buffer: both capped); 10 ms, 1.25 MB.
        let (rx, tx) = s.buffers_for(Some(Duration::from_millis(40)));
        assert_eq!((rx, tx), (8 * 1024 * 1024, 16 * 1024 * 1024));
        let (rx, tx) = s.buffers_for(Some(Duration::from_millis(10)));
        assert_eq!((rx, tx), (2_500_000, 7_500_000));
        let (rx, tx) = s.buffers_for(Some(Duration::from_millis(100)));
        assert_eq!((rx, tx), (8 * 1024 * 1024, 16 * 1024 * 1024));
        let (rx, tx) = s.buffers_for(Some(Duration::from_millis(2)));
        assert_eq!((rx, tx), (512 * 1024, 1_500_000));
    }

    #[allow(clippy::disallowed_methods)] // the fake clock starts from one real instant
    #[test]
    fn a_device_gets_full_buffers_then_the_floor_then_none() {
        let settings = TcpSettings {
            memory_per_device: 8 * 1024 * 1024,
            ..TcpSettings::for_mtu(1420)
        };
        let mut flows = TcpFlows::new(settings, &[], Instant::now());
        let full = flows.buffers_for_new(1).unwrap();
        assert_eq!(full.total(), (512 + 96 + 512) * 1024);
        flows.peers.entry(1).or_default().memory = 4 * 1024 * 1024;
        let floor = flows.buffers_for_new(1).unwrap();
        assert_eq!(floor.total(), (32 + 32 + 64) * 1024);
        flows.peers.entry(1).or_default().memory = 8 * 1024 * 1024 - 1000;
        assert!(!flows.has_memory_for_flow(1));
        // Another device is not held back by the first one's memory.
        assert_eq!(flows.buffers_for_new(2), Some(full));
    }

    #[allow(clippy::disallowed_methods)] // the fake clock starts from one real instant
    #[test]
    fn the_estimate_keeps_the_smallest_recent_sample_unless_the_device_moved_far() {
        let t0 = Instant::now();
        let mut e = None;
        RttEstimate::update(&mut e, Duration::from_millis(5), t0);
        RttEstimate::update(
            &mut e,
            Duration::from_millis(2),
            t0 + Duration::from_secs(1),
        );
        RttEstimate::update(
            &mut e,
            Duration::from_millis(4),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(e.map(|e| e.rtt), Some(Duration::from_millis(2)));
        // Once the small sample is old, the device may have moved: a slower one replaces it.
        RttEstimate::update(
            &mut e,
            Duration::from_millis(30),
            t0 + Duration::from_secs(62),
        );
        assert_eq!(e.map(|e| e.rtt), Some(Duration::from_millis(30)));
        // A device that moved far away is believed at once.
        RttEstimate::update(
            &mut e,
            Duration::from_millis(70),
            t0 + Duration::from_secs(63),
        );
        assert_eq!(e.map(|e| e.rtt), Some(Duration::from_millis(70)));
        // A near device queued behind its own download is not.
        let mut near = None;
        RttEstimate::update(&mut near, Duration::from_micros(600), t0);
        RttEstimate::update(&mut near, Duration::from_millis(4), t0);
        assert_eq!(near.map(|e| e.rtt), Some(Duration::from_micros(600)));
    }

    #[allow(clippy::disallowed_methods)] // a timestamp nobody reads
    #[test]
    fn a_local_upstream_is_handed_over_with_the_flow_context() {
        use crate::flow::{DeviceInfo, LocalEndpoint, LocalService, Protocol};
        let ctx = FlowCtx {
            id: 9,
            peer: 1,
            device: std::sync::Arc::new(DeviceInfo {
                id: "dev-1".into(),
                name: "laptop".into(),
                email: "ada@example.com".into(),
                user_name: None,
                groups: vec![],
                extras: Default::default(),
                vnet_id: None,
                ipv4: std::net::Ipv4Addr::new(100, 96, 0, 2),
                ipv6: "fd77:6761:7465::2".parse().unwrap(),
                log_fields: Default::default(),
            }),
            device_public: None,
            protocol: Protocol::Tcp,
            src: "100.96.0.2:40000".parse().unwrap(),
            dst: "100.96.0.1:853".parse().unwrap(),
            opened: Instant::now(),
            rules: Default::default(),
        };
        let endpoint = LocalEndpoint::Service(LocalService::DnsOverTls);
        let local = Upstream {
            dst: ctx.dst,
            bind: None,
            via: None,
            local: Some(endpoint),
        };
        let mut out = VecDeque::new();
        connect(9, local, Some(ctx.clone()), 4096, &mut out);
        assert_eq!(
            Vec::from(out),
            vec![
                Command::LocalConnect {
                    flow: 9,
                    endpoint,
                    ctx: Box::new(ctx.clone()),
                },
                Command::TcpCredit {
                    flow: 9,
                    bytes: 4096
                },
            ]
        );
        let mut out = VecDeque::new();
        let remote = Upstream {
            local: None,
            ..local
        };
        connect(9, remote, None, 4096, &mut out);
        assert_eq!(
            out.front(),
            Some(&Command::TcpConnect {
                flow: 9,
                upstream: remote
            })
        );
    }
}

//! A gateway and one device in a simulated network, on a fake clock.
//!
//! The device is boringtun (`Tunn`) under a smoltcp stack. Between the device's WireGuard and the
//! gateway's socket are two [`Wire`]s, one each way, that delay, reorder and lose datagrams as
//! their [`Conditions`] say, drawing from an RNG seeded by [`SimConfig::seed`]: the same seed
//! gives the same run. The link between the device's stack and its WireGuard is perfect. The test
//! plays the runtime: it reads the core's commands ([`Sim::take_commands`]) and answers with
//! upstream events ([`Sim::upstream`]).
//!
//! Time moves only through [`Sim::advance`], which steps from event to event: a datagram's
//! arrival, the core's deadline, smoltcp's, and the device's WireGuard timer tick
//! ([`waygate_wg::TIMER_TICK`]). boringtun reads its own clock; built with its `mock-instant`
//! feature (the sim crate, `gateway/sim`), [`Sim::on_advance`] moves that clock along, so
//! handshake retries, rekeys and keepalives happen in simulated time. Without it boringtun's
//! timers see (almost) no time pass.
//!
//! # Panics
//! [`Sim::run`] panics if the network does not settle within 1,000 rounds, [`Sim::advance`] if
//! it takes more than 10,000,000 steps (a livelock either way).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use super::{core_settings, device, epoch, key, public, DEVICE_ENDPOINT, GW_V4, MTU};
use crate::flow::{Command, DeviceInfo, FlowDrop, FlowId, Upstream, UpstreamEvent};
use crate::gateway::{CoreSettings, GatewayCore};
use waygate_wg::transmit::MAX_DATAGRAM;
use waygate_wg::TIMER_TICK;

/// A small deterministic RNG (SplitMix64): the same seed, the same numbers, on every platform and
/// with every version of every crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// An RNG seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// A duration in `0..=max`, to the microsecond.
    pub fn up_to(&mut self, max: Duration) -> Duration {
        let micros = max.as_micros() as u64;
        if micros == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.next_u64() % (micros + 1))
    }
}

/// What a [`Wire`] does to datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Conditions {
    /// Every datagram's delay.
    pub latency: Duration,
    /// Extra delay, uniform in `0..=jitter`, drawn per datagram: datagrams overtake each other.
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
}

impl Conditions {
    /// No delay, no loss.
    pub const PERFECT: Conditions = Conditions {
        latency: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
    };
}

/// What went over a [`Wire`], by WireGuard message type (index 1 to 4; 0: anything else).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Datagrams put on the wire.
    pub sent: [u64; 5],
    /// Of those, lost.
    pub lost: [u64; 5],
    /// Keepalives (empty transport messages) put on the wire.
    pub keepalives: u64,
    /// Datagrams delivered after one sent later than them.
    pub reordered: u64,
    /// Datagrams dropped because the bottleneck's queue was full (see
    /// [`Wire::set_bottleneck`]).
    pub overflowed: u64,
    /// The most bytes put on the wire within any [`BURST_WINDOW`]: how much arrives at the
    /// far end at once.
    pub peak_burst: usize,
}

/// The span [`WireStats::peak_burst`] is measured over: about what a receiver's socket takes
/// in before its reader is scheduled again.
pub const BURST_WINDOW: Duration = Duration::from_millis(1);

/// A queue drained at a fixed rate in front of a wire (a narrow link, or a receiver that
/// drains its socket buffer at the speed it decrypts).
#[derive(Debug, Clone, Copy)]
struct Bottleneck {
    bytes_per_sec: u64,
    queue: usize,
    /// When what is queued has left.
    busy_until: Option<Instant>,
}

/// Datagrams one way, delayed, reordered and lost as its [`Conditions`] say.
#[derive(Debug)]
pub struct Wire {
    conditions: Conditions,
    rng: Rng,
    /// (arrival, sequence number, datagram), earliest first.
    in_flight: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    next_seq: u64,
    last_delivered: Option<u64>,
    lose_next: usize,
    stats: WireStats,
    bottleneck: Option<Bottleneck>,
    /// (sent at, bytes) within the last [`BURST_WINDOW`], and their sum.
    recent: VecDeque<(Instant, usize)>,
    recent_bytes: usize,
}

/// Size of an empty WireGuard transport message (a keepalive).
const KEEPALIVE_LEN: usize = 32;

impl Wire {
    /// A wire with these conditions, its RNG seeded with `seed`.
    pub fn new(conditions: Conditions, seed: u64) -> Wire {
        Wire {
            conditions,
            rng: Rng::new(seed),
            in_flight: BinaryHeap::new(),
            next_seq: 0,
            last_delivered: None,
            lose_next: 0,
            stats: WireStats::default(),
            bottleneck: None,
            recent: VecDeque::new(),
            recent_bytes: 0,
        }
    }

    /// Puts a queue of `queue` bytes drained at `bits_per_sec` in front of the wire: a
    /// datagram that does not fit is dropped and counted in [`WireStats::overflowed`].
    pub fn set_bottleneck(&mut self, bits_per_sec: u64, queue: usize) {
        self.bottleneck = Some(Bottleneck {
            bytes_per_sec: (bits_per_sec / 8).max(1),
            queue,
            busy_until: None,
        });
    }

    /// Changes the conditions for datagrams sent from now on.
    pub fn set_conditions(&mut self, conditions: Conditions) {
        self.conditions = conditions;
    }

    /// Loses the next `n` datagrams sent, whatever the conditions.
    pub fn lose_next(&mut self, n: usize) {
        self.lose_next = n;
    }

    /// What went over the wire so far.
    pub fn stats(&self) -> &WireStats {
        &self.stats
    }

    /// Puts a datagram on the wire at `now`.
    pub fn send(&mut self, now: Instant, datagram: &[u8]) {
        let kind = match datagram.first() {
            Some(&t @ 1..=4) => usize::from(t),
            _ => 0,
        };
        self.stats.sent[kind] += 1;
        if kind == 4 && datagram.len() == KEEPALIVE_LEN {
            self.stats.keepalives += 1;
        }
        self.recent.push_back((now, datagram.len()));
        self.recent_bytes += datagram.len();
        while let Some(&(at, n)) = self.recent.front() {
            if now.saturating_duration_since(at) < BURST_WINDOW {
                break;
            }
            self.recent.pop_front();
            self.recent_bytes -= n;
        }
        self.stats.peak_burst = self.stats.peak_burst.max(self.recent_bytes);
        // Drawn for every datagram, so a forced loss leaves the rest of the run unchanged.
        let lost = self.rng.chance(self.conditions.loss);
        let delay = self.conditions.latency + self.rng.up_to(self.conditions.jitter);
        if self.lose_next > 0 || lost {
            self.lose_next = self.lose_next.saturating_sub(1);
            self.stats.lost[kind] += 1;
            return;
        }
        let mut leaves = now;
        if let Some(b) = &mut self.bottleneck {
            let start = b.busy_until.map_or(now, |t| t.max(now));
            let backlog = (start - now).as_micros() as u64 * b.bytes_per_sec / 1_000_000;
            if backlog as usize + datagram.len() > b.queue {
                self.stats.overflowed += 1;
                return;
            }
            leaves =
                start + Duration::from_micros(datagram.len() as u64 * 1_000_000 / b.bytes_per_sec);
            b.busy_until = Some(leaves);
        }
        self.in_flight
            .push(Reverse((leaves + delay, self.next_seq, datagram.to_vec())));
        self.next_seq += 1;
    }

    /// The next datagram due by `now`.
    pub fn recv(&mut self, now: Instant) -> Option<Vec<u8>> {
        let Reverse((at, _, _)) = self.in_flight.peek()?;
        if *at > now {
            return None;
        }
        let Reverse((_, seq, datagram)) = self.in_flight.pop()?;
        if self.last_delivered.is_some_and(|last| seq < last) {
            self.stats.reordered += 1;
        }
        self.last_delivered = Some(self.last_delivered.map_or(seq, |last| last.max(seq)));
        Some(datagram)
    }

    /// When the next datagram arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse((at, _, _))| *at)
    }
}

/// The device's IP link between its stack and its WireGuard: what the stack sends, and what the
/// tunnel delivered to it. Perfect.
#[derive(Debug, Default)]
pub struct Link {
    /// Packets waiting for the device's stack.
    pub to_device: VecDeque<Vec<u8>>,
    /// Packets the device's stack sent.
    pub from_device: Vec<Vec<u8>>,
}

/// A packet for the device's stack.
pub struct LinkRx(Vec<u8>);
/// Room for a packet from the device's stack.
pub struct LinkTx<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for LinkRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for LinkTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl phy::Device for Link {
    type RxToken<'a> = LinkRx;
    type TxToken<'a> = LinkTx<'a>;

    fn receive(&mut self, _now: smoltcp::time::Instant) -> Option<(LinkRx, LinkTx<'_>)> {
        let packet = self.to_device.pop_front()?;
        Some((LinkRx(packet), LinkTx(&mut self.from_device)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<LinkTx<'_>> {
        Some(LinkTx(&mut self.from_device))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = usize::from(MTU);
        caps
    }
}

/// How to build a [`Sim`].
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seeds both wires' RNGs.
    pub seed: u64,
    /// Device to gateway.
    pub up: Conditions,
    /// Gateway to device.
    pub down: Conditions,
    /// The device's persistent keepalive, in seconds.
    pub persistent_keepalive: Option<u16>,
    /// The core's settings.
    pub settings: CoreSettings,
    /// Who the device is (its tunnel address is the stack's).
    pub device: DeviceInfo,
}

impl Default for SimConfig {
    /// Perfect wires, no keepalive, [`core_settings`], the default [`device`].
    fn default() -> Self {
        SimConfig {
            seed: 0,
            up: Conditions::PERFECT,
            down: Conditions::PERFECT,
            persistent_keepalive: None,
            settings: core_settings(),
            device: device().build(),
        }
    }
}

/// Private key seed of the gateway in a [`Sim`].
pub const GATEWAY_KEY: u8 = 1;
/// Private key seed of the device in a [`Sim`].
pub const DEVICE_KEY: u8 = 2;
/// Local port of the device's first TCP connection; each later one takes the next.
pub const FIRST_LOCAL_PORT: u16 = 49152;

/// A gateway and one device, wired together, with a fake clock.
pub struct Sim {
    /// The gateway.
    pub core: GatewayCore,
    /// Where the fake clock started.
    pub t0: Instant,
    /// The fake clock.
    pub now: Instant,
    /// The device's WireGuard.
    pub tunn: Tunn,
    /// The device's public endpoint.
    pub endpoint: SocketAddr,
    /// Device to gateway.
    pub up: Wire,
    /// Gateway to device.
    pub down: Wire,
    /// Between the device's stack and its WireGuard.
    pub link: Link,
    /// The device's stack.
    pub iface: Interface,
    /// The device's sockets.
    pub sockets: SocketSet<'static>,
    /// Commands the core gave, not yet taken.
    pub commands: Vec<Command>,
    /// Packets the device's stack received, as they arrived.
    pub delivered: Vec<Vec<u8>>,
    /// What the device's WireGuard refused (late or duplicated datagrams on a lossy wire).
    pub device_errors: Vec<WireGuardError>,
    next_device_tick: Instant,
    next_port: u16,
    on_advance: Option<Box<dyn FnMut(Duration)>>,
    /// Every `.0` the gateway is not scheduled for `.1` (see [`Sim::set_gateway_stalls`]).
    stalls: Option<(Duration, Duration)>,
    /// Upstream events the gateway has not taken yet (it was descheduled).
    upstream_backlog: Vec<UpstreamEvent>,
}

impl Sim {
    /// Perfect wires; see [`SimConfig::default`].
    pub fn new() -> Sim {
        Sim::with(SimConfig::default())
    }

    /// A sim as `config` says.
    pub fn with(config: SimConfig) -> Sim {
        let t0 = epoch();
        let gw_key = key(GATEWAY_KEY);
        let dev_key = key(DEVICE_KEY);
        let dev_v4 = config.device.ipv4;
        let mut core = GatewayCore::new(gw_key, config.settings, t0);
        core.sync_peers(vec![(public(dev_key), config.device)], t0);
        let tunn = Tunn::new(
            StaticSecret::from(dev_key),
            PublicKey::from(public(gw_key)),
            None,
            config.persistent_keepalive,
            1,
            None,
        );
        let mut link = Link::default();
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut link,
            smoltcp::time::Instant::from_millis(0),
        );
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::Ipv4(dev_v4), 16))
                .expect("room for an address");
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GW_V4)
            .expect("room for a route");
        Sim {
            core,
            t0,
            now: t0,
            tunn,
            endpoint: DEVICE_ENDPOINT,
            up: Wire::new(config.up, config.seed),
            down: Wire::new(config.down, config.seed ^ 0x5eed_d0e5_0000_0001),
            link,
            iface,
            sockets: SocketSet::new(vec![]),
            commands: Vec::new(),
            delivered: Vec::new(),
            device_errors: Vec::new(),
            next_device_tick: t0,
            next_port: FIRST_LOCAL_PORT,
            on_advance: None,
            stalls: None,
            upstream_backlog: Vec::new(),
        }
    }

    /// Every `every` from now on, the gateway gets no CPU for `length`, as on a busy host:
    /// datagrams wait in its socket and its timers are late, then it takes the backlog in one
    /// batch.
    pub fn set_gateway_stalls(&mut self, every: Duration, length: Duration) {
        self.stalls = Some((every, length.min(every)));
    }

    /// While the gateway is descheduled: when it runs again.
    fn stalled_until(&self) -> Option<Instant> {
        let (every, length) = self.stalls?;
        let every_us = every.as_micros().max(1);
        let since = self.elapsed().as_micros();
        let into = since % every_us;
        (since >= every_us && into < length.as_micros())
            .then(|| self.now + Duration::from_micros((length.as_micros() - into) as u64))
    }

    /// Calls `f` with every step the fake clock takes (to move boringtun's mocked clock along).
    pub fn on_advance(&mut self, f: impl FnMut(Duration) + 'static) {
        self.on_advance = Some(Box::new(f));
    }

    /// The fake clock in smoltcp's terms.
    pub fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros((self.now - self.t0).as_micros() as i64)
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Moves the clock `by` forward, stopping at every event on the way.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        for _ in 0..10_000_000 {
            // Work due at `now` was done by the last `run`: the next step is later.
            let next = self.next_event().max(self.now + Duration::from_micros(1));
            self.set_now(next.min(end));
            if self.stalled_until().is_none() && self.now >= self.core.poll_timeout() {
                self.core.handle_timeout(self.now);
            }
            self.run();
            if self.now >= end {
                return;
            }
        }
        panic!("the simulation never reached its end");
    }

    /// Advances in steps of `step` until `done` holds, at most `limit` of simulated time; true if
    /// it held.
    pub fn advance_until(
        &mut self,
        limit: Duration,
        step: Duration,
        mut done: impl FnMut(&mut Sim) -> bool,
    ) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.advance(step);
        }
        done(self)
    }

    fn set_now(&mut self, t: Instant) {
        let by = t.saturating_duration_since(self.now);
        self.now = t;
        if let Some(f) = &mut self.on_advance {
            if !by.is_zero() {
                f(by);
            }
        }
    }

    fn next_event(&mut self) -> Instant {
        let smol = self.smol_now();
        let stack = self.iface.poll_at(smol, &self.sockets).map(|at| {
            self.t0 + Duration::from_micros((at - smoltcp::time::Instant::ZERO).total_micros())
        });
        // A descheduled gateway wakes for nothing before its stall ends.
        let stalled = self.stalled_until();
        let gateway = match stalled {
            Some(_) => [stalled, None],
            None => [Some(self.core.poll_timeout()), self.up.next_arrival()],
        };
        [
            gateway[0],
            gateway[1],
            Some(self.next_device_tick),
            self.down.next_arrival(),
            stack,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.now)
    }

    /// Sends one raw IP packet through the tunnel as if the device's kernel had written it.
    pub fn send_raw(&mut self, packet: &[u8]) {
        self.link.from_device.push(packet.to_vec());
        self.run();
    }

    /// Moves whatever is due at `now` both ways until nothing moves.
    pub fn run(&mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for _ in 0..1000 {
            let mut moved = false;
            let now = self.smol_now();
            self.iface.poll(now, &mut self.link, &mut self.sockets);

            // The device's stack -> its WireGuard -> the wire up.
            let outgoing = std::mem::take(&mut self.link.from_device);
            moved |= !outgoing.is_empty();
            for packet in &outgoing {
                match self.tunn.encapsulate(packet, &mut buf) {
                    TunnResult::WriteToNetwork(d) => self.up.send(self.now, d),
                    TunnResult::Done => {}
                    TunnResult::Err(e) => self.device_errors.push(e),
                    other => panic!("device encapsulate: {other:?}"),
                }
            }
            if self.now >= self.next_device_tick {
                self.next_device_tick = self.now + TIMER_TICK;
            }
            if let TunnResult::WriteToNetwork(d) = self.tunn.update_timers(&mut buf) {
                self.up.send(self.now, d);
                moved = true;
            }

            // The wire up -> the gateway, unless it is descheduled.
            let running = self.stalled_until().is_none();
            while let Some(d) = running.then(|| self.up.recv(self.now)).flatten() {
                self.core.handle_datagram(self.endpoint, &d, self.now);
                moved = true;
            }
            if running {
                for event in std::mem::take(&mut self.upstream_backlog) {
                    self.core.handle_upstream(event, self.now);
                    moved = true;
                }
                self.core.flush(self.now);
            }

            // The gateway -> the wire down.
            {
                let tx = self.core.transmit_queue();
                for d in tx.datagrams() {
                    assert_eq!(d.dst, self.endpoint);
                    self.down.send(self.now, &tx.bytes()[d.range.clone()]);
                    moved = true;
                }
                tx.clear();
            }

            // The wire down -> the device's WireGuard -> its stack (or back up).
            while let Some(d) = self.down.recv(self.now) {
                moved = true;
                let mut res = self.tunn.decapsulate(None, &d, &mut buf);
                loop {
                    match res {
                        TunnResult::WriteToNetwork(reply) => {
                            self.up.send(self.now, reply);
                            res = self.tunn.decapsulate(None, &[], &mut buf);
                        }
                        TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                            self.delivered.push(p.to_vec());
                            self.link.to_device.push_back(p.to_vec());
                            break;
                        }
                        TunnResult::Done => break,
                        TunnResult::Err(e) => {
                            self.device_errors.push(e);
                            break;
                        }
                    }
                }
            }
            while let Some(c) = self.core.poll_command() {
                self.commands.push(c);
            }
            if !moved && self.link.to_device.is_empty() {
                return;
            }
        }
        panic!("the simulated network never settled");
    }

    /// Hands the core an event from the upstream side and lets the network settle.
    pub fn upstream(&mut self, event: UpstreamEvent) {
        // A descheduled gateway finds the event queued when it runs again.
        self.upstream_backlog.push(event);
        self.run();
    }

    /// Opens a TCP connection from the device to `to` (IPv4), each from its own local port.
    pub fn tcp_connect(&mut self, to: SocketAddr) -> SocketHandle {
        self.tcp_connect_with(to, 65536)
    }

    /// [`Sim::tcp_connect`] with a receive buffer of `rx` bytes (the window the device offers).
    pub fn tcp_connect_with(&mut self, to: SocketAddr, rx: usize) -> SocketHandle {
        self.tcp_connect_configured(to, rx, |_| {})
    }

    /// [`Sim::tcp_connect_with`], with `configure` called on the device's socket before it
    /// connects (to offer TCP timestamps, say).
    pub fn tcp_connect_configured(
        &mut self,
        to: SocketAddr,
        rx: usize,
        configure: impl FnOnce(&mut tcp::Socket<'static>),
    ) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        configure(&mut socket);
        let handle = self.sockets.add(socket);
        let IpAddr::V4(ip) = to.ip() else {
            panic!("v4 only")
        };
        let port = self.next_port;
        self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(cx, IpEndpoint::new(IpAddress::Ipv4(ip), to.port()), port)
            .expect("a connectable socket");
        self.run();
        handle
    }

    /// The device's TCP socket.
    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// The commands given since last taken.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// Every packet the core dropped, for any reason, flow or WireGuard.
    pub fn drops(&self) -> u64 {
        let flow: u64 = FlowDrop::ALL
            .iter()
            .map(|r| self.core.flow_drops().get(*r))
            .sum();
        flow + self.core.wireguard().drops().total()
    }
}

impl Default for Sim {
    fn default() -> Self {
        Sim::new()
    }
}

/// The first `TcpConnect` in `cmds`.
///
/// # Panics
/// If there is none.
pub fn connect_flow(cmds: &[Command]) -> (FlowId, Upstream) {
    cmds.iter()
        .find_map(|c| match c {
            Command::TcpConnect { flow, upstream } => Some((*flow, *upstream)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no TcpConnect in {cmds:?}"))
}

/// The bytes of every `TcpSend` in `cmds`, in order.
pub fn sent_upstream(cmds: &[Command]) -> Vec<u8> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::TcpSend { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The bytes `cmds` credit `flow` with.
pub fn credited(cmds: &[Command], flow: FlowId) -> usize {
    cmds.iter()
        .filter_map(|c| match c {
            Command::TcpCredit { flow: f, bytes } if *f == flow => Some(*bytes),
            _ => None,
        })
        .sum()
}

/// The origin side of one TCP flow, played by the test: takes what the core sends upstream
/// (acknowledging it with `TcpWritten`) and sends its own bytes as the core credits them.
#[derive(Debug, Default)]
pub struct Origin {
    /// The flow.
    pub flow: FlowId,
    /// What reached the origin.
    pub received: Vec<u8>,
    /// What the origin still has to send.
    pub to_send: Bytes,
    /// How many more bytes the core will take.
    pub credit: usize,
    /// The device shut its write side.
    pub shut: bool,
    /// Largest chunk handed to the core at once.
    pub chunk: usize,
}

impl Origin {
    /// The origin of `flow`, sending `body` in chunks of 16 KiB as credit allows.
    pub fn new(flow: FlowId, credit: usize, body: Bytes) -> Origin {
        Origin {
            flow,
            to_send: body,
            credit,
            chunk: 16 * 1024,
            ..Origin::default()
        }
    }

    /// Takes this flow's commands out of `sim`, answers them and sends what credit allows.
    pub fn serve(&mut self, sim: &mut Sim) {
        let flow = self.flow;
        let (mine, others): (Vec<Command>, Vec<Command>) =
            sim.take_commands().into_iter().partition(|c| match c {
                Command::TcpSend { flow: f, .. }
                | Command::TcpCredit { flow: f, .. }
                | Command::TcpShutdownWrite { flow: f } => *f == flow,
                _ => false,
            });
        sim.commands = others;
        for c in mine {
            match c {
                Command::TcpSend { data, .. } => {
                    self.received.extend_from_slice(&data);
                    sim.upstream(UpstreamEvent::TcpWritten {
                        flow,
                        bytes: data.len(),
                    });
                }
                Command::TcpCredit { bytes, .. } => self.credit += bytes,
                Command::TcpShutdownWrite { .. } => self.shut = true,
                _ => {}
            }
        }
        while self.credit > 0 && !self.to_send.is_empty() {
            let n = self.credit.min(self.chunk).min(self.to_send.len());
            let data = self.to_send.split_to(n);
            self.credit -= n;
            sim.upstream(UpstreamEvent::TcpData { flow, data });
        }
    }
}

//! `GatewayCore`: the whole data plane without I/O.
//!
//! Verbs in: [`GatewayCore::handle_datagram`] (from the WireGuard socket),
//! [`GatewayCore::handle_upstream`] (from upstream connections), [`GatewayCore::handle_timeout`]
//! and [`GatewayCore::sync_peers`] (from the registry). Out: datagrams in
//! [`GatewayCore::transmit_queue`], work for the runtime through [`GatewayCore::poll_command`],
//! and the next deadline from [`GatewayCore::poll_timeout`]. The runtime is the only caller and
//! passes the clock in.
//!
//! Per packet: WireGuard decrypts and checks the inner source, the packet is routed to its flow
//! (or opens one: the stages decide and the flow asks the runtime to connect), and whatever the
//! flow sends back is encrypted into the transmit queue.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::flow::packet::{self, build_echo_reply, build_rst, build_udp, ParseError, Parsed};
use crate::flow::tcp::{Opening, Release, TcpFlows, TcpSettings};
use crate::flow::udp::UdpNat;
use crate::flow::{
    Command, DeviceInfo, FlowCtx, FlowDrop, FlowDropCounters, FlowId, FlowLimits, FlowRules,
    InspectTarget, LocalEndpoint, LocalService, LocalServices, PacketSink, Protocol, Upstream,
    UpstreamEvent,
};
use crate::protect::{HostAddress, Protected};
use crate::vnet::{VnetRoute, VnetRoutes};
use waygate_dns::memory::{NameMemory, Names};
use waygate_dns::ClientKey;
use waygate_geoip::GeoIp;
use waygate_model::activity::{Activity, EgressActivity, FlowAction, NetworkActivity, RuleRef};
use waygate_stages::egress::{Egress, EgressChoice, EgressSettings, Probe};
use waygate_stages::pipeline::{FlowDecision, Known, Pipeline};
use waygate_stages::policy;
use waygate_stages::policy::L4Verdict;
use waygate_wg::shard::Shard;
use waygate_wg::transmit::{TransmitQueue, MAX_DATAGRAM};
use waygate_wg::{self as wg, Endpoint, Handoff, PeerId, Received};
use waygate_wire::sniff::Detected;

/// What the core needs from the config.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// IPv4 tunnel pool.
    pub pool_v4: Ipv4Net,
    /// IPv6 tunnel pool.
    pub pool_v6: Ipv6Net,
    /// The gateway's IPv4 tunnel address.
    pub gateway_v4: Ipv4Addr,
    /// The gateway's IPv6 tunnel address.
    pub gateway_v6: Ipv6Addr,
    /// Tunnel MTU.
    pub mtu: u16,
    /// The gateway's own services at its tunnel addresses, by (protocol, port): their flows are
    /// handed to the runtime in process ([`Command::LocalConnect`], [`Command::DnsQuery`]).
    pub local: LocalServices,
    /// Where DNS (port 53) to the gateway goes when no local service answers it: forwarded like
    /// any flow, through the stages.
    pub dns_upstream: Option<SocketAddr>,
    /// DNS a device sends to any address on port 53 is answered as if sent to the gateway.
    pub dns_intercept: bool,
    /// Egress addresses.
    pub egress: EgressSettings,
    /// Destinations devices may not reach (the host's interfaces follow with
    /// [`GatewayCore::set_host_addresses`]).
    pub protected: Protected,
    /// What one device may hold, and all together.
    pub limits: FlowLimits,
    /// Seeds the TCP stack's initial sequence numbers (the runtime draws it from the OS).
    pub random_seed: u64,
    /// Destination ports whose allowed TCP flows go to the HTTP stage's inspector
    /// ([`LocalEndpoint::Inspect`]).
    pub http_ports: waygate_config::HttpPorts,
    /// Devices' UDP to port 443 (QUIC) is dropped (while the HTTP stage decrypts TLS, so
    /// browsers fall back to TCP).
    pub drop_quic: bool,
}

/// The data plane.
pub struct GatewayCore {
    wg: Endpoint<Arc<DeviceInfo>>,
    tx: TransmitQueue,
    scratch: Vec<u8>,
    router: Router,
    next_wg_tick: Instant,
    /// Datagrams for other shards' peers, for the runtime to pass on.
    handoffs: Vec<Handoff>,
}

/// How often the name memory drops expired entries.
const NAMES_PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Most (device, address) pairs the data plane remembers names for.
const NAMES_CAPACITY: usize = 200_000;

/// How often one device's hitting a flow limit is logged.
const LIMIT_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a new TCP flow goes.
enum Target {
    /// Where the device dialled (or a fixed rewrite of it): the stages decide.
    Dialled(SocketAddr),
    /// Already decided.
    Decided(Upstream),
}

/// Routes decrypted packets to flows; everything but the WireGuard side.
struct Router {
    settings: CoreSettings,
    tcp: TcpFlows,
    udp: UdpNat,
    egress: Egress,
    vnets: VnetRoutes,
    policy: Arc<policy::Loaded>,
    geoip: Option<Arc<GeoIp>>,
    /// The stages; reused for every new flow, so deciding allocates nothing once warm.
    pipeline: Pipeline,
    /// What the resolver answered each device: flows to those addresses carry the name.
    names: NameMemory,
    names_purged: Instant,
    commands: VecDeque<Command>,
    next_flow: FlowId,
    drops: FlowDropCounters,
    /// When each device was last said to be at a flow limit.
    limit_warned: HashMap<PeerId, Instant>,
    reply: Vec<u8>,
    /// Final flow decisions by stage and action, for metrics.
    decisions: DecisionCounters,
    /// Activity records for the logs, while the runtime keeps them (`None`: nothing is built).
    activity: Option<VecDeque<Activity>>,
}

/// What a flow decision did, by stage: the label values of the decision metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowDecisionKind {
    /// Network stage: allowed to where the device dialled.
    NetworkAllow,
    /// Network stage: refused.
    NetworkBlock,
    /// Network stage: allowed to another destination (a rule's override).
    NetworkOverride,
    /// Egress stage: no rule matched, the default egress.
    EgressDefault,
    /// Egress stage: an egress rule chose the source.
    EgressRule,
}

impl FlowDecisionKind {
    /// Every kind, for counters.
    pub const ALL: [FlowDecisionKind; 5] = [
        FlowDecisionKind::NetworkAllow,
        FlowDecisionKind::NetworkBlock,
        FlowDecisionKind::NetworkOverride,
        FlowDecisionKind::EgressDefault,
        FlowDecisionKind::EgressRule,
    ];

    /// The stage and action, as the metrics label them.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            FlowDecisionKind::NetworkAllow => ("network", "allow"),
            FlowDecisionKind::NetworkBlock => ("network", "block"),
            FlowDecisionKind::NetworkOverride => ("network", "override"),
            FlowDecisionKind::EgressDefault => ("egress", "default"),
            FlowDecisionKind::EgressRule => ("egress", "egress"),
        }
    }
}

/// Per-kind counts of final flow decisions.
#[derive(Debug, Default, Clone)]
pub struct DecisionCounters {
    counts: [u64; FlowDecisionKind::ALL.len()],
}

impl DecisionCounters {
    /// Adds one.
    pub fn add(&mut self, kind: FlowDecisionKind) {
        self.counts[kind as usize] += 1;
    }

    /// Count for `kind`.
    pub fn get(&self, kind: FlowDecisionKind) -> u64 {
        self.counts[kind as usize]
    }
}

/// A rule as the activity logs name it.
fn rule_ref(rule: &waygate_policy::ruleset::CompiledRule) -> Arc<RuleRef> {
    Arc::new(RuleRef::new(&rule.id, &rule.name))
}

/// Encrypts packets for devices straight into the transmit queue.
struct WgSink<'a> {
    wg: &'a mut Endpoint<Arc<DeviceInfo>>,
    tx: &'a mut TransmitQueue,
}

impl PacketSink for WgSink<'_> {
    fn send(&mut self, peer: PeerId, packet: &[u8]) {
        self.wg.encapsulate(peer, packet, self.tx);
    }
}

impl GatewayCore {
    /// A core with the server's private key and no peers.
    pub fn new(private_key: [u8; 32], settings: CoreSettings, now: Instant) -> Self {
        let tcp_settings = TcpSettings {
            memory_per_device: settings.limits.memory_per_device,
            random_seed: settings.random_seed,
            ..TcpSettings::for_mtu(usize::from(settings.mtu))
        };
        let tcp = TcpFlows::new(
            tcp_settings,
            &[
                (
                    IpAddr::V4(settings.gateway_v4),
                    settings.pool_v4.prefix_len(),
                ),
                (
                    IpAddr::V6(settings.gateway_v6),
                    settings.pool_v6.prefix_len(),
                ),
            ],
            now,
        );
        GatewayCore {
            wg: Endpoint::new(private_key).with_spans(peer_span),
            tx: TransmitQueue::new(),
            scratch: vec![0u8; MAX_DATAGRAM],
            router: Router {
                egress: Egress::new(settings.egress.clone()),
                vnets: VnetRoutes::default(),
                policy: Arc::new(policy::Loaded::empty()),
                geoip: None,
                pipeline: Pipeline::new(),
                names: NameMemory::new(NAMES_CAPACITY),
                names_purged: now,
                settings,
                tcp,
                udp: UdpNat::default(),
                commands: VecDeque::new(),
                next_flow: 1,
                drops: FlowDropCounters::default(),
                limit_warned: HashMap::new(),
                reply: vec![0u8; MAX_DATAGRAM],
                decisions: DecisionCounters::default(),
                activity: None,
            },
            next_wg_tick: now,
            handoffs: Vec::new(),
        }
    }

    /// Makes this core one shard of several (see [`waygate_wg::shard`]): it holds only the
    /// peers it owns, and hands datagrams for other shards' peers out through
    /// [`GatewayCore::poll_handoff`]. Set before any peer is added.
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.wg = self.wg.with_shard(shard);
        self
    }

    /// This core's shard.
    pub fn shard(&self) -> Shard {
        self.wg.shard()
    }

    /// The next datagram for another shard, drained by the runtime after every turn.
    pub fn poll_handoff(&mut self) -> Option<Handoff> {
        self.handoffs.pop()
    }

    /// Handles a datagram another shard handed over.
    pub fn handle_handoff(&mut self, handoff: &Handoff, now: Instant) {
        let received = self
            .wg
            .handle_handoff(handoff, now, &mut self.scratch, &mut self.tx);
        let mut sink = WgSink {
            wg: &mut self.wg,
            tx: &mut self.tx,
        };
        let router = &mut self.router;
        route_received(
            router,
            &mut sink,
            &mut self.handoffs,
            received,
            handoff.from,
            now,
        );
    }

    /// The server's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.wg.public_key()
    }

    /// The WireGuard endpoint (for statistics).
    pub fn wireguard(&self) -> &Endpoint<Arc<DeviceInfo>> {
        &self.wg
    }

    /// Dropped device packets by reason.
    pub fn flow_drops(&self) -> &FlowDropCounters {
        &self.router.drops
    }

    /// Final flow decisions by stage and action.
    pub fn decisions(&self) -> &DecisionCounters {
        &self.router.decisions
    }

    /// Keeps activity records (flows at their close or refusal, egress decisions) for
    /// [`GatewayCore::poll_activity`] from now on (`true`), or stops building them.
    pub fn record_activity(&mut self, on: bool) {
        let router = &mut self.router;
        router.activity = on.then(VecDeque::new);
        router.tcp.record_closed(on);
        router.udp.record_closed(on);
    }

    /// The next activity record; the runtime drains them after every turn.
    pub fn poll_activity(&mut self) -> Option<Activity> {
        let router = &mut self.router;
        let queue = router.activity.as_mut()?;
        if queue.is_empty() {
            router.tcp.drain_closed(queue);
            router.udp.drain_closed(queue);
        }
        queue.pop_front()
    }

    /// Whether egress location `index` (its position in the config) is up.
    pub fn egress_location_up(&self, index: usize) -> bool {
        self.router.egress.is_up(index)
    }

    /// Replaces the virtual networks' private routes (vnet id -> routes); new flows use them.
    pub fn sync_vnets(&mut self, routes: HashMap<String, Vec<VnetRoute>>) {
        self.router.vnets = VnetRoutes::new(routes);
    }

    /// Replaces the host's interface addresses and the prefixes it routes to itself: flows to
    /// them and to the interfaces' networks are refused from now on.
    pub fn set_host_addresses(&mut self, addrs: &[HostAddress], local: &[ipnet::IpNet]) {
        self.router.settings.protected.set_host(addrs, local);
    }

    /// Replaces the rule set; flows opened from now on are decided by it.
    pub fn set_policy(&mut self, policy: Arc<policy::Loaded>) {
        self.router.policy = policy;
    }

    /// Replaces the GeoIP database (`None`: geolocation fields stay unset).
    pub fn set_geoip(&mut self, geoip: Option<Arc<GeoIp>>) {
        self.router.geoip = geoip;
    }

    /// Records a health probe of egress location `index` (its position in the config).
    pub fn record_egress_probe(&mut self, index: usize, probe: Probe) {
        self.router.egress.record_probe(index, probe);
    }

    /// Hands `release` the empty socket buffers of TCP flows gone idle (see
    /// [`TcpFlows::release_idle_buffers`]); the runtime gives their pages back to the system.
    pub fn release_idle_buffers(&mut self, release: &mut dyn FnMut(&mut [u8])) -> usize {
        self.router.tcp.release_idle_buffers(release)
    }

    /// Open TCP and UDP flows.
    pub fn open_flows(&self) -> (usize, usize) {
        (self.router.tcp.len(), self.router.udp.len())
    }

    /// Makes the peer set equal to `devices` (keyed by public key): new ones are added, changed
    /// ones updated in place, missing ones removed together with their flows.
    pub fn sync_peers(&mut self, devices: Vec<([u8; 32], DeviceInfo)>, now: Instant) {
        let wanted: HashMap<[u8; 32], DeviceInfo> = devices.into_iter().collect();
        let gone: Vec<[u8; 32]> = self
            .wg
            .peer_keys()
            .filter(|(_, key)| !wanted.contains_key(*key))
            .map(|(_, key)| *key)
            .collect();
        for key in gone {
            if let Some((peer, device)) = self.wg.remove_peer(&key) {
                tracing::info!(device = %device.name, id = %device.id, "device removed");
                self.router
                    .tcp
                    .remove_peer(peer, now, &mut self.router.commands);
                self.router
                    .udp
                    .remove_peer(peer, now, &mut self.router.commands);
                self.router.limit_warned.remove(&peer);
            }
        }
        for (key, info) in wanted {
            let unchanged = self
                .wg
                .peer_by_key(&key)
                .and_then(|id| self.wg.peer_data(id))
                .is_some_and(|d| **d == info);
            if !unchanged {
                tracing::info!(device = %info.name, id = %info.id, ipv4 = %info.ipv4, "device active");
                self.wg
                    .upsert_peer(key, info.ipv4, info.ipv6, Arc::new(info));
            }
        }
    }

    /// Reaches out to a device that has not reached us since we started, at the address it was
    /// last seen at, so its session comes back without waiting for it (see
    /// [`Endpoint::resume`]). False when the device is unknown or already connected.
    pub fn resume_peer(&mut self, public_key: &[u8; 32], at: SocketAddr) -> bool {
        let Some(peer) = self.wg.peer_by_key(public_key) else {
            return false;
        };
        let resumed = self.wg.resume(peer, at, &mut self.tx);
        if resumed {
            if let Some(device) = self.wg.peer_data(peer) {
                tracing::info!(device = %device.name, id = %device.id, endpoint = %at, "handshake sent to the device's last endpoint");
            }
        }
        resumed
    }

    /// Handles one datagram from the WireGuard socket.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let received =
            self.wg
                .handle_datagram(from, datagram, now, &mut self.scratch, &mut self.tx);
        let mut sink = WgSink {
            wg: &mut self.wg,
            tx: &mut self.tx,
        };
        let router = &mut self.router;
        route_received(router, &mut sink, &mut self.handoffs, received, from, now);
    }

    /// Remembers that the resolver answered `ip` to device `device_id` for `names`, so its flows
    /// there carry the name (`net.fqdn.*`, logs).
    pub fn learn_name(
        &mut self,
        device_id: &str,
        ip: IpAddr,
        names: &Names,
        ttl: u32,
        now: Instant,
    ) {
        let router = &mut self.router;
        router
            .names
            .remember(&ClientKey::device(device_id), ip, names, ttl, now);
        if now.saturating_duration_since(router.names_purged) >= NAMES_PURGE_EVERY {
            router.names.purge(now);
            router.names_purged = now;
        }
    }

    /// Sends the resolver's answer to a [`Command::DnsQuery`] back to the device.
    pub fn handle_dns_answer(
        &mut self,
        peer: PeerId,
        client: SocketAddr,
        server: SocketAddr,
        answer: &[u8],
    ) {
        let mut sink = WgSink {
            wg: &mut self.wg,
            tx: &mut self.tx,
        };
        let router = &mut self.router;
        if let Some(n) = build_udp(&mut router.reply, server, client, answer) {
            sink.send(peer, &router.reply[..n]);
        }
    }

    /// Handles a report from the runtime about an upstream connection.
    pub fn handle_upstream(&mut self, event: UpstreamEvent, now: Instant) {
        let mut sink = WgSink {
            wg: &mut self.wg,
            tx: &mut self.tx,
        };
        let router = &mut self.router;
        match event {
            UpstreamEvent::UdpData { flow, data } => {
                router.udp.receive(flow, &data, now, &mut sink)
            }
            other => {
                router
                    .tcp
                    .handle_event(other, now, &mut sink, &mut router.commands);
                router.decide_sniffed(now, &mut sink);
            }
        }
    }

    /// Runs whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_wg_tick {
            self.wg.update_timers(now, &mut self.tx);
            self.next_wg_tick = now + wg::TIMER_TICK;
        }
        let mut sink = WgSink {
            wg: &mut self.wg,
            tx: &mut self.tx,
        };
        let router = &mut self.router;
        router
            .tcp
            .handle_timeout(now, &mut sink, &mut router.commands);
        router.decide_sniffed(now, &mut sink);
        router.udp.handle_timeout(now, &mut router.commands);
    }

    /// Finishes the work a batch of datagrams started (moves the bytes that arrived); call it
    /// after a batch, before sending the transmit queue.
    pub fn flush(&mut self, now: Instant) {
        let mut sink = WgSink {
            wg: &mut self.wg,
            tx: &mut self.tx,
        };
        let router = &mut self.router;
        router.tcp.flush(now, &mut sink, &mut router.commands);
        router.decide_sniffed(now, &mut sink);
    }

    /// The next time [`GatewayCore::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Instant {
        [
            self.router.tcp.poll_timeout(),
            self.router.udp.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .fold(self.next_wg_tick, Instant::min)
    }

    /// Datagrams to send; the runtime sends them and clears the queue.
    pub fn transmit_queue(&mut self) -> &mut TransmitQueue {
        &mut self.tx
    }

    /// The next piece of work for the runtime.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.router.commands.pop_front()
    }
}

/// Where the endpoint's verdict on a datagram goes: a packet to its flow, a handoff to the queue.
fn route_received(
    router: &mut Router,
    sink: &mut WgSink<'_>,
    handoffs: &mut Vec<Handoff>,
    received: Received<'_>,
    from: SocketAddr,
    now: Instant,
) {
    match received {
        Received::Packet { peer, packet } => router.handle_packet(peer, packet, now, sink),
        Received::Dropped(reason) => tracing::trace!(?reason, %from, "datagram dropped"),
        Received::Handoff(handoff) => handoffs.push(handoff),
        Received::Nothing => {}
    }
}

impl Router {
    fn handle_packet(&mut self, peer: PeerId, packet: &[u8], now: Instant, sink: &mut WgSink<'_>) {
        let parsed = match packet::parse(packet) {
            Ok(p) => p,
            Err(e) => {
                self.drops.add(match e {
                    ParseError::Malformed => FlowDrop::Malformed,
                    ParseError::Fragment => FlowDrop::Fragment,
                    ParseError::UnsupportedProtocol => FlowDrop::UnsupportedProtocol,
                });
                return;
            }
        };
        let dst = parsed.dst.ip();
        let intercepted = self.settings.dns_intercept
            && parsed.dst.port() == 53
            && matches!(parsed.protocol, Protocol::Udp | Protocol::Tcp);
        if self.is_gateway(dst) || intercepted {
            return self.for_gateway(peer, packet, &parsed, now, sink);
        }
        if let Some(reason) = self.forbidden(dst) {
            self.refuse(peer, &parsed, reason, sink);
            return;
        }
        match parsed.protocol {
            Protocol::Tcp => self.tcp_segment(
                peer,
                packet,
                &parsed,
                Target::Dialled(parsed.dst),
                now,
                sink,
            ),
            Protocol::Udp => self.datagram(peer, &parsed, parsed.dst, now, sink),
            Protocol::Icmp if parsed.icmp_echo_request => {
                self.datagram(peer, &parsed, parsed.dst, now, sink)
            }
            Protocol::Icmp => self.drops.add(FlowDrop::UnsupportedIcmp),
        }
    }

    /// Flows of all devices.
    fn open_flows(&self) -> usize {
        self.tcp.len() + self.udp.len()
    }

    /// Says, at most once per [`LIMIT_WARN_EVERY`] per device, that a device hit a limit.
    fn at_limit(&mut self, peer: PeerId, reason: FlowDrop, now: Instant, sink: &WgSink<'_>) {
        let due = self
            .limit_warned
            .get(&peer)
            .is_none_or(|at| now.saturating_duration_since(*at) >= LIMIT_WARN_EVERY);
        if !due {
            return;
        }
        self.limit_warned.insert(peer, now);
        let device = sink.wg.peer_data(peer);
        tracing::warn!(
            device = device.map(|d| d.name.as_str()),
            id = device.map(|d| d.id.as_str()),
            ?reason,
            tcp_flows = self.tcp.flows_of(peer),
            udp_flows = self.udp.flows_of(peer),
            buffer_memory = self.tcp.memory_of(peer),
            all_flows = self.open_flows(),
            limit_total = self.settings.limits.total,
            "device at a flow limit: new flows refused (said at most once per 10 s per device)"
        );
    }

    fn is_gateway(&self, addr: IpAddr) -> bool {
        addr == IpAddr::V4(self.settings.gateway_v4) || addr == IpAddr::V6(self.settings.gateway_v6)
    }

    /// Destinations no flow may reach.
    fn forbidden(&self, addr: IpAddr) -> Option<FlowDrop> {
        let pools = match addr {
            IpAddr::V4(a) => self.settings.pool_v4.contains(&a),
            IpAddr::V6(a) => self.settings.pool_v6.contains(&a),
        };
        if pools {
            return Some(FlowDrop::DeviceToDevice);
        }
        let special = match addr {
            IpAddr::V4(a) => {
                a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_broadcast()
            }
            // An IPv4-mapped destination would be reached as the IPv4 address it embeds; no
            // device needs to send one over IPv6.
            IpAddr::V6(a) => {
                a.is_loopback()
                    || a.is_unspecified()
                    || a.is_multicast()
                    || a.to_ipv4_mapped().is_some()
            }
        };
        special.then_some(FlowDrop::ForbiddenDestination)
    }

    /// Drops a packet; a TCP segment is answered with a RST so the device fails fast.
    fn refuse(
        &mut self,
        peer: PeerId,
        parsed: &Parsed<'_>,
        reason: FlowDrop,
        sink: &mut WgSink<'_>,
    ) {
        self.drops.add(reason);
        if let Some(flags) = &parsed.tcp {
            if !flags.rst {
                if let Some(n) = build_rst(&mut self.reply, parsed.dst, parsed.src, flags) {
                    sink.send(peer, &self.reply[..n]);
                }
            }
        }
    }

    /// Packets to the gateway's own tunnel addresses: ping, and whatever the port table
    /// ([`CoreSettings::local`]) names; other ports are closed.
    fn for_gateway(
        &mut self,
        peer: PeerId,
        packet: &[u8],
        parsed: &Parsed<'_>,
        now: Instant,
        sink: &mut WgSink<'_>,
    ) {
        let port = parsed.dst.port();
        let local = match parsed.protocol {
            Protocol::Icmp => None,
            protocol => self.settings.local.lookup(protocol, port),
        };
        match (parsed.protocol, local, self.settings.dns_upstream) {
            (Protocol::Icmp, _, _) if parsed.icmp_echo_request => {
                if let Some(n) = build_echo_reply(&mut self.reply, packet) {
                    sink.send(peer, &self.reply[..n]);
                }
            }
            (Protocol::Icmp, _, _) => self.drops.add(FlowDrop::UnsupportedIcmp),
            (Protocol::Udp, Some(LocalEndpoint::Service(LocalService::DnsUdp)), _) => {
                let Some(device) = sink.wg.peer_data(peer).cloned() else {
                    return;
                };
                self.commands.push_back(Command::DnsQuery {
                    peer,
                    device,
                    device_public: sink.wg.peer_endpoint(peer),
                    client: parsed.src,
                    server: parsed.dst,
                    payload: bytes::Bytes::copy_from_slice(parsed.payload),
                });
            }
            (Protocol::Tcp, Some(endpoint), _) => {
                // The service's own rules decide (the resolver's), not the flow stages.
                self.carry_to_local(peer, packet, parsed, endpoint, now, sink)
            }
            (Protocol::Tcp, None, Some(upstream)) if port == 53 => {
                self.tcp_segment(peer, packet, parsed, Target::Dialled(upstream), now, sink)
            }
            (Protocol::Udp, None, Some(upstream)) if port == 53 => {
                self.datagram(peer, parsed, upstream, now, sink)
            }
            _ => self.refuse(peer, parsed, FlowDrop::GatewayPortClosed, sink),
        }
    }

    /// Hands a TCP flow to one of the gateway's own services: its upstream is in process.
    fn carry_to_local(
        &mut self,
        peer: PeerId,
        packet: &[u8],
        parsed: &Parsed<'_>,
        endpoint: LocalEndpoint,
        now: Instant,
        sink: &mut WgSink<'_>,
    ) {
        let to = Upstream {
            dst: parsed.dst,
            bind: None,
            via: None,
            local: Some(endpoint),
        };
        self.tcp_segment(peer, packet, parsed, Target::Decided(to), now, sink)
    }

    fn new_ctx(
        &mut self,
        peer: PeerId,
        parsed: &Parsed<'_>,
        now: Instant,
        sink: &WgSink<'_>,
    ) -> Option<FlowCtx> {
        let device = sink.wg.peer_data(peer)?.clone();
        let id = self.next_flow;
        self.next_flow += 1;
        Some(FlowCtx {
            id,
            peer,
            device,
            device_public: sink.wg.peer_endpoint(peer),
            protocol: parsed.protocol,
            src: parsed.src,
            dst: parsed.dst,
            opened: now,
            rules: FlowRules::default(),
        })
    }

    /// Runs the stages for a new flow; an error refuses the flow. A final decision is logged
    /// here; when the network stage waits for the client's first bytes (TCP only), the flow
    /// opens to what the rules decided so far and is logged once [`Router::decide_sniffed`]
    /// decides it.
    fn decide(
        &mut self,
        ctx: &mut FlowCtx,
        target: SocketAddr,
    ) -> Result<(Upstream, Opening), FlowDrop> {
        if ctx.protocol == Protocol::Udp && self.settings.drop_quic && target.port() == 443 {
            // QUIC cannot be inspected with a CA devices added themselves; dropped, browsers
            // retry over TCP, where the HTTP stage sees them.
            return Err(FlowDrop::Quic);
        }
        let device = ClientKey::device(&ctx.device.id);
        ctx.rules.name = self
            .names
            .names_for(&device, target.ip(), ctx.opened)
            .map(|n| n.host.clone());
        let loaded = Arc::clone(&self.policy);
        let decision = self.pipeline.decide(
            &loaded,
            self.geoip.as_deref(),
            ctx,
            target,
            Known::FirstPacket,
        );
        ctx.rules.egress = decision.egress_rule.map(|r| r.id.clone());
        ctx.rules.l4 = decision.network_rule.map(|r| r.id.clone());
        if self.activity.is_some() {
            ctx.rules.egress_ref = decision.egress_rule.map(rule_ref);
            ctx.rules.l4_ref = decision.network_rule.map(rule_ref);
        }
        let (to, opening) = match (decision.wait, &decision.verdict) {
            (None, L4Verdict::Allow { target: to }) => (Some(*to), Opening::Connect),
            (None, L4Verdict::Block) => (None, Opening::Connect),
            // Waiting: connect ahead to where the rules point so far, or hold without
            // connecting when they block so far.
            (Some(_), L4Verdict::Allow { target: to }) => {
                (Some(*to), Opening::ConnectAndHold { dialled: target })
            }
            (Some(_), L4Verdict::Block) => {
                (Some(target), Opening::AcceptAndHold { dialled: target })
            }
        };
        let upstream = match to {
            Some(to) => self.route(ctx, to, decision.egress.as_ref(), ctx.opened),
            None => Err(FlowDrop::PolicyBlocked),
        };
        if decision.wait.is_none() || upstream.is_err() {
            let outcome = match &upstream {
                Ok(u) => Outcome::Upstream(u),
                Err(reason) => Outcome::Refused(*reason),
            };
            self.count_decision(target, &decision, &outcome);
            if let (Err(reason), Some(activity)) = (&upstream, &mut self.activity) {
                activity.push_back(refused_record(ctx, *reason));
            }
            log_decision(ctx, None, &decision, outcome);
        }
        upstream.map(|u| (u, opening))
    }

    /// Counts a final decision of the network and egress stages.
    fn count_decision(
        &mut self,
        dialled: SocketAddr,
        decision: &FlowDecision<'_>,
        outcome: &Outcome<'_>,
    ) {
        let network = match (&decision.verdict, outcome) {
            (L4Verdict::Block, _) => FlowDecisionKind::NetworkBlock,
            (L4Verdict::Allow { target }, _) if *target != dialled => {
                FlowDecisionKind::NetworkOverride
            }
            (L4Verdict::Allow { .. }, _) => FlowDecisionKind::NetworkAllow,
        };
        self.decisions.add(network);
        if matches!(outcome, Outcome::Upstream(_)) {
            self.decisions.add(match decision.egress_rule {
                Some(_) => FlowDecisionKind::EgressRule,
                None => FlowDecisionKind::EgressDefault,
            });
        }
    }

    /// Where a flow allowed to `to` leaves: a private route of its virtual network, else the
    /// Internet from the egress address. Other networks' private ranges are refused: the host
    /// may well have a route there, but only that network's devices may use it.
    fn route(
        &mut self,
        ctx: &mut FlowCtx,
        to: SocketAddr,
        choice: Option<&EgressChoice>,
        now: Instant,
    ) -> Result<Upstream, FlowDrop> {
        let route = self.vnets.route(ctx.device.vnet_id.as_deref(), to.ip());
        if let Some(refused) = self.settings.protected.check(to.ip(), route.is_some()) {
            return Err(refused);
        }
        if let Some(route) = route {
            ctx.rules.route = Some(format!("{} via {}", route.cidr, route.via));
            return Ok(self.inspect(
                ctx,
                Upstream {
                    dst: to,
                    bind: None,
                    via: Some(route.path),
                    local: None,
                },
            ));
        }
        if self.vnets.covers(to.ip()) {
            return Err(FlowDrop::OtherVnet);
        }
        let bind = self.egress.select(ctx, to.ip(), choice);
        if let Some(activity) = &mut self.activity {
            activity.push_back(Activity::Egress(Box::new(EgressActivity {
                at: now,
                device: ctx.device.clone(),
                protocol: ctx.protocol,
                src: ctx.src,
                dst: to,
                policy: ctx.rules.egress_ref.clone(),
                egress_ip: bind,
                name: ctx.rules.name.clone(),
            })));
        }
        Ok(self.inspect(
            ctx,
            Upstream {
                dst: to,
                bind,
                via: None,
                local: None,
            },
        ))
    }

    /// Sends an allowed TCP flow to a web port (`http.ports`, by the port the device dialled)
    /// to the HTTP stage's inspector, which leaves for `upstream` as the stages chose.
    fn inspect(&self, ctx: &FlowCtx, upstream: Upstream) -> Upstream {
        if ctx.protocol != Protocol::Tcp || !self.settings.http_ports.contains(ctx.dst.port()) {
            return upstream;
        }
        Upstream {
            local: Some(LocalEndpoint::Inspect(InspectTarget {
                dst: upstream.dst,
                bind: upstream.bind,
                via: upstream.via,
            })),
            ..upstream
        }
    }

    /// Decides the held TCP flows whose first bytes are known.
    fn decide_sniffed(&mut self, now: Instant, sink: &mut WgSink<'_>) {
        while let Some((id, detected)) = self.tcp.poll_sniffed() {
            let Some(held) = self.tcp.held(id) else {
                continue;
            };
            let mut ctx = held.ctx.clone();
            let (target, opened, connected) = (held.dialled, held.opened, held.connected);
            let loaded = Arc::clone(&self.policy);
            let decision = self.pipeline.decide(
                &loaded,
                self.geoip.as_deref(),
                &ctx,
                target,
                Known::FirstBytes(&detected),
            );
            ctx.rules.l4 = decision.network_rule.map(|r| r.id.clone());
            if self.activity.is_some() {
                ctx.rules.l4_ref = decision.network_rule.map(rule_ref);
                ctx.rules.detected = Some(detected.protocol());
                if let Detected::Tls { sni: Some(sni) } = &detected {
                    ctx.rules.sni = Some(Arc::from(sni.as_str()));
                }
            }
            let release = match decision.verdict {
                L4Verdict::Block => Release::Reset,
                L4Verdict::Allow { target: to } if connected && to == opened.dst => {
                    Release::Forward
                }
                L4Verdict::Allow { target: to } => {
                    match self.route(&mut ctx, to, decision.egress.as_ref(), now) {
                        Ok(upstream) => Release::Redirect(upstream),
                        Err(_) => Release::Reset,
                    }
                }
            };
            if release == Release::Reset {
                self.drops.add(FlowDrop::PolicyBlocked);
                ctx.rules.blocked = true;
            }
            let outcome = match &release {
                Release::Forward => Outcome::Upstream(&opened),
                Release::Redirect(upstream) => Outcome::Upstream(upstream),
                Release::Reset => Outcome::Refused(FlowDrop::PolicyBlocked),
            };
            self.count_decision(target, &decision, &outcome);
            log_decision(&ctx, Some(&detected), &decision, outcome);
            if let Some(held) = self.tcp.held(id) {
                // The flow's close record tells what was decided here.
                held.ctx.rules = ctx.rules;
            }
            self.tcp.release(id, release, now, sink, &mut self.commands);
        }
    }

    fn tcp_segment(
        &mut self,
        peer: PeerId,
        packet: &[u8],
        parsed: &Parsed<'_>,
        target: Target,
        now: Instant,
        sink: &mut WgSink<'_>,
    ) {
        let Some(flags) = parsed.tcp else {
            return;
        };
        if let Some(id) = self.tcp.lookup(peer, parsed.src, parsed.dst) {
            self.tcp
                .deliver(id, packet, flags.rst, now, sink, &mut self.commands);
            return;
        }
        if !(flags.syn && !flags.ack && !flags.rst) {
            self.refuse(peer, parsed, FlowDrop::StrayTcp, sink);
            return;
        }
        let limits = &self.settings.limits;
        let admitted = limits
            .admit(
                self.tcp.flows_of(peer),
                limits.tcp_per_device,
                self.open_flows(),
            )
            .and_then(|()| {
                if self.tcp.has_memory_for_flow(peer) {
                    Ok(())
                } else {
                    Err(FlowDrop::MemoryLimit)
                }
            });
        if let Err(reason) = admitted {
            self.at_limit(peer, reason, now, sink);
            self.refuse(peer, parsed, reason, sink);
            return;
        }
        let Some(mut ctx) = self.new_ctx(peer, parsed, now, sink) else {
            return;
        };
        let decided = match target {
            Target::Dialled(to) => self.decide(&mut ctx, to),
            Target::Decided(upstream) => Ok((upstream, Opening::Connect)),
        };
        match decided {
            Ok((upstream, opening)) => self.tcp.open(
                ctx,
                upstream,
                packet,
                flags,
                opening,
                now,
                sink,
                &mut self.commands,
            ),
            Err(reason) => self.refuse(peer, parsed, reason, sink),
        }
    }

    fn datagram(
        &mut self,
        peer: PeerId,
        parsed: &Parsed<'_>,
        target: SocketAddr,
        now: Instant,
        sink: &mut WgSink<'_>,
    ) {
        let id = match self.udp.lookup(peer, parsed.src, parsed.dst) {
            Some(id) => id,
            None => {
                let limits = &self.settings.limits;
                let held = self.udp.flows_of(peer);
                if let Err(reason) = limits.admit(held, limits.udp_per_device, self.open_flows()) {
                    self.at_limit(peer, reason, now, sink);
                    self.drops.add(reason);
                    return;
                }
                let Some(mut ctx) = self.new_ctx(peer, parsed, now, sink) else {
                    return;
                };
                let id = ctx.id;
                let upstream = match self.decide(&mut ctx, target) {
                    Ok((upstream, _)) => upstream,
                    Err(reason) => {
                        self.drops.add(reason);
                        return;
                    }
                };
                self.udp.open(ctx, upstream, now, &mut self.commands);
                id
            }
        };
        self.udp.send(id, parsed.payload, now, &mut self.commands);
    }
}

/// The activity record of a flow refused at its first packet.
fn refused_record(ctx: &FlowCtx, reason: FlowDrop) -> Activity {
    Activity::Network(Box::new(NetworkActivity {
        at: ctx.opened,
        opened: ctx.opened,
        device: ctx.device.clone(),
        protocol: ctx.protocol,
        src: ctx.src,
        dst: ctx.dst,
        override_dst: None,
        action: FlowAction::Block,
        policy: ctx.rules.l4_ref.clone(),
        sni: None,
        detected_protocol: None,
        bytes_sent: 0,
        bytes_received: 0,
        reason: match reason {
            FlowDrop::PolicyBlocked => "blocked",
            _ => "protected destination",
        },
    }))
}

/// Where a decided flow goes, for its log line.
enum Outcome<'a> {
    /// Out through this upstream.
    Upstream(&'a Upstream),
    /// Refused, and why.
    Refused(FlowDrop),
}

/// The one log line of a flow's decision.
fn log_decision(
    ctx: &FlowCtx,
    detected: Option<&Detected>,
    decision: &FlowDecision<'_>,
    outcome: Outcome<'_>,
) {
    let (upstream, refused) = match outcome {
        Outcome::Upstream(u) => (Some(u), None),
        Outcome::Refused(reason) => (None, Some(reason)),
    };
    let sni = match detected {
        Some(Detected::Tls { sni }) => sni.as_deref(),
        _ => None,
    };
    let (egress_rule, l4_rule) = (decision.egress_rule, decision.network_rule);
    tracing::info!(
        target: "waygate::policy",
        stage = "flow",
        flow = ctx.id,
        device = %ctx.device.name,
        user = %ctx.device.email,
        protocol = ctx.protocol.as_str(),
        src = %ctx.src,
        dst = %ctx.dst,
        name = ctx.rules.name.as_deref(),
        vnet = ctx.device.vnet_id.as_deref().unwrap_or("default"),
        route = ctx.rules.route.as_deref(),
        detected_protocol = detected.map(Detected::protocol),
        sni,
        egress_rule = egress_rule.map_or("default", |r| r.id.as_str()),
        egress_rule_name = egress_rule.map(|r| r.name.as_str()),
        egress = ?upstream.and_then(|u| u.bind),
        l4_rule = l4_rule.map(|r| r.id.as_str()),
        l4_rule_name = l4_rule.map(|r| r.name.as_str()),
        l4_action = l4_rule.map_or("allow", |r| r.action_name.as_str()),
        upstream = ?upstream.map(|u| u.dst),
        refused = ?refused,
        "flow decision"
    );
}
#[cfg(test)]
mod tests;

/// A device's span around boringtun's calls for its session. Error level: enabled whenever
/// boringtun's warnings and errors are, so they always name the device.
fn peer_span(device: &Arc<DeviceInfo>) -> tracing::Span {
    tracing::error_span!("peer", device = %device.name, id = %device.id)
}

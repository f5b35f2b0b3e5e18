//! One snapshot of what the runtime counts, published once a second on a `watch` channel: the
//! core's flows and drops, the WireGuard endpoint's drops, the runtime's queue drops and the
//! resolver's counters. The serving loop is the only writer; readers (an admin API) subscribe.

use std::time::Duration;

use crate::dns;
use waygate_engine::flow::FlowDrop;
use waygate_engine::gateway::{FlowDecisionKind, GatewayCore};
use waygate_wg::{DropReason, Traffic};

use super::drops::{RuntimeDrop, RuntimeDrops};
use super::resolver::ResolverHandle;

/// The runtime's counters at one moment. Counters only grow; flows and peers are current.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Devices with a WireGuard peer (active in the registry).
    pub peers: usize,
    /// Of those, the ones with a session: a handshake within the last 3 minutes.
    pub peers_connected: usize,
    /// Packets, bytes and handshakes through the tunnels since the start.
    pub traffic: Traffic,
    /// Final flow decisions by stage and action.
    pub flow_decisions: Vec<(FlowDecisionKind, u64)>,
    /// Whether each configured egress location is up, in config order.
    pub egress_up: Vec<bool>,
    /// Open TCP flows.
    pub tcp_flows: usize,
    /// Open UDP and ping flows.
    pub udp_flows: usize,
    /// Live upstream tasks (sockets and local services).
    pub upstream_tasks: usize,
    /// The WireGuard endpoint's dropped datagrams, by reason.
    pub wireguard_drops: Vec<(DropReason, u64)>,
    /// The flow table's dropped packets, by reason.
    pub flow_drops: Vec<(FlowDrop, u64)>,
    /// The runtime's queues' drops, by reason.
    pub runtime_drops: Vec<(RuntimeDrop, u64)>,
    /// The resolver's counters.
    pub dns: dns::Stats,
}

impl StatsSnapshot {
    /// Reads every counter now.
    pub fn collect(
        core: &GatewayCore,
        upstream_tasks: usize,
        resolver: &ResolverHandle,
        runtime: &RuntimeDrops,
        egress_locations: usize,
    ) -> Self {
        let (tcp_flows, udp_flows) = core.open_flows();
        let wg = core.wireguard();
        // A session lives at most 3 minutes without a new handshake.
        let live = Duration::from_secs(180);
        StatsSnapshot {
            peers: wg.peer_count(),
            peers_connected: wg
                .active_stats()
                .filter(|(_, p)| p.since_handshake.is_some_and(|d| d <= live))
                .count(),
            traffic: wg.traffic(),
            flow_decisions: FlowDecisionKind::ALL
                .into_iter()
                .map(|k| (k, core.decisions().get(k)))
                .collect(),
            egress_up: (0..egress_locations)
                .map(|i| core.egress_location_up(i))
                .collect(),
            tcp_flows,
            udp_flows,
            upstream_tasks,
            wireguard_drops: DropReason::ALL
                .into_iter()
                .map(|r| (r, wg.drops().get(r)))
                .collect(),
            flow_drops: FlowDrop::ALL
                .into_iter()
                .map(|r| (r, core.flow_drops().get(r)))
                .collect(),
            runtime_drops: RuntimeDrop::ALL
                .into_iter()
                .map(|r| (r, runtime.get(r)))
                .collect(),
            dns: resolver.stats(),
        }
    }
}

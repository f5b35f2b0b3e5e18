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

impl StatsSnapshot {
    /// The whole gateway's snapshot: `latest` (one shard's, with the process-wide counters of
    /// the resolver, the runtime's queues and egress health as read last) plus what the
    /// shards in `others` count for their own peers and flows.
    pub fn sum<'a>(
        latest: &StatsSnapshot,
        others: impl Iterator<Item = &'a StatsSnapshot>,
    ) -> Self {
        let mut sum = latest.clone();
        for o in others {
            sum.peers += o.peers;
            sum.peers_connected += o.peers_connected;
            sum.traffic.rx_packets += o.traffic.rx_packets;
            sum.traffic.rx_bytes += o.traffic.rx_bytes;
            sum.traffic.tx_packets += o.traffic.tx_packets;
            sum.traffic.tx_bytes += o.traffic.tx_bytes;
            sum.traffic.handshakes += o.traffic.handshakes;
            sum.tcp_flows += o.tcp_flows;
            sum.udp_flows += o.udp_flows;
            sum.upstream_tasks += o.upstream_tasks;
            add_counts(&mut sum.flow_decisions, &o.flow_decisions);
            add_counts(&mut sum.wireguard_drops, &o.wireguard_drops);
            add_counts(&mut sum.flow_drops, &o.flow_drops);
        }
        sum
    }
}

/// Adds each `(key, count)` of `from` to the same key's count in `into`.
fn add_counts<K: PartialEq + Copy>(into: &mut Vec<(K, u64)>, from: &[(K, u64)]) {
    for &(key, count) in from {
        match into.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 += count,
            None => into.push((key, count)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_snapshots_add_up_and_shared_counters_count_once() {
        let shard = |peers, drops: u64, dns_queries| StatsSnapshot {
            peers,
            tcp_flows: peers * 2,
            traffic: Traffic {
                rx_bytes: 100 * peers as u64,
                handshakes: 1,
                ..Traffic::default()
            },
            wireguard_drops: vec![(DropReason::BadMac, drops)],
            runtime_drops: vec![(RuntimeDrop::DnsQueryQueueFull, 7)],
            dns: dns::Stats {
                queries: dns_queries,
                ..dns::Stats::default()
            },
            ..StatsSnapshot::default()
        };
        let a = shard(3, 1, 50);
        let b = shard(5, 2, 40);
        let empty = StatsSnapshot::default();
        let sum = StatsSnapshot::sum(&a, [&b, &empty].into_iter());
        assert_eq!(sum.peers, 8);
        assert_eq!(sum.tcp_flows, 16);
        assert_eq!(sum.traffic.rx_bytes, 800);
        assert_eq!(sum.traffic.handshakes, 2);
        assert_eq!(sum.wireguard_drops, vec![(DropReason::BadMac, 3)]);
        // The resolver and the runtime's queues are one for all shards: the latest reading.
        assert_eq!(sum.runtime_drops, vec![(RuntimeDrop::DnsQueryQueueFull, 7)]);
        assert_eq!(sum.dns.queries, 50);
    }
}

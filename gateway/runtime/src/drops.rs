//! A periodic summary of what the data plane dropped: the WireGuard endpoint's, the flow
//! table's and the runtime's queues' counters only grow in memory, so a garbage flood would
//! otherwise leave no trace in the log. The loop hands the counters in every second or so; at
//! most once per [`DROP_REPORT_EVERY`], and only when a counter grew, one line names each
//! reason's increase.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use waygate_engine::flow::{FlowDrop, FlowDropCounters};
use waygate_wg::{DropCounters, DropReason};

/// Drops are summed up at most this often.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Why the runtime dropped work passed between its tasks: every queue between them is bounded,
/// so a flood fills a queue instead of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeDrop {
    /// A device's DNS query found the resolver's queue full (the device asks again).
    DnsQueryQueueFull,
    /// The resolver's answer found the data plane's queue full (the device asks again).
    DnsAnswerQueueFull,
    /// An address the resolver answered was not remembered for flow names: the data plane's
    /// queue was full.
    LearnedNameQueueFull,
    /// A datagram from a UDP or ping upstream found the data plane's queue full.
    UdpEventQueueFull,
    /// A device's datagram found its UDP flow's queue to the upstream socket full.
    UdpSendQueueFull,
    /// A TCP flow's writes piled up past its queue to the upstream: the flow was reset.
    TcpOpsQueueFull,
    /// A datagram for another shard's peer found that shard's queue full (the device's
    /// handshake is retried).
    HandoffQueueFull,
}

impl RuntimeDrop {
    /// Every reason, for counters.
    pub const ALL: [RuntimeDrop; 7] = [
        RuntimeDrop::DnsQueryQueueFull,
        RuntimeDrop::DnsAnswerQueueFull,
        RuntimeDrop::LearnedNameQueueFull,
        RuntimeDrop::UdpEventQueueFull,
        RuntimeDrop::UdpSendQueueFull,
        RuntimeDrop::TcpOpsQueueFull,
        RuntimeDrop::HandoffQueueFull,
    ];
}

/// Per-reason counts of the runtime's drops, shared by its tasks and threads.
#[derive(Debug, Default)]
pub struct RuntimeDrops {
    counts: [AtomicU64; RuntimeDrop::ALL.len()],
}

impl RuntimeDrops {
    /// Adds one.
    pub fn add(&self, reason: RuntimeDrop) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Count for `reason`.
    pub fn get(&self, reason: RuntimeDrop) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }
}

/// Counter values at the last report, and when the next may be.
#[derive(Debug)]
pub struct DropReport {
    wg: [u64; DropReason::ALL.len()],
    flow: [u64; FlowDrop::ALL.len()],
    runtime: [u64; RuntimeDrop::ALL.len()],
    next: Instant,
}

/// Increases since the last report, as `Reason=count` pairs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The WireGuard endpoint's datagrams.
    pub wireguard: String,
    /// The flow table's packets.
    pub flow: String,
    /// The runtime's queues.
    pub runtime: String,
}

impl DropReport {
    /// Starts counting at `now`; the first report may come one interval later.
    pub fn new(now: Instant) -> Self {
        DropReport {
            wg: [0; DropReason::ALL.len()],
            flow: [0; FlowDrop::ALL.len()],
            runtime: [0; RuntimeDrop::ALL.len()],
            next: now + DROP_REPORT_EVERY,
        }
    }

    /// What grew since the last report, once the interval is over and something did.
    pub fn poll(
        &mut self,
        now: Instant,
        wg: &DropCounters,
        flow: &FlowDropCounters,
        runtime: &RuntimeDrops,
    ) -> Option<Dropped> {
        if now < self.next {
            return None;
        }
        let mut out = Dropped::default();
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            push_increase(&mut out.wireguard, reason, &mut self.wg[i], wg.get(reason));
        }
        for (i, reason) in FlowDrop::ALL.into_iter().enumerate() {
            push_increase(&mut out.flow, reason, &mut self.flow[i], flow.get(reason));
        }
        for (i, reason) in RuntimeDrop::ALL.into_iter().enumerate() {
            let now = runtime.get(reason);
            push_increase(&mut out.runtime, reason, &mut self.runtime[i], now);
        }
        if out == Dropped::default() {
            // Nothing new: the next drop may be reported at the next poll.
            return None;
        }
        self.next = now + DROP_REPORT_EVERY;
        Some(out)
    }
}

fn push_increase(out: &mut String, reason: impl std::fmt::Debug, seen: &mut u64, now: u64) {
    let grew = now.saturating_sub(*seen);
    *seen = now;
    if grew > 0 {
        let space = if out.is_empty() { "" } else { " " };
        let _ = write!(out, "{space}{reason:?}={grew}");
    }
}

/// Logs one line for `dropped`.
pub fn log(dropped: &Dropped) {
    tracing::warn!(
        wireguard = %dropped.wireguard,
        flow = %dropped.flow,
        runtime = %dropped.runtime,
        interval_s = DROP_REPORT_EVERY.as_secs(),
        "datagrams and packets dropped since the last report"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_increases_at_most_once_per_interval_and_only_when_they_grew() {
        #[allow(clippy::disallowed_methods)] // the base of a fake clock
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut report = DropReport::new(t0);
        let mut wg = DropCounters::default();
        let mut flow = FlowDropCounters::default();
        let rt = RuntimeDrops::default();
        for _ in 0..500 {
            wg.add(DropReason::Malformed);
        }
        wg.add(DropReason::UnknownIndex);
        flow.add(FlowDrop::Fragment);
        // Not before the interval is over.
        assert_eq!(report.poll(t0 + s(5), &wg, &flow, &rt), None);
        let first = report.poll(t0 + s(10), &wg, &flow, &rt).expect("a report");
        assert_eq!(first.wireguard, "Malformed=500 UnknownIndex=1");
        assert_eq!(first.flow, "Fragment=1");
        // Grew again, but too soon.
        wg.add(DropReason::Malformed);
        assert_eq!(report.poll(t0 + s(15), &wg, &flow, &rt), None);
        let second = report.poll(t0 + s(20), &wg, &flow, &rt).expect("a report");
        assert_eq!(
            (second.wireguard.as_str(), second.flow.as_str()),
            ("Malformed=1", "")
        );
        // Quiet counters: no line, however long.
        assert_eq!(report.poll(t0 + s(100), &wg, &flow, &rt), None);
        // After a quiet spell a new drop is reported at once.
        flow.add(FlowDrop::StrayTcp);
        let third = report.poll(t0 + s(101), &wg, &flow, &rt).expect("a report");
        assert_eq!(third.flow, "StrayTcp=1");
        rt.add(RuntimeDrop::DnsQueryQueueFull);
        rt.add(RuntimeDrop::DnsQueryQueueFull);
        let fourth = report.poll(t0 + s(111), &wg, &flow, &rt).expect("a report");
        assert_eq!(
            (
                fourth.wireguard.as_str(),
                fourth.flow.as_str(),
                fourth.runtime.as_str()
            ),
            ("", "", "DnsQueryQueueFull=2")
        );
    }
}

//! A periodic summary of what the data plane dropped: the WireGuard endpoint's and the flow
//! table's counters only grow in memory, so a garbage flood would otherwise leave no trace in
//! the log. The loop hands the counters in every second or so; at most once per
//! [`DROP_REPORT_EVERY`], and only when a counter grew, one line names each reason's increase.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use waygate_engine::flow::{FlowDrop, FlowDropCounters};
use waygate_wg::{DropCounters, DropReason};

/// Drops are summed up at most this often.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Counter values at the last report, and when the next may be.
#[derive(Debug)]
pub struct DropReport {
    wg: [u64; DropReason::ALL.len()],
    flow: [u64; FlowDrop::ALL.len()],
    next: Instant,
}

/// Increases since the last report, as `Reason=count` pairs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The WireGuard endpoint's datagrams.
    pub wireguard: String,
    /// The flow table's packets.
    pub flow: String,
}

impl DropReport {
    /// Starts counting at `now`; the first report may come one interval later.
    pub fn new(now: Instant) -> Self {
        DropReport {
            wg: [0; DropReason::ALL.len()],
            flow: [0; FlowDrop::ALL.len()],
            next: now + DROP_REPORT_EVERY,
        }
    }

    /// What grew since the last report, once the interval is over and something did.
    pub fn poll(
        &mut self,
        now: Instant,
        wg: &DropCounters,
        flow: &FlowDropCounters,
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
        for _ in 0..500 {
            wg.add(DropReason::Malformed);
        }
        wg.add(DropReason::UnknownIndex);
        flow.add(FlowDrop::Fragment);
        // Not before the interval is over.
        assert_eq!(report.poll(t0 + s(5), &wg, &flow), None);
        let first = report.poll(t0 + s(10), &wg, &flow).expect("a report");
        assert_eq!(first.wireguard, "Malformed=500 UnknownIndex=1");
        assert_eq!(first.flow, "Fragment=1");
        // Grew again, but too soon.
        wg.add(DropReason::Malformed);
        assert_eq!(report.poll(t0 + s(15), &wg, &flow), None);
        let second = report.poll(t0 + s(20), &wg, &flow).expect("a report");
        assert_eq!(
            (second.wireguard.as_str(), second.flow.as_str()),
            ("Malformed=1", "")
        );
        // Quiet counters: no line, however long.
        assert_eq!(report.poll(t0 + s(100), &wg, &flow), None);
        // After a quiet spell a new drop is reported at once.
        flow.add(FlowDrop::StrayTcp);
        let third = report.poll(t0 + s(101), &wg, &flow).expect("a report");
        assert_eq!(third.flow, "StrayTcp=1");
    }
}

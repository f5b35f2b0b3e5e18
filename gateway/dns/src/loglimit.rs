//! A rate limit for log lines that outside input can trigger (malformed queries, garbage
//! datagrams): the first `burst` events of each interval are logged, the rest only counted, and
//! the count is handed back once the interval is over so the caller logs one summary line.
//!
//! Sans-IO: the caller passes `now` and calls [`LogLimit::poll`] now and then (or relies on the
//! next event), so a flood that stops still gets its summary.

use std::time::{Duration, Instant};

/// Decides which of a stream of events get a log line.
#[derive(Debug, Clone)]
pub struct LogLimit {
    burst: u32,
    every: Duration,
    /// Start of the current interval; `None` until an event opens one.
    since: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    /// Log this event.
    pub log: bool,
    /// Events of the previous interval that were not logged: report them first.
    pub suppressed_before: Option<u64>,
}

impl LogLimit {
    /// At most `burst` lines per `every`.
    pub const fn new(burst: u32, every: Duration) -> Self {
        LogLimit {
            burst,
            every,
            since: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// The interval's length.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Counts one event at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        let suppressed_before = self.poll(now);
        self.since.get_or_insert(now);
        let log = self.logged < self.burst;
        if log {
            self.logged += 1;
        } else {
            self.suppressed += 1;
        }
        Admit {
            log,
            suppressed_before,
        }
    }

    /// Ends the interval if it is over; returns how many of its events were not logged, if any.
    pub fn poll(&mut self, now: Instant) -> Option<u64> {
        let since = self.since?;
        if now.saturating_duration_since(since) < self.every {
            return None;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.since = None;
        self.logged = 0;
        (suppressed > 0).then_some(suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_burst_logged_then_one_summary_per_interval() {
        #[allow(clippy::disallowed_methods)] // a fake clock needs a base
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut limit = LogLimit::new(3, s(10));
        let logged: Vec<bool> = (0..10).map(|_| limit.admit(t0).log).collect();
        assert_eq!(logged.iter().filter(|&&l| l).count(), 3);
        assert_eq!(logged[..3], [true, true, true]);
        // Nothing to report while the interval runs.
        assert_eq!(limit.poll(t0 + s(9)), None);
        // The next event after the interval reports the 7 suppressed, and is logged itself.
        let next = limit.admit(t0 + s(10));
        assert_eq!(
            next,
            Admit {
                log: true,
                suppressed_before: Some(7)
            }
        );
        // Reported once only.
        assert_eq!(limit.poll(t0 + s(30)), None);
    }

    #[test]
    fn a_flood_that_stops_is_summarised_by_poll() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut limit = LogLimit::new(1, Duration::from_secs(10));
        for _ in 0..5 {
            limit.admit(t0);
        }
        assert_eq!(limit.poll(t0 + Duration::from_secs(11)), Some(4));
        assert_eq!(limit.poll(t0 + Duration::from_secs(30)), None);
        // A quiet limiter never reports.
        let mut quiet = LogLimit::new(1, Duration::from_secs(10));
        assert_eq!(quiet.poll(t0 + Duration::from_secs(100)), None);
        assert!(quiet.admit(t0 + Duration::from_secs(100)).log);
    }
}

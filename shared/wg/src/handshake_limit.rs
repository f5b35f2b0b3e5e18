//! Per-source-address token buckets for handshake messages, sans I/O.
//!
//! Input: one call to [`SourceLimiter::allow`] per handshake message that passed its MAC1 check,
//! before any X25519 work, with whether it carried a valid cookie (MAC2); and
//! [`SourceLimiter::handle_timeout`] from the endpoint's timer tick. Output: allow or not, and at
//! most one [`Report`] per [`REPORT_EVERY`] naming the source limited most.
//!
//! Linux's WireGuard (drivers/net/wireguard/ratelimiter.c) lets a source whose address a cookie
//! proved through at 20 messages per second, burst 5, keyed by IPv4 address or IPv6 /64. Each
//! source here has two such buckets: one for cookie-proven messages (beyond it: drop) and one for
//! messages without a valid cookie (beyond it: the caller answers with a cookie, so a spoofer
//! draining a victim's unproven bucket only makes the victim prove its address).
//!
//! The table has a fixed capacity, allocated up front; entries idle long enough for both buckets
//! to refill are forgotten on the tick. A source that finds the table full is not allowed.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Messages per second a source may send (Linux's `PACKETS_PER_SECOND`).
pub const RATE_PER_SEC: u64 = 20;
/// Messages a source may send at once after being quiet (Linux's `PACKETS_BURSTABLE`).
pub const BURST: u64 = 5;
/// Sources tracked at once: a flood from this many distinct addresses within
/// [`IDLE_FORGET`] fills it (then new sources are refused until the tick prunes). About 80 bytes
/// an entry with the map's overhead: 1.3 MB.
pub const CAPACITY: usize = 16_384;
/// How often idle entries are pruned.
pub const GC_EVERY: Duration = Duration::from_secs(1);
/// Least time between two reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Tokens are nanoseconds of credit: one message costs this many.
const COST: u64 = NANOS_PER_SEC / RATE_PER_SEC;
const TOKEN_MAX: u64 = COST * BURST;
/// After this long without a message both buckets are full again, so forgetting the entry
/// changes nothing.
pub const IDLE_FORGET: Duration = Duration::from_nanos(TOKEN_MAX);

/// What a bucket is keyed by: an IPv4 address, or an IPv6 /64 (one subscriber's usual
/// allocation, so rotating addresses inside it gains nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// One IPv4 address (also when it arrived IPv4-mapped on a dual-stack socket).
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for SourceKey {
    fn from(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(a) => SourceKey::V4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                // Otherwise every IPv4 source on a dual-stack socket would share ::ffff:0:0/64.
                Some(v4) => SourceKey::V4(v4),
                None => SourceKey::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKey::V4(a) => write!(f, "{a}"),
            SourceKey::V6(prefix) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64)),
        }
    }
}

/// Messages limited since the previous report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The source limited most.
    pub top_source: SourceKey,
    /// How many of its messages were limited.
    pub top_count: u64,
    /// Messages limited from all sources (including those refused because the table was full).
    pub total: u64,
    /// Of `total`, those that carried a valid cookie (dropped rather than answered).
    pub with_cookie: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    last: Instant,
    proven: u64,
    unproven: u64,
    /// Limited since the last report.
    limited: u64,
}

/// The per-source buckets.
#[derive(Debug)]
pub struct SourceLimiter {
    table: HashMap<SourceKey, Entry>,
    capacity: usize,
    next_gc: Option<Instant>,
    last_report: Option<Instant>,
    /// Limited since the last report, and the source limited most in that time.
    pending: u64,
    pending_with_cookie: u64,
    top: Option<(SourceKey, u64)>,
    /// Limited since the start.
    total: u64,
}

impl Default for SourceLimiter {
    fn default() -> Self {
        SourceLimiter::with_capacity(CAPACITY)
    }
}

impl SourceLimiter {
    /// A limiter tracking at most `capacity` sources (memory for them is allocated now).
    pub fn with_capacity(capacity: usize) -> Self {
        SourceLimiter {
            table: HashMap::with_capacity(capacity),
            capacity,
            next_gc: None,
            last_report: None,
            pending: 0,
            pending_with_cookie: 0,
            top: None,
            total: 0,
        }
    }

    /// Whether a handshake message from `src` may go on to the X25519 work. `proven`: it carried
    /// a valid cookie for `src`.
    pub fn allow(&mut self, src: IpAddr, proven: bool, now: Instant) -> bool {
        let key = SourceKey::from(src);
        let full = self.table.len() >= self.capacity;
        let entry = match self.table.get_mut(&key) {
            Some(entry) => {
                let elapsed = now.saturating_duration_since(entry.last);
                let credit = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
                entry.proven = entry.proven.saturating_add(credit).min(TOKEN_MAX);
                entry.unproven = entry.unproven.saturating_add(credit).min(TOKEN_MAX);
                entry.last = now;
                entry
            }
            None if full => {
                self.count_limited(None, proven);
                return false;
            }
            None => self.table.entry(key).or_insert(Entry {
                last: now,
                proven: TOKEN_MAX,
                unproven: TOKEN_MAX,
                limited: 0,
            }),
        };
        let tokens = if proven {
            &mut entry.proven
        } else {
            &mut entry.unproven
        };
        if *tokens >= COST {
            *tokens -= COST;
            return true;
        }
        entry.limited += 1;
        let limited = entry.limited;
        self.count_limited(Some((key, limited)), proven);
        false
    }

    fn count_limited(&mut self, source: Option<(SourceKey, u64)>, proven: bool) {
        self.total += 1;
        self.pending += 1;
        self.pending_with_cookie += u64::from(proven);
        if let Some((key, n)) = source {
            if self.top.is_none_or(|(_, top)| n > top) {
                self.top = Some((key, n));
            }
        }
    }

    /// Prunes idle entries (every [`GC_EVERY`]) and returns a report when messages were limited
    /// and the last report is at least [`REPORT_EVERY`] old.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Report> {
        if self.next_gc.is_some_and(|t| now < t) {
            return None;
        }
        self.next_gc = Some(now + GC_EVERY);
        let report_due = self.pending > 0
            && self
                .last_report
                .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_EVERY);
        self.table.retain(|_, e| {
            if report_due {
                e.limited = 0;
            }
            now.saturating_duration_since(e.last) < IDLE_FORGET
        });
        if !report_due {
            return None;
        }
        self.last_report = Some(now);
        let total = std::mem::take(&mut self.pending);
        let with_cookie = std::mem::take(&mut self.pending_with_cookie);
        let (top_source, top_count) = self
            .top
            .take()
            .unwrap_or((SourceKey::V4(Ipv4Addr::UNSPECIFIED), 0));
        Some(Report {
            top_source,
            top_count,
            total,
            with_cookie,
        })
    }

    /// Messages limited since the start.
    pub fn limited(&self) -> u64 {
        self.total
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // The fake clock starts from one real instant.
mod tests {
    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
    }

    fn allowed(l: &mut SourceLimiter, src: IpAddr, proven: bool, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| l.allow(src, proven, now)).count()
    }

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::default();
        assert_eq!(allowed(&mut l, v4(12), true, t0, 100), BURST as usize);
        assert_eq!(l.limited(), 100 - BURST);
        // One message's worth of time buys one message.
        let t = t0 + Duration::from_millis(50);
        assert_eq!(allowed(&mut l, v4(12), true, t, 10), 1);
        // A full second at a steady flood lets the rate through, never more.
        let mut n = 0;
        for ms in 1..=1000 {
            n += allowed(&mut l, v4(12), true, t + Duration::from_millis(ms), 20);
        }
        assert_eq!(n, RATE_PER_SEC as usize);
        // Quiet for long enough refills the burst, no more.
        let later = t + Duration::from_secs(60);
        assert_eq!(allowed(&mut l, v4(12), true, later, 100), BURST as usize);
    }

    #[test]
    fn sources_and_proofs_have_their_own_buckets() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::default();
        assert_eq!(allowed(&mut l, v4(12), true, t0, 50), BURST as usize);
        // The same source without a cookie, and another source, are untouched by that flood.
        assert_eq!(allowed(&mut l, v4(12), false, t0, 50), BURST as usize);
        assert_eq!(allowed(&mut l, v4(13), true, t0, 50), BURST as usize);
    }

    #[test]
    fn ipv6_is_keyed_by_64_and_mapped_ipv4_by_address() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::default();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(allowed(&mut l, a, true, t0, 3), 3);
        assert_eq!(allowed(&mut l, b, true, t0, 10), BURST as usize - 3);
        assert_eq!(allowed(&mut l, c, true, t0, 10), BURST as usize);
        assert_eq!(SourceKey::from(a).to_string(), "2001:db8:1:2::/64");

        let m1: IpAddr = "::ffff:198.51.100.12".parse().unwrap();
        let m2: IpAddr = "::ffff:198.51.100.13".parse().unwrap();
        assert_eq!(allowed(&mut l, m1, true, t0, 10), BURST as usize);
        assert_eq!(allowed(&mut l, m2, true, t0, 10), BURST as usize);
        assert_eq!(SourceKey::from(m1), SourceKey::from(v4(12)));
    }

    #[test]
    fn the_table_is_bounded_and_pruned() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::with_capacity(4);
        for i in 0..4 {
            assert!(l.allow(v4(i), false, t0));
        }
        // Full: a new source is refused (and counted), a known one still has its bucket.
        assert!(!l.allow(v4(200), false, t0));
        assert!(l.allow(v4(1), false, t0));
        assert_eq!(l.len(), 4);
        assert_eq!(l.limited(), 1);

        // Pruning keeps what is still refilling and forgets what is full again, once per
        // GC_EVERY.
        l.handle_timeout(t0);
        assert_eq!(l.len(), 4);
        let t1 = t0 + GC_EVERY - IDLE_FORGET / 2;
        assert!(l.allow(v4(2), false, t1));
        l.handle_timeout(t1);
        assert_eq!(l.len(), 4);
        l.handle_timeout(t0 + GC_EVERY);
        assert_eq!(l.len(), 1);
        assert!(l.allow(v4(200), false, t0 + GC_EVERY));
    }

    #[test]
    fn the_table_never_grows_past_its_capacity() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::with_capacity(64);
        let mut refused = 0;
        for i in 0..10_000u32 {
            let src = IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64));
            if !l.allow(src, false, t0 + Duration::from_micros(u64::from(i))) {
                refused += 1;
            }
        }
        assert_eq!(l.len(), 64);
        assert_eq!(refused, 10_000 - 64);
    }

    #[test]
    fn reports_name_the_top_source_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::default();
        assert_eq!(l.handle_timeout(t0), None);
        allowed(&mut l, v4(12), true, t0, 105);
        allowed(&mut l, v4(13), true, t0, 15);
        let t1 = t0 + GC_EVERY;
        assert_eq!(
            l.handle_timeout(t1),
            Some(Report {
                top_source: SourceKey::V4(Ipv4Addr::new(198, 51, 100, 12)),
                top_count: 100,
                total: 110,
                with_cookie: 110,
            })
        );
        // Still flooding: the next report waits for the interval and covers all of it.
        let mut t = t1;
        let mut reports = Vec::new();
        while t < t1 + REPORT_EVERY {
            t += GC_EVERY;
            allowed(&mut l, v4(13), true, t, 30);
            reports.extend(l.handle_timeout(t));
        }
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(
            reports[0].top_source,
            SourceKey::V4(Ipv4Addr::new(198, 51, 100, 13))
        );
        assert!(reports[0].total >= 4 * (30 - 20), "{reports:?}");
        assert_eq!(l.handle_timeout(t + REPORT_EVERY), None);
    }
}

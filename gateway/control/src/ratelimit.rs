//! Rate limits on guessing enrollment tokens: a token bucket per source (an IPv4 address, or an
//! IPv6 /64, since one host holds a whole /64). Each failed attempt takes one token; a source
//! with no token left is refused before its token is even looked up, and counted. Time comes in
//! as an argument (a monotonic offset from any start), so tests drive it with a fake clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// Failed attempts a source may make at once.
pub const BURST: u32 = 10;
/// One more failed attempt is allowed per this interval.
pub const REFILL: Duration = Duration::from_secs(6);
/// Sources tracked at most; past this, sources back at a full bucket are forgotten first.
pub const MAX_SOURCES: usize = 16_384;

/// The key of a source: the address, IPv6 cut to its /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens left at `at`.
    tokens: u32,
    /// When `tokens` was last brought up to date.
    at: Duration,
}

impl Bucket {
    fn refill(&mut self, now: Duration) {
        let steps = now.saturating_sub(self.at).as_nanos() / REFILL.as_nanos();
        if steps > 0 {
            let steps = u32::try_from(steps).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(steps).min(BURST);
            self.at = if self.tokens == BURST {
                now
            } else {
                self.at + REFILL * steps
            };
        }
    }
}

/// The per-source buckets and the count of refused attempts.
#[derive(Debug, Default)]
pub struct GuessLimiter {
    buckets: HashMap<IpAddr, Bucket>,
    limited: u64,
}

impl GuessLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `ip` may try a token at `now`; `Err(seconds)` until it may, counted as limited.
    pub fn check(&mut self, ip: IpAddr, now: Duration) -> Result<(), u64> {
        let Some(bucket) = self.buckets.get_mut(&source(ip)) else {
            return Ok(());
        };
        bucket.refill(now);
        if bucket.tokens > 0 {
            return Ok(());
        }
        self.limited += 1;
        let wait = (bucket.at + REFILL).saturating_sub(now);
        Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
    }

    /// Records a failed attempt from `ip` at `now` (an unknown, malformed, expired, spent or
    /// revoked token).
    pub fn failed(&mut self, ip: IpAddr, now: Duration) {
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&source(ip)) {
            self.buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < BURST
            });
            if self.buckets.len() >= MAX_SOURCES {
                // Every tracked source is still guessing: forget them all rather than grow.
                self.buckets.clear();
            }
        }
        let bucket = self.buckets.entry(source(ip)).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        bucket.refill(now);
        bucket.tokens = bucket.tokens.saturating_sub(1);
        if bucket.tokens + 1 == BURST {
            bucket.at = now;
        }
    }

    /// Attempts refused so far.
    pub fn limited(&self) -> u64 {
        self.limited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_source_gets_a_burst_then_one_try_per_interval() {
        let mut l = GuessLimiter::new();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..BURST {
            assert_eq!(l.check(ip, at(0)), Ok(()));
            l.failed(ip, at(0));
        }
        assert_eq!(l.check(ip, at(0)), Err(6));
        assert_eq!(l.check(ip, at(5)), Err(1));
        assert_eq!(l.limited(), 2);
        // Another source is not held up.
        assert_eq!(l.check("198.51.100.8".parse().unwrap(), at(5)), Ok(()));
        // One try back after the interval, and only one.
        assert_eq!(l.check(ip, at(6)), Ok(()));
        l.failed(ip, at(6));
        assert!(l.check(ip, at(7)).is_err());
        // A long pause refills the whole burst, not more.
        for _ in 0..BURST {
            assert_eq!(l.check(ip, at(1000)), Ok(()));
            l.failed(ip, at(1000));
        }
        assert!(l.check(ip, at(1000)).is_err());
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let mut l = GuessLimiter::new();
        for i in 0..BURST {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            l.failed(ip, at(0));
        }
        assert!(l
            .check("2001:db8:1:2::ffff".parse().unwrap(), at(0))
            .is_err());
        assert!(l.check("2001:db8:1:3::1".parse().unwrap(), at(0)).is_ok());
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut l = GuessLimiter::new();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            l.failed(IpAddr::V4(i.into()), at(0));
        }
        assert!(l.buckets.len() <= MAX_SOURCES);
    }
}

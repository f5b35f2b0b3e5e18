//! One direction of an emulated path, sans-IO: what `lab-delay` does to each datagram (this
//! kernel has no netem). A datagram is lost at random, or waits in a bottleneck's queue (dropped
//! when the queue is full, as a home router's tail-drop FIFO), leaves it at the link's rate, and
//! arrives after the one-way delay plus jitter. Order is kept: jitter delays a datagram, it never
//! overtakes an earlier one (a real access link is one queue).
//!
//! Inputs: datagram sizes and the time each arrived; outputs: the time each is due, or why it was
//! dropped. The caller owns the clock and the sockets (`lab-delay`), tests drive it with made-up
//! times.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How one direction of the path behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Fixed one-way propagation delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per datagram.
    pub jitter: Duration,
    /// Probability of losing a datagram, 0.0..=1.0, independent per datagram.
    pub loss: f64,
    /// The bottleneck's rate in bits per second; `None`: no bottleneck.
    pub rate_bps: Option<u64>,
    /// The bottleneck's queue, as the time it takes to drain at `rate_bps`.
    pub queue: Duration,
}

impl LinkConfig {
    /// A path that only delays.
    pub fn delay(delay: Duration) -> Self {
        LinkConfig {
            delay,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue: Duration::ZERO,
        }
    }

    /// Bytes the bottleneck queue holds (at least one full datagram, so a tiny queue still
    /// passes traffic).
    fn queue_bytes(&self) -> u64 {
        match self.rate_bps {
            Some(rate) => ((rate as u128 * self.queue.as_nanos() / 8 / 1_000_000_000) as u64)
                .max(MAX_DATAGRAM),
            None => u64::MAX,
        }
    }
}

/// Largest datagram the link expects (a WireGuard packet of a 1420-byte MTU is 1452 bytes; GSO
/// is not used by the relay).
const MAX_DATAGRAM: u64 = 65_535;

/// What became of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Deliver it at this time.
    Due(Instant),
    /// Lost at random.
    Lost,
    /// The bottleneck's queue was full.
    QueueFull,
}

/// One direction's state: the bottleneck queue and the random source.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    queue_limit: u64,
    /// (time it leaves the bottleneck, bytes) of what is still queued there.
    queued: VecDeque<(Instant, u64)>,
    queued_bytes: u64,
    /// When the bottleneck finishes sending what it holds.
    busy_until: Option<Instant>,
    /// The latest time handed out, so no datagram overtakes another.
    last_due: Option<Instant>,
    rng: u64,
    /// Datagrams lost at random so far.
    pub lost: u64,
    /// Datagrams dropped by a full queue so far.
    pub queue_drops: u64,
}

impl Link {
    /// A link with `config`; `seed` makes its losses and jitter repeatable.
    pub fn new(config: LinkConfig, seed: u64) -> Self {
        Link {
            queue_limit: config.queue_bytes(),
            config,
            queued: VecDeque::new(),
            queued_bytes: 0,
            busy_until: None,
            last_due: None,
            // xorshift64* must not start at zero.
            rng: seed | 1,
            lost: 0,
            queue_drops: 0,
        }
    }

    /// Decides the fate of a datagram of `len` bytes arriving at `now`.
    pub fn send(&mut self, now: Instant, len: usize) -> Fate {
        if self.config.loss > 0.0 && self.uniform() < self.config.loss {
            self.lost += 1;
            return Fate::Lost;
        }
        let mut leaves = now;
        if let Some(rate) = self.config.rate_bps.filter(|r| *r > 0) {
            while let Some(&(out, bytes)) = self.queued.front() {
                if out > now {
                    break;
                }
                self.queued.pop_front();
                self.queued_bytes -= bytes;
            }
            let len = len as u64;
            if self.queued_bytes + len > self.queue_limit {
                self.queue_drops += 1;
                return Fate::QueueFull;
            }
            let start = self.busy_until.filter(|b| *b > now).unwrap_or(now);
            let serialization = Duration::from_nanos((len * 8 * 1_000_000_000 / rate).max(1));
            leaves = start + serialization;
            self.busy_until = Some(leaves);
            self.queued.push_back((leaves, len));
            self.queued_bytes += len;
        }
        let jitter = if self.config.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.config.jitter.mul_f64(self.uniform())
        };
        let mut due = leaves + self.config.delay + jitter;
        if let Some(last) = self.last_due {
            due = due.max(last);
        }
        self.last_due = Some(due);
        Fate::Due(due)
    }

    /// Bytes waiting in the bottleneck at `now`.
    pub fn backlog(&self, now: Instant) -> u64 {
        self.queued
            .iter()
            .filter(|(out, _)| *out > now)
            .map(|(_, b)| b)
            .sum()
    }

    /// A number in [0, 1) (xorshift64*: plenty for a lab's coin flips).
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_plain_delay_keeps_order_and_adds_the_delay() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::delay(ms(20)), 1);
        assert_eq!(link.send(t0, 1400), Fate::Due(t0 + ms(20)));
        assert_eq!(link.send(t0 + ms(1), 1400), Fate::Due(t0 + ms(21)));
    }

    #[test]
    fn loss_follows_its_probability_and_the_seed() {
        let t0 = Instant::now();
        let config = LinkConfig {
            loss: 0.05,
            ..LinkConfig::delay(ms(1))
        };
        let mut link = Link::new(config.clone(), 7);
        let fates: Vec<Fate> = (0..100_000).map(|_| link.send(t0, 100)).collect();
        let lost = fates.iter().filter(|f| **f == Fate::Lost).count();
        assert!((4_500..5_500).contains(&lost), "lost {lost} of 100000");
        assert_eq!(link.lost, lost as u64);
        // The same seed loses the same datagrams.
        let mut again = Link::new(config, 7);
        assert!(fates.iter().all(|f| *f == again.send(t0, 100)));
    }

    #[test]
    fn a_bottleneck_paces_at_its_rate_and_drops_beyond_its_queue() {
        let t0 = Instant::now();
        // 100 Mbit/s with a 10 ms queue: 125,000 bytes; a 1250-byte datagram takes 100 us.
        let mut link = Link::new(
            LinkConfig {
                rate_bps: Some(100_000_000),
                queue: ms(10),
                ..LinkConfig::delay(ms(20))
            },
            1,
        );
        let mut dues = Vec::new();
        let mut full = 0;
        for _ in 0..200 {
            match link.send(t0, 1250) {
                Fate::Due(t) => dues.push(t),
                Fate::QueueFull => full += 1,
                Fate::Lost => unreachable!("no random loss configured"),
            }
        }
        // A burst of 200 at once: 100 fit the queue, the rest are tail-dropped.
        assert_eq!(dues.len(), 100);
        assert_eq!(full, 100);
        assert_eq!(link.queue_drops, 100);
        assert_eq!(dues[0], t0 + Duration::from_micros(100) + ms(20));
        assert_eq!(dues[99], t0 + ms(10) + ms(20));
        assert_eq!(link.backlog(t0), 125_000);
        // Once drained, the queue takes datagrams again.
        assert!(matches!(link.send(t0 + ms(10), 1250), Fate::Due(_)));
        assert_eq!(link.backlog(t0 + ms(10)), 1250);
    }

    #[test]
    fn jitter_delays_within_its_bound_and_never_reorders() {
        let t0 = Instant::now();
        let mut link = Link::new(
            LinkConfig {
                jitter: ms(10),
                ..LinkConfig::delay(ms(20))
            },
            3,
        );
        let mut last = t0;
        let mut spread = Duration::ZERO;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            let Fate::Due(due) = link.send(now, 100) else {
                panic!("no loss configured");
            };
            assert!(due >= last, "datagram {i} overtook an earlier one");
            assert!(due >= now + ms(20) && due <= now + ms(30), "{i}: {due:?}");
            spread = spread.max(due - now - ms(20));
            last = due;
        }
        assert!(spread > ms(5), "jitter barely varies: {spread:?}");
    }
}

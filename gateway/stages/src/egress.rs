//! The egress stage: which source address a flow's upstream connection leaves from.
//!
//! An egress rule that matched names a primary IPv4 address, an IPv6 prefix and an IPv4
//! fallback; without one the flow takes the default: `egress.default_ipv4` (or the OS's choice),
//! or with `egress.default = "dedicated"` the healthy location with the lowest latency. Locations
//! are health-checked by the runtime, which reports each probe here; while a primary address's
//! location is down its flows use the fallback. IPv6 flows leave from an address inside the
//! chosen prefix that is derived from the device, so a device keeps its address across flows and
//! restarts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::Ipv6Net;

use waygate_config::{DefaultEgress, EgressLocationConfig};
use waygate_model::FlowCtx;

/// Consecutive failed probes that take a location down.
const FAILS_TO_DOWN: u8 = 2;
/// Consecutive good probes that bring it back.
const SUCCESSES_TO_UP: u8 = 2;

/// Egress addresses from the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressSettings {
    /// Source of IPv4 upstream connections; `None`: the OS picks.
    pub default_ipv4: Option<Ipv4Addr>,
    /// Source of IPv6 upstream connections; `None`: the OS picks.
    pub default_ipv6: Option<Ipv6Addr>,
    /// What flows without an egress rule use.
    pub default: DefaultEgress,
    /// Dedicated locations.
    pub locations: Vec<EgressLocationConfig>,
}

/// What a matching egress rule asks for (`rule_settings.egress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EgressChoice {
    /// Primary IPv4 source.
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 prefix to take a per-device source from.
    pub ipv6: Option<Ipv6Net>,
    /// IPv4 source while the primary's location is down; `0.0.0.0` means the default egress.
    pub ipv4_fallback: Option<Ipv4Addr>,
}

/// Result of one health probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The target answered after this long.
    Up(Duration),
    /// It did not (refused, unreachable, timed out).
    Down,
}

/// A location's health as the probes tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Health {
    up: bool,
    fails: u8,
    successes: u8,
    latency: Option<Duration>,
}

impl Health {
    /// Locations start up: a fresh gateway serves at once, and the first probes correct it.
    fn new() -> Self {
        Health {
            up: true,
            fails: 0,
            successes: 0,
            latency: None,
        }
    }

    /// Records a probe; returns whether `up` changed.
    fn record(&mut self, probe: Probe) -> bool {
        let was = self.up;
        match probe {
            Probe::Up(latency) => {
                self.fails = 0;
                self.successes = self.successes.saturating_add(1);
                // Smoothed so one slow connect does not reorder locations.
                self.latency = Some(match self.latency {
                    Some(l) => (l * 3 + latency) / 4,
                    None => latency,
                });
                if self.successes >= SUCCESSES_TO_UP {
                    self.up = true;
                }
            }
            Probe::Down => {
                self.successes = 0;
                self.fails = self.fails.saturating_add(1);
                if self.fails >= FAILS_TO_DOWN {
                    self.up = false;
                }
            }
        }
        self.up != was
    }
}

/// How much faster another location must be before the dedicated default moves to it, so
/// that locations with about the same latency do not take turns.
fn clearly_faster(candidate: Duration, current: Duration) -> bool {
    candidate.as_micros() + 1000 < current.as_micros() / 10 * 8
}

/// The egress stage's state: settings plus each location's health.
#[derive(Debug, Clone)]
pub struct Egress {
    settings: EgressSettings,
    health: Vec<Health>,
    /// Per family (IPv4, IPv6), the location the dedicated default uses.
    preferred: [Option<usize>; 2],
}

impl Egress {
    /// All locations start healthy.
    pub fn new(settings: EgressSettings) -> Self {
        let health = vec![Health::new(); settings.locations.len()];
        let mut egress = Egress {
            settings,
            health,
            preferred: [None, None],
        };
        egress.update_preferred();
        egress
    }

    /// The settings.
    pub fn settings(&self) -> &EgressSettings {
        &self.settings
    }

    /// Records the result of probing location `index`.
    pub fn record_probe(&mut self, index: usize, probe: Probe) {
        let (Some(health), Some(location)) = (
            self.health.get_mut(index),
            self.settings.locations.get(index),
        ) else {
            return;
        };
        if health.record(probe) {
            if health.up {
                tracing::info!(target: "waygate::egress", location = %location.name, "egress location recovered");
            } else {
                tracing::warn!(target: "waygate::egress", location = %location.name, "egress location is down");
            }
        }
        self.update_preferred();
    }

    fn update_preferred(&mut self) {
        for (family, v4) in [(0, true), (1, false)] {
            let serves = |l: &EgressLocationConfig| {
                if v4 {
                    !l.ipv4.is_empty()
                } else {
                    l.ipv6.is_some()
                }
            };
            let latency = |i: usize| {
                self.health
                    .get(i)
                    .and_then(|h| h.latency)
                    .unwrap_or(Duration::MAX)
            };
            // The healthy location with the lowest latency; unmeasured ones after measured
            // ones, in config order.
            let best = self
                .settings
                .locations
                .iter()
                .enumerate()
                .filter(|(i, l)| self.is_up(*i) && serves(l))
                .min_by_key(|(i, _)| latency(*i))
                .map(|(i, _)| i);
            let current = self.preferred[family].filter(|i| self.is_up(*i));
            self.preferred[family] = match (current, best) {
                (Some(c), Some(b)) if !clearly_faster(latency(b), latency(c)) => Some(c),
                (_, b) => b,
            };
        }
    }

    /// Whether location `index` is up.
    pub fn is_up(&self, index: usize) -> bool {
        self.health.get(index).is_some_and(|h| h.up)
    }

    /// Chooses the source address for a flow going to `upstream` (`None` lets the OS choose),
    /// given the egress rule that matched, if any.
    pub fn select(
        &self,
        ctx: &FlowCtx,
        upstream: IpAddr,
        rule: Option<&EgressChoice>,
    ) -> Option<IpAddr> {
        match (upstream, rule) {
            (IpAddr::V4(_), Some(choice)) => match choice.ipv4 {
                Some(primary) if self.address_up(primary) => Some(IpAddr::V4(primary)),
                Some(_) => match choice.ipv4_fallback {
                    Some(fallback) if !fallback.is_unspecified() => Some(IpAddr::V4(fallback)),
                    _ => self.default_source(ctx, upstream),
                },
                None => self.default_source(ctx, upstream),
            },
            (
                IpAddr::V6(_),
                Some(EgressChoice {
                    ipv6: Some(prefix), ..
                }),
            ) => Some(IpAddr::V6(device_address(*prefix, &ctx.device.id))),
            _ => self.default_source(ctx, upstream),
        }
    }

    /// A primary address is usable unless the location it belongs to is down.
    fn address_up(&self, addr: Ipv4Addr) -> bool {
        self.settings
            .locations
            .iter()
            .position(|l| l.ipv4.contains(&addr))
            .is_none_or(|i| self.is_up(i))
    }

    fn default_source(&self, ctx: &FlowCtx, upstream: IpAddr) -> Option<IpAddr> {
        if self.settings.default == DefaultEgress::Dedicated {
            if let Some(location) = self.best_location(upstream) {
                return match upstream {
                    IpAddr::V4(_) => location.ipv4.first().map(|a| IpAddr::V4(*a)),
                    IpAddr::V6(_) => location
                        .ipv6
                        .map(|p| IpAddr::V6(device_address(p, &ctx.device.id))),
                };
            }
        }
        match upstream {
            IpAddr::V4(_) => self.settings.default_ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.settings.default_ipv6.map(IpAddr::V6),
        }
    }

    /// The location the dedicated default uses for `upstream`'s family.
    fn best_location(&self, upstream: IpAddr) -> Option<&EgressLocationConfig> {
        let family = usize::from(upstream.is_ipv6());
        self.preferred[family].and_then(|i| self.settings.locations.get(i))
    }
}

/// The device's own address inside `prefix`: its host part is a hash of the device id, so it
/// is the same for every flow and across restarts, and differs between devices.
pub fn device_address(prefix: Ipv6Net, device_id: &str) -> Ipv6Addr {
    // FNV-1a: stable across builds and platforms, unlike std's randomly keyed hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let host_bits = 128 - u32::from(prefix.prefix_len());
    let mask = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let spread = u128::from(hash) | (u128::from(hash.rotate_left(17)) << 64);
    let mut host = spread & mask;
    // Host 0 is the subnet-router anycast address; never hand it out.
    if host == 0 {
        host = 1 & mask;
    }
    Ipv6Addr::from(u128::from(prefix.network()) | host)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use waygate_config::HealthCheckConfig;
    use waygate_model::testkit;

    fn ctx(device_id: &str) -> FlowCtx {
        testkit::flow()
            .device(testkit::device().id(device_id))
            .build()
    }

    fn location(name: &str, ipv4: &[&str], ipv6: Option<&str>) -> EgressLocationConfig {
        EgressLocationConfig {
            name: name.into(),
            ipv4: ipv4.iter().map(|a| a.parse().unwrap()).collect(),
            ipv6: ipv6.map(|p| p.parse().unwrap()),
            health_check: Some(HealthCheckConfig {
                target: "203.0.113.10:80".parse::<SocketAddr>().unwrap(),
                interval: Duration::from_secs(1),
            }),
        }
    }

    fn egress(default: DefaultEgress) -> Egress {
        Egress::new(EgressSettings {
            default_ipv4: Some(Ipv4Addr::new(192, 0, 2, 1)),
            default_ipv6: None,
            default,
            locations: vec![
                location("primary", &["192.0.2.10"], Some("2001:db8:2:10::/64")),
                location("secondary", &["192.0.2.11"], Some("2001:db8:2:11::/64")),
            ],
        })
    }

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x10));

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn without_a_rule_flows_use_the_default() {
        let e = egress(DefaultEgress::Default);
        assert_eq!(e.select(&ctx("d1"), V4, None), ip("192.0.2.1"));
        assert_eq!(e.select(&ctx("d1"), V6, None), None);
    }

    #[test]
    fn a_rule_picks_its_primary_and_falls_back_while_its_location_is_down() {
        let mut e = egress(DefaultEgress::Default);
        let rule = EgressChoice {
            ipv4: Some(Ipv4Addr::new(192, 0, 2, 10)),
            ipv6: None,
            ipv4_fallback: Some(Ipv4Addr::new(192, 0, 2, 11)),
        };
        assert_eq!(e.select(&ctx("d1"), V4, Some(&rule)), ip("192.0.2.10"));
        e.record_probe(0, Probe::Down);
        assert_eq!(
            e.select(&ctx("d1"), V4, Some(&rule)),
            ip("192.0.2.10"),
            "one failed probe is not an outage"
        );
        e.record_probe(0, Probe::Down);
        assert_eq!(e.select(&ctx("d1"), V4, Some(&rule)), ip("192.0.2.11"));
        e.record_probe(0, Probe::Up(Duration::from_millis(3)));
        assert_eq!(e.select(&ctx("d1"), V4, Some(&rule)), ip("192.0.2.11"));
        e.record_probe(0, Probe::Up(Duration::from_millis(3)));
        assert_eq!(e.select(&ctx("d1"), V4, Some(&rule)), ip("192.0.2.10"));
    }

    #[test]
    fn a_fallback_of_zero_means_the_default_egress() {
        let mut e = egress(DefaultEgress::Default);
        let rule = EgressChoice {
            ipv4: Some(Ipv4Addr::new(192, 0, 2, 10)),
            ipv6: None,
            ipv4_fallback: Some(Ipv4Addr::UNSPECIFIED),
        };
        e.record_probe(0, Probe::Down);
        e.record_probe(0, Probe::Down);
        assert_eq!(e.select(&ctx("d1"), V4, Some(&rule)), ip("192.0.2.1"));
    }

    #[test]
    fn dedicated_default_takes_the_fastest_healthy_location() {
        let mut e = egress(DefaultEgress::Dedicated);
        // Nothing measured yet: config order.
        assert_eq!(e.select(&ctx("d1"), V4, None), ip("192.0.2.10"));
        e.record_probe(0, Probe::Up(Duration::from_millis(30)));
        e.record_probe(1, Probe::Up(Duration::from_millis(5)));
        assert_eq!(e.select(&ctx("d1"), V4, None), ip("192.0.2.11"));
        e.record_probe(1, Probe::Down);
        e.record_probe(1, Probe::Down);
        assert_eq!(e.select(&ctx("d1"), V4, None), ip("192.0.2.10"));
        e.record_probe(0, Probe::Down);
        e.record_probe(0, Probe::Down);
        assert_eq!(
            e.select(&ctx("d1"), V4, None),
            ip("192.0.2.1"),
            "every location down: the default address"
        );
    }

    #[test]
    fn the_dedicated_default_stays_put_among_equals() {
        let mut e = egress(DefaultEgress::Dedicated);
        e.record_probe(0, Probe::Up(Duration::from_micros(900)));
        e.record_probe(1, Probe::Up(Duration::from_micros(850)));
        assert_eq!(e.select(&ctx("d1"), V4, None), ip("192.0.2.10"));
        for _ in 0..10 {
            e.record_probe(1, Probe::Up(Duration::from_micros(100)));
        }
        assert_eq!(
            e.select(&ctx("d1"), V4, None),
            ip("192.0.2.10"),
            "0.8 ms faster is not clearly faster"
        );
        for _ in 0..10 {
            e.record_probe(0, Probe::Up(Duration::from_millis(40)));
        }
        assert_eq!(e.select(&ctx("d1"), V4, None), ip("192.0.2.11"));
    }

    #[test]
    fn ipv6_sources_are_stable_per_device_and_inside_the_prefix() {
        let e = egress(DefaultEgress::Default);
        let rule = EgressChoice {
            ipv4: None,
            ipv6: Some("2001:db8:2:10::/64".parse().unwrap()),
            ipv4_fallback: None,
        };
        let a1 = e.select(&ctx("device-a"), V6, Some(&rule));
        let a2 = e.select(&ctx("device-a"), V6, Some(&rule));
        let b = e.select(&ctx("device-b"), V6, Some(&rule));
        assert_eq!(a1, a2);
        assert_ne!(a1, b);
        let prefix: Ipv6Net = "2001:db8:2:10::/64".parse().unwrap();
        for a in [a1, b] {
            let Some(IpAddr::V6(a)) = a else {
                panic!("{a:?}")
            };
            assert!(prefix.contains(&a));
            assert_ne!(a, prefix.network());
        }
        // The rule's IPv4 part does not apply to IPv6 flows and vice versa.
        assert_eq!(e.select(&ctx("device-a"), V4, Some(&rule)), ip("192.0.2.1"));
    }

    #[test]
    fn device_addresses_fill_small_prefixes_too() {
        let p: Ipv6Net = "2001:db8:2:10::/120".parse().unwrap();
        for id in ["a", "b", "c", ""] {
            let a = device_address(p, id);
            assert!(p.contains(&a), "{a}");
            assert_ne!(a, p.network());
        }
        let full: Ipv6Net = "::/0".parse().unwrap();
        assert_ne!(device_address(full, "x"), Ipv6Addr::UNSPECIFIED);
    }
}

//! Tunnel address allocation: the lowest address of the pool that no device row holds.
//! [`Allocator`] does it; `lowest_free_*` state the rule plainly and check it in tests.
//!
//! The pool's network address and the gateway's own address (the first host) are never handed
//! out, nor IPv4's broadcast address. Revoked devices keep their rows and therefore their
//! addresses, so an address is only reused once its device has been deleted: packets still in
//! flight, logs and policy decisions never confuse an old device with a new one.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

#[cfg(test)]
/// Lowest free IPv4 address in `pool`, given the addresses in use (any order, any pool).
pub fn lowest_free_v4(pool: Ipv4Net, used: impl IntoIterator<Item = Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u128::from(u32::from(pool.network())) + 2;
    let last = u128::from(u32::from(pool.broadcast())).checked_sub(1)?;
    let used = used.into_iter().map(|a| u128::from(u32::from(a)));
    lowest_free(first, last, used).and_then(|v| u32::try_from(v).ok().map(Ipv4Addr::from))
}

#[cfg(test)]
/// Lowest free IPv6 address in `pool`, given the addresses in use (any order, any pool).
pub fn lowest_free_v6(pool: Ipv6Net, used: impl IntoIterator<Item = Ipv6Addr>) -> Option<Ipv6Addr> {
    let first = u128::from(pool.network()).checked_add(2)?;
    let last = u128::from(pool.broadcast());
    let used = used.into_iter().map(u128::from);
    lowest_free(first, last, used).map(Ipv6Addr::from)
}

#[cfg(test)]
/// Smallest value in `first..=last` not in `used`.
fn lowest_free(first: u128, last: u128, used: impl Iterator<Item = u128>) -> Option<u128> {
    let mut taken: Vec<u128> = used.filter(|v| (first..=last).contains(v)).collect();
    taken.sort_unstable();
    taken.dedup();
    let mut candidate = first;
    for v in taken {
        if v != candidate {
            // Sorted and deduplicated, so v > candidate: a gap.
            break;
        }
        candidate = candidate.checked_add(1)?;
    }
    (candidate <= last).then_some(candidate)
}

/// Lowest-free allocation of many addresses in a row (one enrollment transaction): the same
/// answers as [`lowest_free_v4`] and [`lowest_free_v6`] after each allocation, without
/// rescanning every address in use each time (enrolling 100,000 devices one scan apiece is
/// quadratic).
pub struct Allocator {
    v4: Run,
    v6: Run,
}

/// One pool's allocation: the next candidate and the taken values at or above it.
struct Run {
    next: u128,
    last: u128,
    taken: std::collections::HashSet<u128>,
}

impl Run {
    fn new(first: Option<u128>, last: Option<u128>, used: impl Iterator<Item = u128>) -> Run {
        let (next, last) = match (first, last) {
            (Some(f), Some(l)) => (f, l),
            // An empty pool: nothing is ever free.
            _ => (1, 0),
        };
        Run {
            next,
            last,
            taken: used.filter(|v| (next..=last).contains(v)).collect(),
        }
    }

    fn take(&mut self) -> Option<u128> {
        while self.next <= self.last {
            let candidate = self.next;
            self.next = candidate.checked_add(1)?;
            if !self.taken.contains(&candidate) {
                return Some(candidate);
            }
        }
        None
    }
}

impl Allocator {
    /// An allocator for these pools given the addresses in use (any order, any pool).
    pub fn new(
        v4_pool: Ipv4Net,
        v6_pool: Ipv6Net,
        v4_used: impl IntoIterator<Item = Ipv4Addr>,
        v6_used: impl IntoIterator<Item = Ipv6Addr>,
    ) -> Allocator {
        Allocator {
            v4: Run::new(
                Some(u128::from(u32::from(v4_pool.network())) + 2),
                u128::from(u32::from(v4_pool.broadcast())).checked_sub(1),
                v4_used.into_iter().map(|a| u128::from(u32::from(a))),
            ),
            v6: Run::new(
                u128::from(v6_pool.network()).checked_add(2),
                Some(u128::from(v6_pool.broadcast())),
                v6_used.into_iter().map(u128::from),
            ),
        }
    }

    /// The lowest free IPv4 address, now taken.
    pub fn take_v4(&mut self) -> Option<Ipv4Addr> {
        self.v4
            .take()
            .and_then(|v| u32::try_from(v).ok().map(Ipv4Addr::from))
    }

    /// The lowest free IPv6 address, now taken.
    pub fn take_v6(&mut self) -> Option<Ipv6Addr> {
        self.v6.take().map(Ipv6Addr::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let pool: Ipv4Net = "100.96.0.0/30".parse().unwrap();
        assert_eq!(lowest_free_v4(pool, []), Some(v4("100.96.0.2")));
        assert_eq!(lowest_free_v4(pool, [v4("100.96.0.2")]), None);
        let pool: Ipv4Net = "100.96.0.0/29".parse().unwrap();
        let used = [
            "100.96.0.2",
            "100.96.0.3",
            "100.96.0.4",
            "100.96.0.5",
            "100.96.0.6",
        ];
        assert_eq!(lowest_free_v4(pool, used.map(v4)), None);
    }

    #[test]
    fn fills_the_lowest_gap_and_ignores_other_pools() {
        let pool: Ipv4Net = "100.96.0.0/12".parse().unwrap();
        let used = [
            "100.96.0.4",
            "100.96.0.2",
            "10.0.0.3",
            "100.96.0.3",
            "100.96.0.6",
        ];
        assert_eq!(lowest_free_v4(pool, used.map(v4)), Some(v4("100.96.0.5")));
    }

    #[test]
    fn ipv6_skips_network_and_gateway_only() {
        let pool: Ipv6Net = "fd77:6761:7465::/126".parse().unwrap();
        let a = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(lowest_free_v6(pool, []), Some(a("fd77:6761:7465::2")));
        assert_eq!(
            lowest_free_v6(pool, [a("fd77:6761:7465::2")]),
            Some(a("fd77:6761:7465::3"))
        );
        assert_eq!(
            lowest_free_v6(pool, [a("fd77:6761:7465::2"), a("fd77:6761:7465::3")]),
            None
        );
    }

    proptest! {
        #[test]
        fn the_allocator_answers_as_lowest_free_after_each_allocation(
            used in proptest::collection::vec(0u32..64, 0..70),
        ) {
            let pool: Ipv4Net = "100.96.0.0/26".parse().unwrap();
            let pool6: Ipv6Net = "fd77:6761:7465::/122".parse().unwrap();
            let base = u32::from(pool.network());
            let base6 = u128::from(pool6.network());
            let mut used: Vec<Ipv4Addr> = used.into_iter().map(|o| Ipv4Addr::from(base + o)).collect();
            let mut used6: Vec<Ipv6Addr> = used.iter().map(|a| Ipv6Addr::from(base6 + u128::from(u32::from(*a) - base))).collect();
            let mut alloc = Allocator::new(pool, pool6, used.clone(), used6.clone());
            loop {
                let want = lowest_free_v4(pool, used.iter().copied());
                let got = alloc.take_v4();
                prop_assert_eq!(got, want);
                let want6 = lowest_free_v6(pool6, used6.iter().copied());
                prop_assert_eq!(alloc.take_v6(), want6);
                match (got, want6) {
                    (Some(a), Some(b)) => {
                        used.push(a);
                        used6.push(b);
                    }
                    _ => break,
                }
            }
        }

        #[test]
        fn result_is_free_in_pool_and_minimal(used in proptest::collection::vec(0u32..64, 0..70)) {
            let pool: Ipv4Net = "100.96.0.0/26".parse().unwrap();
            let base = u32::from(pool.network());
            let used: Vec<Ipv4Addr> = used.into_iter().map(|o| Ipv4Addr::from(base + o)).collect();
            match lowest_free_v4(pool, used.iter().copied()) {
                Some(got) => {
                    let off = u32::from(got) - base;
                    prop_assert!((2..63).contains(&off));
                    prop_assert!(!used.contains(&got));
                    for lower in 2..off {
                        prop_assert!(used.contains(&Ipv4Addr::from(base + lower)));
                    }
                }
                None => {
                    for off in 2..63 {
                        prop_assert!(used.contains(&Ipv4Addr::from(base + off)));
                    }
                }
            }
        }
    }
}

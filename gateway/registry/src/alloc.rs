//! Tunnel address allocation: the lowest address of the pool that no device row holds.
//!
//! The pool's network address and the gateway's own address (the first host) are never handed
//! out, nor IPv4's broadcast address. Revoked devices keep their rows and therefore their
//! addresses, so an address is only reused once its device has been deleted: packets still in
//! flight, logs and policy decisions never confuse an old device with a new one.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Lowest free IPv4 address in `pool`, given the addresses in use (any order, any pool).
pub fn lowest_free_v4(pool: Ipv4Net, used: impl IntoIterator<Item = Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u128::from(u32::from(pool.network())) + 2;
    let last = u128::from(u32::from(pool.broadcast())).checked_sub(1)?;
    let used = used.into_iter().map(|a| u128::from(u32::from(a)));
    lowest_free(first, last, used).and_then(|v| u32::try_from(v).ok().map(Ipv4Addr::from))
}

/// Lowest free IPv6 address in `pool`, given the addresses in use (any order, any pool).
pub fn lowest_free_v6(pool: Ipv6Net, used: impl IntoIterator<Item = Ipv6Addr>) -> Option<Ipv6Addr> {
    let first = u128::from(pool.network()).checked_add(2)?;
    let last = u128::from(pool.broadcast());
    let used = used.into_iter().map(u128::from);
    lowest_free(first, last, used).map(Ipv6Addr::from)
}

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

//! Name memory: which addresses the resolver answered to which client for which name, so a later
//! flow to that address can carry `net.fqdn.host` / `net.fqdn.domains`. Bounded by entry count
//! (oldest first out), entries expire with the answer's TTL (kept at least [`MIN_MEMORY`] because
//! clients connect after the answer, and TTL-0 answers are common).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::policy::ClientKey;

/// Shortest time an answered address is remembered.
pub const MIN_MEMORY: Duration = Duration::from_secs(60);
/// Longest time an answered address is remembered.
pub const MAX_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// The names behind one answered address: the queried host and every name of its CNAME chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The name the client asked for (lowercase, no trailing dot).
    pub host: Arc<str>,
    /// The queried name followed by the CNAME targets that led to the address.
    pub domains: Arc<[Arc<str>]>,
}

struct Entry {
    names: Names,
    expires: Instant,
    seq: u64,
}

/// Bounded map (client, address) -> names.
pub struct NameMemory {
    map: HashMap<(ClientKey, IpAddr), Entry>,
    order: VecDeque<((ClientKey, IpAddr), u64)>,
    capacity: usize,
    seq: u64,
}

impl NameMemory {
    /// A memory of at most `capacity` (client, address) pairs.
    pub fn new(capacity: usize) -> Self {
        NameMemory {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            seq: 0,
        }
    }

    /// Pairs held (expired ones included until touched or evicted).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remembers that `ip` was answered to `client` for `names`, for `ttl` seconds (clamped).
    pub fn remember(
        &mut self,
        client: &ClientKey,
        ip: IpAddr,
        names: &Names,
        ttl: u32,
        now: Instant,
    ) {
        let keep = Duration::from_secs(u64::from(ttl)).clamp(MIN_MEMORY, MAX_MEMORY);
        self.seq += 1;
        let key = (client.clone(), ip);
        self.map.insert(
            key.clone(),
            Entry {
                names: names.clone(),
                expires: now + keep,
                seq: self.seq,
            },
        );
        self.order.push_back((key, self.seq));
        while self.map.len() > self.capacity || self.order.len() > self.capacity * 2 {
            let Some((key, seq)) = self.order.pop_front() else {
                break;
            };
            // Only the newest record of a key owns it; older ring entries are stale.
            if self.map.get(&key).is_some_and(|e| e.seq == seq) {
                self.map.remove(&key);
            }
        }
    }

    /// The names `client` resolved to reach `ip`, if answered and not expired.
    pub fn names_for(&self, client: &ClientKey, ip: IpAddr, now: Instant) -> Option<&Names> {
        // Borrowed lookup would need a custom key type; the clone is one Arc bump.
        let e = self.map.get(&(client.clone(), ip))?;
        (e.expires > now).then_some(&e.names)
    }

    /// Drops expired entries; call from the shell's periodic tick.
    pub fn purge(&mut self, now: Instant) {
        self.map.retain(|_, e| e.expires > now);
        let map = &self.map;
        self.order
            .retain(|(k, seq)| map.get(k).is_some_and(|e| e.seq == *seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(host: &str) -> Names {
        Names {
            host: Arc::from(host),
            domains: Arc::from(vec![Arc::from(host)]),
        }
    }

    #[test]
    fn scoped_by_client_and_expiring() {
        let t0 = crate::test_epoch();
        let mut m = NameMemory::new(10);
        let alice = ClientKey::device("dev-a");
        let bob = ClientKey::device("dev-b");
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        m.remember(&alice, ip, &names("web.example"), 300, t0);
        assert_eq!(&*m.names_for(&alice, ip, t0).unwrap().host, "web.example");
        assert!(m.names_for(&bob, ip, t0).is_none());
        assert!(m
            .names_for(&alice, ip, t0 + Duration::from_secs(299))
            .is_some());
        assert!(m
            .names_for(&alice, ip, t0 + Duration::from_secs(300))
            .is_none());
        // TTL 0 is still remembered for the minimum.
        m.remember(&bob, ip, &names("zero.example"), 0, t0);
        assert!(m
            .names_for(&bob, ip, t0 + Duration::from_secs(59))
            .is_some());
        m.purge(t0 + Duration::from_secs(400));
        assert!(m.is_empty());
    }

    #[test]
    fn bounded_oldest_out() {
        let t0 = crate::test_epoch();
        let mut m = NameMemory::new(4);
        let c = ClientKey::ip("100.96.0.2".parse().unwrap());
        for i in 0..100u8 {
            m.remember(&c, IpAddr::from([203, 0, 113, i]), &names("x"), 300, t0);
            // Refreshing one key repeatedly must not grow the ring without bound.
            m.remember(&c, IpAddr::from([203, 0, 113, 0]), &names("x"), 300, t0);
            assert!(m.len() <= 4);
            assert!(m.order.len() <= 8);
        }
        assert!(m
            .names_for(&c, IpAddr::from([203, 0, 113, 99]), t0)
            .is_some());
        assert!(m
            .names_for(&c, IpAddr::from([203, 0, 113, 1]), t0)
            .is_none());
    }
}

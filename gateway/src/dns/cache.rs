//! Answer cache: positive answers for their smallest TTL, negative ones (NXDOMAIN / NODATA) for the
//! SOA's negative TTL (RFC 2308 §5), bounded by entry count with CLOCK (second-chance) eviction so a
//! hit costs no allocation. Time comes in as `now`.

use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Cache key: lowercased name and type (hickory's `Name` hashes case-insensitively, we lowercase
/// anyway so the stored owner names are canonical).
pub type CacheKey = (Name, RecordType);

/// A cached answer as stored; TTLs are the ones received.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    /// NOERROR or NXDOMAIN.
    pub rcode: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of a negative answer).
    pub authority: Vec<Record>,
    stored: Instant,
    expires: Instant,
}

impl CachedAnswer {
    /// Seconds left before expiry, rounded down.
    pub fn remaining(&self, now: Instant) -> u32 {
        secs(self.expires.saturating_duration_since(now))
    }

    /// Seconds since the answer was stored, used to decrement record TTLs.
    pub fn age(&self, now: Instant) -> u32 {
        secs(now.saturating_duration_since(self.stored))
    }
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

struct Slot {
    answer: CachedAnswer,
    referenced: bool,
}

/// Bounded TTL cache of upstream answers.
pub struct Cache {
    map: HashMap<CacheKey, Slot>,
    ring: VecDeque<CacheKey>,
    capacity: usize,
    max_ttl: u32,
    max_negative_ttl: u32,
}

impl Cache {
    /// A cache of at most `capacity` answers; TTLs are capped at `max_ttl` (negative ones at
    /// `max_negative_ttl`) so a bad upstream cannot pin an answer for days.
    pub fn new(capacity: usize, max_ttl: u32, max_negative_ttl: u32) -> Self {
        Cache {
            map: HashMap::with_capacity(capacity.min(1 << 16)),
            ring: VecDeque::new(),
            capacity: capacity.max(1),
            max_ttl,
            max_negative_ttl,
        }
    }

    /// Number of entries held (expired ones included until touched or evicted).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The live answer for `key`, or `None` (an expired one is dropped).
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Option<&CachedAnswer> {
        let expired = match self.map.get_mut(key) {
            None => return None,
            Some(slot) => {
                slot.referenced = true;
                slot.answer.expires <= now
            }
        };
        if expired {
            // The ring still names the key; eviction skips names no longer in the map.
            self.map.remove(key);
            return None;
        }
        self.map.get(key).map(|s| &s.answer)
    }

    /// Stores an upstream answer if it is cacheable; returns the TTL it was stored with.
    pub fn insert(
        &mut self,
        key: CacheKey,
        rcode: ResponseCode,
        answers: &[Record],
        authority: &[Record],
        now: Instant,
    ) -> Option<u32> {
        let ttl = self.ttl_for(&key, rcode, answers, authority)?;
        if ttl == 0 {
            return None;
        }
        let answer = CachedAnswer {
            rcode,
            answers: answers.to_vec(),
            authority: authority.to_vec(),
            stored: now,
            expires: now + Duration::from_secs(u64::from(ttl)),
        };
        let slot = Slot {
            answer,
            referenced: false,
        };
        if self.map.insert(key.clone(), slot).is_none() {
            self.ring.push_back(key);
            self.evict();
        }
        Some(ttl)
    }

    fn ttl_for(
        &self,
        key: &CacheKey,
        rcode: ResponseCode,
        answers: &[Record],
        authority: &[Record],
    ) -> Option<u32> {
        let has_answer = answers
            .iter()
            .any(|r| r.record_type() == key.1 || r.record_type() == RecordType::CNAME);
        match rcode {
            ResponseCode::NoError if has_answer => {
                let min = answers.iter().map(Record::ttl).min()?;
                Some(min.min(self.max_ttl))
            }
            // NODATA or NXDOMAIN: cacheable only with an SOA (RFC 2308 §5).
            ResponseCode::NoError | ResponseCode::NXDomain => {
                let soa = authority.iter().find_map(|r| match r.data() {
                    RData::SOA(soa) => Some(r.ttl().min(soa.minimum())),
                    _ => None,
                })?;
                Some(soa.min(self.max_negative_ttl))
            }
            _ => None,
        }
    }

    fn evict(&mut self) {
        // Bounded: each key is examined at most twice (once to clear its bit, once to evict).
        let mut budget = self.ring.len() * 2 + 1;
        while self.map.len() > self.capacity && budget > 0 {
            budget -= 1;
            let Some(key) = self.ring.pop_front() else {
                break;
            };
            match self.map.get_mut(&key) {
                None => {}
                Some(slot) if slot.referenced => {
                    slot.referenced = false;
                    self.ring.push_back(key);
                }
                Some(_) => {
                    self.map.remove(&key);
                }
            }
        }
        // Keys dropped on expiry leave stale ring entries; compact when they dominate.
        if self.ring.len() > self.capacity * 2 {
            let map = &self.map;
            self.ring.retain(|k| map.contains_key(k));
        }
    }
}

/// Values by (lowercase name text, type), for the resolver's fast path. Bounded: when full it
/// starts over, which costs one full-path answer per name to refill.
pub struct ReplayCache<V> {
    map: FxHashMap<Box<[u8]>, V>,
    key: Vec<u8>,
    capacity: usize,
}

impl<V> ReplayCache<V> {
    /// An empty cache of at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            map: FxHashMap::default(),
            key: Vec::with_capacity(258),
            capacity: capacity.max(1),
        }
    }

    fn key_of(&mut self, name: &str, qtype: u16) -> &[u8] {
        self.key.clear();
        self.key.extend_from_slice(name.as_bytes());
        self.key.extend_from_slice(&qtype.to_be_bytes());
        &self.key
    }

    /// The entry for `name`/`qtype`.
    pub fn get(&mut self, name: &str, qtype: u16) -> Option<&V> {
        self.key_of(name, qtype);
        self.map.get(self.key.as_slice())
    }

    /// Drops the entry for `name`/`qtype`.
    pub fn remove(&mut self, name: &str, qtype: u16) {
        self.key_of(name, qtype);
        self.map.remove(self.key.as_slice());
    }

    /// Stores `value` for `name`/`qtype`.
    pub fn insert(&mut self, name: &str, qtype: u16, value: V) {
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        let key: Box<[u8]> = self.key_of(name, qtype).into();
        self.map.insert(key, value);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn a(n: &str, ttl: u32) -> Record {
        Record::from_rdata(name(n), ttl, RData::A(A::new(192, 0, 2, 7)))
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let rdata = SOA::new(
            name("ns.example."),
            name("host.example."),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        Record::from_rdata(name("example."), ttl, RData::SOA(rdata))
    }

    #[test]
    fn positive_entry_expires_after_smallest_ttl() {
        let t0 = crate::dns::test_epoch();
        let mut c = Cache::new(10, 86400, 3600);
        let key = (name("a.example."), RecordType::A);
        let ans = [a("a.example.", 30), a("a.example.", 20)];
        assert_eq!(
            c.insert(key.clone(), ResponseCode::NoError, &ans, &[], t0),
            Some(20)
        );
        let hit = c.get(&key, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(hit.age(t0 + Duration::from_secs(5)), 5);
        assert!(c.get(&key, t0 + Duration::from_secs(20)).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn negative_ttl_is_min_of_soa_ttl_and_minimum() {
        let t0 = crate::dns::test_epoch();
        let mut c = Cache::new(10, 86400, 3600);
        let key = (name("nx.example."), RecordType::A);
        let ttl = c.insert(
            key.clone(),
            ResponseCode::NXDomain,
            &[],
            &[soa(300, 60)],
            t0,
        );
        assert_eq!(ttl, Some(60));
        let key2 = (name("nodata.example."), RecordType::AAAA);
        assert_eq!(
            c.insert(key2, ResponseCode::NoError, &[], &[soa(30, 60)], t0),
            Some(30)
        );
        // Without an SOA a negative answer is not cached.
        let key3 = (name("bare.example."), RecordType::A);
        assert_eq!(c.insert(key3, ResponseCode::NXDomain, &[], &[], t0), None);
        assert_eq!(
            c.insert(key.clone(), ResponseCode::ServFail, &[], &[], t0),
            None
        );
    }

    #[test]
    fn bounded_and_keeps_recently_used() {
        let t0 = crate::dns::test_epoch();
        let mut c = Cache::new(3, 86400, 3600);
        let keys: Vec<CacheKey> = (0..3)
            .map(|i| (name(&format!("n{i}.example.")), RecordType::A))
            .collect();
        for k in &keys {
            c.insert(k.clone(), ResponseCode::NoError, &[a("x.", 100)], &[], t0);
        }
        assert!(c.get(&keys[0], t0).is_some());
        let extra = (name("n9.example."), RecordType::A);
        c.insert(
            extra.clone(),
            ResponseCode::NoError,
            &[a("x.", 100)],
            &[],
            t0,
        );
        assert_eq!(c.len(), 3);
        assert!(c.get(&keys[0], t0).is_some(), "recently used survives");
        assert!(c.get(&keys[1], t0).is_none(), "oldest unused is evicted");
        assert!(c.get(&extra, t0).is_some());
    }

    #[test]
    fn many_inserts_stay_bounded() {
        let t0 = crate::dns::test_epoch();
        let mut c = Cache::new(50, 86400, 3600);
        for i in 0..1000u32 {
            let k = (name(&format!("n{i}.example.")), RecordType::A);
            c.insert(
                k.clone(),
                ResponseCode::NoError,
                &[a("x.", 1 + i % 3)],
                &[],
                t0,
            );
            c.get(&k, t0 + Duration::from_secs(u64::from(i % 5)));
            assert!(c.len() <= 50);
            assert!(c.ring.len() <= 101);
        }
    }
}

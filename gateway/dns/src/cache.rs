//! Answer cache: positive answers for their smallest TTL, negative ones (NXDOMAIN / NODATA) for the
//! SOA's negative TTL (RFC 2308 §5), bounded by entry count with CLOCK (second-chance) eviction so a
//! hit costs no allocation. Each entry may also keep the answer as last sent, for the fast path to
//! replay; it lives and dies with the entry. Time comes in as `now`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hashbrown::hash_map::EntryRef;
use hashbrown::HashMap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, Record, RecordType};
use rustc_hash::FxBuildHasher;

use super::memory::Names;
use super::wire::WireAnswer;

/// An answered address and its TTL.
pub type Address = (IpAddr, u32);

/// An answer as sent, and the addresses it teaches the name memory each time it is replayed.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The sent bytes.
    pub wire: WireAnswer,
    /// The names and addresses behind it, if it has addresses.
    pub learned: Option<(Names, Box<[Address]>)>,
}

/// A cached answer as stored; TTLs are the ones received.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    /// NOERROR or NXDOMAIN.
    pub rcode: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of a negative answer).
    pub authority: Vec<Record>,
    /// The answer as last sent, when it may be replayed.
    pub replay: Option<Replay>,
    stored: Instant,
    expires: Instant,
}

impl CachedAnswer {
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

/// Bounded TTL cache of upstream answers, keyed by lowercase name (no trailing dot) and type.
pub struct Cache {
    /// Keys are the name's bytes followed by the type, so a lookup borrows a scratch buffer
    /// instead of allocating.
    map: HashMap<Box<[u8]>, Slot, FxBuildHasher>,
    ring: VecDeque<Box<[u8]>>,
    key: Vec<u8>,
    capacity: usize,
    max_ttl: u32,
    max_negative_ttl: u32,
}

impl Cache {
    /// A cache of at most `capacity` answers; TTLs are capped at `max_ttl` (negative ones at
    /// `max_negative_ttl`) so a bad upstream cannot pin an answer for days.
    pub fn new(capacity: usize, max_ttl: u32, max_negative_ttl: u32) -> Self {
        Cache {
            map: HashMap::with_capacity_and_hasher(capacity.min(1 << 16), FxBuildHasher),
            ring: VecDeque::new(),
            key: Vec::with_capacity(258),
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

    fn key_of(&mut self, name: &str, qtype: RecordType) {
        self.key.clear();
        self.key.extend_from_slice(name.as_bytes());
        self.key.extend_from_slice(&u16::from(qtype).to_be_bytes());
    }

    /// The live answer for `name` (lowercase, no trailing dot) and `qtype`, or `None` (an
    /// expired one is dropped).
    pub fn get(&mut self, name: &str, qtype: RecordType, now: Instant) -> Option<&CachedAnswer> {
        self.key_of(name, qtype);
        // One probe of the table: this is on the fast path of every cached answer.
        match self.map.entry_ref(self.key.as_slice()) {
            EntryRef::Vacant(_) => None,
            EntryRef::Occupied(e) if e.get().answer.expires <= now => {
                // The ring still names the key; eviction skips names no longer in the map.
                e.remove();
                None
            }
            EntryRef::Occupied(e) => {
                let slot = e.into_mut();
                slot.referenced = true;
                Some(&slot.answer)
            }
        }
    }

    /// Keeps `replay` with the entry for `name`/`qtype`, if there is one.
    pub fn attach_replay(&mut self, name: &str, qtype: RecordType, replay: Replay) {
        self.key_of(name, qtype);
        if let Some(slot) = self.map.get_mut(self.key.as_slice()) {
            slot.answer.replay = Some(replay);
        }
    }

    /// Stores an upstream answer for `name`/`qtype` if it is cacheable; returns the TTL it was
    /// stored with.
    pub fn insert(
        &mut self,
        name: &str,
        qtype: RecordType,
        rcode: ResponseCode,
        answers: &[Record],
        authority: &[Record],
        now: Instant,
    ) -> Option<u32> {
        let ttl = self.ttl_for(qtype, rcode, answers, authority)?;
        if ttl == 0 {
            return None;
        }
        let answer = CachedAnswer {
            rcode,
            answers: answers.to_vec(),
            authority: authority.to_vec(),
            replay: None,
            stored: now,
            expires: now + Duration::from_secs(u64::from(ttl)),
        };
        let slot = Slot {
            answer,
            referenced: false,
        };
        self.key_of(name, qtype);
        let key: Box<[u8]> = self.key.as_slice().into();
        if self.map.insert(key.clone(), slot).is_none() {
            self.ring.push_back(key);
            self.evict();
        }
        Some(ttl)
    }

    fn ttl_for(
        &self,
        qtype: RecordType,
        rcode: ResponseCode,
        answers: &[Record],
        authority: &[Record],
    ) -> Option<u32> {
        let has_answer = answers
            .iter()
            .any(|r| r.record_type() == qtype || r.record_type() == RecordType::CNAME);
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
            match self.map.get_mut(key.as_ref()) {
                None => {}
                Some(slot) if slot.referenced => {
                    slot.referenced = false;
                    self.ring.push_back(key);
                }
                Some(_) => {
                    self.map.remove(key.as_ref());
                }
            }
        }
        // Keys dropped on expiry leave stale ring entries; compact when they dominate.
        if self.ring.len() > self.capacity * 2 {
            let map = &self.map;
            self.ring.retain(|k| map.contains_key(k.as_ref()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;

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
        let t0 = crate::test_epoch();
        let mut c = Cache::new(10, 86400, 3600);
        let (key, a_) = ("a.example", RecordType::A);
        let ans = [a("a.example.", 30), a("a.example.", 20)];
        assert_eq!(
            c.insert(key, a_, ResponseCode::NoError, &ans, &[], t0),
            Some(20)
        );
        let hit = c.get(key, a_, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(hit.age(t0 + Duration::from_secs(5)), 5);
        assert!(c.get(key, a_, t0 + Duration::from_secs(20)).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn negative_ttl_is_min_of_soa_ttl_and_minimum() {
        let t0 = crate::test_epoch();
        let mut c = Cache::new(10, 86400, 3600);
        let key = "nx.example";
        let ttl = c.insert(
            key,
            RecordType::A,
            ResponseCode::NXDomain,
            &[],
            &[soa(300, 60)],
            t0,
        );
        assert_eq!(ttl, Some(60));
        assert_eq!(
            c.insert(
                "nodata.example",
                RecordType::AAAA,
                ResponseCode::NoError,
                &[],
                &[soa(30, 60)],
                t0
            ),
            Some(30)
        );
        // Without an SOA a negative answer is not cached.
        assert_eq!(
            c.insert(
                "bare.example",
                RecordType::A,
                ResponseCode::NXDomain,
                &[],
                &[],
                t0
            ),
            None
        );
        assert_eq!(
            c.insert(key, RecordType::A, ResponseCode::ServFail, &[], &[], t0),
            None
        );
    }

    #[test]
    fn bounded_and_keeps_recently_used() {
        let t0 = crate::test_epoch();
        let mut c = Cache::new(3, 86400, 3600);
        let keys: Vec<String> = (0..3).map(|i| format!("n{i}.example")).collect();
        let ok = ResponseCode::NoError;
        for k in &keys {
            c.insert(k, RecordType::A, ok, &[a("x.", 100)], &[], t0);
        }
        assert!(c.get(&keys[0], RecordType::A, t0).is_some());
        let extra = "n9.example";
        c.insert(extra, RecordType::A, ok, &[a("x.", 100)], &[], t0);
        assert_eq!(c.len(), 3);
        assert!(
            c.get(&keys[0], RecordType::A, t0).is_some(),
            "recently used survives"
        );
        assert!(
            c.get(&keys[1], RecordType::A, t0).is_none(),
            "oldest unused is evicted"
        );
        assert!(c.get(extra, RecordType::A, t0).is_some());
    }

    #[test]
    fn many_inserts_stay_bounded() {
        let t0 = crate::test_epoch();
        let mut c = Cache::new(50, 86400, 3600);
        for i in 0..1000u32 {
            let k = format!("n{i}.example");
            c.insert(
                &k,
                RecordType::A,
                ResponseCode::NoError,
                &[a("x.", 1 + i % 3)],
                &[],
                t0,
            );
            c.get(
                &k,
                RecordType::A,
                t0 + Duration::from_secs(u64::from(i % 5)),
            );
            assert!(c.len() <= 50);
            assert!(c.ring.len() <= 101);
        }
    }

    #[test]
    fn a_replay_lives_and_dies_with_its_entry() {
        let t0 = crate::test_epoch();
        let mut c = Cache::new(10, 86400, 3600);
        let replay = |sent| Replay {
            wire: WireAnswer::capture(
                &[0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1],
                sent,
            )
            .unwrap(),
            learned: None,
        };
        // No entry, nothing to attach to.
        c.attach_replay("a.example", RecordType::A, replay(t0));
        assert!(c.is_empty());
        let store = |c: &mut Cache| {
            let ok = ResponseCode::NoError;
            c.insert(
                "a.example",
                RecordType::A,
                ok,
                &[a("a.example.", 60)],
                &[],
                t0,
            )
        };
        store(&mut c);
        c.attach_replay("a.example", RecordType::A, replay(t0));
        let live = |c: &mut Cache, s| {
            c.get("a.example", RecordType::A, t0 + Duration::from_secs(s))
                .is_some_and(|e| e.replay.is_some())
        };
        assert!(live(&mut c, 59));
        assert!(!live(&mut c, 60));
        // A new answer for the name starts without the old bytes.
        store(&mut c);
        assert!(!live(&mut c, 1));
    }
}

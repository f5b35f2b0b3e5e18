//! The MAC1s of recently opened handshake initiations, so an exact replay is dropped before any
//! X25519 work, sans I/O.
//!
//! WireGuard initiators never send the same initiation twice: every retry has a new ephemeral
//! key, timestamp and sender index, so its MAC1 (over all of those) is new. A datagram whose
//! MAC1 equals one this endpoint already opened is a replay (or a network duplicate), which
//! boringtun would refuse by its timestamp only after the Diffie-Hellman that reads it. A
//! forged datagram carrying a remembered MAC1 over other bytes would fail its MAC1 check anyway,
//! so the bytes are not compared.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;

/// MAC1s remembered: the oldest is forgotten first. Initiations reach the Diffie-Hellman at
/// about `HANDSHAKE_RATE_LIMIT` (100/s) plus 20/s per cookie-proven source, so 4,096 hold the
/// last 40 s at the first figure; a replay older than that costs what a fresh initiation
/// costs, no more. About 150 KB once full (16-byte entries in the ring and the set).
pub const CAPACITY: usize = 4096;

/// The last [`CAPACITY`] initiation MAC1s, oldest first out.
#[derive(Debug)]
pub struct RecentInitiations {
    ring: Vec<[u8; 16]>,
    /// Where the next MAC1 goes in `ring` once it is full.
    next: usize,
    /// Randomly keyed: the MAC1s come from remote parties.
    set: HashSet<[u8; 16], RandomState>,
    capacity: usize,
}

impl Default for RecentInitiations {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl RecentInitiations {
    /// Remembers at most `capacity` (at least 1) MAC1s; memory grows as they come.
    pub fn with_capacity(capacity: usize) -> Self {
        RecentInitiations {
            ring: Vec::new(),
            next: 0,
            set: HashSet::default(),
            capacity: capacity.max(1),
        }
    }

    /// Whether `mac1` was remembered and not yet forgotten.
    pub fn contains(&self, mac1: &[u8; 16]) -> bool {
        self.set.contains(mac1)
    }

    /// Remembers `mac1`, forgetting the oldest when full. Returns false when it was already there.
    pub fn insert(&mut self, mac1: [u8; 16]) -> bool {
        if !self.set.insert(mac1) {
            return false;
        }
        if self.ring.len() < self.capacity {
            self.ring.push(mac1);
        } else if let Some(slot) = self.ring.get_mut(self.next) {
            let old = std::mem::replace(slot, mac1);
            self.set.remove(&old);
            self.next = (self.next + 1) % self.capacity;
        }
        true
    }

    /// MAC1s remembered now.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> [u8; 16] {
        let mut m = [0u8; 16];
        m[..4].copy_from_slice(&n.to_le_bytes());
        m
    }

    #[test]
    fn a_remembered_mac1_is_found_and_a_new_one_is_not() {
        let mut r = RecentInitiations::default();
        assert!(r.is_empty());
        assert!(r.insert(mac(1)));
        assert!(r.contains(&mac(1)));
        assert!(!r.contains(&mac(2)));
        assert!(
            !r.insert(mac(1)),
            "a second insert of the same MAC1 is no new entry"
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_oldest_is_forgotten_first_and_the_size_stays_bounded() {
        let mut r = RecentInitiations::with_capacity(3);
        for n in 0..3 {
            r.insert(mac(n));
        }
        r.insert(mac(3));
        assert!(!r.contains(&mac(0)));
        assert!((1..4).all(|n| r.contains(&mac(n))));
        for n in 4..1000 {
            r.insert(mac(n));
        }
        assert_eq!(r.len(), 3);
        assert!((997..1000).all(|n| r.contains(&mac(n))));
        // A forgotten MAC1 can be remembered again.
        assert!(r.insert(mac(0)));
        assert!(r.contains(&mac(0)));
        assert!(!r.contains(&mac(997)));
    }
}

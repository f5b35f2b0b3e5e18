//! A set of strings packed into one buffer: lists of a million domains are the largest thing a
//! gateway holds, and a set of boxed strings spends more on pointers and allocator headers than
//! on the names themselves.
//!
//! The strings sit back to back in `bytes`; the hash table holds only (offset, length) pairs, so
//! an entry costs its bytes plus 8 bytes of table slot, with no allocation per string.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

/// An immutable set of strings with compact storage.
#[derive(Default)]
pub struct StringSet {
    bytes: Vec<u8>,
    table: HashTable<(u32, u32)>,
}

impl std::fmt::Debug for StringSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StringSet")
            .field("len", &self.table.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

fn hash(s: &[u8]) -> u64 {
    FxBuildHasher.hash_one(s)
}

impl StringSet {
    /// A set of `items` (duplicates kept once). Strings beyond a 4 GiB total are dropped, which
    /// no list file comes near.
    pub fn new<I, S>(items: I) -> StringSet
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let items = items.into_iter();
        let mut set = StringSet::with_capacity(items.size_hint().0);
        for item in items {
            set.insert(item.as_ref());
        }
        set.finish()
    }

    /// An empty set with room for `n` strings, to fill with [`StringSet::insert`].
    pub fn with_capacity(n: usize) -> StringSet {
        StringSet {
            bytes: Vec::new(),
            table: HashTable::with_capacity(n),
        }
    }

    /// Releases spare capacity once every string is in.
    pub fn finish(mut self) -> StringSet {
        self.bytes.shrink_to_fit();
        let bytes = &self.bytes;
        self.table.shrink_to_fit(|&(o, l)| hash(slice(bytes, o, l)));
        self
    }

    /// Adds `s` (no-op when present).
    pub fn insert(&mut self, s: &str) {
        let (Ok(offset), Ok(len)) = (u32::try_from(self.bytes.len()), u32::try_from(s.len()))
        else {
            return;
        };
        if offset.checked_add(len).is_none() {
            return;
        }
        let h = hash(s.as_bytes());
        let bytes = &self.bytes;
        if self
            .table
            .find(h, |&(o, l)| slice(bytes, o, l) == s.as_bytes())
            .is_some()
        {
            return;
        }
        self.bytes.extend_from_slice(s.as_bytes());
        let bytes = &self.bytes;
        self.table
            .insert_unique(h, (offset, len), |&(o, l)| hash(slice(bytes, o, l)));
    }

    /// True when `s` is in the set.
    #[inline]
    pub fn contains(&self, s: &str) -> bool {
        let h = hash(s.as_bytes());
        self.table
            .find(h, |&(o, l)| slice(&self.bytes, o, l) == s.as_bytes())
            .is_some()
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when the set holds nothing.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[inline]
fn slice(bytes: &[u8], offset: u32, len: u32) -> &[u8] {
    let start = offset as usize;
    bytes.get(start..start + len as usize).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn membership_and_duplicates() {
        let set = StringSet::new(["a.example", "b.example", "a.example", ""]);
        assert_eq!(set.len(), 3);
        assert!(set.contains("a.example") && set.contains("b.example") && set.contains(""));
        assert!(!set.contains("c.example") && !set.contains("a.exampl"));
        assert!(StringSet::default().is_empty());
    }

    proptest! {
        #[test]
        fn agrees_with_a_hash_set(items in proptest::collection::vec("[a-c.]{0,6}", 0..60),
                                  probes in proptest::collection::vec("[a-c.]{0,6}", 0..30)) {
            let set = StringSet::new(&items);
            let reference: HashSet<&String> = items.iter().collect();
            prop_assert_eq!(set.len(), reference.len());
            for p in probes.iter().chain(items.iter()) {
                prop_assert_eq!(set.contains(p), reference.contains(p));
            }
        }
    }
}

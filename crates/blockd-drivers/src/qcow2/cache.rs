//! A bounded write-back cache of metadata tables (L2 tables, refcount
//! blocks), keyed by their offset in the image file.
//!
//! The cache only keeps bytes and dirty bits; *when* a dirty table may be
//! written (the ordering that keeps the image consistent across a crash)
//! is decided by its owner, which writes tables out through
//! [`TableCache::dirty_offsets`] and [`TableCache::mark_clean`] and picks
//! eviction victims with [`TableCache::victim`].

use std::collections::{BTreeMap, HashMap};

struct Entry {
    data: Vec<u8>,
    dirty: bool,
    stamp: u64,
}

/// An LRU cache of tables.
pub struct TableCache {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    /// Last-use stamp -> offset, oldest first.
    lru: BTreeMap<u64, u64>,
    clock: u64,
    dirty: usize,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(2),
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            dirty: 0,
        }
    }

    /// Changes how many tables the cache may hold (at least 2); tables
    /// beyond it are evicted as new ones come in.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(2);
    }

    /// Number of tables held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is full (a new table needs a victim first).
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.dirty > 0
    }

    /// Whether the table at `off` is cached.
    pub fn contains(&self, off: u64) -> bool {
        self.entries.contains_key(&off)
    }

    fn touch(&mut self, off: u64) {
        if let Some(e) = self.entries.get_mut(&off) {
            self.lru.remove(&e.stamp);
            self.clock += 1;
            e.stamp = self.clock;
            self.lru.insert(self.clock, off);
        }
    }

    /// Inserts a table (the caller made room first). `dirty`: it differs
    /// from what the file holds.
    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        if let Some(old) = self.entries.remove(&off) {
            self.lru.remove(&old.stamp);
            if old.dirty {
                self.dirty -= 1;
            }
        }
        self.clock += 1;
        if dirty {
            self.dirty += 1;
        }
        self.entries.insert(
            off,
            Entry {
                data,
                dirty,
                stamp: self.clock,
            },
        );
        self.lru.insert(self.clock, off);
    }

    /// The table at `off`, marking it used.
    pub fn get(&mut self, off: u64) -> Option<&[u8]> {
        self.touch(off);
        self.entries.get(&off).map(|e| e.data.as_slice())
    }

    /// The table at `off` for modification: marks it used and dirty.
    pub fn get_mut(&mut self, off: u64) -> Option<&mut [u8]> {
        self.touch(off);
        let e = self.entries.get_mut(&off)?;
        if !e.dirty {
            e.dirty = true;
            self.dirty += 1;
        }
        Some(e.data.as_mut_slice())
    }

    /// The least recently used table and whether it is dirty.
    pub fn victim(&self) -> Option<(u64, bool)> {
        let (_, &off) = self.lru.iter().next()?;
        Some((off, self.entries[&off].dirty))
    }

    /// Drops a table (it must be clean, or its changes are meant to be lost).
    pub fn remove(&mut self, off: u64) {
        if let Some(e) = self.entries.remove(&off) {
            self.lru.remove(&e.stamp);
            if e.dirty {
                self.dirty -= 1;
            }
        }
    }

    /// Offsets of the dirty tables, in file order.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    /// A copy of the table's bytes (for writing it out).
    pub fn bytes(&self, off: u64) -> Option<Vec<u8>> {
        self.entries.get(&off).map(|e| e.data.clone())
    }

    /// Records that the table at `off` was written.
    pub fn mark_clean(&mut self, off: u64) {
        if let Some(e) = self.entries.get_mut(&off) {
            if e.dirty {
                e.dirty = false;
                self.dirty -= 1;
            }
        }
    }

    /// Drops every clean table not used since `stamp` (cache-clean-interval).
    pub fn drop_clean_older_than(&mut self, stamp: u64) {
        let old: Vec<(u64, u64)> = self
            .lru
            .range(..stamp)
            .map(|(&s, &o)| (s, o))
            .filter(|(_, o)| !self.entries[o].dirty)
            .collect();
        for (s, o) in old {
            self.lru.remove(&s);
            self.entries.remove(&o);
        }
    }

    /// The current use stamp.
    pub fn stamp(&self) -> u64 {
        self.clock
    }

    /// Drops everything (after the tables were replaced on disk).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.lru.clear();
        self.dirty = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_and_dirty_tracking() {
        let mut c = TableCache::new(2);
        c.insert(0, vec![1], false);
        c.insert(512, vec![2], false);
        assert!(c.is_full());
        assert_eq!(c.victim(), Some((0, false)));
        c.get(0);
        assert_eq!(c.victim(), Some((512, false)));
        c.get_mut(512).unwrap()[0] = 9;
        assert!(c.has_dirty());
        assert_eq!(c.dirty_offsets(), vec![512]);
        c.mark_clean(512);
        assert!(!c.has_dirty());
        c.remove(512);
        assert_eq!(c.len(), 1);
        let s = c.stamp() + 1;
        c.drop_clean_older_than(s);
        assert_eq!(c.len(), 0);
    }
}

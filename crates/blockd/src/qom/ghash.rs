//! The order in which QEMU lists the children of a container: the
//! iteration order of GLib's `GHashTable` (`glib/ghash.c`: `g_str_hash`,
//! `g_hash_table_lookup_node`, `g_hash_table_insert_node`,
//! `g_hash_table_remove_internal`, `g_hash_table_maybe_resize`,
//! `g_hash_table_resize`), which holds an object's properties in QEMU
//! (`object_property_try_add_child`, `object_property_del`).
//!
//! `qom-list` walks that table and prepends each property to its answer
//! (`qmp_qom_list`), so a client sees the table's slots in reverse. The
//! order depends on the names and on the whole history of insertions and
//! removals (removals leave tombstones; a resize re-places every entry),
//! so this module replays that history on a table of hashes: no values,
//! only the slots QEMU's table would use.
//!
//! ```text
//!  slot:    0     1     2     3     4     5     6     7
//!  hash:    -   "io0"   -  "tg0"  tomb    -  "tg1"   -
//!  qom-list order (reversed walk): tg1, tg0, io0
//! ```

/// `g_hash_table`'s prime moduli by shift (`prime_mod`).
const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];
const MIN_SHIFT: u32 = 3;
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;

/// `g_str_hash` (djb2 over the bytes as signed chars), with GLib's
/// reserved values 0 and 1 mapped to 2.
fn str_hash(s: &str) -> u32 {
    let h = s.bytes().fold(5381u32, |h, b| {
        h.wrapping_mul(33).wrapping_add(b as i8 as i32 as u32)
    });
    if h < 2 {
        2
    } else {
        h
    }
}

/// A `GHashTable` of string keys, keeping only what decides the order.
#[derive(Debug, Clone)]
pub struct HashOrder {
    hashes: Vec<u32>,
    keys: Vec<Option<String>>,
    shift: u32,
    nnodes: usize,
    noccupied: usize,
}

impl Default for HashOrder {
    fn default() -> Self {
        let size = 1usize << MIN_SHIFT;
        HashOrder {
            hashes: vec![UNUSED; size],
            keys: vec![None; size],
            shift: MIN_SHIFT,
            nnodes: 0,
            noccupied: 0,
        }
    }
}

impl HashOrder {
    fn size(&self) -> usize {
        1 << self.shift
    }

    fn mask(&self) -> usize {
        self.size() - 1
    }

    /// `g_hash_table_hash_to_index`.
    fn index(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % PRIME_MOD[self.shift as usize]) as usize
    }

    /// `g_hash_table_lookup_node`: the slot of `key`, or where it would
    /// go (the first tombstone on its probe path, else the free slot).
    fn lookup(&self, key: &str) -> (usize, u32, bool) {
        let hash = str_hash(key);
        let mut i = self.index(hash);
        let mut step = 0;
        let mut tomb = None;
        while self.hashes[i] != UNUSED {
            if self.hashes[i] == hash && self.keys[i].as_deref() == Some(key) {
                return (i, hash, true);
            }
            if self.hashes[i] == TOMBSTONE && tomb.is_none() {
                tomb = Some(i);
            }
            step += 1;
            i = (i + step) & self.mask();
        }
        (tomb.unwrap_or(i), hash, false)
    }

    /// Adds `key` (nothing if present).
    pub fn insert(&mut self, key: &str) {
        let (i, hash, found) = self.lookup(key);
        if found {
            return;
        }
        let old = self.hashes[i];
        self.hashes[i] = hash;
        self.keys[i] = Some(key.to_string());
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    /// Removes `key` (nothing if absent), leaving a tombstone.
    pub fn remove(&mut self, key: &str) {
        let (i, _, found) = self.lookup(key);
        if !found {
            return;
        }
        self.hashes[i] = TOMBSTONE;
        self.keys[i] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    fn maybe_resize(&mut self) {
        let size = self.size();
        let occ = self.noccupied;
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT) || size <= occ + occ / 16 {
            self.resize();
        }
    }

    /// `g_hash_table_resize` with `resize_map`'s in-place re-placement:
    /// entries are taken in slot order, and an entry evicted from its new
    /// slot is placed next.
    fn resize(&mut self) {
        let old = self.size();
        // g_hash_table_set_shift_from_size (nnodes * 1.333)
        let mut n = (self.nnodes as f64 * 1.333) as u64;
        let mut shift = 0;
        while n != 0 {
            n >>= 1;
            shift += 1;
        }
        self.shift = shift.max(MIN_SHIFT);
        let size = self.size();
        if size > old {
            self.hashes.resize(size, UNUSED);
            self.keys.resize(size, None);
        }
        let mut placed = vec![false; size.max(old)];
        for i in 0..old {
            let mut hash = self.hashes[i];
            if hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if placed[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            loop {
                let mut j = self.index(hash);
                let mut step = 0;
                while placed[j] {
                    step += 1;
                    j = (j + step) & self.mask();
                }
                placed[j] = true;
                let replaced = std::mem::replace(&mut self.hashes[j], hash);
                let evicted = std::mem::replace(&mut self.keys[j], key);
                if replaced < 2 {
                    break;
                }
                hash = replaced;
                key = evicted;
            }
        }
        if size < old {
            self.hashes.truncate(size);
            self.keys.truncate(size);
        }
        self.noccupied = self.nnodes;
    }

    /// The keys in the order `qom-list` shows them (the table's slots,
    /// last first).
    pub fn listed(&self) -> Vec<&str> {
        self.keys
            .iter()
            .rev()
            .filter_map(|k| k.as_deref())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(ops: &[&str]) -> Vec<String> {
        let mut t = HashOrder::default();
        for op in ops {
            match op.strip_prefix('-') {
                Some(k) => t.remove(k),
                None => t.insert(op),
            }
        }
        t.listed().into_iter().map(String::from).collect()
    }

    /// Orders recorded from qemu-storage-daemon 10.0.2's `qom-list
    /// /objects`.
    #[test]
    fn orders_as_recorded_from_qemu() {
        assert_eq!(replay(&["tg0", "tg6"]), ["tg6", "tg0"]);
        assert_eq!(
            replay(&["tg0", "io0", "objects"]),
            ["io0", "objects", "tg0"]
        );
        assert_eq!(
            replay(&["tg0", "io0", "objects", "io1"]),
            ["io0", "objects", "io1", "tg0"]
        );
        let six = ["t0", "t9", "t29", "t47", "t22", "t4"];
        // t40 added then removed (its completion failed): its tombstone
        // makes the eighth insertion resize the table.
        let mut with_tomb = six.to_vec();
        with_tomb.extend(["t40", "-t40", "t6"]);
        assert_eq!(
            replay(&with_tomb),
            ["t9", "t47", "t22", "t29", "t4", "t6", "t0"]
        );
        let mut without = six.to_vec();
        without.push("t6");
        assert_eq!(
            replay(&without),
            ["t6", "t22", "t29", "t4", "t9", "t0", "t47"]
        );
    }

    #[test]
    fn removals_shrink_and_keep_the_rest() {
        let names: Vec<String> = (0..40).map(|i| format!("o{i}")).collect();
        let mut t = HashOrder::default();
        for n in &names {
            t.insert(n);
        }
        assert_eq!(t.listed().len(), 40);
        for n in &names[..38] {
            t.remove(n);
        }
        let mut left = t.listed();
        left.sort();
        assert_eq!(left, ["o38", "o39"]);
        assert_eq!(t.size(), 8);
    }
}

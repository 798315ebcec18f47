//! Dirty bitmaps: which chunks of a node changed (QEMU's `HBitmap` under
//! `BdrvDirtyBitmap`, reduced to what the block jobs need today: one bit
//! per `granularity` bytes, set and reset by byte ranges, iterated).
//!
//! A range is dirty by whole chunks: setting any byte of a chunk dirties
//! it; resetting clears only the chunks a range covers entirely, except at
//! the end of the node, where the last, partial chunk counts as whole.
//!
//! The bits are kept as QEMU keeps the last level of an `HBitmap`: 64-bit
//! words, chunk `i` in bit `i % 64` of word `i / 64`. Their little-endian
//! bytes are QEMU's serialization (`hbitmap_serialize_part`, the order of
//! qcow2's bitmap data clusters) and what `hbitmap_sha256` hashes.

use std::sync::{Mutex, MutexGuard};

/// See the [module docs](self).
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    st: Mutex<Bits>,
}

#[derive(Debug)]
struct Bits {
    len: u64,
    words: Vec<u64>,
    count: u64,
}

/// Words holding `chunks` bits; at least one, as QEMU's `hbitmap_alloc`.
fn words_for(chunks: u64) -> usize {
    chunks.div_ceil(64).max(1) as usize
}

impl DirtyBitmap {
    /// A clean bitmap over `len` bytes, one bit per `granularity` bytes (a
    /// power of two, at least 512).
    pub fn new(len: u64, granularity: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two() && granularity >= 512);
        let chunks = len.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            st: Mutex::new(Bits {
                len,
                words: vec![0; words_for(chunks)],
                count: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Bits> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The length covered, in bytes.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// Whether the bitmap covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn chunks_of(&self, len: u64) -> u64 {
        len.div_ceil(self.granularity)
    }

    /// Marks every chunk `[offset, offset + len)` touches dirty.
    pub fn set(&self, offset: u64, len: u64) {
        let mut b = self.lock();
        if len == 0 || offset >= b.len {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset.saturating_add(len) - 1).min(b.len - 1) / self.granularity;
        for c in first..=last {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if b.words[w] & bit == 0 {
                b.words[w] |= bit;
                b.count += 1;
            }
        }
    }

    /// Clears the chunks `[offset, offset + len)` covers entirely (the
    /// partial last chunk of the node counts as covered).
    pub fn reset(&self, offset: u64, len: u64) {
        let mut b = self.lock();
        let end = offset.saturating_add(len).min(b.len);
        let first = offset.div_ceil(self.granularity);
        let last_excl = if end == b.len {
            self.chunks_of(b.len)
        } else {
            end / self.granularity
        };
        for c in first..last_excl {
            let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            if b.words[w] & bit != 0 {
                b.words[w] &= !bit;
                b.count -= 1;
            }
        }
    }

    /// Marks everything dirty.
    pub fn set_all(&self) {
        self.set(0, u64::MAX);
    }

    /// Whether the chunk holding `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let b = self.lock();
        let c = offset / self.granularity;
        c < self.chunks_of(b.len) && b.words[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    /// Dirty bytes (whole chunks; the last one may be partial): QEMU's
    /// `bdrv_get_dirty_count`.
    pub fn dirty_bytes(&self) -> u64 {
        let b = self.lock();
        let mut bytes = b.count * self.granularity;
        let chunks = self.chunks_of(b.len);
        if b.count > 0 && chunks > 0 {
            let c = chunks - 1;
            if b.words[(c / 64) as usize] & (1 << (c % 64)) != 0 {
                bytes -= chunks * self.granularity - b.len;
            }
        }
        bytes
    }

    /// Clears every bit (QEMU's `bdrv_clear_dirty_bitmap`).
    pub fn clear(&self) {
        let mut b = self.lock();
        b.words.iter_mut().for_each(|w| *w = 0);
        b.count = 0;
    }

    /// A copy of the bits, to [`restore`](Self::restore) later (the backup
    /// QEMU keeps for a transaction's abort).
    pub fn snapshot(&self) -> Vec<u64> {
        self.lock().words.clone()
    }

    /// Puts back bits taken by [`snapshot`](Self::snapshot) (of the same
    /// length).
    pub fn restore(&self, words: &[u64]) {
        let mut b = self.lock();
        if words.len() == b.words.len() {
            b.words.copy_from_slice(words);
            b.count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        }
    }

    /// Marks dirty whatever is dirty in `src` (QEMU's `hbitmap_merge`):
    /// word by word when the granularities match, else by dirty runs.
    /// Bitmaps of different lengths merge over the shorter one.
    pub fn merge_from(&self, src: &DirtyBitmap) {
        if std::ptr::eq(self, src) {
            return;
        }
        if src.granularity == self.granularity {
            let words = src.snapshot();
            let mut b = self.lock();
            let n = b.words.len().min(words.len());
            for (d, s) in b.words[..n].iter_mut().zip(&words[..n]) {
                *d |= *s;
            }
            // Bits of `src` past this bitmap's end are dropped.
            let chunks = self.chunks_of(b.len);
            if chunks % 64 != 0 {
                b.words[(chunks / 64) as usize] &= (1u64 << (chunks % 64)) - 1;
            }
            b.count = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
            return;
        }
        let mut pos = 0;
        while let Some((off, n)) = src.next_dirty_run(pos, u64::MAX) {
            self.set(off, n);
            pos = off + n;
        }
    }

    /// Changes the length covered (QEMU's `hbitmap_truncate`): chunks
    /// past a shorter end are forgotten, a longer end adds clean ones.
    pub fn truncate(&self, len: u64) {
        let mut b = self.lock();
        let chunks = self.chunks_of(len);
        b.words.resize(words_for(chunks), 0);
        if chunks % 64 != 0 {
            let w = (chunks / 64) as usize;
            b.words[w] &= (1u64 << (chunks % 64)) - 1;
        } else if chunks == 0 {
            b.words[0] = 0;
        }
        b.len = len;
        b.count = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// The bits in QEMU's serialized order (`hbitmap_serialize_part` over
    /// the whole bitmap): chunk `i` in bit `i % 8` of byte `i / 8`, as
    /// many bytes as the chunks need.
    pub fn serialize(&self) -> Vec<u8> {
        let b = self.lock();
        let bytes = self.chunks_of(b.len).div_ceil(8) as usize;
        let mut out: Vec<u8> = b.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(bytes);
        out
    }

    /// A bitmap over `len` bytes from bits in [`serialize`](Self::serialize)'s
    /// order (missing bytes are clean, bits past the end ignored).
    pub fn deserialize(len: u64, granularity: u64, data: &[u8]) -> DirtyBitmap {
        let bm = DirtyBitmap::new(len, granularity);
        {
            let mut b = bm.lock();
            for (i, w) in b.words.iter_mut().enumerate() {
                let mut bytes = [0u8; 8];
                for (j, x) in bytes.iter_mut().enumerate() {
                    *x = data.get(i * 8 + j).copied().unwrap_or(0);
                }
                *w = u64::from_le_bytes(bytes);
            }
        }
        // Drops bits past the end and recounts.
        bm.truncate(len);
        bm
    }

    /// SHA-256 of the bits as QEMU's `hbitmap_sha256` hashes them: every
    /// word of the last level, little-endian, at least one word.
    pub fn sha256_hex(&self) -> String {
        let bytes: Vec<u8> = self
            .lock()
            .words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        crate::sha256::hex(&crate::sha256::digest(&bytes))
    }

    /// The next dirty run at or after `offset`, at most `max` bytes long:
    /// `(start, len)`, chunk-aligned (the end clipped to the length).
    pub fn next_dirty_run(&self, offset: u64, max: u64) -> Option<(u64, u64)> {
        let b = self.lock();
        let chunks = self.chunks_of(b.len);
        let mut c = offset / self.granularity;
        // Find the first dirty chunk, skipping clean words whole.
        while c < chunks {
            let w = b.words[(c / 64) as usize] >> (c % 64);
            if w == 0 {
                c = (c / 64 + 1) * 64;
                continue;
            }
            c += u64::from(w.trailing_zeros());
            break;
        }
        if c >= chunks {
            return None;
        }
        let start = c * self.granularity;
        let max_chunks = (max / self.granularity).max(1);
        let mut n = 0;
        while c + n < chunks
            && n < max_chunks
            && b.words[((c + n) / 64) as usize] & (1 << ((c + n) % 64)) != 0
        {
            n += 1;
        }
        let end = ((c + n) * self.granularity).min(b.len);
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reset_and_runs() {
        let b = DirtyBitmap::new(10 * 65536 + 1000, 65536);
        assert_eq!(b.next_dirty_run(0, u64::MAX), None);
        b.set(70000, 10);
        assert!(b.get(65536) && !b.get(0) && !b.get(131072));
        assert_eq!(b.dirty_bytes(), 65536);
        b.set(3 * 65536, 2 * 65536);
        assert_eq!(b.next_dirty_run(0, u64::MAX), Some((65536, 65536)));
        assert_eq!(
            b.next_dirty_run(131072, u64::MAX),
            Some((3 * 65536, 2 * 65536))
        );
        assert_eq!(b.next_dirty_run(131072, 65536), Some((3 * 65536, 65536)));
        // A reset of part of a chunk leaves it dirty.
        b.reset(65536, 100);
        assert!(b.get(65536));
        b.reset(65536, 65536);
        assert!(!b.get(65536));
        // The partial last chunk.
        b.set(10 * 65536 + 10, 1);
        assert_eq!(
            b.next_dirty_run(6 * 65536, u64::MAX),
            Some((10 * 65536, 1000))
        );
        assert_eq!(b.dirty_bytes(), 2 * 65536 + 1000);
        b.reset(10 * 65536, 1000);
        assert!(!b.get(10 * 65536 + 999));
        b.set_all();
        assert_eq!(b.dirty_bytes(), b.len());
        b.reset(0, b.len());
        assert_eq!(b.dirty_bytes(), 0);
        assert_eq!(b.next_dirty_run(0, u64::MAX), None);
    }

    #[test]
    fn serialization_and_hash_follow_qemu() {
        // 1 MiB at 64 KiB: 16 chunks, one word; a clean one hashes as
        // qemu-storage-daemon reports it.
        let b = DirtyBitmap::new(1 << 20, 65536);
        assert_eq!(
            b.sha256_hex(),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
        // 1 MiB at 512: 2048 chunks, 32 words.
        let b512 = DirtyBitmap::new(1 << 20, 512);
        assert_eq!(
            b512.sha256_hex(),
            "5341e6b2646979a70e57653007a1f310169421ec9bdd9f1a5648f75ade005af1"
        );
        b.set(0, 1);
        b.set(9 * 65536, 65536);
        assert_eq!(b.serialize(), vec![0x01, 0x02]);
        let c = DirtyBitmap::deserialize(1 << 20, 65536, &[0x01, 0x02, 0xff]);
        assert_eq!(c.dirty_bytes(), 2 * 65536);
        assert_eq!(c.sha256_hex(), b.sha256_hex());
        // Merging: same granularity by words, others by runs.
        b512.set(100 * 512, 10);
        b.merge_from(&b512);
        assert_eq!(b.dirty_bytes(), 2 * 65536);
        b.clear();
        b.merge_from(&b512);
        assert_eq!(b.next_dirty_run(0, u64::MAX), Some((0, 65536)));
        let words = b.snapshot();
        b.set_all();
        b.restore(&words);
        assert_eq!(b.dirty_bytes(), 65536);
        // Truncation forgets chunks past the end, adds clean ones.
        b.set(15 * 65536, 1);
        b.truncate(15 * 65536 + 100);
        assert_eq!(b.dirty_bytes(), 65536 + 100);
        b.truncate(65536);
        assert_eq!(b.dirty_bytes(), 65536);
        b.truncate(1 << 30);
        assert_eq!(b.dirty_bytes(), 65536);
        assert_eq!(b.len(), 1 << 30);
    }

    #[test]
    fn runs_across_words() {
        let g = 4096;
        let b = DirtyBitmap::new(1000 * g, g);
        b.set(63 * g, 3 * g);
        assert_eq!(b.next_dirty_run(0, u64::MAX), Some((63 * g, 3 * g)));
        b.set(700 * g, g);
        assert_eq!(b.next_dirty_run(66 * g, u64::MAX), Some((700 * g, g)));
        assert_eq!(b.next_dirty_run(701 * g, u64::MAX), None);
    }
}

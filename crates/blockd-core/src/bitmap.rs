//! Dirty bitmaps: which chunks of a node changed (QEMU's `HBitmap` under
//! `BdrvDirtyBitmap`, reduced to what the block jobs need today: one bit
//! per `granularity` bytes, set and reset by byte ranges, iterated).
//!
//! A range is dirty by whole chunks: setting any byte of a chunk dirties
//! it; resetting clears only the chunks a range covers entirely, except at
//! the end of the node, where the last, partial chunk counts as whole.

use std::sync::{Mutex, MutexGuard};

/// See the [module docs](self).
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    len: u64,
    st: Mutex<Bits>,
}

#[derive(Debug)]
struct Bits {
    words: Vec<u64>,
    count: u64,
}

impl DirtyBitmap {
    /// A clean bitmap over `len` bytes, one bit per `granularity` bytes (a
    /// power of two, at least 512).
    pub fn new(len: u64, granularity: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two() && granularity >= 512);
        let chunks = len.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            len,
            st: Mutex::new(Bits {
                words: vec![0; chunks.div_ceil(64) as usize],
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
        self.len
    }

    /// Whether the bitmap covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn chunks(&self) -> u64 {
        self.len.div_ceil(self.granularity)
    }

    /// Marks every chunk `[offset, offset + len)` touches dirty.
    pub fn set(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.len {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset + len - 1).min(self.len - 1) / self.granularity;
        let mut b = self.lock();
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
        let end = (offset + len).min(self.len);
        let first = offset.div_ceil(self.granularity);
        let last_excl = if end == self.len {
            self.chunks()
        } else {
            end / self.granularity
        };
        let mut b = self.lock();
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
        self.set(0, self.len);
    }

    /// Whether the chunk holding `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let c = offset / self.granularity;
        c < self.chunks() && self.lock().words[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    /// Dirty bytes (whole chunks; the last one may be partial).
    pub fn dirty_bytes(&self) -> u64 {
        let count = self.lock().count;
        let mut bytes = count * self.granularity;
        if count > 0 && self.get(self.len.saturating_sub(1)) {
            bytes -= self.chunks() * self.granularity - self.len;
        }
        bytes
    }

    /// The next dirty run at or after `offset`, at most `max` bytes long:
    /// `(start, len)`, chunk-aligned (the end clipped to the length).
    pub fn next_dirty_run(&self, offset: u64, max: u64) -> Option<(u64, u64)> {
        let b = self.lock();
        let chunks = self.chunks();
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
        let end = ((c + n) * self.granularity).min(self.len);
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

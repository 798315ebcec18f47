//! Persistent dirty bitmaps as a format driver stores them: the neutral
//! type between the in-memory bitmaps ([`crate::bitmap`]) and a driver's
//! on-disk layer (qcow2's bitmaps extension, QEMU's
//! `block/qcow2-bitmap.c`).
//!
//! The bits are in QEMU's serialization order (`hbitmap_serialize_part`):
//! bit `c` of the bitmap — the chunk `[c * granularity, (c + 1) *
//! granularity)` of the node — is bit `c % 8` of byte `c / 8`, so that
//! little-endian `u64` words with chunk `c` at bit `c % 64` of word
//! `c / 64` (how [`crate::bitmap::DirtyBitmap`] keeps them) convert with
//! [`StoredBitmap::from_words`] and [`StoredBitmap::to_words`]. A bitmap
//! over `len` bytes has `ceil(len / granularity)` bits in
//! [`StoredBitmap::byte_len`] bytes; bits past the last chunk are zero.
//!
//! How the driver methods fit together
//! ([`crate::driver::BlockDriver`]): at open the driver reads the
//! bitmaps (and, on a writable node, marks them in use on disk) and the
//! core takes them once with `take_loaded_bitmaps`; before making a
//! bitmap persistent the core asks `can_store_new_bitmap`; the core
//! registers a [`BitmapSource`] with `set_bitmap_source`, which the
//! driver calls at close to store the persistent bitmaps
//! (`store_bitmaps`, also callable directly); `remove_persistent_bitmap`
//! deletes one from the image.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::BlockError;

/// A persistent dirty bitmap, as loaded from or stored into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    /// The bitmap's name (at most 1023 bytes in qcow2).
    pub name: String,
    /// Bytes per bit: a power of two, 512 B to 2 GiB in qcow2.
    pub granularity: u64,
    /// Whether it records writes (qcow2's `auto` flag; QEMU's
    /// `bdrv_dirty_bitmap_enabled`).
    pub enabled: bool,
    /// Found marked in use at open (a writer did not store it): its bits
    /// are unusable and empty (QEMU's `bdrv_dirty_bitmap_inconsistent`).
    /// A store skips inconsistent bitmaps: they stay on disk as they are
    /// until removed.
    pub inconsistent: bool,
    /// The bits, in serialization order (see the module docs).
    pub bits: Vec<u8>,
}

impl StoredBitmap {
    /// Bytes of [`StoredBitmap::bits`] for a node of `len` bytes.
    pub fn byte_len(len: u64, granularity: u64) -> usize {
        len.div_ceil(granularity).div_ceil(8) as usize
    }

    /// An empty (all clean) bitmap over `len` bytes.
    pub fn empty(name: &str, granularity: u64, len: u64, enabled: bool) -> StoredBitmap {
        StoredBitmap {
            name: name.to_string(),
            granularity,
            enabled,
            inconsistent: false,
            bits: vec![0; Self::byte_len(len, granularity)],
        }
    }

    /// Whether chunk `c` is dirty.
    pub fn get(&self, c: u64) -> bool {
        self.bits
            .get((c / 8) as usize)
            .is_some_and(|b| b & (1 << (c % 8)) != 0)
    }

    /// Marks chunk `c` dirty (ignored past the end).
    pub fn set(&mut self, c: u64) {
        if let Some(b) = self.bits.get_mut((c / 8) as usize) {
            *b |= 1 << (c % 8);
        }
    }

    /// Marks dirty every chunk the byte range `[offset, offset + len)`
    /// touches.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for c in offset / self.granularity..=(offset + len - 1) / self.granularity {
            self.set(c);
        }
    }

    /// Number of dirty chunks.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The bits from little-endian words (chunk `c` at bit `c % 64` of
    /// word `c / 64`), cut to `byte_len(len, granularity)` bytes.
    pub fn from_words(words: &[u64], len: u64, granularity: u64) -> Vec<u8> {
        let n = Self::byte_len(len, granularity);
        let mut bits: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bits.resize(n, 0);
        bits
    }

    /// The bits as little-endian words (the inverse of
    /// [`StoredBitmap::from_words`]).
    pub fn to_words(&self) -> Vec<u64> {
        self.bits
            .chunks(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect()
    }
}

/// The future of the bitmap methods of [`crate::driver::BlockDriver`].
pub type BitmapFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BlockError>> + Send + 'a>>;

/// What a driver calls at close for the persistent bitmaps to store
/// (every persistent bitmap of the node, inconsistent ones included; the
/// driver skips those). Registered by the core with
/// `BlockDriver::set_bitmap_source`.
pub type BitmapSource = Arc<dyn Fn() -> Vec<StoredBitmap> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_in_serialization_order() {
        // 200 chunks of 64 KiB: 25 bytes.
        let len = 200 * 65536 - 1000;
        let mut b = StoredBitmap::empty("b", 65536, len, true);
        assert_eq!(b.bits.len(), 25);
        b.set_range(65536 + 10, 1);
        b.set_range(64 * 65536, 2 * 65536);
        assert_eq!(b.bits[0], 0b10);
        assert_eq!(b.bits[8], 0b11);
        assert_eq!(b.count(), 3);
        let w = b.to_words();
        assert_eq!(w.len(), 4);
        assert_eq!(w[0], 2);
        assert_eq!(w[1], 3);
        assert_eq!(StoredBitmap::from_words(&w, len, 65536), b.bits);
        assert!(b.get(1) && b.get(64) && b.get(65) && !b.get(0));
        // Past the end: ignored.
        b.set(10_000);
        assert_eq!(b.count(), 3);
    }
}

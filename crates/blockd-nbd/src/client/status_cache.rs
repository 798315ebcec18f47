//! A cache of one range known to hold data, for block status through an
//! `nbd` node (QEMU's `BdrvBlockStatusCache`, `bdrv_bsc_is_data` /
//! `bdrv_bsc_fill` / `bdrv_bsc_invalidate_range` in block.c, kept for
//! protocol nodes by `bdrv_co_do_block_status` in block/io.c).
//!
//! A server that exports a node asks block status before every structured
//! read (to send holes as holes), so through an `nbd` node each read would
//! cost two round trips. The driver asks the remote server about the
//! whole rest of the export (one extent, `NBD_CMD_FLAG_REQ_ONE`) and keeps
//! the extent if it is data; later questions inside it are answered here.
//! Only data is cached: our own writes never turn data into a hole, and
//! the driver drops the cache around its own trims and write-zeroes. As
//! in QEMU, changes made by other clients of the remote export are not
//! seen until then; a stale "data" answer costs a read of zeroes as data,
//! never wrong content.

use std::sync::Mutex;

/// The cached range, `[start, end)`, if any.
#[derive(Debug, Default)]
pub(crate) struct StatusCache(Mutex<Option<(u64, u64)>>);

impl StatusCache {
    /// How many bytes from `offset` (at most `len`) are known to be data.
    pub fn data_at(&self, offset: u64, len: u64) -> Option<u64> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            Some((s, e)) if s <= offset && offset < e => Some((e - offset).min(len)),
            _ => None,
        }
    }

    /// Remembers that `[offset, offset + len)` is data.
    pub fn fill(&self, offset: u64, len: u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((offset, offset + len));
    }

    /// Forgets the range if it overlaps `[offset, offset + len)`.
    pub fn invalidate(&self, offset: u64, len: u64) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, e)) = *g {
            if offset < e && s < offset.saturating_add(len) {
                *g = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_inside_the_range_only_and_forgets_on_overlap() {
        let c = StatusCache::default();
        assert_eq!(c.data_at(0, 4096), None);
        c.fill(8192, 1 << 20);
        assert_eq!(c.data_at(8192, 4096), Some(4096));
        assert_eq!(c.data_at(8192 + (1 << 20) - 512, 4096), Some(512));
        assert_eq!(c.data_at(4096, 4096), None);
        assert_eq!(c.data_at(8192 + (1 << 20), 4096), None);
        c.invalidate(0, 8192); // ends where the range starts
        assert_eq!(c.data_at(8192, 1), Some(1));
        c.invalidate(1 << 20, 1);
        assert_eq!(c.data_at(8192, 1), None);
    }
}

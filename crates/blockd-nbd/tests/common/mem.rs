//! An in-memory `ExportIo` for tests: a `Vec<u8>` behind a mutex, with
//! optional hole tracking at 4 KiB granularity, slow or failing offsets,
//! and counters.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use blockd_core::{BlockStatus, IoFuture};
use blockd_nbd::ExportIo;
use bytes::Bytes;

/// Hole-tracking granularity.
pub const BLOCK: u64 = 4096;

/// An in-memory disk.
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    /// Allocated blocks (when tracking holes).
    alloc: Option<Mutex<Vec<bool>>>,
    /// Reads starting at this offset take this long.
    pub slow_read: Option<(u64, Duration)>,
    /// Reads covering this offset fail with EIO.
    pub fail_read: Option<u64>,
    /// Block limits to report.
    pub limits: (u32, u32, u32),
    /// Flushes done.
    pub flushes: AtomicU64,
    /// Cache requests seen.
    pub caches: AtomicU64,
    /// Discards seen.
    pub discards: AtomicU64,
}

impl MemDisk {
    /// A disk of `size` bytes; with `holes`, everything starts unallocated.
    pub fn new(size: u64, holes: bool) -> MemDisk {
        let blocks = size.div_ceil(BLOCK) as usize;
        MemDisk {
            data: Mutex::new(vec![0; size as usize]),
            alloc: holes.then(|| Mutex::new(vec![false; blocks])),
            slow_read: None,
            fail_read: None,
            limits: (1, 4096, 32 << 20),
            flushes: AtomicU64::new(0),
            caches: AtomicU64::new(0),
            discards: AtomicU64::new(0),
        }
    }

    /// A copy of `len` bytes at `offset`.
    pub fn get(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec()
    }

    /// Writes bytes directly (allocating the blocks).
    pub fn put(&self, offset: u64, b: &[u8]) {
        self.data.lock().unwrap()[offset as usize..offset as usize + b.len()].copy_from_slice(b);
        self.mark(offset, b.len() as u64, true);
    }

    fn mark(&self, offset: u64, len: u64, allocated: bool) {
        let Some(a) = &self.alloc else { return };
        let mut a = a.lock().unwrap();
        if allocated {
            let (first, end) = (offset / BLOCK, (offset + len).div_ceil(BLOCK));
            for b in first..end {
                a[b as usize] = true;
            }
        } else {
            // Only blocks wholly inside the range lose their allocation.
            let (first, end) = (offset.div_ceil(BLOCK), (offset + len) / BLOCK);
            for b in first..end.max(first) {
                a[b as usize] = false;
            }
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl ExportIo for MemDisk {
    fn length(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn block_limits(&self) -> (u32, u32, u32) {
        self.limits
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            if let Some((off, d)) = self.slow_read {
                if off == offset {
                    tokio::time::sleep(d).await;
                }
            }
            if let Some(f) = self.fail_read {
                if f >= offset && f < offset + len as u64 {
                    return Err(errno(libc::EIO));
                }
            }
            Ok(Bytes::from(self.get(offset, len)))
        })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.put(offset, &data);
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        _fua: bool,
    ) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let aligned = offset % BLOCK == 0 && len % BLOCK == 0;
            if fast_only && !(may_unmap && aligned && self.alloc.is_some()) {
                return Err(errno(libc::ENOTSUP));
            }
            self.zero(offset, len);
            if may_unmap {
                self.mark(offset, len, false);
            } else {
                self.mark(offset, len, true);
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.discards.fetch_add(1, Ordering::SeqCst);
            if self.alloc.is_some() {
                let (first, end) = (offset.div_ceil(BLOCK), (offset + len) / BLOCK);
                if end > first {
                    self.zero(first * BLOCK, (end - first) * BLOCK);
                    self.mark(offset, len, false);
                }
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let Some(a) = &self.alloc else {
                return Ok(BlockStatus {
                    len,
                    data: true,
                    zero: false,
                    allocated: true,
                });
            };
            let a = a.lock().unwrap();
            let first = (offset / BLOCK) as usize;
            let state = a[first];
            let mut end = (first as u64 + 1) * BLOCK;
            while end < offset + len && a[(end / BLOCK) as usize] == state {
                end += BLOCK;
            }
            Ok(BlockStatus {
                len: end.min(offset + len) - offset,
                data: state,
                zero: !state,
                allocated: state,
            })
        })
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> IoFuture<'_, (u64, u32)> {
        Box::pin(async move {
            let st = self.block_status(offset, len).await?;
            Ok((st.len, st.allocated as u32))
        })
    }

    fn cache(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.caches.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

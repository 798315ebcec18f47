//! When a buffered write may run inline, on the event-loop thread that
//! issued it, instead of taking a trip through the blocking pool.
//!
//! A buffered write that lands in the page cache costs a few microseconds;
//! handing it to a pool thread and waking the requester again costs 20–40
//! µs on a virtual machine (two cross-CPU wake-ups), so a queue-depth-1
//! writer runs at a fraction of the disk's speed. Where the file system
//! supports `RWF_NOWAIT` for buffered writes (XFS, btrfs) the kernel tells
//! us when a write would block and the driver simply tries. ext4 refuses
//! `RWF_NOWAIT` writes outright (EOPNOTSUPP), so for it the driver decides
//! by itself, conservatively:
//!
//! - only on local file systems (ext4, XFS, btrfs, tmpfs, f2fs, overlayfs,
//!   bcachefs): never NFS, FUSE or anything whose writes may wait on a
//!   network or a daemon;
//! - only whole pages (no read-before-write of a page that may not be
//!   cached), within the current length (rounded up to whole sectors, as QEMU
//!   counts it: the file never grows inline beyond its last sector),
//!   at most [`INLINE_MAX`] bytes;
//! - and a breaker. An inline write slower than [`SLOW`] is a stall. The
//!   occasional short one is normal (ext4 makes a writer wait a few
//!   milliseconds while the journal commits) and costs
//!   the event loop less than the pool hand-off saves; but a stall longer
//!   than [`STALL_MAX`], or more than [`STALL_BUDGET`] of stalls within a
//!   second (dirty-page throttling, memory pressure), turns inline writes
//!   off for that file for a second, doubling up to a minute while it
//!   keeps happening. Meanwhile writes go to the pool, as they always do
//!   for O_DIRECT, FUA, growing or unaligned writes.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Largest write done inline: copying 1 MiB into the page cache takes
/// about as long as the pool hand-off it saves.
pub(super) const INLINE_MAX: usize = 1 << 20;

/// An inline write slower than this is a stall.
pub(super) const SLOW: Duration = Duration::from_millis(1);

/// One stall longer than this trips the breaker.
pub(super) const STALL_MAX: Duration = Duration::from_millis(20);

/// Stalls adding up to more than this within one second trip the breaker.
/// Journal commits make a writer wait a few milliseconds now and then
/// (two 6 ms waits within a second were seen on ext4 under 1 MiB writes):
/// that should not trip it. Dirty-page throttling makes every writer wait
/// tens to hundreds of milliseconds, again and again: that trips it within
/// a write or two.
pub(super) const STALL_BUDGET: Duration = Duration::from_millis(30);

const FIRST_BACKOFF_MS: u64 = 1000;
const MAX_BACKOFF_MS: u64 = 64_000;

/// File systems whose buffered writes only wait on local resources.
const LOCAL_FS: [i64; 7] = [
    0xEF53,      // ext2/3/4
    0x5846_5342, // XFS
    0x9123_683E, // btrfs
    0x0102_1994, // tmpfs
    0xF2F5_2010, // f2fs
    0x794C_7630, // overlayfs
    0xCA45_1A4E, // bcachefs
];

/// Per-file decision state.
#[derive(Debug)]
pub(super) struct InlineWrites {
    /// Local file system, regular file, buffered I/O.
    eligible: bool,
    page: u64,
    epoch: Instant,
    /// While non-zero: inline writes are off until this many ms after `epoch`.
    off_until_ms: AtomicU64,
    /// Length of the next back-off.
    backoff_ms: AtomicU64,
    /// When the breaker last tripped (ms after `epoch`).
    last_trip_ms: AtomicU64,
    /// Start of the current one-second stall window (ms after `epoch`).
    window_ms: AtomicU64,
    /// Stalled time within that window (µs).
    window_stall_us: AtomicU64,
}

impl InlineWrites {
    /// The state for a file opened on `fd`. With `allowed` false (a block
    /// device, or `--inline-writes off`) it never writes inline.
    pub(super) fn new(fd: RawFd, allowed: bool, direct: bool) -> Self {
        let local = super::sys::fs_magic(fd).is_some_and(|m| LOCAL_FS.contains(&m));
        Self::with(allowed && !direct && local)
    }

    fn with(eligible: bool) -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        InlineWrites {
            eligible,
            page: u64::try_from(page).unwrap_or(4096).max(512),
            epoch: Instant::now(),
            off_until_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(FIRST_BACKOFF_MS),
            last_trip_ms: AtomicU64::new(0),
            window_ms: AtomicU64::new(0),
            window_stall_us: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a write of `len` bytes at `offset`, ending within a file of
    /// `length` bytes, may run inline now.
    pub(super) fn may(&self, offset: u64, len: usize, length: u64) -> bool {
        let len64 = len as u64;
        if !self.eligible
            || len == 0
            || len > INLINE_MAX
            || offset % self.page != 0
            || len64 % self.page != 0
            || offset.saturating_add(len64) > length
        {
            return false;
        }
        let off = self.off_until_ms.load(Ordering::Relaxed);
        if off == 0 {
            return true;
        }
        if self.now_ms() < off {
            return false;
        }
        // The back-off is over: try again (one thread clears it).
        let _ = self
            .off_until_ms
            .compare_exchange(off, 0, Ordering::Relaxed, Ordering::Relaxed);
        true
    }

    /// Records how long an inline write took; too much stalling trips
    /// the breaker.
    pub(super) fn took(&self, elapsed: Duration) {
        if elapsed <= SLOW {
            return;
        }
        let now = self.now_ms();
        let us = elapsed.as_micros() as u64;
        if now.saturating_sub(self.window_ms.load(Ordering::Relaxed)) >= 1000 {
            self.window_ms.store(now, Ordering::Relaxed);
            self.window_stall_us.store(0, Ordering::Relaxed);
        }
        let total = self.window_stall_us.fetch_add(us, Ordering::Relaxed) + us;
        if elapsed <= STALL_MAX && total <= STALL_BUDGET.as_micros() as u64 {
            return;
        }
        self.window_stall_us.store(0, Ordering::Relaxed);
        let last = self.last_trip_ms.swap(now.max(1), Ordering::Relaxed);
        let mut backoff = self.backoff_ms.load(Ordering::Relaxed);
        // Stalls that keep coming lengthen the back-off; a quiet spell
        // (ten back-offs without one) starts it over.
        backoff = if last != 0 && now.saturating_sub(last) < backoff * 10 {
            (backoff * 2).min(MAX_BACKOFF_MS)
        } else {
            FIRST_BACKOFF_MS
        };
        self.backoff_ms.store(backoff, Ordering::Relaxed);
        self.off_until_ms
            .store((now + backoff).max(1), Ordering::Relaxed);
        tracing::debug!(
            elapsed_us = elapsed.as_micros() as u64,
            backoff_ms = backoff,
            "inline write stalled: writes go to the thread pool for a while"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_pages_within_the_file() {
        let w = InlineWrites::with(true);
        let p = w.page as usize;
        let len = 1 << 30;
        assert!(w.may(0, p, len));
        assert!(w.may(w.page * 3, 2 * p, len));
        assert!(!w.may(512, p, len), "unaligned offset");
        assert!(!w.may(0, 512, len), "partial page");
        assert!(!w.may(0, 0, len));
        assert!(!w.may(len - w.page, 2 * p, len), "would grow the file");
        assert!(!w.may(0, INLINE_MAX + p, len), "too big");
        assert!(!InlineWrites::with(false).may(0, p, len), "not eligible");
    }

    #[test]
    fn a_stall_turns_inline_writes_off_and_back_on() {
        let w = InlineWrites::with(true);
        let p = w.page as usize;
        w.took(Duration::from_micros(50));
        assert!(w.may(0, p, 1 << 20), "fast writes keep it on");
        for _ in 0..3 {
            w.took(Duration::from_millis(9));
        }
        assert!(w.may(0, p, 1 << 20), "occasional short stalls keep it on");
        w.took(Duration::from_millis(9));
        assert!(
            !w.may(0, p, 1 << 20),
            "off after too many stalls in a second"
        );
        w.off_until_ms.store(0, Ordering::Relaxed);
        w.took(Duration::from_millis(21));
        assert!(!w.may(0, p, 1 << 20), "off after one long stall");
        assert_eq!(w.backoff_ms.load(Ordering::Relaxed), 2 * FIRST_BACKOFF_MS);
        // Back-off over: on again.
        w.off_until_ms.store(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(2));
        assert!(w.may(0, p, 1 << 20));
        assert_eq!(w.off_until_ms.load(Ordering::Relaxed), 0);
        // Another trip soon after doubles the back-off again.
        w.took(Duration::from_millis(30));
        assert_eq!(w.backoff_ms.load(Ordering::Relaxed), 4 * FIRST_BACKOFF_MS);
        for _ in 0..10 {
            w.took(Duration::from_millis(30));
        }
        assert_eq!(w.backoff_ms.load(Ordering::Relaxed), MAX_BACKOFF_MS);
    }

    #[test]
    fn eligibility_follows_the_file_system() {
        let dir = std::env::temp_dir();
        let f = tempfile_in(&dir);
        use std::os::fd::AsRawFd;
        let local =
            super::super::sys::fs_magic(f.as_raw_fd()).is_some_and(|m| LOCAL_FS.contains(&m));
        assert_eq!(
            InlineWrites::new(f.as_raw_fd(), true, false).eligible,
            local
        );
        assert!(
            !InlineWrites::new(f.as_raw_fd(), true, true).eligible,
            "O_DIRECT"
        );
        assert!(
            !InlineWrites::new(f.as_raw_fd(), false, false).eligible,
            "block device"
        );
    }

    fn tempfile_in(dir: &std::path::Path) -> std::fs::File {
        let p = dir.join(format!("blockd-inline-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}

//! Reopening a qcow2 node (QEMU's `qcow2_reopen_prepare`, `_commit`,
//! `_abort` and `qcow2_update_options`).
//!
//! * **Runtime options** (`lazy-refcounts`, `pass-discard-*`,
//!   `discard-no-unref`, the cache sizes, `cache-clean-interval`) are
//!   checked as at open and take effect at commit.
//! * **Read-write to read-only**: prepare stores the persistent bitmaps
//!   the core's bitmap source gives (QEMU's `qcow2_reopen_bitmaps_ro`:
//!   they are no longer marked in use), writes every dirty table back,
//!   applies pending frees and marks the image clean (the node still holds
//!   its write permission then), so nothing is left to write once it is
//!   read-only.
//! * **Read-only to read-write**: prepare refuses an image marked corrupt;
//!   once the write permission is held, [`Qcow2Driver`]'s `reopen_finish`
//!   does what opening read-write does: clears unknown autoclear bits,
//!   marks the stored bitmaps in use (QEMU's `qcow2_reopen_bitmaps_rw`)
//!   and repairs the refcounts of an image left dirty by a crash with lazy
//!   refcounts.
//! * **Backing changes** (made by the graph): the driver looks `backing`
//!   up at every use; commit records whether there is one, which decides
//!   whether an unallocated cluster reads from it or as zeroes.
//!
//! Prepare takes the metadata lock and the staged change holds it until
//! commit or abort, so nothing can slip in between (the node is drained
//! anyway).

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blockd_core::{BlockError, ErrorKind, ReopenRequest, Staged};
use tokio::sync::OwnedMutexGuard;

use super::header::{AUTOCLEAR_MASK, INCOMPAT_DIRTY, OFF_AUTOCLEAR};
use super::meta::Meta;
use super::{bitmaps, check};
use super::{cache_sizes, check as check_options, Geo, Qcow2Driver};
use crate::options::{DriverOptions, Qcow2Options};

/// The runtime options of a qcow2 node, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    pub lazy: bool,
    pub pass_discard_request: bool,
    pub pass_discard_other: bool,
    pub discard_no_unref: bool,
    pub l2_entries: usize,
    pub rc_entries: usize,
    pub clean_interval: Option<Duration>,
}

impl Settings {
    /// Resolves options as QEMU's `qcow2_update_options` does; `lazy_bit`
    /// is the image's lazy-refcounts feature bit, `discard_unmap` the
    /// node's `discard` mode (the default of `pass-discard-request`).
    pub fn from_options(
        o: &Qcow2Options,
        geo: &Geo,
        lazy_bit: bool,
        discard_unmap: bool,
    ) -> Result<Settings, BlockError> {
        check_options(o)?;
        let lazy = o.lazy_refcounts.unwrap_or(lazy_bit);
        if lazy && geo.version < 3 {
            return Err(BlockError::invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        if o.discard_no_unref == Some(true) && geo.version < 3 {
            return Err(BlockError::invalid(
                "discard-no-unref is only supported since qcow2 version 3",
            ));
        }
        let cs = geo.cs;
        let (l2_bytes, rc_bytes) = cache_sizes(o, cs, geo.size)?;
        Ok(Settings {
            lazy,
            pass_discard_request: o.pass_discard_request.unwrap_or(discard_unmap),
            pass_discard_other: o.pass_discard_other.unwrap_or(false),
            discard_no_unref: o.discard_no_unref.unwrap_or(false),
            l2_entries: (l2_bytes / cs).max(2) as usize,
            rc_entries: (rc_bytes / cs).max(4) as usize,
            clean_interval: o
                .cache_clean_interval
                .filter(|&s| s > 0)
                .map(|s| Duration::from_secs(s as u64)),
        })
    }

    /// Puts the settings into effect.
    pub fn apply(&self, m: &mut Meta) {
        m.lazy = self.lazy;
        m.pass_discard_request = self.pass_discard_request;
        m.pass_discard_other = self.pass_discard_other;
        m.discard_no_unref = self.discard_no_unref;
        m.set_cache_capacities(self.l2_entries, self.rc_entries);
        m.clean_interval = self.clean_interval;
    }
}

/// A prepared reopen.
struct Qcow2Staged {
    meta: OwnedMutexGuard<Meta>,
    settings: Option<Settings>,
    read_only: bool,
    has_backing: bool,
    /// Prepare stored the bitmaps (they are no longer marked in use).
    stored_bitmaps: bool,
}

fn io_err(what: &str, e: io::Error) -> BlockError {
    BlockError::io(what.to_string(), e)
}

impl Qcow2Driver {
    pub(super) async fn prepare_reopen(
        &self,
        req: &ReopenRequest<'_>,
    ) -> Result<Staged, BlockError> {
        let settings = match req
            .driver_opts
            .and_then(|o| o.downcast_ref::<DriverOptions>())
        {
            Some(DriverOptions::Qcow2(o)) => Some(Settings::from_options(
                o,
                &self.geo,
                self.shown.lazy_bit,
                req.new.discard_unmap,
            )?),
            _ => None,
        };
        if req.becomes_writable() && self.shown.corrupt {
            return Err(BlockError::new(
                ErrorKind::Corrupt,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let mut m = self.meta.clone().lock_owned().await;
        let lazy_off = settings.as_ref().is_some_and(|s| !s.lazy) && m.lazy;
        let writable_now = !self.read_only.load(Ordering::Acquire);
        let mut stored_bitmaps = false;
        if writable_now && (req.becomes_read_only() || lazy_off) {
            // Everything on disk before the write permission goes (or
            // before lazy refcounts stop covering a crash).
            let _excl = self.reuse.write().await;
            if req.becomes_read_only() {
                let source = self
                    .bitmap_source
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(source) = source {
                    bitmaps::store::store(&mut m, &source()).await?;
                    stored_bitmaps = true;
                }
            }
            m.close()
                .await
                .map_err(|e| io_err("Could not flush qcow2 metadata", e))?;
        }
        Ok(Box::new(Qcow2Staged {
            meta: m,
            settings,
            read_only: req.new.read_only,
            has_backing: req.child("backing").is_some(),
            stored_bitmaps,
        }))
    }

    pub(super) fn commit_reopen(&self, staged: Staged) {
        let Ok(mut st) = staged.downcast::<Qcow2Staged>() else {
            return;
        };
        if let Some(s) = &st.settings {
            s.apply(&mut st.meta);
        }
        st.meta.has_backing = st.has_backing;
        self.read_only.store(st.read_only, Ordering::Release);
    }

    /// Drops a prepared reopen. If prepare stored the bitmaps, the node
    /// stays writable and they keep changing, so they are marked in use
    /// again, by a task that holds the metadata lock from here (no request
    /// runs before). QEMU instead leaves them stored and read-only in
    /// memory after an abort (`qcow2_reopen_abort` does nothing for them),
    /// which makes later writes to the node fail.
    pub(super) fn abort_reopen(&self, staged: Staged) {
        let Ok(st) = staged.downcast::<Qcow2Staged>() else {
            return;
        };
        if !st.stored_bitmaps {
            return;
        }
        let mut m = st.meta;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = bitmaps::store::mark_all_in_use(&mut m).await {
                    tracing::error!("qcow2: {}", e.msg);
                }
            });
        }
    }

    /// After becoming writable: what opening read-write does. On error
    /// the driver is read-only again (the graph makes the node so too).
    pub(super) async fn finish_reopen(&self) -> Result<(), BlockError> {
        let r = self.finish_read_write().await;
        if r.is_err() {
            self.read_only.store(true, Ordering::Release);
        }
        r
    }

    async fn finish_read_write(&self) -> Result<(), BlockError> {
        if self.read_only.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        let fail = |e| io_err("Could not reopen qcow2 image read-write", e);
        if self.geo.version >= 3 {
            let ac = self.file_io().read(OFF_AUTOCLEAR, 8).await.map_err(fail)?;
            let ac = u64::from_be_bytes(ac[..8].try_into().expect("8 bytes"));
            if ac & !AUTOCLEAR_MASK != 0 {
                bitmaps::store::clear_unknown_autoclear(&mut m, ac)
                    .await
                    .map_err(fail)?;
            }
        }
        bitmaps::store::mark_all_in_use(&mut m).await?;
        if m.incompat & INCOMPAT_DIRTY != 0 {
            check::rebuild_refcounts(&mut m).await.map_err(fail)?;
            m.mark_clean().await.map_err(fail)?;
        }
        Ok(())
    }
}

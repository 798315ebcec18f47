//! `throttle`: a filter that passes its `file` child's I/O through a
//! throttle group (QEMU's `block/throttle.c`). Reads count as reads;
//! writes, write-zeroes and discards as writes; flushes and block status
//! are not limited. The group is a `throttle-group` object that must exist
//! when the node is opened or reopened (QEMU's `throttle_configure_tgm`).
//!
//! A drained section over the node lets its queued requests go at once
//! (QEMU's `throttle_co_drain_begin`); a reopen may move the node to
//! another group (`throttle_reopen_prepare`/`_commit`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use blockd_core::driver::PrepareFuture;
use blockd_core::perm::default_perms;
use blockd_core::throttle::{Direction, ThrottleGroup, ThrottleGroups, ThrottleMember};
use blockd_core::{
    BlockDriver, BlockError, BlockStatus, Child, ChildRef, ChildRole, IoFuture, PermPair,
    ReopenRequest, ReqFlags, Staged,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::open::OpenCtx;
use crate::options::{BlockdevRef, DriverOptions};

/// `BlockdevOptionsThrottle`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleOptions {
    /// The throttle group's name (a `throttle-group` object's id).
    #[serde(rename = "throttle-group")]
    pub throttle_group: String,
    /// The filtered child.
    pub file: BlockdevRef,
}

/// The `throttle` filter driver.
pub struct ThrottleDriver {
    file: ChildRef,
    groups: Arc<ThrottleGroups>,
    member: RwLock<Arc<ThrottleMember>>,
    /// Drained sections covering the node (a member joined meanwhile is
    /// disabled as many times).
    drained: AtomicUsize,
}

impl std::fmt::Debug for ThrottleDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleDriver")
            .field("group", &self.group_name())
            .finish()
    }
}

/// The group called `name`, with QEMU's message if there is none.
fn find_group(groups: &ThrottleGroups, name: &str) -> Result<Arc<ThrottleGroup>, BlockError> {
    groups
        .get(name)
        .ok_or_else(|| BlockError::invalid(format!("Throttle group '{name}' does not exist")))
}

/// Opens a `throttle` node over its `file` child.
pub async fn open(o: ThrottleOptions, ctx: &mut OpenCtx<'_>) -> Result<ThrottleDriver, BlockError> {
    let groups = ctx
        .env()
        .throttle_groups
        .clone()
        .ok_or_else(|| BlockError::invalid("Throttle groups are not available"))?;
    let group = find_group(&groups, &o.throttle_group)?;
    let file = ctx
        .open_child("file", o.file, ChildRole::FILTERED | ChildRole::PRIMARY)
        .await?;
    Ok(ThrottleDriver {
        file,
        groups,
        member: RwLock::new(Arc::new(group.join())),
        drained: AtomicUsize::new(0),
    })
}

impl ThrottleDriver {
    fn member(&self) -> Arc<ThrottleMember> {
        self.member
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The group the node is in.
    pub fn group_name(&self) -> String {
        self.member().group().name().to_string()
    }

    async fn limit(&self, dir: Direction, bytes: u64) {
        self.member().intercept(dir, bytes).await;
    }
}

/// A JSON value for a child in a `json:` filename: its own `json:`
/// options, or its driver and file name.
fn child_json(c: &ChildRef) -> serde_json::Value {
    let n = c.node();
    let f = n.filename();
    if let Some(j) = f
        .strip_prefix("json:")
        .and_then(|j| serde_json::from_str(j).ok())
    {
        return j;
    }
    serde_json::json!({"driver": n.driver().format_name(), "filename": f})
}

/// JSON as QEMU prints a `json:` file name (`qobject_to_json`): `", "`
/// and `": "` between items.
pub(crate) fn qemu_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), qemu_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        v => v.to_string(),
    }
}

impl BlockDriver for ThrottleDriver {
    fn format_name(&self) -> &'static str {
        "throttle"
    }

    fn length(&self) -> u64 {
        self.file.node().length()
    }

    fn filename(&self) -> Option<String> {
        // The group is a strong option: the name is a json: one (QEMU's
        // bdrv_refresh_filename with throttle's strong_runtime_opts).
        let mut m = serde_json::Map::new();
        m.insert("throttle-group".into(), self.group_name().into());
        m.insert("driver".into(), "throttle".into());
        m.insert("file".into(), child_json(&self.file));
        Some(format!("json:{}", qemu_json(&serde_json::Value::Object(m))))
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            self.limit(Direction::Read, len as u64).await;
            self.file.node().read(offset, len).await
        })
    }

    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.limit(Direction::Write, data.len() as u64).await;
            self.file.node().write(offset, data, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.limit(Direction::Write, len).await;
            self.file.node().write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.limit(Direction::Write, len).await;
            self.file.node().discard(offset, len).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file.node().flush().await })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move { self.file.node().block_status(offset, len).await })
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file.node().truncate(len).await })
    }

    fn child_perm(&self, child: &Child, parent: PermPair, writable: bool) -> PermPair {
        default_perms(child.role(), parent, writable)
    }

    fn drained_begin(&self) {
        self.drained.fetch_add(1, Ordering::SeqCst);
        self.member().disable();
    }

    fn drained_end(&self) {
        self.member().enable();
        self.drained.fetch_sub(1, Ordering::SeqCst);
    }

    fn reopen_prepare<'a>(&'a self, req: &'a ReopenRequest<'a>) -> PrepareFuture<'a> {
        Box::pin(async move {
            let Some(DriverOptions::Throttle(o)) = req
                .driver_opts
                .and_then(|o| o.downcast_ref::<DriverOptions>())
            else {
                return Ok(Box::new(None::<Arc<ThrottleGroup>>) as Staged);
            };
            let g = find_group(&self.groups, &o.throttle_group)?;
            Ok(Box::new(Some(g)) as Staged)
        })
    }

    fn reopen_commit(&self, staged: Staged) {
        let Ok(g) = staged.downcast::<Option<Arc<ThrottleGroup>>>() else {
            return;
        };
        let Some(g) = *g else { return };
        if g.name() == self.group_name() {
            return;
        }
        let m = g.join();
        for _ in 0..self.drained.load(Ordering::SeqCst) {
            m.disable();
        }
        // The old membership goes (releasing anything queued there).
        let old = std::mem::replace(
            &mut *self.member.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(m),
        );
        old.leave();
    }
}

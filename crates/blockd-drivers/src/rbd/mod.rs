//! `rbd`: a node whose data is an image in a Ceph cluster, through librbd
//! (QEMU's block/rbd.c). Connecting follows `qemu_rbd_connect` (client
//! id, configuration file, monitors, key from a `secret` object,
//! authentication modes, cache mode, pool, namespace) with its messages;
//! an `rbd:` name's other `KEY=VALUE` settings go to Ceph after the
//! configuration file, as `qemu_rbd_set_keypairs` does; opening follows
//! `qemu_rbd_open`, requests `qemu_rbd_start_co`, block
//! status `qemu_rbd_co_block_status` (librbd's fast-diff through
//! `rbd_diff_iterate2`), truncation `qemu_rbd_co_truncate`. `encrypt`
//! loads librbd's LUKS encryption ([`encrypt`]); the node then shows the
//! payload, and its size is the payload's. Internal snapshots are RBD
//! snapshots ([`snap`]: `qemu_rbd_snap_create`, `_remove`, `_list`).
//!
//! Every request is one of librbd's asynchronous requests
//! ([`image::Image`]); only what librbd offers synchronously (connect,
//! open, resize, diff iteration, taking and removing snapshots) runs on
//! the blocking pool. Listing snapshots runs in place: librbd answers it
//! from memory unless the image's header changed ([`snap`]).

pub mod create;
pub mod encrypt;
pub mod image;
mod known;
pub mod snap;
pub mod sys;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockd_core::driver::{PrepareFuture, Staged};
use blockd_core::error::strerror;
use blockd_core::reopen::ReopenRequest;
use blockd_core::{
    BlockDriver, BlockError, BlockStatus, DriverInfo, IoFuture, IoLimits, NodeOptions, ReqFlags,
};
use bytes::Bytes;

use crate::options::{RbdAuthMode, RbdImageEncryptionFormat, RbdOptions};
use crate::secrets::Secrets;
use image::{Cluster, Image, Pool};

fn io_err(msg: String) -> BlockError {
    BlockError::new(blockd_core::ErrorKind::Io, msg)
}

/// `qemu_rbd_mon_host`: the monitors as Ceph's `mon_host` value.
pub fn mon_host(o: &RbdOptions) -> Option<String> {
    let s = o.server.as_ref().filter(|s| !s.is_empty())?;
    Some(
        s.iter()
            .map(|a| {
                if a.host.contains(':') {
                    format!("[{}]:{}", a.host, a.port)
                } else {
                    format!("{}:{}", a.host, a.port)
                }
            })
            .collect::<Vec<_>>()
            .join(";"),
    )
}

/// The key of `key-secret` in base64 (what Ceph's `key` option takes).
fn key_base64(o: &RbdOptions, secrets: Option<&dyn Secrets>) -> Result<Option<String>, BlockError> {
    let Some(id) = &o.key_secret else {
        return Ok(None);
    };
    let Some(s) = secrets else {
        return Err(BlockError::not_found(format!("No secret with id '{id}'")));
    };
    s.lookup_base64(id).map(Some).map_err(BlockError::invalid)
}

/// `qemu_rbd_connect` (blocking): a connected cluster with an I/O context
/// on the pool and namespace. `key` is the user's key in base64.
pub fn connect(o: &RbdOptions, cache: bool, key: Option<&str>) -> Result<Pool, BlockError> {
    let cluster = Cluster::create(o.user.as_deref())
        .map_err(|e| io_err(format!("error initializing: {}", strerror(&e))))?;
    // The default locations when no file is named, ignoring failure.
    let r = cluster.read_conf(o.conf.as_deref());
    if let (Some(conf), Err(e)) = (&o.conf, r) {
        return Err(io_err(format!(
            "error reading conf file {conf}: {}",
            strerror(&e)
        )));
    }
    // An `rbd:` name's other options (`qemu_rbd_set_keypairs`).
    for (k, v) in &o.keyvalue_pairs {
        cluster.set(k, v).map_err(|e| {
            BlockError::invalid(format!("invalid conf option {k}: {}", strerror(&e)))
        })?;
    }
    if let Some(m) = mon_host(o) {
        cluster
            .set("mon_host", &m)
            .map_err(|e| io_err(format!("Could not set 'mon_host': {}", strerror(&e))))?;
    }
    if let Some(k) = key {
        cluster
            .set("key", k)
            .map_err(|e| io_err(format!("Could not set 'key': {}", strerror(&e))))?;
    }
    if let Some(modes) = &o.auth_client_required {
        let v = modes
            .iter()
            .map(|m| match m {
                RbdAuthMode::Cephx => "cephx",
                RbdAuthMode::None => "none",
            })
            .collect::<Vec<_>>()
            .join(";");
        cluster.set("auth_client_required", &v).map_err(|e| {
            io_err(format!(
                "Could not set 'auth_client_required': {}",
                strerror(&e)
            ))
        })?;
    }
    // Errors ignored, as QEMU ignores them: the option always exists.
    let _ = cluster.set("rbd_cache", if cache { "true" } else { "false" });
    // Not in QEMU: librbd may send a write's buffer without copying it
    // (librbd.cc `create_write_raw`; only without its cache, which copies
    // anyway). Ceph disables that by default because a guest may change a
    // buffer while it is in flight, and the data would no longer match
    // its checksum. blockd's write buffers are immutable (`Bytes`), and the
    // request owns them until librbd's completion, which librbd holds
    // back until it has released the buffer. With `cache.direct`, 1 MiB
    // writes cost blockd 16% less CPU (benches/rbd.md).
    let _ = cluster.set("rbd_disable_zero_copy_writes", "false");
    cluster
        .connect()
        .map_err(|e| io_err(format!("error connecting: {}", strerror(&e))))?;
    let pool = Pool::open(cluster, &o.pool)
        .map_err(|e| io_err(format!("error opening pool {}: {}", o.pool, strerror(&e))))?;
    let ns = o.namespace.as_deref().unwrap_or("");
    if !ns.is_empty() {
        let exists = pool
            .namespace_exists(ns)
            .map_err(|e| io_err(format!("error checking namespace: {}", strerror(&e))))?;
        if !exists {
            return Err(BlockError::not_found(format!(
                "namespace '{ns}' does not exist"
            )));
        }
    }
    pool.set_namespace(ns)
        .map_err(|e| io_err(format!("error setting namespace: {}", strerror(&e))))?;
    Ok(pool)
}

/// The `rbd` driver.
pub struct RbdDriver {
    image: Arc<Image>,
    size: AtomicU64,
    obj_size: u64,
    filename: String,
    snapshot: bool,
    /// Objects known to exist (block status without librbd).
    known: known::Known,
    /// The first bytes of the image as this node reads them, for the
    /// LUKS magic QEMU looks for (`qemu_rbd_get_specific_info` reads them
    /// on every query; blockd reads them once and follows its own writes).
    head: Mutex<[u8; HEAD]>,
}

/// How many bytes of the image's start tell a LUKS header.
const HEAD: usize = 8;

/// The file name QEMU shows for an rbd node: its strong options
/// (`qemu_rbd_strong_runtime_opts`) as a `json:` name, printed as QEMU
/// prints JSON. (The members' order is the schema's: QEMU's follows its
/// option dictionary's hash order, which a qemu-storage-daemon without
/// the rbd module cannot show.)
fn json_filename(o: &RbdOptions) -> String {
    let mut m = serde_json::Map::new();
    m.insert("driver".into(), "rbd".into());
    m.insert("pool".into(), o.pool.clone().into());
    if let Some(n) = &o.namespace {
        m.insert("namespace".into(), n.clone().into());
    }
    m.insert("image".into(), o.image.clone().into());
    if let Some(c) = &o.conf {
        m.insert("conf".into(), c.clone().into());
    }
    if let Some(s) = &o.snapshot {
        m.insert("snapshot".into(), s.clone().into());
    }
    if let Some(u) = &o.user {
        m.insert("user".into(), u.clone().into());
    }
    if let Some(s) = &o.server {
        m.insert("server".into(), serde_json::to_value(s).unwrap_or_default());
    }
    format!(
        "json:{}",
        crate::throttle::qemu_json(&serde_json::Value::Object(m))
    )
}

/// Opens an `rbd` node (`qemu_rbd_open`); returns the driver and whether
/// the node is read-only.
pub async fn open(
    o: RbdOptions,
    node: &NodeOptions,
    secrets: Option<Arc<dyn Secrets>>,
) -> Result<(RbdDriver, bool), BlockError> {
    let key = key_base64(&o, secrets.as_deref())?;
    let cache = !node.cache_direct;
    let filename = json_filename(&o);
    let (read_only, auto) = (node.read_only, node.auto_read_only);
    tokio::task::spawn_blocking(move || {
        let pool = connect(&o, cache, key.as_deref())?;
        let image = pool
            .open_image(&o.image, o.snapshot.as_deref())
            .map_err(|e| {
                io_err(format!(
                    "error reading header from {}: {}",
                    o.image,
                    strerror(&e)
                ))
            })?;
        if let Some(e) = &o.encrypt {
            encrypt::load(&image, e, secrets.as_deref())?;
        }
        let st = image.stat().map_err(|e| {
            io_err(format!(
                "error getting image info from {}: {}",
                o.image,
                strerror(&e)
            ))
        })?;
        let mut ro = read_only;
        if o.snapshot.is_some() && !ro {
            // bdrv_apply_auto_read_only
            if !auto {
                return Err(BlockError::invalid("rbd snapshots are read-only"));
            }
            ro = true;
        }
        let mut head = [0; HEAD];
        // (QEMU fails the query when this read fails; blockd reports no
        // encryption format rather than failing the open.)
        if st.size >= HEAD as u64 && image.read_sync(0, &mut head).is_err() {
            head = [0; HEAD];
        }
        Ok((
            RbdDriver {
                image: Arc::new(image),
                size: AtomicU64::new(st.size),
                obj_size: st.obj_size,
                filename,
                snapshot: o.snapshot.is_some(),
                known: known::Known::default(),
                head: Mutex::new(head),
            },
            ro,
        ))
    })
    .await
    .map_err(|e| io_err(format!("opening the rbd image failed: {e}")))?
}

/// What `rbd_diff_iterate2` found from `offs`: `bytes` of the same kind.
#[derive(Debug, Default, PartialEq, Eq)]
struct DiffReq {
    offs: u64,
    bytes: u64,
    exists: bool,
}

/// `qemu_rbd_diff_iterate_cb`: accumulates the first run of extents of
/// one kind; returns false to stop at the first change.
fn diff_step(req: &mut DiffReq, offs: u64, len: u64, exists: bool) -> bool {
    if !exists {
        // A hole reads as unallocated: keep looking.
        return true;
    }
    if !req.exists && offs > req.offs {
        // Started in a hole, reached data: the hole ends here.
        req.bytes = offs - req.offs;
        return false;
    }
    if req.exists && offs > req.offs + req.bytes {
        // Started in data, jumped over a hole: the data ended.
        return false;
    }
    req.bytes += len;
    req.exists = true;
    true
}

impl RbdDriver {
    /// Reads the head again after a request changed `[offset, offset +
    /// len)`, if that touches it (a discard may or may not zero it).
    async fn refresh_head(&self, offset: u64, len: u64) {
        if offset >= HEAD as u64 || len == 0 {
            return;
        }
        if let Ok(b) = self.image.read(0, HEAD).await {
            let mut h = self.head.lock().unwrap_or_else(|e| e.into_inner());
            h.copy_from_slice(&b[..HEAD]);
        }
    }

    /// The encryption format the image's start shows (none while the
    /// node reads through librbd's encryption: it shows the payload).
    fn encryption_format(&self) -> Option<RbdImageEncryptionFormat> {
        encrypt::probe(&*self.head.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The objects `[offset, offset + len)` touches (len > 0).
    fn objects(&self, offset: u64, len: u64) -> (u64, u64) {
        let o = self.obj_size.max(1);
        (offset / o, (offset + len.max(1) - 1) / o)
    }

    /// `qemu_rbd_co_block_status` (blocking): whether the range from
    /// `offset` holds data, and how far.
    fn block_status_sync(image: &Image, obj_size: u64, offset: u64, bytes: u64) -> BlockStatus {
        let data = BlockStatus {
            len: bytes,
            data: true,
            zero: false,
            allocated: true,
        };
        // Without a valid fast-diff map, everything counts as data.
        let Ok(features) = image.features() else {
            return data;
        };
        if features & sys::RBD_FEATURE_FAST_DIFF == 0 {
            return data;
        }
        match image.flags() {
            Ok(f) if f & sys::RBD_FLAG_FAST_DIFF_INVALID == 0 => {}
            _ => return data,
        }
        // librbd before 1.17 (Ceph bug 53784) reports wrong offsets when
        // the start is not object aligned: start at the object, which is
        // right only for images with default striping and no parent.
        if features & sys::RBD_FEATURE_STRIPINGV2 != 0 || image.has_parent() {
            return data;
        }
        let head = offset % obj_size.max(1);
        let mut req = DiffReq {
            offs: offset - head,
            ..DiffReq::default()
        };
        let total = bytes + head;
        let r = image.diff_iterate(req.offs, total, true, &mut |o, l, e| {
            diff_step(&mut req, o, l, e)
        });
        let stopped = match r {
            Ok(s) => s,
            Err(_) => return data,
        };
        if !req.exists {
            if !stopped {
                // No extent at all.
                req.bytes = total;
            }
            req.bytes = req.bytes.min(total);
            if req.bytes <= head {
                return data;
            }
            return BlockStatus {
                len: req.bytes - head,
                data: false,
                zero: true,
                allocated: true,
            };
        }
        let n = req.bytes.min(total);
        if n <= head {
            return data;
        }
        BlockStatus {
            len: n - head,
            ..data
        }
    }
}

impl BlockDriver for RbdDriver {
    fn format_name(&self) -> &'static str {
        "rbd"
    }

    fn limits(&self) -> IoLimits {
        // qemu_rbd_refresh_limits: discards and zeroes by whole objects.
        let obj = u32::try_from(self.obj_size).unwrap_or(0);
        IoLimits {
            pdiscard_alignment: obj,
            pwrite_zeroes_alignment: obj,
            ..IoLimits::default()
        }
    }

    fn length(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            cluster_size: Some(self.obj_size),
            format_specific: Some(serde_json::json!({"type": "rbd", "data": match self
                .encryption_format()
            {
                Some(f) => serde_json::json!({"encryption-format": f}),
                None => serde_json::json!({}),
            }})),
            ..DriverInfo::default()
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move { self.image.read(offset, len).await.map(Bytes::from) })
    }

    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            self.image.write(offset, data).await?;
            self.refresh_head(offset, len).await;
            if len > 0 {
                let (a, b) = self.objects(offset, len);
                self.known.set(a, b);
            }
            // librbd has no FUA: QEMU's block layer flushes after the write.
            if flags.fua {
                self.image.flush().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // Thick (allocated) zeroes unless the range may be unmapped.
            self.image
                .write_zeroes(offset, len, !flags.may_unmap)
                .await?;
            self.refresh_head(offset, len).await;
            if flags.fua {
                self.image.flush().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        if len > 0 {
            let (a, b) = self.objects(offset, len);
            self.known.clear(a, b);
        }
        Box::pin(async move {
            self.image.discard(offset, len).await?;
            self.refresh_head(offset, len).await;
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.image.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        let image = self.image.clone();
        let obj = self.obj_size.max(1);
        Box::pin(async move {
            // Objects known to exist are data without asking librbd.
            let first = offset / obj;
            let (_, last) = self.objects(offset, len);
            let n = self.known.run(first, last - first + 1);
            if n > 0 {
                return Ok(BlockStatus {
                    len: ((first + n) * obj).min(offset + len) - offset,
                    data: true,
                    zero: false,
                    allocated: true,
                });
            }
            let st = tokio::task::spawn_blocking(move || {
                Self::block_status_sync(&image, obj, offset, len)
            })
            .await
            .map_err(io::Error::other)?;
            if st.data {
                let (a, b) = self.objects(offset, st.len);
                self.known.set(a, b);
            }
            Ok(st)
        })
    }

    fn snapshots(&self) -> Option<Vec<blockd_core::snapshot::SnapshotInfo>> {
        Some(snap::list(&self.image))
    }

    fn snapshot_create(
        &self,
        sn: blockd_core::snapshot::SnapshotInfo,
    ) -> IoFuture<'_, blockd_core::snapshot::SnapshotInfo> {
        Box::pin(snap::create(self.image.clone(), sn))
    }

    fn snapshot_delete<'a>(
        &'a self,
        id: Option<&'a str>,
        name: Option<&'a str>,
    ) -> IoFuture<'a, blockd_core::snapshot::SnapshotInfo> {
        Box::pin(snap::remove(self.image.clone(), id, name))
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        let image = self.image.clone();
        Box::pin(async move {
            self.known.clear_all();
            tokio::task::spawn_blocking(move || image.resize(len))
                .await
                .map_err(io::Error::other)??;
            self.size.store(len, Ordering::Release);
            if len < HEAD as u64 {
                *self.head.lock().unwrap_or_else(|e| e.into_inner()) = [0; HEAD];
            }
            Ok(())
        })
    }

    fn reopen_prepare<'a>(&'a self, req: &'a ReopenRequest<'a>) -> PrepareFuture<'a> {
        Box::pin(async move {
            if self.snapshot && !req.new.read_only {
                return Err(BlockError::invalid(format!(
                    "Cannot change node '{}' to r/w when using RBD snapshot",
                    req.node_name
                )));
            }
            Ok(Box::new(()) as Staged)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::InetAddrBase;

    fn opts() -> RbdOptions {
        serde_json::from_value(serde_json::json!({"pool": "p", "image": "i"})).unwrap()
    }

    #[test]
    fn monitors_as_qemu_joins_them() {
        let mut o = opts();
        assert_eq!(mon_host(&o), None);
        o.server = Some(vec![
            InetAddrBase {
                host: "10.0.0.1".into(),
                port: "6789".into(),
            },
            InetAddrBase {
                host: "::1".into(),
                port: "3300".into(),
            },
        ]);
        assert_eq!(mon_host(&o).unwrap(), "10.0.0.1:6789;[::1]:3300");
    }

    #[test]
    fn filename_has_the_strong_options_only() {
        let mut o = opts();
        o.key_secret = Some("k".into());
        assert_eq!(
            json_filename(&o),
            r#"json:{"driver": "rbd", "pool": "p", "image": "i"}"#
        );
    }

    /// The diff walk as QEMU's callback does it: the first run of one kind.
    #[test]
    fn diff_steps_stop_at_the_first_change() {
        // From a hole into data at 8192.
        let mut r = DiffReq {
            offs: 0,
            ..DiffReq::default()
        };
        assert!(diff_step(&mut r, 4096, 4096, false));
        assert!(!diff_step(&mut r, 8192, 4096, true));
        assert_eq!((r.bytes, r.exists), (8192, false));
        // Data, data, then a gap.
        let mut r = DiffReq::default();
        assert!(diff_step(&mut r, 0, 4096, true));
        assert!(diff_step(&mut r, 4096, 4096, true));
        assert!(!diff_step(&mut r, 16384, 4096, true));
        assert_eq!((r.bytes, r.exists), (8192, true));
    }
}

//! Tests of [`super::BlockBackend`] over an in-memory driver that can be
//! told to fail.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use bytes::Bytes;
use std::io;

use crate::driver::ReqFlags;
use crate::driver::{BlockDriver, IoFuture};
use crate::node::NodeOptions;
use crate::runstate::RunStatus;

struct Mem {
    data: Mutex<Vec<u8>>,
    /// errno the next request fails with (0: none).
    fail: Arc<AtomicI32>,
}

impl BlockDriver for Mem {
    fn format_name(&self) -> &'static str {
        "mem"
    }

    fn length(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let e = self.fail.swap(0, Ordering::SeqCst);
            if e != 0 {
                return Err(io::Error::from_raw_os_error(e));
            }
            let d = self.data.lock().unwrap();
            Ok(Bytes::copy_from_slice(
                &d[offset as usize..offset as usize + len],
            ))
        })
    }

    fn write(&self, offset: u64, data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let e = self.fail.swap(0, Ordering::SeqCst);
            if e != 0 {
                return Err(io::Error::from_raw_os_error(e));
            }
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }
}

fn mem_node(graph: &BlockGraph, name: &str, size: usize) -> (Arc<BlockNode>, Arc<AtomicI32>) {
    let fail = Arc::new(AtomicI32::new(0));
    let drv = Mem {
        data: Mutex::new(vec![0x11; size]),
        fail: fail.clone(),
    };
    let n = Arc::new(BlockNode::new(
        name.into(),
        false,
        NodeOptions::default(),
        Box::new(drv),
    ));
    graph.insert(std::slice::from_ref(&n), &n, true).unwrap();
    (n, fail)
}

fn rw() -> PermPair {
    PermPair {
        perm: Perm::CONSISTENT_READ | Perm::WRITE,
        shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    }
}

fn cd_link() -> DeviceLink {
    DeviceLink {
        id: "cd0".into(),
        path: "/machine/peripheral/cd0".into(),
        removable: true,
        has_tray: true,
        tray_open: false,
        locked: false,
        eject_request: false,
    }
}

#[tokio::test]
async fn medium_and_tray_gate_io() {
    let g = BlockGraph::new();
    let run = Arc::new(RunState::default());
    let b = BlockBackend::new("", rw(), run);
    assert_eq!(
        b.read(0, 512).await.unwrap_err().raw_os_error(),
        Some(libc::ENOMEDIUM)
    );
    let (n, _) = mem_node(&g, "n0", 4096);
    b.insert(&g, n.clone()).unwrap();
    assert!(b.insert(&g, n.clone()).is_err());
    // The backend is a user: the node cannot be deleted.
    assert_eq!(g.remove("n0").unwrap_err().msg, "Node n0 is in use");
    assert!(g.has_backend_user(&n));
    assert_eq!(b.read(0, 512).await.unwrap()[0], 0x11);
    assert!(b.attach_dev(cd_link()));
    assert!(!b.attach_dev(cd_link()));
    let ev = b.change_media(false).unwrap();
    assert_eq!((ev.id.as_str(), ev.tray_open), ("cd0", true));
    assert!(b.change_media(false).is_none());
    assert_eq!(
        b.read(0, 512).await.unwrap_err().raw_os_error(),
        Some(libc::ENOMEDIUM)
    );
    assert!(b.change_media(true).is_some_and(|e| !e.tray_open));
    let old = b.remove(&g).unwrap();
    assert_eq!(old.name(), "n0");
    assert!(!g.has_backend_user(&n));
    assert!(g.remove("n0").is_ok());
}

#[tokio::test]
async fn accounting_counts_requests() {
    let g = BlockGraph::new();
    let b = BlockBackend::new("d0", rw(), Arc::new(RunState::default()));
    let (n, fail) = mem_node(&g, "n0", 8192);
    b.insert(&g, n).unwrap();
    b.write(0, Bytes::from(vec![7u8; 1024]), ReqFlags::default())
        .await
        .unwrap();
    b.read(0, 512).await.unwrap();
    b.read(512, 512).await.unwrap();
    b.flush().await.unwrap();
    assert!(b.read(8000, 512).await.is_err());
    fail.store(libc::EIO, Ordering::SeqCst);
    assert!(b.read(0, 512).await.is_err());
    let s = b.stats().snapshot();
    assert_eq!((s.read.ops, s.read.bytes), (2, 1024));
    assert_eq!((s.write.ops, s.write.bytes), (1, 1024));
    assert_eq!(s.flush.ops, 1);
    assert_eq!(s.read.invalid, 1);
    assert_eq!(s.read.failed, 1);
    assert!(s.idle_time_ns.is_some());
}

#[tokio::test]
async fn io_waits_while_stopped() {
    let g = BlockGraph::new();
    let run = Arc::new(RunState::default());
    let b = Arc::new(BlockBackend::new("d0", rw(), run.clone()));
    let (n, _) = mem_node(&g, "n0", 4096);
    b.insert(&g, n).unwrap();
    run.set(RunStatus::Paused);
    let b2 = b.clone();
    let t = tokio::spawn(async move { b2.read(0, 512).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!t.is_finished());
    run.set(RunStatus::Running);
    let d = tokio::time::timeout(Duration::from_secs(5), t)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.len(), 512);
}

#[tokio::test]
async fn error_policies() {
    let g = BlockGraph::new();
    let run = Arc::new(RunState::default());
    let b = Arc::new(BlockBackend::new("d0", rw(), run.clone()));
    let (n, fail) = mem_node(&g, "n0", 4096);
    b.insert(&g, n).unwrap();
    b.iostatus_enable();
    // Default: werror=enospc, rerror=report.
    assert!(b.iostatus_is_enabled());
    assert_eq!(b.error_action(true, libc::ENOSPC), ErrorAction::Report);
    assert_eq!(b.error_action(false, libc::ENOSPC), ErrorAction::Stop);
    assert_eq!(b.error_action(false, libc::EIO), ErrorAction::Report);

    b.set_on_error(OnError::Ignore, OnError::Stop);
    fail.store(libc::EIO, Ordering::SeqCst);
    assert_eq!(b.read(0, 16).await.unwrap(), Bytes::from(vec![0u8; 16]));

    fail.store(libc::ENOSPC, Ordering::SeqCst);
    let b2 = b.clone();
    let t = tokio::spawn(async move {
        b2.write(0, Bytes::from_static(b"abc"), ReqFlags::default())
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(run.get(), RunStatus::IoError);
    assert_eq!(b.iostatus(), IoStatus::Nospace);
    assert!(!t.is_finished());
    b.iostatus_reset();
    run.set(RunStatus::Running);
    tokio::time::timeout(Duration::from_secs(5), t)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(b.iostatus(), IoStatus::Ok);
    assert_eq!(&b.read(0, 3).await.unwrap()[..], b"abc");
    let s = b.stats().snapshot();
    assert_eq!((s.write.ops, s.write.failed), (1, 0));
}

#[tokio::test]
async fn read_only_backend_refuses_writes_and_perm_conflicts_are_reported() {
    let g = BlockGraph::new();
    let run = Arc::new(RunState::default());
    let ro = PermPair {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    };
    let a = BlockBackend::new("", ro, run.clone());
    let (n, _) = mem_node(&g, "n0", 4096);
    a.insert(&g, n.clone()).unwrap();
    assert!(!a.is_writable());
    let e = a
        .write(0, Bytes::from_static(b"x"), ReqFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    // A writer cannot join a user that does not share write.
    let w = BlockBackend::new("w", rw(), run);
    let err = w.insert(&g, n.clone()).unwrap_err();
    assert!(err.msg.contains("Permission conflict"), "{}", err.msg);
    // Nor can the reader start writing... unless nobody objects.
    assert!(a.set_perm(&g, rw()).is_ok());
    assert!(a.is_writable());
}

#[tokio::test]
async fn probed_raw_images_keep_their_first_sector_raw() {
    let g = BlockGraph::new();
    let b = BlockBackend::new("d0", rw(), Arc::new(RunState::default()));
    let (n, _) = mem_node(&g, "n0", 4096);
    b.insert(&g, n).unwrap();
    b.set_probed_raw(true);
    let mut hdr = vec![0u8; 512];
    hdr[..4].copy_from_slice(b"QFI\xfb");
    hdr[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = b
        .write(0, Bytes::from(hdr), ReqFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    b.write(0, Bytes::from(vec![1u8; 512]), ReqFlags::default())
        .await
        .unwrap();
    b.write(600, Bytes::from_static(b"QFI\xfb"), ReqFlags::default())
        .await
        .unwrap();
}

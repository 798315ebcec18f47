//! Unit tests of the `file` driver on real temporary files.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use blockd_core::{BlockDriver, ErrorKind, NodeOptions, Perm, PermPair, ReqFlags};
use bytes::Bytes;

use super::lock::{self, LockCmds};
use super::*;
use crate::open::{Env, FdSets};
use crate::options::{Aio, FileOptions, OnOffAuto};

/// A uniquely named temporary directory, removed on drop.
pub(super) struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory under `base`.
    pub fn new_in(base: &Path, tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = base.join(format!(
            "blockd-file-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// A new directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// A path inside the directory, as a string.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("utf-8 path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn fopts(path: &str) -> FileOptions {
    FileOptions {
        filename: path.to_string(),
        locking: None,
        aio: None,
        aio_max_batch: None,
        drop_cache: None,
    }
}

pub(super) fn rw() -> NodeOptions {
    NodeOptions::default()
}

pub(super) fn ro() -> NodeOptions {
    NodeOptions {
        read_only: true,
        ..NodeOptions::default()
    }
}

pub(super) async fn open_with(path: &str, node: NodeOptions) -> FileDriver {
    let (d, _) = open(fopts(path), &node, &Env::default())
        .await
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    d
}

async fn open_err(o: FileOptions, node: NodeOptions, env: &Env) -> BlockError {
    match open(o, &node, env).await {
        Ok(_) => panic!("open unexpectedly succeeded"),
        Err(e) => e,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(super) fn make_file(path: &str, data: &[u8]) {
    std::fs::write(path, data).expect("write test file");
}

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

#[tokio::test]
async fn read_write_and_eof() {
    let dir = TempDir::new("rw");
    let path = dir.file("img");
    let init = pattern(10_000, 1);
    make_file(&path, &init);
    let d = open_with(&path, rw()).await;
    assert_eq!(d.format_name(), "file");
    // Whole sectors, as QEMU counts.
    assert_eq!(d.length(), 10_240);
    assert_eq!(d.limits().request_alignment, 1);
    assert_eq!(d.filename().as_deref(), Some(path.as_str()));

    assert_eq!(&d.read(0, 4096).await.unwrap()[..], &init[..4096]);
    // A read across the end: the rest reads as zeroes.
    let tail = d.read(8192, 4096).await.unwrap();
    assert_eq!(tail.len(), 4096);
    assert_eq!(&tail[..10_000 - 8192], &init[8192..]);
    assert!(tail[10_000 - 8192..].iter().all(|&b| b == 0));

    let new = pattern(3000, 7);
    d.write(100, Bytes::from(new.clone()), ReqFlags::default())
        .await
        .unwrap();
    assert_eq!(&d.read(100, 3000).await.unwrap()[..], &new[..]);
    // A write past the end extends the file and the cached length.
    d.write(
        20_000,
        Bytes::from_static(b"end"),
        ReqFlags {
            fua: true,
            ..ReqFlags::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(d.length(), 20_480);
    assert_eq!(file_len(&path), 20_003);
    let gap = d.read(10_000, 10_003).await.unwrap();
    assert!(gap[..10_000].iter().all(|&b| b == 0));
    assert_eq!(&gap[10_000..], b"end");
    d.flush().await.unwrap();
    // Nothing written since: the flush has nothing to do, and succeeds.
    d.flush().await.unwrap();
    d.close().await.unwrap();

    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[100..3100], &new[..]);
    assert_eq!(&on_disk[20_000..], b"end");
}

/// Whole-page writes within the file run inline (on a local file system);
/// the others (partial pages, growing the file, too large, breaker off)
/// go to the pool. Either way the bytes land and the length is right.
#[tokio::test]
async fn inline_and_pool_writes_land_alike() {
    let dir = TempDir::new("inline");
    let path = dir.file("img");
    let size = 2 << 20;
    make_file(&path, &vec![0u8; size]);
    let d = open_with(&path, rw()).await;
    let w = &d.inner.inline_writes;
    let len = d.length();
    let mut expect = vec![0u8; size];
    let cases: [(u64, usize, bool); 5] = [
        (8192, 4096, true),
        (65536, 65536, true),
        (4096 + 512, 4096, false),
        (0, (1 << 20) + 4096, false),
        (size as u64 - 4096, 8192, false),
    ];
    for (i, &(off, n, inline)) in cases.iter().enumerate() {
        // Inline only if the file system qualifies at all.
        let local = w.may(0, 4096, len);
        assert_eq!(w.may(off, n, len), inline && local, "case {i}");
        let data = pattern(n, i as u8 + 1);
        d.write(off, Bytes::from(data.clone()), ReqFlags::default())
            .await
            .unwrap();
        let end = off as usize + n;
        if expect.len() < end {
            expect.resize(end, 0);
        }
        expect[off as usize..end].copy_from_slice(&data);
    }
    // With the breaker off, a whole-page write goes to the pool.
    w.took(inline::STALL_MAX * 2);
    assert!(!w.may(8192, 4096, len));
    let data = pattern(4096, 99);
    d.write(8192, Bytes::from(data.clone()), ReqFlags::default())
        .await
        .unwrap();
    expect[8192..12288].copy_from_slice(&data);
    assert_eq!(d.length(), expect.len() as u64);
    d.close().await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), expect);

    // `--inline-writes off`: never inline, writes still land.
    let env = Env {
        no_inline_writes: true,
        ..Env::default()
    };
    let (d, _) = open(fopts(&path), &rw(), &env).await.unwrap();
    assert!(!d.inner.inline_writes.may(0, 4096, d.length()));
    let data = pattern(4096, 77);
    d.write(0, Bytes::from(data.clone()), ReqFlags::default())
        .await
        .unwrap();
    d.close().await.unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[..4096], &data[..]);
}

#[tokio::test]
async fn read_only_node_opens_read_only() {
    let dir = TempDir::new("ro");
    let path = dir.file("img");
    make_file(&path, &pattern(4096, 3));
    let (d, ro_used) = open(fopts(&path), &ro(), &Env::default()).await.unwrap();
    assert!(ro_used);
    let e = d
        .write(0, Bytes::from_static(b"x"), ReqFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    let (_, ro_used) = open(fopts(&path), &rw(), &Env::default()).await.unwrap();
    assert!(!ro_used);
}

#[tokio::test]
async fn write_zeroes_variants() {
    let dir = TempDir::new("zero");
    let path = dir.file("img");
    let len = 1 << 20;
    make_file(&path, &pattern(len, 9));
    let d = open_with(&path, rw()).await;
    let zero = |b: &Bytes| b.iter().all(|&x| x == 0);

    // Plain zeroing (ZERO_RANGE where supported).
    d.write_zeroes(4096, 8192, ReqFlags::default())
        .await
        .unwrap();
    assert!(zero(&d.read(4096, 8192).await.unwrap()));
    assert_ne!(d.read(0, 4096).await.unwrap()[..], [0u8; 4096][..]);

    // May unmap: a hole afterwards.
    d.write_zeroes(
        65536,
        65536,
        ReqFlags {
            may_unmap: true,
            ..ReqFlags::default()
        },
    )
    .await
    .unwrap();
    assert!(zero(&d.read(65536, 65536).await.unwrap()));
    let st = d.block_status(65536, 65536).await.unwrap();
    assert!(st.zero && !st.data && st.allocated, "{st:?}");

    // No fallback: works where fallocate does (it does on ext4/tmpfs/xfs),
    // otherwise it must fail with ENOTSUP rather than write.
    match d
        .write_zeroes(
            131_072,
            4096,
            ReqFlags {
                no_fallback: true,
                ..ReqFlags::default()
            },
        )
        .await
    {
        Ok(()) => assert!(zero(&d.read(131_072, 4096).await.unwrap())),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOTSUP)),
    }

    // Past the end, with and without unmap: the file grows.
    d.write_zeroes(len as u64 + 4096, 4096, ReqFlags::default())
        .await
        .unwrap();
    assert_eq!(d.length(), len as u64 + 8192);
    assert_eq!(file_len(&path), len as u64 + 8192);
    d.write_zeroes(
        len as u64 + 65536,
        65536,
        ReqFlags {
            may_unmap: true,
            ..ReqFlags::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(d.length(), len as u64 + 131_072);
    assert_eq!(file_len(&path), len as u64 + 131_072);
    assert!(zero(&d.read(len as u64, 131_072).await.unwrap()));
}

#[tokio::test]
async fn discard_punches_holes() {
    let dir = TempDir::new("discard");
    let path = dir.file("img");
    make_file(&path, &pattern(1 << 20, 5));
    let d = open_with(&path, rw()).await;
    d.flush().await.unwrap();
    let before = d.allocated_size().unwrap();
    d.discard(0, 512 * 1024).await.unwrap();
    let after = d.allocated_size().unwrap();
    assert!(after < before, "{after} < {before}");
    assert!(d.read(0, 512 * 1024).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(d.length(), 1 << 20);
    assert_eq!(file_len(&path), 1 << 20);
}

#[tokio::test]
async fn block_status_sees_holes() {
    let dir = TempDir::new("status");
    let path = dir.file("img");
    {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(2 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let d = open_with(&path, ro()).await;
    let total = 2u64 << 20;
    let st = d.block_status(0, total).await.unwrap();
    if st.len == total && st.data {
        eprintln!("file system reports no holes (SEEK_DATA unsupported): skipping");
        return;
    }
    assert!(
        st.data && !st.zero && st.allocated && st.len == 4096,
        "{st:?}"
    );
    let st = d.block_status(4096, total - 4096).await.unwrap();
    assert!(!st.data && st.zero && st.allocated, "{st:?}");
    assert_eq!(st.len, (1 << 20) - 4096);
    let st = d.block_status(1 << 20, total - (1 << 20)).await.unwrap();
    assert!(st.data && st.len == 4096, "{st:?}");
    // The trailing hole.
    let off = (1 << 20) + 4096;
    let st = d.block_status(off, total - off).await.unwrap();
    assert!(st.zero && !st.data && st.len == total - off, "{st:?}");
    // Capped at the request.
    let st = d.block_status(4096, 8192).await.unwrap();
    assert_eq!(st.len, 8192);
}

#[tokio::test]
async fn truncate_grows_and_shrinks() {
    let dir = TempDir::new("trunc");
    let path = dir.file("img");
    make_file(&path, &pattern(8192, 2));
    let d = open_with(&path, rw()).await;
    d.truncate(1 << 20).await.unwrap();
    assert_eq!(d.length(), 1 << 20);
    assert_eq!(file_len(&path), 1 << 20);
    assert!(d
        .read(8192, (1 << 20) - 8192)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    d.truncate(100).await.unwrap();
    assert_eq!(d.length(), 512);
    assert_eq!(file_len(&path), 100);
    assert!(d.read(100, 412).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(&d.read(0, 100).await.unwrap()[..], &pattern(8192, 2)[..100]);
}

#[tokio::test]
async fn info_and_sizes() {
    let dir = TempDir::new("info");
    let path = dir.file("img");
    make_file(&path, &pattern(65536, 4));
    let d = open_with(&path, ro()).await;
    let info = d.info();
    assert_eq!(
        info.format_specific,
        Some(serde_json::json!({"type": "file", "data": {}}))
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(d.allocated_size(), Some(meta.blocks() * 512));
}

/// A directory where O_DIRECT works, or `None` (the test then skips).
fn direct_dir(tag: &str) -> Option<TempDir> {
    for base in [PathBuf::from("/var/tmp"), std::env::temp_dir()] {
        if !base.is_dir() {
            continue;
        }
        let dir = TempDir::new_in(&base, tag);
        let probe = dir.file("probe");
        make_file(&probe, &[0u8; 4096]);
        if sys::open(&probe, libc::O_RDONLY | libc::O_DIRECT).is_ok() {
            return Some(dir);
        }
    }
    None
}

#[tokio::test]
async fn direct_io_is_aligned() {
    let Some(dir) = direct_dir("direct") else {
        eprintln!("no file system accepting O_DIRECT: skipping");
        return;
    };
    let path = dir.file("img");
    let init = pattern(64 * 1024, 8);
    make_file(&path, &init);
    let node = NodeOptions {
        cache_direct: true,
        ..rw()
    };
    let d = open_with(&path, node).await;
    let a = d.limits().request_alignment;
    assert!(a.is_power_of_two() && (512..=4096).contains(&a), "{a}");
    assert_eq!(d.alignment(), a);
    let a = a as usize;

    let r = d.read(0, 8192).await.unwrap();
    assert!(blockd_core::buf::is_aligned(r.as_ptr()));
    assert_eq!(&r[..], &init[..8192]);

    // A buffer whose memory is misaligned goes through a bounce buffer.
    let mut v = vec![0u8; 2 * a + 1];
    v[1..].copy_from_slice(&pattern(2 * a, 42));
    let misaligned = Bytes::from(v).slice(1..);
    d.write(a as u64, misaligned.clone(), ReqFlags::default())
        .await
        .unwrap();
    assert_eq!(&d.read(a as u64, 2 * a).await.unwrap()[..], &misaligned[..]);

    // Zeroing and its slow fallback use aligned buffers too.
    d.write_zeroes(0, a as u64, ReqFlags::default())
        .await
        .unwrap();
    assert!(d.read(0, a).await.unwrap().iter().all(|&b| b == 0));
    d.inner.write_zero_buffers(a as u64, a as u64).unwrap();
    assert!(d.read(a as u64, a).await.unwrap().iter().all(|&b| b == 0));

    // Past the end: a short read, zero-filled.
    d.truncate(64 * 1024 + 100).await.unwrap();
    let t = d.read(64 * 1024, a).await.unwrap();
    assert_eq!(t.len(), a);
    assert!(t[100..].iter().all(|&b| b == 0));

    // A length (in sectors) that is not a multiple of the alignment:
    // writing needs resize (QEMU's rule), because the request layer pads
    // the tail. With 512-byte alignment every sector count is aligned.
    let r = d.set_perm(PermPair {
        perm: Perm::CONSISTENT_READ | Perm::WRITE,
        shared: Perm::ALL,
    });
    if a > 512 {
        assert_eq!(
            r.unwrap_err().msg,
            "Cannot get 'write' permission without 'resize': Image size is not a multiple of request alignment"
        );
    } else {
        r.unwrap();
    }
    d.set_perm(PermPair {
        perm: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        shared: Perm::ALL,
    })
    .unwrap();
    d.close().await.unwrap();
}

#[tokio::test]
async fn open_errors_are_worded_like_qemu() {
    let dir = TempDir::new("errors");
    let env = Env::default();

    let missing = dir.file("missing");
    let e = open_err(fopts(&missing), rw(), &env).await;
    assert_eq!(
        e.msg,
        format!("Could not open '{missing}': No such file or directory")
    );
    assert_eq!(e.kind, ErrorKind::NotFound);

    let d = dir.0.to_str().unwrap().to_string();
    let e = open_err(fopts(&d), rw(), &env).await;
    assert_eq!(e.msg, format!("Could not open '{d}': Is a directory"));
    let e = open_err(fopts(&d), ro(), &env).await;
    assert_eq!(
        e.msg,
        format!("'file' driver requires '{d}' to be a regular file")
    );
    let e = open_err(fopts("/dev/null"), ro(), &env).await;
    assert_eq!(
        e.msg,
        "'file' driver requires '/dev/null' to be a regular file"
    );

    let e = open_err(fopts("/dev/fdset/3"), rw(), &env).await;
    assert_eq!(e.msg, "Failed to find fdset /dev/fdset/3");
    let e = open_err(fopts("/dev/fdset/x"), rw(), &env).await;
    assert_eq!(e.msg, "Could not parse fdset /dev/fdset/x");
    assert_eq!(
        check(&fopts("/dev/fdset/x")).unwrap_err().msg,
        "Could not parse fdset /dev/fdset/x"
    );
    assert!(check(&fopts("/dev/fdset/12")).is_ok());
    // qemu_parse_fd: 0 to INT_MAX (qemu-storage-daemon 10.0.2 cannot
    // parse either of these).
    for bad in ["/dev/fdset/-5", "/dev/fdset/4294967296"] {
        assert_eq!(
            check(&fopts(bad)).unwrap_err().msg,
            format!("Could not parse fdset {bad}")
        );
    }

    let path = dir.file("img");
    make_file(&path, &[0u8; 512]);
    let mut o = fopts(&path);
    o.aio = Some(Aio::Native);
    let e = open_err(o, rw(), &env).await;
    assert_eq!(
        e.msg,
        "aio=native was specified, but it requires cache.direct=on, which was not specified."
    );
    // Open errors come first, as in QEMU.
    let mut o = fopts(&missing);
    o.aio = Some(Aio::Native);
    assert!(open_err(o, rw(), &env)
        .await
        .msg
        .starts_with("Could not open"));
}

/// Descriptor sets with one member, a given file opened read-write.
struct OneSet {
    id: i64,
    file: std::fs::File,
}

impl FdSets for OneSet {
    fn dup_for(&self, set: i64, _writable: bool) -> Result<OwnedFd, BlockError> {
        if set != self.id {
            return Err(BlockError::not_found(format!(
                "Failed to find fdset /dev/fdset/{set}"
            )));
        }
        self.file
            .try_clone()
            .map(OwnedFd::from)
            .map_err(|e| BlockError::io("dup", e))
    }
}

#[tokio::test]
async fn opens_descriptor_sets() {
    let dir = TempDir::new("fdset");
    let path = dir.file("img");
    make_file(&path, &pattern(8192, 6));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let env = Env {
        fdsets: Some(Arc::new(OneSet { id: 4, file })),
        ..Env::default()
    };
    let (d, ro_used) = open(fopts("/dev/fdset/4"), &rw(), &env).await.unwrap();
    assert!(!ro_used);
    assert_eq!(d.filename().as_deref(), Some("/dev/fdset/4"));
    assert_eq!(&d.read(0, 8192).await.unwrap()[..], &pattern(8192, 6)[..]);
    d.write(0, Bytes::from_static(b"via fdset"), ReqFlags::default())
        .await
        .unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[..9], b"via fdset");
    // SAFETY: F_GETFD only reads the descriptor flags.
    let fdflags = unsafe { libc::fcntl(d.inner.h().raw(), libc::F_GETFD) };
    assert!(fdflags & libc::FD_CLOEXEC != 0);
    let e = open_err(fopts("/dev/fdset/5"), rw(), &env).await;
    assert_eq!(e.msg, "Failed to find fdset /dev/fdset/5");
}

#[test]
fn auto_read_only_fallback_errnos() {
    for e in [libc::EACCES, libc::EPERM, libc::EROFS] {
        assert!(auto_read_only_falls_back(Some(e)));
    }
    for e in [
        Some(libc::ENOENT),
        Some(libc::EISDIR),
        Some(libc::EINVAL),
        None,
    ] {
        assert!(!auto_read_only_falls_back(e));
    }
}

/// Marks a file immutable (`chattr +i`) and clears the flag on drop.
/// Opening an immutable file read-write fails with EPERM even for root,
/// which makes the auto-read-only fallback testable as root (EACCES never
/// happens to root, and a read-only bind mount would need mount rights and
/// global state).
struct Immutable(String);

impl Immutable {
    fn set(path: &str) -> Option<Immutable> {
        let ok = std::process::Command::new("chattr")
            .args(["+i", path])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Immutable(path.to_string()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-i", &self.0])
            .status();
    }
}

#[tokio::test]
async fn auto_read_only_falls_back_on_refused_write_access() {
    let dir = TempDir::new("autoro");
    let path = dir.file("img");
    make_file(&path, &pattern(4096, 1));
    let Some(_imm) = Immutable::set(&path) else {
        eprintln!("cannot make a file immutable (chattr +i) here: skipping");
        return;
    };
    let env = Env::default();
    let e = open_err(fopts(&path), rw(), &env).await;
    assert_eq!(
        e.msg,
        format!("Could not open '{path}': Operation not permitted")
    );
    let node = NodeOptions {
        auto_read_only: true,
        ..rw()
    };
    let (d, ro_used) = open(fopts(&path), &node, &env).await.unwrap();
    assert!(ro_used, "fell back to read-only");
    assert_eq!(&d.read(0, 4096).await.unwrap()[..], &pattern(4096, 1)[..]);
}

fn rw_perm() -> PermPair {
    // What a writable format node takes on its file (storage_default).
    PermPair {
        perm: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    }
}

fn ro_perm() -> PermPair {
    // A read-only format node: reads, and nobody else may write.
    PermPair {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    }
}

/// Which lock bytes somebody other than `fd`'s description holds.
fn held_bytes(fd: &OwnedFd) -> Vec<i64> {
    (100..104)
        .chain(200..204)
        .filter(|&b| lock::test_byte(fd.as_raw_fd(), LockCmds::Ofd, b).is_err())
        .collect()
}

fn probe_fd(path: &str) -> OwnedFd {
    sys::open(path, libc::O_RDONLY).unwrap()
}

#[tokio::test]
async fn locks_follow_permissions() {
    let dir = TempDir::new("locks");
    let path = dir.file("img");
    make_file(&path, &[0u8; 4096]);
    let probe = probe_fd(&path);
    let a = open_with(&path, rw()).await;
    assert!(a.locking());
    // Opening takes no lock; permissions do.
    assert!(held_bytes(&probe).is_empty());
    a.set_perm(rw_perm()).unwrap();
    assert_eq!(held_bytes(&probe), vec![100, 101, 103, 201, 203]);

    // Another descriptor (as another process would) conflicts.
    let b = open_with(&path, rw()).await;
    let e = b.set_perm(rw_perm()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict);
    assert_eq!(e.msg, "Failed to get \"write\" lock");
    let e = b.set_perm(ro_perm()).unwrap_err();
    assert_eq!(e.msg, "Failed to get shared \"write\" lock");
    // Failures left nothing behind.
    assert_eq!(held_bytes(&probe), vec![100, 101, 103, 201, 203]);

    // Reading while sharing everything is fine.
    b.set_perm(PermPair {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::ALL,
    })
    .unwrap();
    // A failed upgrade keeps the previous locks.
    assert!(b.set_perm(rw_perm()).is_err());
    let bfd = probe_fd(&path);
    a.set_perm(PermPair::FREE).unwrap();
    assert_eq!(held_bytes(&bfd), vec![100]);
    b.set_perm(rw_perm()).unwrap();
    assert_eq!(held_bytes(&probe), vec![100, 101, 103, 201, 203]);
    // Dropping permissions releases their bytes.
    b.set_perm(ro_perm()).unwrap();
    assert_eq!(held_bytes(&probe), vec![100, 201, 203]);
    b.close().await.unwrap();
    assert!(held_bytes(&probe).is_empty());
}

#[tokio::test]
async fn force_share_restricts_nobody() {
    let dir = TempDir::new("force");
    let path = dir.file("img");
    make_file(&path, &[0u8; 4096]);
    let probe = probe_fd(&path);
    let writer = open_with(&path, rw()).await;
    writer.set_perm(rw_perm()).unwrap();

    let plain = open_with(&path, ro()).await;
    assert_eq!(
        plain.set_perm(ro_perm()).unwrap_err().msg,
        "Failed to get shared \"write\" lock"
    );
    let shared = open_with(
        &path,
        NodeOptions {
            force_share: true,
            ..ro()
        },
    )
    .await;
    shared.set_perm(ro_perm()).unwrap();
    // It still shows that it reads, and unshares nothing.
    drop(writer);
    assert_eq!(held_bytes(&probe), vec![100]);
}

#[tokio::test]
async fn locking_off_takes_no_locks() {
    let dir = TempDir::new("nolock");
    let path = dir.file("img");
    make_file(&path, &[0u8; 4096]);
    let probe = probe_fd(&path);
    let mut o = fopts(&path);
    o.locking = Some(OnOffAuto::Off);
    let (d, _) = open(o, &rw(), &Env::default()).await.unwrap();
    assert!(!d.locking());
    d.set_perm(rw_perm()).unwrap();
    assert!(held_bytes(&probe).is_empty());

    let mut o = fopts(&path);
    o.locking = Some(OnOffAuto::On);
    let (d, _) = open(o, &rw(), &Env::default()).await.unwrap();
    assert!(d.locking());
    d.set_perm(rw_perm()).unwrap();
    assert_eq!(held_bytes(&probe), vec![100, 101, 103, 201, 203]);
}

/// Detaches a loop device on drop.
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// The block device path: needs root and loop devices, so it only runs
/// on request (`cargo test -p blockd-drivers -- --ignored block_device`).
#[tokio::test]
#[ignore = "needs root and a free loop device"]
async fn block_device_via_loop() {
    let dir = TempDir::new("loop");
    let backing = dir.file("backing");
    make_file(&backing, &pattern(4 << 20, 11));
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--sector-size", "4096", &backing])
        .output()
        .expect("run losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = LoopDev(String::from_utf8(out.stdout).unwrap().trim().to_string());
    let path = dev.0.clone();

    for direct in [false, true] {
        let node = NodeOptions {
            cache_direct: direct,
            ..rw()
        };
        let d = open_with(&path, node).await;
        assert_eq!(d.length(), 4 << 20);
        let want_align = if direct { 4096 } else { 1 };
        assert_eq!(d.limits().request_alignment, want_align);
        assert_eq!(&d.read(0, 8192).await.unwrap()[..], &pattern(8192, 11)[..]);
        d.write(8192, Bytes::from(pattern(4096, 12)), ReqFlags::default())
            .await
            .unwrap();
        assert_eq!(
            &d.read(8192, 4096).await.unwrap()[..],
            &pattern(4096, 12)[..]
        );
        d.write_zeroes(
            65536,
            65536,
            ReqFlags {
                may_unmap: true,
                ..ReqFlags::default()
            },
        )
        .await
        .unwrap();
        assert!(d.read(65536, 65536).await.unwrap().iter().all(|&b| b == 0));
        d.write_zeroes(131_072, 4096, ReqFlags::default())
            .await
            .unwrap();
        assert!(d.read(131_072, 4096).await.unwrap().iter().all(|&b| b == 0));
        d.discard(1 << 20, 1 << 20).await.unwrap();
        let st = d.block_status(0, 4 << 20).await.unwrap();
        assert!(st.data && st.allocated, "{st:?}");
        // Devices cannot grow; shrinking requests leave them alone.
        assert_eq!(
            d.truncate(8 << 20).await.unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        d.truncate(1 << 20).await.unwrap();
        assert_eq!(d.length(), 4 << 20);
        d.flush().await.unwrap();
        d.close().await.unwrap();
    }
}

#[test]
fn write_without_resize_needs_an_aligned_length() {
    let dir = TempDir::new("align-perm");
    let path = dir.file("img");
    make_file(&path, &[0u8; 5000]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let d = rt.block_on(open_with(&path, rw()));
    assert_eq!(d.length(), 5120);
    // Simulate a 4096-byte O_DIRECT alignment on this node.
    let h = d.inner.h();
    let fd = h.fd.try_clone().unwrap();
    d.inner.swap_handle(Arc::new(super::Handle {
        fd,
        writable: h.writable,
        direct: h.direct,
        align: 4096,
    }));
    let write = PermPair {
        perm: Perm::CONSISTENT_READ | Perm::WRITE,
        shared: Perm::ALL,
    };
    assert_eq!(
        d.set_perm(write).unwrap_err().msg,
        "Cannot get 'write' permission without 'resize': Image size is not a multiple of request alignment"
    );
    d.set_perm(PermPair {
        perm: write.perm | Perm::RESIZE,
        ..write
    })
    .unwrap();
    d.set_perm(PermPair {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::ALL,
    })
    .unwrap();
}

#[tokio::test]
async fn unaligned_requests_through_the_node_with_o_direct() {
    let Some(dir) = direct_dir("node") else {
        eprintln!("no file system accepting O_DIRECT: skipping");
        return;
    };
    let path = dir.file("img");
    make_file(&path, &pattern(16384, 21));
    let opts = NodeOptions {
        cache_direct: true,
        ..rw()
    };
    let d = open_with(&path, opts).await;
    let node = blockd_core::BlockNode::new("f".into(), false, opts, Box::new(d));
    node.write(1, Bytes::from_static(b"abc"), ReqFlags::default())
        .await
        .unwrap();
    let mut want = pattern(16384, 21);
    want[1..4].copy_from_slice(b"abc");
    assert_eq!(&node.read(0, 16384).await.unwrap()[..], &want[..]);
    node.write_zeroes(5, 10_000, ReqFlags::default())
        .await
        .unwrap();
    want[5..10_005].fill(0);
    assert_eq!(&node.read(0, 16384).await.unwrap()[..], &want[..]);
    node.close().await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), want);
}

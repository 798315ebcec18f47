//! Image locking against the real QEMU tools (`qemu-img`, `qemu-io`,
//! `qemu-storage-daemon`). Every test skips with a message when the tools
//! are missing; child processes are killed by a guard, and every wait has a
//! deadline, so a misbehaving tool cannot hang the test run.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockd_core::{BlockDriver, ErrorKind, NodeOptions, Perm, PermPair};

use super::lock::{self, LockCmds};
use super::tests::{open_with, ro, rw, TempDir};
use super::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// Whether `tool` can be run.
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn tools_or_skip(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!("skipping: QEMU tools not found: {}", missing.join(", "));
    false
}

/// Kills and reaps the child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion, killing it after [`DEADLINE`].
fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut g = ChildGuard(child);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = g.0.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "{cmd:?} timed out");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut o) = g.0.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    if let Some(mut e) = g.0.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

fn qemu_img_create(fmt: &str, path: &str, size: &str) {
    let out = run(Command::new("qemu-img").args(["create", "-q", "-f", fmt, path, size]));
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-io -f <fmt> <extra> -c <cmd> path`: (success, stderr).
fn qemu_io_fmt(fmt: &str, path: &str, extra: &[&str], cmd: &str) -> (bool, String) {
    let out = run(Command::new("qemu-io")
        .args(["-f", fmt])
        .args(extra)
        .args(["-c", cmd, path]));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qemu-io -f raw <extra> -c <cmd> path`: (success, stderr).
fn qemu_io(path: &str, extra: &[&str], cmd: &str) -> (bool, String) {
    qemu_io_fmt("raw", path, extra, cmd)
}

fn rw_perm() -> PermPair {
    // What a writable qcow2 node or a writable export takes on its file.
    PermPair {
        perm: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
        shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    }
}

fn ro_perm() -> PermPair {
    PermPair {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    }
}

#[tokio::test]
async fn qemu_io_respects_blockd_locks() {
    if !tools_or_skip(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("qemu-io");
    let img = dir.file("img.raw");
    qemu_img_create("raw", &img, "1M");

    let d = open_with(&img, rw()).await;
    d.set_perm(rw_perm()).unwrap();

    let (ok, err) = qemu_io(&img, &[], "write 0 512");
    assert!(!ok, "qemu-io write should fail");
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    // A read-only raw node shares write: reading is fine even without -U.
    let (ok, err) = qemu_io(&img, &["-r"], "read 0 512");
    assert!(ok, "qemu-io -r: {err}");
    let (ok, err) = qemu_io(&img, &["-r", "-U"], "read 0 512");
    assert!(ok, "qemu-io -r -U: {err}");

    d.set_perm(PermPair::FREE).unwrap();
    let (ok, err) = qemu_io(&img, &[], "write 0 512");
    assert!(ok, "qemu-io write after release: {err}");

    d.set_perm(rw_perm()).unwrap();
    assert!(!qemu_io(&img, &[], "write 0 512").0);
    d.close().await.unwrap();
    let (ok, err) = qemu_io(&img, &[], "write 0 512");
    assert!(ok, "qemu-io write after close: {err}");
}

#[tokio::test]
async fn qemu_io_qcow2_reader_needs_force_share() {
    if !tools_or_skip(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("qemu-io-qcow2");
    let img = dir.file("img.qcow2");
    qemu_img_create("qcow2", &img, "1M");
    let d = open_with(&img, rw()).await;
    d.set_perm(rw_perm()).unwrap();
    // A read-only qcow2 node does not share write on its file.
    let (ok, err) = qemu_io_fmt("qcow2", &img, &["-r"], "read 0 512");
    assert!(!ok, "qemu-io -r on qcow2 should fail");
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let (ok, err) = qemu_io_fmt("qcow2", &img, &["-r", "-U"], "read 0 512");
    assert!(ok, "qemu-io -r -U on qcow2: {err}");
    let (ok, err) = qemu_io_fmt("qcow2", &img, &[], "write 0 512");
    assert!(!ok);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    drop(d);
    let (ok, err) = qemu_io_fmt("qcow2", &img, &[], "write 0 512");
    assert!(ok, "qemu-io write after drop: {err}");
}

/// Waits until some other process holds lock byte `byte` of `path`.
fn wait_for_lock(path: &str, byte: i64, daemon: &mut ChildGuard) {
    let fd = sys::open(path, libc::O_RDONLY).expect("open image");
    let start = Instant::now();
    loop {
        if lock::test_byte(fd.as_raw_fd(), LockCmds::Ofd, byte).is_err() {
            return;
        }
        if let Some(status) = daemon.0.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = daemon.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("qemu-storage-daemon exited ({status}): {err}");
        }
        assert!(
            start.elapsed() < DEADLINE,
            "qemu-storage-daemon did not lock the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn blockd_respects_qemu_storage_daemon_locks() {
    if !tools_or_skip(&["qemu-img", "qemu-storage-daemon"]) {
        return;
    }
    let dir = TempDir::new("qsd");
    let img = dir.file("img.qcow2");
    qemu_img_create("qcow2", &img, "1M");
    let sock = dir.file("nbd.sock");
    // A writable qcow2 node exported over NBD: its file node holds
    // consistent-read, write and resize and shares neither write nor resize.
    let child = Command::new("qemu-storage-daemon")
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={sock}"))
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={img}"))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q,file=f")
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=q,writable=on")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let mut daemon = ChildGuard(child);
    wait_for_lock(&img, lock::SHARED_BASE + 1, &mut daemon);

    // Writing: refused, with QEMU's words.
    let d = open_with(&img, rw()).await;
    let e = d.set_perm(rw_perm()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionConflict);
    assert_eq!(e.msg, "Failed to get \"write\" lock");
    drop(d);

    // Reading while not sharing write: refused too.
    let d = open_with(&img, ro()).await;
    let e = d.set_perm(ro_perm()).unwrap_err();
    assert_eq!(e.msg, "Failed to get shared \"write\" lock");
    drop(d);

    // force-share (read-only): allowed, and the data is readable.
    let node = NodeOptions {
        force_share: true,
        ..ro()
    };
    let d = open_with(&img, node).await;
    d.set_perm(ro_perm()).unwrap();
    let head = d.read(0, 4).await.unwrap();
    assert_eq!(&head[..], b"QFI\xfb");
    d.close().await.unwrap();

    // Once the daemon is gone, writing is allowed.
    drop(daemon);
    let d = open_with(&img, rw()).await;
    d.set_perm(rw_perm()).unwrap();
    d.close().await.unwrap();
}

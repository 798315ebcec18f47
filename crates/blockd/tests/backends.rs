//! Block backends end to end: drives and devices from the command line,
//! an NBD export of a backend read and written with `qemu-io`, removable
//! media, accounting, the run state and the error policy.
//!
//! These tests need `qemu-img` and `qemu-io`; they are skipped (with a
//! message) where those are missing.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockd_testkit::{Pattern, QmpClient};
use serde_json::{json, Value};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A `blockd` started with extra arguments, stopped on drop.
struct Blockd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Blockd {
    fn start_in(dir: PathBuf, args: &[String]) -> Blockd {
        let sock = dir.join("qmp.sock");
        let log = std::fs::File::create(dir.join("err.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_blockd"))
            .arg("--qmp")
            .arg(&sock)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut b = Blockd { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !b.sock.exists() {
            assert!(
                b.child.try_wait().unwrap().is_none(),
                "blockd exited: {}",
                b.log()
            );
            assert!(Instant::now() < deadline, "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("err.log")).unwrap_or_default()
    }

    fn client(&self) -> QmpClient {
        let mut c = QmpClient::connect_retry(&self.sock, Duration::from_secs(10)).unwrap();
        c.negotiate().unwrap();
        c
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `nbd+unix` URI of export `name` on this server's NBD socket.
    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.path("nbd.sock"))
    }
}

impl Drop for Blockd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have_qemu_tools() -> bool {
    let ok = |t: &str| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let have = ok("qemu-img") && ok("qemu-io");
    if !have {
        eprintln!("skipped: qemu-img/qemu-io not installed");
    }
    have
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

/// A raw image of `size` filled with byte `fill`.
fn image(path: &str, size: &str, fill: u8) {
    assert!(sh("qemu-img", &["create", "-q", "-f", "raw", path, size])
        .status
        .success());
    let w = format!("write -P 0x{fill:02x} 0 {size}");
    assert!(sh("qemu-io", &["-f", "raw", "-c", &w, path])
        .status
        .success());
}

fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    sh("qemu-io", &args)
}

fn ok(c: &mut QmpClient, cmd: &str, args: Value) -> Value {
    c.execute(cmd, Some(args))
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn start_nbd(c: &mut QmpClient, b: &Blockd) {
    ok(
        c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": b.path("nbd.sock")}}}),
    );
}

fn pattern(p: Value) -> Pattern {
    Pattern::new(p).unwrap()
}

/// A fresh scratch directory.
fn scratch(tag: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(format!("/tmp/bk-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn blockstats(c: &mut QmpClient, device: &str) -> Value {
    let list = ok(c, "query-blockstats", json!({}));
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e["device"] == device)
        .cloned()
        .unwrap_or_else(|| panic!("no stats for {device}: {list}"))
}

#[test]
fn cdrom_over_nbd_eject_and_change_medium() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch("cd");
    let a = dir.join("a.iso").display().to_string();
    let b_iso = dir.join("b.iso").display().to_string();
    image(&a, "1M", 0x41);
    image(&b_iso, "1M", 0x42);
    let args = [
        "--drive".to_string(),
        format!("if=none,id=cd,media=cdrom,file={a},format=raw"),
        "--device".into(),
        "virtio-scsi-pci,id=scsi0".into(),
        "--device".into(),
        "scsi-cd,id=cd0,drive=cd,bus=scsi0.0".into(),
    ];
    let b = Blockd::start_in(dir, &args);
    let mut c = b.client();
    let q = ok(&mut c, "query-block", json!({}));
    assert!(
        pattern(
            json!([{"device": "cd", "qdev": "cd0", "removable": true, "tray_open": false,
                         "inserted": {"ro": true, "drv": "raw", "file": a}}])
        )
        .matches(&q),
        "{q}"
    );
    start_nbd(&mut c, &b);
    ok(&mut c, "nbd-server-add", json!({"device": "cd"}));
    let r = qemu_io(
        &b.uri("cd"),
        true,
        &["read -P 0x41 0 64k", "read -P 0x41 1020k 4k"],
    );
    assert!(r.status.success(), "{r:?}");

    ok(&mut c, "eject", json!({"id": "cd0"}));
    c.wait_event(
        &pattern(json!({"event": "DEVICE_TRAY_MOVED",
                        "data": {"device": "cd", "id": "cd0", "tray-open": true}})),
        Duration::from_secs(5),
    )
    .unwrap();
    let r = qemu_io(&b.uri("cd"), true, &["read 0 4k"]);
    assert!(!r.status.success(), "read without medium succeeded: {r:?}");
    let q = ok(&mut c, "query-block", json!({}));
    assert!(
        pattern(json!([{"device": "cd", "tray_open": true, "inserted": "$absent"}])).matches(&q),
        "{q}"
    );

    ok(
        &mut c,
        "blockdev-change-medium",
        json!({"id": "cd0", "filename": b_iso, "format": "raw"}),
    );
    c.wait_event(
        &pattern(json!({"event": "DEVICE_TRAY_MOVED",
                        "data": {"device": "cd", "id": "cd0", "tray-open": false}})),
        Duration::from_secs(5),
    )
    .unwrap();
    let r = qemu_io(&b.uri("cd"), true, &["read -P 0x42 0 64k"]);
    assert!(r.status.success(), "{r:?}");
    let q = ok(&mut c, "query-block", json!({}));
    assert!(
        pattern(json!([{"device": "cd", "tray_open": false,
                         "inserted": {"file": b_iso, "ro": true, "node-name": "$str"}}]))
        .matches(&q),
        "{q}"
    );
    // The exported backend cannot be written (a CD-ROM is read-only).
    let e = c
        .execute(
            "nbd-server-add",
            Some(json!({"device": "cd", "name": "w", "writable": true})),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Cannot export read-only node as writable"),
        "{e}"
    );
}

#[test]
fn accounting_counts_nbd_requests_exactly() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch("acct");
    let disk = dir.join("disk.raw").display().to_string();
    assert!(sh("qemu-img", &["create", "-q", "-f", "raw", &disk, "4M"])
        .status
        .success());
    let b = Blockd::start_in(
        dir,
        &[
            "--drive".into(),
            format!("if=none,id=d0,file={disk},format=raw,stats-intervals.0=60"),
        ],
    );
    let mut c = b.client();
    let s = blockstats(&mut c, "d0");
    assert!(s["stats"].get("idle_time_ns").is_none(), "{s}");
    start_nbd(&mut c, &b);
    ok(
        &mut c,
        "nbd-server-add",
        json!({"device": "d0", "writable": true}),
    );
    // 4 writes of 64 KiB, then 3 reads of 4 KiB of written data.
    let r = qemu_io(
        &b.uri("d0"),
        false,
        &[
            "write -P 0x5a 0 64k",
            "write -P 0x5b 64k 64k",
            "write -P 0x5c 1M 64k",
            "write -P 0x5d 3M 64k",
        ],
    );
    assert!(r.status.success(), "{r:?}");
    let s = blockstats(&mut c, "d0");
    let flushes = s["stats"]["flush_operations"].as_u64().unwrap();
    let r = qemu_io(
        &b.uri("d0"),
        true,
        &[
            "read -P 0x5a 0 4k",
            "read -P 0x5b 64k 4k",
            "read -P 0x5d 3M 4k",
        ],
    );
    assert!(r.status.success(), "{r:?}");
    let s = blockstats(&mut c, "d0");
    let st = &s["stats"];
    assert_eq!(st["wr_operations"], 4, "{s}");
    assert_eq!(st["wr_bytes"], 4 * 65536, "{s}");
    assert_eq!(st["rd_operations"], 3, "{s}");
    assert_eq!(st["rd_bytes"], 3 * 4096, "{s}");
    // The reading client flushes nothing.
    assert_eq!(st["flush_operations"].as_u64().unwrap(), flushes, "{s}");
    assert_eq!(st["wr_highest_offset"], 3 * 1048576 + 65536, "{s}");
    for k in [
        "failed_rd_operations",
        "failed_wr_operations",
        "invalid_rd_operations",
    ] {
        assert_eq!(st[k], 0, "{k}: {s}");
    }
    assert!(st["idle_time_ns"].is_u64(), "{s}");
    assert!(st["rd_total_time_ns"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(st["timed_stats"][0]["interval_length"], 60, "{s}");
    assert!(
        pattern(json!({"device": "d0", "node-name": "$str", "stats": "$obj",
                       "parent": {"node-name": "$str", "driver-specific": {"driver": "file"},
                                  "stats": {"wr_operations": 4, "account_invalid": false}}}))
        .matches(&s),
        "{s}"
    );
}

#[test]
fn io_waits_while_stopped_and_completes_after_cont() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch("stop");
    let disk = dir.join("disk.raw").display().to_string();
    image(&disk, "1M", 0x33);
    let b = Blockd::start_in(
        dir,
        &[
            "--drive".into(),
            format!("if=none,id=d0,file={disk},format=raw"),
        ],
    );
    let mut c = b.client();
    start_nbd(&mut c, &b);
    ok(&mut c, "nbd-server-add", json!({"device": "d0"}));
    ok(&mut c, "stop", json!({}));
    c.wait_event(&pattern(json!({"event": "STOP"})), Duration::from_secs(5))
        .unwrap();
    let mut reader = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x33 0 64k", &b.uri("d0")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the read completed while the server was stopped"
    );
    assert_eq!(blockstats(&mut c, "d0")["stats"]["rd_operations"], 0);
    ok(&mut c, "cont", json!({}));
    c.wait_event(&pattern(json!({"event": "RESUME"})), Duration::from_secs(5))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = reader.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "read never completed");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert_eq!(blockstats(&mut c, "d0")["stats"]["rd_operations"], 1);
}

#[test]
fn read_error_with_rerror_stop_stops_the_server_and_retries_on_cont() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch("policy");
    let disk = dir.join("disk.raw").display().to_string();
    image(&disk, "1M", 0x77);
    let drive = format!(
        "if=none,id=d0,driver=blkdebug,image.driver=file,image.filename={disk},\
         inject-error.0.event=read_aio,inject-error.0.errno=5,inject-error.0.once=on,\
         rerror=stop"
    );
    let b = Blockd::start_in(dir, &["--drive".into(), drive]);
    let mut c = b.client();
    start_nbd(&mut c, &b);
    ok(&mut c, "nbd-server-add", json!({"device": "d0"}));
    let mut reader = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x77 0 4k", &b.uri("d0")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.wait_event(
        &pattern(json!({"event": "BLOCK_IO_ERROR",
                        "data": {"device": "d0", "qom-path": "", "operation": "read",
                                 "action": "stop", "reason": "Input/output error",
                                 "node-name": "$str", "nospace": "$absent"}})),
        Duration::from_secs(10),
    )
    .unwrap();
    c.wait_event(&pattern(json!({"event": "STOP"})), Duration::from_secs(5))
        .unwrap();
    let st = ok(&mut c, "query-status", json!({}));
    assert_eq!(st, json!({"running": false, "status": "io-error"}));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the read did not wait"
    );
    ok(&mut c, "cont", json!({}));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = reader.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "read never completed");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the retried read failed");
    let s = blockstats(&mut c, "d0");
    assert_eq!(s["stats"]["rd_operations"], 1, "{s}");
    assert_eq!(s["stats"]["failed_rd_operations"], 0, "{s}");
}

#[test]
fn report_policy_counts_failures_and_empty_drives_have_no_medium() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch("report");
    let disk = dir.join("disk.raw").display().to_string();
    image(&disk, "1M", 0x11);
    let drive = format!(
        "if=none,id=d0,driver=blkdebug,image.driver=file,image.filename={disk},\
         inject-error.0.event=read_aio,inject-error.0.errno=5,inject-error.0.once=on"
    );
    let b = Blockd::start_in(
        dir,
        &[
            "--drive".into(),
            drive,
            "--drive".into(),
            "if=none,id=cd,media=cdrom".into(),
        ],
    );
    let mut c = b.client();
    start_nbd(&mut c, &b);
    ok(&mut c, "nbd-server-add", json!({"device": "d0"}));
    let r = qemu_io(&b.uri("d0"), true, &["read 0 4k"]);
    assert!(!r.status.success());
    c.wait_event(
        &pattern(json!({"event": "BLOCK_IO_ERROR",
                        "data": {"device": "d0", "action": "report", "operation": "read"}})),
        Duration::from_secs(5),
    )
    .unwrap();
    let s = blockstats(&mut c, "d0");
    assert_eq!(s["stats"]["failed_rd_operations"], 1, "{s}");
    assert_eq!(ok(&mut c, "query-status", json!({}))["status"], "running");
    let e = c
        .execute("nbd-server-add", Some(json!({"device": "cd"})))
        .unwrap_err();
    assert!(e.to_string().contains("Device 'cd' has no medium"), "{e}");
    let e = c
        .execute(
            "block-export-add",
            Some(json!({"type": "nbd", "id": "e", "node-name": "d0"})),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Cannot find device='' nor node-name='d0'"),
        "{e}"
    );
}

#[test]
fn drives_and_devices_from_the_command_line() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch("cli");
    let fd_img = dir.join("fd.img").display().to_string();
    let hd_img = dir.join("hd.img").display().to_string();
    let cd_iso = dir.join("cd.iso").display().to_string();
    image(&fd_img, "1440k", 0x01);
    image(&hd_img, "1M", 0x02);
    image(&cd_iso, "1M", 0x03);
    let b = Blockd::start_in(
        dir,
        &[
            "--drive".into(),
            "if=none,id=cd,media=cdrom".into(),
            "--drive".into(),
            format!("if=none,id=fd,file={fd_img},format=raw"),
            "--drive".into(),
            format!("if=none,id=hd,file={hd_img},format=raw,werror=stop,rerror=stop"),
            "--device".into(),
            "ide-cd,drive=cd,bus=ide.1,id=ide-cd0".into(),
            "--device".into(),
            "floppy,drive=fd,id=fd0".into(),
            "--device".into(),
            r#"{"driver": "virtio-scsi-pci", "id": "scsi0"}"#.into(),
        ],
    );
    let mut c = b.client();
    let q = ok(&mut c, "query-block", json!({}));
    let want = json!([
        {"device": "cd", "qdev": "ide-cd0", "removable": true, "locked": false,
         "tray_open": false, "io-status": "ok", "inserted": "$absent"},
        {"device": "fd", "qdev": "fd0", "removable": true, "tray_open": "$absent",
         "io-status": "$absent", "inserted": {"drv": "raw", "ro": false}},
        {"device": "hd", "qdev": "$absent", "removable": true, "io-status": "$absent",
         "inserted": {"drv": "raw"}}
    ]);
    assert!(pattern(want).matches(&q), "{q}");
    // IDE and floppy buses cannot unplug.
    let e = c
        .execute("device_del", Some(json!({"id": "ide-cd0"})))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Bus 'ide.1' does not support hotplugging"),
        "{e}"
    );
    let e = c
        .execute(
            "device_add",
            Some(json!({"driver": "ide-hd", "drive": "hd", "bus": "ide.0"})),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Bus 'ide.0' does not support hotplugging"),
        "{e}"
    );
    // A floppy has no tray: eject removes the medium without an event.
    ok(&mut c, "eject", json!({"device": "fd"}));
    c.expect_no_event(
        &pattern(json!({"event": "DEVICE_TRAY_MOVED"})),
        Duration::from_millis(300),
    )
    .unwrap();
    // The empty CD-ROM drive takes a medium read-only (media=cdrom).
    ok(
        &mut c,
        "blockdev-change-medium",
        json!({"device": "cd", "filename": cd_iso, "format": "raw"}),
    );
    c.wait_event(
        &pattern(json!({"event": "DEVICE_TRAY_MOVED",
                        "data": {"device": "cd", "id": "ide-cd0", "tray-open": false}})),
        Duration::from_secs(5),
    )
    .unwrap();
    let q = ok(&mut c, "query-block", json!({}));
    assert!(
        pattern(
            json!(["$contains", {"device": "cd", "inserted": {"ro": true}},
                       {"device": "fd", "inserted": "$absent"}])
        )
        .matches(&q),
        "{q}"
    );
    // A drive in use; a device without media; auto-deletion with the device.
    ok(
        &mut c,
        "device_add",
        json!({"driver": "scsi-hd", "id": "hd0", "drive": "hd"}),
    );
    let e = c
        .execute(
            "device_add",
            Some(json!({"driver": "virtio-blk-pci", "drive": "hd"})),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Drive 'hd' is already in use by another device"),
        "{e}"
    );
    let q = ok(&mut c, "query-block", json!({}));
    assert!(
        pattern(
            json!(["$contains", {"device": "hd", "qdev": "hd0", "removable": false,
                                     "io-status": "ok"}])
        )
        .matches(&q),
        "{q}"
    );
    let nodes_before = ok(&mut c, "query-named-block-nodes", json!({}));
    ok(&mut c, "device_del", json!({"id": "hd0"}));
    c.wait_event(
        &pattern(json!({"event": "DEVICE_DELETED", "data": {"device": "hd0"}})),
        Duration::from_secs(5),
    )
    .unwrap();
    let q = ok(&mut c, "query-block", json!({}));
    assert!(
        !q.as_array().unwrap().iter().any(|e| e["device"] == "hd"),
        "the drive outlived its device: {q}"
    );
    let nodes_after = ok(&mut c, "query-named-block-nodes", json!({}));
    assert_eq!(
        nodes_after.as_array().unwrap().len() + 2,
        nodes_before.as_array().unwrap().len()
    );
}

#[test]
fn start_up_errors_are_reported() {
    let dir = scratch("errs");
    let sock = dir.join("s").display().to_string();
    let missing = dir.join("missing.img").display().to_string();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--drive".into(), "media=tape".into()],
            "'tape' invalid media".into(),
        ),
        (
            vec!["--drive".into(), format!("file={missing},format=vmdk")],
            "Unknown driver: 'vmdk'".into(),
        ),
        (
            vec!["--drive".into(), format!("file={missing},format=raw")],
            format!("Could not open '{missing}': No such file or directory"),
        ),
        (
            vec![
                "--drive".into(),
                "id=d0".into(),
                "--drive".into(),
                "id=d0".into(),
            ],
            "Duplicate ID 'd0' for drive".into(),
        ),
        (
            vec![
                "--drive".into(),
                "id=d0".into(),
                "--device".into(),
                "virtio-blk-pci,drive=d0".into(),
            ],
            "Device needs media, but drive is empty".into(),
        ),
        (
            vec!["--device".into(), "e1000".into()],
            "'e1000' is not a valid device model name".into(),
        ),
        (
            vec!["--drive".into(), "if=none,snapshot=on,cache=fast".into()],
            "invalid cache option".into(),
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_blockd"))
            .arg("--qmp")
            .arg(&sock)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&want),
            "{args:?}: expected {want:?} in {err:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_on_writes_to_a_temporary_overlay() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch("snap");
    let img = dir.join("img.raw").display().to_string();
    image(&img, "1M", 0x61);
    let tmpdir = dir.join("tmp");
    std::fs::create_dir_all(&tmpdir).unwrap();
    let sock = dir.join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_blockd"))
        .env("TMPDIR", &tmpdir)
        .arg("--qmp")
        .arg(&sock)
        .args([
            "--drive",
            &format!("if=none,id=d0,file={img},format=raw,snapshot=on"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(20)).unwrap();
    c.negotiate().unwrap();
    let q = ok(&mut c, "query-block", json!({}));
    assert!(
        pattern(
            json!([{"device": "d0", "inserted": {"drv": "qcow2", "ro": false,
                         "backing_file": img, "backing_file_depth": 1,
                         "image": {"backing-image": {"format": "raw", "filename": img}}}}])
        )
        .matches(&q),
        "{q}"
    );
    let nbd = dir.join("nbd.sock").display().to_string();
    ok(
        &mut c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    ok(
        &mut c,
        "nbd-server-add",
        json!({"device": "d0", "writable": true}),
    );
    let uri = format!("nbd+unix:///d0?socket={nbd}");
    let r = qemu_io(
        &uri,
        false,
        &[
            "write -P 0x62 0 64k",
            "read -P 0x62 0 64k",
            "read -P 0x61 64k 960k",
        ],
    );
    assert!(r.status.success(), "{r:?}");
    ok(&mut c, "quit", json!({}));
    let _ = child.wait();
    // The image was never written, and no overlay file is left.
    let r = sh(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0x61 0 1M", &img],
    );
    assert!(r.status.success(), "{r:?}");
    assert_eq!(std::fs::read_dir(&tmpdir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

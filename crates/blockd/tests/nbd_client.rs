//! The `nbd` client driver against real NBD servers: `qemu-nbd` and a
//! second blockd process. Data written through an nbd node (by a mirror
//! job, or by qemu-io through blockd's re-export of the node) must read
//! back identically with `qemu-img compare`, and a mirror of a sparse
//! source into the remote must keep the remote image sparse (write-zeroes
//! goes over the wire as NBD_CMD_WRITE_ZEROES, never as zero data).

mod common;
#[path = "common/qemu_nbd.rs"]
mod qemu_nbd;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockd_testkit::{Pattern, QmpClient};
use common::Server;
use qemu_nbd::{have_qemu, ok, run, QemuNbd};
use serde_json::{json, Value};

fn wait(c: &mut QmpClient, pat: Value) -> Value {
    c.wait_event(&Pattern::new(pat).unwrap(), Duration::from_secs(60))
        .expect("event")
}

/// Bytes `qemu-img map` reports as data in a raw image.
fn mapped_data(img: &Path) -> u64 {
    let out = ok(&run(
        "qemu-img",
        &[
            "map",
            "-U",
            "-f",
            "raw",
            "--output=json",
            img.to_str().unwrap(),
        ],
    ));
    let v: Value = serde_json::from_str(&out).expect("map json");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn mirror_of_a_sparse_disk_into_qemu_nbd_is_identical_and_sparse() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("nbdc-mirror");
    let src = srv.dir.join("src.qcow2");
    let tgt = srv.dir.join("tgt.raw");
    let s = src.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-q", "-f", "qcow2", s, "64M"]));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -P 0xbb 32M 512k",
            "-c",
            "write -z 40M 1M",
            s,
        ],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", tgt.to_str().unwrap(), "64M"],
    ));
    // the target has old data everywhere the source is sparse
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 8M 8M",
            "-c",
            "write -P 0x22 40M 1M",
            tgt.to_str().unwrap(),
        ],
    ));
    let nbd = srv.dir.join("q.sock");
    let _qnbd = QemuNbd::start(&tgt, &nbd);
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "node-name": "src",
                    "file": {"driver": "file", "filename": src}})),
    )
    .unwrap();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "nbd", "node-name": "tgt", "export": "exp",
                    "server": {"type": "unix", "path": nbd}})),
    )
    .unwrap();
    c.execute(
        "blockdev-mirror",
        Some(json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"})),
    )
    .unwrap();
    wait(
        &mut c,
        json!({"event": "BLOCK_JOB_READY", "data": {"device": "m0"}}),
    );
    c.execute("block-job-complete", Some(json!({"device": "m0"})))
        .unwrap();
    let done = wait(
        &mut c,
        json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "m0"}}),
    );
    assert!(done["data"].get("error").is_none(), "mirror failed: {done}");
    c.execute("blockdev-del", Some(json!({"node-name": "src"})))
        .ok();
    c.execute("blockdev-del", Some(json!({"node-name": "tgt"})))
        .unwrap();

    ok(&run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s,
            tgt.to_str().unwrap(),
        ],
    ));
    // only the source's 1.5 MiB of data is data in the target
    let data = mapped_data(&tgt);
    assert!(
        data <= 2 << 20,
        "target not sparse: {data} bytes of data\n{}",
        ok(&run(
            "qemu-img",
            &[
                "map",
                "-U",
                "-f",
                "raw",
                "--output=json",
                tgt.to_str().unwrap()
            ]
        ))
    );
    assert!(data >= 1536 << 10, "data missing: {data}");
}

#[test]
fn nbd_node_on_another_blockd_reads_and_writes_through() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    // "remote" blockd exports a raw image; "local" blockd's nbd node points
    // at it and is exported again, where qemu-io writes and reads.
    let remote = Server::start("nbdc-remote");
    let img = remote.dir.join("disk.raw");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", img.to_str().unwrap(), "16M"],
    ));
    let rsock = remote.dir.join("nbd");
    let mut rc = remote.client();
    rc.execute(
        "blockdev-add",
        Some(json!({"driver": "raw", "node-name": "r0",
                    "file": {"driver": "file", "filename": img}})),
    )
    .unwrap();
    rc.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": rsock}}})),
    )
    .unwrap();
    rc.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "d", "writable": true})),
    )
    .unwrap();

    let local = Server::start("nbdc-local");
    let lsock = local.dir.join("nbd");
    let mut lc = local.client();
    lc.execute(
        "blockdev-add",
        Some(json!({"driver": "nbd", "node-name": "n0", "export": "d",
                    "server": {"type": "unix", "path": rsock}})),
    )
    .unwrap();
    lc.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": lsock}}})),
    )
    .unwrap();
    lc.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e1", "node-name": "n0", "name": "again", "writable": true})),
    )
    .unwrap();
    let url = format!("nbd+unix:///again?socket={}", lsock.display());
    // many requests in flight at once (qemu-img bench, depth 16), then data
    ok(&run(
        "qemu-img",
        &[
            "bench", "-w", "-d", "16", "-c", "2000", "-s", "4k", "-f", "raw", &url,
        ],
    ));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 3M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x7e 12M 4k",
            "-c",
            "flush",
            &url,
        ],
    ));
    // the block status of the nbd node is exact through two NBD hops
    let map = ok(&run(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", &url],
    ));
    let v: Value = serde_json::from_str(&map).unwrap();
    let zero_at_8m = v.as_array().unwrap().iter().any(|e| {
        e["start"].as_u64().unwrap() <= 8 << 20
            && e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap() >= 9 << 20
            && e["zero"] == true
    });
    assert!(zero_at_8m, "zeroed range not reported as zero: {map}");
    let local_copy = local.dir.join("copy.raw");
    ok(&run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            local_copy.to_str().unwrap(),
        ],
    ));
    ok(&run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            local_copy.to_str().unwrap(),
        ],
    ));
    ok(&run(
        "qemu-io",
        &[
            "-U",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x3c 1M 3M",
            "-c",
            "read -P 0x7e 12M 4k",
            img.to_str().unwrap(),
        ],
    ));
}

/// QEMU's reconnect behaviour (iotests 264 and nbd-reconnect-on-open):
/// `open-timeout` waits for a server that starts late; with
/// `reconnect-delay`, a request made while the server is gone waits for it
/// and succeeds once it is back; after the delay requests fail with EIO;
/// a server back later serves later requests again.
#[test]
fn reconnect_delay_and_open_timeout() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("nbdc-reconn");
    let img = srv.dir.join("disk.raw");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", img.to_str().unwrap(), "8M"],
    ));
    let qsock = srv.dir.join("q.sock");
    // the server appears a second after blockdev-add started waiting
    let (img2, qsock2) = (img.clone(), qsock.clone());
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        QemuNbd::start(&img2, &qsock2)
    });
    let mut c = srv.client();
    let t0 = Instant::now();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "nbd", "node-name": "n0", "export": "exp",
                    "server": {"type": "unix", "path": qsock},
                    "open-timeout": 10, "reconnect-delay": 4})),
    )
    .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let mut qnbd = late.join().unwrap();
    let lsock = srv.dir.join("nbd");
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": lsock}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "d", "writable": true})),
    )
    .unwrap();
    let url = format!("nbd+unix:///d?socket={}", lsock.display());
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x41 0 64k", &url],
    ));

    // the server goes away; a write waits for it and lands when it is back
    drop(qnbd);
    let _ = std::fs::remove_file(&qsock);
    let url2 = url.clone();
    let writer = std::thread::spawn(move || {
        run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x42 1M 64k", &url2],
        )
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !writer.is_finished(),
        "the write did not wait for the server"
    );
    qnbd = QemuNbd::start(&img, &qsock);
    ok(&writer.join().unwrap());
    ok(&run(
        "qemu-io",
        &[
            "-U",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x42 1M 64k",
            "-c",
            "read -P 0x41 0 64k",
            img.to_str().unwrap(),
        ],
    ));

    // gone for longer than reconnect-delay: requests fail with EIO
    drop(qnbd);
    let _ = std::fs::remove_file(&qsock);
    std::thread::sleep(Duration::from_secs(5));
    let t1 = Instant::now();
    let o = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &url]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Input/output error"), "expected EIO: {out}");
    assert!(
        t1.elapsed() < Duration::from_secs(3),
        "the failing read waited"
    );

    // back later: later requests are served again
    let _qnbd = QemuNbd::start(&img, &qsock);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = run("qemu-io", &["-f", "raw", "-c", "read -P 0x42 1M 64k", &url]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success()
            && !out.contains("error")
            && !out.contains("Pattern verification failed")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no reconnect: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Without `reconnect-delay`, a lost server fails requests at once.
#[test]
fn without_reconnect_delay_requests_fail_at_once() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("nbdc-noreconn");
    let img = srv.dir.join("disk.raw");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", img.to_str().unwrap(), "8M"],
    ));
    let qsock = srv.dir.join("q.sock");
    let qnbd = QemuNbd::start(&img, &qsock);
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "nbd", "node-name": "n0", "export": "exp",
                    "server": {"type": "unix", "path": qsock}})),
    )
    .unwrap();
    let lsock = srv.dir.join("nbd");
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": lsock}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "d"})),
    )
    .unwrap();
    let url = format!("nbd+unix:///d?socket={}", lsock.display());
    ok(&run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 64k", &url],
    ));
    drop(qnbd);
    std::thread::sleep(Duration::from_millis(300));
    let t1 = Instant::now();
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", &url]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Input/output error"), "expected EIO: {out}");
    assert!(t1.elapsed() < Duration::from_secs(3));
    c.execute(
        "block-export-del",
        Some(json!({"id": "e0", "mode": "hard"})),
    )
    .unwrap();
    wait(&mut c, json!({"event": "BLOCK_EXPORT_DELETED"}));
    c.execute("blockdev-del", Some(json!({"node-name": "n0"})))
        .unwrap();
}

/// blockd's nbd node against nbdkit's memory plugin: a mirror of a sparse
/// qcow2 into it reads back identical, and nbdkit's disk stays sparse
/// (its extents show data only where the source has data).
#[test]
fn mirror_into_nbdkit_memory() {
    if !have_qemu() || Command::new("nbdkit").arg("--version").output().is_err() {
        eprintln!("skipped: qemu tools or nbdkit not installed");
        return;
    }
    let srv = Server::start("nbdc-nbdkit");
    let src = srv.dir.join("src.qcow2");
    let s = src.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-q", "-f", "qcow2", s, "64M"]));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xc3 4M 1M",
            "-c",
            "write -P 0x3c 60M 64k",
            s,
        ],
    ));
    let ksock = srv.dir.join("k.sock");
    let mut kit = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&ksock)
        .args(["memory", "64M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nbdkit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ksock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "node-name": "src",
                    "file": {"driver": "file", "filename": src}})),
    )
    .unwrap();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "nbd", "node-name": "tgt",
                    "server": {"type": "unix", "path": ksock}})),
    )
    .unwrap();
    c.execute(
        "blockdev-mirror",
        Some(json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"})),
    )
    .unwrap();
    wait(
        &mut c,
        json!({"event": "BLOCK_JOB_READY", "data": {"device": "m0"}}),
    );
    c.execute("block-job-cancel", Some(json!({"device": "m0"})))
        .unwrap();
    let done = wait(
        &mut c,
        json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "m0"}}),
    );
    assert!(done["data"].get("error").is_none(), "mirror failed: {done}");
    c.execute("blockdev-del", Some(json!({"node-name": "tgt"})))
        .unwrap();
    let url = format!("nbd+unix://?socket={}", ksock.display());
    ok(&run(
        "qemu-img",
        &["compare", "-U", "-f", "qcow2", "-F", "raw", s, &url],
    ));
    let map = ok(&run(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", &url],
    ));
    let v: Value = serde_json::from_str(&map).unwrap();
    let data: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data <= 2 << 20, "nbdkit disk not sparse: {map}");
    let _ = kit.kill();
    let _ = kit.wait();
}

/// A server that comes back with a different export (another size) is
/// not taken: requests fail until the original export is back.
#[test]
fn reconnect_refuses_a_different_export() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("nbdc-other");
    let img = srv.dir.join("disk.raw");
    let other = srv.dir.join("other.raw");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", img.to_str().unwrap(), "8M"],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", other.to_str().unwrap(), "16M"],
    ));
    let qsock = srv.dir.join("q.sock");
    let qnbd = QemuNbd::start(&img, &qsock);
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "nbd", "node-name": "n0", "export": "exp",
                    "server": {"type": "unix", "path": qsock}, "reconnect-delay": 1})),
    )
    .unwrap();
    let lsock = srv.dir.join("nbd");
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": lsock}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "d"})),
    )
    .unwrap();
    let url = format!("nbd+unix:///d?socket={}", lsock.display());
    drop(qnbd);
    let _ = std::fs::remove_file(&qsock);
    let q2 = QemuNbd::start(&other, &qsock);
    std::thread::sleep(Duration::from_secs(2));
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", &url]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Input/output error"), "expected EIO: {out}");
    drop(q2);
    let _ = std::fs::remove_file(&qsock);
    let _q3 = QemuNbd::start(&img, &qsock);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = run(
            "qemu-io",
            &["-r", "-f", "raw", "-c", "read -P 0 0 4k", &url],
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() && !out.contains("error") {
            break;
        }
        assert!(Instant::now() < deadline, "no reconnect: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

//! In the spirit of QEMU's iotest `graph-changes-while-io`: `qemu-img
//! bench` writes through an NBD export of a qcow2 node (queue depth 16,
//! over a backing chain) while another client, for 10 seconds, adds a
//! qcow2 overlay over it, reopens it and its overlay (read-only and back,
//! detect-zeroes, cache modes, the backing child), and deletes the overlay
//! again. No request may fail, no command may hang, and afterwards every
//! byte written is there (`qemu-io read -P`) and the images are clean
//! (`qemu-img check`). Set `BLOCKD_GRAPH_IO_SECS` to run longer.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{have, Server};
use serde_json::{json, Value};

const SIZE: u64 = 16 << 20;

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn graph_changes_while_io() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let secs: u64 = std::env::var("BLOCKD_GRAPH_IO_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut srv = Server::start("gcio");
    let d = srv.dir.clone();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    sh(&format!(
        "qemu-img create -q -f qcow2 {} {SIZE}",
        p("b0.qcow2")
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 {}",
        p("b1.qcow2")
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 {}",
        p("disk.qcow2")
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 -u -b disk.qcow2 -F qcow2 {} {SIZE}",
        p("ov.qcow2")
    ));
    let mut c = srv.client();
    let run = |c: &mut blockd_testkit::QmpClient, name: &str, args: Value| {
        c.execute(name, Some(args.clone()))
            .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
    };
    let file = |n: &str, f: &str| json!({"driver": "file", "node-name": n, "filename": p(f)});
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "b0", "read-only": true, "file": file("b0-f", "b0.qcow2"), "backing": null}),
    );
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "b1", "read-only": true, "file": file("b1-f", "b1.qcow2"), "backing": "b0"}),
    );
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "disk", "file": file("disk-f", "disk.qcow2"), "backing": "b1"}),
    );
    run(
        &mut c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p("nbd")}}}),
    );
    run(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}),
    );

    // The writer: whole-image passes of 4 KiB writes at depth 16, one
    // after the other, until told to stop; every pass must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    let url = format!("nbd+unix:///disk?socket={}", p("nbd"));
    let writer = {
        let (stop, passes) = (stop.clone(), passes.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = Command::new("qemu-img")
                    .args(["bench", "-w", "-f", "raw", "-d", "16", "-s", "4096"])
                    .arg("-c")
                    .arg((SIZE / 4096).to_string())
                    .arg("--pattern=0x5a")
                    .arg(&url)
                    .output()
                    .expect("qemu-img bench");
                assert!(
                    out.status.success(),
                    "a bench pass failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                passes.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        let flip = rounds % 2 == 0;
        run(
            &mut c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "ov", "file": file("ov-f", "ov.qcow2"), "backing": "disk"}),
        );
        run(
            &mut c,
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "ov", "file": "ov-f", "backing": "disk", "read-only": true}]}),
        );
        run(
            &mut c,
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "disk", "file": "disk-f", "backing": "b1",
                               "detect-zeroes": if flip { "on" } else { "off" },
                               "cache": {"no-flush": flip}}]}),
        );
        run(
            &mut c,
            "blockdev-reopen",
            json!({"options": [
                {"driver": "qcow2", "node-name": "ov", "file": "ov-f", "backing": "disk"},
                {"driver": "qcow2", "node-name": "b1", "read-only": true, "file": "b1-f", "backing": "b0"}]}),
        );
        // The exported node's backing child goes away and comes back.
        run(
            &mut c,
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "disk", "file": "disk-f", "backing": null}]}),
        );
        run(
            &mut c,
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "disk", "file": "disk-f", "backing": "b1"}]}),
        );
        run(&mut c, "blockdev-del", json!({"node-name": "ov"}));
        rounds += 1;
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("the writer failed");
    assert!(rounds >= 10, "only {rounds} rounds of graph changes");
    assert!(passes.load(Ordering::SeqCst) >= 1, "no bench pass finished");
    eprintln!(
        "{rounds} rounds of graph changes during {} bench passes",
        passes.load(Ordering::SeqCst)
    );
    run(&mut c, "block-export-del", json!({"id": "e"}));
    common::alive_check(&mut c, &mut srv, "after the changes");
    for n in ["disk", "b1", "b0"] {
        // The export goes away asynchronously; retry while it is in use.
        let t = Instant::now();
        loop {
            match c.execute("blockdev-del", Some(json!({"node-name": n}))) {
                Ok(_) => break,
                Err(e) if t.elapsed() < Duration::from_secs(10) => {
                    eprintln!("blockdev-del {n}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("blockdev-del {n}: {e}"),
            }
        }
    }
    // qemu-io exits 0 even when a pattern does not match: look at what it says.
    sh(&format!(
        "qemu-io -r -f qcow2 -c 'read -P 0x5a 0 {SIZE}' {} 2>&1 \\
         | awk '/verification failed/{{bad=1}} /^read {SIZE}\\/{SIZE}/{{ok=1}} END{{exit (bad || !ok)}}'",
        p("disk.qcow2")
    ));
    for img in ["disk.qcow2", "ov.qcow2", "b1.qcow2", "b0.qcow2"] {
        sh(&format!("qemu-img check -q {}", p(img)));
    }
}

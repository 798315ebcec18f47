//! Data safety of `blockdev-backup` (QEMU's iotests on backup under guest
//! I/O, e.g. 056/257 in spirit): while a `sync: full` backup runs slowly,
//! clients write, write zeroes and discard through an NBD export of the
//! source. The copy-before-write filter must copy every cluster's old
//! data before a write lands, so afterwards the target equals a copy of
//! the source made before the job started (`qemu-img compare`), and both
//! images are clean (`qemu-img check`).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockd_testkit::Pattern;
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
fn full_backup_is_point_in_time_under_writes() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let srv = Server::start("bkio");
    let d = srv.dir.clone();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    sh(&format!(
        "qemu-img create -q -f qcow2 {} {SIZE}",
        p("src.qcow2")
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 {} {SIZE}",
        p("tgt.qcow2")
    ));
    // Data of three kinds, and a hole at the end.
    sh(&format!(
        "qemu-io -f qcow2 -c 'write -P 0x11 0 6M' -c 'write -P 0x22 6M 6M' \
         -c 'write -z 12M 1M' -c 'write -P 0x33 13M 1M' {}",
        p("src.qcow2")
    ));
    // The point in time the backup must capture.
    sh(&format!(
        "qemu-img convert -O qcow2 {} {}",
        p("src.qcow2"),
        p("ref.qcow2")
    ));
    let mut c = srv.client();
    let run = |c: &mut blockd_testkit::QmpClient, name: &str, args: Value| {
        c.execute(name, Some(args.clone()))
            .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
    };
    let file = |f: &str| json!({"driver": "file", "filename": p(f)});
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "src", "file": file("src.qcow2")}),
    );
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt", "file": file("tgt.qcow2")}),
    );
    run(
        &mut c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p("nbd")}}}),
    );
    run(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "src", "name": "d", "writable": true}),
    );
    // About 4 s for the whole image: the writes below come while most of
    // it is still to be copied, by the job or by the filter.
    run(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": 4 << 20}),
    );

    let url = format!("nbd+unix:///d?socket={}", p("nbd"));
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    // Depth-16 writes over the whole image, pass after pass.
    let bench = {
        let (stop, passes, url) = (stop.clone(), passes.clone(), url.clone());
        std::thread::spawn(move || {
            let mut pattern = 0x40u8;
            while !stop.load(Ordering::SeqCst) {
                pattern = pattern.wrapping_add(1);
                let out = Command::new("qemu-img")
                    .args(["bench", "-w", "-f", "raw", "-d", "16", "-s", "65536"])
                    .args(["-S", "196608", "-c", "80"])
                    .arg(format!("--pattern={pattern}"))
                    .arg(&url)
                    .output()
                    .expect("qemu-img bench");
                assert!(
                    out.status.success(),
                    "a bench pass failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                passes.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // Small unaligned writes, zeroes and discards elsewhere.
    sh(&format!(
        "qemu-io -f raw -c 'write -P 0x77 100k 3k' -c 'write -z 5M 200k' \
         -c 'discard 9M 1M' -c 'write -P 0x78 13M 512' -c 'write -z 15M 1M' \
         -c 'write -P 0x79 16380k 4k' '{url}'"
    ));
    let done = c
        .wait_event(
            &Pattern::parse(r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "b"}}"#)
                .unwrap(),
            Duration::from_secs(60),
        )
        .expect("the backup completes");
    assert!(done["data"].get("error").is_none(), "backup failed: {done}");
    assert_eq!(done["data"]["offset"], json!(SIZE), "{done}");
    stop.store(true, Ordering::SeqCst);
    bench.join().expect("writer");
    assert!(passes.load(Ordering::SeqCst) > 0, "no write pass ran");

    run(&mut c, "block-export-del", json!({"id": "e"}));
    c.wait_event(
        &Pattern::parse(r#"{"event": "BLOCK_EXPORT_DELETED"}"#).unwrap(),
        Duration::from_secs(10),
    )
    .expect("export deleted");
    run(&mut c, "blockdev-del", json!({"node-name": "tgt"}));
    run(&mut c, "blockdev-del", json!({"node-name": "src"}));
    sh(&format!(
        "qemu-img compare -f qcow2 -F qcow2 {} {}",
        p("ref.qcow2"),
        p("tgt.qcow2")
    ));
    // And the source did change.
    sh(&format!(
        "! qemu-img compare -q -f qcow2 -F qcow2 {} {}",
        p("ref.qcow2"),
        p("src.qcow2")
    ));
    sh(&format!("qemu-img check -q {}", p("tgt.qcow2")));
    sh(&format!("qemu-img check -q {}", p("src.qcow2")));
}

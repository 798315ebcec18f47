//! Internal snapshots taken while clients write (QEMU drains the node for
//! `blockdev-snapshot-internal-sync`): every write pass through NBD uses
//! a new pattern, and a snapshot may hold only patterns of passes that
//! began before its command returned; a write that went in place into a
//! cluster the snapshot now shares would put a later pattern there.
//! Afterwards the snapshots are deleted again, the active image equals
//! what clients last saw, and `qemu-img check` is clean throughout.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockd_testkit::QmpClient;
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

fn run(c: &mut QmpClient, name: &str, args: Value) -> Value {
    c.execute(name, Some(args.clone()))
        .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
}

#[test]
fn snapshots_under_writes_are_points_in_time() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let srv = Server::start("snapio");
    let d = srv.dir.clone();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    sh(&format!(
        "qemu-img create -q -f qcow2 {} {SIZE}",
        p("q.qcow2")
    ));
    sh(&format!(
        "qemu-io -f qcow2 -c 'write -P 0x11 0 {SIZE}' {}",
        p("q.qcow2")
    ));
    let mut c = srv.client();
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": p("q.qcow2")}}),
    );
    run(
        &mut c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p("nbd")}}}),
    );
    run(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "q", "name": "d", "writable": true}),
    );
    let url = format!("nbd+unix:///d?socket={}", p("nbd"));
    let stop = Arc::new(AtomicBool::new(false));
    // (pattern, when its pass began)
    let passes: Arc<Mutex<Vec<(u8, Instant)>>> = Arc::default();
    let bench = {
        let (stop, passes, url) = (stop.clone(), passes.clone(), url.clone());
        std::thread::spawn(move || {
            let mut pattern = 0x40u8;
            while !stop.load(Ordering::SeqCst) && pattern < 0xf0 {
                passes.lock().unwrap().push((pattern, Instant::now()));
                let out = Command::new("qemu-img")
                    .args(["bench", "-w", "-f", "raw", "-d", "16", "-s", "65536"])
                    .args(["-S", "131072", "-c", "128"])
                    .arg(format!("--pattern={pattern}"))
                    .arg(&url)
                    .output()
                    .expect("qemu-img bench");
                assert!(
                    out.status.success(),
                    "a bench pass failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                pattern += 1;
            }
        })
    };
    let mut taken = Vec::new();
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(250));
        let name = format!("s{i}");
        run(
            &mut c,
            "blockdev-snapshot-internal-sync",
            json!({"device": "q", "name": name}),
        );
        taken.push((name, Instant::now()));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    bench.join().expect("writer");
    let passes = passes.lock().unwrap().clone();
    assert!(passes.len() >= 3, "too few write passes: {}", passes.len());
    sh(&format!(
        "qemu-img convert -f raw -O raw '{url}' {}",
        p("now.raw")
    ));
    run(&mut c, "block-export-del", json!({"id": "e"}));
    c.wait_event(
        &blockd_testkit::Pattern::parse(r#"{"event": "BLOCK_EXPORT_DELETED"}"#).unwrap(),
        Duration::from_secs(10),
    )
    .expect("export deleted");
    run(&mut c, "blockdev-del", json!({"node-name": "q"}));
    sh(&format!("qemu-img check {}", p("q.qcow2")));
    sh(&format!(
        "qemu-img compare -f qcow2 -F raw {} {}",
        p("q.qcow2"),
        p("now.raw")
    ));
    for (name, returned) in &taken {
        let out = p(&format!("{name}.raw"));
        sh(&format!(
            "qemu-img convert -f qcow2 -O raw -l snapshot.name={name} {} {out}",
            p("q.qcow2")
        ));
        let data = std::fs::read(&out).unwrap();
        let later: Vec<u8> = passes
            .iter()
            .filter(|(_, began)| began > returned)
            .map(|(pat, _)| *pat)
            .collect();
        for (i, block) in data.chunks(65536).enumerate() {
            let b = block[0];
            assert!(block.iter().all(|&x| x == b), "{name}: block {i} is torn");
            assert!(
                !later.contains(&b),
                "{name}: block {i} holds pattern {b:#x} of a pass that began after the snapshot"
            );
        }
    }
    // Deleted again by a new node: the image is clean and unchanged.
    let mut c = srv.client();
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q2", "file": {"driver": "file", "filename": p("q.qcow2")}}),
    );
    for (name, _) in &taken {
        let r = run(
            &mut c,
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": "q2", "name": name}),
        );
        assert_eq!(r["name"], json!(name));
    }
    run(&mut c, "blockdev-del", json!({"node-name": "q2"}));
    sh(&format!("qemu-img check {}", p("q.qcow2")));
    sh(&format!(
        "qemu-img snapshot -l {} | wc -l | grep -qx 0",
        p("q.qcow2")
    ));
    sh(&format!(
        "qemu-img compare -f qcow2 -F raw {} {}",
        p("q.qcow2"),
        p("now.raw")
    ));
}

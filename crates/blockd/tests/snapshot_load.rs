//! libvirt's external-snapshot workflow under client load: no byte a
//! client wrote may get lost, and no client sees an error.
//!
//! What libvirt sends (`qemuSnapshotCreateActiveExternal`, then
//! `virsh blockcommit --active --pivot`): the overlay image is created
//! with the disk's image as its backing file and added with
//! `blockdev-add` and `backing: null`; a `transaction` with a
//! `blockdev-snapshot` puts it on top of the disk's node; later an active
//! `block-commit` (with `auto-dismiss: false`) merges the overlay back,
//! `BLOCK_JOB_READY`, `block-job-complete`, and `job-dismiss` once the job
//! has concluded.
//!
//! Here the disk is a qcow2 node with data, exported writable over NBD,
//! and the load of `common/nbd_load.rs` (4 connections with 16 requests
//! in flight each: writes, write-zeroes, trims, reads, flushes; reads are
//! checked against a reference written in parallel) runs through the
//! snapshot, the commit and the pivot. Then the export's content must
//! equal the reference, `qemu-img compare` of the reference and the base
//! image must succeed, and `qemu-img check` must find both images clean.
//!
//! One round by default; with `BLOCKD_SOAK=1` rounds (fresh server,
//! images and seed each) repeat for 60 seconds, as in `job_load.rs`;
//! `BLOCKD_JOB_LOAD_SECS` sets the seconds.

mod common;
#[path = "common/nbd_load.rs"]
mod nbd_load;

use std::process::Command;
use std::time::{Duration, Instant};

use blockd_testkit::QmpClient;
use common::{have, Server};
use nbd_load::{Conn, Load, LoadConfig};
use serde_json::{json, Value};

const SIZE: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(c: &mut QmpClient, name: &str, args: Value) -> Value {
    c.execute(name, Some(args.clone()))
        .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
}

/// Waits for an event `pred` accepts, checking the load meanwhile.
fn wait_event(
    srv: &mut Server,
    c: &mut QmpClient,
    what: &str,
    load: &Load,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = c.wait_event_with(&pred, Duration::from_millis(200));
        load.check(&format!("waiting for {what}"));
        match r {
            Ok(e) => return e,
            Err(blockd_testkit::ClientError::Timeout(_)) => {
                srv.assert_alive(&format!("waiting for {what}"));
                assert!(
                    Instant::now() < deadline,
                    "no {what}; query-jobs: {}",
                    run(c, "query-jobs", json!({}))
                );
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

fn job_event(ev: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["event"] == ev && e["data"]["device"] == "j"
}

fn export_node(c: &mut QmpClient) -> String {
    let r = run(c, "query-block-exports", json!({}));
    r[0]["node-name"].as_str().unwrap_or_default().to_string()
}

fn snapshot_then_active_commit(seed: u64) {
    let mut srv = Server::start("snap-load");
    let dir = srv.dir.clone();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let (base, ov) = (p("base.qcow2"), p("ov.qcow2"));
    sh(&format!("qemu-img create -q -f qcow2 {base} {SIZE}"));
    sh(&format!(
        "qemu-io -f qcow2 -c 'write -P 0x11 0 {}' -c 'write -P 0x22 {} {}' -c 'write -z {} {}' {base}",
        16 * MIB,
        32 * MIB,
        8 * MIB,
        40 * MIB,
        4 * MIB
    ));
    let mut initial = vec![0u8; SIZE as usize];
    initial[..(16 * MIB) as usize].fill(0x11);
    initial[(32 * MIB) as usize..(40 * MIB) as usize].fill(0x22);
    let mut c = srv.client();
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "discard": "unmap",
               "file": {"driver": "file", "node-name": "base-f", "filename": base,
                        "discard": "unmap"}}),
    );
    run(
        &mut c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p("nbd")}}}),
    );
    run(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "base", "name": "e", "writable": true}),
    );
    let load = Load::start(LoadConfig::new(srv.dir.join("nbd"), "e", seed), initial);
    std::thread::sleep(Duration::from_millis(300));

    // libvirt: the overlay image names the disk's image as its backing
    // file; the node is added without one.
    sh(&format!(
        "qemu-img create -q -f qcow2 -b {base} -F qcow2 {ov} {SIZE}"
    ));
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ov", "backing": null, "discard": "unmap",
               "file": {"driver": "file", "node-name": "ov-f", "filename": ov,
                        "discard": "unmap"}}),
    );
    let before = load.ops();
    run(
        &mut c,
        "transaction",
        json!({"actions": [{"type": "blockdev-snapshot",
                            "data": {"node": "base", "overlay": "ov"}}]}),
    );
    load.check("after the snapshot");
    assert_eq!(export_node(&mut c), "ov");
    std::thread::sleep(Duration::from_millis(400));
    load.check("writing to the overlay");
    assert!(load.ops() > before, "the load stalled across the snapshot");

    // virsh blockcommit --active --pivot.
    run(
        &mut c,
        "block-commit",
        json!({"job-id": "j", "device": "ov", "top-node": "ov", "base-node": "base",
               "auto-dismiss": false}),
    );
    wait_event(
        &mut srv,
        &mut c,
        "BLOCK_JOB_READY",
        &load,
        job_event("BLOCK_JOB_READY"),
    );
    std::thread::sleep(Duration::from_millis(300));
    run(&mut c, "block-job-complete", json!({"device": "j"}));
    let done = wait_event(
        &mut srv,
        &mut c,
        "BLOCK_JOB_COMPLETED",
        &load,
        job_event("BLOCK_JOB_COMPLETED"),
    );
    assert!(done["data"].get("error").is_none(), "commit failed: {done}");
    wait_event(&mut srv, &mut c, "concluded", &load, |e| {
        e["event"] == "JOB_STATUS_CHANGE"
            && e["data"]["id"] == "j"
            && e["data"]["status"] == "concluded"
    });
    run(&mut c, "job-dismiss", json!({"id": "j"}));
    assert_eq!(run(&mut c, "query-jobs", json!({})), json!([]));
    assert_eq!(export_node(&mut c), "base");
    std::thread::sleep(Duration::from_millis(400));
    // Panics if any request failed.
    let (mut reference, stats) = load.stop();
    eprintln!("load: {stats}");

    let mut conn = Conn::connect(&srv.dir.join("nbd"), "e").expect("NBD connection");
    let got = conn.read_all().expect("read the export");
    conn.disconnect();
    reference
        .adopt(&got)
        .unwrap_or_else(|e| panic!("the export after the pivot: {e}"));
    assert!(
        got == reference.img,
        "the export differs from the reference"
    );

    run(&mut c, "block-export-del", json!({"id": "e"}));
    for n in ["ov", "base"] {
        let t = Instant::now();
        while let Err(e) = c.execute("blockdev-del", Some(json!({"node-name": n}))) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "blockdev-del {n}: {e}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    common::alive_check(&mut c, &mut srv, "after the pivot");
    let refpath = p("ref.raw");
    std::fs::write(&refpath, &reference.img).unwrap();
    sh(&format!(
        "qemu-img compare -f raw -F qcow2 {refpath} {base}"
    ));
    sh(&format!("qemu-img check -q {base}"));
    sh(&format!("qemu-img check -q {ov}"));
}

#[test]
fn snapshot_transaction_then_active_commit_under_load() {
    if !(have("qemu-img") && have("qemu-io")) {
        return;
    }
    let soak = std::env::var_os("BLOCKD_SOAK").is_some_and(|v| v != "0" && !v.is_empty());
    let secs: u64 = std::env::var("BLOCKD_JOB_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if soak { 60 } else { 0 });
    let t = Instant::now();
    let mut round = 0;
    loop {
        let seed = 0x5eed + round;
        eprintln!("round {round} (seed {seed:#x})");
        snapshot_then_active_commit(seed);
        round += 1;
        if t.elapsed() >= Duration::from_secs(secs) {
            break;
        }
    }
}

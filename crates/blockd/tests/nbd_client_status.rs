//! Block status through the `nbd` client driver: what a re-export of an
//! nbd node reports (`qemu-img map`, `nbdinfo --map`) must be what the
//! server's image holds: holes made through the node at once (the
//! status cache is not stale), and allocation in the server's backing
//! chain (`qemu:allocation-depth`) as allocation in the node.

mod common;
#[path = "common/qemu_nbd.rs"]
mod qemu_nbd;

use std::path::Path;
use std::process::Command;

use blockd_testkit::QmpClient;
use common::Server;
use qemu_nbd::{have_qemu, ok, run, QemuNbd};
use serde_json::{json, Value};

/// Adds nbd node `n0` on `sock` (export `exp`) and re-exports it as
/// `again` (with `qemu:allocation-depth`; writable unless the node is
/// read-only); returns the re-export's URL. `extra`: more node options.
fn reexport(c: &mut QmpClient, srv: &Server, sock: &Path, extra: Value) -> String {
    let writable = extra["read-only"] != true;
    let mut node = json!({"driver": "nbd", "node-name": "n0", "export": "exp",
                          "server": {"type": "unix", "path": sock}});
    if let (Some(n), Some(e)) = (node.as_object_mut(), extra.as_object()) {
        n.extend(e.clone());
    }
    c.execute("blockdev-add", Some(node)).unwrap();
    let lsock = srv.dir.join("nbd");
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": lsock}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(
            json!({"type": "nbd", "id": "e", "node-name": "n0", "name": "again",
                    "writable": writable, "allocation-depth": true}),
        ),
    )
    .unwrap();
    format!("nbd+unix:///again?socket={}", lsock.display())
}

/// Block status through an nbd node is cached for data ranges (QEMU's
/// block-status cache): after reads filled it, zeroing a range through
/// the node (a hole on the remote) must show at once as zero in
/// `qemu-img map` over a re-export of the node, and reads stay exact.
#[test]
fn block_status_after_zeroing_through_the_node_is_exact() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("nbdc-bsc");
    let img = srv.dir.join("disk.raw");
    let i = img.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-q", "-f", "raw", i, "16M"]));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 16M", i],
    ));
    let qsock = srv.dir.join("q.sock");
    let _qnbd = QemuNbd::start_with(&img, &qsock, &["--discard=unmap"]);
    let mut c = srv.client();
    let url = reexport(&mut c, &srv, &qsock, json!({"discard": "unmap"}));
    let map = |what: &str| -> Vec<(u64, u64, bool, bool)> {
        let out = ok(&run(
            "qemu-img",
            &["map", "-f", "raw", "--output=json", &url],
        ));
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["data"] == true,
                    e["zero"] == true,
                )
            })
            .collect()
    };
    // reads (each asks block status) fill the cache: all data
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 6M 1M",
            &url,
        ],
    ));
    assert_eq!(map("before"), vec![(0, 16 << 20, true, false)]);
    // a hole on the remote, made through the node
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -z -u 4M 2M", &url],
    ));
    let m = map("after zeroing");
    assert!(
        m.contains(&(4 << 20, 2 << 20, false, true)),
        "the zeroed range is not shown as a hole: {m:?}"
    );
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 4M",
            "-c",
            "read -P 0 4M 2M",
            "-c",
            "read -P 0x5a 6M 10M",
            &url,
        ],
    ));
}

/// `nbdinfo --map=qemu:allocation-depth URL` as (offset, length, depth).
fn depth_map(url: &str) -> Vec<(u64, u64, u64)> {
    let out = ok(&run(
        "nbdinfo",
        &["--json", "--map=qemu:allocation-depth", url],
    ));
    let v: Value = serde_json::from_str(&out).expect("nbdinfo json");
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A qcow2 on qemu-nbd (with `--allocation-depth`): data and an
/// allocated zero cluster range in the top layer, data in its backing
/// file, the rest allocated nowhere. Through blockd's nbd node and its
/// re-export, what the server's chain allocates is allocated (depth 1:
/// the node is the top of blockd's chain) and the rest is not (depth 0),
/// where `base:allocation` alone would call every zero range allocated.
/// Against a server without the context (qemu-nbd's default), block
/// status falls back to `base:allocation`: zero ranges allocated.
#[test]
fn allocation_in_the_servers_chain_is_allocation_in_the_node() {
    if !have_qemu() || Command::new("nbdinfo").arg("--version").output().is_err() {
        eprintln!("skipped: qemu tools or nbdinfo not installed");
        return;
    }
    let srv = Server::start("nbdc-depth");
    let base = srv.dir.join("base.qcow2");
    let top = srv.dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    ok(&run("qemu-img", &["create", "-q", "-f", "qcow2", b, "16M"]));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 4M 1M", b],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
    ));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -z 1M 1M",
            t,
        ],
    ));
    const M: u64 = 1 << 20;
    for (with_depth, want) in [
        (
            true,
            vec![
                (0, 2 * M, 1),
                (2 * M, 2 * M, 0),
                (4 * M, M, 1),
                (5 * M, 11 * M, 0),
            ],
        ),
        (false, vec![(0, 16 * M, 1)]),
    ] {
        let srv = Server::start("nbdc-depth");
        let qsock = srv.dir.join("q.sock");
        let extra: &[&str] = if with_depth { &["-A", "-r"] } else { &["-r"] };
        let _q = QemuNbd::start_fmt(&top, &qsock, "qcow2", extra);
        let mut c = srv.client();
        let url = reexport(&mut c, &srv, &qsock, json!({"read-only": true}));
        assert_eq!(depth_map(&url), want, "server offers depth: {with_depth}");
        // and the data reads as the server's chain holds it
        ok(&run(
            "qemu-io",
            &[
                "-r",
                "-f",
                "raw",
                "-c",
                "read -P 0x5a 0 1M",
                "-c",
                "read -P 0 1M 3M",
                "-c",
                "read -P 0x11 4M 1M",
                "-c",
                "read -P 0 5M 11M",
                &url,
            ],
        ));
    }
}

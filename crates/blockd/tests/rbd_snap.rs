//! Internal snapshots of `rbd` nodes against a real Ceph cluster: they
//! are RBD snapshots, as in QEMU's block/rbd.c. How to run: see `rbd.rs`.

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use blockd_testkit::{ClientError, QmpClient};
use ceph::*;
use common::Server;
use serde_json::{json, Value};

/// A test image whose snapshots go with it (`rbd rm` refuses an image
/// that has some).
struct Img(TestImage);

impl Img {
    fn new(conf: &str, tag: &str, size: &str) -> Img {
        Img(TestImage::new(conf, tag, size))
    }
}

impl Drop for Img {
    fn drop(&mut self) {
        let _ = run(
            "rbd",
            &[
                "-c",
                &self.0.conf,
                "snap",
                "purge",
                "--no-progress",
                &self.0.spec(),
            ],
        );
    }
}

/// The names `rbd snap ls` shows.
fn rbd_snaps(conf: &str, spec: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&rbd(conf, &["snap", "ls", "--format", "json", spec])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// The `snapshots` of node `node`'s image info (empty when absent).
fn node_snaps(c: &mut QmpClient, node: &str) -> Vec<Value> {
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    let n = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node} in {nodes}"));
    n["image"]["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// How QEMU's `qemu_rbd_snap_list` shows an RBD snapshot.
fn listed(name: &str, size: u64) -> Value {
    json!({"id": name, "name": name, "vm-state-size": size, "date-sec": 0, "date-nsec": 0,
           "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0})
}

fn snap(c: &mut QmpClient, device: &str, name: &str) -> Result<Value, ClientError> {
    c.execute(
        "blockdev-snapshot-internal-sync",
        Some(json!({"device": device, "name": name})),
    )
}

fn del(c: &mut QmpClient, args: Value) -> Result<Value, ClientError> {
    c.execute("blockdev-snapshot-delete-internal-sync", Some(args))
}

fn qemu_io(u: &str, cmds: &[&str], read_only: bool) -> String {
    let mut a = vec!["-f", "raw"];
    if read_only {
        a.push("-r");
    }
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(u);
    let out = ok(&run("qemu-io", &a));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

#[test]
fn a_snapshot_is_an_rbd_snapshot_that_later_writes_leave_alone() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    let img = Img::new(&conf, "snap", "16M");
    let spec = img.0.spec();
    let srv = Server::start("blockd-rbd-snap");
    let mut c = srv.client();
    c.execute("blockdev-add", Some(rbd_node(&conf, "r0", &img.0.name)))
        .unwrap();
    assert_eq!(node_snaps(&mut c, "r0"), Vec::<Value>::new());
    let u = export(&mut c, &srv, "r0", "disk0");
    qemu_io(&u, &["write -P 0xaa 0 1M", "aio_flush"], false);

    snap(&mut c, "r0", "s1").unwrap();
    assert_eq!(rbd_snaps(&conf, &spec), ["s1"]);
    assert_eq!(node_snaps(&mut c, "r0"), [listed("s1", 16 << 20)]);

    // Writes after the snapshot go to the image only.
    qemu_io(&u, &["write -P 0x55 0 1M", "aio_flush"], false);
    qemu_io(&u, &["read -P 0x55 0 1M"], true);
    let out = rbd_export(&conf, &format!("{spec}@s1"), &srv.dir, "s1.raw");
    let data = std::fs::read(out).unwrap();
    assert_eq!(data.len(), 16 << 20);
    assert!(data[..1 << 20].iter().all(|&b| b == 0xaa));
    assert!(data[1 << 20..].iter().all(|&b| b == 0));

    // The snapshot opened as a node reads the same, and is read-only: no
    // snapshot of it (blockdev.c's words). Deleting has no such check in
    // QEMU, and librbd removes a snapshot through it (here another one).
    snap(&mut c, "r0", "s2").unwrap();
    let mut v = rbd_node(&conf, "at-s1", &img.0.name);
    v["snapshot"] = "s1".into();
    v["read-only"] = true.into();
    c.execute("blockdev-add", Some(v)).unwrap();
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "disk1", "node-name": "at-s1", "name": "disk1"})),
    )
    .unwrap();
    let us = url(&srv.dir.join("nbd"), "disk1");
    qemu_io(&us, &["read -P 0xaa 0 1M", "read -P 0 1M 15M"], true);
    unexport(&mut c, "disk1");
    assert_eq!(
        node_snaps(&mut c, "at-s1"),
        [listed("s1", 16 << 20), listed("s2", 16 << 20)]
    );
    assert_eq!(
        qmp_err(snap(&mut c, "at-s1", "s2")),
        "Device 'at-s1' is read only"
    );
    del(&mut c, json!({"device": "at-s1", "name": "s2"})).unwrap();
    assert_eq!(rbd_snaps(&conf, &spec), ["s1"]);
    assert_eq!(node_snaps(&mut c, "at-s1"), [listed("s1", 16 << 20)]);
    c.execute("blockdev-del", Some(json!({"node-name": "at-s1"})))
        .unwrap();

    // Deleting by name returns what the list showed.
    let r = del(&mut c, json!({"device": "r0", "name": "s1"})).unwrap();
    assert_eq!(r, listed("s1", 16 << 20));
    assert!(rbd_snaps(&conf, &spec).is_empty());
    assert_eq!(node_snaps(&mut c, "r0"), Vec::<Value>::new());
    qemu_io(&u, &["read -P 0x55 0 1M"], true);
    unexport(&mut c, "disk0");
    srv_alive(srv);
}

#[test]
fn names_ids_and_errors_as_in_qemu() {
    let conf = require_cluster!();
    let img = Img::new(&conf, "snapnames", "8M");
    let spec = img.0.spec();
    let srv = Server::start("blockd-rbd-snapnames");
    let mut c = srv.client();
    c.execute("blockdev-add", Some(rbd_node(&conf, "r0", &img.0.name)))
        .unwrap();
    snap(&mut c, "r0", "s1").unwrap();
    snap(&mut c, "r0", "s2").unwrap();
    assert_eq!(
        node_snaps(&mut c, "r0"),
        [listed("s1", 8 << 20), listed("s2", 8 << 20)]
    );

    // Creating: the name must be new, non-empty and shorter than QEMU's
    // id (128 bytes: -ERANGE).
    assert_eq!(
        qmp_err(snap(&mut c, "r0", "s2")),
        "Snapshot with name 's2' already exists on device 'r0'"
    );
    assert_eq!(qmp_err(snap(&mut c, "r0", "")), "Name is empty");
    let long = "x".repeat(128);
    assert_eq!(
        qmp_err(snap(&mut c, "r0", &long)),
        format!("Failed to create snapshot '{long}' on device 'r0': Numerical result out of range")
    );
    snap(&mut c, "r0", &long[..127]).unwrap();
    assert_eq!(rbd_snaps(&conf, &spec), ["s1", "s2", &long[..127]]);

    // Deleting: the id is the name. An id of another name finds nothing
    // (blockdev.c looks the snapshot up first); an id alone finds it but
    // librbd needs the name (qemu_rbd_snap_remove).
    assert_eq!(
        qmp_err(del(
            &mut c,
            json!({"device": "r0", "id": "s1", "name": "s2"})
        )),
        "Snapshot with id 's1' and name 's2' does not exist on device 'r0'"
    );
    assert_eq!(
        qmp_err(del(&mut c, json!({"device": "r0", "id": "s2"}))),
        "rbd need a valid snapshot name"
    );
    assert_eq!(
        qmp_err(del(&mut c, json!({"device": "r0", "name": "nope"}))),
        "Snapshot with id 'null' and name 'nope' does not exist on device 'r0'"
    );
    assert_eq!(
        qmp_err(del(&mut c, json!({"device": "r0"}))),
        "Name or id must be provided"
    );
    let r = del(&mut c, json!({"device": "r0", "id": "s1", "name": "s1"})).unwrap();
    assert_eq!(r, listed("s1", 8 << 20));
    del(&mut c, json!({"device": "r0", "name": &long[..127]})).unwrap();
    assert_eq!(rbd_snaps(&conf, &spec), ["s2"]);
    assert_eq!(node_snaps(&mut c, "r0"), [listed("s2", 8 << 20)]);

    // More snapshots than the first list call makes room for, oldest
    // first.
    let names: Vec<String> = (0..20).map(|i| format!("n{i:02}")).collect();
    for n in &names {
        snap(&mut c, "r0", n).unwrap();
    }
    let mut want = vec![listed("s2", 8 << 20)];
    want.extend(names.iter().map(|n| listed(n, 8 << 20)));
    assert_eq!(node_snaps(&mut c, "r0"), want);
    srv_alive(srv);
}

#[test]
fn transactions_take_snapshots_and_their_abort_removes_them() {
    let conf = require_cluster!();
    let img = Img::new(&conf, "snaptx", "8M");
    let spec = img.0.spec();
    let srv = Server::start("blockd-rbd-snaptx");
    let mut c = srv.client();
    c.execute("blockdev-add", Some(rbd_node(&conf, "r0", &img.0.name)))
        .unwrap();
    let action = |name: &str| {
        json!({"type": "blockdev-snapshot-internal-sync",
               "data": {"device": "r0", "name": name}})
    };
    assert_eq!(
        qmp_err(c.execute(
            "transaction",
            Some(json!({"actions": [action("t1"), {"type": "abort", "data": {}}]}))
        )),
        "Transaction aborted using Abort action"
    );
    assert!(rbd_snaps(&conf, &spec).is_empty());
    assert_eq!(node_snaps(&mut c, "r0"), Vec::<Value>::new());

    c.execute("transaction", Some(json!({"actions": [action("t2")]})))
        .unwrap();
    assert_eq!(rbd_snaps(&conf, &spec), ["t2"]);
    // A failing second action undoes the first.
    assert_eq!(
        qmp_err(c.execute(
            "transaction",
            Some(json!({"actions": [action("t3"), action("t2")]}))
        )),
        "Snapshot with name 't2' already exists on device 'r0'"
    );
    assert_eq!(rbd_snaps(&conf, &spec), ["t2"]);
    srv_alive(srv);
}

#[test]
fn snapshots_taken_outside_show_up_and_can_be_deleted() {
    let conf = require_cluster!();
    let img = Img::new(&conf, "snapext", "8M");
    let spec = img.0.spec();
    let srv = Server::start("blockd-rbd-snapext");
    let mut c = srv.client();
    c.execute("blockdev-add", Some(rbd_node(&conf, "r0", &img.0.name)))
        .unwrap();
    rbd(
        &conf,
        &["snap", "create", "--no-progress", &format!("{spec}@ext")],
    );
    assert_eq!(node_snaps(&mut c, "r0"), [listed("ext", 8 << 20)]);
    assert_eq!(
        qmp_err(snap(&mut c, "r0", "ext")),
        "Snapshot with name 'ext' already exists on device 'r0'"
    );
    // The snapshot records the size when taken.
    c.execute(
        "block_resize",
        Some(json!({"node-name": "r0", "size": 16 << 20})),
    )
    .unwrap();
    snap(&mut c, "r0", "mine").unwrap();
    assert_eq!(
        node_snaps(&mut c, "r0"),
        [listed("ext", 8 << 20), listed("mine", 16 << 20)]
    );
    // query-block shows the same image info for a device on the node.
    c.execute(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "id": "vd0", "drive": "r0"})),
    )
    .unwrap();
    let q = c.execute("query-block", None).unwrap();
    let dev = q
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["inserted"]["node-name"] == "r0")
        .unwrap_or_else(|| panic!("no device on r0 in {q}"));
    assert_eq!(
        dev["inserted"]["image"]["snapshots"],
        json!([listed("ext", 8 << 20), listed("mine", 16 << 20)])
    );
    del(&mut c, json!({"device": "r0", "name": "ext"})).unwrap();
    assert_eq!(rbd_snaps(&conf, &spec), ["mine"]);
    // Removed outside: gone from the list, and not there to delete.
    rbd(
        &conf,
        &["snap", "rm", "--no-progress", &format!("{spec}@mine")],
    );
    assert_eq!(node_snaps(&mut c, "r0"), Vec::<Value>::new());
    assert_eq!(
        qmp_err(del(&mut c, json!({"device": "r0", "name": "mine"}))),
        "Snapshot with id 'null' and name 'mine' does not exist on device 'r0'"
    );
    srv_alive(srv);
}

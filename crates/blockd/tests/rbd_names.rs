//! `rbd:` image names (QEMU's block/rbd.c `qemu_rbd_parse_filename`)
//! against a real Ceph cluster: a local qcow2 overlay whose header names
//! its backing file `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE...]`,
//! opened in blockd from the header, reads the rbd image's data where the
//! overlay has none (`rbd import`ed beforehand), at the snapshot for
//! `@SNAP`; the backing node is `raw` over `rbd`. Other `KEY=VALUE`
//! settings go to Ceph (`rados_conf_set`, QEMU's message when Ceph
//! refuses one); a wrong pool, a missing pool, an option without a value
//! fail with QEMU's messages. A medium (`blockdev-change-medium`) and a
//! `drive-mirror` target (mode `existing`) take the same names. The
//! internal option that carries the settings is not blockdev-add's. How
//! to run: see `rbd.rs`.

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use std::path::{Path, PathBuf};

use blockd_testkit::{ClientError, QmpClient};
use ceph::*;
use common::Server;
use serde_json::{json, Value};

const M: usize = 1 << 20;

/// A 4 MiB image with 0xaa in its first MiB and 0xcc in its third,
/// written with `rbd import` (without blockd).
fn imported(conf: &str, dir: &Path, tag: &str, spec_of: impl Fn(&str) -> String) -> TestImage {
    let src = dir.join(format!("{tag}.raw"));
    let mut data = vec![0u8; 4 * M];
    data[..M].fill(0xaa);
    data[2 * M..3 * M].fill(0xcc);
    std::fs::write(&src, &data).unwrap();
    let img = TestImage::named(conf, tag);
    rbd(
        conf,
        &[
            "import",
            "--no-progress",
            src.to_str().unwrap(),
            &spec_of(&img.name),
        ],
    );
    img
}

/// A qcow2 overlay whose header names `backing` (format raw), with 0xbb
/// at 512k (64k) written without opening the backing file.
fn overlay(dir: &Path, file: &str, backing: &str) -> PathBuf {
    let ov = dir.join(file);
    let o = ov.to_str().unwrap();
    ok(&run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", o, "4M",
        ],
    ));
    let no_backing = json!({"driver": "qcow2", "backing": null,
                            "file": {"driver": "file", "filename": o}});
    ok(&run(
        "qemu-io",
        &[
            "-c",
            "write -P 0xbb 512k 64k",
            &format!("json:{no_backing}"),
        ],
    ));
    ov
}

fn add_overlay(c: &mut QmpClient, node: &str, ov: &Path) -> Result<Value, ClientError> {
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "node-name": node,
                    "file": {"driver": "file", "filename": ov}})),
    )
}

/// The nodes `query-named-block-nodes` lists with driver `drv`.
fn nodes_of(c: &mut QmpClient, drv: &str) -> Vec<Value> {
    let nodes = c.execute("query-named-block-nodes", None).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drv"] == drv)
        .cloned()
        .collect()
}

/// Reads `node` through an NBD export with qemu-io: `first` in the first
/// MiB (the overlay's 0xbb at 512k if `overlay`), zeroes in the second,
/// 0xcc in the third.
fn check_reads(c: &mut QmpClient, srv: &Server, node: &str, first: u8, overlay: bool) {
    let f = format!("{first:#04x}");
    let mut cmds = vec![];
    if overlay {
        cmds.push(format!("read -P {f} 0 512k"));
        cmds.push("read -P 0xbb 512k 64k".to_string());
        cmds.push(format!("read -P {f} 576k 448k"));
    } else {
        cmds.push(format!("read -P {f} 0 1M"));
    }
    cmds.push("read -P 0 1M 1M".to_string());
    cmds.push("read -P 0xcc 2M 1M".to_string());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_reads(c, srv, node, &cmds);
}

#[test]
fn backing_files_named_rbd() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    let srv = Server::start("blockd-rbd-names");
    let mut c = srv.client();
    let img = imported(&conf, &srv.dir, "names", |n| format!("rbd/{n}"));

    // rbd:POOL/IMAGE:conf=CONF, and Ceph settings (applied: a bad one
    // fails, below).
    for (i, name) in [
        format!("rbd:rbd/{}:conf={conf}", img.name),
        format!("rbd:rbd/{}:conf={conf}:rbd_cache=false:id=admin", img.name),
    ]
    .iter()
    .enumerate()
    {
        let node = format!("ov{i}");
        let ov = overlay(&srv.dir, &format!("{node}.qcow2"), name);
        add_overlay(&mut c, &node, &ov).unwrap();
        let q = c.execute("query-named-block-nodes", None).unwrap();
        let top = q
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == node.as_str())
            .unwrap()
            .clone();
        assert_eq!(top["image"]["backing-filename"], name.as_str(), "{top}");
        assert_eq!(top["image"]["backing-image"]["format"], "raw", "{top}");
        let rbd_nodes = nodes_of(&mut c, "rbd");
        assert_eq!(rbd_nodes.len(), 1, "{rbd_nodes:?}");
        let r = &rbd_nodes[0];
        assert_eq!(r["ro"], true, "{r}");
        let file: Value =
            serde_json::from_str(r["file"].as_str().unwrap().strip_prefix("json:").unwrap())
                .unwrap();
        assert_eq!(file["pool"], "rbd", "{r}");
        assert_eq!(file["namespace"], "", "{r}");
        assert_eq!(file["image"], img.name.as_str(), "{r}");
        assert_eq!(file["conf"], conf.as_str(), "{r}");
        if i == 1 {
            assert_eq!(file["user"], "admin", "{r}");
        }
        check_reads(&mut c, &srv, &node, 0xaa, true);
        c.execute("blockdev-del", Some(json!({"node-name": node})))
            .unwrap();
        assert!(nodes_of(&mut c, "rbd").is_empty());
    }

    // @SNAP: the snapshot's data, though the image changed since.
    rbd(&conf, &["snap", "create", &format!("{}@s1", img.spec())]);
    c.execute("blockdev-add", Some(rbd_node(&conf, "w", &img.name)))
        .unwrap();
    let u = export(&mut c, &srv, "w", "w");
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 1M", &u],
    ));
    unexport(&mut c, "w");
    c.execute("blockdev-del", Some(json!({"node-name": "w"})))
        .unwrap();
    let name = format!("rbd:rbd/{}@s1:conf={conf}", img.name);
    let ov = overlay(&srv.dir, "snap.qcow2", &name);
    add_overlay(&mut c, "ovs", &ov).unwrap();
    let r = nodes_of(&mut c, "rbd").remove(0);
    assert_eq!(r["ro"], true, "{r}");
    assert!(
        r["file"].as_str().unwrap().contains(r#""snapshot": "s1""#),
        "{r}"
    );
    check_reads(&mut c, &srv, "ovs", 0xaa, true);
    c.execute("blockdev-del", Some(json!({"node-name": "ovs"})))
        .unwrap();
    // Without the snapshot: the head, as written since.
    let name = format!("rbd:rbd/{}:conf={conf}", img.name);
    let ov = overlay(&srv.dir, "head.qcow2", &name);
    add_overlay(&mut c, "ovh", &ov).unwrap();
    check_reads(&mut c, &srv, "ovh", 0x11, true);
    c.execute("blockdev-del", Some(json!({"node-name": "ovh"})))
        .unwrap();
    rbd(&conf, &["snap", "purge", "--no-progress", &img.spec()]);

    // POOL/NAMESPACE/IMAGE.
    let ns = image_name("ns");
    rbd(
        &conf,
        &["namespace", "create", "--pool", "rbd", "--namespace", &ns],
    );
    let nimg = imported(&conf, &srv.dir, "nsimg", |n| format!("rbd/{ns}/{n}"));
    let name = format!("rbd:rbd/{ns}/{}:conf={conf}", nimg.name);
    let ov = overlay(&srv.dir, "ns.qcow2", &name);
    add_overlay(&mut c, "ovn", &ov).unwrap();
    let r = nodes_of(&mut c, "rbd").remove(0);
    assert!(
        r["file"]
            .as_str()
            .unwrap()
            .contains(&format!(r#""namespace": "{ns}""#)),
        "{r}"
    );
    check_reads(&mut c, &srv, "ovn", 0xaa, true);
    c.execute("blockdev-del", Some(json!({"node-name": "ovn"})))
        .unwrap();
    let _ = run(
        "rbd",
        &[
            "-c",
            &conf,
            "rm",
            "--no-progress",
            &format!("rbd/{ns}/{}", nimg.name),
        ],
    );
    drop(nimg);
    rbd(
        &conf,
        &["namespace", "remove", "--pool", "rbd", "--namespace", &ns],
    );

    // Errors, as QEMU words them (its block.c prefixes "Could not open
    // backing file: ").
    for (name, want) in [
        (
            format!("rbd:no-such-pool/{}:conf={conf}", img.name),
            "error opening pool no-such-pool: No such file or directory".to_string(),
        ),
        (
            format!("rbd:rbd/no-such-image:conf={conf}"),
            "error reading header from no-such-image: No such file or directory".to_string(),
        ),
        (
            // (A `/` in a conf path would end the pool name.)
            format!("rbd:{}:id=admin", img.name),
            "Pool name is required".to_string(),
        ),
        (
            format!("rbd:rbd/{}:conf", img.name),
            "conf option conf has no value".to_string(),
        ),
        (
            format!("rbd:rbd/{}:conf=/no/such.conf", img.name),
            "error reading conf file /no/such.conf: No such file or directory".to_string(),
        ),
        (
            format!("rbd:rbd/{}:conf={conf}:no_such_option=1", img.name),
            "invalid conf option no_such_option: No such file or directory".to_string(),
        ),
    ] {
        let ov = overlay(&srv.dir, "bad.qcow2", &name);
        let e = qmp_err(add_overlay(&mut c, "bad", &ov));
        assert_eq!(e, format!("Could not open backing file: {want}"), "{name}");
        assert!(nodes_of(&mut c, "rbd").is_empty());
    }
    srv_alive(srv);
}

#[test]
fn medium_and_mirror_target_named_rbd() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    let srv = Server::start("blockd-rbd-names-medium");
    let mut c = srv.client();
    let img = imported(&conf, &srv.dir, "medium", |n| format!("rbd/{n}"));
    c.execute(
        "device_add",
        Some(json!({"driver": "virtio-scsi-pci", "id": "scsi0"})),
    )
    .unwrap();
    c.execute(
        "device_add",
        Some(json!({"driver": "scsi-cd", "id": "cd0", "bus": "scsi0.0"})),
    )
    .unwrap();
    let name = format!("rbd:rbd/{}:conf={conf}:rbd_cache=false", img.name);
    c.execute(
        "blockdev-change-medium",
        Some(json!({"id": "cd0", "filename": name, "format": "raw"})),
    )
    .unwrap();
    let q = c.execute("query-block", None).unwrap();
    let cd = q
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "cd0")
        .unwrap()["inserted"]
        .clone();
    assert_eq!(cd["drv"], "raw", "{cd}");
    assert_eq!(nodes_of(&mut c, "rbd").len(), 1);
    let node = cd["node-name"].as_str().unwrap().to_string();
    check_reads(&mut c, &srv, &node, 0xaa, false);
    let e = qmp_err(c.execute(
        "blockdev-change-medium",
        Some(
            json!({"id": "cd0", "filename": format!("rbd:rbd/{}:conf", img.name),
                    "format": "raw"}),
        ),
    ));
    assert_eq!(e, "conf option conf has no value");
    c.execute("eject", Some(json!({"id": "cd0"}))).unwrap();

    // A drive-mirror target by name (mode existing).
    let tgt = TestImage::new(&conf, "mirror-tgt", "4M");
    let src = srv.dir.join("src.raw");
    let mut data = vec![0u8; 4 * M];
    data[M..3 * M].fill(0x5a);
    std::fs::write(&src, &data).unwrap();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "raw", "node-name": "src",
                    "file": {"driver": "file", "filename": src}})),
    )
    .unwrap();
    let target = format!("rbd:rbd/{}:conf={conf}", tgt.name);
    c.execute(
        "drive-mirror",
        Some(json!({"job-id": "m", "device": "src", "target": target,
                    "format": "raw", "sync": "full", "mode": "existing"})),
    )
    .unwrap();
    c.wait_event_with(
        |e| e["event"] == "BLOCK_JOB_READY" && e["data"]["device"] == "m",
        T,
    )
    .unwrap();
    assert_eq!(nodes_of(&mut c, "rbd").len(), 1);
    c.execute("block-job-complete", Some(json!({"device": "m"})))
        .unwrap();
    let done = c
        .wait_event_with(|e| e["event"] == "BLOCK_JOB_COMPLETED", T)
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    c.execute("blockdev-del", Some(json!({"node-name": "src"})))
        .ok();
    let got = std::fs::read(rbd_export(&conf, &tgt.spec(), &srv.dir, "tgt.raw")).unwrap();
    assert!(got == data, "the mirrored data");
    srv_alive(srv);
}

/// The option that carries an `rbd:` name's Ceph settings is internal:
/// blockdev-add refuses it as QEMU's schema does (no cluster needed).
#[test]
fn keyvalue_pairs_are_not_blockdev_add_options() {
    let srv = Server::start("blockd-rbd-names-kv");
    let mut c = srv.client();
    for key in ["=keyvalue-pairs", "key-value-pairs", "keyvalue-pairs"] {
        let mut v = json!({"driver": "rbd", "node-name": "x", "pool": "rbd", "image": "i",
                           "conf": "/dev/null"});
        v[key] = json!([["rbd_cache", "false"]]);
        let e = qmp_err(c.execute("blockdev-add", Some(v)));
        assert_eq!(e, format!("Parameter '{key}' is unexpected"));
    }
    srv_alive(srv);
}

/// Without the `rbd` feature an `rbd:` name still parses (its errors are
/// the parser's), and its node fails to open as a `json:` name with
/// driver `rbd` does there: an unknown driver.
#[test]
fn without_the_feature_the_driver_is_unknown() {
    if cfg!(feature = "rbd") || !require_qemu_tools() {
        return;
    }
    let srv = Server::start("blockd-rbd-names-nofeature");
    let mut c = srv.client();
    for (name, want) in [
        ("rbd:rbd/img:conf=/dev/null", "Unknown driver 'rbd'"),
        ("rbd:img", "Pool name is required"),
    ] {
        let ov = overlay(&srv.dir, "nf.qcow2", name);
        let e = qmp_err(add_overlay(&mut c, "nf", &ov));
        assert_eq!(e, format!("Could not open backing file: {want}"), "{name}");
    }
    srv_alive(srv);
}

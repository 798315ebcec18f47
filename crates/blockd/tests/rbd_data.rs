//! The `rbd` driver's data path against a real Ceph cluster: an NBD
//! export checked with QEMU's tools and Ceph's `rbd` tool, two blockd
//! processes on one image, mirroring between local images and rbd, and
//! writes without librbd's copy when its cache is off. How to run: see
//! `rbd.rs`.

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use ceph::*;
use common::Server;
use serde_json::{json, Value};

#[test]
fn data_through_an_nbd_export() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    const M: usize = 1 << 20;
    let img = TestImage::new(&conf, "data", "64M");
    let srv = Server::start("blockd-rbd-data");
    let mut c = srv.client();
    c.execute("blockdev-add", Some(rbd_node(&conf, "r0", &img.name)))
        .unwrap();
    let u = export(&mut c, &srv, "r0", "disk0");
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -P 0x55 8M 64k",
            "-c",
            "write -P 0x11 4095k 2k",
            "-c",
            "aio_flush",
            &u,
        ],
    ));
    let out = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xaa 0 1M",
            "-c",
            "read -P 0x11 4095k 2k",
            "-c",
            "read -P 0x55 8M 64k",
            "-c",
            "read -P 0 9M 55M",
            &u,
        ],
    ));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Block status: fast-diff by whole objects (4 MiB): objects 0, 1 and
    // 2 hold data, the rest are holes, which qemu-img map shows.
    let map: Value = serde_json::from_str(&ok(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &u],
    )))
    .unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(0, 12 << 20)], "{map}");
    // qemu-img bench writes and reads through the same path.
    ok(&run(
        "qemu-img",
        &[
            "bench", "-f", "raw", "-w", "-c", "200", "-d", "8", "-s", "4k", "-o", "32M", "-S",
            "4096", &u,
        ],
    ));
    // Zeroes that may be unmapped leave a hole; discarding too.
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -z -u 32M 4M",
            "-c",
            "discard 36M 4M",
            &u,
        ],
    ));
    unexport(&mut c, "disk0");
    c.execute("blockdev-del", Some(json!({"node-name": "r0"})))
        .unwrap();

    // `rbd export` sees what was written.
    let got = std::fs::read(rbd_export(&conf, &img.spec(), &srv.dir, "export.raw")).unwrap();
    assert_eq!(got.len(), 64 * M);
    let mut want = vec![0u8; 64 * M];
    want[..M].fill(0xaa);
    want[4095 * 1024..4097 * 1024].fill(0x11);
    want[8 * M..8 * M + 65536].fill(0x55);
    assert_eq!(&got[..12 * M], &want[..12 * M], "the data written");
    assert!(
        got[32 * M..].iter().all(|&b| b == 0),
        "zeroed and discarded"
    );
    // Sparse: only the objects written (and the bench's) are used.
    let u_bytes = used(&conf, &img.spec());
    assert!(u_bytes <= 24 << 20, "rbd du: {u_bytes} bytes used");

    // `rbd import` of a raw file reads back through blockd.
    let src = srv.dir.join("import.raw");
    let mut data = vec![0u8; 8 * M];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 4096 % 251) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let imp = TestImage::named(&conf, "import");
    rbd(
        &conf,
        &[
            "import",
            "--no-progress",
            src.to_str().unwrap(),
            &imp.spec(),
        ],
    );
    c.execute("blockdev-add", Some(rbd_node(&conf, "r1", &imp.name)))
        .unwrap();
    let u1 = export(&mut c, &srv, "r1", "disk1");
    ok(&run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &u1,
        ],
    ));
    unexport(&mut c, "disk1");
    srv_alive(srv);
}

/// Two blockd processes, as two hosts, on one image. The first writes and
/// closes; the second sees every byte. While both have it open, librbd's
/// exclusive-lock feature lets one client write at a time: the lock moves
/// to the writer on request (librbd's default, cooperative transfer, which
/// QEMU uses too), so there is never more than one owner, and each sees
/// the other's completed writes.
#[test]
fn two_processes_on_one_image() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    let img = TestImage::new(&conf, "two", "16M");
    assert!(rbd(&conf, &["info", &img.spec()]).contains("exclusive-lock"));
    let a = Server::start("blockd-rbd-a");
    let b = Server::start("blockd-rbd-b");
    let (mut ca, mut cb) = (a.client(), b.client());
    ca.execute("blockdev-add", Some(rbd_node(&conf, "r0", &img.name)))
        .unwrap();
    let ua = export(&mut ca, &a, "r0", "d");
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa1 0 4M",
            "-c",
            "write -P 0xa2 12M 1M",
            &ua,
        ],
    ));
    assert_eq!(lockers(&conf, &img.spec()).len(), 1, "A holds the lock");
    let owner_a = lockers(&conf, &img.spec())[0].clone();

    // B opens while A has it open, and writes: the lock moves to B.
    cb.execute("blockdev-add", Some(rbd_node(&conf, "r0", &img.name)))
        .unwrap();
    let ub = export(&mut cb, &b, "r0", "d");
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xa1 0 4M",
            "-c",
            "write -P 0xb1 1M 64k",
            &ub,
        ],
    ));
    let l = lockers(&conf, &img.spec());
    assert_eq!(l.len(), 1, "one owner at a time: {l:?}");
    assert_ne!(l[0], owner_a, "the writer holds the lock");
    // A sees B's write (its cache went with the lock).
    let out = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xb1 1M 64k",
            "-c",
            "read -P 0xa1 0 1M",
            &ua,
        ],
    ));
    assert!(!out.contains("verification failed"), "{out}");

    // A writes more and closes; B, still open, reads every byte.
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xa3 8M 2M", &ua],
    ));
    unexport(&mut ca, "d");
    ca.execute("blockdev-del", Some(json!({"node-name": "r0"})))
        .unwrap();
    let out = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xa1 0 1M",
            "-c",
            "read -P 0xb1 1M 64k",
            "-c",
            "read -P 0xa3 8M 2M",
            "-c",
            "read -P 0xa2 12M 1M",
            "-c",
            "read -P 0 13M 3M",
            &ub,
        ],
    ));
    assert!(!out.contains("verification failed"), "{out}");
    unexport(&mut cb, "d");
    srv_alive(a);
    srv_alive(b);
}

/// Mirror (blockdev-mirror, sync full) from a local qcow2 image into an
/// rbd image, and from rbd to a local raw file: data identical.
#[test]
fn mirror_between_local_images_and_rbd() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    let srv = Server::start("blockd-rbd-mirror");
    let mut c = srv.client();
    let q = srv.dir.join("src.qcow2");
    let qs = q.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-f", "qcow2", qs, "32M"]));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x3c 0 3M",
            "-c",
            "write -P 0xc3 20M 512k",
            qs,
        ],
    ));
    let dst = TestImage::new(&conf, "mirror-dst", "32M");
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "node-name": "src",
                    "file": {"driver": "file", "filename": qs}})),
    )
    .unwrap();
    // discard=unmap: zeroes may be unmapped, so the target stays sparse
    // (with discard=ignore, QEMU's default, zeroes are written thick).
    let mut d = rbd_node(&conf, "dst", &dst.name);
    d["discard"] = "unmap".into();
    c.execute("blockdev-add", Some(d)).unwrap();
    mirror(&mut c, "m1", "src", "dst");
    c.execute("blockdev-del", Some(json!({"node-name": "dst"})))
        .unwrap();
    let out = rbd_export(&conf, &dst.spec(), &srv.dir, "dst.raw");
    ok(&run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            qs,
            out.to_str().unwrap(),
        ],
    ));
    // Only what the source holds was copied: the rest stays sparse.
    let u = used(&conf, &dst.spec());
    assert!(u <= 8 << 20, "{u} bytes used");

    // And back: rbd to a local raw file.
    let back = srv.dir.join("back.raw");
    let bs = back.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-f", "raw", bs, "32M"]));
    c.execute("blockdev-add", Some(rbd_node(&conf, "r", &dst.name)))
        .unwrap();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "raw", "node-name": "back",
                    "file": {"driver": "file", "filename": bs}})),
    )
    .unwrap();
    mirror(&mut c, "m2", "r", "back");
    c.execute("blockdev-del", Some(json!({"node-name": "back"})))
        .unwrap();
    ok(&run(
        "qemu-img",
        &["compare", "-U", "-f", "qcow2", "-F", "raw", qs, bs],
    ));
    srv_alive(srv);
}

/// librbd's settings in blockd's process, read from its admin socket (the
/// test cluster's ceph.conf gives clients one per cluster handle).
fn client_config(conf: &str, pid: u32, key: &str) -> Vec<String> {
    let run_dir = std::path::Path::new(conf).parent().unwrap().join("run");
    let prefix = format!("client.admin.{pid}.");
    let mut values = Vec::new();
    for e in std::fs::read_dir(&run_dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with(&prefix) && name.ends_with(".asok")) {
            continue;
        }
        let asok = p.to_str().unwrap();
        let v: Value = serde_json::from_str(&ok(&run(
            "ceph",
            &["--admin-daemon", asok, "config", "get", key],
        )))
        .unwrap();
        values.push(v[key].as_str().unwrap().to_string());
    }
    values
}

/// Without librbd's cache (`cache.direct`), librbd sends a write's buffer
/// without copying it; many writes in flight at once, completing out of
/// order, still land as written.
#[test]
fn uncached_writes_without_a_copy() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    const M: usize = 1 << 20;
    let img = TestImage::new(&conf, "zerocopy", "48M");
    let srv = Server::start("blockd-rbd-zerocopy");
    let mut c = srv.client();
    let mut node = rbd_node(&conf, "r0", &img.name);
    node["cache"] = json!({"direct": true});
    c.execute("blockdev-add", Some(node)).unwrap();
    // QEMU's mapping of cache.direct, and the copy turned off.
    assert_eq!(client_config(&conf, srv.pid(), "rbd_cache"), vec!["false"]);
    assert_eq!(
        client_config(&conf, srv.pid(), "rbd_disable_zero_copy_writes"),
        vec!["false"]
    );
    let u = export(&mut c, &srv, "r0", "disk0");

    // 40 MiB of data unlike itself anywhere, written by 16 coroutines out
    // of order in requests of up to 2 MiB.
    let src = srv.dir.join("src.raw");
    let mut data = vec![0u8; 40 * M];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&src, &data).unwrap();
    let s = src.to_str().unwrap();
    ok(&run(
        "qemu-img",
        &[
            "convert", "-n", "-W", "-m", "16", "-S", "0", "-f", "raw", "-O", "raw", s, &u,
        ],
    ));
    // Then 4 KiB writes at depth 16 fill most of the rest.
    ok(&run(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-c",
            "2000",
            "-d",
            "16",
            "-s",
            "4k",
            "-o",
            "40M",
            "-S",
            "4096",
            "--pattern",
            "0x3c",
            &u,
        ],
    ));
    data.extend(std::iter::repeat_n(0x3c, 2000 * 4096));
    data.resize(48 * M, 0);
    std::fs::write(&src, &data).unwrap();
    ok(&run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, &u],
    ));
    unexport(&mut c, "disk0");
    c.execute("blockdev-del", Some(json!({"node-name": "r0"})))
        .unwrap();

    // What the cluster holds, read without blockd.
    let out = rbd_export(&conf, &img.spec(), &srv.dir, "export.raw");
    assert!(std::fs::read(out).unwrap() == data, "rbd export differs");
    srv_alive(srv);
}

//! The `rbd` driver's data path against a real Ceph cluster: an NBD
//! export checked with QEMU's tools and Ceph's `rbd` tool, two blockd
//! processes on one image, mirroring between local images and rbd. How to
//! run: see `rbd.rs`.

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
    let out = srv.dir.join("export.raw");
    rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &img.spec(),
            out.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&out).unwrap();
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
    let out = srv.dir.join("dst.raw");
    rbd(
        &conf,
        &[
            "export",
            "--no-progress",
            &dst.spec(),
            out.to_str().unwrap(),
        ],
    );
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

//! The `rbd` driver's `encrypt` (librbd's LUKS) against a real Ceph
//! cluster: images formatted by `blockdev-create` and by Ceph's `rbd`
//! tool, data through an NBD export (QEMU's qemu-io), the raw image
//! checked with `rbd export`, and the errors (QEMU's messages). How to
//! run: see `rbd.rs`, with `--test rbd_encrypt`.

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use blockd_testkit::QmpClient;
use ceph::*;
use common::Server;
use serde_json::{json, Value};

const M: u64 = 1 << 20;

fn secret(c: &mut QmpClient, id: &str, data: &str) {
    c.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": id, "data": data})),
    )
    .unwrap();
}

fn create(c: &mut QmpClient, id: &str, o: Value) -> Option<String> {
    c.execute("blockdev-create", Some(json!({"job-id": id, "options": o})))
        .unwrap();
    wait_concluded(c, id)
}

/// The node `node` as query-named-block-nodes shows it.
fn node_info(c: &mut QmpClient, node: &str) -> Value {
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .cloned()
        .unwrap()
}

/// An rbd node with `encrypt`.
fn enc_node(conf: &str, node: &str, image: &str, enc: Value) -> Value {
    let mut v = rbd_node(conf, node, image);
    v["encrypt"] = enc;
    v
}

/// The image's bytes as stored (`rbd export`), without any decryption.
fn raw_bytes(conf: &str, spec: &str, dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(rbd_export(conf, spec, dir, "raw-export")).unwrap()
}

/// Whether `hay` holds a run of 4 KiB of `byte`.
fn has_run(hay: &[u8], byte: u8) -> bool {
    hay.chunks(4096)
        .any(|c| c.len() == 4096 && c.iter().all(|&b| b == byte))
}

fn qemu_io(url: &str, read_only: bool, cmds: &[&str]) -> String {
    let mut a = vec!["-f", "raw"];
    if read_only {
        a.push("-r");
    }
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(url);
    let out = ok(&run("qemu-io", &a));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

/// blockdev-create with `encrypt` makes an image whose payload has the
/// size asked for; data written through blockd reads back and is not
/// stored in the clear; without `encrypt` the node shows the header.
#[test]
fn created_luks_images_hold_encrypted_data() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    let srv = Server::start("blockd-rbd-enc-create");
    let mut c = srv.client();
    secret(&mut c, "pw", "correct horse battery staple");
    for (i, (format, alg, magic)) in [
        ("luks", "aes-256", &b"LUKS\xba\xbe\0\x01"[..]),
        ("luks2", "aes-128", &b"LUKS\xba\xbe\0\x02"[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let img = TestImage::named(&conf, format);
        let loc = json!({"pool": "rbd", "image": img.name, "conf": conf});
        let e = create(
            &mut c,
            &format!("c{i}"),
            json!({"driver": "rbd", "location": loc, "size": 32 * M,
                   "encrypt": {"format": format, "key-secret": "pw", "cipher-alg": alg}}),
        );
        assert_eq!(e, None, "{format}");
        let enc = json!({"format": format, "key-secret": "pw"});
        c.execute("blockdev-add", Some(enc_node(&conf, "e", &img.name, enc)))
            .unwrap();
        let n = node_info(&mut c, "e");
        assert_eq!(n["image"]["virtual-size"], 32 * M, "the payload's size");
        // The payload does not start with the header.
        assert_eq!(
            n["image"]["format-specific"],
            json!({"type": "rbd", "data": {}})
        );
        let u = export(&mut c, &srv, "e", "enc");
        qemu_io(
            &u,
            false,
            &["write -P 0x5a 0 1M", "write -P 0xa5 31M 1M", "aio_flush"],
        );
        qemu_io(
            &u,
            true,
            &[
                "read -P 0x5a 0 1M",
                "read -P 0 1M 30M",
                "read -P 0xa5 31M 1M",
            ],
        );
        unexport(&mut c, "enc");
        c.execute("blockdev-del", Some(json!({"node-name": "e"})))
            .unwrap();

        let raw = raw_bytes(&conf, &img.spec(), &srv.dir);
        assert!(raw.len() as u64 > 32 * M, "grown by the header");
        assert_eq!(&raw[..8], magic, "{format} header");
        assert!(!has_run(&raw, 0x5a) && !has_run(&raw, 0xa5), "no plaintext");

        // Without encrypt: the raw image, whose start QEMU probes.
        c.execute("blockdev-add", Some(rbd_node(&conf, "p", &img.name)))
            .unwrap();
        let n = node_info(&mut c, "p");
        assert_eq!(n["image"]["virtual-size"], raw.len() as u64);
        assert_eq!(
            n["image"]["format-specific"],
            json!({"type": "rbd", "data": {"encryption-format": format}})
        );
        // The probe follows the node's own writes (zeroes over the header).
        let u = export(&mut c, &srv, "p", "plain");
        qemu_io(&u, false, &["write -z 0 4k", "aio_flush"]);
        unexport(&mut c, "plain");
        let n = node_info(&mut c, "p");
        assert_eq!(n["image"]["format-specific"]["data"], json!({}));
        c.execute("blockdev-del", Some(json!({"node-name": "p"})))
            .unwrap();
    }
    srv_alive(srv);
}

/// The errors of `encrypt` when opening, in QEMU's words (librbd 16
/// lacks luks-any and layered encryption, as QEMU built against it).
#[test]
fn open_errors_as_qemu() {
    let conf = require_cluster!();
    let img = TestImage::new(&conf, "enc-err", "64M");
    let pass = std::env::temp_dir().join(format!("{}.pass", img.name));
    std::fs::write(&pass, "right").unwrap();
    rbd(
        &conf,
        &[
            "encryption",
            "format",
            &img.spec(),
            "luks2",
            pass.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&pass);
    let srv = Server::start("blockd-rbd-enc-err");
    let mut c = srv.client();
    secret(&mut c, "right", "right");
    secret(&mut c, "wrong", "wrong");
    let mut add =
        |enc: Value| c.execute("blockdev-add", Some(enc_node(&conf, "x", &img.name, enc)));
    let e = |f: &str, k: &str| json!({"format": f, "key-secret": k});
    assert_eq!(
        qmp_err(add(e("luks2", "wrong"))),
        "encryption load fail: Operation not permitted"
    );
    assert_eq!(
        qmp_err(add(e("luks", "right"))),
        "encryption load fail: Invalid argument"
    );
    assert_eq!(
        qmp_err(add(e("luks2", "nosuch"))),
        "No secret with id 'nosuch'"
    );
    assert_eq!(
        qmp_err(add(e("luks-any", "right"))),
        "unknown image encryption format: 2: Operation not supported"
    );
    let mut layered = e("luks2", "right");
    layered["parent"] = e("luks2", "right");
    assert_eq!(
        qmp_err(add(layered)),
        "RBD library does not support layered encryption"
    );
    // The schema's errors (QEMU names only the member for an enum).
    assert_eq!(
        qmp_err(add(json!({"format": "luks2"}))),
        "Parameter 'encrypt.key-secret' is missing"
    );
    assert_eq!(
        qmp_err(add(json!({"format": "luks3", "key-secret": "right"}))),
        "Parameter 'format' does not accept value 'luks3'"
    );
    assert_eq!(
        qmp_err(add(
            json!({"format": "luks2", "key-secret": "right", "cipher-alg": "aes-256"})
        )),
        "Parameter 'encrypt.cipher-alg' is unexpected"
    );
    let c_nodes = c.execute("query-named-block-nodes", None).unwrap();
    assert!(
        c_nodes.as_array().unwrap().is_empty(),
        "nothing left behind"
    );
    // And the right passphrase opens it.
    c.execute(
        "blockdev-add",
        Some(enc_node(&conf, "x", &img.name, e("luks2", "right"))),
    )
    .unwrap();
    srv_alive(srv);
}

/// blockdev-create's `encrypt` errors (QEMU's), and the image is gone
/// after a failed format.
#[test]
fn create_errors_as_qemu() {
    let conf = require_cluster!();
    let srv = Server::start("blockd-rbd-enc-cerr");
    let mut c = srv.client();
    secret(&mut c, "pw", "pw");
    let img = TestImage::named(&conf, "enc-cerr");
    let loc = json!({"pool": "rbd", "image": img.name, "conf": conf});
    let opts =
        |enc: Value| json!({"driver": "rbd", "location": loc, "size": 8 * M, "encrypt": enc});
    let cases = [
        (
            json!({"format": "luks", "key-secret": "pw", "cipher-alg": "twofish-256"}),
            "unknown encryption algorithm: 11: Operation not supported",
        ),
        (
            json!({"format": "luks2", "key-secret": "nosuch"}),
            "No secret with id 'nosuch'",
        ),
        (
            json!({"format": "luks-any"}),
            "unknown image encryption format: 2: Operation not supported",
        ),
    ];
    for (i, (enc, msg)) in cases.into_iter().enumerate() {
        assert_eq!(
            create(&mut c, &format!("j{i}"), opts(enc)).as_deref(),
            Some(msg)
        );
        let ls = rbd(&conf, &["ls", "rbd"]);
        assert!(
            !ls.contains(&img.name),
            "removed after a failed format: {ls}"
        );
    }
    // The schema's errors (QEMU names only the member for an enum).
    let schema = |c: &mut QmpClient, enc: Value| {
        qmp_err(c.execute(
            "blockdev-create",
            Some(json!({"job-id": "s", "options": opts(enc)})),
        ))
    };
    assert_eq!(
        schema(&mut c, json!({"format": "luks-any", "key-secret": "pw"})),
        "Parameter 'options.encrypt.key-secret' is unexpected"
    );
    assert_eq!(
        schema(
            &mut c,
            json!({"format": "luks", "key-secret": "pw", "cipher-alg": "rot13"})
        ),
        "Parameter 'cipher-alg' does not accept value 'rot13'"
    );
    assert_eq!(
        schema(&mut c, json!({"format": "luks"})),
        "Parameter 'options.encrypt.key-secret' is missing"
    );
    srv_alive(srv);
}

/// Images that Ceph's `rbd encryption format` made open in blockd; data
/// blockd writes is what librbd (Python's binding, a separate client)
/// decrypts, and the other way round.
#[test]
fn rbd_tool_images_open() {
    let conf = require_cluster!();
    if !require_qemu_tools() {
        return;
    }
    let srv = Server::start("blockd-rbd-enc-cli");
    let mut c = srv.client();
    secret(&mut c, "pw", "s3cret phrase");
    let pass = srv.dir.join("pass");
    std::fs::write(&pass, "s3cret phrase").unwrap();
    for (format, cli) in [("luks", "luks1"), ("luks2", "luks2")] {
        let img = TestImage::new(&conf, cli, "64M");
        rbd(
            &conf,
            &[
                "encryption",
                "format",
                &img.spec(),
                cli,
                pass.to_str().unwrap(),
            ],
        );
        let py = python_librbd(&conf, &img.name, format, "s3cret phrase");
        let enc = json!({"format": format, "key-secret": "pw"});
        c.execute("blockdev-add", Some(enc_node(&conf, "e", &img.name, enc)))
            .unwrap();
        let size = node_info(&mut c, "e")["image"]["virtual-size"]
            .as_u64()
            .unwrap();
        assert!(size < 64 * M && size > 32 * M, "{size}");
        if let Some(py) = &py {
            assert_eq!(py.lines().next(), Some(size.to_string().as_str()), "{py}");
            // Python wrote 0x77 at 4 MiB into the payload.
        }
        let u = export(&mut c, &srv, "e", "cli");
        qemu_io(&u, false, &["write -P 0x3c 0 64k", "aio_flush"]);
        if py.is_some() {
            qemu_io(&u, true, &["read -P 0x77 4M 64k"]);
        }
        unexport(&mut c, "cli");
        c.execute("blockdev-del", Some(json!({"node-name": "e"})))
            .unwrap();
        if let Some(py) = python_librbd(&conf, &img.name, format, "s3cret phrase") {
            assert!(py.lines().any(|l| l == "head 3c3c3c3c"), "{py}");
        }
        assert!(!has_run(&raw_bytes(&conf, &img.spec(), &srv.dir), 0x3c));
    }
    srv_alive(srv);
}

/// Opens the image through librbd's Python binding with the encryption
/// loaded: prints the payload's size and its first 4 bytes, then writes
/// 64 KiB of 0x77 at 4 MiB. None when the binding is missing.
fn python_librbd(conf: &str, image: &str, format: &str, pass: &str) -> Option<String> {
    const SCRIPT: &str = r#"
import sys, rados, rbd
conf, name, fmt, pw = sys.argv[1:5]
cl = rados.Rados(conffile=conf); cl.connect()
io = cl.open_ioctx('rbd')
img = rbd.Image(io, name)
f = rbd.RBD_ENCRYPTION_FORMAT_LUKS1 if fmt == 'luks' else rbd.RBD_ENCRYPTION_FORMAT_LUKS2
img.encryption_load(f, pw)
print(img.size())
print('head', img.read(0, 4).hex())
img.write(b'\x77' * 65536, 4 << 20)
img.flush(); img.close(); io.close(); cl.shutdown()
"#;
    let o = run(
        "/usr/bin/python3",
        &["-c", SCRIPT, conf, image, format, pass],
    );
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("No module named") {
            eprintln!("python3-rbd missing: not cross-checked with librbd's binding");
            return None;
        }
        panic!("python librbd: {err}");
    }
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

//! The `rbd` driver against a real Ceph cluster (tests/ceph/cluster.sh):
//! options and errors (QEMU's messages), secrets (also encrypted with a
//! master key, as libvirt sends them), snapshots, resize and
//! blockdev-create. Data, two processes and mirroring: `rbd_data.rs`;
//! encryption (`encrypt`): `rbd_encrypt.rs`; `rbd:` image names (backing
//! files, media, mirror targets): `rbd_names.rs`.
//!
//! Needs a build with the `rbd` feature and `BLOCKD_CEPH_CONF` naming the
//! cluster's ceph.conf; otherwise every test says why it skips:
//!
//! ```text
//! export BLOCKD_CEPH_CONF=$(tests/ceph/cluster.sh start)
//! cargo test -p blockd --features rbd --test rbd --test rbd_data --test rbd_names
//! tests/ceph/cluster.sh stop "$BLOCKD_CEPH_CONF"
//! ```

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use blockd_testkit::QmpClient;
use ceph::*;
use common::Server;
use serde_json::{json, Value};

#[test]
fn options_and_errors_as_qemu() {
    let conf = require_cluster!();
    let img = TestImage::new(&conf, "opts", "8M");
    let srv = Server::start("blockd-rbd-opts");
    let mut c = srv.client();
    let add = |c: &mut QmpClient, v: Value| c.execute("blockdev-add", Some(v));

    // Missing members are the schema's errors.
    let e = qmp_err(add(
        &mut c,
        json!({"driver": "rbd", "node-name": "x", "pool": "rbd"}),
    ));
    assert_eq!(e, "Parameter 'image' is missing");
    let e = qmp_err(add(
        &mut c,
        json!({"driver": "rbd", "node-name": "x", "image": "i"}),
    ));
    assert_eq!(e, "Parameter 'pool' is missing");

    // Opening errors (QEMU's qemu_rbd_connect and qemu_rbd_open).
    let e = qmp_err(add(&mut c, rbd_node(&conf, "x", "no-such-image")));
    assert_eq!(
        e,
        "error reading header from no-such-image: No such file or directory"
    );
    let mut v = rbd_node(&conf, "x", &img.name);
    v["pool"] = "no-such-pool".into();
    assert_eq!(
        qmp_err(add(&mut c, v)),
        "error opening pool no-such-pool: No such file or directory"
    );
    let v = rbd_node("/no/such.conf", "x", &img.name);
    assert_eq!(
        qmp_err(add(&mut c, v)),
        "error reading conf file /no/such.conf: No such file or directory"
    );
    let mut v = rbd_node(&conf, "x", &img.name);
    v["namespace"] = "no-ns".into();
    assert_eq!(qmp_err(add(&mut c, v)), "namespace 'no-ns' does not exist");
    let mut v = rbd_node(&conf, "x", &img.name);
    v["key-secret"] = "nokey".into();
    assert_eq!(qmp_err(add(&mut c, v)), "No secret with id 'nokey'");
    c.execute(
        "object-add",
        Some(json!({"qom-type": "iothread", "id": "io-k"})),
    )
    .unwrap();
    let mut v = rbd_node(&conf, "x", &img.name);
    v["key-secret"] = "io-k".into();
    assert_eq!(
        qmp_err(add(&mut c, v)),
        "Object with id 'io-k' is not a secret"
    );
    let mut v = rbd_node(&conf, "x", &img.name);
    v["encrypt"] = json!({"format": "luks", "key-secret": "k"});
    assert_eq!(qmp_err(add(&mut c, v)), "No secret with id 'k'");
    let mut v = rbd_node(&conf, "x", &img.name);
    v["auth-client-required"] = json!(["kerberos"]);
    // (QEMU 10's own wording for an enum in a list.)
    assert_eq!(
        qmp_err(add(&mut c, v)),
        "Parameter 'null' does not accept value 'kerberos'"
    );
    let mut v = rbd_node(&conf, "x", &img.name);
    v["server"] = json!([{"host": "a"}]);
    assert_eq!(
        qmp_err(add(&mut c, v)),
        "Parameter 'server[0].port' is missing"
    );
    assert!(
        c.execute("query-named-block-nodes", None)
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty(),
        "failed opens leave nothing behind"
    );

    // A good node, as queries show it.
    add(&mut c, rbd_node(&conf, "r0", &img.name)).unwrap();
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    let n = &nodes[0];
    assert_eq!(n["drv"], "rbd");
    assert_eq!(n["ro"], false);
    assert_eq!(n["image"]["virtual-size"], 8 << 20);
    assert_eq!(n["image"]["cluster-size"], 4 << 20);
    assert_eq!(n["image"]["format-specific"]["type"], "rbd");
    let file = n["file"].as_str().unwrap();
    assert!(file.starts_with("json:{\"driver\": \"rbd\", "), "{file}");

    // block_resize is rbd_resize.
    c.execute(
        "block_resize",
        Some(json!({"node-name": "r0", "size": 16 << 20})),
    )
    .unwrap();
    assert!(rbd(&conf, &["info", &img.spec()]).contains("size 16 MiB"));
    c.execute("blockdev-del", Some(json!({"node-name": "r0"})))
        .unwrap();

    // Snapshots are read-only.
    rbd(&conf, &["snap", "create", &format!("{}@s1", img.spec())]);
    let mut v = rbd_node(&conf, "s", &img.name);
    v["snapshot"] = "s1".into();
    assert_eq!(
        qmp_err(add(&mut c, v.clone())),
        "rbd snapshots are read-only"
    );
    v["auto-read-only"] = true.into();
    add(&mut c, v.clone()).unwrap();
    let nodes = c.execute("query-named-block-nodes", None).unwrap();
    assert_eq!(nodes[0]["ro"], true, "auto-read-only fell back");
    let mut re = v.clone();
    re["read-only"] = false.into();
    re["auto-read-only"] = false.into();
    assert_eq!(
        qmp_err(c.execute("blockdev-reopen", Some(json!({"options": [re]})))),
        "Cannot change node 's' to r/w when using RBD snapshot"
    );
    c.execute("blockdev-del", Some(json!({"node-name": "s"})))
        .unwrap();
    let mut v = rbd_node(&conf, "x", &img.name);
    v["snapshot"] = "nosnap".into();
    v["read-only"] = true.into();
    assert_eq!(
        qmp_err(add(&mut c, v)),
        format!(
            "error reading header from {}: No such file or directory",
            img.name
        )
    );
    rbd(
        &conf,
        &["snap", "rm", "--no-progress", &format!("{}@s1", img.spec())],
    );

    // The key from a secret object, the monitors from 'server', no
    // configuration file: everything in QMP, as libvirt sends it.
    let key = admin_key(&conf);
    c.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": "k0", "data": key, "format": "base64"})),
    )
    .unwrap();
    let (host, port) = mon_addr(&conf);
    let mut v = rbd_node("/dev/null", "k", &img.name);
    v["user"] = "admin".into();
    v["key-secret"] = "k0".into();
    v["auth-client-required"] = json!(["cephx", "none"]);
    v["server"] = json!([{"host": host, "port": port}]);
    add(&mut c, v.clone()).unwrap();
    c.execute("blockdev-del", Some(json!({"node-name": "k"})))
        .unwrap();
    // The key never comes back.
    assert!(c
        .execute(
            "qom-get",
            Some(json!({"path": "/objects/k0", "property": "data"}))
        )
        .is_err());
    let log = srv.log();
    assert!(!log.contains(&key), "the key is in the log");

    // A wrong key (a valid one of nobody) is refused by the cluster.
    c.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": "k1", "data": "AQBKeUlhAAAAABAAmbEfXjmn4eWpmtjmhAMhRw==", "format": "base64"})),
    )
    .unwrap();
    v["key-secret"] = "k1".into();
    // (librados retries a refused key until client_mount_timeout.)
    let short = srv.dir.join("short.conf");
    std::fs::write(&short, "[global]\nclient_mount_timeout = 2\n").unwrap();
    v["conf"] = short.to_str().unwrap().into();
    let e = qmp_err(add(&mut c, v.clone()));
    assert!(e.starts_with("error connecting: "), "{e}");
    // So is a user the cluster does not know, with the right key.
    v["key-secret"] = "k0".into();
    v["user"] = "nobody".into();
    let e = qmp_err(add(&mut c, v));
    assert!(e.starts_with("error connecting: "), "{e}");
    srv_alive(srv);
}

/// The key as libvirt sends it: a master key of 32 raw bytes in a file,
/// the RBD key encrypted with it (AES-256-CBC, PKCS#7 padding, base64,
/// `keyid` and `iv`). The cluster accepting the connection shows the
/// decrypted key is the right one; a wrong master key fails already in
/// `object-add`, with QEMU's message.
#[test]
fn key_secret_encrypted_with_a_master_key() {
    use blockd::secret::{base64_decode, base64_encode};
    use cbc::cipher::block_padding::{NoPadding, Pkcs7};
    use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};

    let conf = require_cluster!();
    let img = TestImage::new(&conf, "keyid", "8M");
    let srv = Server::start("blockd-rbd-keyid");
    let mut c = srv.client();

    let master: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let iv: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(11) ^ 0xc3).collect();
    let key = admin_key(&conf);
    // The secret's value is the key's bytes (rbd asks for it in base64).
    let plain = base64_decode(key.as_bytes()).unwrap();
    let mut buf = plain.to_vec();
    buf.resize(plain.len() + 16, 0);
    let ct = cbc::Encryptor::<aes::Aes256>::new_from_slices(&master, &iv)
        .unwrap()
        .encrypt_padded::<Pkcs7>(&mut buf, plain.len())
        .unwrap()
        .to_vec();
    let master_file = srv.dir.join("master.key");
    std::fs::write(&master_file, &master).unwrap();
    c.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": "master", "file": master_file, "format": "raw"})),
    )
    .unwrap();
    let secret = |id: &str, keyid: &str| {
        json!({"qom-type": "secret", "id": id, "data": base64_encode(&ct),
            "format": "base64", "keyid": keyid, "iv": base64_encode(&iv)})
    };
    c.execute("object-add", Some(secret("k0", "master")))
        .unwrap();

    let (host, port) = mon_addr(&conf);
    // (A wrongly decrypted key fails in 2 s, not librados' 300.)
    let short = srv.dir.join("short.conf");
    std::fs::write(&short, "[global]\nclient_mount_timeout = 2\n").unwrap();
    let mut v = rbd_node(short.to_str().unwrap(), "k", &img.name);
    v["user"] = "admin".into();
    v["key-secret"] = "k0".into();
    v["auth-client-required"] = json!(["cephx"]);
    v["server"] = json!([{"host": host, "port": port}]);
    c.execute("blockdev-add", Some(v)).unwrap();
    c.execute("blockdev-del", Some(json!({"node-name": "k"})))
        .unwrap();
    let log = srv.log();
    assert!(!log.contains(&key), "the key is in the log");

    // A wrong master key: the right one with one bit flipped, the first
    // such whose garbage does not end in a padding length (at most 16),
    // which is all QEMU checks.
    let (wrong, last) = (0..32)
        .map(|i| {
            let mut k = master.clone();
            k[i] ^= 1;
            let mut t = ct.clone();
            let n = t.len();
            cbc::Decryptor::<aes::Aes256>::new_from_slices(&k, &iv)
                .unwrap()
                .decrypt_padded::<NoPadding>(&mut t)
                .unwrap();
            (k, t[n - 1])
        })
        .find(|&(_, last)| last > 16)
        .unwrap();
    c.execute(
        "object-add",
        Some(json!({"qom-type": "secret", "id": "wrong", "data": base64_encode(&wrong), "format": "base64"})),
    )
    .unwrap();
    assert_eq!(
        qmp_err(c.execute("object-add", Some(secret("k1", "wrong")))),
        format!("Incorrect number of padding bytes ({last}) found on decrypted data")
    );
    srv_alive(srv);
}

/// Without the feature, rbd is what it is to qemu-storage-daemon without
/// its rbd module: in the schema, but an unknown driver (recorded).
#[test]
fn without_the_feature_rbd_is_unknown() {
    if cfg!(feature = "rbd") {
        eprintln!("skipped: built with the 'rbd' feature");
        return;
    }
    let srv = Server::start("blockd-rbd-none");
    let mut c = srv.client();
    let e = qmp_err(c.execute(
        "blockdev-add",
        Some(json!({"driver": "rbd", "node-name": "r", "pool": "p", "image": "i"})),
    ));
    assert_eq!(e, "Unknown driver 'rbd'");
    let e = qmp_err(c.execute(
        "blockdev-create",
        Some(json!({"job-id": "j", "options": {"driver": "rbd",
                    "location": {"pool": "p", "image": "i"}, "size": 1048576}})),
    ));
    assert_eq!(e, "Block driver 'rbd' not found or not supported");
    srv_alive(srv);
}

#[test]
fn blockdev_create_as_qemu() {
    let conf = require_cluster!();
    let srv = Server::start("blockd-rbd-create");
    let mut c = srv.client();
    let img = TestImage::named(&conf, "create");
    let create = |c: &mut QmpClient, id: &str, o: Value| {
        c.execute("blockdev-create", Some(json!({"job-id": id, "options": o})))
            .unwrap();
        wait_concluded(c, id)
    };
    let loc = json!({"pool": "rbd", "image": img.name, "conf": conf});
    let e = create(
        &mut c,
        "j1",
        json!({"driver": "rbd", "location": loc, "size": 1 << 20, "cluster-size": 1000}),
    );
    assert_eq!(e.as_deref(), Some("obj size needs to be power of 2"));
    let e = create(
        &mut c,
        "j2",
        json!({"driver": "rbd", "location": loc, "size": 1 << 20, "cluster-size": 2048}),
    );
    assert_eq!(e.as_deref(), Some("obj size too small"));
    let mut snap = loc.clone();
    snap["snapshot"] = "s".into();
    let e = create(
        &mut c,
        "j3",
        json!({"driver": "rbd", "location": snap, "size": 1 << 20}),
    );
    assert_eq!(
        e.as_deref(),
        Some("Can't use snapshot name for image creation")
    );
    let e = create(
        &mut c,
        "j4",
        json!({"driver": "rbd", "location": loc, "size": 3 << 20, "cluster-size": 65536}),
    );
    assert_eq!(e, None);
    let info = rbd(&conf, &["info", &img.spec()]);
    assert!(info.contains("size 3 MiB"), "{info}");
    assert!(info.contains("order 16 (64 KiB objects)"), "{info}");
    let e = create(
        &mut c,
        "j5",
        json!({"driver": "rbd", "location": loc, "size": 1 << 20}),
    );
    assert_eq!(e.as_deref(), Some("error rbd create: File exists"));
    let mut bad = loc.clone();
    bad["pool"] = "nopool".into();
    let e = create(
        &mut c,
        "j6",
        json!({"driver": "rbd", "location": bad, "size": 1 << 20}),
    );
    assert_eq!(
        e.as_deref(),
        Some("error opening pool nopool: No such file or directory")
    );
    // The new image opens.
    c.execute("blockdev-add", Some(rbd_node(&conf, "n", &img.name)))
        .unwrap();
    srv_alive(srv);
}

//! The `rbd` driver against a real Ceph cluster (tests/ceph/cluster.sh):
//! options and errors, data through an NBD export checked with QEMU's
//! tools and Ceph's `rbd` tool, two blockd processes on one image, and
//! mirroring between local images and rbd.
//!
//! Needs a build with the `rbd` feature and `BLOCKD_CEPH_CONF` naming the
//! cluster's ceph.conf; otherwise every test says why it skips:
//!
//! ```text
//! export BLOCKD_CEPH_CONF=$(tests/ceph/cluster.sh start)
//! cargo test -p blockd --features rbd --test rbd
//! tests/ceph/cluster.sh stop "$BLOCKD_CEPH_CONF"
//! ```

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use blockd_testkit::{ClientError, QmpClient};
use common::Server;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// The cluster's configuration, or None (with the reason printed).
fn cluster() -> Option<String> {
    if !cfg!(feature = "rbd") {
        eprintln!("skipped: blockd built without the 'rbd' feature (cargo test --features rbd)");
        return None;
    }
    match std::env::var("BLOCKD_CEPH_CONF") {
        Ok(c) if !c.is_empty() => Some(c),
        _ => {
            eprintln!(
                "skipped: no Ceph cluster configured (BLOCKD_CEPH_CONF=$(tests/ceph/cluster.sh start))"
            );
            None
        }
    }
}

macro_rules! require_cluster {
    () => {
        match cluster() {
            Some(c) => c,
            None => return,
        }
    };
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh image name for this test run.
fn image_name(tag: &str) -> String {
    format!(
        "t-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .env_remove("CEPH_CONF")
        .output()
        .expect("run tool")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the `rbd` tool on the test cluster.
fn rbd(conf: &str, args: &[&str]) -> String {
    let mut a = vec!["-c", conf];
    a.extend_from_slice(args);
    ok(&run("rbd", &a))
}

/// An image that is removed again when the test ends.
struct TestImage {
    conf: String,
    name: String,
}

impl TestImage {
    fn new(conf: &str, tag: &str, size: &str) -> TestImage {
        let name = image_name(tag);
        rbd(conf, &["create", "--size", size, &format!("rbd/{name}")]);
        TestImage {
            conf: conf.into(),
            name,
        }
    }

    /// Adopts an image something else creates.
    fn named(conf: &str, tag: &str) -> TestImage {
        TestImage {
            conf: conf.into(),
            name: image_name(tag),
        }
    }

    fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = run(
            "rbd",
            &["-c", &self.conf, "rm", "--no-progress", &self.spec()],
        );
    }
}

fn rbd_node(conf: &str, node: &str, image: &str) -> Value {
    json!({"driver": "rbd", "node-name": node, "pool": "rbd", "image": image, "conf": conf})
}

fn qmp_err(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Qmp { desc, .. }) => desc,
        other => panic!("expected a QMP error, got {other:?}"),
    }
}

/// Waits for job `id` to conclude; returns its error, if any.
fn wait_concluded(c: &mut QmpClient, id: &str) -> Option<String> {
    c.wait_event_with(
        |e| {
            e["event"] == "JOB_STATUS_CHANGE"
                && e["data"]["id"] == id
                && e["data"]["status"] == "concluded"
        },
        T,
    )
    .expect("job concluded");
    let jobs = c.execute("query-jobs", None).unwrap();
    let j = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap();
    c.execute("job-dismiss", Some(json!({"id": id}))).unwrap();
    j.get("error").and_then(Value::as_str).map(str::to_string)
}

/// The admin key of the test cluster (from its keyring).
fn admin_key(conf: &str) -> String {
    let dir = Path::new(conf).parent().unwrap();
    let text = std::fs::read_to_string(dir.join("admin.keyring")).expect("admin keyring");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .expect("key in keyring")
        .trim()
        .to_string()
}

/// The monitor address of the test cluster (from its ceph.conf).
fn mon_addr(conf: &str) -> (String, String) {
    let text = std::fs::read_to_string(conf).unwrap();
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("mon_host = "))
        .unwrap();
    let v = v.trim_start_matches("v1:");
    let (h, p) = v.rsplit_once(':').unwrap();
    (h.into(), p.into())
}

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
    let mut v = rbd_node(&conf, "x", &img.name);
    v["encrypt"] = json!({"format": "luks", "key-secret": "k"});
    assert!(qmp_err(add(&mut c, v)).contains("does not support image encryption"));
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
    assert!(file.starts_with("json:{\"driver\":\"rbd\""), "{file}");

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
    let e = qmp_err(add(&mut c, v));
    assert!(e.starts_with("error connecting: "), "{e}");
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

fn srv_alive(mut srv: Server) {
    srv.assert_alive("after the test");
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

fn require_qemu_tools() -> bool {
    let found = ["qemu-io", "qemu-img"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !found {
        eprintln!("skipped: qemu-io/qemu-img not installed");
    }
    found
}

fn url(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Starts an NBD server on `srv` and exports `node` as `name`.
fn export(c: &mut QmpClient, srv: &Server, node: &str, name: &str) -> String {
    let sock = srv.dir.join("nbd");
    if !sock.exists() {
        c.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "unix", "data": {"path": sock}}})),
        )
        .unwrap();
    }
    c.execute(
        "block-export-add",
        Some(
            json!({"type": "nbd", "id": name, "node-name": node, "name": name,
                    "writable": true}),
        ),
    )
    .unwrap();
    url(&sock, name)
}

fn unexport(c: &mut QmpClient, name: &str) {
    c.execute("block-export-del", Some(json!({"id": name})))
        .unwrap();
    // The export goes away once its clients did.
    for _ in 0..100 {
        let l = c.execute("query-block-exports", None).unwrap();
        if !l.as_array().unwrap().iter().any(|e| e["id"] == name) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("export {name} did not go away");
}

/// `rbd du`'s used bytes of an image.
fn used(conf: &str, spec: &str) -> u64 {
    let v: Value = serde_json::from_str(&rbd(conf, &["du", "--format", "json", spec])).unwrap();
    v["images"][0]["used_size"].as_u64().unwrap()
}

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

/// The client that holds an image's exclusive lock (`rbd lock ls`).
fn lockers(conf: &str, spec: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&rbd(conf, &["lock", "ls", "--format", "json", spec])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["locker"].as_str().unwrap_or("").to_string())
        .collect()
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

/// Runs a full mirror of `src` to `tgt` to completion.
fn mirror(c: &mut QmpClient, job: &str, src: &str, tgt: &str) {
    c.execute(
        "blockdev-mirror",
        Some(json!({"job-id": job, "device": src, "target": tgt, "sync": "full"})),
    )
    .unwrap();
    c.wait_event_with(
        |e| e["event"] == "BLOCK_JOB_READY" && e["data"]["device"] == job,
        T,
    )
    .expect("mirror ready");
    c.execute("block-job-complete", Some(json!({"device": job})))
        .unwrap();
    let done = c
        .wait_event_with(
            |e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]["device"] == job,
            T,
        )
        .expect("mirror completed");
    assert!(done["data"].get("error").is_none(), "{done}");
}

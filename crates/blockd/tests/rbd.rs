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

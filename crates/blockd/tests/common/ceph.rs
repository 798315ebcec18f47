//! Helpers of the RBD tests (`rbd.rs`, `rbd_data.rs`): the test
//! cluster (`BLOCKD_CEPH_CONF`, started by tests/ceph/cluster.sh), images
//! that remove themselves, Ceph's `rbd` tool, NBD exports to check data
//! with QEMU's tools.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use blockd_testkit::{ClientError, QmpClient};
use serde_json::{json, Value};

pub use crate::common::ok;
use crate::common::Server;
// (Not every test file uses these.)
#[allow(unused_imports)]
pub use crate::common::{qemu_io_reads, unexport};

pub const T: Duration = Duration::from_secs(60);

/// The cluster's configuration, or None (with the reason printed).
pub fn cluster() -> Option<String> {
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

/// The cluster's ceph.conf, or returns from the test (saying why).
#[macro_export]
macro_rules! require_cluster {
    () => {
        match $crate::ceph::cluster() {
            Some(c) => c,
            None => return,
        }
    };
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh image name for this test run.
pub fn image_name(tag: &str) -> String {
    format!(
        "t-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .env_remove("CEPH_CONF")
        .output()
        .expect("run tool")
}

/// Runs the `rbd` tool on the test cluster.
pub fn rbd(conf: &str, args: &[&str]) -> String {
    let mut a = vec!["-c", conf];
    a.extend_from_slice(args);
    ok(&run("rbd", &a))
}

/// `rbd export` of `spec` (an image, or `image@snap`) into `dir/name`,
/// read without blockd; returns the file.
pub fn rbd_export(conf: &str, spec: &str, dir: &Path, name: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    let _ = std::fs::remove_file(&out);
    rbd(
        conf,
        &["export", "--no-progress", spec, out.to_str().unwrap()],
    );
    out
}

/// An image that is removed again when the test ends.
pub struct TestImage {
    pub conf: String,
    pub name: String,
}

impl TestImage {
    pub fn new(conf: &str, tag: &str, size: &str) -> TestImage {
        let name = image_name(tag);
        rbd(conf, &["create", "--size", size, &format!("rbd/{name}")]);
        TestImage {
            conf: conf.into(),
            name,
        }
    }

    /// Adopts an image something else creates.
    pub fn named(conf: &str, tag: &str) -> TestImage {
        TestImage {
            conf: conf.into(),
            name: image_name(tag),
        }
    }

    pub fn spec(&self) -> String {
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

pub fn rbd_node(conf: &str, node: &str, image: &str) -> Value {
    json!({"driver": "rbd", "node-name": node, "pool": "rbd", "image": image, "conf": conf})
}

pub fn qmp_err(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Qmp { desc, .. }) => desc,
        other => panic!("expected a QMP error, got {other:?}"),
    }
}

/// Waits for job `id` to conclude; returns its error, if any.
pub fn wait_concluded(c: &mut QmpClient, id: &str) -> Option<String> {
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
pub fn admin_key(conf: &str) -> String {
    let dir = Path::new(conf).parent().unwrap();
    let text = std::fs::read_to_string(dir.join("admin.keyring")).expect("admin keyring");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .expect("key in keyring")
        .trim()
        .to_string()
}

/// The monitor address of the test cluster (from its ceph.conf).
pub fn mon_addr(conf: &str) -> (String, String) {
    let text = std::fs::read_to_string(conf).unwrap();
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("mon_host = "))
        .unwrap();
    let v = v.trim_start_matches("v1:");
    let (h, p) = v.rsplit_once(':').unwrap();
    (h.into(), p.into())
}

pub fn srv_alive(mut srv: Server) {
    srv.assert_alive("after the test");
}

pub fn require_qemu_tools() -> bool {
    let found = ["qemu-io", "qemu-img"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !found {
        eprintln!("skipped: qemu-io/qemu-img not installed");
    }
    found
}

pub fn url(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Starts an NBD server on `srv` and exports `node` as `name`.
pub fn export(c: &mut QmpClient, srv: &Server, node: &str, name: &str) -> String {
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

/// `rbd du`'s used bytes of an image.
pub fn used(conf: &str, spec: &str) -> u64 {
    let v: Value = serde_json::from_str(&rbd(conf, &["du", "--format", "json", spec])).unwrap();
    v["images"][0]["used_size"].as_u64().unwrap()
}

/// The client that holds an image's exclusive lock (`rbd lock ls`).
pub fn lockers(conf: &str, spec: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&rbd(conf, &["lock", "ls", "--format", "json", spec])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["locker"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Runs a full mirror of `src` to `tgt` to completion.
pub fn mirror(c: &mut QmpClient, job: &str, src: &str, tgt: &str) {
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

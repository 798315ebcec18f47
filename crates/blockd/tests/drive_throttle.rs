//! `--drive` with QEMU's I/O limits: the `throttling.*` options and their
//! legacy spellings (`bps=`, `iops_rd=`, `group=` ...), as `-drive` takes
//! them in QEMU 10 (`drive_new`, `extract_common_blockdev_options`), and
//! the group each drive lands in (its own, named after the drive, unless
//! one is named).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockd_testkit::QmpClient;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_blockd");

fn scratch(tag: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/bdt-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn limits(b: &Value) -> Value {
    let i = &b["inserted"];
    let keep = |k: &&String| k.starts_with("bps") || k.starts_with("iops") || *k == "group";
    Value::Object(
        i.as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

#[test]
fn drives_take_limits_and_groups() {
    let d = scratch("ok");
    let sock = d.join("s");
    let _s = Server(
        Command::new(BIN)
            .arg("--qmp")
            .arg(&sock)
            .args([
                "--drive",
                "if=none,id=d0,driver=null-co,throttling.bps-total=1000,throttling.group=g",
                "--drive",
                "if=none,id=d1,driver=null-co,bps_rd=5,iops_wr=7,iops_wr_max=70,iops_size=512",
                "--drive",
                "if=none,id=d2,driver=null-co,group=g,bps=1000,throttling.bps-total-max=3000,throttling.bps-total-max-length=4",
                "--drive",
                "if=none,id=d3,driver=null-co",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(10)).unwrap();
    c.negotiate().unwrap();
    let q = c.execute("query-block", None).unwrap();
    let l: Vec<Value> = q.as_array().unwrap().iter().map(limits).collect();
    let zero = json!({"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0});
    let with = |extra: Value| {
        let mut z = zero.clone();
        z.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        z
    };
    // d0 and d2 share g: d2's limits, set last, are the group's.
    let g = with(json!({"bps": 1000, "bps_max": 3000, "bps_max_length": 4, "group": "g"}));
    assert_eq!(l[0], g);
    assert_eq!(l[2], g);
    assert_eq!(
        l[1],
        with(
            json!({"bps_rd": 5, "iops_wr": 7, "iops_wr_max": 70, "iops_wr_max_length": 1,
                    "iops_size": 512, "group": "d1"})
        )
    );
    assert_eq!(l[3], zero);
}

#[test]
fn bad_limits_stop_start_up_with_qemus_messages() {
    let d = scratch("bad");
    let sock = d.join("s");
    for (opts, msg) in [
        (
            "bps=1,throttling.bps-total=2",
            "'throttling.bps-total' and its alias 'bps' can't be used at the same time",
        ),
        (
            "bps=1,bps_rd=1",
            "bps/iops/max total values and read/write values cannot be used at the same time",
        ),
        (
            "throttling.bps-total=x",
            "Parameter 'throttling.bps-total' expects a number",
        ),
        ("iops_size=5", "iops size requires an iops value to be set"),
        (
            "bps=1,throttling.bps-total-max-length=2",
            "burst length set without burst rate",
        ),
        (
            "bps=10,bps_max=5",
            "bps_max/iops_max cannot be lower than bps/iops",
        ),
    ] {
        let arg = format!("if=none,id=d0,driver=null-co,{opts}");
        let o = Command::new(BIN)
            .arg("--qmp")
            .arg(&sock)
            .args(["--drive", &arg])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{opts}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{opts}: {err}");
    }
}

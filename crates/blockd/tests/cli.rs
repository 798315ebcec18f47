//! The `blockd` command line: sockets, qemu-storage-daemon spellings,
//! `--blockdev`, `--object`, start-up errors, signals and clean shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockd_testkit::QmpClient;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_blockd");

fn scratch(tag: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/bc-{}-{tag}", std::process::id()));
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

fn spawn(args: &[&str]) -> Server {
    Server(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn wait_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(
            Instant::now() < deadline,
            "socket {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn signal(s: &Server, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    unsafe { libc::kill(s.0.id() as i32, sig) };
}

fn wait_exit(s: &mut Server) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = s.0.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn help_and_version() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--qmp",
        "--chardev",
        "--monitor",
        "--blockdev",
        "--pidfile",
        "--log",
        "--inline-writes",
    ] {
        assert!(out.contains(opt), "--help lists {opt}");
    }
    let o = run(&["--version"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("blockd "));
    let o = run(&["--bogus"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let d = scratch("term");
    let sock = d.join("s");
    let pid = d.join("pid");
    let mut s = spawn(&[
        "--qmp",
        sock.to_str().unwrap(),
        "--pidfile",
        pid.to_str().unwrap(),
    ]);
    wait_socket(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "QMP socket is owner-only");
    assert_eq!(
        std::fs::read_to_string(&pid).unwrap().trim(),
        s.0.id().to_string()
    );
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();
    signal(&s, libc::SIGTERM);
    let ev = c
        .wait_event_with(|e| e["event"] == "SHUTDOWN", Duration::from_secs(10))
        .unwrap();
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert_eq!(wait_exit(&mut s), 0);
    assert!(!sock.exists(), "socket removed");
    assert!(!pid.exists(), "pidfile removed");
}

#[test]
fn sigint_exits_zero() {
    let d = scratch("int");
    let sock = d.join("s");
    let mut s = spawn(&["--qmp", sock.to_str().unwrap()]);
    wait_socket(&sock);
    signal(&s, libc::SIGINT);
    assert_eq!(wait_exit(&mut s), 0);
    assert!(!sock.exists());
}

#[test]
fn several_sockets_and_qsd_spelling() {
    let d = scratch("multi");
    let a = d.join("a");
    let b = d.join("b");
    let chardev = format!("socket,path={},server=on,wait=off,id=m0", b.display());
    let _s = spawn(&[
        "--qmp",
        a.to_str().unwrap(),
        "--chardev",
        &chardev,
        "--monitor",
        "chardev=m0",
    ]);
    wait_socket(&a);
    wait_socket(&b);
    for p in [&a, &b] {
        let mut c = QmpClient::connect_retry(p, Duration::from_secs(5)).unwrap();
        c.negotiate().unwrap();
        let v = c.execute("query-version", None).unwrap();
        assert_eq!(v["qemu"]["major"], 10);
    }
}

#[test]
fn live_socket_refused_stale_socket_replaced() {
    let d = scratch("live");
    let sock = d.join("s");
    let _s = spawn(&["--qmp", sock.to_str().unwrap()]);
    wait_socket(&sock);
    let o = run(&["--qmp", sock.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by another server"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The first server still answers.
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();

    // A stale socket (no listener) is replaced.
    let stale = d.join("stale");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let _t = spawn(&["--qmp", stale.to_str().unwrap()]);
    let mut c = QmpClient::connect_retry(&stale, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();

    // A regular file is never replaced.
    let file = d.join("file");
    std::fs::write(&file, b"precious").unwrap();
    let o = run(&["--qmp", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn blockdev_options_at_start_up() {
    let d = scratch("bdev");
    let sock = d.join("s");
    let _s = spawn(&[
        "--qmp",
        sock.to_str().unwrap(),
        "--blockdev",
        "driver=null-co,node-name=n0,size=4096,read-zeroes=on",
        "--blockdev",
        r#"{"driver": "raw", "node-name": "r0", "file": "n0", "read-only": true}"#,
    ]);
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    // Newest first, as qemu-storage-daemon lists them.
    assert_eq!(names, ["r0", "n0"]);
    assert_eq!(nodes[1]["image"]["virtual-size"], 4096);
    assert_eq!(nodes[0]["ro"], true);
}

/// libvirt's `--object secret`s: a master key in a file, then a secret
/// encrypted with it; one that does not decrypt stops the start-up with
/// QEMU's message (qemu-storage-daemon 10.0.2 prints the same after its
/// option).
#[test]
fn secrets_encrypted_with_a_master_key_at_start_up() {
    let d = scratch("keyid");
    let sock = d.join("s");
    let key = d.join("master.key");
    // 'master' of the transcript secret/002-keyid.
    let master =
        blockd::secret::base64_decode(b"RJZYN+MMOGdynvduqROtolVroETZnCc1Gigta8PRg54=").unwrap();
    std::fs::write(&key, &*master).unwrap();
    let master = format!("secret,id=master,file={},format=raw", key.display());
    let iv = "iv=aOQvjia4lZZFEiiGB1jrrQ==";
    let good = format!(
        "secret,id=s0,keyid=master,{iv},format=base64,data=5aJ0Ul9aeMdV3dyIkc9rPlVp7T+zALeXBaODsX2a42Q="
    );
    let _s = spawn(&[
        "--qmp",
        sock.to_str().unwrap(),
        "--object",
        &master,
        "--object",
        &good,
    ]);
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();
    let keyid = c
        .execute(
            "qom-get",
            Some(json!({"path": "/objects/s0", "property": "keyid"})),
        )
        .unwrap();
    assert_eq!(keyid, "master");

    let bad = format!("secret,id=s1,keyid=master,{iv},format=base64,data=nxE3eIbzlGnYggxRtztVmg==");
    // (Spawned, so that a server that wrongly starts fails the test.)
    let mut s = spawn(&["--object", &master, "--object", &bad]);
    assert_eq!(wait_exit(&mut s), 1);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut s.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("Incorrect number of padding bytes (102) found on decrypted data"),
        "{err}"
    );
}

/// qemu-storage-daemon's implied first keys: `--blockdev DRIVER,...`,
/// `--export TYPE,...`, `--monitor CHARDEV,...`.
#[test]
fn implied_first_keys() {
    let d = scratch("implied");
    let sock = d.join("s");
    let mon = d.join("m");
    let nbd = d.join("nbd");
    let chardev = format!("socket,path={},server=on,wait=off,id=m0", mon.display());
    let nbd_server = format!("addr.type=unix,addr.path={}", nbd.display());
    let _s = spawn(&[
        "--qmp",
        sock.to_str().unwrap(),
        "--blockdev",
        "null-co,node-name=n0,size=4096",
        "--chardev",
        &chardev,
        "--monitor",
        "m0",
        "--nbd-server",
        &nbd_server,
        "--export",
        "nbd,id=e0,node-name=n0",
    ]);
    wait_socket(&sock);
    // The monitor on chardev m0 answers.
    let mut c = QmpClient::connect_retry(&mon, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    assert_eq!(nodes[0]["node-name"], "n0");
    assert_eq!(nodes[0]["drv"], "null-co");
    assert_eq!(nodes[0]["image"]["virtual-size"], 4096);
    let exports = c.execute("query-block-exports", None).unwrap();
    assert_eq!(exports[0]["id"], "e0");
    assert_eq!(exports[0]["type"], "nbd");
    assert_eq!(exports[0]["node-name"], "n0");
}

/// A bare word after the first is no implied value: qemu-storage-daemon
/// 10.0.2 answers each of these with the message given.
#[test]
fn implied_key_errors_read_like_qsd() {
    let d = scratch("implied-err");
    let sock = d.join("s");
    for (opt, arg, msg) in [
        (
            "--blockdev",
            "null-co,null-co",
            "--blockdev null-co,null-co: Expected '=' after parameter 'null-co'",
        ),
        (
            "--blockdev",
            "node-name=n0,null-co",
            "Expected '=' after parameter 'null-co'",
        ),
        ("--blockdev", ",node-name=n0", "Invalid parameter ''"),
        (
            "--blockdev",
            "null-co,node-name=n0,a.1=x",
            "Parameter 'a.0' missing",
        ),
        (
            "--blockdev",
            "help",
            "Help is not available for this option",
        ),
        ("--export", "nbd,nbd", "Expected '=' after parameter 'nbd'"),
        (
            "--nbd-server",
            "unix",
            "Expected '=' after parameter 'unix'",
        ),
        ("--monitor", "m0,m1", "Expected '=' after parameter 'm1'"),
    ] {
        let o = run(&["--qmp", sock.to_str().unwrap(), opt, arg]);
        assert_eq!(o.status.code(), Some(1), "{opt} {arg}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{opt} {arg}: {err}");
        assert!(!sock.exists());
    }
    // The implied value goes through the schema like any other: an
    // unknown driver is refused as qemu-storage-daemon refuses it.
    let o = run(&[
        "--qmp",
        sock.to_str().unwrap(),
        "--blockdev",
        "a.b,node-name=x",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("Parameter 'driver' does not accept value 'a.b'"));
}

#[test]
fn inline_writes_switch() {
    let o = run(&["--inline-writes", "maybe"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("'maybe' is not 'on' or 'off'"));
    let d = scratch("inline");
    let sock = d.join("s");
    let img = d.join("img");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let _s = spawn(&[
        "--qmp",
        sock.to_str().unwrap(),
        "--inline-writes",
        "off",
        "--blockdev",
        &format!("driver=file,node-name=f0,filename={}", img.display()),
    ]);
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    assert_eq!(nodes[0]["node-name"], "f0");
}

#[test]
fn bad_blockdev_stops_start_up() {
    let d = scratch("badbdev");
    let sock = d.join("s");
    for (arg, msg) in [
        (
            "driver=null-co,node-name=n0,size=-1",
            "Parameter 'size' expects a non-negative size",
        ),
        ("driver=null-co,node-name=1x", "Invalid node-name: '1x'"),
        (
            "driver=nope,node-name=x",
            "Parameter 'driver' does not accept value 'nope'",
        ),
        ("{\"driver\": \"null-co\"", "invalid JSON"),
        // Keyval values are read as qemu-storage-daemon 10.0.2 reads them,
        // with its messages.
        (
            "null-co,node-name=n0,size=1.5k",
            "Parameter 'size' expects integer",
        ),
        (
            "null-co,node-name=n0,read-only=maybe",
            "Parameter 'read-only' expects 'on' or 'off'",
        ),
        (
            "null-co,node-name=n0,size.x=1",
            "Parameters 'size.*' are unexpected",
        ),
        ("raw,node-name=r,offset=x", "Parameter 'file' is missing"),
    ] {
        let o = run(&["--qmp", sock.to_str().unwrap(), "--blockdev", arg]);
        assert_eq!(o.status.code(), Some(1), "{arg}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{arg}: {err}");
        assert!(!sock.exists(), "no socket left behind after a failed start");
    }
}

#[test]
fn bad_monitor_options() {
    for args in [
        vec!["--monitor", "chardev=nope"],
        vec![
            "--chardev",
            "socket,path=/tmp/x,id=m0",
            "--monitor",
            "chardev=m0",
        ],
        vec!["--chardev", "file,path=/tmp/x,id=m0"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(!o.stderr.is_empty());
    }
    let long = format!("/tmp/{}", "x".repeat(120));
    let o = run(&["--qmp", &long]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("too long"));
}

#[test]
fn default_socket_is_announced() {
    let d = scratch("default");
    let mut s = Server(
        Command::new(BIN)
            .env("XDG_RUNTIME_DIR", &d)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let sock = d.join("blockd/qmp.sock");
    wait_socket(&sock);
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();
    c.execute("quit", None).unwrap();
    assert_eq!(wait_exit(&mut s), 0);
    let mut out = String::new();
    use std::io::Read;
    s.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(
        out.contains(&format!("socat - UNIX-CONNECT:{}", sock.display())),
        "{out}"
    );
}

/// `blockdev-snapshot-sync` and `blockdev-snapshot` name a `--drive`
/// backend by its id (QEMU's `bdrv_lookup_bs`): the backend's medium gets
/// the overlay, `query-block` shows the chain, and a backend without a
/// medium is refused with QEMU's message.
#[test]
fn snapshots_of_a_drive_by_device_name() {
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return;
    }
    let d = scratch("snapdrive");
    let sock = d.join("s");
    let base = d.join("base.qcow2");
    let ov = d.join("ov.qcow2");
    let s1 = d.join("s1.qcow2");
    for (img, backing) in [(&base, None), (&ov, Some(&s1))] {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            cmd.args(["-u", "-b", b.to_str().unwrap(), "-F", "qcow2"]);
        }
        assert!(cmd.arg(img).arg("1M").status().unwrap().success());
    }
    let drive = format!("file={},format=qcow2,id=d0", base.display());
    let _s = spawn(&[
        "--qmp",
        sock.to_str().unwrap(),
        "--drive",
        &drive,
        "--drive",
        "id=empty",
    ]);
    let mut c = QmpClient::connect_retry(&sock, Duration::from_secs(5)).unwrap();
    c.negotiate().unwrap();
    let e = c
        .execute(
            "blockdev-snapshot-sync",
            Some(json!({"device": "empty", "snapshot-file": s1})),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "QMP error GenericError: Device 'empty' has no medium"
    );
    c.execute(
        "blockdev-snapshot-sync",
        Some(json!({"device": "d0", "snapshot-file": s1})),
    )
    .unwrap();
    let q = c.execute("query-block", None).unwrap();
    let d0 = q
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == "d0")
        .unwrap();
    let ins = &d0["inserted"];
    assert_eq!(ins["file"], s1.to_str().unwrap(), "{d0}");
    assert_eq!(ins["backing_file"], base.to_str().unwrap(), "{d0}");
    assert_eq!(ins["backing_file_depth"], 1, "{d0}");
    assert_eq!(
        ins["image"]["backing-image"]["filename"],
        base.to_str().unwrap()
    );
    // The device name again, with an overlay added by blockdev-add.
    c.execute(
        "blockdev-add",
        Some(
            json!({"driver": "qcow2", "node-name": "ov", "backing": null,
                    "file": {"driver": "file", "filename": ov}}),
        ),
    )
    .unwrap();
    c.execute(
        "blockdev-snapshot",
        Some(json!({"node": "d0", "overlay": "ov"})),
    )
    .unwrap();
    let q = c.execute("query-block", None).unwrap();
    let d0 = q
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == "d0")
        .unwrap();
    assert_eq!(d0["inserted"]["node-name"], "ov", "{d0}");
    assert_eq!(d0["inserted"]["backing_file_depth"], 2, "{d0}");
}

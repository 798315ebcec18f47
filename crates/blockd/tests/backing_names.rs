//! Backing files named by more than a file name, against a real
//! qemu-nbd: a qcow2 overlay whose header names its backing file as an
//! NBD URI (`nbd+unix://`, legacy `nbd:unix:`), or as `json:{...}` options
//! (a protocol driver alone, or a format driver with its `file`), opened
//! in blockd with the backing chain from the header. Reads through
//! blockd's NBD export of the overlay return the base's data where the
//! overlay has none, and the overlay's data elsewhere; the backing node's
//! driver is the one QEMU opens (recorded with qemu-storage-daemon
//! 10.0.2). Unknown protocols and bad URIs fail with QEMU's messages.
//! `blockdev-change-medium` takes the same names (QEMU's `bdrv_open` of
//! the new medium goes through the same `bdrv_fill_options`).

mod common;
#[path = "common/qemu_nbd.rs"]
mod qemu_nbd;

use std::path::{Path, PathBuf};

use blockd_testkit::{ClientError, QmpClient};
use common::{qemu_io_reads, Server};
use qemu_nbd::{have_qemu, ok, run, QemuNbd};
use serde_json::{json, Value};

/// A 4 MiB raw base (0xaa in its first MiB, 0xcc in its third) served
/// by qemu-nbd as `exp` on `base.sock` in the server's directory.
struct Base {
    _nbd: QemuNbd,
    sock: PathBuf,
}

fn serve_base(srv: &Server) -> Base {
    let base = srv.dir.join("base.raw");
    let b = base.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-q", "-f", "raw", b, "4M"]));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -P 0xcc 2M 1M",
            b,
        ],
    ));
    let sock = srv.dir.join("base.sock");
    let nbd = QemuNbd::start(&base, &sock);
    Base { _nbd: nbd, sock }
}

/// A qcow2 overlay `file` with 0xbb at 512k (64k) and its header naming
/// `backing` in `format` (`None`: no backing format in the header, as
/// old images and QMP's blockdev-create leave it).
fn overlay(dir: &Path, file: &str, backing: &str, format: Option<&str>) -> PathBuf {
    let ov = dir.join(file);
    let o = ov.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-q", "-f", "qcow2", o, "4M"]));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xbb 512k 64k", o],
    ));
    ok(&run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            format.unwrap_or("raw"),
            o,
        ],
    ));
    if format.is_none() {
        // qemu-img always writes a backing format now: turn its header
        // extension (0xe2792aca) into an unknown one, which QEMU skips.
        let mut head = std::fs::read(&ov).unwrap();
        let at = head
            .windows(4)
            .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
            .expect("backing format extension");
        head[at..at + 4].copy_from_slice(&[0x0b, 0xad, 0xf0, 0x0d]);
        std::fs::write(&ov, head).unwrap();
        let info = ok(&run("qemu-img", &["info", "-U", o]));
        assert!(!info.contains("backing file format"), "{info}");
    }
    ov
}

fn add_overlay(c: &mut QmpClient, node: &str, ov: &Path) -> Result<Value, ClientError> {
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "node-name": node,
                    "file": {"driver": "file", "filename": ov}})),
    )
}

/// The error of a failed command.
fn desc(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Qmp { desc, .. }) => desc,
        other => panic!("expected a QMP error, got {other:?}"),
    }
}

/// The drivers of the backing chain below `node`, top first, as
/// `query-named-block-nodes` shows each node's `backing`/`file` child.
fn chain_drivers(c: &mut QmpClient, node: &str) -> Vec<String> {
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    let nodes = nodes.as_array().unwrap();
    let find = |name: &str| {
        nodes
            .iter()
            .find(|n| n["node-name"] == name)
            .unwrap_or_else(|| panic!("no node {name} in {nodes:?}"))
            .clone()
    };
    // The edges come from the graph (names of generated nodes differ).
    let graph = c.execute("x-debug-query-block-graph", None).unwrap();
    let id_of = |name: &str| {
        graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no graph node {name}: {graph}"))["id"]
            .clone()
    };
    let name_of = |id: &Value| {
        graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| &n["id"] == id)
            .unwrap()["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let child = |parent: &Value, edge: &str| {
        graph["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| &e["parent"] == parent && e["name"] == edge)
            .map(|e| e["child"].clone())
    };
    let mut out = Vec::new();
    let mut at = child(&id_of(node), "backing");
    while let Some(id) = at {
        let name = name_of(&id);
        out.push(find(&name)["drv"].as_str().unwrap().to_string());
        at = child(&id, "file");
    }
    out
}

/// Reads the overlay through blockd's NBD export of `node` with qemu-io:
/// base data below, the overlay's data at 512k.
fn check_reads(c: &mut QmpClient, srv: &Server, node: &str) {
    qemu_io_reads(
        c,
        srv,
        node,
        &[
            "read -P 0xaa 0 512k",
            "read -P 0xbb 512k 64k",
            "read -P 0xaa 576k 448k",
            "read -P 0 1M 1M",
            "read -P 0xcc 2M 1M",
        ],
    );
}

/// Opens an overlay `node` whose header names `name` (in `format`) as its
/// backing file; checks the chain's drivers (`want`, top down below the
/// overlay) and the reads through it; deletes it again.
fn open_and_read(
    c: &mut QmpClient,
    srv: &Server,
    node: &str,
    name: &str,
    format: Option<&str>,
    want: &[&str],
) {
    let ov = overlay(&srv.dir, &format!("{node}.qcow2"), name, format);
    add_overlay(c, node, &ov).unwrap();
    assert_eq!(chain_drivers(c, node), want, "{name} {format:?}");
    check_reads(c, srv, node);
    c.execute("blockdev-del", Some(json!({"node-name": node})))
        .unwrap();
}

#[test]
fn nbd_uri_backing_files_read_through_qemu_nbd() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("bn-uri");
    let base = serve_base(&srv);
    let s = base.sock.display();
    let mut c = srv.client();
    for (i, (name, format, want)) in [
        // With a backing format: that format over the nbd node.
        (
            format!("nbd+unix:///exp?socket={s}"),
            Some("raw"),
            ["raw", "nbd"].as_slice(),
        ),
        // Without one, the nbd node's format is probed (raw).
        (format!("nbd+unix:///exp?socket={s}"), None, &["raw", "nbd"]),
        // QEMU's legacy form.
        (
            format!("nbd:unix:{s}:exportname=exp"),
            Some("raw"),
            &["raw", "nbd"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        open_and_read(&mut c, &srv, &format!("o{i}"), &name, format, want);
    }
}

#[test]
fn json_backing_files_read_through_qemu_nbd() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("bn-json");
    let base = serve_base(&srv);
    let server = json!({"type": "unix", "path": base.sock});
    let nbd = json!({"driver": "nbd", "server": server, "export": "exp"});
    let sock = base.sock.to_str().unwrap();
    let mut c = srv.client();
    for (i, (name, format, want)) in [
        // A protocol driver without a backing format: the nbd node itself
        // is the backing node (qemu-storage-daemon opens no format on it).
        (format!("json:{nbd}"), None, ["nbd"].as_slice()),
        // A format driver with its file: the whole backing node.
        (
            format!("json:{}", json!({"driver": "raw", "file": nbd})),
            Some("raw"),
            &["raw", "nbd"],
        ),
        // QEMU's flattened keys.
        (
            format!(
                "json:{}",
                json!({"driver": "raw", "file.driver": "nbd", "file.server.type": "unix",
                       "file.server.path": sock, "file.export": "exp"})
            ),
            Some("raw"),
            &["raw", "nbd"],
        ),
        // No driver: the file, its format probed.
        (
            format!("json:{}", json!({"file": nbd})),
            None,
            &["raw", "nbd"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        open_and_read(&mut c, &srv, &format!("j{i}"), &name, format, want);
    }
}

#[test]
fn backing_name_errors_are_qemus() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("bn-err");
    let base = serve_base(&srv);
    let s = base.sock.display();
    let missing = srv.dir.join("nonexist.sock");
    let mut c = srv.client();
    let nbd = json!({"driver": "nbd", "server": {"type": "unix", "path": base.sock},
                     "export": "exp"});
    // (name, backing format, QEMU 10.0.2's message after "Could not open
    // backing file: ", from qemu-io and qemu-storage-daemon)
    let cases: Vec<(String, Option<&str>, String)> = vec![
        (
            "foo:bar".into(),
            Some("raw"),
            "Unknown protocol 'foo'".into(),
        ),
        (
            "Nbd://localhost/exp".into(),
            Some("raw"),
            "Unknown protocol 'Nbd'".into(),
        ),
        (
            "nbd+unix:///exp".into(),
            Some("raw"),
            "No valid URL specified".into(),
        ),
        (
            format!("nbd+unix://h/exp?socket={s}"),
            Some("raw"),
            "No valid URL specified".into(),
        ),
        (
            format!("nbd+unix:///exp?socket={s}&x=1"),
            Some("raw"),
            "No valid URL specified".into(),
        ),
        (
            "nbd://localhost/exp?a=b".into(),
            Some("raw"),
            "No valid URL specified".into(),
        ),
        (
            "nbd://".into(),
            Some("raw"),
            "No valid URL specified".into(),
        ),
        (
            "nbd:localhost".into(),
            Some("raw"),
            "error parsing address 'localhost'".into(),
        ),
        (
            "nbd:".into(),
            Some("raw"),
            "NBD server address missing".into(),
        ),
        (
            format!("nbd+unix:///exp?socket={}", missing.display()),
            Some("raw"),
            format!(
                "Failed to connect to '{}': No such file or directory",
                missing.display()
            ),
        ),
        // The header's format wins over a json: protocol driver: a raw
        // node without a file.
        (
            format!("json:{nbd}"),
            Some("raw"),
            "A block device must be specified for \"file\"".into(),
        ),
        (
            "json:{\"driver\":".into(),
            Some("raw"),
            "Could not parse the JSON options: JSON parse error, premature EOI".into(),
        ),
        (
            "json:[1]".into(),
            Some("raw"),
            "Invalid JSON object given".into(),
        ),
        // Without a backing format in the header (recorded with
        // qemu-storage-daemon's blockdev-add).
        (
            r#"json:{"driver":"nope"}"#.into(),
            None,
            "Unknown driver 'nope'".into(),
        ),
        (
            "json:{}".into(),
            None,
            "Must specify either driver or file".into(),
        ),
        (
            r#"json:{"driver":"nbd"}"#.into(),
            None,
            "NBD server address missing".into(),
        ),
        (
            r#"json:{"driver":"qcow2"}"#.into(),
            None,
            "A block device must be specified for \"file\"".into(),
        ),
    ];
    for (i, (name, format, want)) in cases.iter().enumerate() {
        let node = format!("e{i}");
        let ov = overlay(&srv.dir, &format!("{node}.qcow2"), name, *format);
        let got = desc(add_overlay(&mut c, &node, &ov));
        assert_eq!(
            got,
            format!("Could not open backing file: {want}"),
            "{name}"
        );
    }
    // Nothing was left behind.
    let nodes = c
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    assert_eq!(nodes, json!([]));
}

#[test]
fn a_colon_after_a_slash_is_a_file_name() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("bn-colon");
    let base = srv.dir.join("a:b");
    let b = base.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-q", "-f", "raw", b, "4M"]));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -P 0xcc 2M 1M",
            b,
        ],
    ));
    let mut c = srv.client();
    // Relative to the overlay's directory, and absolute.
    for (i, name) in ["./a:b".to_string(), b.to_string()].iter().enumerate() {
        let node = format!("f{i}");
        let ov = overlay(&srv.dir, &format!("{node}.qcow2"), name, Some("raw"));
        add_overlay(&mut c, &node, &ov).unwrap();
        assert_eq!(chain_drivers(&mut c, &node), ["raw", "file"]);
        check_reads(&mut c, &srv, &node);
        c.execute("blockdev-del", Some(json!({"node-name": node})))
            .unwrap();
    }
}

/// The node-name of the medium in `device`'s tray.
fn medium_node(c: &mut QmpClient, qdev: &str) -> Value {
    let q = c.execute("query-block", None).unwrap();
    q.as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == qdev)
        .unwrap_or_else(|| panic!("no {qdev} in {q}"))["inserted"]
        .clone()
}

#[test]
fn change_medium_to_nbd_names() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("bn-medium");
    let base = serve_base(&srv);
    let s = base.sock.display();
    let mut c = srv.client();
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
    let nbd = json!({"driver": "nbd", "server": {"type": "unix", "path": base.sock},
                     "export": "exp"});
    for (name, format, drv) in [
        (format!("nbd+unix:///exp?socket={s}"), Some("raw"), "raw"),
        (format!("nbd:unix:{s}:exportname=exp"), None, "raw"),
        (format!("json:{nbd}"), None, "nbd"),
    ] {
        let mut args = json!({"id": "cd0", "filename": name});
        if let Some(f) = format {
            args["format"] = f.into();
        }
        c.execute("blockdev-change-medium", Some(args)).unwrap();
        let inserted = medium_node(&mut c, "cd0");
        assert_eq!(inserted["drv"], drv, "{name}: {inserted}");
        let node = inserted["node-name"].as_str().unwrap().to_string();
        qemu_io_reads(
            &mut c,
            &srv,
            &node,
            &["read -P 0xaa 0 1M", "read -P 0xcc 2M 1M"],
        );
    }
    for (name, want) in [
        ("foo:bar".to_string(), "Unknown protocol 'foo'"),
        ("nbd+unix:///exp".to_string(), "No valid URL specified"),
        ("json:[1]".to_string(), "Invalid JSON object given"),
    ] {
        let got = desc(c.execute(
            "blockdev-change-medium",
            Some(json!({"id": "cd0", "filename": name, "format": "raw"})),
        ));
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn drive_mirror_to_an_existing_nbd_target_by_name() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    let srv = Server::start("bn-mirror");
    let base = serve_base(&srv);
    let src = srv.dir.join("src.raw");
    let sp = src.to_str().unwrap();
    ok(&run("qemu-img", &["create", "-q", "-f", "raw", sp, "4M"]));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 2M", sp],
    ));
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "raw", "node-name": "src",
                    "file": {"driver": "file", "filename": src}})),
    )
    .unwrap();
    let target = format!("nbd:unix:{}:exportname=exp", base.sock.display());
    // Creating an image over NBD is not done (QEMU's qemu-img does it).
    let e = desc(c.execute(
        "drive-mirror",
        Some(json!({"job-id": "m", "device": "src", "target": target,
                    "format": "raw", "sync": "full"})),
    ));
    assert!(e.contains("blockd creates images only in files"), "{e}");
    c.execute(
        "drive-mirror",
        Some(json!({"job-id": "m", "device": "src", "target": target,
                    "format": "raw", "sync": "full", "mode": "existing"})),
    )
    .unwrap();
    let pat = |p: Value| blockd_testkit::Pattern::new(p).unwrap();
    let t = std::time::Duration::from_secs(60);
    c.wait_event(&pat(json!({"event": "BLOCK_JOB_READY"})), t)
        .unwrap();
    c.execute("block-job-complete", Some(json!({"device": "m"})))
        .unwrap();
    let done = c
        .wait_event(&pat(json!({"event": "BLOCK_JOB_COMPLETED"})), t)
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    let url = format!("nbd+unix:///exp?socket={}", base.sock.display());
    let out = ok(&run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0x5a 1M 2M",
            &url,
        ],
    ));
    assert!(!out.contains("fail"), "{out}");
}

/// `--drive file=NAME` on the command line takes the same names: an NBD
/// URI and `json:` options (its commas doubled, as QEMU's option parser
/// wants them).
#[test]
fn command_line_drives_named_by_nbd_uri_and_json() {
    if !have_qemu() {
        eprintln!("skipped: qemu tools not installed");
        return;
    }
    // The base is served before the server that opens it starts.
    let host = Server::start("bn-drive-base");
    let base = serve_base(&host);
    let s = base.sock.display().to_string();
    let nbd = json!({"driver": "nbd", "server": {"type": "unix", "path": s}, "export": "exp"});
    let json_name = format!("json:{nbd}").replace(',', ",,");
    let srv = Server::start_with_args(
        "bn-drive",
        &[
            "--drive".into(),
            format!("if=none,id=d0,format=raw,file=nbd+unix:///exp?socket={s}"),
            "--drive".into(),
            format!("if=none,id=d1,file={json_name}"),
        ],
    );
    let mut c = srv.client();
    let blocks = c.execute("query-block", None).unwrap();
    for (dev, drv) in [("d0", "raw"), ("d1", "nbd")] {
        let b = blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == dev)
            .unwrap_or_else(|| panic!("no {dev} in {blocks}"));
        assert_eq!(b["inserted"]["drv"], drv, "{dev}: {b}");
        let node = b["inserted"]["node-name"].as_str().unwrap().to_string();
        qemu_io_reads(
            &mut c,
            &srv,
            &node,
            &["read -P 0xaa 0 1M", "read -P 0 1M 1M", "read -P 0xcc 2M 1M"],
        );
    }
}

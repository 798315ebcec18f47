//! NBD exports through the whole stack (file node → request path → NBD),
//! checked with QEMU 10's own tools: data, block status, conversion,
//! concurrent clients, and image locking between blockd and QEMU.

mod common;
#[path = "common/nbd_load.rs"]
mod nbd_load;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{ok, Server};
use serde_json::json;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

macro_rules! require_qemu {
    () => {
        if !have("qemu-io") || !have("qemu-img") {
            eprintln!("skipped: qemu-io/qemu-img not installed");
            return;
        }
    };
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().expect("run tool")
}

fn url(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// A server with a raw-over-file node `r0` on a new image of `size` bytes,
/// exported as `disk0` (writable) on an NBD socket.
fn exported(prefix: &str, size: &str) -> (Server, std::path::PathBuf, std::path::PathBuf) {
    let srv = Server::start(prefix);
    let img = srv.dir.join("disk.raw");
    let nbd = srv.dir.join("nbd");
    ok(&run(
        "qemu-img",
        &["create", "-f", "raw", img.to_str().unwrap(), size],
    ));
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "raw", "node-name": "r0",
                    "file": {"driver": "file", "node-name": "f0", "filename": img}})),
    )
    .unwrap();
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": nbd}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(
            json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "disk0",
                    "writable": true, "description": "test disk"}),
        ),
    )
    .unwrap();
    (srv, img, nbd)
}

#[test]
fn patterns_holes_and_conversion() {
    require_qemu!();
    let (srv, img, nbd) = exported("bx1", "4M");
    let u = url(&nbd, "disk0");
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 1M 4k",
            "-c",
            "write -z 2M 64k",
            &u,
        ],
    ));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 64k 960k",
            "-c",
            "read -P 0xcd 1M 4k",
            &u,
        ],
    ));
    // Block status: the data written shows as data, the rest as holes.
    let map = ok(&run("qemu-img", &["map", "--output=json", "-f", "raw", &u]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(data.iter().any(|&(s, l)| s == 0 && l >= 65536), "{map}");
    assert!(
        data.iter().all(|&(s, _)| s < 2 << 20),
        "holes reported as data: {map}"
    );
    // The export and the image file hold the same bytes.
    ok(&run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &u,
            img.to_str().unwrap(),
        ],
    ));
    // Convert through the export to a new file, and back into the export.
    let copy = srv.dir.join("copy.raw");
    ok(&run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &u,
            copy.to_str().unwrap(),
        ],
    ));
    ok(&run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            copy.to_str().unwrap(),
            &u,
        ],
    ));
    // qemu-nbd --list sees the export and its description.
    if have("qemu-nbd") {
        let list = ok(&run("qemu-nbd", &["--list", "-k", nbd.to_str().unwrap()]));
        assert!(
            list.contains("disk0") && list.contains("test disk"),
            "{list}"
        );
    }
}

#[test]
fn eight_concurrent_writers_lose_nothing() {
    require_qemu!();
    let (_srv, _img, nbd) = exported("bx2", "8M");
    let u = url(&nbd, "disk0");
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let u = u.clone();
            std::thread::spawn(move || {
                let cmd = format!("write -P {} {}M 1M", 0x10 + i, i);
                run("qemu-io", &["-f", "raw", "-c", &cmd, &u])
            })
        })
        .collect();
    for h in handles {
        ok(&h.join().unwrap());
    }
    for i in 0..8 {
        let cmd = format!("read -P {} {}M 1M", 0x10 + i, i);
        ok(&run("qemu-io", &["-f", "raw", "-r", "-c", &cmd, &u]));
    }
}

#[test]
fn exported_node_is_in_use_until_the_export_is_deleted() {
    require_qemu!();
    let (srv, img, _nbd) = exported("bx3", "1M");
    let img = img.to_str().unwrap().to_string();
    // Like QEMU's exports, a raw export takes "write" but shares
    // everything: qemu-io (which shares writing too) may still write the
    // image, exactly as it may next to qemu-storage-daemon. (Formats that
    // unshare writing, such as qcow2, make qemu-io fail instead.)
    ok(&run("qemu-io", &["-f", "raw", "-c", "write 0 512", &img]));
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    assert!(locks.contains(" 100 101"), "perm lock bytes held: {locks}");
    // The node is in use while exported.
    let mut c = srv.client();
    let r = c
        .command("blockdev-del", Some(json!({"node-name": "r0"})))
        .unwrap();
    assert_eq!(r["error"]["desc"], "Node r0 is in use");
    c.execute("block-export-del", Some(json!({"id": "e0"})))
        .unwrap();
    c.wait_event_with(
        |e| e["event"] == "BLOCK_EXPORT_DELETED",
        Duration::from_secs(10),
    )
    .unwrap();
    c.execute("blockdev-del", Some(json!({"node-name": "r0"})))
        .unwrap();
}

#[test]
fn blockd_respects_a_qemu_image_lock() {
    require_qemu!();
    if !have("qemu-storage-daemon") {
        eprintln!("skipped: qemu-storage-daemon not installed");
        return;
    }
    let srv = Server::start("bx4");
    let img = srv.dir.join("disk.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "1M"],
    ));
    // qemu-storage-daemon holds the image read-write through a qcow2 node,
    // which does not share writing on its file.
    let qsd_sock = srv.dir.join("qsd");
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q,file=f")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=m0",
            qsd_sock.display()
        ))
        .arg("--monitor")
        .arg("chardev=m0")
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !qsd_sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "raw", "node-name": "r0",
                    "file": {"driver": "file", "filename": img}})),
    )
    .unwrap();
    let nbd = srv.dir.join("nbd");
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": nbd}}})),
    )
    .unwrap();
    let r = c
        .command(
            "block-export-add",
            Some(json!({"type": "nbd", "id": "e0", "node-name": "r0", "writable": true})),
        )
        .unwrap();
    let _ = qsd.kill();
    let _ = qsd.wait();
    assert_eq!(r["error"]["desc"], "Failed to get \"write\" lock", "{r}");
    // Nothing was left behind: the export does not exist, the node is free.
    assert_eq!(c.execute("query-block-exports", None).unwrap(), json!([]));
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "r0", "writable": true})),
    )
    .unwrap();
}

#[test]
fn blkdebug_errors_reach_the_nbd_client() {
    require_qemu!();
    let srv = Server::start("bx5");
    let img = srv.dir.join("disk.raw");
    ok(&run(
        "qemu-img",
        &["create", "-f", "raw", img.to_str().unwrap(), "1M"],
    ));
    let mut c = srv.client();
    // Reads of sector 8 fail with EIO, writes of sector 16 with ENOSPC.
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "blkdebug", "node-name": "d0",
                    "inject-error": [{"event": "read_aio", "iotype": "read", "errno": 5, "sector": 8},
                                     {"event": "write_aio", "iotype": "write", "errno": 28, "sector": 16}],
                    "image": {"driver": "file", "filename": img}})),
    )
    .unwrap();
    let nbd = srv.dir.join("nbd");
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": nbd}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "e0", "node-name": "d0", "writable": true})),
    )
    .unwrap();
    let u = url(&nbd, "d0");
    // Holes are answered from block status without a read (as QEMU's
    // server does), so put data where the read will fail.
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 8k",
            "-c",
            "read 0 4k",
            &u,
        ],
    ));
    let o = run("qemu-io", &["-f", "raw", "-c", "read 4096 512", &u]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Input/output error"), "{out}");
    let o = run("qemu-io", &["-f", "raw", "-c", "write 8192 512", &u]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("No space left on device"), "{out}");
    ok(&run("qemu-io", &["-f", "raw", "-c", "write 65536 512", &u]));
}

/// `block-export-del` right after a client hung up (with `NBD_CMD_DISC`
/// or without) finds the export unused, as in QEMU, where the main loop
/// handles the hang-up before a later QMP command; a client still
/// connected (or with requests in flight) makes it fail with QEMU's
/// "export 'ID' still in use".
#[test]
fn export_del_right_after_a_client_hung_up() {
    let srv = Server::start("exp-del-hangup");
    let sock = srv.dir.join("nbd");
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(json!({"driver": "null-co", "node-name": "n0", "size": 1 << 20})),
    )
    .unwrap();
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": sock}}})),
    )
    .unwrap();
    let add = json!({"type": "nbd", "id": "e", "node-name": "n0", "name": "x"});
    for i in 0..40 {
        c.execute("block-export-add", Some(add.clone())).unwrap();
        let conn = nbd_load::Conn::connect(&sock, "x").expect("NBD connection");
        if i % 2 == 0 {
            conn.disconnect();
        } else {
            drop(conn);
        }
        c.execute("block-export-del", Some(json!({"id": "e"})))
            .unwrap_or_else(|e| panic!("round {i}: {e}"));
        c.wait_event(
            &blockd_testkit::Pattern::new(json!({"event": "BLOCK_EXPORT_DELETED"})).unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
    }
    // a client that stays connected keeps the export in use
    c.execute("block-export-add", Some(add)).unwrap();
    let conn = nbd_load::Conn::connect(&sock, "x").expect("NBD connection");
    match c.execute("block-export-del", Some(json!({"id": "e"}))) {
        Err(blockd_testkit::ClientError::Qmp { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "export 'e' still in use");
        }
        other => panic!("block-export-del with a client: {other:?}"),
    }
    conn.disconnect();
    c.execute("block-export-del", Some(json!({"id": "e"})))
        .unwrap();
}

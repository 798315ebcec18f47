//! Live graph changes under real NBD clients (`qemu-img bench` writing at
//! queue depth 16), with the server in this process so the tests can open
//! drained sections and replace nodes directly:
//!
//! * a drained section over the bottom of a tree lets no request into any
//!   node of it until it ends, and every request completes afterwards;
//! * `replace_node` moves an export from one node to another holding the
//!   same data while the client writes; the client sees no error and the
//!   writes after the switch land in the new node only.
//!
//! The data is checked afterwards with `qemu-io read -P` over the whole
//! image. Skipped (with a message) without QEMU's tools.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd::{Server, StartOptions};
use blockd_core::BlockNode;
use common::have;
use serde_json::{json, Value};

const SIZE: u64 = 32 << 20;

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = PathBuf::from(format!("/tmp/lg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(dir: &Scratch) -> Server {
    let server = Server::start_opts(&[dir.path("qmp")], &StartOptions::default())
        .await
        .expect("start");
    exec(
        &server,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": dir.path("nbd").to_str().unwrap()}}}),
    )
    .await;
    server
}

async fn exec(s: &Server, name: &str, args: Value) -> Value {
    s.qmp
        .execute(name, args.clone())
        .await
        .unwrap_or_else(|e| panic!("{name} {args}: {}", e.desc))
}

fn node(s: &Server, name: &str) -> Arc<BlockNode> {
    s.state.graph.get(name).expect("node")
}

fn writes(n: &BlockNode) -> u64 {
    n.stats.wr_operations.load(Ordering::SeqCst)
}

/// `qemu-img bench` writing `pattern` over the whole export twice, 4 KiB
/// requests at queue depth 16.
fn bench(dir: &Scratch, export: &str, pattern: u8) -> Child {
    let url = format!("nbd+unix:///{export}?socket={}", dir.path("nbd").display());
    Command::new("qemu-img")
        .args(["bench", "-w", "-f", "raw", "-d", "16", "-s", "4096"])
        .arg("-c")
        .arg((2 * SIZE / 4096).to_string())
        .arg(format!("--pattern={pattern}"))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-img bench")
}

async fn wait_bench(mut b: Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = b.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = b.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            assert!(st.success(), "qemu-img bench failed: {err}");
            return;
        }
        assert!(Instant::now() < deadline, "qemu-img bench hung");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `n` has seen `more` writes beyond `from`.
async fn writes_flow(n: &BlockNode, from: u64, more: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while writes(n) < from + more {
        assert!(Instant::now() < deadline, "no writes reach {}", n.name());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn check_pattern(img: &Path, pattern: u8) {
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c"])
        .arg(format!("read -P {pattern} 0 {SIZE}"))
        .arg(img)
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "pattern check of {}: {text}",
        img.display()
    );
}

fn make_image(p: &Path) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(SIZE).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_section_lets_no_request_in_until_it_ends() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("drain");
    let img = dir.path("a.img");
    make_image(&img);
    let s = start(&dir).await;
    exec(
        &s,
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": img.to_str().unwrap()}),
    )
    .await;
    exec(
        &s,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": "f"}),
    )
    .await;
    exec(
        &s,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "top", "file": "r"}),
    )
    .await;
    exec(
        &s,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "top", "writable": true}),
    )
    .await;
    let (f, r, top) = (node(&s, "f"), node(&s, "r"), node(&s, "top"));
    let b = bench(&dir, "top", 0x5a);
    writes_flow(&f, 0, 200).await;

    for round in 0..3 {
        let section = s.state.graph.drained_begin(std::slice::from_ref(&f)).await;
        let root = section.roots().first().expect("the export's root").clone();
        assert_eq!(root.gate().in_flight(), 0, "round {round}: all finished");
        let before = (writes(&f), writes(&r), writes(&top));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            (writes(&f), writes(&r), writes(&top)),
            before,
            "round {round}: a request entered the drained subtree"
        );
        assert!(
            root.gate().waiting() > 0,
            "round {round}: the client's requests wait at the gate"
        );
        drop(section);
        writes_flow(&f, before.0, 200).await;
    }
    wait_bench(b).await;
    exec(&s, "block-export-del", json!({"id": "e"})).await;
    s.shutdown(blockd_qmp::ShutdownCause::HostQmpQuit).await;
    check_pattern(&img, 0x5a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_node_moves_an_export_under_its_writer() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("replace");
    let (a_img, b_img) = (dir.path("a.img"), dir.path("b.img"));
    make_image(&a_img);
    let s = start(&dir).await;
    exec(
        &s,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "a", "file": {"driver": "file", "node-name": "af", "filename": a_img.to_str().unwrap()}}),
    )
    .await;
    exec(
        &s,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "a", "name": "disk", "writable": true}),
    )
    .await;
    let (a, af) = (node(&s, "a"), node(&s, "af"));
    let b = bench(&dir, "disk", 0x33);
    writes_flow(&a, 0, 2000).await;

    // While nothing moves, copy the image and open the copy as `b`: both
    // hold the same data. Then replace `a` by `b` under the export.
    let outer = s.state.graph.drained_begin(std::slice::from_ref(&a)).await;
    std::fs::copy(&a_img, &b_img).unwrap();
    exec(
        &s,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "b", "file": {"driver": "file", "node-name": "bf", "filename": b_img.to_str().unwrap()}}),
    )
    .await;
    let (bn, bf) = (node(&s, "b"), node(&s, "bf"));
    {
        let g = s.state.control.lock().await;
        s.state.graph.replace_node(&g, &a, &bn).await.unwrap();
    }
    drop(outer);
    let a_frozen = writes(&af);
    writes_flow(&bf, 0, 2000).await;
    wait_bench(b).await;
    assert_eq!(writes(&af), a_frozen, "no write reached the old node");
    assert!(writes(&bf) > 0);
    let q = exec(&s, "query-block-exports", json!({})).await;
    assert_eq!(q[0]["node-name"], "b", "{q}");
    // The old node is free again.
    exec(&s, "blockdev-del", json!({"node-name": "a"})).await;
    exec(&s, "block-export-del", json!({"id": "e"})).await;
    s.shutdown(blockd_qmp::ShutdownCause::HostQmpQuit).await;
    // Every write after the switch is in the copy: the bench wrote the
    // whole image twice, so all of it carries the pattern.
    check_pattern(&b_img, 0x33);
}

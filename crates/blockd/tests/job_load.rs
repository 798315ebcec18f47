//! Block jobs under client load: no byte a client wrote may get lost.
//!
//! Each test builds a qcow2 chain with data in every layer (`qemu-io`),
//! exports its active layer over NBD (writable), and runs the load of
//! `common/nbd_load.rs`: 4 NBD connections with 16 requests in flight
//! each (writes of 4 KiB to 256 KiB, write-zeroes, reads, flushes), whose
//! in-flight ranges never overlap, so that the expected content is
//! defined: the reference image, updated in the order the requests are
//! sent. Reads are checked against it while the job runs. The job runs
//! under that load from start to end, and the load goes on for a while
//! after the job changed the graph. Then the export's content must equal
//! the reference (read back over NBD), and, after the nodes are closed,
//! `qemu-img compare` of the raw reference against the resulting image
//! (chain) must succeed and `qemu-img check` must find every image clean.
//!
//! The scenarios follow QEMU's iotests for the jobs (`block/mirror.c`,
//! `block/commit.c`, `block/stream.c`): active commit completed (iotest
//! 040's `TestActiveZeroLengthImage` family, with I/O as in
//! `graph-changes-while-io`) and cancelled when ready (iotest 040
//! `test_cancel_ready`), mirror in background and write-blocking mode
//! (iotest 151, `mirror-ready-cancel-error`), stream of a three-layer
//! chain (iotest 030) and intermediate commit (iotest 040).
//!
//! The nodes are opened with `discard=unmap`, so trims reach the images
//! (where no job filter is in between: QEMU's job filters do not pass
//! discards on), and the layers have unallocated areas and zero clusters.
//! While a job runs, a second QMP connection polls `query-jobs`: the
//! job's `current-progress` never goes down, and it ends equal to the
//! total (`BLOCK_JOB_COMPLETED`'s `offset` equals its `len`, as iotests'
//! `wait_until_completed` checks).
//!
//! Every test runs one round by default (a few seconds); with
//! `BLOCKD_SOAK=1`, rounds (fresh server, images and seed each) repeat for
//! 60 seconds per test with longer load phases; `BLOCKD_JOB_LOAD_SECS`
//! sets the seconds per test.

mod common;
#[path = "common/nbd_load.rs"]
mod nbd_load;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockd_testkit::QmpClient;
use common::{have, Server};
use nbd_load::{Conn, Load, LoadConfig, Reference};
use serde_json::{json, Value};

const SIZE: u64 = 64 << 20;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a layer's preparation writes: a pattern byte, or zeroes
/// (`write -z`, a zero cluster where aligned).
#[derive(Clone, Copy)]
enum Fill {
    Pat(u8),
    Zero,
}

/// A qcow2 image of a chain: its node name, its backing node and what
/// `qemu-io` writes into it before the test.
struct Layer {
    node: &'static str,
    backing: Option<&'static str>,
    read_only: bool,
    ops: Vec<(u64, u64, Fill)>,
}

/// A chain being tested: the server, a QMP connection, the directory.
struct Chain {
    srv: Server,
    c: QmpClient,
    dir: PathBuf,
    /// The content of the chain as prepared.
    initial: Vec<u8>,
}

fn tools() -> bool {
    have("qemu-img") && have("qemu-io")
}

fn run(c: &mut QmpClient, name: &str, args: Value) -> Value {
    c.execute(name, Some(args.clone()))
        .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
}

impl Chain {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    fn img(node: &str) -> String {
        format!("{node}.qcow2")
    }

    /// Creates the images bottom-up, fills them, opens them bottom-up
    /// and exports the last one (writable) as `NBD export "e"`.
    fn new(prefix: &str, layers: &[Layer]) -> Chain {
        let srv = Server::start(prefix);
        let dir = srv.dir.clone();
        let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
        let mut initial = vec![0u8; SIZE as usize];
        for l in layers {
            let img = p(&Self::img(l.node));
            match l.backing {
                None => sh(&format!("qemu-img create -q -f qcow2 {img} {SIZE}")),
                Some(b) => sh(&format!(
                    "qemu-img create -q -f qcow2 -b {} -F qcow2 {img} {SIZE}",
                    Self::img(b)
                )),
            };
            let mut cmds = Vec::new();
            for &(off, len, fill) in &l.ops {
                let r = off as usize..(off + len) as usize;
                match fill {
                    Fill::Pat(b) => {
                        cmds.push(format!("-c 'write -P {b:#x} {off} {len}'"));
                        initial[r].fill(b);
                    }
                    Fill::Zero => {
                        cmds.push(format!("-c 'write -z {off} {len}'"));
                        initial[r].fill(0);
                    }
                }
            }
            if !cmds.is_empty() {
                let out = sh(&format!("qemu-io -f qcow2 {} {img} 2>&1", cmds.join(" ")));
                assert!(!out.contains("error") && !out.contains("failed"), "{out}");
            }
        }
        let mut c = srv.client();
        for l in layers {
            run(
                &mut c,
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": l.node, "read-only": l.read_only,
                       "discard": "unmap",
                       "file": {"driver": "file", "node-name": format!("{}-f", l.node),
                                "filename": p(&Self::img(l.node)), "discard": "unmap"},
                       "backing": l.backing}),
            );
        }
        let top = layers.last().unwrap().node;
        run(
            &mut c,
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p("nbd")}}}),
        );
        run(
            &mut c,
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": top, "name": "e", "writable": true}),
        );
        Chain {
            srv,
            c,
            dir,
            initial,
        }
    }

    fn nbd(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    fn load(&self, seed: u64) -> Load {
        Load::start(LoadConfig::new(self.nbd(), "e", seed), self.initial.clone())
    }

    /// Waits for `event` of job `id`; panics on a BLOCK_JOB_COMPLETED with
    /// an error, or on a timeout.
    fn wait_job_event(&mut self, id: &str, event: &str, load: Option<&Load>) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let r = self.c.wait_event_with(
                |e| {
                    let ev = e["event"].as_str().unwrap_or("");
                    let dev = e["data"]["device"].as_str().unwrap_or("");
                    dev == id
                        && (ev == event
                            || ev == "BLOCK_JOB_COMPLETED"
                            || ev == "BLOCK_JOB_CANCELLED")
                },
                Duration::from_millis(200),
            );
            if let Some(l) = load {
                l.check(&format!("waiting for {event}"));
            }
            match r {
                Ok(e) => {
                    assert!(
                        e["data"].get("error").is_none(),
                        "job {id} failed: {e}; log:\n{}",
                        self.srv.log()
                    );
                    assert_eq!(e["event"], event, "job {id}: {e}");
                    return e;
                }
                Err(blockd_testkit::ClientError::Timeout(_)) => {
                    self.srv.assert_alive(&format!("waiting for {event}"));
                    assert!(
                        Instant::now() < deadline,
                        "no {event} for job {id}; query-jobs: {}",
                        run(&mut self.c, "query-jobs", json!({}))
                    );
                }
                Err(e) => panic!("waiting for {event}: {e}"),
            }
        }
    }

    /// The node the export `e` serves now.
    fn export_node(&mut self) -> String {
        let r = run(&mut self.c, "query-block-exports", json!({}));
        r[0]["node-name"].as_str().unwrap_or_default().to_string()
    }

    /// The backing node of `node` as `query-named-block-nodes` shows it
    /// (its `backing_file` name), and the header's backing file.
    fn backing_file(&mut self, node: &str) -> Option<String> {
        let r = run(
            &mut self.c,
            "query-named-block-nodes",
            json!({"flat": true}),
        );
        let n = r
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        n["backing_file"].as_str().map(str::to_string)
    }

    /// Compares the export's content with `reference` (trimmed sectors
    /// as before or zeroes), which then takes the content of the trimmed
    /// sectors.
    fn check_export(&self, reference: &mut Reference, what: &str) {
        let mut conn = Conn::connect(&self.nbd(), "e").expect("NBD connection");
        let got = conn.read_all().expect("read the export");
        conn.disconnect();
        let trimmed = reference.trimmed_sectors();
        let zeroed = reference
            .adopt(&got)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        eprintln!("{what}: as the reference ({trimmed} sectors trimmed, {zeroed} of them zeroed)");
        assert_same(&got, &reference.img, what);
    }

    /// Polls `query-jobs` on a connection of its own while job `id` runs.
    fn watch_progress(&self, id: &str) -> Progress {
        let mut c = self.srv.client();
        let stop = Arc::new(AtomicBool::new(false));
        let (id, st) = (id.to_string(), stop.clone());
        let t = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !st.load(Ordering::SeqCst) {
                let r = match c.execute("query-jobs", None) {
                    Ok(r) => r,
                    Err(e) => panic!("query-jobs: {e}"),
                };
                if let Some(j) = r
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|j| j["id"] == id.as_str())
                {
                    samples.push((
                        j["current-progress"].as_u64().unwrap(),
                        j["total-progress"].as_u64().unwrap(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        });
        Progress { stop, t }
    }

    /// Removes the export and the nodes (top first), then checks the
    /// images: `qemu-img compare` of the reference with `image` (with its
    /// backing chain, as its header says) and `qemu-img check` of all.
    fn close_and_check(mut self, nodes: &[&str], reference: &[u8], image: &str) {
        run(&mut self.c, "block-export-del", json!({"id": "e"}));
        for n in nodes {
            let t = Instant::now();
            loop {
                match self
                    .c
                    .execute("blockdev-del", Some(json!({"node-name": n})))
                {
                    Ok(_) => break,
                    Err(e) if t.elapsed() < Duration::from_secs(10) => {
                        eprintln!("blockdev-del {n}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("blockdev-del {n}: {e}"),
                }
            }
        }
        common::alive_check(&mut self.c, &mut self.srv, "after the job");
        let refpath = self.path("ref.raw");
        std::fs::write(&refpath, reference).unwrap();
        sh(&format!(
            "qemu-img compare -f raw -F qcow2 {refpath} {}",
            self.path(&Self::img(image))
        ));
        for n in nodes {
            sh(&format!("qemu-img check -q {}", self.path(&Self::img(n))));
        }
    }
}

/// A `query-jobs` poller (see [`Chain::watch_progress`]).
struct Progress {
    stop: Arc<AtomicBool>,
    t: JoinHandle<Vec<(u64, u64)>>,
}

impl Progress {
    /// Stops polling; checks that `current-progress` never went down and
    /// that the completion event's `offset` equals its `len`.
    fn check(self, completed: &Value) {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.t.join().expect("the query-jobs poller panicked");
        assert!(!samples.is_empty(), "query-jobs never showed the job");
        for w in samples.windows(2) {
            assert!(
                w[1].0 >= w[0].0,
                "current-progress went down: {:?} then {:?}",
                w[0],
                w[1]
            );
        }
        let d = &completed["data"];
        assert_eq!(d["offset"], d["len"], "progress at the end: {completed}");
        let last = samples.last().unwrap().0;
        assert!(
            d["offset"].as_u64().unwrap() >= last,
            "the end's offset is below what query-jobs showed ({last}): {completed}"
        );
        eprintln!(
            "progress: {} samples, monotonic, end {}",
            samples.len(),
            d["offset"]
        );
    }
}

/// Panics with where `got` and `want` differ.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if got == want {
        return;
    }
    let mut bad = Vec::new();
    for (i, (a, b)) in got.chunks(65536).zip(want.chunks(65536)).enumerate() {
        if a != b {
            let j = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
            bad.push(format!(
                "{:#x}: got {:02x?} want {:02x?}",
                i * 65536 + j,
                &a[j..(j + 4).min(a.len())],
                &b[j..(j + 4).min(b.len())]
            ));
        }
    }
    panic!(
        "{what}: {} of {} 64 KiB clusters differ from the reference: {:?}",
        bad.len(),
        want.len() / 65536,
        &bad[..bad.len().min(10)]
    );
}

fn soak() -> bool {
    std::env::var_os("BLOCKD_SOAK").is_some_and(|v| v != "0" && !v.is_empty())
}

/// Rounds for this test: 1, or as many as fit in `BLOCKD_JOB_LOAD_SECS`
/// (60 with `BLOCKD_SOAK`).
fn rounds(mut one: impl FnMut(u64)) {
    let secs: u64 = std::env::var("BLOCKD_JOB_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if soak() { 60 } else { 0 });
    let t = Instant::now();
    let mut round = 0;
    loop {
        let seed = 0x5eed + round;
        eprintln!("round {round} (seed {seed:#x})");
        one(seed);
        round += 1;
        if t.elapsed() >= Duration::from_secs(secs) {
            break;
        }
    }
    eprintln!("{round} rounds in {:.1} s", t.elapsed().as_secs_f64());
}

/// Sleeps `ms` (five times that with `BLOCKD_SOAK`): a load phase.
fn sleep_ms(ms: u64) {
    let ms = if soak() { ms * 5 } else { ms };
    std::thread::sleep(Duration::from_millis(ms));
}

/// base ← top, both with data (some of it not cluster-aligned) and zero
/// clusters; top's zeroes hide data of base.
fn two_layers() -> Vec<Layer> {
    vec![
        Layer {
            node: "base",
            backing: None,
            read_only: true,
            ops: vec![
                (0, 16 * MIB, Fill::Pat(0x11)),
                (32 * MIB, 8 * MIB, Fill::Pat(0x22)),
                (48 * MIB, 4 * MIB, Fill::Zero),
                (56 * MIB + 4 * KIB, 2 * MIB + 12 * KIB, Fill::Pat(0x23)),
            ],
        },
        Layer {
            node: "top",
            backing: Some("base"),
            read_only: false,
            ops: vec![
                (8 * MIB + 4 * KIB, 16 * MIB, Fill::Pat(0x33)),
                (36 * MIB, 2 * MIB, Fill::Zero),
                (57 * MIB, 64 * KIB, Fill::Zero),
                (60 * MIB, 4 * MIB, Fill::Pat(0x44)),
            ],
        },
    ]
}

/// base ← mid ← top, data in all three.
fn three_layers() -> Vec<Layer> {
    let mut l = two_layers();
    l[1].node = "mid";
    l[1].read_only = true;
    l.push(Layer {
        node: "top",
        backing: Some("mid"),
        read_only: false,
        ops: vec![
            (4 * MIB, 2 * MIB, Fill::Pat(0x55)),
            (20 * MIB + 512, 3 * MIB, Fill::Pat(0x66)),
            (33 * MIB, MIB, Fill::Zero),
            (62 * MIB, 64 * KIB, Fill::Zero),
        ],
    });
    l
}

/// Active commit of `top` into `base` under load, completed (pivot: the
/// export then writes to base) or cancelled when ready (the chain stays).
fn active_commit(seed: u64, complete: bool) {
    let mut ch = Chain::new("jl-ac", &two_layers());
    let load = ch.load(seed);
    sleep_ms(300);
    run(
        &mut ch.c,
        "block-commit",
        json!({"job-id": "j", "device": "top"}),
    );
    let progress = ch.watch_progress("j");
    load.pulse(true);
    ch.wait_job_event("j", "BLOCK_JOB_READY", Some(&load));
    load.pulse(false);
    sleep_ms(300);
    if complete {
        run(&mut ch.c, "block-job-complete", json!({"device": "j"}));
    } else {
        run(&mut ch.c, "block-job-cancel", json!({"device": "j"}));
    }
    let done = ch.wait_job_event("j", "BLOCK_JOB_COMPLETED", Some(&load));
    progress.check(&done);
    let node = ch.export_node();
    assert_eq!(node, if complete { "base" } else { "top" });
    // The export now writes to base (complete) or still to top (cancel).
    sleep_ms(500);
    let (mut reference, stats) = load.stop();
    eprintln!("load: {stats}");
    ch.check_export(&mut reference, "the export after the job");
    if complete {
        ch.close_and_check(&["top", "base"], &reference.img, "base");
    } else {
        ch.close_and_check(&["top", "base"], &reference.img, "top");
    }
}

#[test]
fn active_commit_completed_under_load() {
    if tools() {
        rounds(|s| active_commit(s, true));
    }
}

#[test]
fn active_commit_cancelled_when_ready_under_load() {
    if tools() {
        rounds(|s| active_commit(s, false));
    }
}

/// `blockdev-mirror` (sync full) of the exported `top` (over `base`) to a
/// fresh qcow2 image under load, completed: the export then writes to
/// the target, which holds everything without a backing file.
fn mirror(seed: u64, copy_mode: &str) {
    let mut ch = Chain::new("jl-mi", &two_layers());
    let tgt = ch.path("tgt.qcow2");
    sh(&format!("qemu-img create -q -f qcow2 {tgt} {SIZE}"));
    run(
        &mut ch.c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt", "backing": null, "discard": "unmap",
               "file": {"driver": "file", "node-name": "tgt-f", "filename": tgt,
                        "discard": "unmap"}}),
    );
    let load = ch.load(seed);
    sleep_ms(300);
    run(
        &mut ch.c,
        "blockdev-mirror",
        json!({"job-id": "j", "device": "top", "target": "tgt", "sync": "full",
               "copy-mode": copy_mode}),
    );
    let progress = ch.watch_progress("j");
    load.pulse(copy_mode == "background");
    ch.wait_job_event("j", "BLOCK_JOB_READY", Some(&load));
    load.pulse(false);
    sleep_ms(300);
    run(&mut ch.c, "block-job-complete", json!({"device": "j"}));
    let done = ch.wait_job_event("j", "BLOCK_JOB_COMPLETED", Some(&load));
    progress.check(&done);
    assert_eq!(ch.export_node(), "tgt");
    sleep_ms(500);
    let (mut reference, stats) = load.stop();
    eprintln!("load: {stats}");
    ch.check_export(&mut reference, "the export after the mirror");
    ch.close_and_check(&["tgt", "top", "base"], &reference.img, "tgt");
}

#[test]
fn mirror_background_under_load() {
    if tools() {
        rounds(|s| mirror(s, "background"));
    }
}

#[test]
fn mirror_write_blocking_under_load() {
    if tools() {
        rounds(|s| mirror(s, "write-blocking"));
    }
}

/// `block-stream` of base ← mid ← top into the exported top under load
/// (rate-limited so that it lasts about a second): afterwards top has no
/// backing file (graph and header) and holds everything.
fn stream(seed: u64) {
    let mut ch = Chain::new("jl-st", &three_layers());
    let load = ch.load(seed);
    sleep_ms(300);
    run(
        &mut ch.c,
        "block-stream",
        json!({"job-id": "j", "device": "top", "speed": 48 * MIB}),
    );
    let progress = ch.watch_progress("j");
    let done = ch.wait_job_event("j", "BLOCK_JOB_COMPLETED", Some(&load));
    progress.check(&done);
    assert_eq!(ch.backing_file("top"), None);
    sleep_ms(500);
    let (mut reference, stats) = load.stop();
    eprintln!("load: {stats}");
    ch.check_export(&mut reference, "the export after the stream");
    let info = sh(&format!(
        "qemu-img info -U --output=json {}",
        ch.path("top.qcow2")
    ));
    assert!(
        !info.contains("backing-filename"),
        "top still has a backing file: {info}"
    );
    ch.close_and_check(&["top", "mid", "base"], &reference.img, "top");
}

#[test]
fn stream_under_load() {
    if tools() {
        rounds(stream);
    }
}

/// Intermediate commit of mid into base while top is exported and
/// written (rate-limited to last about a second): afterwards top's
/// backing is base (graph and header) and the content is right.
fn intermediate_commit(seed: u64) {
    let mut ch = Chain::new("jl-ic", &three_layers());
    let load = ch.load(seed);
    sleep_ms(300);
    run(
        &mut ch.c,
        "block-commit",
        json!({"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base",
               "speed": 32 * MIB}),
    );
    let progress = ch.watch_progress("j");
    let done = ch.wait_job_event("j", "BLOCK_JOB_COMPLETED", Some(&load));
    progress.check(&done);
    let base = ch.path("base.qcow2");
    assert_eq!(ch.backing_file("top").as_deref(), Some(base.as_str()));
    sleep_ms(500);
    let (mut reference, stats) = load.stop();
    eprintln!("load: {stats}");
    ch.check_export(&mut reference, "the export after the commit");
    let info = sh(&format!(
        "qemu-img info -U --output=json {}",
        ch.path("top.qcow2")
    ));
    assert!(
        info.contains(&format!("\"backing-filename\": \"{base}\"")),
        "{info}"
    );
    ch.close_and_check(&["top", "mid", "base"], &reference.img, "top");
}

#[test]
fn intermediate_commit_under_load() {
    if tools() {
        rounds(intermediate_commit);
    }
}

//! In-process I/O benchmark: 4 KiB random reads/writes and 1 MiB sequential
//! reads/writes through a `file` node and a `raw`-over-`file` node, against
//! direct `pread`/`pwrite` on the same file. No server, no NBD.
//!
//!     cargo bench -p blockd --bench node_io [-- --size-mib 256 --ops 20000 --runs 5 --only read]
//!
//! Every figure is the median of `--runs`; the image is written once
//! first so reads come from the page cache for both (the point is the
//! overhead of the block layer, not of the disk).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use blockd_core::{BlockGraph, BlockNode, ReqFlags};
use blockd_drivers::{blockdev_add, Env};
use bytes::Bytes;
use serde_json::json;

struct Args {
    size_mib: u64,
    ops: u64,
    runs: usize,
    /// Run only tests whose name contains this (e.g. `4 KiB random read`).
    only: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        size_mib: 256,
        ops: 20000,
        runs: 5,
        only: None,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = || v.get(i + 1).and_then(|s| s.parse().ok());
        match v[i].as_str() {
            "--size-mib" => a.size_mib = next().unwrap_or(a.size_mib),
            "--ops" => a.ops = next().unwrap_or(a.ops),
            "--runs" => a.runs = next().map(|n: u64| n as usize).unwrap_or(a.runs),
            "--only" => a.only = v.get(i + 1).cloned(),
            _ => {}
        }
        i += 1;
    }
    a
}

/// Scattered 4 KiB offsets (a fixed stride, as the shared harness uses).
fn offset(i: u64, size: u64) -> u64 {
    (i * 7919 * 4096) % (size - 4096)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Clone, Copy)]
enum Test {
    Read4k,
    Write4k,
    Read1m,
    Write1m,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Read4k => "4 KiB random read",
            Test::Write4k => "4 KiB random write",
            Test::Read1m => "1 MiB sequential read",
            Test::Write1m => "1 MiB sequential write",
        }
    }

    /// (request size, count) for a run.
    fn shape(self, ops: u64, size: u64) -> (usize, u64) {
        match self {
            Test::Read4k | Test::Write4k => (4096, ops),
            Test::Read1m | Test::Write1m => (1 << 20, (size / (1 << 20)).min(ops / 20).max(16)),
        }
    }
}

fn direct(f: &std::fs::File, t: Test, ops: u64, size: u64) -> f64 {
    let (len, n) = t.shape(ops, size);
    let mut buf = vec![0x5au8; len];
    let start = Instant::now();
    for i in 0..n {
        let off = match t {
            Test::Read4k | Test::Write4k => offset(i, size),
            _ => (i * len as u64) % size,
        };
        match t {
            Test::Read4k | Test::Read1m => f.read_exact_at(&mut buf, off).unwrap(),
            _ => f.write_all_at(&buf, off).unwrap(),
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn through(node: &Arc<BlockNode>, t: Test, ops: u64, size: u64) -> f64 {
    let (len, n) = t.shape(ops, size);
    let data = Bytes::from(vec![0x5au8; len]);
    let start = Instant::now();
    for i in 0..n {
        let off = match t {
            Test::Read4k | Test::Write4k => offset(i, size),
            _ => (i * len as u64) % size,
        };
        match t {
            Test::Read4k | Test::Read1m => {
                let b = node.read(off, len).await.unwrap();
                std::hint::black_box(b);
            }
            _ => node
                .write(off, data.clone(), ReqFlags::default())
                .await
                .unwrap(),
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The same requests, 16 in flight at a time (what an NBD client at queue
/// depth 16 asks of the node).
async fn through_qd(node: &Arc<BlockNode>, t: Test, ops: u64, size: u64, depth: u64) -> f64 {
    let (len, n) = t.shape(ops, size);
    let data = Bytes::from(vec![0x5au8; len]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for q in 0..depth {
        let node = node.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = q;
            while i < n {
                let off = match t {
                    Test::Read4k | Test::Write4k => offset(i, size),
                    _ => (i * len as u64) % size,
                };
                match t {
                    Test::Read4k | Test::Read1m => {
                        std::hint::black_box(node.read(off, len).await.unwrap());
                    }
                    _ => node
                        .write(off, data.clone(), ReqFlags::default())
                        .await
                        .unwrap(),
                }
                i += depth;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let a = args();
    let size = a.size_mib << 20;
    let dir = std::env::temp_dir().join(format!("blockd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    // Fill the image so reads come from the page cache, not holes.
    let chunk = vec![0x11u8; 1 << 20];
    for i in 0..a.size_mib {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let graph = BlockGraph::new();
    let env = Env::default();
    let (file_node, raw_node) = rt.block_on(async {
        let file = blockdev_add(
            &graph,
            &env,
            serde_json::from_value(json!({"driver": "file", "node-name": "f0", "filename": path}))
                .unwrap(),
        )
        .await
        .unwrap();
        let raw = blockdev_add(
            &graph,
            &env,
            serde_json::from_value(json!({"driver": "raw", "node-name": "r0", "file": "f0"}))
                .unwrap(),
        )
        .await
        .unwrap();
        (file, raw)
    });
    println!(
        "{:<24} {:>10} {:>10} {:>7} {:>10} {:>7} {:>12} {:>7}",
        "test (ops/s, median)", "direct", "file", "ratio", "raw/file", "ratio", "raw QD16", "ratio"
    );
    for t in [Test::Read4k, Test::Write4k, Test::Read1m, Test::Write1m] {
        if a.only.as_deref().is_some_and(|o| !t.name().contains(o)) {
            continue;
        }
        let mut d = Vec::new();
        let mut fnode = Vec::new();
        let mut rnode = Vec::new();
        let mut rqd = Vec::new();
        for _ in 0..a.runs {
            d.push(direct(&f, t, a.ops, size));
            fnode.push(rt.block_on(through(&file_node, t, a.ops, size)));
            rnode.push(rt.block_on(through(&raw_node, t, a.ops, size)));
            rqd.push(rt.block_on(through_qd(&raw_node, t, a.ops, size, 16)));
        }
        let (d, fn_, rn, rq) = (median(d), median(fnode), median(rnode), median(rqd));
        println!(
            "{:<24} {:>10.0} {:>10.0} {:>6.2}x {:>10.0} {:>6.2}x {:>12.0} {:>6.2}x",
            t.name(),
            d,
            fn_,
            fn_ / d,
            rn,
            rn / d,
            rq,
            rq / d
        );
    }
    if a.only
        .as_deref()
        .is_none_or(|o| Test::Read4k.name().contains(o))
    {
        read_floor(&f, a.ops, size, a.runs);
    }
    layer_cost(&rt, &graph, &env, a.ops * 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The syscall the `file` driver must use for a read on the event loop:
/// `preadv2(RWF_NOWAIT)` (which fails rather than wait for the disk) into
/// a buffer it hands on, against plain `pread` into one reused buffer.
fn read_floor(f: &std::fs::File, ops: u64, size: u64, runs: usize) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let run = |nowait: bool| {
        let mut v = Vec::new();
        let mut reused = vec![0u8; 4096];
        for _ in 0..runs {
            let start = Instant::now();
            for i in 0..ops {
                let off = offset(i, size) as i64;
                if nowait {
                    let mut b: Vec<u8> = Vec::with_capacity(4096);
                    let iov = libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: 4096,
                    };
                    // SAFETY: `iov` describes `b`'s capacity, live during the call.
                    let r = unsafe { libc::preadv2(fd, &iov, 1, off, libc::RWF_NOWAIT) };
                    assert_eq!(r, 4096);
                    // SAFETY: the kernel initialised all 4096 bytes.
                    unsafe { b.set_len(4096) };
                    std::hint::black_box(b);
                } else {
                    // SAFETY: `reused` is 4096 writable bytes.
                    let r = unsafe { libc::pread(fd, reused.as_mut_ptr().cast(), 4096, off) };
                    assert_eq!(r, 4096);
                }
            }
            v.push(ops as f64 / start.elapsed().as_secs_f64());
        }
        median(v)
    };
    let (plain, nowait) = (run(false), run(true));
    println!(
        "floor (4 KiB read): pread {plain:.0} ops/s, preadv2(RWF_NOWAIT) into a new buffer {nowait:.0} ops/s ({:.2}x)",
        nowait / plain
    );
}

/// What one layer costs by itself: 4 KiB writes (which `null-co` drops
/// without touching the data) into a `null-co` node, and into a `raw`
/// node over it; the difference is one node's request path.
fn layer_cost(rt: &tokio::runtime::Runtime, graph: &BlockGraph, env: &Env, n: u64) {
    let (null, raw) = rt.block_on(async {
        let add =
            |v: serde_json::Value| blockdev_add(graph, env, serde_json::from_value(v).unwrap());
        let null = add(json!({"driver": "null-co", "node-name": "n0", "size": 1u64 << 30}))
            .await
            .unwrap();
        let raw = add(json!({"driver": "raw", "node-name": "rn0", "file": "n0"}))
            .await
            .unwrap();
        (null, raw)
    });
    let per_op = |node: &Arc<BlockNode>| {
        let data = Bytes::from(vec![0x5au8; 4096]);
        let mut v = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            rt.block_on(async {
                for i in 0..n {
                    node.write(offset(i, 1 << 30), data.clone(), ReqFlags::default())
                        .await
                        .unwrap();
                }
            });
            v.push(start.elapsed().as_nanos() as f64 / n as f64);
        }
        median(v)
    };
    let (a, b) = (per_op(&null), per_op(&raw));
    println!(
        "layer cost (4 KiB write, QD1): null-co {a:.0} ns/op, raw over null-co {b:.0} ns/op: {:.0} ns per layer",
        b - a
    );
}

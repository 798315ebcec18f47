//! Live graph changes under I/O: drained sections, node replacement,
//! overlays appended and removed (snapshots), and
//! reopen, over in-memory drivers that count the requests reaching them.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockd_core::perm::default_perms;
use blockd_core::{
    BlockDriver, BlockGraph, BlockNode, Child, ChildRef, ChildRole, Children, ControlLock,
    ExplicitOptions, IoFuture, NodeOptions, Perm, PermPair, ReopenSpec, ReqFlags, Root, RootKind,
};
use bytes::Bytes;

/// An in-memory disk; every request that reaches it is counted, and each
/// takes `delay` (so requests stay in flight).
struct Mem {
    data: Mutex<Vec<u8>>,
    hits: Arc<AtomicU64>,
    delay: Duration,
}

impl BlockDriver for Mem {
    fn format_name(&self) -> &'static str {
        "mem"
    }
    fn length(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            let d = self.data.lock().unwrap();
            Ok(Bytes::copy_from_slice(
                &d[offset as usize..offset as usize + len],
            ))
        })
    }
    fn write(&self, offset: u64, data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }
}

/// A pass-through filter over its `file` child, counting requests; it can
/// take extra permissions on its child (`take`) and refuse to share some
/// (`unshare`), to provoke conflicts.
struct Filter {
    file: ChildRef,
    hits: Arc<AtomicU64>,
    take: Perm,
    unshare: Perm,
}

impl BlockDriver for Filter {
    fn format_name(&self) -> &'static str {
        "filter"
    }
    fn length(&self) -> u64 {
        self.file.node().length()
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { self.file.node().read(offset, len).await })
    }
    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { self.file.node().write(offset, data, flags).await })
    }
    fn child_perm(&self, child: &Child, parent: PermPair, writable: bool) -> PermPair {
        let p = default_perms(child.role(), parent, writable);
        PermPair {
            perm: p.perm | self.take,
            shared: p.shared & !self.unshare,
        }
    }
}

struct Fixture {
    graph: BlockGraph,
    control: ControlLock,
}

fn fixture() -> Fixture {
    Fixture {
        graph: BlockGraph::new(),
        control: ControlLock::new(),
    }
}

const SIZE: usize = 1 << 20;

impl Fixture {
    fn mem(&self, name: &str, fill: u8, delay_ms: u64) -> (Arc<BlockNode>, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let n = Arc::new(BlockNode::new(
            name.into(),
            false,
            NodeOptions::default(),
            Box::new(Mem {
                data: Mutex::new(vec![fill; SIZE]),
                hits: hits.clone(),
                delay: Duration::from_millis(delay_ms),
            }),
        ));
        self.graph
            .insert(std::slice::from_ref(&n), &n, true)
            .unwrap();
        (n, hits)
    }

    fn filter_with(
        &self,
        name: &str,
        below: &Arc<BlockNode>,
        take: Perm,
        unshare: Perm,
    ) -> Result<(Arc<BlockNode>, Arc<AtomicU64>), blockd_core::BlockError> {
        let hits = Arc::new(AtomicU64::new(0));
        let children = Children::new();
        let file = Child::new(
            "file",
            ChildRole::FILTERED | ChildRole::PRIMARY,
            below.clone(),
        );
        children.push(file.clone());
        let n = BlockNode::with_children(
            name.into(),
            false,
            NodeOptions::default(),
            ExplicitOptions::default(),
            Box::new(Filter {
                file,
                hits: hits.clone(),
                take,
                unshare,
            }),
            children,
        );
        self.graph.insert(std::slice::from_ref(&n), &n, true)?;
        Ok((n, hits))
    }

    fn filter(&self, name: &str, below: &Arc<BlockNode>) -> (Arc<BlockNode>, Arc<AtomicU64>) {
        self.filter_with(name, below, Perm::NONE, Perm::NONE)
            .unwrap()
    }

    fn root(&self, node: &Arc<BlockNode>, write: bool) -> Arc<Root> {
        let perm = PermPair {
            perm: if write {
                Perm::CONSISTENT_READ | Perm::WRITE
            } else {
                Perm::CONSISTENT_READ
            },
            shared: Perm::ALL,
        };
        let r = Root::new(RootKind::Export, "", perm);
        self.graph.attach_root(&r, node).unwrap();
        r
    }
}

/// `depth` writers looping on `root`, each writing its own 4 KiB slot with
/// a pattern byte that counts up; returns their handles and a stop flag.
fn writers(
    root: &Arc<Root>,
    depth: usize,
) -> (
    Vec<tokio::task::JoinHandle<io::Result<u64>>>,
    Arc<AtomicBool>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..depth)
        .map(|i| {
            let (root, stop) = (root.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let b = (n % 250) as u8 + 1;
                    root.write(
                        i as u64 * 4096,
                        Bytes::from(vec![b; 4096]),
                        ReqFlags::default(),
                    )
                    .await?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    (handles, stop)
}

/// `drained_begin` with a deadline, so a broken gate fails the test
/// instead of hanging it.
async fn drain(g: &BlockGraph, n: &Arc<BlockNode>) -> blockd_core::DrainedSection {
    tokio::time::timeout(
        Duration::from_secs(5),
        g.drained_begin(std::slice::from_ref(n)),
    )
    .await
    .expect("drained_begin hung")
}

async fn finish(handles: Vec<tokio::task::JoinHandle<io::Result<u64>>>, stop: &AtomicBool) -> u64 {
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for h in handles {
        total += tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("writer hung")
            .unwrap()
            .expect("a write failed");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drained_section_lets_no_request_in_until_it_ends() {
    let f = fixture();
    let (mem, mem_hits) = f.mem("mem", 0, 2);
    let (top, top_hits) = f.filter("top", &mem);
    let root = f.root(&top, true);
    let (handles, stop) = writers(&root, 16);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let section = drain(&f.graph, &mem).await;
    assert_eq!(root.gate().in_flight(), 0, "in-flight requests finished");
    assert_eq!(section.roots().len(), 1);
    let (m0, t0) = (
        mem_hits.load(Ordering::SeqCst),
        top_hits.load(Ordering::SeqCst),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        mem_hits.load(Ordering::SeqCst),
        m0,
        "no request reached mem"
    );
    assert_eq!(
        top_hits.load(Ordering::SeqCst),
        t0,
        "no request reached top"
    );
    assert_eq!(root.gate().waiting(), 16, "every writer waits at the gate");

    // Nested: ending the inner section keeps the gate closed.
    let inner = drain(&f.graph, &top).await;
    drop(section);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        mem_hits.load(Ordering::SeqCst),
        m0,
        "still drained by the inner section"
    );
    drop(inner);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        mem_hits.load(Ordering::SeqCst) > m0,
        "released after the last section"
    );
    assert!(finish(handles, &stop).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gate_never_lets_a_request_in_while_quiesced() {
    // Many short sections racing with many requests: once drained_begin
    // returned, the in-flight count stays zero until the section ends.
    let f = fixture();
    let (mem, _) = f.mem("mem", 0, 0);
    let root = f.root(&mem, true);
    let (handles, stop) = writers(&root, 8);
    for _ in 0..200 {
        let s = drain(&f.graph, &mem).await;
        for _ in 0..3 {
            assert_eq!(root.gate().in_flight(), 0);
            tokio::task::yield_now().await;
        }
        drop(s);
        tokio::task::yield_now().await;
    }
    // Released for good: the writers make progress again.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(finish(handles, &stop).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replace_node_under_writes_moves_every_parent() {
    let f = fixture();
    let (a, a_hits) = f.mem("a", 0, 1);
    let (b, b_hits) = f.mem("b", 0, 1);
    let (mid, _) = f.filter("mid", &a);
    let direct = f.root(&a, false);
    let root = f.root(&mid, true);
    let (handles, stop) = writers(&root, 16);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let g = f.control.lock().await;
    f.graph.replace_node(&g, &a, &b).await.unwrap();
    drop(g);
    assert!(mid.child("file").unwrap().points_at(&b));
    assert!(direct.node().unwrap().id() == b.id(), "roots move too");
    assert!(a.parents().is_empty(), "nothing uses a any more");
    assert_eq!(b.parents().len(), 2);
    let a_after = a_hits.load(Ordering::SeqCst);
    let b_before = b_hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        a_hits.load(Ordering::SeqCst),
        a_after,
        "no request reaches a"
    );
    assert!(b_hits.load(Ordering::SeqCst) > b_before, "writes land in b");
    assert!(finish(handles, &stop).await > 0);
    // The permissions moved with the edges.
    assert!(b.cumulative_perm().perm.contains(Perm::WRITE));
    assert!(!a.cumulative_perm().perm.contains(Perm::WRITE));
}

#[tokio::test]
async fn replace_node_refuses_a_conflict_and_changes_nothing() {
    let f = fixture();
    let (a, _) = f.mem("a", 0, 0);
    let (b, _) = f.mem("b", 0, 0);
    // `lock` uses b and lets nobody else write it.
    let (_lock, _) = f.filter_with("lock", &b, Perm::NONE, Perm::WRITE).unwrap();
    let root = f.root(&a, true);
    let g = f.control.lock().await;
    let err = f.graph.replace_node(&g, &a, &b).await.unwrap_err();
    assert_eq!(
        err.msg,
        "Permission conflict on node 'b': permissions 'write' are both required by an unnamed \
         block device (uses node 'b' as 'root' child) and unshared by node 'lock' (uses node 'b' \
         as 'file' child)."
    );
    assert_eq!(root.node().unwrap().id(), a.id());
    assert_eq!(b.parents().len(), 1);
    assert!(a.cumulative_perm().perm.contains(Perm::WRITE));
    assert!(!b.cumulative_perm().perm.contains(Perm::WRITE));
    // I/O still works on a.
    root.write(0, Bytes::from(vec![7; 512]), ReqFlags::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn replace_node_by_its_own_child_keeps_the_child_edge() {
    // Removing a filter: its parents move to the filtered node; the
    // filter's own edge to that node stays (moving it would make a cycle).
    let f = fixture();
    let (a, _) = f.mem("a", 0, 0);
    let (filt, _) = f.filter("filt", &a);
    let root = f.root(&filt, true);
    let g = f.control.lock().await;
    f.graph.replace_node(&g, &filt, &a).await.unwrap();
    assert_eq!(root.node().unwrap().id(), a.id());
    assert!(filt.child("file").unwrap().points_at(&a));
    assert_eq!(a.parents().len(), 2);
    assert!(filt.parents().is_empty());
}

#[tokio::test]
async fn reopen_read_only_with_a_writer_fails_and_changes_nothing() {
    let f = fixture();
    let (a, _) = f.mem("a", 0, 0);
    let root = f.root(&a, true);
    let g = f.control.lock().await;
    let spec = |ro: bool| ReopenSpec {
        node: a.clone(),
        options: NodeOptions {
            read_only: ro,
            ..a.options()
        },
        children: Vec::new(),
        driver_opts: None,
    };
    let err = f.graph.reopen(&g, vec![spec(true)]).await.unwrap_err();
    assert_eq!(
        err.msg,
        "Read-only block node 'a' cannot support read-write users"
    );
    assert!(!a.read_only());
    // Without the writer it works, and a writer is then refused.
    f.graph.detach_root(&root);
    f.graph.reopen(&g, vec![spec(true)]).await.unwrap();
    assert!(a.read_only());
    let r2 = Root::new(
        RootKind::Export,
        "",
        PermPair {
            perm: Perm::WRITE,
            shared: Perm::ALL,
        },
    );
    assert_eq!(
        f.graph.attach_root(&r2, &a).unwrap_err().msg,
        "Block node is read-only"
    );
    f.graph.reopen(&g, vec![spec(false)]).await.unwrap();
    f.graph.attach_root(&r2, &a).unwrap();
}

#[tokio::test]
async fn reopen_moves_a_child_edge_and_undoes_it_on_conflict() {
    let f = fixture();
    let (a, _) = f.mem("a", 0, 0);
    let (b, _) = f.mem("b", 0, 0);
    let (c, _) = f.mem("c", 0, 0);
    let (top, _) = f.filter("top", &a);
    let _w = f.root(&top, true);
    // `lock` keeps c from being written by anyone else.
    let (_lock, _) = f.filter_with("lock", &c, Perm::NONE, Perm::WRITE).unwrap();
    let g = f.control.lock().await;
    let spec = |to: &Arc<BlockNode>| ReopenSpec {
        node: top.clone(),
        options: top.options(),
        children: vec![(
            "file".into(),
            ChildRole::FILTERED | ChildRole::PRIMARY,
            Some(to.clone()),
        )],
        driver_opts: None,
    };
    let err = f.graph.reopen(&g, vec![spec(&c)]).await.unwrap_err();
    assert!(
        err.msg.starts_with("Permission conflict on node 'c'"),
        "{}",
        err.msg
    );
    assert!(top.child("file").unwrap().points_at(&a), "edge restored");
    assert_eq!(a.parents().len(), 1);
    f.graph.reopen(&g, vec![spec(&b)]).await.unwrap();
    assert!(top.child("file").unwrap().points_at(&b));
    assert!(a.parents().is_empty());
    assert!(b.cumulative_perm().perm.contains(Perm::WRITE));
    assert!(!a.cumulative_perm().perm.contains(Perm::WRITE));
}

#[tokio::test]
async fn truncate_waits_for_requests_beyond_the_new_end() {
    let f = fixture();
    let (mem, _) = f.mem("mem", 0, 200);
    // A slow write beyond the new end is in flight.
    let m2 = mem.clone();
    let w = tokio::spawn(async move {
        m2.write(
            SIZE as u64 / 2,
            Bytes::from(vec![1u8; 4096]),
            ReqFlags::default(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t0 = std::time::Instant::now();
    // (The in-memory driver cannot truncate; what counts is when it is asked.)
    let _ = mem.truncate(4096).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "truncate did not wait for the write in flight beyond the new end"
    );
    w.await.unwrap().unwrap();
    // A request below the new end does not wait for a truncate.
    let t1 = std::time::Instant::now();
    mem.write(0, Bytes::from(vec![2u8; 512]), ReqFlags::default())
        .await
        .unwrap();
    assert!(t1.elapsed() < Duration::from_millis(400));
}

/// A filter that writes below, then through a root of its own on another
/// node (a write-blocking mirror's `mirror_top` and its target).
struct Tee {
    file: ChildRef,
    other: Arc<Root>,
}

impl BlockDriver for Tee {
    fn format_name(&self) -> &'static str {
        "tee"
    }
    fn length(&self) -> u64 {
        self.file.node().length()
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move { self.file.node().read(offset, len).await })
    }
    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.file.node().write(offset, data.clone(), flags).await?;
            self.other.write(offset, data, flags).await
        })
    }
}

/// A root that forwards for a node (QEMU's
/// `blk_set_disable_request_queuing`): a drained section over its node
/// covers the forwarding node and the roots above it, and begins while
/// requests in flight there still have to pass the root (it used to wait
/// for them, and they for it: a deadlock). While the section lasts, no
/// request reaches either disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_root_does_not_deadlock_a_drained_section() {
    let f = fixture();
    let (src, src_hits) = f.mem("src", 0, 2);
    let (tgt, tgt_hits) = f.mem("tgt", 0, 2);
    let other = Root::new(
        RootKind::Job,
        "",
        PermPair {
            perm: Perm::WRITE,
            shared: Perm::ALL,
        },
    );
    f.graph.attach_root(&other, &tgt).unwrap();
    let children = Children::new();
    let file = Child::new(
        "file",
        ChildRole::FILTERED | ChildRole::PRIMARY,
        src.clone(),
    );
    children.push(file.clone());
    let tee = BlockNode::with_children(
        "tee".into(),
        false,
        NodeOptions::default(),
        ExplicitOptions::default(),
        Box::new(Tee {
            file,
            other: other.clone(),
        }),
        children,
    );
    f.graph
        .insert(std::slice::from_ref(&tee), &tee, true)
        .unwrap();
    other.set_forwarder(Some(&tee));
    let client = f.root(&tee, true);
    let (handles, stop) = writers(&client, 16);
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let nodes = if round % 2 == 0 {
            vec![tgt.clone()]
        } else {
            vec![src.clone(), tgt.clone()]
        };
        let section = tokio::time::timeout(Duration::from_secs(5), f.graph.drained_begin(&nodes))
            .await
            .expect("drained_begin hung");
        assert!(
            section.roots().iter().any(|r| r.id() == client.id()),
            "the client's root above the forwarding node is covered"
        );
        let (s0, t0) = (
            src_hits.load(Ordering::SeqCst),
            tgt_hits.load(Ordering::SeqCst),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(src_hits.load(Ordering::SeqCst), s0, "a request reached src");
        assert_eq!(tgt_hits.load(Ordering::SeqCst), t0, "a request reached tgt");
        drop(section);
    }
    assert!(finish(handles, &stop).await > 0);
    // Both disks hold every write.
    let a = src.read(0, 16 * 4096).await.unwrap();
    let b = tgt.read(0, 16 * 4096).await.unwrap();
    assert_eq!(a, b);
}

/// A copy-on-write overlay: 4 KiB blocks it wrote itself, the rest read
/// from its `backing` child (none: zeroes).
struct Overlay {
    children: Arc<Children>,
    blocks: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
}

impl BlockDriver for Overlay {
    fn format_name(&self) -> &'static str {
        "overlay"
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn length(&self) -> u64 {
        SIZE as u64
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            assert!(offset % 4096 == 0 && len == 4096, "whole blocks only");
            if let Some(b) = self.blocks.lock().unwrap().get(&offset) {
                return Ok(Bytes::copy_from_slice(b));
            }
            match self.children.node("backing") {
                Some(b) => b.read(offset, len).await,
                None => Ok(Bytes::from(vec![0; len])),
            }
        })
    }
    fn write(&self, offset: u64, data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            assert!(
                offset % 4096 == 0 && data.len() == 4096,
                "whole blocks only"
            );
            // Requests take a moment (writers that never wait would keep
            // every worker busy).
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.blocks.lock().unwrap().insert(offset, data.to_vec());
            Ok(())
        })
    }
}

impl Fixture {
    fn overlay(&self, name: &str, read_only: bool) -> Arc<BlockNode> {
        let children = Children::new();
        let n = BlockNode::with_children(
            name.into(),
            false,
            NodeOptions {
                read_only,
                ..NodeOptions::default()
            },
            ExplicitOptions::default(),
            Box::new(Overlay {
                children: children.clone(),
                blocks: Mutex::new(Default::default()),
            }),
            children,
        );
        self.graph
            .insert(std::slice::from_ref(&n), &n, true)
            .unwrap();
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn append_overlay_under_writes_and_remove_it_again() {
    let f = fixture();
    let (base, base_hits) = f.mem("base", 0x11, 1);
    let (mid, _) = f.filter("mid", &base);
    let root = f.root(&mid, true);
    let direct = f.root(&base, false);
    let ov = f.overlay("ov", false);
    let (handles, stop) = writers(&root, 8);
    tokio::time::sleep(Duration::from_millis(30)).await;

    let g = f.control.lock().await;
    tokio::time::timeout(
        Duration::from_secs(5),
        f.graph.append_overlay(&g, &ov, &base),
    )
    .await
    .expect("append_overlay hung")
    .unwrap();
    drop(g);
    assert!(ov.child("backing").unwrap().points_at(&base));
    assert!(
        mid.child("file").unwrap().points_at(&ov),
        "parent nodes move"
    );
    assert_eq!(direct.node().unwrap().id(), ov.id(), "roots move");
    assert_eq!(base.parents().len(), 1, "only the overlay uses base");
    let before = base_hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(finish(handles, &stop).await > 0);
    assert_eq!(
        base_hits.load(Ordering::SeqCst),
        before,
        "no write reaches base"
    );
    // Writes went to the overlay; reads of untouched blocks reach base.
    assert_eq!(direct.read(512 * 1024, 4096).await.unwrap()[0], 0x11);
    let (b, o) = (
        base.read(0, 4096).await.unwrap(),
        root.read(0, 4096).await.unwrap(),
    );
    assert_ne!(b, o, "the overlay has the writes made after the snapshot");

    // A cycle is refused.
    let g = f.control.lock().await;
    let e = f.graph.append_overlay(&g, &base, &ov).await.unwrap_err();
    assert_eq!(
        e.msg,
        "Making 'ov' a backing child of 'base' would create a cycle"
    );
    // Undo: the parents go back to base.
    f.graph.remove_overlay(&g, &ov, &base).await.unwrap();
    drop(g);
    assert!(ov.child("backing").is_none());
    assert!(mid.child("file").unwrap().points_at(&base));
    assert_eq!(direct.node().unwrap().id(), base.id());
    assert!(ov.parents().is_empty());
    assert!(base.cumulative_perm().perm.contains(Perm::WRITE));
}

#[tokio::test]
async fn append_read_only_overlay_under_a_writer_changes_nothing() {
    let f = fixture();
    let (base, _) = f.mem("base", 0x11, 0);
    let root = f.root(&base, true);
    let ov = f.overlay("ov", true);
    let g = f.control.lock().await;
    let e = f.graph.append_overlay(&g, &ov, &base).await.unwrap_err();
    assert_eq!(e.msg, "Block node is read-only");
    assert!(ov.child("backing").is_none());
    assert!(ov.parents().is_empty());
    assert_eq!(root.node().unwrap().id(), base.id());
    assert_eq!(base.parents().len(), 1);
    assert!(base.cumulative_perm().perm.contains(Perm::WRITE));
    root.write(0, Bytes::from(vec![7; 512]), ReqFlags::default())
        .await
        .unwrap();
}

//! The mirror job over in-memory nodes, with clients writing through a
//! root above the source the whole time (QEMU's iotests 151 and
//! `mirror-ready-cancel-error` in spirit).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;
use std::time::Instant;

use blockd_core::{BlockDriver, ControlLock, IoFuture, NodeOptions};
use blockd_jobs::JobEvents;
use bytes::Bytes;

use super::*;

/// An in-memory image; writes take `delay` (0: none) so that they are in
/// flight for a while.
struct Mem {
    data: Arc<Mutex<Vec<u8>>>,
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
        Box::pin(async move {
            let d = self.data.lock().unwrap();
            Ok(Bytes::copy_from_slice(
                &d[offset as usize..offset as usize + len],
            ))
        })
    }
    fn write(&self, offset: u64, data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }
}

fn mem_node(
    graph: &BlockGraph,
    name: &str,
    fill: u8,
    delay: Duration,
) -> (Arc<BlockNode>, Arc<Mutex<Vec<u8>>>) {
    let data = Arc::new(Mutex::new(vec![fill; SIZE]));
    let n = Arc::new(BlockNode::new(
        name.into(),
        false,
        NodeOptions::default(),
        Box::new(Mem {
            data: data.clone(),
            delay,
        }),
    ));
    graph.insert(std::slice::from_ref(&n), &n, true).unwrap();
    (n, data)
}

const SIZE: usize = 8 << 20;
const WRITERS: usize = 4;

/// The `BLOCK_JOB_COMPLETED` events' data.
#[derive(Default)]
struct Completed(Mutex<Vec<Value>>);

impl JobEvents for Completed {
    fn emit(&self, name: &str, data: Value) {
        if name == "BLOCK_JOB_COMPLETED" {
            self.0.lock().unwrap().push(data);
        }
    }
}

/// Graph, jobs, a source and target, and a client root on the source.
struct Setup {
    graph: Arc<BlockGraph>,
    jobs: JobManager,
    events: Arc<Completed>,
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    target_data: Arc<Mutex<Vec<u8>>>,
    client: Arc<Root>,
}

fn setup(src_delay: Duration, tgt_delay: Duration) -> Setup {
    let graph = Arc::new(BlockGraph::new());
    let events = Arc::new(Completed::default());
    let jobs = JobManager::new(events.clone(), ControlLock::new());
    let (source, _) = mem_node(&graph, "src", 0x11, src_delay);
    let (target, target_data) = mem_node(&graph, "tgt", 0, tgt_delay);
    let client = Root::new(
        RootKind::Export,
        "e",
        PermPair {
            perm: Perm::CONSISTENT_READ | Perm::WRITE,
            shared: Perm::ALL,
        },
    );
    graph.attach_root(&client, &source).unwrap();
    Setup {
        graph,
        jobs,
        events,
        source,
        target,
        target_data,
        client,
    }
}

impl Setup {
    async fn start(&self, copy_mode: CopyMode) {
        let control = self.jobs.control_lock().lock().await;
        let p = MirrorParams {
            job_id: "j".into(),
            job_type: JobType::Mirror,
            source: self.source.clone(),
            target: self.target.clone(),
            replaces: None,
            base: None,
            sync: Sync::Full,
            speed: 0,
            granularity: 64 << 10,
            buf_size: 4 << 20,
            on_source_error: BlockdevOnError::Report,
            on_target_error: BlockdevOnError::Report,
            filter_node_name: None,
            copy_mode,
            options: JobOptions::default(),
            release_target: false,
            zero_target: true,
            attach_backing: None,
        };
        start(&self.jobs, &self.graph, &control, p)
            .await
            .unwrap_or_else(|e| panic!("mirror start: {e:?}"));
    }

    /// Waits until job `j` has `status` (or is gone, for `None`).
    async fn wait(&self, status: Option<JobStatus>, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let now = self.jobs.query().into_iter().find(|j| j.id == "j");
            if now.as_ref().map(|j| j.status) == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "job j never reached {status:?}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Clients writing through `root` until `stop`: writer `w` writes its own
/// stripe in order, so the last write of each range is the reference.
fn spawn_writers(
    root: &Arc<Root>,
    stop: &Arc<AtomicBool>,
    reference: &Arc<Mutex<Vec<u8>>>,
    writes: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let (root, stop, reference, writes) = (
                root.clone(),
                stop.clone(),
                reference.clone(),
                writes.clone(),
            );
            tokio::spawn(async move {
                let stripe = (SIZE / WRITERS) as u64;
                let mut x = w as u64 * 7919 + 1;
                let mut i = 0u8;
                while !stop.load(Ordering::SeqCst) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let len = ((x >> 33) % 32 + 1) * 4096;
                    let off = w as u64 * stripe + (x >> 20) % (stripe - len) / 512 * 512;
                    i = i.wrapping_add(1);
                    let data = Bytes::from(vec![i | 0x80; len as usize]);
                    root.write(off, data.clone(), ReqFlags::default())
                        .await
                        .unwrap();
                    reference.lock().unwrap()[off as usize..(off + len) as usize]
                        .copy_from_slice(&data);
                    writes.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect()
}

/// `job-complete` of a READY background mirror while clients never stop
/// writing: the job converges (write-blocking from then on) and pivots;
/// the target then holds every write. It used to wait for a moment with
/// nothing dirty, which never came: the job stayed READY for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_while_clients_keep_writing() {
    // The target is slow: many client writes complete while the job
    // copies, so something is always dirty.
    let s = setup(Duration::ZERO, Duration::from_millis(2));
    let reference = Arc::new(Mutex::new(vec![0x11; SIZE]));
    let (stop, writes) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    s.start(CopyMode::Background).await;
    s.wait(Some(JobStatus::Ready), 20).await;
    let writers = spawn_writers(&s.client, &stop, &reference, &writes);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = writes.load(Ordering::Relaxed);
    s.jobs.complete("j").unwrap();
    s.wait(None, 20).await;
    let during = writes.load(Ordering::Relaxed) - before;
    assert!(during > 0, "the clients wrote nothing meanwhile");
    // After the pivot the clients write to the target.
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(s.client.node().unwrap().id(), s.target.id());
    assert!(*s.target_data.lock().unwrap() == *reference.lock().unwrap());
    // Progress ends complete: offset == len (iotests' wait_until_completed).
    let ev = s.events.0.lock().unwrap().clone();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(ev[0].get("error").is_none(), "{ev:?}");
    assert_eq!(ev[0]["offset"], ev[0]["len"], "{ev:?}");
}

/// Drained sections over the source and target of a write-blocking
/// mirror while client writes are in flight through it: each begins
/// (the target's root forwards for mirror_top, QEMU's
/// `blk_set_disable_request_queuing`) instead of waiting for a client
/// write that waits at the target's root for the section to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_write_blocking_writes_in_flight() {
    let s = setup(Duration::from_millis(1), Duration::from_millis(1));
    let reference = Arc::new(Mutex::new(vec![0x11; SIZE]));
    let (stop, writes) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let writers = spawn_writers(&s.client, &stop, &reference, &writes);
    s.start(CopyMode::WriteBlocking).await;
    for _ in 0..50 {
        let both = [s.source.clone(), s.target.clone()];
        let section = tokio::time::timeout(Duration::from_secs(5), s.graph.drained_begin(&both))
            .await
            .expect("a drained section over source and target never began");
        drop(section);
        let section = tokio::time::timeout(
            Duration::from_secs(5),
            s.graph.drained_begin(std::slice::from_ref(&s.target)),
        )
        .await
        .expect("a drained section over the target never began");
        drop(section);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.wait(Some(JobStatus::Ready), 20).await;
    s.jobs.complete("j").unwrap();
    s.wait(None, 20).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    assert!(writes.load(Ordering::Relaxed) > 0);
    assert!(*s.target_data.lock().unwrap() == *reference.lock().unwrap());
}

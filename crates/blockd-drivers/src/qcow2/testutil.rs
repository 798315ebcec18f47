//! Test helpers: an in-memory image file that can "crash", a small PRNG,
//! and opening qcow2 nodes in a graph.

use std::sync::{Arc, Mutex};

use blockd_core::{BlockDriver, BlockGraph, BlockNode, IoFuture, NodeOptions, ReqFlags};
use bytes::Bytes;
use serde_json::Value;

use crate::open::{blockdev_add, Env};
use crate::options::BlockdevOptions;

/// xorshift64*: deterministic randomness for tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// State of a [`MemFile`].
#[derive(Default)]
pub struct MemState {
    /// What reads see.
    pub volatile: Vec<u8>,
    /// What survived the last flush.
    pub durable: Vec<u8>,
    /// Writes since the last flush.
    pub log: Vec<(u64, Vec<u8>)>,
    /// Writes allowed before every request fails (a crash).
    pub budget: Option<u64>,
    /// Whether the crash happened.
    pub crashed: bool,
    /// Writes done so far.
    pub writes: u64,
}

/// An in-memory image file with a page cache: unflushed writes may be
/// lost, in any combination, when it "crashes".
#[derive(Clone, Default)]
pub struct MemFile(pub Arc<Mutex<MemState>>);

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl MemFile {
    pub fn new(data: Vec<u8>) -> MemFile {
        MemFile(Arc::new(Mutex::new(MemState {
            durable: data.clone(),
            volatile: data,
            ..MemState::default()
        })))
    }

    /// The image after a crash now: the flushed state plus a random
    /// subset of the writes since.
    pub fn crash_image(&self, rng: &mut Rng) -> Vec<u8> {
        let st = self.0.lock().unwrap();
        let mut img = st.durable.clone();
        for (off, data) in &st.log {
            if rng.below(2) == 0 {
                let end = *off as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[*off as usize..end].copy_from_slice(data);
            }
        }
        img
    }

    pub fn data(&self) -> Vec<u8> {
        self.0.lock().unwrap().volatile.clone()
    }

    fn check(&self) -> std::io::Result<()> {
        if self.0.lock().unwrap().crashed {
            Err(eio())
        } else {
            Ok(())
        }
    }
}

impl BlockDriver for MemFile {
    fn format_name(&self) -> &'static str {
        "file"
    }
    fn length(&self) -> u64 {
        let l = self.0.lock().unwrap().volatile.len() as u64;
        l.div_ceil(512) * 512
    }
    fn filename(&self) -> Option<String> {
        Some("mem://image".into())
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            self.check()?;
            let st = self.0.lock().unwrap();
            let mut out = vec![0u8; len];
            let start = (offset as usize).min(st.volatile.len());
            let end = (offset as usize + len).min(st.volatile.len());
            out[..end - start].copy_from_slice(&st.volatile[start..end]);
            Ok(Bytes::from(out))
        })
    }
    fn write(&self, offset: u64, data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // Yield so concurrent requests interleave like real I/O.
            tokio::task::yield_now().await;
            let mut st = self.0.lock().unwrap();
            if st.crashed {
                return Err(eio());
            }
            if let Some(b) = st.budget {
                if st.writes >= b {
                    st.crashed = true;
                    return Err(eio());
                }
            }
            st.writes += 1;
            let end = offset as usize + data.len();
            if st.volatile.len() < end {
                st.volatile.resize(end, 0);
            }
            st.volatile[offset as usize..end].copy_from_slice(&data);
            st.log.push((offset, data.to_vec()));
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let mut st = self.0.lock().unwrap();
            if st.crashed {
                return Err(eio());
            }
            st.durable = st.volatile.clone();
            st.log.clear();
            Ok(())
        })
    }
    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let mut st = self.0.lock().unwrap();
            st.volatile.resize(len as usize, 0);
            st.durable.resize(len as usize, 0);
            st.log.retain(|(o, _)| *o < len);
            Ok(())
        })
    }
}

/// A graph with the in-memory file as node `mem`.
pub fn graph_with(file: &MemFile) -> BlockGraph {
    let g = BlockGraph::new();
    let node = Arc::new(BlockNode::new(
        "mem".into(),
        false,
        NodeOptions {
            discard_unmap: true,
            ..NodeOptions::default()
        },
        Box::new(file.clone()),
    ));
    g.insert(std::slice::from_ref(&node), &node, true).unwrap();
    g
}

/// `blockdev-add` from JSON.
pub async fn add(g: &BlockGraph, v: Value) -> Result<Arc<BlockNode>, blockd_core::BlockError> {
    let o: BlockdevOptions = serde_json::from_value(v).expect("valid options");
    blockdev_add(g, &Env::default(), o).await
}

/// `blockdev-del` plus closing, as the server does.
pub async fn del(g: &BlockGraph, name: &str) {
    for n in g.remove(name).expect("removable") {
        n.close().await.expect("close");
    }
}

/// The qcow2 driver of a node.
pub fn qcow2_of(n: &BlockNode) -> &super::Qcow2Driver {
    let d: &dyn BlockDriver = n.driver();
    assert_eq!(d.format_name(), "qcow2");
    // SAFETY: only the qcow2 driver reports the format name "qcow2", so
    // the data pointer of this trait object points at a Qcow2Driver.
    unsafe { &*(d as *const dyn BlockDriver as *const super::Qcow2Driver) }
}

/// Runs the driver's own consistency check and asserts no corruption.
pub async fn assert_consistent(n: &BlockNode) {
    let rep = qcow2_of(n).check().await.expect("check runs");
    assert_eq!(rep.corruptions, 0, "corruptions: {:?}", rep.messages);
}

/// Options of a fresh image for [`super::create::create`].
pub fn create_opts(size: u64, extra: Value) -> super::create::Qcow2CreateOptions {
    let mut v = serde_json::json!({"file": "mem", "size": size});
    if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    serde_json::from_value(v).expect("valid create options")
}

/// A new in-memory qcow2 image file.
pub async fn new_image(size: u64, extra: Value) -> MemFile {
    let f = MemFile::new(Vec::new());
    let node = BlockNode::new(
        "c".into(),
        false,
        NodeOptions::default(),
        Box::new(f.clone()),
    );
    super::create::create(&node, &create_opts(size, extra))
        .await
        .expect("create");
    f
}

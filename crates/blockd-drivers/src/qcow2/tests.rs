//! Unit tests of the qcow2 driver over in-memory image files.

use std::sync::Arc;

use blockd_core::{BlockNode, ReqFlags};
use bytes::Bytes;
use serde_json::json;

use super::testutil::*;

const MIB: u64 = 1 << 20;

async fn open_mem(
    file: &MemFile,
    extra: serde_json::Value,
) -> (blockd_core::BlockGraph, Arc<BlockNode>) {
    let g = graph_with(file);
    let mut v = json!({"driver": "qcow2", "node-name": "q", "file": "mem", "discard": "unmap"});
    if let serde_json::Value::Object(e) = extra {
        v.as_object_mut().unwrap().extend(e);
    }
    let n = add(&g, v).await.expect("open");
    (g, n)
}

fn w(b: Vec<u8>) -> Bytes {
    Bytes::from(b)
}

/// Applies random writes, zeroes and discards to the image and a model,
/// then compares every byte.
async fn random_ops(n: &BlockNode, model: &mut [u8], rng: &mut Rng, ops: usize, cs: u64) {
    let size = model.len() as u64;
    for _ in 0..ops {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(3 * cs));
        match rng.below(10) {
            0..=6 => {
                let data = rng.bytes(len as usize);
                n.write(off, w(data.clone()), ReqFlags::default())
                    .await
                    .unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            7 | 8 => {
                let f = ReqFlags {
                    may_unmap: rng.below(2) == 0,
                    ..ReqFlags::default()
                };
                n.write_zeroes(off, len, f).await.unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                n.discard(off, len).await.unwrap();
                // Whole clusters read as zeroes afterwards (no backing).
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if b > a {
                    model[a as usize..b as usize].fill(0);
                }
            }
        }
        if rng.below(8) == 0 {
            n.flush().await.unwrap();
        }
    }
    let got = n.read(0, size as usize).await.unwrap();
    assert!(got[..] == model[..], "image content differs from the model");
}

#[tokio::test]
async fn round_trip_every_cluster_size_and_refcount_width() {
    for (cs, bits, version) in [
        (512u64, 16, "v3"),
        (4096, 1, "v3"),
        (65536, 16, "v2"),
        (65536, 64, "v3"),
        (2 * MIB, 8, "v3"),
    ] {
        let size = 8 * MIB;
        let f = new_image(
            size,
            json!({"cluster-size": cs, "refcount-bits": bits, "version": version}),
        )
        .await;
        let (g, n) = open_mem(&f, json!({})).await;
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(cs ^ bits);
        random_ops(&n, &mut model, &mut rng, 60, cs).await;
        assert_consistent(&n).await;
        del(&g, "q").await;
        // Reopen: everything was written back.
        let (g, n) = open_mem(&f, json!({})).await;
        assert!(n.read(0, size as usize).await.unwrap()[..] == model[..]);
        assert_consistent(&n).await;
        del(&g, "q").await;
    }
}

#[tokio::test]
async fn refcount_table_grows() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB.
    let size = 24 * MIB;
    let f = new_image(size, json!({"cluster-size": 512})).await;
    let (g, n) = open_mem(&f, json!({})).await;
    let chunk = vec![0x5au8; 256 * 1024];
    for i in 0..(20 * MIB / chunk.len() as u64) {
        n.write(
            i * chunk.len() as u64,
            w(chunk.clone()),
            ReqFlags::default(),
        )
        .await
        .unwrap();
    }
    n.flush().await.unwrap();
    assert_consistent(&n).await;
    del(&g, "q").await;
    let (g, n) = open_mem(&f, json!({})).await;
    let r = n.read(19 * MIB, 4096).await.unwrap();
    assert!(r.iter().all(|&b| b == 0x5a));
    assert_consistent(&n).await;
    del(&g, "q").await;
}

#[tokio::test]
async fn backing_reads_and_copy_on_write() {
    let size = 4 * MIB;
    let base = MemFile::new((0..size).map(|i| (i / 512) as u8).collect());
    // The backing file is shorter than the overlay.
    base.0
        .lock()
        .unwrap()
        .volatile
        .truncate((size / 2) as usize);
    let top = new_image(
        size,
        json!({"cluster-size": 65536, "backing-file": "base", "backing-fmt": "raw"}),
    )
    .await;
    let g = graph_with(&top);
    let bnode = Arc::new(BlockNode::new(
        "base".into(),
        false,
        Default::default(),
        Box::new(base.clone()),
    ));
    g.insert(std::slice::from_ref(&bnode), &bnode, true)
        .unwrap();
    let n = add(
        &g,
        json!({"driver": "qcow2", "node-name": "q", "file": "mem", "backing": "base"}),
    )
    .await
    .unwrap();
    let mut model: Vec<u8> = base.data();
    model.resize(size as usize, 0);
    // Partial cluster write: the rest of the cluster comes from the backing file.
    n.write(70000, w(vec![0xee; 100]), ReqFlags::default())
        .await
        .unwrap();
    model[70000..70100].fill(0xee);
    assert!(n.read(0, size as usize).await.unwrap()[..] == model[..]);
    let st = n.block_status(65536, 65536).await.unwrap();
    assert!(st.allocated && st.data);
    let st = n.block_status(0, 65536).await.unwrap();
    assert!(!st.allocated && st.data, "{st:?}");
    let st = n.block_status(3 * MIB, 65536).await.unwrap();
    assert!(
        !st.allocated && st.zero,
        "beyond the backing file: zeroes {st:?}"
    );
    assert_eq!(n.allocation_depth(0, 65536).await.unwrap().1, 2);
    assert_eq!(n.allocation_depth(65536, 65536).await.unwrap().1, 1);
    // Zeroes over a backed cluster read as zeroes (zero flag).
    n.write_zeroes(0, 65536, ReqFlags::default()).await.unwrap();
    model[..65536].fill(0);
    assert!(n.read(0, size as usize).await.unwrap()[..] == model[..]);
    // The base is untouched.
    assert_eq!(base.data()[70000], (70000 / 512) as u8);
    assert_consistent(&n).await;
    del(&g, "q").await;
}

#[tokio::test]
async fn concurrent_writes_to_one_new_cluster_allocate_once() {
    let f = new_image(MIB, json!({"cluster-size": 65536})).await;
    let (g, n) = open_mem(&f, json!({})).await;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            n.write(
                i * 4096,
                Bytes::from(vec![i as u8 + 1; 4096]),
                ReqFlags::default(),
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = n.read(0, 65536).await.unwrap();
    for i in 0..16usize {
        assert!(
            r[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "chunk {i}"
        );
    }
    n.flush().await.unwrap();
    let rep = qcow2_of(&n).check().await.unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    del(&g, "q").await;
}

#[tokio::test]
async fn dirty_image_is_repaired_on_open() {
    let f = new_image(4 * MIB, json!({"lazy-refcounts": true})).await;
    let (g, n) = open_mem(&f, json!({})).await;
    n.write(0, w(vec![1; 300_000]), ReqFlags::default())
        .await
        .unwrap();
    n.flush().await.unwrap();
    assert_eq!(n.driver().info().dirty, Some(true));
    // Crash: only what was flushed survives; refcounts were never written.
    let img = f.crash_image(&mut Rng::new(1));
    drop(n);
    drop(g);
    let f2 = MemFile::new(img);
    let (g, n) = open_mem(&f2, json!({})).await;
    assert_eq!(n.driver().info().dirty, Some(false));
    let rep = qcow2_of(&n).check().await.unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    assert!(n.read(0, 300_000).await.unwrap().iter().all(|&b| b == 1));
    del(&g, "q").await;
}

/// Crash at random points: the image never has corruption, and every
/// write that a completed flush covered is there.
#[tokio::test]
async fn crash_consistency() {
    for seed in 0..40u64 {
        let mut rng = Rng::new(seed);
        let cs = [512u64, 4096, 65536][(seed % 3) as usize];
        let size = 2 * MIB;
        let lazy = seed % 4 == 3;
        let f = new_image(size, json!({"cluster-size": cs, "lazy-refcounts": lazy})).await;
        let (g, n) = open_mem(&f, json!({})).await;
        let mut model = vec![0u8; size as usize];
        random_ops(&n, &mut model, &mut rng, 30, cs).await;
        n.flush().await.unwrap();
        let flushed = model.clone();
        // Unflushed activity; the file dies after a random number of writes.
        {
            let mut st = f.0.lock().unwrap();
            st.budget = Some(st.writes + rng.below(40));
        }
        let mut touched = vec![false; size as usize];
        let mut model2 = flushed.clone();
        let mut failed = false;
        for _ in 0..20 {
            let off = rng.below(size);
            let len = 1 + rng.below((size - off).min(2 * cs));
            let r = if rng.below(4) == 0 {
                let r = n.discard(off, len).await;
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if b > a {
                    model2[a as usize..b as usize].fill(0);
                }
                r
            } else {
                let data = rng.bytes(len as usize);
                model2[off as usize..(off + len) as usize].copy_from_slice(&data);
                n.write(off, w(data), ReqFlags::default()).await
            };
            touched[off as usize..(off + len) as usize].fill(true);
            if r.is_err() {
                failed = true;
                break;
            }
        }
        // A flush that may die half-way through the metadata writes.
        let flushed_all = !failed && n.flush().await.is_ok();
        let img = f.crash_image(&mut rng);
        drop(n);
        drop(g);
        let f2 = MemFile::new(img);
        let (g2, n2) = open_mem(&f2, json!({})).await;
        let rep = qcow2_of(&n2).check().await.unwrap();
        assert_eq!(rep.corruptions, 0, "seed {seed}: {:?}", rep.messages);
        let got = n2.read(0, size as usize).await.unwrap();
        if flushed_all {
            assert!(
                got[..] == model2[..],
                "seed {seed}: a completed flush lost data"
            );
        }
        for i in 0..size as usize {
            if !touched[i] {
                assert_eq!(got[i], flushed[i], "seed {seed}: flushed byte {i} lost");
            }
        }
        del(&g2, "q").await;
    }
}

#[tokio::test]
async fn hostile_images_are_refused() {
    let good = new_image(MIB, json!({})).await.data();
    let open_err = |img: Vec<u8>| async move {
        let f = MemFile::new(img);
        let g = graph_with(&f);
        add(
            &g,
            json!({"driver": "qcow2", "node-name": "q", "file": "mem"}),
        )
        .await
        .unwrap_err()
        .msg
    };
    assert_eq!(
        open_err(b"not an image".to_vec()).await,
        "Image is not in qcow2 format"
    );
    // (Files are whole sectors: a truncated header reads as zeroes.)
    assert_eq!(
        open_err(good[..60].to_vec()).await,
        "qcow2 header too short"
    );
    let mut l1_beyond = good.clone();
    l1_beyond[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert!(open_err(l1_beyond)
        .await
        .contains("Active L1 table lies beyond"));
    let mut unaligned = good.clone();
    unaligned[48..56].copy_from_slice(&65537u64.to_be_bytes());
    assert_eq!(
        open_err(unaligned).await,
        "Reference count table offset invalid"
    );
    let mut big = good.clone();
    big[36..40].copy_from_slice(&(64u32 << 20).to_be_bytes());
    assert_eq!(open_err(big).await, "Active L1 table too large");
    let mut ext_l2 = good.clone();
    ext_l2[79] |= 0x10;
    assert!(open_err(ext_l2).await.contains("extended L2"));
    let mut crypt = good.clone();
    crypt[35] = 2;
    assert!(open_err(crypt).await.contains("encrypted"));
}

#[tokio::test]
async fn corrupted_tables_give_errors_not_panics() {
    let f = new_image(4 * MIB, json!({"cluster-size": 4096})).await;
    let (g, n) = open_mem(&f, json!({})).await;
    n.write(0, w(vec![7; 40960]), ReqFlags::default())
        .await
        .unwrap();
    del(&g, "q").await;
    let img = f.data();
    let mut rng = Rng::new(99);
    for _ in 0..200 {
        let mut bad = img.clone();
        for _ in 0..8 {
            let at = 4096 + rng.below(img.len() as u64 - 4096) as usize;
            bad[at] = rng.next() as u8;
        }
        let f = MemFile::new(bad);
        let g = graph_with(&f);
        if let Ok(n) = add(
            &g,
            json!({"driver": "qcow2", "node-name": "q", "file": "mem"}),
        )
        .await
        {
            let _ = n.read(0, 65536).await;
            let _ = n
                .write(
                    rng.below(4 * MIB - 512),
                    w(vec![1; 512]),
                    ReqFlags::default(),
                )
                .await;
            let _ = n.block_status(0, 4 * MIB).await;
            let _ = n.flush().await;
        }
    }
}

/// Concurrent writers on interleaved ranges of the same clusters, with
/// concurrent reads, discards of their own areas and flushes: the result
/// is deterministic and the metadata consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_stress() {
    for cs in [512u64, 65536] {
        let size = 4 * MIB;
        let base = MemFile::new((0..size).map(|i| (i % 251) as u8).collect());
        let top = new_image(
            size,
            json!({"cluster-size": cs, "backing-file": "b", "backing-fmt": "raw"}),
        )
        .await;
        let g = graph_with(&top);
        let bnode = Arc::new(BlockNode::new(
            "base".into(),
            false,
            Default::default(),
            Box::new(base),
        ));
        g.insert(std::slice::from_ref(&bnode), &bnode, true)
            .unwrap();
        let n = add(&g, json!({"driver": "qcow2", "node-name": "q", "file": "mem", "backing": "base", "discard": "unmap"}))
            .await
            .unwrap();
        let chunk = 1536u64;
        let tasks = 6u64;
        let mut handles = Vec::new();
        for t in 0..tasks {
            let n = n.clone();
            handles.push(tokio::spawn(async move {
                let mut rng = Rng::new(t);
                // Task t owns chunks t, t+tasks, t+2*tasks, ...
                let mut i = t;
                while (i + 1) * chunk <= size {
                    let v = (t as u8) * 10 + 1;
                    n.write(
                        i * chunk,
                        Bytes::from(vec![v; chunk as usize]),
                        ReqFlags::default(),
                    )
                    .await
                    .unwrap();
                    if rng.below(7) == 0 {
                        n.flush().await.unwrap();
                    }
                    if rng.below(5) == 0 {
                        let r = n.read(i * chunk, chunk as usize).await.unwrap();
                        assert!(r.iter().all(|&b| b == v));
                    }
                    i += tasks;
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        n.flush().await.unwrap();
        let r = n.read(0, size as usize).await.unwrap();
        for (i, b) in r.iter().enumerate() {
            let c = i as u64 / chunk;
            let want = if (c + 1) * chunk <= size {
                ((c % tasks) as u8) * 10 + 1
            } else {
                (i % 251) as u8
            };
            assert_eq!(*b, want, "cs {cs} byte {i}");
        }
        let rep = qcow2_of(&n).check().await.unwrap();
        assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
        del(&g, "q").await;
    }
}

/// Concurrent tasks that each own whole clusters and write, discard and
/// unmap them while the others flush: frees become reusable during the
/// flushes while other tasks' I/O is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_frees_and_reuse() {
    let cs = 4096u64;
    let size = 2 * MIB;
    let f = new_image(size, json!({"cluster-size": cs})).await;
    let (g, n) = open_mem(&f, json!({})).await;
    let tasks = 5u64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let n = n.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = Rng::new(t + 50);
            let mine: Vec<u64> = (0..size / cs).filter(|c| c % tasks == t).collect();
            let mut model = vec![0u8; mine.len()];
            for _ in 0..300 {
                let k = rng.below(mine.len() as u64) as usize;
                let off = mine[k] * cs;
                match rng.below(6) {
                    0 => {
                        n.discard(off, cs).await.unwrap();
                        model[k] = 0;
                    }
                    1 => {
                        let fl = ReqFlags {
                            may_unmap: true,
                            ..ReqFlags::default()
                        };
                        n.write_zeroes(off, cs, fl).await.unwrap();
                        model[k] = 0;
                    }
                    2 => n.flush().await.unwrap(),
                    _ => {
                        let v = 1 + rng.below(250) as u8;
                        n.write(off, Bytes::from(vec![v; cs as usize]), ReqFlags::default())
                            .await
                            .unwrap();
                        model[k] = v;
                    }
                }
                let c = rng.below(mine.len() as u64) as usize;
                let r = n.read(mine[c] * cs, cs as usize).await.unwrap();
                assert!(
                    r.iter().all(|&b| b == model[c]),
                    "task {t} cluster {}",
                    mine[c]
                );
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    n.flush().await.unwrap();
    let rep = qcow2_of(&n).check().await.unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    del(&g, "q").await;
}

#[test]
fn runtime_numbers_are_read_as_qemu_opts_reads_them() {
    let err = |extra: serde_json::Value| {
        let mut v = json!({"driver": "qcow2", "file": "mem"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let o: crate::options::BlockdevOptions = serde_json::from_value(v).unwrap();
        let crate::options::DriverOptions::Qcow2(q) = o.driver else {
            unreachable!()
        };
        super::check(&q).unwrap_err().msg
    };
    // Sizes: negative is out of range (qemu-storage-daemon 10.0.2).
    assert_eq!(
        err(json!({"l2-cache-size": -1})),
        "Value '-1' is out of range for parameter 'l2-cache-size'"
    );
    // The interval is a number: -1 wraps around, and is too big.
    assert_eq!(
        err(json!({"cache-clean-interval": -1})),
        "Cache clean interval too big"
    );
    assert_eq!(
        err(json!({"cache-clean-interval": 1i64 << 32})),
        "Cache clean interval too big"
    );
}

/// A scratch directory for images on disk (backing files are opened by
/// file name).
fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("blockd-implicit-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a 1 MiB qcow2 overlay to `path` whose header names `backing`
/// (in `fmt`, if given).
async fn overlay_on_disk(path: &std::path::Path, backing: &str, fmt: Option<&str>) {
    let mut extra = json!({"backing-file": backing});
    if let Some(f) = fmt {
        extra["backing-fmt"] = f.into();
    }
    std::fs::write(path, new_image(MIB, extra).await.data()).unwrap();
}

async fn open_overlay(path: &std::path::Path) -> Result<Arc<BlockNode>, String> {
    let g = blockd_core::BlockGraph::new();
    add(
        &g,
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
    )
    .await
    .map_err(|e| e.msg)
}

/// A backing file named without a format is probed by reading its first
/// sector through its own file node, and opened read-only under the
/// overlay, its file inheriting from it.
#[tokio::test]
async fn backing_files_without_a_format_are_probed() {
    let d = scratch("probe");
    std::fs::write(d.join("base.raw"), vec![0x5au8; MIB as usize]).unwrap();
    overlay_on_disk(&d.join("top.qcow2"), "base.raw", None).await;
    let top = open_overlay(&d.join("top.qcow2")).await.unwrap();
    assert_eq!(&top.read(0, 4096).await.unwrap()[..], &[0x5a; 4096][..]);
    let backing = top.child("backing").unwrap();
    assert!(backing.inherits());
    let base = backing.node();
    assert_eq!(base.driver().format_name(), "raw");
    assert!(
        base.read_only(),
        "a backing file is never opened for writes"
    );
    let file = base.child("file").unwrap();
    assert!(file.inherits(), "the implicitly opened file inherits");
    assert!(file.node().read_only());

    // A qcow2 backing file is probed as qcow2, chains included.
    overlay_on_disk(&d.join("mid.qcow2"), "base.raw", Some("raw")).await;
    overlay_on_disk(&d.join("top2.qcow2"), "mid.qcow2", None).await;
    let top = open_overlay(&d.join("top2.qcow2")).await.unwrap();
    let mid = top.backing().unwrap();
    assert_eq!(mid.driver().format_name(), "qcow2");
    assert_eq!(mid.backing().unwrap().driver().format_name(), "raw");
    assert_eq!(&top.read(0, 512).await.unwrap()[..], &[0x5a; 512][..]);
}

#[tokio::test]
async fn backing_file_formats_are_checked_as_qemu_checks_them() {
    let d = scratch("formats");
    // A signature of a format blockd does not have: refused, not read as
    // raw.
    let mut vmdk = vec![0u8; 4096];
    vmdk[..4].copy_from_slice(b"KDMV");
    std::fs::write(d.join("base.vmdk"), vmdk).unwrap();
    overlay_on_disk(&d.join("a.qcow2"), "base.vmdk", None).await;
    assert_eq!(
        open_overlay(&d.join("a.qcow2")).await.unwrap_err(),
        "Could not open backing file: Unknown driver 'vmdk'"
    );
    // qcow2 named, raw found (qemu-storage-daemon 10.0.2's message).
    std::fs::write(d.join("base.raw"), vec![1u8; 4096]).unwrap();
    overlay_on_disk(&d.join("b.qcow2"), "base.raw", Some("qcow2")).await;
    assert_eq!(
        open_overlay(&d.join("b.qcow2")).await.unwrap_err(),
        "Could not open backing file: Image is not in qcow2 format"
    );
    // An unknown format is refused before the file is opened (this one
    // does not exist), as qemu-storage-daemon 10.0.2 does.
    overlay_on_disk(&d.join("c.qcow2"), "missing.img", Some("raw")).await;
    let mut img = std::fs::read(d.join("c.qcow2")).unwrap();
    let at = img.windows(3).position(|w| w == b"raw").unwrap();
    img[at..at + 3].copy_from_slice(b"xyz");
    std::fs::write(d.join("c.qcow2"), img).unwrap();
    assert_eq!(
        open_overlay(&d.join("c.qcow2")).await.unwrap_err(),
        "Could not open backing file: Unknown driver 'xyz'"
    );
    overlay_on_disk(&d.join("e.qcow2"), "missing.img", None).await;
    let e = open_overlay(&d.join("e.qcow2")).await.unwrap_err();
    assert!(
        e.starts_with("Could not open backing file: Could not open '"),
        "{e}"
    );
}

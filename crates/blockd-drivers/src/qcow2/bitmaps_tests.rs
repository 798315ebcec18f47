//! Persistent bitmaps against QEMU 10's tools: blockd loads what
//! `qemu-img bitmap` and `qemu-io` stored, QEMU reads what blockd stored
//! (`qemu-img info`, `check`, `bitmap --merge/--remove`, and the bits
//! through `qemu-nbd -B` and `qemu-img map` with `x-dirty-bitmap`), a
//! crash leaves bitmaps marked in use, and storing again leaks nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blockd_core::{BitmapSource, BlockGraph, BlockNode, ReqFlags, StoredBitmap};
use bytes::Bytes;
use serde_json::{json, Value};

use super::interop_tests::{assert_check, have_qemu, ok, open, run, s, tmpdir};
use super::testutil::{del, qcow2_of, Rng};

const MIB: u64 = 1 << 20;

fn info(p: &Path) -> Value {
    let out = ok("qemu-img", &["info", "-U", "--output=json", s(p)]);
    serde_json::from_str(&out).unwrap()
}

/// `(name, granularity, flags)` of the bitmaps `qemu-img info` lists.
fn qemu_bitmaps(p: &Path) -> Vec<(String, u64, Vec<String>)> {
    let v = info(p);
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// The dirty ranges of bitmap `name` as QEMU reads them: exported by
/// `qemu-nbd -B`, mapped by `qemu-img map` with `x-dirty-bitmap` (dirty
/// areas show as `"data": false`).
fn qemu_dirty_ranges(p: &Path, name: &str, dir: &Path) -> Vec<(u64, u64)> {
    let sock = dir.join(format!("nbd-{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-k", s(&sock), "-B", name, s(p)])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-nbd runs");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        s(&sock)
    );
    let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(
        out.status.success(),
        "qemu-img map: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    merge(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| !e["data"].as_bool().unwrap())
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect(),
    )
}

fn merge(v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in v {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl == s => *pl += l,
            _ => out.push((s, l)),
        }
    }
    out
}

/// The dirty byte ranges of a stored bitmap over `len` bytes.
fn ranges(b: &StoredBitmap, len: u64) -> Vec<(u64, u64)> {
    let chunks = len.div_ceil(b.granularity);
    let v = (0..chunks)
        .filter(|&c| b.get(c))
        .map(|c| {
            let s = c * b.granularity;
            (s, b.granularity.min(len - s))
        })
        .collect();
    merge(v)
}

/// The bits are equal (shown as dirty ranges when not).
fn assert_bits(got: &StoredBitmap, want: &StoredBitmap, len: u64, ctx: &str) {
    assert!(
        got.bits == want.bits,
        "{ctx}: bits of {}: got {:?}, want {:?}",
        want.name,
        ranges(got, len),
        ranges(want, len)
    );
}

/// blockd's `format-specific` bitmaps equal what `qemu-img info` shows.
fn assert_info_matches(n: &BlockNode, p: &Path) {
    let ours = n.driver().info().format_specific.unwrap()["data"]["bitmaps"].clone();
    let theirs = info(p)["format-specific"]["data"]["bitmaps"].clone();
    assert_eq!(ours, theirs);
}

/// The persistent bitmaps the open loaded, in the image's directory
/// order (the open path moved them into the node's named bitmaps, which
/// list the newest first).
async fn loaded(n: &BlockNode) -> Vec<StoredBitmap> {
    let mut v: Vec<StoredBitmap> = n
        .dirty_bitmaps()
        .list()
        .iter()
        .filter(|b| b.persistent())
        .map(|b| StoredBitmap {
            name: b.name().to_string(),
            granularity: b.granularity(),
            enabled: b.enabled(),
            inconsistent: b.inconsistent(),
            bits: b.bits().serialize(),
        })
        .collect();
    v.reverse();
    v
}

fn find<'a>(v: &'a [StoredBitmap], name: &str) -> &'a StoredBitmap {
    v.iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("bitmap {name} loaded"))
}

fn source(v: Vec<StoredBitmap>) -> BitmapSource {
    Arc::new(move || v.clone())
}

/// Closes the node, storing `bitmaps` through the source hook.
async fn close_storing(g: &BlockGraph, n: Arc<BlockNode>, bitmaps: Vec<StoredBitmap>) {
    n.driver().set_bitmap_source(Some(source(bitmaps)));
    drop(n);
    del(g, "q").await;
}

#[tokio::test]
async fn blockd_loads_what_qemu_stored() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("bm-load");
    for cs in ["64k", "512"] {
        let p = d.join(format!("a-{cs}.qcow2"));
        let len = 4 * MIB + 4096;
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                s(&p),
                &len.to_string(),
            ],
        );
        ok("qemu-img", &["bitmap", "--add", "-g", "64k", s(&p), "b1"]);
        ok("qemu-img", &["bitmap", "--add", "-g", "512", s(&p), "fine"]);
        ok(
            "qemu-img",
            &["bitmap", "--add", "-g", "128k", s(&p), "later"],
        );
        ok("qemu-img", &["bitmap", "--disable", s(&p), "later"]);
        ok("qemu-img", &["bitmap", "--add", s(&p), "off"]);
        ok("qemu-img", &["bitmap", "--disable", s(&p), "off"]);
        let first = [(65536u64, 4096u64), (MIB, 200 * 1024), (len - 512, 512)];
        let second = [(3 * MIB + 1000, 70_000u64)];
        let mut e1 = StoredBitmap::empty("b1", 65536, len, true);
        let mut fine = StoredBitmap::empty("fine", 512, len, true);
        let mut later = StoredBitmap::empty("later", 131072, len, true);
        let mut a: Vec<String> = Vec::new();
        for (o, l) in first {
            a.push("-c".into());
            a.push(format!("write -q {o} {l}"));
            e1.set_range(o, l);
            fine.set_range(o, l);
        }
        let mut args: Vec<&str> = a.iter().map(String::as_str).collect();
        args.push(s(&p));
        ok("qemu-io", &args);
        ok("qemu-img", &["bitmap", "--enable", s(&p), "later"]);
        let (o, l) = second[0];
        ok("qemu-io", &["-c", &format!("write -q {o} {l}"), s(&p)]);
        e1.set_range(o, l);
        fine.set_range(o, l);
        later.set_range(o, l);
        // The fine bitmap spans several clusters of bits with 512-byte
        // clusters; one of them is all ones.
        assert!(fine.count() > 0 && later.count() > 0);

        // Read-only: loaded, file untouched.
        let before = std::fs::read(&p).unwrap();
        let g = BlockGraph::new();
        let n = open(&g, &p, json!({"read-only": true})).await;
        let v = loaded(&n).await;
        assert_eq!(
            v.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["b1", "fine", "later", "off"]
        );
        for (want, enabled) in [(&e1, true), (&fine, true), (&later, true)] {
            let b = find(&v, &want.name);
            assert_eq!(b.granularity, want.granularity, "{}", want.name);
            assert_eq!(b.enabled, enabled, "{}", want.name);
            assert!(!b.inconsistent);
            assert_bits(b, want, len, &format!("{cs} clusters"));
        }
        assert_info_matches(&n, &p);
        let off = find(&v, "off");
        assert!(!off.enabled && off.count() == 0 && !off.inconsistent);
        assert!(n.driver().take_loaded_bitmaps().is_empty(), "taken once");
        drop(n);
        del(&g, "q").await;
        assert_eq!(std::fs::read(&p).unwrap(), before, "read-only open wrote");

        // Read-write: marked in use on disk at once; a crash (no close)
        // leaves them so, and they load as inconsistent.
        let g = BlockGraph::new();
        let n = open(&g, &p, json!({})).await;
        assert_bits(find(&loaded(&n).await, "fine"), &fine, len, "read-write");
        assert_info_matches(&n, &p);
        let flags: Vec<_> = qemu_bitmaps(&p).into_iter().map(|b| b.2).collect();
        assert_eq!(
            flags,
            [
                vec!["in-use", "auto"],
                vec!["in-use", "auto"],
                vec!["in-use", "auto"],
                vec!["in-use"]
            ]
        );
        drop(n);
        drop(g);
        let flags: Vec<_> = qemu_bitmaps(&p).into_iter().map(|b| b.2).collect();
        assert_eq!(flags[3], ["in-use"]);
        assert_check(&p, false);
        let g = BlockGraph::new();
        let n = open(&g, &p, json!({})).await;
        let v = loaded(&n).await;
        assert!(v.iter().all(|b| b.inconsistent && b.count() == 0));
        assert!(find(&v, "b1").enabled && !find(&v, "off").enabled);
        // A store keeps inconsistent bitmaps as they are; removing one
        // frees its clusters.
        n.driver().store_bitmaps(&v).await.unwrap();
        n.driver().remove_persistent_bitmap("fine").await.unwrap();
        n.driver().remove_persistent_bitmap("absent").await.unwrap();
        assert_info_matches(&n, &p);
        close_storing(&g, n, v).await;
        let names: Vec<_> = qemu_bitmaps(&p).into_iter().map(|b| (b.0, b.2)).collect();
        assert_eq!(
            names,
            [
                (
                    "b1".to_string(),
                    vec!["in-use".to_string(), "auto".to_string()]
                ),
                (
                    "later".to_string(),
                    vec!["in-use".to_string(), "auto".to_string()]
                ),
                ("off".to_string(), vec!["in-use".to_string()]),
            ]
        );
        assert_check(&p, false);
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn qemu_reads_what_blockd_stored() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("bm-store");
    let p = d.join("s.qcow2");
    let len = 64 * MIB;
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    let g = BlockGraph::new();
    let n = open(&g, &p, json!({})).await;
    n.write(0, Bytes::from(vec![7u8; 1 << 20]), ReqFlags::default())
        .await
        .unwrap();
    let mut s1 = StoredBitmap::empty("s1", 65536, len, true);
    s1.set_range(0, MIB);
    s1.set_range(40 * MIB + 5, 1);
    s1.set_range(len - 1, 1);
    // 512-byte granularity: 16 KiB of bits, partly all ones.
    let mut s2 = StoredBitmap::empty("s2", 512, len, false);
    s2.set_range(10 * MIB, 3 * MIB + 512);
    s2.set_range(63 * MIB + 1536, 1);
    let empty = StoredBitmap::empty("empty", 1 << 20, len, true);
    close_storing(&g, n, vec![s1.clone(), s2.clone(), empty]).await;

    assert_eq!(
        qemu_bitmaps(&p),
        [
            ("s1".to_string(), 65536, vec!["auto".to_string()]),
            ("s2".to_string(), 512, vec![]),
            ("empty".to_string(), 1 << 20, vec!["auto".to_string()]),
        ]
    );
    assert_check(&p, false);
    assert_eq!(qemu_dirty_ranges(&p, "s1", &d), ranges(&s1, len));
    assert_eq!(qemu_dirty_ranges(&p, "s2", &d), ranges(&s2, len));
    assert_eq!(qemu_dirty_ranges(&p, "empty", &d), []);

    // QEMU changes them: merge s2 into s1, remove s2.
    ok("qemu-img", &["bitmap", "--merge", "s2", s(&p), "s1"]);
    ok("qemu-img", &["bitmap", "--remove", s(&p), "s2"]);
    assert_check(&p, false);
    let mut union = s1.clone();
    for c in 0..len / 512 {
        if s2.get(c) {
            union.set_range(c * 512, 512);
        }
    }
    assert_eq!(qemu_dirty_ranges(&p, "s1", &d), ranges(&union, len));

    // And blockd reads the result.
    let g = BlockGraph::new();
    let n = open(&g, &p, json!({"read-only": true})).await;
    let v = loaded(&n).await;
    assert_eq!(v.len(), 2);
    assert_bits(find(&v, "s1"), &union, len, "merged");
    drop(n);
    del(&g, "q").await;
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn storing_removing_and_storing_again_leaks_nothing() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("bm-cycle");
    let p = d.join("c.qcow2");
    let len = 32 * MIB;
    // (With a backing file: the header rewrites keep its name.)
    let base = d.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "32M"]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&p),
            "32M",
        ],
    );
    let mut rng = Rng::new(7);
    let mut want: Vec<StoredBitmap> = Vec::new();
    for round in 0..4 {
        let g = BlockGraph::new();
        let n = open(&g, &p, json!({})).await;
        let mut v = loaded(&n).await;
        assert_eq!(v.len(), want.len(), "round {round}");
        for (b, w) in v.iter().zip(&want) {
            assert_eq!(b.name, w.name);
            assert_bits(b, w, len, &format!("round {round}"));
            assert_eq!(b.enabled, w.enabled);
        }
        // Guest writes, recorded by the enabled bitmaps.
        for _ in 0..20 {
            let off = rng.below(len / 512) * 512;
            let l = (1 + rng.below(64)) * 512;
            let l = l.min(len - off);
            n.write(off, Bytes::from(rng.bytes(l as usize)), ReqFlags::default())
                .await
                .unwrap();
            for b in v.iter_mut().filter(|b| b.enabled) {
                b.set_range(off, l);
            }
        }
        // Remove the first one, add a new one.
        if !v.is_empty() {
            let gone = v.remove(0);
            n.driver()
                .remove_persistent_bitmap(&gone.name)
                .await
                .unwrap();
        }
        let gran = 512u64 << rng.below(8);
        let mut b = StoredBitmap::empty(&format!("r{round}"), gran, len, round % 2 == 0);
        for _ in 0..10 {
            b.set_range(rng.below(len), rng.below(4 * MIB));
        }
        v.push(b);
        v.push(StoredBitmap::empty(&format!("e{round}"), 65536, len, false));
        let rep = qcow2_of(&n).check().await.unwrap();
        assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
        close_storing(&g, n, v.clone()).await;
        want = v;
        assert_check(&p, false);
        let listed: Vec<_> = qemu_bitmaps(&p).into_iter().map(|b| (b.0, b.1)).collect();
        let expected: Vec<_> = want
            .iter()
            .map(|b| (b.name.clone(), b.granularity))
            .collect();
        assert_eq!(listed, expected, "round {round}");
    }
    for b in &want {
        assert_eq!(
            qemu_dirty_ranges(&p, &b.name, &d),
            ranges(b, len),
            "{}",
            b.name
        );
    }
    let i = info(&p);
    assert_eq!(i["backing-filename"], "base.raw");
    assert_eq!(i["backing-filename-format"], "raw");
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn reopen_read_only_stores_and_read_write_marks_in_use() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("bm-reopen");
    let p = d.join("r.qcow2");
    let len = 8 * MIB;
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "8M"]);
    let g = BlockGraph::new();
    let control = blockd_core::ControlLock::new();
    let n = open(&g, &p, json!({})).await;
    let mut r = StoredBitmap::empty("r", 65536, len, true);
    r.set_range(MIB, 3 * 65536);
    n.driver().set_bitmap_source(Some(source(vec![r.clone()])));
    let c = control.lock().await;
    crate::reopen::set_read_only(&g, &c, &n, true)
        .await
        .unwrap();
    assert_eq!(
        qemu_bitmaps(&p),
        [("r".to_string(), 65536, vec!["auto".to_string()])]
    );
    assert_eq!(qemu_dirty_ranges(&p, "r", &d), ranges(&r, len));
    crate::reopen::set_read_only(&g, &c, &n, false)
        .await
        .unwrap();
    assert_eq!(
        qemu_bitmaps(&p),
        [(
            "r".to_string(),
            65536,
            vec!["in-use".to_string(), "auto".to_string()]
        )]
    );
    drop(c);
    // The bitmap changed meanwhile: the close replaces it.
    r.set_range(7 * MIB, 1);
    close_storing(&g, n, vec![r.clone()]).await;
    assert_check(&p, false);
    assert_eq!(
        qemu_bitmaps(&p),
        [("r".to_string(), 65536, vec!["auto".to_string()])]
    );
    assert_eq!(qemu_dirty_ranges(&p, "r", &d), ranges(&r, len));
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn the_repair_of_a_dirty_image_keeps_the_bitmaps() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("bm-dirty");
    let p = d.join("l.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            s(&p),
            "16M",
        ],
    );
    ok("qemu-img", &["bitmap", "--add", s(&p), "a"]);
    ok("qemu-io", &["-c", "write -q 0 1M", s(&p)]);
    // blockd writes with lazy refcounts and "crashes": the image is dirty.
    let g = BlockGraph::new();
    let n = open(&g, &p, json!({"lazy-refcounts": true})).await;
    assert_eq!(loaded(&n).await.len(), 1);
    n.write(
        4 * MIB,
        Bytes::from(vec![1u8; 1 << 20]),
        ReqFlags::default(),
    )
    .await
    .unwrap();
    n.flush().await.unwrap();
    drop(n);
    drop(g);
    assert_eq!(info(&p)["dirty-flag"], json!(true));
    // The repair at the next open counts the bitmap's clusters.
    let g = BlockGraph::new();
    let n = open(&g, &p, json!({})).await;
    let v = loaded(&n).await;
    assert!(v[0].inconsistent, "the crash left it in use");
    let rep = qcow2_of(&n).check().await.unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    n.driver().remove_persistent_bitmap("a").await.unwrap();
    drop(n);
    del(&g, "q").await;
    assert_check(&p, false);
    assert!(qemu_bitmaps(&p).is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn a_stale_extension_is_ignored_and_dropped_when_writing() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("bm-stale");
    let p = d.join("t.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    ok("qemu-img", &["bitmap", "--add", s(&p), "a"]);
    ok("qemu-io", &["-c", "write -q 0 1M", s(&p)]);
    // A program without bitmap support cleared the autoclear bit.
    let mut img = std::fs::read(&p).unwrap();
    assert_eq!(img[95] & 1, 1);
    img[95] &= !1;
    std::fs::write(&p, &img).unwrap();
    let g = BlockGraph::new();
    let n = open(&g, &p, json!({"read-only": true})).await;
    assert!(loaded(&n).await.is_empty());
    drop(n);
    del(&g, "q").await;
    assert_eq!(std::fs::read(&p).unwrap(), img, "read-only open wrote");
    let g = BlockGraph::new();
    let n = open(&g, &p, json!({})).await;
    assert!(loaded(&n).await.is_empty());
    drop(n);
    del(&g, "q").await;
    // Dropped from the header; its clusters leaked, as with QEMU.
    assert!(qemu_bitmaps(&p).is_empty());
    let o = run("qemu-img", &["check", s(&p)]);
    assert_eq!(o.status.code(), Some(3), "leaks expected");
    let _ = std::fs::remove_dir_all(&d);
}

/// A crash at any point of removing and storing bitmaps leaves an image
/// without corruption, where each bitmap is either its old version marked
/// in use (or already gone, when removed) or its new version.
#[tokio::test]
async fn crash_while_storing_leaves_old_or_new() {
    use super::testutil::{add, graph_with, new_image, MemFile};
    async fn open_mem(f: &MemFile) -> (BlockGraph, Arc<BlockNode>) {
        let g = graph_with(f);
        let n = add(
            &g,
            json!({"driver": "qcow2", "node-name": "q", "file": "mem"}),
        )
        .await
        .unwrap();
        (g, n)
    }
    fn random(rng: &mut Rng, name: &str, g: u64, len: u64) -> StoredBitmap {
        let mut b = StoredBitmap::empty(name, g, len, rng.below(2) == 0);
        for _ in 0..1 + rng.below(6) {
            b.set_range(rng.below(len), rng.below(len / 4));
        }
        b
    }
    // Outcomes seen: (a1 new, b1 stored) and (a1 in use), so that both
    // sides of the switch are exercised.
    let (mut new_seen, mut old_seen) = (0, 0);
    for seed in 0..36u64 {
        let mut rng = Rng::new(seed);
        let cs = [512u64, 4096, 65536][(seed % 3) as usize];
        let len = 4 * MIB;
        let lazy = seed % 4 == 3;
        let f = new_image(len, json!({"cluster-size": cs, "lazy-refcounts": lazy})).await;
        let (g, n) = open_mem(&f).await;
        let a1 = random(&mut rng, "a1", 512, len);
        let a2 = random(&mut rng, "a2", 4096, len);
        close_storing(&g, n, vec![a1.clone(), a2.clone()]).await;
        drop(g);
        let (g, n) = open_mem(&f).await;
        assert_eq!(loaded(&n).await, [a1.clone(), a2.clone()], "seed {seed}");
        n.write(0, Bytes::from(rng.bytes(100_000)), ReqFlags::default())
            .await
            .unwrap();
        let new_a1 = random(&mut rng, "a1", 512, len);
        let b1 = random(&mut rng, "b1", 65536, len);
        {
            let mut st = f.0.lock().unwrap();
            st.budget = Some(st.writes + rng.below(50));
        }
        let _ = n.driver().remove_persistent_bitmap("a2").await;
        n.driver()
            .set_bitmap_source(Some(source(vec![new_a1.clone(), b1.clone()])));
        drop(n);
        for x in g.remove("q").unwrap() {
            let _ = x.close().await;
        }
        let img = f.crash_image(&mut rng);
        drop(g);
        let f2 = MemFile::new(img);
        let (g2, n2) = open_mem(&f2).await;
        let rep = qcow2_of(&n2).check().await.unwrap();
        assert_eq!(rep.corruptions, 0, "seed {seed}: {:?}", rep.messages);
        for b in loaded(&n2).await {
            let ok = match b.name.as_str() {
                "a1" if b.inconsistent => {
                    old_seen += 1;
                    true
                }
                "a1" => {
                    new_seen += 1;
                    b == new_a1
                }
                "a2" => b.inconsistent,
                "b1" => b == b1,
                _ => false,
            };
            assert!(
                ok,
                "seed {seed}: {} inconsistent={}",
                b.name, b.inconsistent
            );
        }
        del(&g2, "q").await;
    }
    assert!(new_seen > 3 && old_seen > 3, "{new_seen} {old_seen}");
}

#[tokio::test]
async fn an_aborted_reopen_read_only_marks_the_stored_bitmaps_in_use_again() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("bm-abort");
    let p = d.join("r.qcow2");
    let p2 = d.join("other.qcow2");
    for x in [&p, &p2] {
        ok("qemu-img", &["create", "-q", "-f", "qcow2", s(x), "8M"]);
    }
    let g = BlockGraph::new();
    let control = blockd_core::ControlLock::new();
    let n = open(&g, &p, json!({})).await;
    let other = super::testutil::add(
        &g,
        json!({"driver": "qcow2", "node-name": "o",
               "file": {"driver": "file", "filename": s(&p2)}}),
    )
    .await
    .unwrap();
    let r = StoredBitmap::empty("r", 65536, 8 * MIB, true);
    n.driver().set_bitmap_source(Some(source(vec![r.clone()])));
    // q becomes read-only (prepare stores its bitmaps), o's options are
    // refused: the reopen is aborted and q stays writable.
    let entries: Vec<crate::options::BlockdevOptions> = serde_json::from_value(json!([
        {"driver": "qcow2", "node-name": "q", "read-only": true,
         "file": {"driver": "file", "filename": s(&p)}},
        {"driver": "qcow2", "node-name": "o", "cache-size": 1, "l2-cache-size": 2,
         "file": {"driver": "file", "filename": s(&p2)}},
    ]))
    .unwrap();
    let c = control.lock().await;
    let e = crate::reopen::blockdev_reopen(&g, &c, entries)
        .await
        .unwrap_err();
    assert_eq!(e.msg, "l2-cache-size may not exceed cache-size");
    drop(c);
    assert!(!n.read_only());
    // The task marking them in use holds the metadata lock: a request
    // through the driver waits for it.
    n.flush().await.unwrap();
    assert_eq!(
        qemu_bitmaps(&p),
        [(
            "r".to_string(),
            65536,
            vec!["in-use".to_string(), "auto".to_string()]
        )]
    );
    drop(other);
    close_storing(&g, n, vec![r]).await;
    assert_check(&p, false);
    let _ = std::fs::remove_dir_all(&d);
}

/// Offsets anywhere in the 64-bit range are refused or counted as
/// corruption, never a crash.
#[tokio::test]
async fn hostile_table_offsets_do_not_crash() {
    use super::testutil::{add, graph_with, new_image, MemFile};
    let len = 4 * MIB;
    let f = new_image(len, json!({})).await;
    let g = graph_with(&f);
    let n = add(
        &g,
        json!({"driver": "qcow2", "node-name": "q", "file": "mem"}),
    )
    .await
    .unwrap();
    let mut b = StoredBitmap::empty("b", 65536, len, true);
    b.set_range(0, 1);
    close_storing(&g, n, vec![b]).await;
    let img = f.data();
    let e = img
        .windows(4)
        .position(|w| w == super::bitmaps::EXT_BITMAPS.to_be_bytes())
        .unwrap()
        + 8;
    let dir = u64::from_be_bytes(img[e + 16..e + 24].try_into().unwrap()) as usize;
    for in_use in [false, true] {
        let mut bad = img.clone();
        // The largest aligned offset, and a table reaching past 2^64.
        bad[dir..dir + 8].copy_from_slice(&0xffff_ffff_ffff_0000u64.to_be_bytes());
        bad[dir + 8..dir + 12].copy_from_slice(&8192u32.to_be_bytes());
        if in_use {
            bad[dir + 15] |= 1;
        }
        let f2 = MemFile::new(bad);
        let g2 = graph_with(&f2);
        let r = add(
            &g2,
            json!({"driver": "qcow2", "node-name": "q", "file": "mem"}),
        )
        .await;
        if !in_use {
            assert_eq!(
                r.unwrap_err().msg,
                "Could not read bitmap_table table from image for bitmap 'b': Input/output error"
            );
            continue;
        }
        // In use: its table is not read at open; the check reports it.
        let n = r.unwrap();
        assert!(loaded(&n).await[0].inconsistent);
        let rep = qcow2_of(&n).check().await.unwrap();
        assert_eq!(rep.corruptions, 1, "{:?}", rep.messages);
        n.driver().remove_persistent_bitmap("b").await.unwrap();
        drop(n);
        del(&g2, "q").await;
    }
}

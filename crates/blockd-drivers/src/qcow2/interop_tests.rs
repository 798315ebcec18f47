//! Interoperability with QEMU 10's `qemu-img` and `qemu-io`: images each
//! side writes are read and checked by the other. Skipped (with a note)
//! where `qemu-img` is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockd_core::{BlockGraph, BlockNode, ReqFlags};
use bytes::Bytes;
use serde_json::json;

use super::testutil::{add, del, qcow2_of, Rng};

const MIB: u64 = 1 << 20;

pub(super) fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img not installed: interop test skipped");
    }
    ok
}

pub(super) fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blockd-qcow2-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub(super) fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().expect("runs")
}

pub(super) fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(super) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` finds no corruption (leaks allowed with `leaks_ok`).
pub(super) fn assert_check(p: &Path, leaks_ok: bool) {
    let o = run("qemu-img", &["check", s(p)]);
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code == 0 || (leaks_ok && code == 3),
        "qemu-img check {} exit {code}: {}{}",
        p.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub(super) async fn open(g: &BlockGraph, path: &Path, extra: serde_json::Value) -> Arc<BlockNode> {
    let mut v = json!({"driver": "qcow2", "node-name": "q", "discard": "unmap",
                       "file": {"driver": "file", "filename": s(path)}});
    if let serde_json::Value::Object(e) = extra {
        v.as_object_mut().unwrap().extend(e);
    }
    add(g, v).await.expect("blockd opens the image")
}

/// Operations both blockd and qemu-io apply.
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
}

fn ops(rng: &mut Rng, size: u64, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let off = rng.below(size / 512) * 512;
            let len = (1 + rng.below(((size - off) / 512).min(512))) * 512;
            if rng.below(4) == 0 {
                Op::Zero(off, len, rng.below(2) == 0)
            } else {
                Op::Write(off, len, 1 + rng.below(250) as u8)
            }
        })
        .collect()
}

#[tokio::test]
async fn qemu_images_written_by_blockd_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("matrix");
    let base = d.join("base.raw");
    ok("qemu-img", &["create", "-f", "raw", s(&base), "6M"]);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x33 0 6M", s(&base)],
    );
    let mut seed = 0;
    for compat in ["0.10", "1.1"] {
        for cs in ["4k", "64k", "2M"] {
            for (backing, prealloc) in [(false, "off"), (false, "metadata"), (true, "off")] {
                seed += 1;
                let img = d.join(format!("t{seed}.qcow2"));
                let reference = d.join(format!("r{seed}.qcow2"));
                let o = format!("compat={compat},cluster_size={cs},preallocation={prealloc}");
                let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
                if backing {
                    args.extend(["-b", "base.raw", "-F", "raw"]);
                }
                for p in [&img, &reference] {
                    let mut a = args.clone();
                    a.extend([s(p), "8M"]);
                    ok("qemu-img", &a);
                }
                let mut rng = Rng::new(seed);
                let ops = ops(&mut rng, 8 * MIB, 25);
                let g = BlockGraph::new();
                let n = open(&g, &img, json!({})).await;
                let mut io_args: Vec<String> = Vec::new();
                for op in &ops {
                    match *op {
                        Op::Write(off, len, p) => {
                            n.write(off, Bytes::from(vec![p; len as usize]), ReqFlags::default())
                                .await
                                .unwrap();
                            io_args.push("-c".into());
                            io_args.push(format!("write -q -P {p} {off} {len}"));
                        }
                        Op::Zero(off, len, unmap) => {
                            let f = ReqFlags {
                                may_unmap: unmap,
                                ..ReqFlags::default()
                            };
                            n.write_zeroes(off, len, f).await.unwrap();
                            io_args.push("-c".into());
                            let u = if unmap { "-u " } else { "" };
                            io_args.push(format!("write -q -z {u}{off} {len}"));
                        }
                    }
                }
                del(&g, "q").await;
                let mut a: Vec<&str> = vec!["-f", "qcow2"];
                a.extend(io_args.iter().map(|x| x.as_str()));
                a.push(s(&reference));
                ok("qemu-io", &a);
                assert_check(&img, false);
                ok("qemu-img", &["compare", "-q", s(&img), s(&reference)]);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn images_created_by_blockd_work_in_qemu() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("create");
    let mut i = 0;
    for (version, cs, prealloc, bits) in [
        ("v3", 65536u64, "off", 16),
        ("v2", 4096, "off", 16),
        ("v3", 2 * MIB, "metadata", 16),
        ("v3", 4096, "falloc", 32),
        ("v3", 512, "full", 1),
        ("v3", 65536, "metadata", 64),
    ] {
        i += 1;
        let p = d.join(format!("c{i}.qcow2"));
        std::fs::write(&p, b"").unwrap();
        let g = BlockGraph::new();
        let f = add(
            &g,
            json!({"driver": "file", "node-name": "f", "filename": s(&p)}),
        )
        .await
        .unwrap();
        let o: super::create::Qcow2CreateOptions = serde_json::from_value(json!({
            "file": "f", "size": 8 * MIB, "version": version, "cluster-size": cs,
            "preallocation": prealloc, "refcount-bits": bits,
        }))
        .unwrap();
        super::create::create(&f, &o).await.unwrap();
        del(&g, "f").await;
        assert_check(&p, false);
        let info = ok("qemu-img", &["info", "--output=json", s(&p)]);
        assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
        let g = BlockGraph::new();
        let n = open(&g, &p, json!({})).await;
        n.write(12345, Bytes::from(vec![0x77; 100_000]), ReqFlags::default())
            .await
            .unwrap();
        del(&g, "q").await;
        assert_check(&p, false);
        let out = ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x77 12345 100000",
                "-c",
                "read -P 0 0 12345",
                s(&p),
            ],
        );
        assert!(!out.contains("failed"), "{out}");
        if prealloc == "metadata" {
            let map = ok("qemu-img", &["map", "--output=json", s(&p)]);
            assert!(
                !map.contains("\"data\": false, \"present\": false"),
                "{map}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn compressed_images_and_snapshots() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("compressed");
    let raw = d.join("src.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "4M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 2M 1536k",
            s(&raw),
        ],
    );
    let c = d.join("c.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            s(&raw),
            s(&c),
        ],
    );
    let g = BlockGraph::new();
    let n = open(&g, &c, json!({})).await;
    let want = std::fs::read(&raw).unwrap();
    assert!(
        n.read(0, want.len()).await.unwrap()[..] == want[..],
        "compressed data reads back"
    );
    // Overwrite part of a compressed cluster: copy-on-write decompresses it.
    n.write(100, Bytes::from(vec![0x99; 10]), ReqFlags::default())
        .await
        .unwrap();
    del(&g, "q").await;
    assert_check(&c, true);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x99 100 10", s(&raw)],
    );
    ok(
        "qemu-img",
        &["compare", "-q", "-f", "qcow2", "-F", "raw", s(&c), s(&raw)],
    );

    // Internal snapshots: shared clusters are copied on write.
    let sn = d.join("snap.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&sn), "4M"]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 0 3M", s(&sn)],
    );
    ok("qemu-img", &["snapshot", "-c", "s1", s(&sn)]);
    let g = BlockGraph::new();
    let n = open(&g, &sn, json!({})).await;
    n.write(
        65536 + 7,
        Bytes::from(vec![0x55; 200_000]),
        ReqFlags::default(),
    )
    .await
    .unwrap();
    n.write_zeroes(
        2 * MIB,
        MIB,
        ReqFlags {
            may_unmap: true,
            ..ReqFlags::default()
        },
    )
    .await
    .unwrap();
    del(&g, "q").await;
    assert_check(&sn, false);
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x55 65543 200000",
            "-c",
            "read -P 0 2M 1M",
            s(&sn),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    ok("qemu-img", &["snapshot", "-a", "s1", s(&sn)]);
    let out = ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x44 0 3M", s(&sn)],
    );
    assert!(!out.contains("failed"), "the snapshot kept its data: {out}");
    assert_check(&sn, false);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn backing_chain_from_the_header() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("chain");
    let (base, mid, top) = (
        d.join("base.qcow2"),
        d.join("mid.qcow2"),
        d.join("top.qcow2"),
    );
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "2M"]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 2M", s(&base)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&mid),
            "4M",
        ],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 1M 512k", s(&mid)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "4M",
        ],
    );
    let g = BlockGraph::new();
    let n = open(&g, &top, json!({})).await;
    assert_eq!(g.len(), 6, "top, mid and base with their files");
    let b = n.child("backing").unwrap().node();
    assert!(b.read_only() && b.auto_named());
    let r = n.read(0, 4 * MIB as usize).await.unwrap();
    assert!(r[..MIB as usize].iter().all(|&x| x == 1));
    assert!(r[MIB as usize..3 * MIB as usize / 2]
        .iter()
        .all(|&x| x == 2));
    assert!(
        r[2 * MIB as usize..].iter().all(|&x| x == 0),
        "beyond base's end"
    );
    assert_eq!(n.allocation_depth(0, 4096).await.unwrap().1, 3);
    // The overlay is locked: qemu-io cannot write it.
    let o = run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", s(&top)]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("lock"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    n.write(0, Bytes::from(vec![9; 512]), ReqFlags::default())
        .await
        .unwrap();
    del(&g, "q").await;
    assert_eq!(g.len(), 0, "implicit backing nodes die with the overlay");
    assert_check(&top, false);
    // A loop in the chain is refused.
    let (a, b) = (d.join("a.qcow2"), d.join("b.qcow2"));
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&a),
            "1M",
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&b),
            "1M",
        ],
    );
    let g = BlockGraph::new();
    let e = add(
        &g,
        json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": s(&a)}}),
    )
    .await
    .unwrap_err();
    assert!(e.msg.contains("loops"), "{}", e.msg);
    assert_eq!(g.len(), 0);
    let _ = std::fs::remove_dir_all(&d);
}

/// Random writes, write-zeroes and discards applied by blockd to a qcow2
/// image and to an in-memory model: `qemu-img compare` against the model
/// written as a raw file, and `qemu-img check`, over many seeds.
#[tokio::test]
async fn differential_against_a_raw_model() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("diff");
    let size = 4 * MIB;
    let base = d.join("base.raw");
    let base_data: Vec<u8> = (0..3 * MIB).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
    std::fs::write(&base, &base_data).unwrap();
    for seed in 0..20u64 {
        let mut rng = Rng::new(seed + 1000);
        let v3 = seed % 2 == 0;
        let cs = [4096u64, 65536, 512][(seed % 3) as usize];
        let backing = seed % 4 >= 2;
        let img = d.join(format!("d{seed}.qcow2"));
        let o = format!(
            "compat={},cluster_size={cs}",
            if v3 { "1.1" } else { "0.10" }
        );
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
        if backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([s(&img), "4M"]);
        ok("qemu-img", &args);
        let mut model = vec![0u8; size as usize];
        if backing {
            model[..base_data.len()].copy_from_slice(&base_data);
        }
        let g = BlockGraph::new();
        let n = open(&g, &img, json!({})).await;
        for _ in 0..100 {
            let off = rng.below(size);
            let len = 1 + rng.below((size - off).min(4 * cs + 1000));
            match rng.below(10) {
                0..=5 => {
                    let data = rng.bytes(len as usize);
                    n.write(off, Bytes::from(data.clone()), ReqFlags::default())
                        .await
                        .unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                6 | 7 => {
                    let f = ReqFlags {
                        may_unmap: rng.below(2) == 0,
                        ..ReqFlags::default()
                    };
                    n.write_zeroes(off, len, f).await.unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    n.discard(off, len).await.unwrap();
                    let a = off.div_ceil(cs) * cs;
                    let b = (off + len) / cs * cs;
                    for i in a..b.max(a) {
                        // v2 discards fall through to the backing file.
                        model[i as usize] = if !v3 && backing {
                            base_data.get(i as usize).copied().unwrap_or(0)
                        } else {
                            0
                        };
                    }
                }
            }
            if rng.below(10) == 0 {
                n.flush().await.unwrap();
            }
        }
        let rep = qcow2_of(&n).check().await.unwrap();
        assert_eq!(rep.corruptions, 0, "seed {seed}: {:?}", rep.messages);
        del(&g, "q").await;
        let raw = d.join(format!("d{seed}.raw"));
        std::fs::write(&raw, &model).unwrap();
        assert_check(&img, false);
        ok(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                s(&img),
                s(&raw),
            ],
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Crash images from the in-memory crash simulation pass `qemu-img check`.
#[tokio::test]
async fn crash_images_pass_qemu_img_check() {
    if !have_qemu() {
        return;
    }
    use super::testutil::{graph_with, new_image};
    let d = tmpdir("crash");
    for seed in 0..12u64 {
        let mut rng = Rng::new(seed + 77);
        let cs = [512u64, 4096, 65536][(seed % 3) as usize];
        let f = new_image(
            2 * MIB,
            json!({"cluster-size": cs, "lazy-refcounts": seed % 4 == 1}),
        )
        .await;
        let g = graph_with(&f);
        let n = add(
            &g,
            json!({"driver": "qcow2", "node-name": "q", "file": "mem", "discard": "unmap"}),
        )
        .await
        .unwrap();
        {
            let mut st = f.0.lock().unwrap();
            st.budget = Some(st.writes + 20 + rng.below(200));
        }
        for i in 0..200 {
            let off = rng.below(2 * MIB - 70000);
            let r = if i % 7 == 6 {
                n.flush().await
            } else if i % 5 == 4 {
                n.discard(off, 70000).await
            } else {
                let len = 1 + rng.below(70000) as usize;
                n.write(off, Bytes::from(rng.bytes(len)), ReqFlags::default())
                    .await
            };
            if r.is_err() {
                break;
            }
        }
        let p = d.join(format!("crash{seed}.qcow2"));
        std::fs::write(&p, f.crash_image(&mut rng)).unwrap();
        if seed % 4 == 1 {
            // Lazy refcounts: the image is dirty; opening it repairs it.
            let g = BlockGraph::new();
            open(&g, &p, json!({})).await;
            del(&g, "q").await;
        }
        assert_check(&p, true);
    }
    let _ = std::fs::remove_dir_all(&d);
}

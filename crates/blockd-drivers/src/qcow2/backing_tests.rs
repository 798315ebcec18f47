//! Changing the backing file recorded in the header
//! (`BlockDriver::change_backing_file`): over in-memory images, and
//! against `qemu-img`/`qemu-io` (skipped where they are not installed).

use std::sync::Arc;

use blockd_core::{BlockGraph, BlockNode, ReqFlags};
use bytes::Bytes;
use serde_json::{json, Value};

use super::header::{self, Header, ImageHeader, RawExtension, INCOMPAT_DIRTY};
use super::interop_tests::{assert_check, have_qemu, ok, open, run, s, tmpdir};
use super::testutil::*;

const MIB: u64 = 1 << 20;

/// The header as it is in the file now.
fn header_of(f: &MemFile) -> ImageHeader {
    let d = f.data();
    let len = d.len() as u64;
    let cs = header::parse_fixed(&d, len).unwrap().cluster_size();
    header::parse(&d[..cs.min(len) as usize], len).unwrap()
}

/// The fixed fields but for the backing file name's place.
fn fixed(h: &Header) -> Header {
    Header {
        backing_file_offset: 0,
        backing_file_size: 0,
        ..h.clone()
    }
}

/// A 4 MiB image whose header also has what a newer QEMU might write:
/// a header field QEMU 10 does not know (v3) and an unknown extension
/// after QEMU's own.
async fn image(version: &str, cs: u64) -> MemFile {
    let f = new_image(4 * MIB, json!({"version": version, "cluster-size": cs})).await;
    let mut data = f.data();
    let img = header_of(&f);
    let mut h = img.header;
    if h.version == 3 {
        h.header_length += 8;
        h.unknown_fields = b"newfield".to_vec();
    }
    let mut kept = img.ext.kept;
    kept.push(RawExtension {
        ty: 0x7e57_0001,
        data: b"unknown extension".to_vec(),
    });
    let c = header::build_header_cluster(&h, None, None, &kept).unwrap();
    data[..c.len()].copy_from_slice(&c);
    MemFile::new(data)
}

/// Opens the image without opening the backing file the header names.
async fn open_mem(f: &MemFile, extra: Value) -> (BlockGraph, Arc<BlockNode>) {
    let g = graph_with(f);
    let mut v = json!({"driver": "qcow2", "node-name": "q", "file": "mem", "backing": null});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let n = add(&g, v).await.expect("open");
    (g, n)
}

fn names(n: &BlockNode) -> (Option<String>, Option<String>) {
    let i = n.driver().info();
    (i.backing_filename, i.backing_format)
}

fn owned(name: Option<&str>, format: Option<&str>) -> (Option<String>, Option<String>) {
    (name.map(str::to_owned), format.map(str::to_owned))
}

#[tokio::test]
async fn changes_rewrite_only_the_backing_file_fields() {
    for (version, cs) in [("v3", 65536), ("v2", 65536), ("v3", 512)] {
        let f = image(version, cs).await;
        let before = header_of(&f);
        assert!(before.ext.kept.len() == 1 + usize::from(version == "v3" && cs > 4096));
        let (g, n) = open_mem(&f, json!({})).await;
        n.write(0, Bytes::from(vec![0x11; 70_000]), ReqFlags::default())
            .await
            .unwrap();
        n.write(
            3 * MIB - 100,
            Bytes::from(vec![0x22; 5000]),
            ReqFlags::default(),
        )
        .await
        .unwrap();
        let content = n.read(0, 4 * MIB as usize).await.unwrap();
        del(&g, "q").await;
        for (name, format) in [
            (Some("base.qcow2"), Some("qcow2")),
            (Some("../other dir/base.raw"), None),
            (None, None),
        ] {
            let (g, n) = open_mem(&f, json!({})).await;
            n.driver().change_backing_file(name, format).await.unwrap();
            assert_eq!(names(&n), owned(name, format), "{version} {cs}: shown");
            let after = header_of(&f);
            assert_eq!(after.backing_file.as_deref(), name);
            assert_eq!(after.ext.backing_format.as_deref(), format);
            assert_eq!(after.ext.kept, before.ext.kept, "other extensions kept");
            assert_eq!(fixed(&after.header), fixed(&before.header));
            if version == "v3" {
                assert_eq!(&f.data()[112..120], b"newfield");
            }
            del(&g, "q").await;
            // Opened again, the image shows the same and holds the same data.
            let (g, n) = open_mem(&f, json!({})).await;
            assert_eq!(names(&n), owned(name, format), "{version} {cs}: reopened");
            assert!(n.read(0, 4 * MIB as usize).await.unwrap() == content);
            assert_consistent(&n).await;
            del(&g, "q").await;
        }
    }
}

#[tokio::test]
async fn refused_changes_change_nothing() {
    // 512-byte clusters: the header (120 bytes), the unknown extension
    // (32) and the end marker (8) leave 352 bytes for the name.
    let f = image("v3", 512).await;
    let (g, n) = open_mem(&f, json!({})).await;
    let before = f.data();
    let (room, long) = ("n".repeat(352), "x".repeat(1024));
    for (name, format, errno) in [
        (Some(&room[..]), Some("raw"), libc::ENOSPC),
        (Some(&*format!("{room}n")), None, libc::ENOSPC),
        (Some(&long[..]), None, libc::EINVAL),
        (None, Some("raw"), libc::EINVAL),
        (Some("a"), Some("sixteen-letters!"), libc::EINVAL),
        (Some("a\0b"), None, libc::EINVAL),
    ] {
        let e = n.driver().change_backing_file(name, format).await;
        assert_eq!(e.unwrap_err().raw_os_error(), Some(errno), "{format:?}");
        assert!(f.data() == before, "the image is unchanged");
        assert_eq!(names(&n), (None, None));
    }
    // What fits exactly is written.
    n.driver()
        .change_backing_file(Some(&room[..]), None)
        .await
        .unwrap();
    assert_eq!(header_of(&f).backing_file.as_deref(), Some(&room[..]));
    del(&g, "q").await;

    // The longest name QEMU allows.
    let f = image("v3", 65536).await;
    let (g, n) = open_mem(&f, json!({})).await;
    let d = n.driver();
    d.change_backing_file(Some(&long[1..]), Some("raw"))
        .await
        .unwrap();
    assert_eq!(header_of(&f).backing_file.as_deref(), Some(&long[1..]));
    del(&g, "q").await;

    // A read-only node is not written.
    let (g, n) = open_mem(&f, json!({"read-only": true})).await;
    let before = f.data();
    let e = n.driver().change_backing_file(None, None).await;
    assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EPERM));
    assert!(f.data() == before);
    del(&g, "q").await;
}

/// The header goes to disk in one write, then a flush; when that write
/// fails, the driver still shows the old names.
#[tokio::test]
async fn the_change_is_one_write_then_a_flush() {
    let f = image("v3", 65536).await;
    let (_g, n) = open_mem(&f, json!({})).await;
    let writes = f.0.lock().unwrap().writes;
    n.driver()
        .change_backing_file(Some("b.img"), Some("raw"))
        .await
        .unwrap();
    {
        let st = f.0.lock().unwrap();
        assert_eq!(st.writes, writes + 1, "one write");
        assert!(st.log.is_empty() && st.durable == st.volatile, "flushed");
    }
    f.0.lock().unwrap().budget = Some(writes + 1);
    let e = n.driver().change_backing_file(Some("c.img"), None).await;
    assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(names(&n), owned(Some("b.img"), Some("raw")));
    assert_eq!(header_of(&f).backing_file.as_deref(), Some("b.img"));
}

/// The rewrite carries the header as it is on disk now, not as it was at
/// open: the dirty bit lazy refcounts set, a refcount table that moved.
#[tokio::test]
async fn the_rewrite_keeps_the_current_dirty_bit_and_refcount_table() {
    let f = new_image(
        24 * MIB,
        json!({"cluster-size": 512, "lazy-refcounts": true}),
    )
    .await;
    let opened = header_of(&f);
    let (g, n) = open_mem(&f, json!({})).await;
    let chunk = vec![0x5au8; 256 * 1024];
    for i in 0..(20 * MIB / chunk.len() as u64) {
        let off = i * chunk.len() as u64;
        n.write(off, Bytes::from(chunk.clone()), ReqFlags::default())
            .await
            .unwrap();
    }
    n.flush().await.unwrap();
    let before = header_of(&f);
    assert_ne!(
        before.header.refcount_table_offset,
        opened.header.refcount_table_offset
    );
    assert!(before.header.incompatible_features & INCOMPAT_DIRTY != 0);
    n.driver()
        .change_backing_file(Some("base.img"), Some("qcow2"))
        .await
        .unwrap();
    assert_eq!(fixed(&header_of(&f).header), fixed(&before.header));
    del(&g, "q").await;
    let (g, n) = open_mem(&f, json!({})).await;
    assert_eq!(n.driver().info().dirty, Some(false));
    let r = n.read(19 * MIB, 4096).await.unwrap();
    assert!(r.iter().all(|&b| b == 0x5a));
    assert_consistent(&n).await;
    del(&g, "q").await;
}

/// `qemu-img info` as JSON.
fn info(p: &std::path::Path) -> Value {
    serde_json::from_str(&ok("qemu-img", &["info", "--output=json", s(p)])).unwrap()
}

/// Images `qemu-img create` made (v2 and v3, with and without a backing
/// file, v3 with QEMU's feature table) whose backing file blockd changes:
/// `qemu-img info` shows the change, `qemu-img check` is clean, `qemu-io`
/// reads the same data (and the new backing file's where the image has
/// none), and where `qemu-img rebase -u` can make the same change, its
/// header cluster is blockd's byte for byte.
#[tokio::test]
async fn qemu_reads_images_whose_backing_file_blockd_changed() {
    if !have_qemu() {
        return;
    }
    let d = tmpdir("change-backing");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&d.join("base.raw")), "4M"],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 4M",
            s(&d.join("base.raw")),
        ],
    );
    let base2 = d.join("base.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base2), "4M"],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 0 4M", s(&base2)],
    );
    let mut i = 0;
    for compat in ["0.10", "1.1"] {
        for backing in [false, true] {
            i += 1;
            let (img, twin) = (d.join(format!("i{i}.qcow2")), d.join(format!("t{i}.qcow2")));
            let o = format!("compat={compat}");
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
            if backing {
                args.extend(["-b", "base.raw", "-F", "raw"]);
            }
            args.extend([s(&img), "4M"]);
            ok("qemu-img", &args);
            let w = ["-c", "write -P 0x55 0 64k", "-c", "write -P 0x66 1M 64k"];
            ok("qemu-io", &[&["-f", "qcow2"][..], &w, &[s(&img)]].concat());
            let first = |p: &std::path::Path| std::fs::read(p).unwrap()[..65536].to_vec();
            let kept = header::parse(&first(&img), 1 << 30).unwrap().ext.kept;
            assert_eq!(
                kept.len(),
                usize::from(compat == "1.1"),
                "the feature table"
            );
            for (name, format) in [
                (Some("base.qcow2"), Some("qcow2")),
                (Some("base.raw"), None),
                (None, None),
            ] {
                let what = format!("compat {compat}, backing {backing}, to {name:?} {format:?}");
                std::fs::copy(&img, &twin).unwrap();
                let g = BlockGraph::new();
                let n = open(&g, &img, json!({"backing": null})).await;
                n.driver().change_backing_file(name, format).await.unwrap();
                del(&g, "q").await;
                let v = info(&img);
                assert_eq!(v["backing-filename"].as_str(), name, "{what}: {v}");
                assert_eq!(v["backing-filename-format"].as_str(), format, "{what}: {v}");
                assert_check(&img, false);
                let h = header::parse(&first(&img), 1 << 30).unwrap();
                assert_eq!(h.ext.kept, kept, "{what}");
                let under = match name {
                    Some("base.qcow2") => "0x22",
                    Some(_) => "0x11",
                    None => "0",
                };
                let r = run(
                    "qemu-io",
                    &[
                        "-f",
                        "qcow2",
                        "-c",
                        "read -P 0x55 0 64k",
                        "-c",
                        "read -P 0x66 1M 64k",
                        "-c",
                        &format!("read -P {under} 2M 64k"),
                        s(&img),
                    ],
                );
                let out = String::from_utf8_lossy(&r.stdout);
                assert!(r.status.success() && !out.contains("fail"), "{what}: {out}");
                if name.is_none() || format.is_some() {
                    let mut a = vec!["rebase", "-u", "-b", name.unwrap_or("")];
                    if let Some(f) = format {
                        a.extend(["-F", f]);
                    }
                    ok("qemu-img", &[&a[..], &[s(&twin)]].concat());
                    assert!(first(&img) == first(&twin), "{what}: QEMU's header differs");
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

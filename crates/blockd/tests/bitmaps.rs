//! Dirty bitmaps end to end: a client writes through an NBD export at
//! random places; the dirty extents read back over the export's
//! `qemu:dirty-bitmap:NAME` contexts (by QEMU's `qemu-img map` with
//! `x-dirty-bitmap`, and by libnbd's `nbdinfo --map` where installed) are
//! exactly the clusters written, at two granularities.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{have, ok, Server};
use serde_json::{json, Value};

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

const SIZE: u64 = 8 << 20;

/// The dirty runs `(start, len)` a set of dirty chunks makes.
fn runs(chunks: &BTreeSet<u64>, g: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        let (s, e) = (c * g, ((c + 1) * g).min(SIZE));
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 = e - last.0,
            _ => out.push((s, e - s)),
        }
    }
    out
}

/// Dirty runs as `qemu-img map` shows them with `x-dirty-bitmap`: a dirty
/// extent reads as `"data": false`.
fn qemu_img_runs(nbd: &Path, ctx: &str) -> Vec<(u64, u64)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=d,x-dirty-bitmap=qemu:dirty-bitmap:{ctx}",
        nbd.display()
    );
    let out = ok(&Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts", &opts])
        .output()
        .unwrap());
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut total = 0;
    let mut dirty = Vec::new();
    for e in v.as_array().unwrap() {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(s, total, "extents are contiguous");
        total += l;
        if e["data"] == json!(false) {
            dirty.push((s, l));
        }
    }
    assert_eq!(total, SIZE);
    dirty
}

/// Dirty runs as `nbdinfo --map` lists them (`start len flags desc`).
fn nbdinfo_runs(nbd: &Path, ctx: &str) -> Vec<(u64, u64)> {
    let out = ok(&Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{ctx}"))
        .arg(format!("nbd+unix:///d?socket={}", nbd.display()))
        .output()
        .unwrap());
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

#[test]
fn nbd_writes_read_back_as_dirty_extents() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let srv = Server::start("bm1");
    let img = srv.dir.join("a.qcow2");
    let nbd = srv.dir.join("nbd");
    ok(&Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"])
        .output()
        .unwrap());
    let mut c = srv.client();
    c.execute(
        "blockdev-add",
        Some(
            json!({"driver": "qcow2", "node-name": "q0", "discard": "unmap",
                    "file": {"driver": "file", "filename": img}}),
        ),
    )
    .unwrap();
    for (name, g) in [("coarse", 65536), ("fine", 4096)] {
        c.execute(
            "block-dirty-bitmap-add",
            Some(json!({"node": "q0", "name": name, "granularity": g})),
        )
        .unwrap();
    }
    c.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": nbd}}})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(
            json!({"type": "nbd", "id": "e0", "node-name": "q0", "name": "d",
                    "writable": true, "bitmaps": ["coarse", "fine"]}),
        ),
    )
    .unwrap();

    // Writes, write-zeroes and discards at random places, of random
    // lengths (not aligned to either granularity).
    let mut rng = Rng(0xb17);
    let mut cmds = Vec::new();
    let mut coarse = BTreeSet::new();
    let mut fine = BTreeSet::new();
    for i in 0..40 {
        let len = 1 + rng.next() % 20000;
        let off = rng.next() % (SIZE - len);
        cmds.push("-c".to_string());
        cmds.push(match i % 5 {
            3 => format!("write -z {off} {len}"),
            4 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", i % 256),
        });
        for (set, g) in [(&mut coarse, 65536), (&mut fine, 4096)] {
            for ch in off / g..=(off + len - 1) / g {
                set.insert(ch);
            }
        }
    }
    let url = format!("nbd+unix:///d?socket={}", nbd.display());
    ok(&Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(&cmds)
        .arg(&url)
        .output()
        .unwrap());

    for (name, set, g) in [("coarse", &coarse, 65536), ("fine", &fine, 4096)] {
        let want = runs(set, g);
        assert!(want.len() > 10, "the writes spread out");
        assert_eq!(qemu_img_runs(&nbd, name), want, "qemu-img map of {name}");
        if have("nbdinfo") {
            assert_eq!(nbdinfo_runs(&nbd, name), want, "nbdinfo --map of {name}");
        }
        let nodes = c
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .unwrap();
        let q0 = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "q0")
            .unwrap();
        let info = q0["dirty-bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap();
        let count: u64 = want.iter().map(|r| r.1).sum();
        assert_eq!(info["count"], json!(count));
        assert_eq!(info["busy"], json!(true));
    }

    // Cleared bitmaps read back clean; only later writes show.
    c.execute("block-export-del", Some(json!({"id": "e0"})))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    c.execute(
        "block-dirty-bitmap-clear",
        Some(json!({"node": "q0", "name": "fine"})),
    )
    .unwrap();
    c.execute(
        "block-export-add",
        Some(
            json!({"type": "nbd", "id": "e1", "node-name": "q0", "name": "d",
                    "writable": true, "bitmaps": ["fine"]}),
        ),
    )
    .unwrap();
    assert_eq!(qemu_img_runs(&nbd, "fine"), vec![]);
    ok(&Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 5000 10000", &url])
        .output()
        .unwrap());
    assert_eq!(qemu_img_runs(&nbd, "fine"), vec![(4096, 12288)]);
}

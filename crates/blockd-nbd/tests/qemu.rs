//! Interoperability with QEMU 10's tools (`qemu-io`, `qemu-img`,
//! `qemu-nbd`) as NBD clients of an in-process server. Each test is
//! skipped, with a message, when the tool is not installed.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;

use blockd_nbd::{ExportConfig, Listen, NbdServer, ServerOptions};
use common::*;
use serde_json::Value;
use tokio::process::Command;

fn have(tool: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed; QEMU interop test skipped");
    }
    ok
}

fn uri(s: &NbdServer, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", s.local_addr())
}

async fn run(tool: &str, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    if !out.status.success() {
        panic!(
            "{tool} {args:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A scratch file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> TempFile {
        TempFile(PathBuf::from(format!(
            "/tmp/nbdt-{}-{tag}.img",
            std::process::id()
        )))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_a_pattern() {
    if !have("qemu-io") {
        return;
    }
    let disk = Arc::new(MemDisk::new(1 << 20, false));
    let s = serve("qio", "e", disk.clone(), true).await;
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri(&s, "e"),
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 4k 4k",
            "-c",
            "read -P 0 4k 4k",
            "-c",
            "discard 64k 64k",
            "-c",
            "flush",
            "-c",
            "aio_write -P 0x11 128k 1k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x11 128k 1k",
        ],
    )
    .await;
    let t = text(&out);
    assert!(!t.contains("failed"), "{t}");
    assert!(!t.contains("error"), "{t}");
    assert_eq!(disk.get(0, 4096), vec![0xab; 4096]);
    assert_eq!(disk.get(4096, 4096), vec![0; 4096]);
    assert_eq!(disk.get(128 << 10, 1024), vec![0x11; 1024]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_on_a_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let disk = Arc::new(MemDisk::new(1 << 20, false));
    disk.put(0, &[7; 512]);
    let s = serve("qro", "ro", disk.clone(), false).await;
    let out = run(
        "qemu-io",
        &["-r", "-f", "raw", &uri(&s, "ro"), "-c", "read -P 7 0 512"],
    )
    .await;
    assert!(!text(&out).contains("failed"), "{}", text(&out));
    // Opening it writable fails cleanly.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri(&s, "ro"), "-c", "write 0 512"])
        .output()
        .await
        .unwrap();
    assert!(text(&out).to_lowercase().contains("read-only") || !out.status.success());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = TempFile::new("src");
    let dst = TempFile::new("dst");
    run("qemu-img", &["create", "-f", "raw", src.path(), "4M"]).await;
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            src.path(),
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xc3 3M 512k",
        ],
    )
    .await;
    let disk = Arc::new(MemDisk::new(4 << 20, true));
    let s = serve("conv", "e", disk.clone(), true).await;
    let u = uri(&s, "e");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src.path(), &u],
    )
    .await;
    assert_eq!(disk.get(0, 4096), vec![0x5a; 4096]);
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src.path(), &u],
    )
    .await;
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &u, dst.path()],
    )
    .await;
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src.path(), dst.path()],
    )
    .await;
    // A difference is found.
    disk.put(2 << 20, &[1]);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", src.path(), &u])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_shows_holes_zeroes_and_data() {
    if !have("qemu-img") {
        return;
    }
    let disk = Arc::new(MemDisk::new(1 << 20, true));
    disk.put(64 << 10, &[1; 128 << 10]);
    disk.put(512 << 10, &[2; 4096]);
    let s = serve("map", "e", disk.clone(), true).await;
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri(&s, "e")],
    )
    .await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(u64, u64, bool, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    let k = 1024;
    assert_eq!(
        got,
        vec![
            (0, 64 * k, false, true),
            (64 * k, 128 * k, true, false),
            (192 * k, 320 * k, false, true),
            (512 * k, 4 * k, true, false),
            (516 * k, 508 * k, false, true),
        ]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_lists_exports() {
    if !have("qemu-nbd") {
        return;
    }
    let s = NbdServer::start(Listen::Unix(sock_path("list")), ServerOptions::default())
        .await
        .unwrap();
    for (name, desc, depth) in [
        ("disk0", Some("the first disk"), true),
        ("other", None, false),
    ] {
        s.add_export(ExportConfig {
            name: name.into(),
            description: desc.map(Into::into),
            io: Arc::new(MemDisk::new(2 << 20, false)),
            writable: name == "disk0",
            allocation_depth: depth,
            bitmaps: Vec::new(),
        })
        .unwrap();
    }
    let out = run("qemu-nbd", &["--list", "-k", &s.local_addr()]).await;
    let t = text(&out);
    assert!(t.contains("exports available: 2"), "{t}");
    assert!(t.contains("export: 'disk0'"), "{t}");
    assert!(t.contains("description: the first disk"), "{t}");
    assert!(t.contains("export: 'other'"), "{t}");
    assert!(t.contains("size:  2097152"), "{t}");
    assert!(t.contains("base:allocation"), "{t}");
    assert!(t.contains("qemu:allocation-depth"), "{t}");
    assert!(t.contains("min block: 1"), "{t}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_qemu_io_clients() {
    if !have("qemu-io") {
        return;
    }
    let disk = Arc::new(MemDisk::new(16 << 20, false));
    let s = serve("conc", "e", disk.clone(), true).await;
    let u = uri(&s, "e");
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = format!("write -P {} {}M 2M", i + 1, i * 2);
            run("qemu-io", &["-f", "raw", &u, "-c", &cmd]).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut args = vec!["-f".to_string(), "raw".into(), u.clone()];
    for i in 0..8u32 {
        args.push("-c".into());
        args.push(format!("read -P {} {}M 2M", i + 1, i * 2));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &args).await;
    assert!(!text(&out).contains("failed"), "{}", text(&out));
    for i in 0..8u64 {
        assert_eq!(disk.get(i * (2 << 20) + 12345, 16), vec![i as u8 + 1; 16]);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_bench_completes() {
    if !have("qemu-img") {
        return;
    }
    let disk = Arc::new(MemDisk::new(16 << 20, false));
    let s = serve("bench", "e", disk.clone(), true).await;
    let u = uri(&s, "e");
    for extra in [&[][..], &["-w"][..]] {
        let mut args = vec![
            "bench", "-f", "raw", "-t", "none", "-c", "2000", "-d", "16", "-s", "4096",
        ];
        args.extend_from_slice(extra);
        args.push(&u);
        let out = run("qemu-img", &args).await;
        assert!(text(&out).contains("Run completed in"), "{}", text(&out));
    }
    s.stop().await;
}

/// The benchmark of the report: `cargo test --release -p blockd-nbd --test
/// qemu -- --ignored --nocapture bench_report`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_report() {
    if !have("qemu-img") {
        return;
    }
    let disk = Arc::new(MemDisk::new(128 << 20, false));
    let s = serve("rep", "e", disk.clone(), true).await;
    let u = uri(&s, "e");
    for extra in [&[][..], &["-w"][..]] {
        let mut args = vec![
            "bench", "-f", "raw", "-t", "none", "-c", "20000", "-d", "16", "-s", "4096",
        ];
        args.extend_from_slice(extra);
        args.push(&u);
        let out = run("qemu-img", &args).await;
        let t = text(&out);
        let secs: f64 = t
            .split("Run completed in ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        println!(
            "blockd-nbd {}: {:.0} ops/s ({secs} s for 20000 requests)",
            if extra.is_empty() { "read" } else { "write" },
            20000.0 / secs
        );
    }
    s.stop().await;
}

//! I/O limits under load, through NBD exports with `qemu-img bench`
//! (QEMU's iotests 093 and 245's throttle cases in spirit): a bps limit, an
//! iops limit, a burst, and a group of three nodes whose combined rate is
//! the group's while each gets its share. Then the promise that nothing
//! waits out a throttle: removing the limits, a reopen into another
//! group and `quit` release queued requests at once.
//!
//! The upper bounds are the safety property (never more than the limit
//! plus the 5 ms slack and one request); the lower bounds only check that
//! the limit is what binds, loosely, since a loaded 2-core CI machine may
//! wake timers late.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockd_testkit::QmpClient;
use common::{have, Server};
use serde_json::{json, Value};

fn run(c: &mut QmpClient, name: &str, args: Value) -> Value {
    c.execute(name, Some(args.clone()))
        .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
}

/// A server with a null-co data node, an NBD server, and for each
/// `(group, limits)` a throttle-group object; returns the NBD socket.
fn setup(srv: &Server, c: &mut QmpClient, groups: &[(&str, Value)]) -> String {
    let nbd = srv.dir.join("nbd").to_string_lossy().into_owned();
    run(
        c,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "data", "size": 1u64 << 30}),
    );
    run(
        c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    for (g, limits) in groups {
        run(
            c,
            "object-add",
            json!({"qom-type": "throttle-group", "id": g, "limits": limits}),
        );
    }
    nbd
}

/// Exports a throttle node `name` in `group` over the data node.
fn throttled_export(c: &mut QmpClient, name: &str, group: &str) {
    run(
        c,
        "blockdev-add",
        json!({"driver": "throttle", "node-name": name, "throttle-group": group, "file": "data"}),
    );
    run(
        c,
        "block-export-add",
        json!({"type": "nbd", "id": format!("e-{name}"), "node-name": name, "name": name, "writable": true}),
    );
}

fn bench(nbd: &str, export: &str, count: u64, size: u64, depth: u32, write: bool) -> Child {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "raw", "-d", &depth.to_string()])
        .args(["-c", &count.to_string(), "-s", &size.to_string()]);
    if write {
        cmd.arg("-w");
    }
    cmd.arg(format!("nbd+unix:///{export}?socket={nbd}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-img bench")
}

/// The seconds `qemu-img bench` reports ("Run completed in X seconds.").
fn seconds(child: Child) -> f64 {
    let out = child.wait_with_output().expect("qemu-img bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img bench failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no run time in: {text}"))
}

/// Runs one bench and returns achieved/limit for `units_per_req` units
/// per request.
fn ratio(nbd: &str, export: &str, count: u64, size: u64, units_per_req: f64, limit: f64) -> f64 {
    let s = seconds(bench(nbd, export, count, size, 8, false));
    count as f64 * units_per_req / s / limit
}

#[test]
fn a_bps_limit_and_an_iops_limit_hold() {
    if !have("qemu-img") {
        return;
    }
    let srv = Server::start("thr-load");
    let mut c = srv.client();
    let nbd = setup(
        &srv,
        &mut c,
        &[
            ("tb", json!({"bps-total": 8_000_000})),
            ("ti", json!({"iops-total": 400})),
        ],
    );
    throttled_export(&mut c, "b", "tb");
    throttled_export(&mut c, "i", "ti");
    // 2 s worth each: 244 × 64 KiB at 8 MB/s; 800 × 4 KiB at 400/s.
    let rb = ratio(&nbd, "b", 244, 65536, 65536.0, 8e6);
    let ri = ratio(&nbd, "i", 800, 4096, 1.0, 400.0);
    // At most the slack (0.5%) and one request over 2 s above the limit.
    assert!((0.85..=1.01).contains(&rb), "bps ratio {rb}");
    assert!((0.85..=1.01).contains(&ri), "iops ratio {ri}");
    // Writes count too (the same total buckets).
    let s = seconds(bench(&nbd, "i", 400, 4096, 8, true));
    let rw = 400.0 / s / 400.0;
    assert!((0.85..=1.02).contains(&rw), "iops write ratio {rw}");
}

#[test]
fn a_burst_runs_at_the_burst_rate_then_the_average() {
    if !have("qemu-img") {
        return;
    }
    let srv = Server::start("thr-burst");
    let mut c = srv.client();
    // 2 MB/s on average, bursts at 10 MB/s for 1 s: the bucket holds
    // 10 MB, filled at 8 MB/s net, so the burst lasts 1.25 s (12.5 MB).
    let nbd = setup(
        &srv,
        &mut c,
        &[(
            "t",
            json!({"bps-total": 2_000_000, "bps-total-max": 10_000_000, "bps-total-max-length": 1}),
        )],
    );
    throttled_export(&mut c, "n", "t");
    // 10 MB: within the burst, at the burst rate (>= 5x the average).
    let s = seconds(bench(&nbd, "n", 152, 65536, 8, false));
    let rate = 152.0 * 65536.0 / s;
    assert!(rate > 5e6, "burst rate {rate}");
    // The bucket is now nearly full: the next 2 MB go at about the average.
    let s = seconds(bench(&nbd, "n", 31, 65536, 8, false));
    let rate = 31.0 * 65536.0 / s;
    assert!(rate < 3.5e6, "after the burst {rate}");
}

#[test]
fn a_group_of_three_shares_its_limit_fairly() {
    if !have("qemu-img") {
        return;
    }
    let srv = Server::start("thr-group");
    let mut c = srv.client();
    let nbd = setup(&srv, &mut c, &[("g", json!({"iops-total": 600}))]);
    for n in ["a", "b", "c"] {
        throttled_export(&mut c, n, "g");
    }
    // Each asks for as much as the whole group allows in 2 s; together
    // they get 600/s and each about a third. Each bench runs until its
    // own 400 requests are done: the first to finish does so after about
    // 2 s (1200 requests in the group).
    let t0 = Instant::now();
    let kids: Vec<Child> = ["a", "b", "c"]
        .iter()
        .map(|n| bench(&nbd, n, 400, 4096, 8, false))
        .collect();
    let secs: Vec<f64> = kids.into_iter().map(seconds).collect();
    let wall = t0.elapsed().as_secs_f64();
    // 1200 requests at 600/s: 2 s; never faster than the limit allows.
    assert!(wall >= 1.95, "all three done in {wall} s");
    assert!(wall < 3.0, "all three took {wall} s");
    // Round-robin: they finish within a few requests of each other.
    let (min, max) = secs
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), &s| (a.min(s), b.max(s)));
    assert!(max - min < 0.25, "unfair shares: {secs:?}");
}

fn qemu_io_read(nbd: &str, export: &str, len: &str) -> Child {
    Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("aio_read 0 {len}"),
            "-c",
            "aio_flush",
        ])
        .arg(format!("nbd+unix:///{export}?socket={nbd}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io")
}

fn wait_done(mut child: Child, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(
                st.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: still waiting after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Gives a client time to connect and queue its requests at the throttle.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn queued_requests_go_at_once_when_the_limits_go() {
    if !have("qemu-io") {
        return;
    }
    let srv = Server::start("thr-lift");
    let mut c = srv.client();
    // 1 KiB/s: a 4 MiB read would take over an hour.
    let nbd = setup(
        &srv,
        &mut c,
        &[("slow", json!({"bps-total": 1024})), ("fast", json!({}))],
    );
    throttled_export(&mut c, "n", "slow");
    // New limits for the group: re-timed at once (unlimited: they go).
    let r = qemu_io_read(&nbd, "n", "4M");
    settle();
    run(
        &mut c,
        "qom-set",
        json!({"path": "/objects/slow", "property": "limits", "value": {"bps-total": 0}}),
    );
    wait_done(
        r,
        Duration::from_secs(10),
        "read after the limits were lifted",
    );
    // A reopen into another group drains the node: the queued read goes.
    run(
        &mut c,
        "qom-set",
        json!({"path": "/objects/slow", "property": "limits", "value": {"bps-total": 1024}}),
    );
    let r = qemu_io_read(&nbd, "n", "4M");
    settle();
    run(
        &mut c,
        "blockdev-reopen",
        json!({"options": [{"driver": "throttle", "node-name": "n", "throttle-group": "fast", "file": "data"}]}),
    );
    wait_done(r, Duration::from_secs(10), "read after the reopen");
    // The group has no member left: it can go.
    run(&mut c, "object-del", json!({"id": "slow"}));
}

#[test]
fn quit_does_not_wait_out_the_throttle() {
    if !have("qemu-io") {
        return;
    }
    let mut srv = Server::start("thr-quit");
    let mut c = srv.client();
    let nbd = setup(&srv, &mut c, &[("slow", json!({"iops-total": 1}))]);
    throttled_export(&mut c, "n", "slow");
    // 64 reads at 1/s: a minute, unless quit releases them.
    let r = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args((0..64).flat_map(|i| ["-c".to_string(), format!("aio_read {} 4k", i * 4096)]))
        .arg(format!("nbd+unix:///n?socket={nbd}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    settle();
    let t0 = Instant::now();
    run(&mut c, "quit", json!({}));
    while srv.is_alive() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "quit waited for the throttle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut r = r;
    let _ = r.kill();
    let _ = r.wait();
}

/// The server's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name: state is 3rd, utime 14th, stime 15th.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn requests_waiting_at_a_throttle_cost_no_cpu() {
    if !have("qemu-io") {
        return;
    }
    let srv = Server::start("thr-idle");
    let mut c = srv.client();
    let nbd = setup(&srv, &mut c, &[("slow", json!({"iops-total": 1}))]);
    throttled_export(&mut c, "n", "slow");
    let r = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args((0..32).flat_map(|i| ["-c".to_string(), format!("aio_read {} 4k", i * 4096)]))
        .arg(format!("nbd+unix:///n?socket={nbd}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    settle();
    // Requests queued, one timer a second: a busy-waiting server would
    // burn 2 s of CPU here; timers cost next to nothing.
    let before = cpu_ticks(srv.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(srv.pid()) - before;
    // The client goes away with its reads still queued at the throttle;
    // SIGTERM must not wait them out (one a second: half a minute).
    let mut r = r;
    let _ = r.kill();
    let _ = r.wait();
    // 100 ticks a second: under 0.1 s of CPU in 2 s.
    assert!(used < 10, "{used} ticks of CPU while throttled");
    let mut srv = srv;
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid has no memory-safety
    // preconditions.
    unsafe {
        libc::kill(srv.pid() as libc::pid_t, libc::SIGTERM);
    }
    while srv.is_alive() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "SIGTERM waited for the throttle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_throttle_node_goes_in_and_out_under_a_writing_export() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let srv = Server::start("thr-insert");
    let mut c = srv.client();
    let img = srv.dir.join("d.raw").to_string_lossy().into_owned();
    let nbd = srv.dir.join("nbd").to_string_lossy().into_owned();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw", &img, "32M"])
        .status()
        .unwrap();
    assert!(st.success());
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": img}),
    );
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt", "file": "f"}),
    );
    run(
        &mut c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    run(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "fmt", "name": "d", "writable": true}),
    );
    run(
        &mut c,
        "object-add",
        json!({"qom-type": "throttle-group", "id": "g", "limits": {"iops-total": 2000}}),
    );
    run(
        &mut c,
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "t", "throttle-group": "g", "file": "f"}),
    );
    // A writer fills the whole image with a pattern at depth 16 while the
    // throttle node is put under the format node and taken out again.
    let writer = Command::new("qemu-img")
        .args([
            "bench", "-w", "-f", "raw", "-d", "16", "-s", "4096", "-c", "8192",
        ])
        .arg("--pattern=0x5c")
        .arg(format!("nbd+unix:///d?socket={nbd}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-img bench");
    for i in 0..10 {
        let file = if i % 2 == 0 { "t" } else { "f" };
        run(
            &mut c,
            "blockdev-reopen",
            json!({"options": [{"driver": "raw", "node-name": "fmt", "file": file}]}),
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    // The throttle node is out: the writer goes at full speed again.
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "writes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(&mut c, "blockdev-del", json!({"node-name": "t"}));
    run(&mut c, "object-del", json!({"id": "g"}));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5c 0 32M"])
        .arg(format!("nbd+unix:///d?socket={nbd}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verification failed") && text.contains("read "),
        "pattern: {text}"
    );
}

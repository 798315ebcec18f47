//! Crash consistency of qcow2 through the real data path: `qemu-io` writes
//! (with FUA) into a fresh qcow2 image through an NBD export while blockd
//! is killed with SIGKILL at a random moment; afterwards `qemu-img check`
//! finds no corruption (leaks are allowed, as in QEMU) and every write that
//! was acknowledged is in the image. Repeated several times.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// A cheap deterministic generator (xorshift), seeded per round.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn sigkill_during_allocating_writes_leaves_a_consistent_image() {
    if !have("qemu-io") || !have("qemu-img") {
        eprintln!("skipped: qemu-io/qemu-img not installed");
        return;
    }
    const ROUNDS: u64 = 8;
    const WRITES: u64 = 400;
    for round in 0..ROUNDS {
        let mut srv = Server::start("bcr");
        let img = srv.dir.join("disk.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&img)
            .arg("256M")
            .status()
            .unwrap();
        assert!(st.success());
        let nbd = srv.dir.join("nbd");
        let mut c = srv.client();
        c.execute(
            "blockdev-add",
            Some(json!({"driver": "qcow2", "node-name": "q0",
                        "file": {"driver": "file", "filename": img}})),
        )
        .unwrap();
        c.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "unix", "data": {"path": nbd}}})),
        )
        .unwrap();
        c.execute(
            "block-export-add",
            Some(json!({"type": "nbd", "id": "e0", "node-name": "q0", "writable": true})),
        )
        .unwrap();
        // Each write gets its own 64 KiB slot (scattered, so every one
        // allocates a cluster and often an L2 table) and its own pattern.
        let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (round + 1);
        let mut slots: Vec<u64> = (0..4096).collect();
        for i in (1..slots.len()).rev() {
            let j = (next(&mut seed) % (i as u64 + 1)) as usize;
            slots.swap(i, j);
        }
        let mut script = Vec::new();
        for (i, slot) in slots.iter().take(WRITES as usize).enumerate() {
            let pattern = (i % 250) + 1;
            script.push("-c".to_string());
            script.push(format!("write -f -P {pattern} {} 65536", slot * 65536));
        }
        let url = format!("nbd+unix:///q0?socket={}", nbd.display());
        let mut io = Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(&script)
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill blockd after a random number of acknowledged writes.
        let kill_after = 20 + next(&mut seed) % (WRITES - 40);
        let out = io.stdout.take().unwrap();
        let mut acked = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = BufReader::new(out).lines();
        while acked < kill_after && Instant::now() < deadline {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("wrote ") => acked += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        srv.sigkill();
        // Writes acknowledged while the kill was on its way are acknowledged too.
        for l in lines.map_while(Result::ok) {
            if l.starts_with("wrote ") {
                acked += 1;
            }
        }
        let _ = io.wait();
        assert!(
            acked >= kill_after.min(WRITES),
            "round {round}: only {acked} writes acknowledged"
        );

        let check = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&img)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&check.stdout).to_string()
            + &String::from_utf8_lossy(&check.stderr);
        // Exit status 0: clean; 3: leaks only. Anything else is corruption.
        let code = check.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check says:\n{report}"
        );
        assert!(!report.contains("ERROR"), "round {round}: {report}");
        // Every acknowledged (FUA) write is present.
        let mut verify = Vec::new();
        for (i, slot) in slots.iter().take(acked as usize).enumerate() {
            let pattern = (i % 250) + 1;
            verify.push("-c".to_string());
            verify.push(format!("read -P {pattern} {} 65536", slot * 65536));
        }
        let r = Command::new("qemu-io")
            .args(["-f", "qcow2", "-r"])
            .args(&verify)
            .arg(&img)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(
            !out.contains("Pattern verification failed") && r.status.success(),
            "round {round}: an acknowledged write is missing:\n{out}"
        );
    }
}

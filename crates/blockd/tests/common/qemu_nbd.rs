//! qemu-nbd as a test server, and running QEMU's tools.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use crate::common::ok;

/// Runs a tool to completion.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().expect("run tool")
}

/// qemu-nbd serving `img` as `exp` on `sock`, killed on drop.
pub struct QemuNbd(Child);

impl QemuNbd {
    pub fn start(img: &Path, sock: &Path) -> QemuNbd {
        Self::start_with(img, sock, &[])
    }

    pub fn start_with(img: &Path, sock: &Path, extra: &[&str]) -> QemuNbd {
        Self::start_fmt(img, sock, "raw", extra)
    }

    /// qemu-nbd serving `img` in format `fmt`, with `extra` options.
    pub fn start_fmt(img: &Path, sock: &Path, fmt: &str, extra: &[&str]) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(extra)
            .args(["-t", "-e", "8", "-f", fmt, "-x", "exp", "-k"])
            .arg(sock)
            .arg(img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether qemu-nbd, qemu-img and qemu-io are installed.
pub fn have_qemu() -> bool {
    ["qemu-nbd", "qemu-img", "qemu-io"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok())
}

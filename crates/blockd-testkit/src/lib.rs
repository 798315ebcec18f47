//! Test support for blockd.
//!
//! - [`QmpClient`] ([`client`]): a raw, strict QMP client over a Unix socket
//!   for tests that talk to a server directly (bad-input batteries, NBD
//!   tests, ...).
//! - [`run_file`] ([`runner`]): plays a QMP transcript (`.qmp` file, format in
//!   `shared/qmp-transcripts.md`) against a freshly started server and reports
//!   [`Outcome::Pass`] or a [`Failure`] with line, reason, expected pattern,
//!   what arrived and the server's last output.
//! - [`Pattern`] ([`pattern`]) and [`script::parse`]: the transcript pattern
//!   language and line syntax.
//! - [`discover`] and [`trial_name`]: finding transcripts for a test harness.
//! - [`FakeServer`] ([`fake`]): an in-process QMP server for testing the kit.
//!
//! The `qmp-transcript` binary has the command line of the Python reference
//! runner: `qmp-transcript --server 'CMD {sock}' [--verbose] [--keep] FILE...`.

pub mod client;
pub mod fake;
pub mod pattern;
pub mod process;
pub mod runner;
pub mod script;

use std::path::{Path, PathBuf};

pub use client::{is_event, ClientError, QmpClient};
pub use fake::FakeServer;
pub use pattern::{Mismatch, Pattern, PatternError};
pub use process::install_signal_cleanup;
pub use runner::{run_file, run_script, Failure, Outcome, RunOptions};
pub use script::{Step, StepKind, SyntaxError};

/// Every `*.qmp` file under `dir`, recursively, sorted by path. A missing or
/// unreadable directory yields nothing.
pub fn discover(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "qmp") && path.is_file() {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, &mut found);
    found.sort();
    found
}

/// The name of a transcript relative to `root`, without the `.qmp`
/// extension and with `/` separators: `protocol/001-greeting`.
pub fn trial_name(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel = rel.with_extension("");
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discover_finds_qmp_files_sorted() {
        let base = process::make_scratch_dir(Path::new("/tmp/btd")).unwrap();
        std::fs::create_dir_all(base.join("b/c")).unwrap();
        std::fs::create_dir_all(base.join("a")).unwrap();
        for f in ["b/c/2.qmp", "a/1.qmp", "a/x.txt", "b/0.qmp", "top.qmp"] {
            std::fs::write(base.join(f), "").unwrap();
        }
        let names: Vec<String> = discover(&base)
            .iter()
            .map(|p| trial_name(&base, p))
            .collect();
        assert_eq!(names, ["a/1", "b/0", "b/c/2", "top"]);
        assert!(discover(&base.join("missing")).is_empty());
        std::fs::remove_dir_all(&base).unwrap();
    }
}

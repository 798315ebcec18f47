//! Runs every QMP transcript in `tests/transcripts/**/*.qmp` (at the
//! workspace root) against the `blockd` binary, one test per file, named by
//! its path relative to that folder without `.qmp` (e.g.
//! `protocol/001-greeting`), so `cargo test --test transcripts -- protocol/`
//! filters them. Trials run in parallel.
//!
//! Environment:
//! - `BLOCKD_TRANSCRIPT_SERVER`: a server command template to use instead of
//!   `'<blockd> --qmp {sock}'` (`{sock}`, `{sock2}`..`{sock9}` and `{tmp}` are
//!   substituted), e.g. to check the transcripts against
//!   `qemu-storage-daemon`.
//! - `BLOCKD_TRANSCRIPT_VERBOSE=1`: print the whole exchange of every trial
//!   (best with `--test-threads 1`).
//! - `BLOCKD_TRANSCRIPT_KEEP=1`: keep the scratch folders.

use std::path::{Path, PathBuf};

use blockd_testkit::{discover, install_signal_cleanup, run_file, trial_name, Outcome, RunOptions};
use libtest_mimic::{Arguments, Failed, Trial};

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn main() {
    let args = Arguments::from_args();
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/transcripts");
    let server = std::env::var("BLOCKD_TRANSCRIPT_SERVER")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| {
            format!(
                "{} --qmp {{sock}}",
                blockd_testkit::runner::shell_quote(env!("CARGO_BIN_EXE_blockd"))
            )
        });
    let opts = RunOptions {
        server,
        verbose: env_flag("BLOCKD_TRANSCRIPT_VERBOSE"),
        keep: env_flag("BLOCKD_TRANSCRIPT_KEEP"),
    };
    // servers run in process groups of their own: kill them on Ctrl-C
    install_signal_cleanup();
    let trials = discover(&root)
        .into_iter()
        .map(|path| {
            let name = trial_name(&root, &path);
            let shown = format!("tests/transcripts/{name}.qmp");
            let opts = opts.clone();
            Trial::test(name, move || match run_file(&path, &opts) {
                Outcome::Pass => Ok(()),
                Outcome::Fail(f) => Err(Failed::from(format!("{shown}: {f}"))),
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

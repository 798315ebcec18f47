//! `qmp-transcript`: run QMP transcripts (`.qmp` files) against a server.
//!
//! Same command line and output as the Python reference runner:
//!
//! ```text
//! qmp-transcript --server 'COMMAND WITH {sock}' [--verbose] [--keep] FILE.qmp [FILE.qmp ...]
//! ```
//!
//! Prints `PASS name` or `FAIL name: line N: why` (details indented below)
//! per file, then `N passed, M failed`; exits 0 only if all passed, 2 on a
//! usage error.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use blockd_testkit::{install_signal_cleanup, run_file, Outcome, RunOptions};

const USAGE: &str =
    "usage: qmp-transcript [-h] --server SERVER [--verbose] [--keep] FILE.qmp [FILE.qmp ...]";

const HELP: &str = "\
Run QMP transcripts against a server.

positional arguments:
  FILE.qmp              transcripts to run

options:
  -h, --help            show this help message and exit
  --server SERVER       server command; {sock} = QMP socket path, {sock2}..{sock9} = extra
                        monitor sockets for connections @2..@9, {tmp} = scratch folder
  --verbose, -v         print the whole exchange
  --keep                keep scratch folders (for debugging)";

fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{text}");
    let _ = o.flush();
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("{USAGE}\nqmp-transcript: error: {msg}");
    ExitCode::from(2)
}

/// Resolves a long option, accepting unique prefixes like argparse.
fn long_option(arg: &str) -> Result<&'static str, String> {
    const LONG: [&str; 4] = ["--server", "--verbose", "--keep", "--help"];
    if let Some(exact) = LONG.iter().find(|o| **o == arg) {
        return Ok(exact);
    }
    let hits: Vec<&str> = LONG
        .iter()
        .copied()
        .filter(|o| o.starts_with(arg))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("unrecognized arguments: {arg}")),
        many => Err(format!(
            "ambiguous option: {arg} could match {}",
            many.join(", ")
        )),
    }
}

fn main() -> ExitCode {
    let mut server: Option<String> = None;
    let mut verbose = false;
    let mut keep = false;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    let mut only_files = false;
    while let Some(arg) = args.next() {
        if only_files || arg == "-" || !arg.starts_with('-') {
            files.push(arg);
            continue;
        }
        if arg == "--" {
            only_files = true;
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let opt = match name.as_str() {
            "-v" => "--verbose",
            "-h" => "--help",
            n if n.starts_with("--") => match long_option(n) {
                Ok(o) => o,
                Err(e) => return usage_error(&e),
            },
            _ => return usage_error(&format!("unrecognized arguments: {arg}")),
        };
        match opt {
            "--server" => match inline.or_else(|| args.next()) {
                Some(v) => server = Some(v),
                None => return usage_error("argument --server: expected one argument"),
            },
            "--verbose" => verbose = true,
            "--keep" => keep = true,
            _ => {
                out(USAGE);
                out("");
                out(HELP);
                return ExitCode::SUCCESS;
            }
        }
    }
    let Some(server) = server else {
        return usage_error("the following arguments are required: --server");
    };
    if files.is_empty() {
        return usage_error("the following arguments are required: FILE.qmp");
    }
    if !server.contains("{sock}") {
        return usage_error("--server must contain {sock}");
    }

    install_signal_cleanup();
    let opts = RunOptions {
        server,
        verbose,
        keep,
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &files {
        if verbose {
            out(&format!("=== {file}"));
        }
        match run_file(Path::new(file), &opts) {
            Outcome::Pass => {
                passed += 1;
                out(&format!("PASS {file}"));
            }
            Outcome::Fail(f) => {
                failed += 1;
                out(&format!("FAIL {file}: line {}: {}", f.line, f.reason));
                for d in f.detail_lines() {
                    out(&format!("    {d}"));
                }
            }
        }
    }
    out(&format!("{passed} passed, {failed} failed"));
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

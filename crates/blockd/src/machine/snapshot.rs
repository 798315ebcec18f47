//! `snapshot=on`: the drive writes to a temporary qcow2 overlay over its
//! image, which is opened read-only and never written (QEMU's
//! `bdrv_append_temp_snapshot`).
//!
//! The overlay is created as `vl.XXXXXX` in `$TMPDIR` (`/var/tmp` when that
//! is unset or `/tmp`, as QEMU does: overlays can grow large and `/tmp` is
//! often in memory), sized like the image, with the image node attached as
//! its backing node and flushes ignored. The file is unlinked as soon as
//! the overlay node holds it open, so it disappears when the drive goes or
//! the server exits, even after a crash.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockd_core::{BlockError, BlockGraph, BlockNode};
use blockd_drivers::options::BlockdevOptions;
use blockd_drivers::qcow2::create::Qcow2CreateOptions;
use blockd_drivers::Env;
use serde_json::{json, Value};

use super::drive::{open_medium, MediumSpec};

/// The directory for temporary overlays.
fn tmp_dir() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(d) if !d.is_empty() && d != "/tmp" => PathBuf::from(d),
        _ => PathBuf::from("/var/tmp"),
    }
}

/// A well-mixed 64-bit value from `x` (the SplitMix64 finaliser).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Creates a new empty `vl.XXXXXX` file; returns its path.
fn create_tmp_file() -> Result<PathBuf, BlockError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = tmp_dir();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = wall ^ (u64::from(std::process::id()) << 32);
    for _ in 0..100 {
        let mut x = splitmix64(seed.wrapping_add(N.fetch_add(1, Ordering::Relaxed)));
        let mut suffix = String::new();
        const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        for _ in 0..6 {
            suffix.push(CHARS[(x % CHARS.len() as u64) as usize] as char);
            x /= CHARS.len() as u64;
        }
        let p = dir.join(format!("vl.{suffix}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(BlockError::io(
                    format!("Could not get temporary filename in '{}'", dir.display()),
                    e,
                ))
            }
        }
    }
    Err(BlockError::invalid("Could not get temporary filename"))
}

fn internal(v: Value) -> Result<BlockdevOptions, BlockError> {
    serde_json::from_value(v).map_err(|e| BlockError::invalid(format!("internal error: {e}")))
}

/// Opens `spec` read-only under a temporary copy-on-write overlay; returns
/// the overlay.
pub async fn open_snapshot(
    graph: &BlockGraph,
    env: &Env,
    spec: &MediumSpec,
) -> Result<(Arc<BlockNode>, bool), BlockError> {
    let image_spec = MediumSpec {
        read_only: true,
        ..spec.clone()
    };
    let (image, _) = open_medium(graph, env, &image_spec).await?;
    let release = |nodes: Vec<Arc<BlockNode>>| async move {
        super::close_nodes(nodes).await;
    };
    let tmp = match create_tmp_file() {
        Ok(p) => p,
        Err(e) => {
            release(graph.release(&image)).await;
            return Err(e);
        }
    };
    let result = overlay(graph, env, &image, &tmp).await;
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(node) => Ok((node, false)),
        Err(e) => {
            release(graph.release(&image)).await;
            Err(e)
        }
    }
}

async fn overlay(
    graph: &BlockGraph,
    env: &Env,
    image: &Arc<BlockNode>,
    tmp: &std::path::Path,
) -> Result<Arc<BlockNode>, BlockError> {
    let file_opts = internal(json!({
        "driver": "file",
        "filename": tmp.display().to_string(),
        "cache": {"no-flush": true},
    }))?;
    let file = blockd_drivers::open_implicit(graph, env, file_opts).await?;
    let create: Qcow2CreateOptions =
        serde_json::from_value(json!({"file": file.name(), "size": image.length()}))
            .map_err(|e| BlockError::invalid(format!("internal error: {e}")))?;
    let created = blockd_drivers::qcow2::create::create(&file, &create).await;
    let opened = match created {
        Ok(()) => {
            let top = internal(json!({
                "driver": "qcow2",
                "file": file.name(),
                "backing": image.name(),
                "cache": {"no-flush": true},
            }))?;
            blockd_drivers::open_implicit(graph, env, top).await
        }
        Err(e) => Err(e),
    };
    match opened {
        Ok(n) => Ok(n),
        Err(e) => {
            super::close_nodes(graph.release(&file)).await;
            Err(e)
        }
    }
}

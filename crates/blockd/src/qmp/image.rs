//! Creating an image file for a command that makes a new node from a file
//! name (QEMU's `bdrv_img_create`, as `blockdev-snapshot-sync`,
//! `drive-mirror` and `drive-backup` call it): a `file` node is opened on
//! the new file, the format is written onto it, and the node is closed
//! again. Errors are QEMU's.
//!
//! Formats: `qcow2` (with a backing file name and format in its header),
//! and the formats that are the file's bytes as they are (`raw`, `file`),
//! which have no backing file.

use std::path::Path;

use blockd_core::{BlockError, BlockGraph};
use blockd_drivers::create::{create_file, FileCreateOptions};
use blockd_drivers::options::BlockdevOptions;
use blockd_drivers::qcow2::create::Qcow2CreateOptions;
use blockd_drivers::Env;
use serde_json::json;

use super::block::close_nodes;

/// What to create.
#[derive(Debug, Clone)]
pub struct NewImage<'a> {
    /// The image file.
    pub filename: &'a str,
    /// The format (`qcow2`, `raw`).
    pub format: &'a str,
    /// The backing file name and format to record (qcow2 only).
    pub backing: Option<(&'a str, &'a str)>,
    /// The virtual size.
    pub size: u64,
}

/// A file that [`create_image`] made: `existed` says whether a file of
/// that name was there before (and was overwritten). A caller that gives
/// up deletes the file only if it did not.
#[derive(Debug, Clone)]
pub struct CreatedImage {
    /// The image file.
    pub filename: String,
    /// Whether the file existed before.
    pub existed: bool,
}

impl CreatedImage {
    /// Deletes the file if this creation made it (a failed command leaves
    /// nothing behind).
    pub fn discard(&self) {
        if !self.existed {
            if let Err(e) = std::fs::remove_file(&self.filename) {
                tracing::warn!(file = %self.filename, error = %e, "removing an image made by a failed command");
            }
        }
    }
}

fn internal(e: serde_json::Error) -> BlockError {
    BlockError::invalid(format!("internal error: {e}"))
}

/// Creates the image (QEMU's `bdrv_img_create` with its messages: `Unknown
/// file format 'x'`, `Backing file not supported for file format 'raw'`,
/// `Could not create 'f': ...`).
pub async fn create_image(
    graph: &BlockGraph,
    env: &Env,
    img: &NewImage<'_>,
) -> Result<CreatedImage, BlockError> {
    let raw_like = matches!(img.format, "raw" | "file");
    if img.format != "qcow2" && !raw_like {
        return Err(BlockError::invalid(format!(
            "Unknown file format '{}'",
            img.format
        )));
    }
    if raw_like && img.backing.is_some() {
        return Err(BlockError::invalid(format!(
            "Backing file not supported for file format '{}'",
            img.format
        )));
    }
    let created = CreatedImage {
        filename: img.filename.to_string(),
        existed: Path::new(img.filename).exists(),
    };
    let file_opts = FileCreateOptions {
        filename: img.filename.to_string(),
        size: if raw_like { img.size } else { 0 },
        preallocation: None,
        nocow: None,
        extent_size_hint: None,
    };
    tokio::task::spawn_blocking(move || create_file(&file_opts))
        .await
        .map_err(|e| BlockError::invalid(format!("internal error: {e}")))??;
    if raw_like {
        return Ok(created);
    }
    let r = write_qcow2(graph, env, img).await;
    if let Err(e) = r {
        created.discard();
        return Err(e);
    }
    Ok(created)
}

/// Writes a qcow2 image onto the (empty) file.
async fn write_qcow2(graph: &BlockGraph, env: &Env, img: &NewImage<'_>) -> Result<(), BlockError> {
    let opts: BlockdevOptions =
        serde_json::from_value(json!({"driver": "file", "filename": img.filename}))
            .map_err(internal)?;
    let file = blockd_drivers::open_implicit(graph, env, opts).await?;
    let mut create = json!({"file": file.name(), "size": img.size});
    if let Some((name, fmt)) = img.backing {
        create["backing-file"] = name.into();
        create["backing-fmt"] = fmt.into();
    }
    let r = match serde_json::from_value::<Qcow2CreateOptions>(create) {
        Ok(o) => blockd_drivers::qcow2::create::create(&file, &o).await,
        Err(e) => Err(internal(e)),
    };
    let flushed = file
        .flush()
        .await
        .map_err(|e| BlockError::io("Could not flush the new image", e));
    close_nodes(graph.release(&file)).await;
    r.and(flushed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn qcow2_with_backing_and_refusals() {
        let d = std::env::temp_dir().join(format!("blockd-image-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let g = BlockGraph::new();
        let env = Env::default();
        let f = d.join("new.qcow2").to_string_lossy().into_owned();
        let img = NewImage {
            filename: &f,
            format: "qcow2",
            backing: Some(("base.qcow2", "raw")),
            size: 1 << 20,
        };
        let c = create_image(&g, &env, &img).await.unwrap();
        assert!(!c.existed);
        assert!(g.is_empty(), "the file node is gone again");
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", &f])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["virtual-size"], 1 << 20);
        assert_eq!(v["backing-filename"], "base.qcow2");
        assert_eq!(v["backing-filename-format"], "raw");
        let again = create_image(&g, &env, &img).await.unwrap();
        assert!(again.existed);
        again.discard();
        assert!(Path::new(&f).exists(), "a file that existed stays");
        c.discard();
        assert!(!Path::new(&f).exists());
        let e = create_image(
            &g,
            &env,
            &NewImage {
                format: "vmdk",
                ..img.clone()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.msg, "Unknown file format 'vmdk'");
        let e = create_image(
            &g,
            &env,
            &NewImage {
                format: "raw",
                ..img.clone()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.msg, "Backing file not supported for file format 'raw'");
        assert!(!Path::new(&f).exists());
        let nodir = d.join("no/such.qcow2").to_string_lossy().into_owned();
        let e = create_image(
            &g,
            &env,
            &NewImage {
                filename: &nodir,
                ..img.clone()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.msg,
            format!("Could not create '{nodir}': No such file or directory")
        );
        let raw = d.join("r.img").to_string_lossy().into_owned();
        let r = NewImage {
            filename: &raw,
            format: "raw",
            backing: None,
            size: 4096,
        };
        create_image(&g, &env, &r).await.unwrap();
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4096);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! Opening an image by file name: a medium (`--drive file=...`,
//! `blockdev-change-medium`) or a backing file named by an image header,
//! as QEMU's `bdrv_open_inherit` does when it is given a filename rather
//! than a node.
//!
//! ```text
//! protocol node (file)  ──read the first sector──▶  probe_format
//!        │                                         (if no format given)
//!        ▼
//! format node over it (its `file` is the protocol node, which inherits
//! the format node's options)
//! ```
//!
//! The protocol node need not be a file: [`crate::filename`] turns a name
//! (an NBD URI, `json:` options) into its options first.
//!
//! This is the one implicit-open path; [`open_image`] runs it for a medium
//! (both nodes go into the graph together, owned by their users, as
//! [`crate::open_implicit`] trees are) and [`crate::OpenCtx::open_backing`]
//! for a backing file inside its overlay's open.
//!
//! QEMU's rules:
//! * no format: the first sector is probed ([`blockd_core::probe`]); no
//!   known signature is raw, a signature of a format blockd lacks is that
//!   format (and refused by the caller as an unknown driver);
//! * format `qcow2`: a file without the qcow2 signature is refused before
//!   the format node is opened ("Image is not in qcow2 format");
//! * a raw format that was guessed for a writable node prints QEMU's
//!   warning, and the caller protects the first sector (the backend's
//!   write guard); a backing file is always read-only, so it never needs
//!   one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use blockd_core::probe::{matches_format, probe_format, read_head};
use blockd_core::{BlockError, BlockGraph, BlockNode};

use crate::open::{check_tree, insert_opened, open_node, Inherit};
use crate::options::BlockdevOptions;
use crate::Env;

/// An image to open by file name.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// The protocol node's options (`driver: file`, the file name, ...).
    pub protocol: BlockdevOptions,
    /// The format; `None` probes it.
    pub format: Option<String>,
}

/// An image opened by file name.
#[derive(Debug, Clone)]
pub struct OpenedImage {
    /// The format node.
    pub node: Arc<BlockNode>,
    /// The format was guessed as raw (a writable medium needs its first
    /// sector protected).
    pub probed_raw: bool,
}

/// Where the nodes of an open go: the graph they will join, and the list
/// of every node the open created so far.
pub(crate) struct Tree<'a> {
    pub(crate) graph: &'a BlockGraph,
    pub(crate) env: &'a Env,
    pub(crate) created: Arc<Mutex<Vec<Arc<BlockNode>>>>,
    pub(crate) backing_chain: Vec<String>,
}

/// Opens a medium by file name and inserts its nodes into the graph, not
/// owned by the monitor (they leave it with their last user).
/// `format_options` builds the format node's options once the format is
/// known, from the format and the protocol node (which the options must
/// name as their `file`).
pub async fn open_image<F>(
    graph: &BlockGraph,
    env: &Env,
    request: ImageRequest,
    format_options: F,
) -> Result<OpenedImage, BlockError>
where
    F: FnOnce(&str, &BlockNode) -> Result<BlockdevOptions, BlockError> + Send,
{
    let tree = Tree {
        graph,
        env,
        created: Arc::new(Mutex::new(Vec::new())),
        backing_chain: Vec::new(),
    };
    let opened = open_image_in(
        &tree,
        Inherit::default(),
        Inherit::default(),
        request,
        format_options,
    )
    .await;
    let probed_raw = opened.as_ref().is_ok_and(|o| o.probed_raw);
    let node = insert_opened(graph, tree.created, opened.map(|o| o.node), false).await?;
    Ok(OpenedImage { node, probed_raw })
}

/// The path itself, for an open under way (`tree`): the protocol node with
/// `file_inherit`, the format, then the format node with `format_inherit`.
/// Every node opened is on `tree.created`, for the caller to insert or
/// close.
pub(crate) async fn open_image_in<F>(
    tree: &Tree<'_>,
    file_inherit: Inherit,
    format_inherit: Inherit,
    request: ImageRequest,
    format_options: F,
) -> Result<OpenedImage, BlockError>
where
    F: FnOnce(&str, &BlockNode) -> Result<BlockdevOptions, BlockError> + Send,
{
    let file = open_node(
        tree.graph,
        tree.env,
        request.protocol,
        file_inherit,
        tree.created.clone(),
        tree.backing_chain.clone(),
        Vec::new(),
    )
    .await?;
    let (format, probed) = match request.format {
        Some(f) => {
            if f == "qcow2" && !matches_format(&f, &read_head(&file).await?) {
                return Err(BlockError::invalid("Image is not in qcow2 format"));
            }
            (f, false)
        }
        None => {
            let head = read_head(&file).await?;
            (probe_format(&head).unwrap_or("raw").to_string(), true)
        }
    };
    let opts = format_options(&format, &file)?;
    let pending = [file.clone()];
    let mut names: HashSet<String> = HashSet::from([file.name().to_string()]);
    check_tree(tree.graph, &opts, &pending, &mut names)?;
    let node = open_node(
        tree.graph,
        tree.env,
        opts,
        format_inherit,
        tree.created.clone(),
        tree.backing_chain.clone(),
        vec![file.clone()],
    )
    .await?;
    let probed_raw = probed && format == "raw";
    if probed_raw && !node.read_only() {
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.",
            file.filename()
        );
    }
    Ok(OpenedImage { node, probed_raw })
}

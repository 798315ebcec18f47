//! Image format probing: which format the first bytes of an image look like
//! (QEMU's `find_image_format`: `bdrv_probe_all` over the drivers'
//! `bdrv_probe` callbacks).
//!
//! [`probe_node`] reads the first sector through the protocol node that was
//! opened for the image (so the read is the driver's: off the event loop,
//! with the node's alignment, descriptor and locks), and [`probe_format`]
//! looks at it. This is the one prober: the implicit open path of the
//! drivers (`blockd_drivers::implicit`) uses it for media and backing
//! files alike.
//!
//! Only signatures are checked; a buffer no format claims is raw. Raw
//! images whose format was guessed get their first sector protected: a
//! write that would make them probe as another format is refused, so a
//! guest cannot turn a raw image into, say, a qcow2 header that names a
//! host file as its backing file.

use bytes::Bytes;

use crate::{BlockError, BlockNode};

/// How many bytes probing looks at (QEMU's `BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_BUF_SIZE: usize = 512;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The format `buf` (the start of an image) looks like, or `None` for raw.
pub fn probe_format(buf: &[u8]) -> Option<&'static str> {
    if buf.starts_with(b"QFI\xfb") {
        return match be32(buf, 4) {
            Some(1) => Some("qcow"),
            Some(v) if v >= 2 => Some("qcow2"),
            _ => None,
        };
    }
    let starts: &[(&[u8], &str)] = &[
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"conectix", "vpc"),
        (b"vhdxfile", "vhdx"),
        (b"LUKS\xba\xbe", "luks"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
    ];
    if let Some((_, f)) = starts.iter().find(|(m, _)| buf.starts_with(m)) {
        return Some(f);
    }
    if le32(buf, 0x40) == Some(0xbeda_107f) {
        return Some("vdi");
    }
    None
}

/// The first sector of the image behind `node` (up to [`PROBE_BUF_SIZE`]
/// bytes; fewer for a shorter image, none for an empty one), read through
/// the node.
pub async fn read_head(node: &BlockNode) -> Result<Bytes, BlockError> {
    let len = node.length().min(PROBE_BUF_SIZE as u64) as usize;
    node.read(0, len)
        .await
        .map_err(|e| BlockError::io("Could not read image for determining its format", e))
}

/// The format of the image behind `node`, `raw` if its first sector has no
/// known signature.
pub async fn probe_node(node: &BlockNode) -> Result<&'static str, BlockError> {
    Ok(probe_format(&read_head(node).await?).unwrap_or("raw"))
}

/// The signature check of one format, for opening an image with an
/// explicit format: `false` if `buf` certainly is not that format. Formats
/// without a known signature always pass.
pub fn matches_format(format: &str, buf: &[u8]) -> bool {
    match format {
        "qcow2" => buf.starts_with(b"QFI\xfb") && be32(buf, 4).is_some_and(|v| v >= 2),
        "qcow" => buf.starts_with(b"QFI\xfb") && be32(buf, 4) == Some(1),
        "qed" | "vpc" | "vhdx" | "luks" => probe_format(buf) == Some(format),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let mut q = vec![0u8; 512];
        q[..4].copy_from_slice(b"QFI\xfb");
        q[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(probe_format(&q), Some("qcow2"));
        assert!(matches_format("qcow2", &q));
        assert!(!matches_format("qcow2", &[0u8; 512]));
        q[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(probe_format(&q), Some("qcow"));
        assert_eq!(probe_format(&[0u8; 512]), None);
        assert_eq!(probe_format(b"KDMV...."), Some("vmdk"));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probe_format(&vdi), Some("vdi"));
        assert!(matches_format("raw", b"QFI\xfb"));
        assert_eq!(probe_format(b""), None);
    }
}

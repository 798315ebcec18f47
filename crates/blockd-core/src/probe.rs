//! Image format probing: which format the first bytes of an image look like
//! (QEMU's `bdrv_probe_all` over the drivers' `bdrv_probe` callbacks).
//!
//! Only signatures are checked; a buffer no format claims is raw. Raw
//! images whose format was guessed get their first sector protected: a
//! write that would make them probe as another format is refused, so a
//! guest cannot turn a raw image into, say, a qcow2 header that names a
//! host file as its backing file.

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

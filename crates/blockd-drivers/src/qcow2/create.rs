//! Writing a new qcow2 image onto a node (`blockdev-create` with
//! `driver: qcow2`).
//!
//! The layout is QEMU's: the header in cluster 0, then the refcount
//! table, the refcount blocks and the L1 table; with preallocation the L2
//! tables and the data clusters follow. Every cluster written is counted,
//! so `qemu-img check` finds nothing to report.

use blockd_core::{BlockError, BlockNode, ReqFlags};
use bytes::Bytes;
use serde::Deserialize;

use super::header::{
    build_first_cluster, l1_entries_for, Header, COMPAT_LAZY_REFCOUNTS, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES, V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::meta::OFLAG_COPIED;
use super::refcount::set_entry;
use crate::create::Prealloc;
use crate::options::BlockdevRef;

/// `BlockdevQcow2Version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Qcow2Version {
    /// compat 0.10.
    V2,
    /// compat 1.1.
    V3,
}

/// `BlockdevCreateOptionsQcow2`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Qcow2CreateOptions {
    /// The node to write the image to (a node-name).
    pub file: BlockdevRef,
    /// Virtual size.
    pub size: u64,
    /// Format version (default v3).
    pub version: Option<Qcow2Version>,
    /// Backing file name to record.
    #[serde(rename = "backing-file")]
    pub backing_file: Option<String>,
    /// Backing format to record.
    #[serde(rename = "backing-fmt")]
    pub backing_fmt: Option<String>,
    /// Cluster size (default 64 KiB).
    #[serde(rename = "cluster-size")]
    pub cluster_size: Option<u64>,
    /// Preallocation mode.
    pub preallocation: Option<Prealloc>,
    /// Set the lazy refcounts compatible feature.
    #[serde(rename = "lazy-refcounts")]
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits (default 16).
    #[serde(rename = "refcount-bits")]
    pub refcount_bits: Option<i64>,
    /// Extended L2 entries: refused when true.
    #[serde(rename = "extended-l2")]
    pub extended_l2: Option<bool>,
    /// Compression type: zlib only.
    #[serde(rename = "compression-type")]
    pub compression_type: Option<String>,
    /// External data file: refused.
    #[serde(rename = "data-file")]
    pub data_file: Option<BlockdevRef>,
}

/// Checks the options; returns (cluster bits, refcount order).
pub fn validate(o: &Qcow2CreateOptions) -> Result<(u32, u32), BlockError> {
    let inv = |m: &str| BlockError::invalid(m);
    let v3 = o.version.unwrap_or(Qcow2Version::V3) == Qcow2Version::V3;
    if o.data_file.is_some() {
        return Err(BlockError::unsupported(
            "blockd does not support qcow2 external data files ('data-file')",
        ));
    }
    if o.extended_l2 == Some(true) {
        return Err(BlockError::unsupported(
            "blockd does not support extended L2 entries ('extended-l2')",
        ));
    }
    if let Some(t) = o.compression_type.as_deref().filter(|t| *t != "zlib") {
        return Err(BlockError::unsupported(format!(
            "blockd supports only zlib compression (compression-type '{t}')"
        )));
    }
    let cs = o.cluster_size.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(inv(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if o.size % 512 != 0 {
        return Err(inv("Image size must be a multiple of 512 bytes"));
    }
    if o.lazy_refcounts == Some(true) && !v3 {
        return Err(inv(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    let bits = o.refcount_bits.unwrap_or(16);
    if !(1..=64).contains(&bits) || !(bits as u64).is_power_of_two() {
        return Err(inv(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if bits != 16 && !v3 {
        return Err(inv(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
        ));
    }
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err(inv("Backing format cannot be used without backing file"));
    }
    if o.backing_file.is_some() && o.preallocation.unwrap_or_default() != Prealloc::Off {
        return Err(inv(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    let cluster_bits = cs.trailing_zeros();
    let l1 = l1_entries_for(o.size, cluster_bits);
    if l1 * 8 > MAX_L1_BYTES {
        return Err(BlockError::invalid(format!(
            "Could not resize image: Image size too large for this cluster size ({} bytes)",
            o.size
        )));
    }
    Ok((cluster_bits, (bits as u64).trailing_zeros()))
}

fn io_err(e: std::io::Error) -> BlockError {
    BlockError::io("Could not write qcow2 image", e)
}

/// Writes a new qcow2 image onto `node` (whose old contents are dropped).
pub async fn create(node: &BlockNode, o: &Qcow2CreateOptions) -> Result<(), BlockError> {
    let (cluster_bits, order) = validate(o)?;
    let v3 = o.version.unwrap_or(Qcow2Version::V3) == Qcow2Version::V3;
    let cs = 1u64 << cluster_bits;
    let prealloc = o.preallocation.unwrap_or_default();
    let l1_entries = l1_entries_for(o.size, cluster_bits);
    let l1c = (l1_entries * 8).div_ceil(cs);
    let (n_l2, n_data) = if prealloc == Prealloc::Off {
        (0, 0)
    } else {
        (l1_entries, o.size.div_ceil(cs))
    };
    let epb = 1u64 << (cluster_bits + 3 - order);
    let (mut rb, mut tc) = (1u64, 1u64);
    loop {
        let total = 1 + tc + rb + l1c + n_l2 + n_data;
        let nrb = total.div_ceil(epb);
        let ntc = (nrb * 8).div_ceil(cs).max(1);
        if (nrb, ntc) == (rb, tc) {
            break;
        }
        (rb, tc) = (nrb, ntc);
    }
    if tc * cs > MAX_REFTABLE_BYTES {
        return Err(BlockError::invalid(
            "Image size too large: the refcount table would exceed its maximum size",
        ));
    }
    let total = 1 + tc + rb + l1c + n_l2 + n_data;
    let table_at = 1;
    let blocks_at = 1 + tc;
    let l1_at = blocks_at + rb;
    let l2_at = l1_at + l1c;
    let data_at = l2_at + n_l2;
    let hdr = Header {
        version: if v3 { 3 } else { 2 },
        cluster_bits,
        size: o.size,
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_entries > 0 { l1_at * cs } else { 0 },
        refcount_table_offset: table_at * cs,
        refcount_table_clusters: tc as u32,
        compatible_features: if o.lazy_refcounts == Some(true) {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        refcount_order: order,
        header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN } as u32,
        ..Header::default()
    };
    let first = build_first_cluster(&hdr, o.backing_file.as_deref(), o.backing_fmt.as_deref())?;
    node.truncate(0)
        .await
        .map_err(|e| BlockError::io("Could not resize image", e))?;
    let w = |off: u64, b: Vec<u8>| async move {
        node.write(off, Bytes::from(b), ReqFlags::default())
            .await
            .map_err(io_err)
    };
    // Refcount table and blocks.
    let mut table = vec![0u8; (tc * cs) as usize];
    for j in 0..rb {
        let off = (blocks_at + j) * cs;
        table[(j * 8) as usize..(j * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    w(table_at * cs, table).await?;
    let mut j = 0;
    while j < rb {
        let n = ((1u64 << 20) / cs).max(1).min(rb - j);
        let mut buf = vec![0u8; (n * cs) as usize];
        for k in 0..n {
            let first_cl = (j + k) * epb;
            let block = &mut buf[(k * cs) as usize..((k + 1) * cs) as usize];
            for cl in first_cl..(first_cl + epb).min(total) {
                set_entry(block, order, (cl - first_cl) as usize, 1);
            }
        }
        w((blocks_at + j) * cs, buf).await?;
        j += n;
    }
    // L1 (and, preallocated, L2 tables pointing at consecutive data clusters).
    if l1_entries > 0 {
        let mut l1 = vec![0u8; (l1_entries * 8) as usize];
        if n_l2 > 0 {
            for i in 0..l1_entries {
                let e = ((l2_at + i) * cs) | OFLAG_COPIED;
                l1[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
            }
        }
        w(l1_at * cs, l1).await?;
    }
    let per_l2 = cs / 8;
    for i in 0..n_l2 {
        let mut t = vec![0u8; cs as usize];
        for k in 0..per_l2 {
            let d = i * per_l2 + k;
            if d >= n_data {
                break;
            }
            let e = ((data_at + d) * cs) | OFLAG_COPIED;
            t[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
        }
        w((l2_at + i) * cs, t).await?;
    }
    match prealloc {
        Prealloc::Off => {}
        Prealloc::Metadata => node
            .truncate(total * cs)
            .await
            .map_err(|e| BlockError::io("Could not resize image", e))?,
        Prealloc::Falloc | Prealloc::Full => {
            let flags = ReqFlags::default();
            node.write_zeroes(data_at * cs, n_data * cs, flags)
                .await
                .map_err(|e| BlockError::io("Could not preallocate data", e))?;
        }
    }
    // The header last: until it is written, the file is no qcow2 image.
    node.flush().await.map_err(io_err)?;
    w(0, first).await?;
    node.flush().await.map_err(io_err)?;
    Ok(())
}

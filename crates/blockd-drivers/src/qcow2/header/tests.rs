//! Parsing and writing headers: round trips and hostile input.

use super::*;
use proptest::prelude::*;

fn sample() -> Header {
    Header {
        version: 3,
        cluster_bits: 16,
        size: 1 << 20,
        l1_size: 1,
        l1_table_offset: 3 << 16,
        refcount_table_offset: 1 << 16,
        refcount_table_clusters: 1,
        refcount_order: 4,
        header_length: V3_HEADER_LEN as u32,
        ..Header::default()
    }
}

#[test]
fn round_trip() {
    let h = sample();
    let c = build_first_cluster(&h, Some("base.qcow2"), Some("qcow2")).unwrap();
    let p = parse(&c, 4 << 16).unwrap();
    assert_eq!(p.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(p.ext.backing_format.as_deref(), Some("qcow2"));
    assert_eq!(p.header.size, 1 << 20);
    assert_eq!(p.ext.feature_names.len(), 8);
    let mut v2 = sample();
    v2.version = 2;
    v2.header_length = 72;
    let c = build_first_cluster(&v2, None, None).unwrap();
    let p = parse(&c, 4 << 16).unwrap();
    assert_eq!(p.header.refcount_order, 4);
    assert_eq!(p.backing_file, None);
    // The feature table only where QEMU writes it: v3, clusters over 4 KiB.
    for (bits, version, table) in [(12, 3, false), (13, 3, true), (16, 2, false)] {
        let mut h = sample();
        h.cluster_bits = bits;
        h.version = version;
        h.header_length = if version == 2 { 72 } else { 112 };
        h.l1_table_offset = 3 << bits;
        h.refcount_table_offset = 1 << bits;
        let c = build_first_cluster(&h, Some("b"), None).unwrap();
        let p = parse(&c, 1 << 30).unwrap();
        assert_eq!(
            !p.ext.feature_names.is_empty(),
            table,
            "2^{bits} v{version}"
        );
    }
}

#[test]
fn hostile_headers_are_refused() {
    let h = sample();
    let good = build_first_cluster(&h, None, None).unwrap();
    let err = |c: &[u8], len: u64| parse(c, len).unwrap_err().msg;
    assert_eq!(
        err(&good[..50], 50),
        "qcow2 header is truncated: the image file is only 50 bytes long"
    );
    assert!(err(&good, 2 << 16).contains("Active L1 table lies beyond"));
    let mut c = good.clone();
    c[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert_eq!(
        err(&c, 4 << 16),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"
    );
    let mut c = good.clone();
    c[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(err(&c, 4 << 16), "Active L1 table too large");
    let mut c = good.clone();
    c[40..48].copy_from_slice(&((3u64 << 16) + 8).to_be_bytes());
    assert_eq!(err(&c, 4 << 16), "Active L1 table offset invalid");
    let mut c = good.clone();
    c[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(err(&c, 4 << 16), "Image is too big");
    let mut c = good.clone();
    c[20..24].copy_from_slice(&30u32.to_be_bytes());
    assert_eq!(err(&c, 4 << 16), "Unsupported cluster size: 2^30");
    let mut c = good;
    c[56..60].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        err(&c, 4 << 16),
        "Image does not contain a reference count table"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024), len in 0u64..1 << 40) {
        let _ = parse(&bytes, len);
        let _ = parse_snapshots(&bytes, 100);
    }

    #[test]
    fn mutated_headers_never_panic_and_tables_fit_the_file(
        muts in proptest::collection::vec((0usize..512, any::<u8>()), 1..16),
        file_len in 0u64..1 << 22,
    ) {
        let mut c = build_first_cluster(&sample(), Some("b"), Some("raw")).unwrap();
        c.truncate(4096);
        for (at, v) in muts { c[at] = v; }
        if let Ok(p) = parse(&c, file_len) {
            let h = p.header;
            prop_assert!(u64::from(h.l1_size) * 8 <= file_len || h.l1_size == 0);
            prop_assert!(u64::from(h.refcount_table_clusters) * h.cluster_size() <= file_len);
        }
    }
}

/// A header that passes [`parse`]'s checks in a file of `1 << 50` bytes,
/// v2 or v3 (104, 112 or more bytes, with unknown fields).
fn arb_header() -> impl Strategy<Value = Header> {
    let tables = (
        1u64..1 << 20,
        1u64..1 << 20,
        1u32..=4,
        0u32..4,
        1u64..1 << 20,
    );
    let features = (
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        0u32..=6,
    );
    (
        (2u32..=3, 9u32..=21, 0u64..1 << 36, 0u32..4),
        tables,
        features,
        (
            0usize..4,
            proptest::collection::vec(any::<u8>(), 32),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((version, cluster_bits, size, extra_l1), t, f, (hl, unknown, zstd))| {
                let cs = 1u64 << cluster_bits;
                let mut h = Header {
                    version,
                    cluster_bits,
                    size,
                    l1_size: (l1_entries_for(size, cluster_bits) + u64::from(extra_l1)) as u32,
                    l1_table_offset: t.0 * cs,
                    refcount_table_offset: t.1 * cs,
                    refcount_table_clusters: t.2,
                    nb_snapshots: t.3,
                    snapshots_offset: t.4 * cs,
                    refcount_order: 4,
                    header_length: V2_HEADER_LEN as u32,
                    ..Header::default()
                };
                if version == 3 {
                    let bit = |on: bool, b: u64| if on { b } else { 0 };
                    h.incompatible_features = bit(f.0, INCOMPAT_DIRTY)
                        | bit(f.1, INCOMPAT_CORRUPT)
                        | bit(zstd && hl > 0, INCOMPAT_COMPRESSION);
                    h.compatible_features = f.2;
                    h.autoclear_features = f.3;
                    h.refcount_order = f.4;
                    h.compression_type = u8::from(zstd && hl > 0);
                    // 104, 112, or 112 plus 8, 16 or 24 bytes QEMU does not know.
                    let len = if hl == 0 {
                        V3_MIN_HEADER_LEN
                    } else {
                        V3_HEADER_LEN + 8 * (hl - 1)
                    };
                    h.header_length = len as u32;
                    h.unknown_fields = unknown[..len.saturating_sub(V3_HEADER_LEN)].to_vec();
                }
                h
            },
        )
}

fn arb_extension() -> impl Strategy<Value = RawExtension> {
    let ty = prop_oneof![
        Just(EXT_FEATURE_TABLE),
        Just(EXT_CRYPTO),
        Just(EXT_DATA_FILE),
        Just(0x2385_2875), // bitmaps
        any::<u32>().prop_filter("kept", |t| *t != EXT_END && *t != EXT_BACKING_FORMAT),
    ];
    (ty, proptest::collection::vec(any::<u8>(), 0..100))
        .prop_map(|(ty, data)| RawExtension { ty, data })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]
    /// Whatever `build_header_cluster` writes, `parse` reads back the same
    /// fields, names and extensions, and writing that again gives the same
    /// bytes; it refuses only what is too long or does not fit.
    #[test]
    fn written_headers_parse_back(
        h in arb_header(),
        name in proptest::option::of(".{0,300}"),
        format in proptest::option::of("[a-z0-9_-]{0,17}"),
        kept in proptest::collection::vec(arb_extension(), 0..4),
    ) {
        const FILE_LEN: u64 = 1 << 50;
        let cs = h.cluster_size() as usize;
        match build_header_cluster(&h, name.as_deref(), format.as_deref(), &kept) {
            Err(Unfit::NameTooLong) => prop_assert!(name.unwrap().len() > MAX_BACKING_NAME),
            Err(Unfit::FormatTooLong) => prop_assert!(format.unwrap().len() > MAX_BACKING_FORMAT),
            Err(Unfit::NoSpace) => {
                let ext = |len: usize| 8 + len.div_ceil(8) * 8;
                let need = h.header_length as usize
                    + format.as_ref().map_or(0, |f| ext(f.len()))
                    + kept.iter().map(|e| ext(e.data.len())).sum::<usize>()
                    + 8
                    + name.as_ref().map_or(0, |n| n.len());
                prop_assert!(need > cs, "{need} bytes fit in {cs}");
            }
            Ok(c) => {
                prop_assert_eq!(c.len(), cs);
                let p = parse(&c, FILE_LEN).unwrap();
                let mut got = p.header.clone();
                prop_assert_eq!(got.backing_file_size as usize, name.as_ref().map_or(0, |n| n.len()));
                prop_assert_eq!(got.backing_file_offset == 0, name.is_none());
                got.backing_file_offset = 0;
                got.backing_file_size = 0;
                prop_assert_eq!(&got, &h);
                prop_assert_eq!(&p.backing_file, &name);
                prop_assert_eq!(&p.ext.backing_format, &format);
                prop_assert_eq!(&p.ext.kept, &kept);
                let again = build_header_cluster(
                    &p.header,
                    p.backing_file.as_deref(),
                    p.ext.backing_format.as_deref(),
                    &p.ext.kept,
                );
                prop_assert_eq!(again.as_ref(), Ok(&c));
            }
        }
    }
}

/// The unknown header fields and extensions of an image survive a rewrite
/// byte for byte; only the backing file fields and the format change.
#[test]
fn rewrite_keeps_unknown_fields_and_extensions() {
    let mut h = sample();
    h.header_length = V3_HEADER_LEN as u32 + 16;
    h.unknown_fields = (1..=16).collect();
    let unknown = RawExtension {
        ty: 0x1234_5678,
        data: b"seven b".to_vec(),
    };
    let kept = [feature_table_extension(), unknown.clone()];
    let c = build_header_cluster(&h, Some("old.img"), Some("raw"), &kept).unwrap();
    assert_eq!(&c[112..128], &h.unknown_fields[..]);
    let p = parse(&c, 4 << 16).unwrap();
    assert_eq!(p.ext.feature_names.len(), 8);
    assert_eq!(p.ext.kept, kept);
    let c2 = build_header_cluster(&p.header, Some("new.qcow2"), None, &p.ext.kept).unwrap();
    let p2 = parse(&c2, 4 << 16).unwrap();
    assert_eq!(p2.backing_file.as_deref(), Some("new.qcow2"));
    assert_eq!(p2.ext.backing_format, None);
    assert_eq!(p2.ext.kept, kept);
    assert_eq!(p2.header.unknown_fields, h.unknown_fields);
    // The unknown extension follows the feature table, then the end marker.
    let at = 128 + 8 + 384;
    assert_eq!(&c2[at..at + 4], &0x1234_5678u32.to_be_bytes());
    assert_eq!(&c2[at + 8..at + 15], b"seven b");
    assert_eq!(&c2[at + 16..at + 24], &[0; 8]);
    assert_eq!(&c2[at + 24..at + 33], b"new.qcow2");
    assert!(c2[at + 33..].iter().all(|&b| b == 0), "zeroes to the end");
}

#[test]
fn too_long_or_too_big_is_refused() {
    let h = sample();
    let long = "x".repeat(MAX_BACKING_NAME + 1);
    assert_eq!(
        build_header_cluster(&h, Some(&long), None, &[]),
        Err(Unfit::NameTooLong)
    );
    assert!(build_header_cluster(&h, Some(&long[1..]), None, &[]).is_ok());
    assert_eq!(
        build_header_cluster(&h, Some("a"), Some("sixteen-letters!"), &[]),
        Err(Unfit::FormatTooLong)
    );
    let mut small = sample();
    small.cluster_bits = 9;
    let name = "n".repeat(512 - 112 - 8);
    assert!(build_header_cluster(&small, Some(&name), None, &[]).is_ok());
    let name = "n".repeat(512 - 112 - 8 + 1);
    assert_eq!(
        build_header_cluster(&small, Some(&name), None, &[]),
        Err(Unfit::NoSpace)
    );
    assert_eq!(Unfit::NoSpace.errno(), libc::ENOSPC);
    assert_eq!(Unfit::NameTooLong.errno(), libc::EINVAL);
}

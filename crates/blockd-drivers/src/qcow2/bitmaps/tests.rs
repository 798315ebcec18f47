//! The on-disk format, without I/O.

use super::*;

fn entry(name: &str, flags: u32) -> DirEntry {
    DirEntry {
        table_offset: 0x30000,
        table_size: 1,
        flags,
        granularity_bits: 16,
        name: name.to_string(),
    }
}

#[test]
fn directory_round_trips_and_is_checked() {
    let cs = 65536;
    let len = 1 << 30;
    let list = vec![entry("a", FLAG_AUTO), entry("name-of-nine", FLAG_IN_USE)];
    let dir = build_dir(&list, cs, len).unwrap();
    assert_eq!(dir.len() as u64, entry_size(1) + entry_size(12));
    assert_eq!(entry_size(1), 32);
    assert_eq!(parse_dir(&dir, 2, cs, len).unwrap(), list);
    let msg = |r: Result<Vec<DirEntry>, BlockError>| r.unwrap_err().msg;
    assert_eq!(
        msg(parse_dir(&dir, 1, cs, len)),
        "More bitmaps found than specified in header extension"
    );
    assert_eq!(
        msg(parse_dir(&dir, 3, cs, len)),
        "Less bitmaps found than specified in header extension"
    );
    assert_eq!(
        msg(parse_dir(&dir[..40], 2, cs, len)),
        "Broken bitmap directory"
    );
    // A consistent bitmap must cover the image: one 64 KiB cluster of bits
    // at 64 KiB granularity covers 32 GiB.
    let big = 33u64 << 30;
    assert_eq!(
        msg(parse_dir(&dir, 2, cs, big)),
        "Bitmap 'a' doesn't satisfy the constraints"
    );
    // Reserved flags (extra_data_compatible included) and extra data.
    let mut bad = dir.clone();
    bad[15] |= 4;
    assert_eq!(
        msg(parse_dir(&bad, 2, cs, len)),
        "Bitmap 'a' doesn't satisfy the constraints"
    );
    let mut bad = dir.clone();
    bad[23] = 8;
    assert_eq!(
        msg(parse_dir(&bad, 2, cs, len)),
        "Bitmap extra data is not supported"
    );
}

#[test]
fn extension_errors_are_qemus() {
    let cs = 65536;
    let ext = BitmapsExt {
        nb_bitmaps: 2,
        dir_size: 64,
        dir_offset: 0x50000,
    };
    let b = ext.to_bytes();
    assert_eq!(parse_ext(&b, 1, 3, cs).unwrap(), ExtState::Valid(ext));
    assert_eq!(parse_ext(&b, 0, 3, cs).unwrap(), ExtState::Stale);
    assert_eq!(parse_ext(&b, 0, 2, cs).unwrap(), ExtState::Stale);
    let e = |b: &[u8]| parse_ext(b, 1, 3, cs).unwrap_err().msg;
    assert_eq!(e(&b[..16]), "bitmaps_ext: Invalid extension length");
    let mut r = b.clone();
    r[7] = 1;
    assert_eq!(e(&r), "bitmaps_ext: Reserved field is not zero");
    let z = BitmapsExt {
        nb_bitmaps: 0,
        ..ext
    }
    .to_bytes();
    assert_eq!(e(&z), "found bitmaps extension with zero bitmaps");
    let m = BitmapsExt {
        nb_bitmaps: 65536,
        ..ext
    }
    .to_bytes();
    assert_eq!(
        e(&m),
        "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"
    );
    let o = BitmapsExt {
        dir_offset: 0x50200,
        ..ext
    }
    .to_bytes();
    assert_eq!(e(&o), "bitmaps_ext: invalid bitmap directory offset");
    let s = BitmapsExt {
        dir_size: MAX_DIR_SIZE + 1,
        ..ext
    }
    .to_bytes();
    assert_eq!(
        e(&s),
        "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)"
    );
}

#[test]
fn table_entries_and_sizes() {
    let cs = 65536;
    assert!(check_table_entry(0, cs));
    assert!(check_table_entry(1, cs));
    assert!(check_table_entry(0x30000, cs));
    assert!(!check_table_entry(0x30001, cs));
    assert!(!check_table_entry(0x30200, cs));
    assert!(!check_table_entry(2, cs));
    // 1 GiB at 64 KiB: 16384 bits, 2 KiB: one cluster.
    assert_eq!(table_size_for(1 << 30, 16, cs), 1);
    assert_eq!(table_size_for(1 << 30, 9, 512), 512);
    assert_eq!(serialized_bytes(65 * 512, 9), 16);
}

#[test]
fn can_store_checks_are_qemus() {
    let e = |v, name: &str, g, ex: &[&str]| {
        can_store_new(v, "node0", name, g, ex, 1 << 30, 65536)
            .unwrap_err()
            .msg
    };
    assert!(can_store_new(3, "n", "b", 65536, &["a"], 1 << 30, 65536).is_ok());
    assert_eq!(
        e(2, "b", 65536, &[]),
        "Can't make bitmap 'b' persistent in 'node0': Cannot store dirty bitmaps in qcow2 v2 files"
    );
    assert_eq!(
        e(3, "b", 256, &[]),
        "Can't make bitmap 'b' persistent in 'node0': Granularity is under minimum (512 bytes)"
    );
    assert_eq!(
        e(3, "b", 1 << 32, &[]),
        "Can't make bitmap 'b' persistent in 'node0': Granularity exceeds maximum (2147483648 bytes)"
    );
    let long = "x".repeat(1024);
    assert_eq!(
        e(3, &long, 65536, &[]),
        format!("Can't make bitmap '{long}' persistent in 'node0': Name length exceeds maximum (1023 characters)")
    );
}

#[test]
fn random_bytes_never_panic() {
    let mut x: u64 = 0x1234_5678;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let good = build_dir(&[entry("a", FLAG_AUTO), entry("bb", 0)], 65536, 1 << 30).unwrap();
    for i in 0..20_000 {
        let mut d = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % d.len() as u64) as usize;
            d[at] = next() as u8;
        }
        if i % 3 == 0 {
            d.truncate((next() % (d.len() as u64 + 1)) as usize);
        }
        let nb = (next() % 4) as u32;
        let len = next() >> (next() % 64);
        let _ = parse_dir(&d, nb, 512 << (next() % 13), len);
        let _ = parse_ext(&d[..d.len().min(24)], next() % 2, 3, 65536);
    }
}

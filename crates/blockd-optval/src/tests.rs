//! Tables of inputs and results. The `strtosz` rows follow QEMU's
//! `tests/unit/test-cutils.c` and what qemu-storage-daemon 10.0.2 answers
//! for `--object memory-backend-ram,id=m,size=VALUE` (a keyval `size`)
//! and how many bytes `qemu-io -c 'read 0 VALUE'` reads;
//! the integer rows are checked against the C library itself below.

use std::ffi::CString;

use proptest::prelude::*;

use super::*;
use NumError::{Invalid, Range};

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
const E: u64 = 1 << 60;

#[test]
fn strtosz_table() {
    let rows: &[(&str, Result<u64, NumError>)] = &[
        // Plain numbers and suffixes.
        ("0", Ok(0)),
        ("12345", Ok(12345)),
        ("1b", Ok(1)),
        ("1B", Ok(1)),
        ("1k", Ok(K)),
        ("1K", Ok(K)),
        ("1M", Ok(M)),
        ("1g", Ok(1 << 30)),
        ("1T", Ok(1 << 40)),
        ("1p", Ok(1 << 50)),
        ("1E", Ok(E)),
        ("15E", Ok(15 * E)),
        ("18446744073709551615", Ok(u64::MAX)),
        ("010", Ok(10)),
        // Leading white space is fine, trailing is not.
        (" 1", Ok(1)),
        ("\t1k", Ok(K)),
        ("1 ", Err(Invalid)),
        ("1k ", Err(Invalid)),
        ("", Err(Invalid)),
        (" ", Err(Invalid)),
        // Fractions need a scaling suffix.
        ("1.5k", Ok(1536)),
        ("1.k", Ok(K)),
        (".5k", Ok(512)),
        (" .5k", Ok(512)),
        ("+.5k", Ok(512)),
        ("1.", Ok(1)),
        ("1.0", Ok(1)),
        ("1.0B", Ok(1)),
        // A fraction that rounds to 1.0 as a double carries into the
        // integral part, scale or not (qemu-io reads 2 bytes here).
        ("1.99999999999999999999", Ok(2)),
        ("1.5", Err(Invalid)),
        ("1.1B", Err(Invalid)),
        ("1.00000000000000000001B", Err(Invalid)),
        ("12.345M", Ok((12.345 * M as f64 + 0.5) as u64)),
        ("1.9999k", Ok(2048)),
        (
            "1.9999999999999999999999999999999999999999999999999999k",
            Ok(2048),
        ),
        (".", Err(Invalid)),
        ("k", Err(Invalid)),
        ("abc.5", Err(Invalid)),
        // Hex: no fraction, no suffix; hex digits include b and e.
        ("0x10", Ok(16)),
        ("0X10", Ok(16)),
        (" 0x10", Ok(16)),
        ("0x1b", Ok(27)),
        ("0x1E", Ok(30)),
        ("0x10k", Err(Invalid)),
        ("0x1.8k", Err(Invalid)),
        ("0x", Err(Invalid)),
        ("0x1p3", Err(Invalid)),
        ("0x1ffffffffffffffff", Err(Range)),
        // No exponents: `e` is the exa suffix.
        ("1e3", Err(Invalid)),
        ("1.5e1k", Err(Invalid)),
        ("1.5E999", Err(Invalid)),
        ("inf", Err(Invalid)),
        ("nan", Err(Invalid)),
        // Negative values and overflow are out of range...
        ("-1", Err(Range)),
        (" -0", Err(Range)),
        (" -.0", Err(Range)),
        ("18446744073709551616", Err(Range)),
        ("16E", Err(Range)),
        ("20E", Err(Range)),
        (
            "15.9999999999999999999999999999999999999999999999999999E",
            Err(Range),
        ),
        // ... unless something follows, which makes them invalid.
        ("-2M", Err(Invalid)),
        ("-.1k", Err(Invalid)),
        ("-0x10", Err(Invalid)),
        ("100000Pjunk", Err(Invalid)),
        ("1KiB", Err(Invalid)),
        ("12345z", Err(Invalid)),
    ];
    for (input, want) in rows {
        assert_eq!(strtosz(input), *want, "strtosz({input:?})");
    }
}

#[test]
fn strtosz_fraction_underflow_still_counts() {
    let tiny = format!("1.{}1", "0".repeat(350));
    assert_eq!(strtosz(&format!("{tiny}k")), Ok(K));
    assert_eq!(strtosz(&format!("{tiny}B")), Err(Invalid));
    // Negative: out of range, but the suffix is left over, so invalid.
    assert_eq!(strtosz(&format!(" -.{}1M", "0".repeat(350))), Err(Invalid));
    assert_eq!(strtosz(&format!(" -.{}1", "0".repeat(350))), Err(Range));
}

#[test]
fn integer_table() {
    let u: &[(&str, Result<u64, NumError>)] = &[
        ("0", Ok(0)),
        ("42", Ok(42)),
        (" +0x10", Ok(16)),
        ("0x10", Ok(16)),
        ("017", Ok(15)),
        ("-1", Ok(u64::MAX)),
        ("-2", Ok(u64::MAX - 1)),
        ("-0", Ok(0)),
        ("18446744073709551615", Ok(u64::MAX)),
        ("18446744073709551616", Err(Range)),
        ("-18446744073709551616", Err(Range)),
        ("99999999999999999999x", Err(Invalid)),
        ("", Err(Invalid)),
        (" ", Err(Invalid)),
        ("0x", Err(Invalid)),
        ("08", Err(Invalid)),
        ("1 ", Err(Invalid)),
        (" 1", Ok(1)),
        ("1k", Err(Invalid)),
        ("1.5k", Err(Invalid)),
        ("1e3", Err(Invalid)),
        ("--1", Err(Invalid)),
    ];
    for (input, want) in u {
        assert_eq!(strtou64(input), *want, "strtou64({input:?})");
    }
    let i: &[(&str, Result<i64, NumError>)] = &[
        ("-1", Ok(-1)),
        ("-0x10", Ok(-16)),
        ("9223372036854775807", Ok(i64::MAX)),
        ("-9223372036854775808", Ok(i64::MIN)),
        ("9223372036854775808", Err(Range)),
        ("-9223372036854775809", Err(Range)),
        ("18446744073709551615", Err(Range)),
        ("1 ", Err(Invalid)),
        (" 1", Ok(1)),
        ("", Err(Invalid)),
    ];
    for (input, want) in i {
        assert_eq!(strtoi64(input), *want, "strtoi64({input:?})");
    }
    let p: &[(&str, Result<u64, NumError>)] = &[
        ("60", Ok(60)),
        (" 60", Ok(60)),
        ("+60", Ok(60)),
        ("060", Ok(60)),
        ("0x10", Err(Invalid)),
        ("-1", Err(Range)),
        ("-0", Err(Range)),
        ("18446744073709551616", Err(Range)),
        ("6 ", Err(Invalid)),
    ];
    for (input, want) in p {
        assert_eq!(
            parse_uint_full(input, 10),
            *want,
            "parse_uint_full({input:?})"
        );
    }
}

#[test]
fn file_descriptors() {
    assert_eq!(parse_fd("3"), Some(3));
    assert_eq!(parse_fd(" +3"), Some(3));
    assert_eq!(parse_fd("010"), Some(10));
    assert_eq!(parse_fd("-0"), Some(0));
    assert_eq!(parse_fd("2147483647"), Some(i32::MAX));
    for bad in ["", "-1", "2147483648", "0x3", "3 ", "x"] {
        assert_eq!(parse_fd(bad), None, "{bad:?}");
    }
}

#[test]
fn floats() {
    assert_eq!(strtod_finite("1.5"), Ok(1.5));
    assert_eq!(strtod_finite(" -2e3"), Ok(-2000.0));
    assert_eq!(strtod_finite(".5"), Ok(0.5));
    assert_eq!(strtod_finite("0"), Ok(0.0));
    assert_eq!(strtod_finite("0e-999"), Ok(0.0));
    for bad in ["", "x", "1 ", "inf", "nan", "1e999", "0x1p3", "1e"] {
        assert_eq!(strtod_finite(bad), Err(Invalid), "{bad:?}");
    }
    assert_eq!(strtod_finite("1e-400"), Err(Range));
    assert_eq!(strtod_finite("1e-310"), Err(Range));
}

#[test]
fn booleans() {
    for t in ["on", "yes", "true", "y"] {
        assert_eq!(parse_bool(t), Some(true));
    }
    for f in ["off", "no", "false", "n"] {
        assert_eq!(parse_bool(f), Some(false));
    }
    for bad in ["", "On", "Y", "1", "0", "maybe", " on", "on "] {
        assert_eq!(parse_bool(bad), None, "{bad:?}");
    }
}

#[test]
fn messages() {
    assert_eq!(
        qemu_opts::parse_number("n", "1k"),
        Err("Parameter 'n' expects a number".into())
    );
    assert_eq!(
        qemu_opts::parse_number("n", "99999999999999999999"),
        Err("Value '99999999999999999999' is too large for parameter 'n'".into())
    );
    assert_eq!(
        qemu_opts::parse_size("size", "1e3"),
        Err("Parameter 'size' expects a non-negative number below 2^64".into())
    );
    assert_eq!(
        qemu_opts::parse_size("size", "-1"),
        Err("Value '-1' is out of range for parameter 'size'".into())
    );
    assert_eq!(
        qemu_opts::parse_bool("ro", "maybe"),
        Err("Parameter 'ro' expects 'on' or 'off'".into())
    );
    assert_eq!(
        keyval::int("size", "1.5k"),
        Err("Parameter 'size' expects integer".into())
    );
    assert_eq!(
        keyval::uint("a.b", "18446744073709551616"),
        Err("Parameter 'a.b' expects integer".into())
    );
    assert_eq!(keyval::uint("a", "-1"), Ok(u64::MAX));
    assert_eq!(
        keyval::size("size", "-1"),
        Err("Parameter 'size' expects size".into())
    );
    assert_eq!(keyval::size("size", "1.5k"), Ok(1536));
    assert_eq!(
        keyval::boolean("read-only", "maybe"),
        Err("Parameter 'read-only' expects 'on' or 'off'".into())
    );
    assert_eq!(
        keyval::number("x", "one"),
        Err("Invalid parameter type for 'x', expected: number".into())
    );
}

/// C's `strtoull`/`strtoll` with base 0 over the whole string, as QEMU's
/// wrappers call them.
fn c_strto(s: &str, signed: bool) -> Option<Result<i128, NumError>> {
    let c = CString::new(s).ok()?;
    let mut end: *mut libc::c_char = std::ptr::null_mut();
    // SAFETY: `c` is a valid NUL-terminated string that outlives the
    // calls; `end` receives a pointer into it; errno is this thread's.
    let (v, errno) = unsafe {
        *libc::__errno_location() = 0;
        let v = if signed {
            i128::from(libc::strtoll(c.as_ptr(), &mut end, 0))
        } else {
            i128::from(libc::strtoull(c.as_ptr(), &mut end, 0))
        };
        (v, *libc::__errno_location())
    };
    // SAFETY: `end` points into `c`'s buffer (at most at its NUL).
    let consumed = unsafe { end.offset_from(c.as_ptr()) } as usize;
    Some(if consumed == 0 && errno == 0 || consumed != s.len() {
        Err(Invalid)
    } else if errno == libc::ERANGE {
        Err(Range)
    } else {
        Ok(v)
    })
}

proptest! {
    #[test]
    fn integers_read_as_the_c_library_reads_them(
        s in "[ +\\-]{0,2}(0[xX])?[0-9a-fA-F]{0,22}[ kx.]?"
    ) {
        let c = c_strto(&s, false).unwrap();
        prop_assert_eq!(strtou64(&s).map(i128::from), c, "strtou64({:?})", s);
        let c = c_strto(&s, true).unwrap();
        prop_assert_eq!(strtoi64(&s).map(i128::from), c, "strtoi64({:?})", s);
    }

    #[test]
    fn decimal_sizes_scale_exactly(n in 0u64..(1 << 40), s in 0usize..5) {
        let suffix = ["", "k", "M", "G", "T"][s];
        let want = u128::from(n) << (10 * s);
        let got = strtosz(&format!("{n}{suffix}"));
        match u64::try_from(want) {
            Ok(w) => prop_assert_eq!(got, Ok(w)),
            Err(_) => prop_assert_eq!(got, Err(Range)),
        }
    }
}

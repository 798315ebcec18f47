//! Integers and floating-point numbers as C's `strtoull`/`strtoll`/`strtod`
//! read them (glibc, C locale), wrapped as QEMU's `qemu_strto*` wrap them.

use crate::NumError;

/// C's `isspace` in the C locale.
pub(crate) fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What `strtoull` saw at the start of a string.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scan {
    /// A `-` sign came before the digits.
    pub(crate) neg: bool,
    /// The digits' value (meaningless if `overflow`).
    pub(crate) mag: u64,
    /// The digits do not fit in 64 bits.
    pub(crate) overflow: bool,
    /// Index just past the last digit.
    pub(crate) end: usize,
}

/// `strtoull`'s scan in `base` (0: decimal, `0x` hex or `0` octal): white
/// space, a sign, an optional `0x` (bases 0 and 16, only when a hex digit
/// follows, else the `0` is the number and `x` is left over), digits.
/// `None` when no digit was found (no conversion).
pub(crate) fn scan(s: &[u8], base: u32) -> Option<Scan> {
    let mut i = 0;
    while s.get(i).copied().is_some_and(is_space) {
        i += 1;
    }
    let neg = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut base = base;
    let hex_prefix = s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
    if (base == 0 || base == 16) && hex_prefix {
        i += 2;
        base = 16;
    } else if base == 0 {
        base = if s.get(i) == Some(&b'0') { 8 } else { 10 };
    }
    let start = i;
    let mut mag: u64 = 0;
    let mut overflow = false;
    while let Some(d) = s.get(i).and_then(|&b| char::from(b).to_digit(base)) {
        match mag
            .checked_mul(u64::from(base))
            .and_then(|m| m.checked_add(u64::from(d)))
        {
            Some(v) => mag = v,
            None => overflow = true,
        }
        i += 1;
    }
    (i > start).then_some(Scan {
        neg,
        mag,
        overflow,
        end: i,
    })
}

/// A whole-string scan: invalid without digits or with anything after
/// them (QEMU's `check_strtox_error` with no end pointer).
fn scan_all(s: &str, base: u32) -> Result<Scan, NumError> {
    match scan(s.as_bytes(), base) {
        Some(sc) if sc.end == s.len() => Ok(sc),
        _ => Err(NumError::Invalid),
    }
}

/// QEMU's `qemu_strtou64(s, NULL, 0, ..)`: C's `strtoull` with base 0 over
/// the whole string. A negative number wraps around (`-1` is 2^64 - 1);
/// more than 64 bits of magnitude is out of range.
pub fn strtou64(s: &str) -> Result<u64, NumError> {
    let sc = scan_all(s, 0)?;
    if sc.overflow {
        return Err(NumError::Range);
    }
    Ok(if sc.neg {
        sc.mag.wrapping_neg()
    } else {
        sc.mag
    })
}

/// QEMU's `qemu_strtoi64(s, NULL, 0, ..)`: C's `strtoll` with base 0 over
/// the whole string.
pub fn strtoi64(s: &str) -> Result<i64, NumError> {
    let sc = scan_all(s, 0)?;
    if sc.overflow {
        return Err(NumError::Range);
    }
    if sc.neg {
        // -2^63 is the one magnitude that fits only negated.
        0i64.checked_sub_unsigned(sc.mag).ok_or(NumError::Range)
    } else {
        i64::try_from(sc.mag).map_err(|_| NumError::Range)
    }
}

/// QEMU's `parse_uint_full(s, base, ..)`: `strtoull` in `base` (0, or 2 to
/// 36) over the whole string, with negative numbers (`-0` included) out of
/// range instead of wrapped.
pub fn parse_uint_full(s: &str, base: u32) -> Result<u64, NumError> {
    assert!(base == 0 || (2..=36).contains(&base), "base {base}");
    let sc = scan_all(s, base)?;
    if sc.overflow || sc.neg {
        return Err(NumError::Range);
    }
    Ok(sc.mag)
}

/// QEMU's `qemu_parse_fd` (also `qemu_parse_fdset`): C's `strtol` in base
/// 10 over the whole string, with results below 0 or above `INT_MAX`
/// refused. `None` where QEMU returns -1.
pub fn parse_fd(s: &str) -> Option<i32> {
    let sc = scan_all(s, 10).ok()?;
    if sc.overflow || (sc.neg && sc.mag != 0) {
        return None;
    }
    i32::try_from(sc.mag).ok()
}

/// QEMU's `qemu_strtod_finite(s, NULL, ..)`: a decimal floating-point
/// number (leading white space, a sign, digits with an optional point and
/// exponent) over the whole string. Infinities and NaN are invalid; a
/// result that underflows (zero or subnormal from non-zero digits) is out
/// of range, as glibc's `strtod` reports it. (glibc also reads hex floats,
/// `0x1p3`; blockd does not, as no blockd option takes a float.)
pub fn strtod_finite(s: &str) -> Result<f64, NumError> {
    let b = s.as_bytes();
    let start = b.iter().position(|&c| !is_space(c)).unwrap_or(b.len());
    let body = &s[start..];
    let decimal = body
        .bytes()
        .all(|c| c.is_ascii_digit() || matches!(c, b'+' | b'-' | b'.' | b'e' | b'E'));
    if !decimal {
        return Err(NumError::Invalid);
    }
    let v: f64 = body.parse().map_err(|_| NumError::Invalid)?;
    if !v.is_finite() {
        return Err(NumError::Invalid);
    }
    let mantissa = body.split(['e', 'E']).next().unwrap_or_default();
    let nonzero = mantissa.bytes().any(|c| matches!(c, b'1'..=b'9'));
    if nonzero && (v == 0.0 || v.is_subnormal()) {
        return Err(NumError::Range);
    }
    Ok(v)
}

//! QEMU's `qemu_strtosz` (`do_strtosz` in `util/cutils.c`, QEMU 8.1 and
//! later), step by step.
//!
//! * `12345`, `12345k`: decimal, scaled by the suffix (bytes without one);
//!   octal is not a thing (`010` is ten).
//! * `1.5k`, `.5k`, `1.k`: a fraction needs a suffix that scales it to
//!   bytes; it is kept with 64 bits of precision and the result rounds
//!   half up (`1.9999k` is 2048). `1.0` and `1.` are 1; `1.5` is invalid.
//! * `0x7fee`: hex, without fraction or suffix (`0x1b` is 27; `0x10k` is
//!   invalid).
//! * `1e3` is `1` scaled by `E` with a `3` left over, so invalid; the
//!   fraction's digits stop at an `e` as well.
//! * Negative values (`-0` too) and results of 2^64 or more are out of
//!   range.

use crate::num::scan;
use crate::NumError;

/// The multiplier of a suffix: `B` is 1, `K` is 1024, ... `E` is 1024^6.
fn suffix_mul(c: Option<&u8>) -> Option<u64> {
    let exp = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 1,
        b'M' => 2,
        b'G' => 3,
        b'T' => 4,
        b'P' => 5,
        b'E' => 6,
        _ => return None,
    };
    Some(1024u64.pow(exp))
}

/// The fraction `strtod` reads from `copy` (the input from the integral
/// part's end, cut at the first `e` and the first `E`): white space, a
/// sign, then `.` and digits (the integral digits, if any, were already
/// taken). Returns the sign, the digits after the point and how many bytes
/// were read; `None` if `strtod` would convert nothing or read a
/// non-finite value.
fn fraction(copy: &[u8]) -> Option<(bool, &[u8], usize)> {
    let mut i = 0;
    while copy.get(i).copied().is_some_and(crate::num::is_space) {
        i += 1;
    }
    let neg = match copy.get(i) {
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
    if copy.get(i) != Some(&b'.') {
        return None;
    }
    let digits_at = i + 1;
    let mut end = digits_at;
    while copy.get(end).is_some_and(u8::is_ascii_digit) {
        end += 1;
    }
    (end > digits_at).then(|| (neg, &copy[digits_at..end], end))
}

/// The 64.64 fixed-point fraction QEMU extracts from `0.DIGITS`: the
/// double nearest to it times 2^64, and at least 1 when any digit is not
/// zero (an underflowing fraction still counts). `None` when the double
/// rounds to 1.0 (then the integral part goes up by one).
fn fixed_point(digits: &[u8]) -> Option<u64> {
    let text: String = std::iter::once("0.")
        .chain(std::str::from_utf8(digits).ok())
        .collect();
    let f: f64 = text.parse().unwrap_or(0.0);
    if f == 1.0 {
        return None;
    }
    let valf = (f * 18_446_744_073_709_551_616.0) as u64;
    let nonzero = digits.iter().any(|&d| d != b'0');
    Some(if valf == 0 && nonzero { 1 } else { valf })
}

/// QEMU's `qemu_strtosz(s, NULL, ..)`: a byte count, as the module
/// documentation describes.
pub fn strtosz(s: &str) -> Result<u64, NumError> {
    let b = s.as_bytes();
    let (result, end) = strtosz_prefix(b);
    // QEMU's `out:` label: anything left over makes the value invalid,
    // whatever else went wrong.
    if end != b.len() {
        return Err(NumError::Invalid);
    }
    result
}

/// `do_strtosz` with an end pointer: the result and where parsing stopped.
fn strtosz_prefix(b: &[u8]) -> (Result<u64, NumError>, usize) {
    let invalid = (Err(NumError::Invalid), 0);
    // The integral part, as decimal (QEMU's parse_uint).
    let (mut val, mut end, digits) = match scan(b, 10) {
        None => (0, 0, false),
        Some(sc) if sc.overflow || sc.neg => return (Err(NumError::Range), sc.end),
        Some(sc) => (sc.mag, sc.end, true),
    };
    let mut valf: u64 = 0;
    if digits && val == 0 && matches!(b.get(end), Some(b'x' | b'X')) {
        // Hex: reparse, and insist on no fraction and no suffix.
        let Some(sc) = scan(b, 16) else {
            return invalid;
        };
        end = sc.end;
        if sc.overflow {
            return (Err(NumError::Range), end);
        }
        val = sc.mag;
        if b.get(end) == Some(&b'.') || suffix_mul(b.get(end)).is_some() {
            return invalid;
        }
    } else if b.get(end) == Some(&b'.') || (!digits && b.contains(&b'.')) {
        if digits && !b.get(end + 1).is_some_and(u8::is_ascii_digit) {
            // `1.` and `1.k`: an empty fraction.
            end += 1;
        } else {
            let rest = &b[end..];
            let cut = rest
                .iter()
                .position(|&c| c == b'e' || c == b'E')
                .unwrap_or(rest.len());
            let Some((neg, fdigits, read)) = fraction(&rest[..cut]) else {
                return invalid;
            };
            end += read;
            if neg {
                // strtod's -0.x has its sign bit set: negative.
                return (Err(NumError::Range), end);
            }
            match fixed_point(fdigits) {
                Some(f) => valf = f,
                None => match val.checked_add(1) {
                    Some(v) => val = v,
                    None => return (Err(NumError::Range), end),
                },
            }
        }
    } else if !digits {
        return invalid;
    }
    let mul = match suffix_mul(b.get(end)) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if mul == 1 {
        // A fraction needs a scale.
        if valf != 0 {
            return invalid;
        }
        return (Ok(val), end);
    }
    // Exact 64.64 x 64.0 product, rounding half up.
    let whole = u128::from(val) * u128::from(mul);
    let frac = u128::from(valf) * u128::from(mul);
    let total = whole + (frac >> 64) + ((frac >> 63) & 1);
    match u64::try_from(total) {
        Ok(v) => (Ok(v), end),
        Err(_) => (Err(NumError::Range), end),
    }
}

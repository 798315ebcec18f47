//! QEMU's option-value parsers: how a number, a size or a boolean given as
//! a string is read, in one place for every blockd caller.
//!
//! QEMU reads option values with a handful of C functions, and blockd
//! mirrors each once:
//!
//! | QEMU | here | syntax |
//! | --- | --- | --- |
//! | `qemu_strtosz` (`util/cutils.c`) | [`strtosz`] | decimal (with an optional fraction when a suffix scales it) or `0x` hex; suffix `B`/`K`/`M`/`G`/`T`/`P`/`E` in either case, powers of 1024; bytes by default |
//! | `qemu_strtou64(s, NULL, 0, ..)` | [`strtou64`] | C's `strtoull` with base 0: leading white space, a sign, decimal, `0x` hex or `0` octal; a negative number wraps around |
//! | `qemu_strtoi64(s, NULL, 0, ..)` | [`strtoi64`] | C's `strtoll` with base 0 |
//! | `parse_uint_full` | [`parse_uint_full`] | `strtoull` in a given base, negative numbers refused |
//! | `qemu_strtod_finite(s, NULL, ..)` | [`strtod_finite`] | a finite decimal floating-point number |
//! | `qemu_parse_fd` | [`parse_fd`] | `strtol` in base 10, 0 to `INT_MAX` (`/dev/fdset/N`) |
//! | `qapi_bool_parse` (`qapi/qapi-util.c`) | [`parse_bool`] | `on`/`yes`/`true`/`y` and `off`/`no`/`false`/`n`, case-sensitive |
//!
//! Every function reads the whole string, as QEMU's callers that pass no
//! end pointer do: trailing characters (a trailing space included) make
//! the value invalid, and an invalid value takes precedence over an
//! out-of-range one (`99999999999999999999x` is invalid, not too large).
//!
//! QEMU words the errors of these parsers differently depending on who
//! calls them; [`qemu_opts`] and [`keyval`] hold the two wordings blockd's
//! callers show:
//!
//! * [`qemu_opts`]: QemuOpts (`util/qemu-option.c`), behind `-drive`,
//!   `-chardev`, config files (blkdebug's) and the drivers' runtime
//!   options: `Parameter 'x' expects a number`, `Value '...' is too large
//!   for parameter 'x'`, ...
//! * [`keyval`]: the keyval QObject input visitor
//!   (`qapi/qobject-input-visitor.c`), behind `--blockdev`, `--export`,
//!   `--nbd-server`, `--monitor`, `--object` and device properties:
//!   `Parameter 'x' expects integer`, `Parameter 'x' expects size`, ...
//!
//! Every boolean entry point of QEMU 10 (keyval, QemuOpts, qdev
//! properties) goes through `qapi_bool_parse`, so they all accept the same
//! eight spellings; qemu-storage-daemon 10.0.2 takes `read-only=y` in
//! `--blockdev`, and qemu-io takes it in `--image-opts`.
//!
//! This crate has no dependencies, so that the bottom crates
//! (`blockd-qmp`, `blockd-core`) can use it without depending on each
//! other.

mod num;
mod size;
#[cfg(test)]
mod tests;

pub use num::{parse_fd, parse_uint_full, strtod_finite, strtoi64, strtou64};
pub use size::strtosz;

/// Why a string is not a valid value (QEMU's `-EINVAL` and `-ERANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumError {
    /// Not a number of the expected syntax, or characters after it.
    Invalid,
    /// A number, but out of the type's range (negative sizes included).
    Range,
}

/// QEMU's `qapi_bool_parse`: the boolean spellings every QEMU option
/// parser accepts. Case matters (`On` is not a boolean).
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// The value parsers of QemuOpts (`util/qemu-option.c`: `parse_option_number`,
/// `parse_option_size`, `parse_option_bool`), with their messages. `name`
/// is the option's name as the user wrote it.
pub mod qemu_opts {
    use super::NumError;

    /// A `QEMU_OPT_NUMBER` option: [`super::strtou64`].
    pub fn parse_number(name: &str, value: &str) -> Result<u64, String> {
        super::strtou64(value).map_err(|e| match e {
            NumError::Range => format!("Value '{value}' is too large for parameter '{name}'"),
            NumError::Invalid => format!("Parameter '{name}' expects a number"),
        })
    }

    /// A `QEMU_OPT_SIZE` option: [`super::strtosz`].
    pub fn parse_size(name: &str, value: &str) -> Result<u64, String> {
        super::strtosz(value).map_err(|e| match e {
            NumError::Range => format!("Value '{value}' is out of range for parameter '{name}'"),
            NumError::Invalid => {
                format!("Parameter '{name}' expects a non-negative number below 2^64")
            }
        })
    }

    /// A `QEMU_OPT_BOOL` option: [`super::parse_bool`].
    pub fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
        super::parse_bool(value).ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'"))
    }
}

/// The scalar parsers of QEMU's keyval input visitor
/// (`qobject_input_type_*_keyval`), with their messages. `name` is the
/// member's full name (`file.size`), as the visitor reports it.
///
/// Out-of-range values read as invalid here ("TODO report -ERANGE more
/// nicely" in QEMU): `18446744073709551616` for an `int` member is
/// `Parameter 'x' expects integer`.
pub mod keyval {
    /// `int`, `int8` ... `int64` members: [`super::strtoi64`]. (The range
    /// of the narrower types is checked afterwards, by the visitor.)
    pub fn int(name: &str, value: &str) -> Result<i64, String> {
        super::strtoi64(value).map_err(|_| format!("Parameter '{name}' expects integer"))
    }

    /// `uint8` ... `uint64` members: [`super::strtou64`] (so `-1` is
    /// 2^64 - 1, as in QEMU).
    pub fn uint(name: &str, value: &str) -> Result<u64, String> {
        super::strtou64(value).map_err(|_| format!("Parameter '{name}' expects integer"))
    }

    /// `size` members: [`super::strtosz`].
    pub fn size(name: &str, value: &str) -> Result<u64, String> {
        super::strtosz(value).map_err(|_| format!("Parameter '{name}' expects size"))
    }

    /// `bool` members: [`super::parse_bool`].
    pub fn boolean(name: &str, value: &str) -> Result<bool, String> {
        super::parse_bool(value).ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'"))
    }

    /// `number` members: [`super::strtod_finite`].
    pub fn number(name: &str, value: &str) -> Result<f64, String> {
        super::strtod_finite(value)
            .map_err(|_| format!("Invalid parameter type for '{name}', expected: number"))
    }
}

//! Streaming JSON parser for QMP input, in QEMU's JSON dialect.
//!
//! QMP clients write a stream of JSON texts to the socket. [`StreamParser`]
//! turns that byte stream into a sequence of items, each either a
//! [`serde_json::Value`] or one [`JsonError`], as bytes arrive.
//!
//! # Framing
//!
//! Input is a byte stream, not lines. `{"a":1}{"b":2}` is two items; an
//! object spread over several lines is one; an item is complete the moment
//! its closing bracket or quote arrives, with no newline needed. Whitespace
//! (space, tab, CR, LF) between items is ignored. Top-level scalars and arrays
//! are items too (the dispatcher rejects them with "QMP input must be a JSON
//! object"). A top-level number or keyword ends at the first byte that cannot
//! continue it, so `42` alone stays pending until a delimiter arrives or
//! [`StreamParser::finish`] is called.
//!
//! Parsing is fully incremental: state carries across
//! [`feed`](StreamParser::feed) calls at any byte boundary, including inside
//! a string escape, a multibyte UTF-8 character, a number or a keyword.
//! Values are built on an explicit stack, so deep nesting uses no native
//! stack.
//!
//! # Dialect
//!
//! * Strings may be double- or single-quoted. In `'...'` a `"` is literal.
//!   Escapes: `\" \\ \/ \b \f \n \r \t \' \uXXXX` (`\'` also in `"..."`).
//!   `\u0000` is accepted. Surrogate escape pairs combine; an unpaired one is
//!   `JSON parse error, \ud800 is not a valid Unicode character` (quoting the
//!   escape as written). Raw control characters (below 0x20, including tab
//!   and newline) inside a string are errors, as is malformed UTF-8
//!   (truncated, overlong, encoded surrogates, above U+10FFFF):
//!   `JSON parse error, invalid UTF-8 sequence in string`.
//! * Numbers follow the JSON grammar. An integer literal becomes `i64` if it
//!   fits, else `u64` if it fits, else `f64`. A literal with a fraction or
//!   exponent becomes `f64`. A float too large for `f64` (e.g. `1e400`)
//!   becomes `±f64::MAX`, because `serde_json::Value` cannot hold infinity.
//!   `-0` is the integer 0.
//! * Keywords are `true`, `false`, `null`; any other word is
//!   `JSON parse error, invalid keyword 'foo'`.
//! * A number or keyword token is the maximal run of ASCII alphanumerics and
//!   `_ - + .`; so `01`, `1.x` or `0x1` are one error
//!   (`JSON parse error, invalid number '01'`) rather than several tokens.
//! * A duplicate key in one object is `JSON parse error, duplicate key`.
//! * Grammar errors name what was expected: `expecting value`,
//!   `key is not a string in object`, `missing : in object pair`,
//!   `expecting ',' or '}'`, `expecting ',' or ']'` (all prefixed with
//!   `JSON parse error, `).
//! * A byte that cannot start a token outside a string (control bytes, NUL,
//!   0xFF, `%`, a non-ASCII character, ...) is `JSON parse error, stray 'X'`,
//!   X being the character, or U+FFFD for bytes that are not valid UTF-8.
//!
//! # Limits
//!
//! Per message (see [`Limits`]): more than `max_depth` open `{`/`[` is
//! `JSON nesting depth limit exceeded`; more than `max_message_bytes` bytes
//! of token text (whitespace between tokens is not counted) is
//! `JSON token size limit exceeded`; more than `max_tokens` tokens is
//! `JSON token count limit exceeded`. Limits are checked byte by byte, so a
//! limit error is raised as soon as it is crossed, without waiting for the
//! message to end.
//!
//! # Error recovery
//!
//! QEMU's own parser can swallow valid commands after a broken one; blockd
//! resynchronises better. Every broken message yields exactly one error, then
//! parsing resumes:
//!
//! 1. Errors are detected at the first token that cannot continue the
//!    message. The grammar state (expecting key / colon / value /
//!    comma-or-close) is checked as soon as a token's first byte arrives, so
//!    a truncated `{"execute": "x"` followed by a new `{"execute": ...}` is
//!    reported at the second `{`.
//! 2. After a syntax or lexical error, if the offending token is `{` it
//!    begins a new message at once. Otherwise the rest of the broken message
//!    is skipped: input is discarded until its bracket depth (the containers
//!    open at the error, adjusted by brackets seen while skipping, outside
//!    strings; the offending token itself counts if it is a bracket) returns
//!    to zero, or until a `{` is the first non-whitespace character after a
//!    LF, whichever comes first; that `{` begins a new message. While
//!    skipping, a LF also ends any string being skipped (a valid string cannot
//!    contain one). If the error was inside a number or keyword, the rest of
//!    that word is skipped too, so `1.5.5` or `-foo` is one error.
//! 3. A reset byte (an ASCII control character other than tab/CR/LF, or
//!    0xFF) anywhere returns the parser to the top level immediately. If a
//!    message was being parsed, or at the top level, it is reported as one
//!    error (`stray`, or the string error when inside a string); while
//!    skipping after an earlier error it is silent. A number or keyword
//!    token right before it is delimited by it as by any other byte (so
//!    `{"a":1}` then NUL is a value and then an error, and `tru` then NUL is
//!    one `invalid keyword` error).
//! 4. After a limit error (depth, size, tokens), the rest of the message is
//!    skipped exactly as in rule 2 (except that an offending `{` counts as a
//!    nested bracket rather than starting a new message) without reporting
//!    its pieces and without buffering them.
//! 5. A raw newline inside a string is an error for that message, followed
//!    by rule 2; the newline itself counts as the LF of the resync rule.
//!
//! # Memory
//!
//! Only the current token and the partial value of the message in progress
//! are held, never a whole line; skipped input is never buffered. The token
//! text of one message is bounded by [`Limits::max_message_bytes`] (see
//! [`StreamParser::pending_bytes`]), and the number of values by
//! [`Limits::max_tokens`].

mod lexer;
mod stream;
#[cfg(test)]
mod tests;

use std::fmt;

pub use stream::StreamParser;

/// Per-message resource limits enforced by [`StreamParser`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Maximum number of `{`/`[` open at once (default 1024). A message
    /// nested exactly this deep is accepted.
    pub max_depth: usize,
    /// Maximum total bytes of token text in one message, counting string
    /// quotes and escapes as written but not whitespace between tokens
    /// (default 64 MiB).
    pub max_message_bytes: usize,
    /// Maximum number of tokens in one message (default 2 Mi = 2,097,152).
    pub max_tokens: usize,
}

impl Limits {
    /// Default nesting limit.
    pub const DEFAULT_MAX_DEPTH: usize = 1024;
    /// Default message size limit (64 MiB).
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
    /// Default token count limit (2 Mi).
    pub const DEFAULT_MAX_TOKENS: usize = 2 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: Self::DEFAULT_MAX_DEPTH,
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            max_tokens: Self::DEFAULT_MAX_TOKENS,
        }
    }
}

/// Error for one input item: the message was malformed or over a limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsonError {
    /// The full QMP error text, e.g. `JSON parse error, expecting value`.
    pub desc: String,
}

impl JsonError {
    /// Creates an error with the given description.
    pub fn new(desc: impl Into<String>) -> Self {
        Self { desc: desc.into() }
    }

    /// Whether this error comes from a [`Limits`] check rather than from
    /// malformed input.
    pub fn is_limit(&self) -> bool {
        self.desc.ends_with("limit exceeded")
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for JsonError {}

//! Byte-level token automata for the QMP JSON dialect.
//!
//! Every automaton here consumes one byte at a time and keeps all of its
//! state in a small struct, so a token may be split across any number of
//! [`StreamParser::feed`](super::StreamParser::feed) calls at any byte
//! boundary (inside an escape, inside a multibyte UTF-8 character, inside a
//! number or keyword). The stream layer decides which automaton is active and
//! what to do with its results; this module knows nothing about grammar,
//! limits or recovery.

use serde_json::{Number, Value};

/// Longest token excerpt quoted verbatim in an error message.
const EXCERPT_MAX: usize = 64;

/// Error text for malformed UTF-8 inside a string.
pub(super) const ERR_UTF8: &str = "JSON parse error, invalid UTF-8 sequence in string";

/// Error text for a backslash escape that is not part of the dialect.
const ERR_ESCAPE: &str = "JSON parse error, invalid escape sequence in string";

/// Error text for a `\u` escape with a non-hex digit.
const ERR_HEX_ESCAPE: &str = "JSON parse error, invalid \\u escape sequence in string";

/// Whether `b` is JSON insignificant whitespace (space, tab, CR, LF).
pub(super) fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Whether `b` is a "reset" byte: an ASCII control character other than
/// tab/CR/LF, or 0xFF. Such a byte aborts whatever is in progress and returns
/// the parser to the top level (QEMU's documented way to resynchronise).
pub(super) fn is_reset_byte(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0xFF
}

/// Whether `b` belongs to a "word": the maximal run of bytes that is lexed as
/// one number or keyword token (ASCII alphanumerics and `_ - + .`).
///
/// Lexing greedily over this set means `01`, `1.x` or `0x10` are reported as
/// one bad token instead of being silently split into several tokens.
pub(super) fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'.')
}

/// Shortens token text for inclusion in an error message.
pub(super) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Incremental validator for one multibyte UTF-8 sequence.
///
/// Rejects overlong encodings, UTF-16 surrogates (U+D800..U+DFFF) and code
/// points above U+10FFFF by narrowing the permitted range of the first
/// continuation byte, as in the Unicode "well-formed byte sequences" table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Utf8Seq {
    /// Continuation bytes still expected.
    need: u8,
    /// Lowest permitted value for the next continuation byte.
    lo: u8,
    /// Highest permitted value for the next continuation byte.
    hi: u8,
}

impl Utf8Seq {
    /// Starts a sequence from a lead byte `>= 0x80`; `None` if `b` can never
    /// begin a well-formed sequence.
    pub(super) fn start(b: u8) -> Option<Self> {
        let (need, lo, hi) = match b {
            0xC2..=0xDF => (1, 0x80, 0xBF),
            0xE0 => (2, 0xA0, 0xBF),
            0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
            0xED => (2, 0x80, 0x9F),
            0xF0 => (3, 0x90, 0xBF),
            0xF1..=0xF3 => (3, 0x80, 0xBF),
            0xF4 => (3, 0x80, 0x8F),
            _ => return None,
        };
        Some(Self { need, lo, hi })
    }

    /// Accepts the next byte. `Ok(true)` when the sequence is complete,
    /// `Ok(false)` when more bytes are needed, `Err(())` if `b` is not a
    /// permitted continuation byte here.
    pub(super) fn next(&mut self, b: u8) -> Result<bool, ()> {
        if b < self.lo || b > self.hi {
            return Err(());
        }
        self.need -= 1;
        self.lo = 0x80;
        self.hi = 0xBF;
        Ok(self.need == 0)
    }
}

/// A high surrogate read from a `\uXXXX` escape, waiting for its low half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Surrogate {
    /// The code unit (0xD800..=0xDBFF).
    unit: u32,
    /// The four hex digits as written, for the error message.
    raw: [u8; 4],
}

impl Surrogate {
    /// The error reported when this surrogate is not properly paired.
    fn error(&self) -> String {
        lone_surrogate_error(self.raw)
    }
}

/// Error text for an unpaired surrogate escape `\uXXXX` (digits as written).
fn lone_surrogate_error(raw: [u8; 4]) -> String {
    let digits: String = raw.iter().map(|&c| char::from(c)).collect();
    format!("JSON parse error, \\u{digits} is not a valid Unicode character")
}

/// Sub-state of a string token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StrState {
    /// Ordinary characters.
    Plain,
    /// Inside a multibyte UTF-8 character.
    Utf8(Utf8Seq),
    /// After a backslash.
    Escape,
    /// Reading the hex digits of a `\u` escape; `high` is set when this is
    /// the second half of a surrogate pair.
    Hex {
        count: u8,
        unit: u32,
        raw: [u8; 4],
        high: Option<Surrogate>,
    },
    /// After a high surrogate escape, expecting `\` of the low half.
    AfterHigh(Surrogate),
    /// After a high surrogate escape and `\`, expecting `u`.
    AfterHighBackslash(Surrogate),
}

/// Result of feeding one byte to a [`StrLexer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StrStep {
    /// Byte consumed, string continues.
    More,
    /// Byte was the closing quote; the string is complete.
    Done,
    /// The string is malformed.
    Fail {
        /// Full error text.
        desc: String,
        /// Whether the offending byte must be re-examined by the recovery
        /// scanner (it may be a closing quote, a backslash or a newline).
        reabsorb: bool,
        /// Whether the recovery scanner should treat the next byte it sees
        /// as escaped (the failure happened right after a backslash).
        escaped: bool,
    },
}

impl StrStep {
    /// Convenience constructor for a failure.
    fn fail(desc: impl Into<String>, reabsorb: bool, escaped: bool) -> Self {
        StrStep::Fail {
            desc: desc.into(),
            reabsorb,
            escaped,
        }
    }
}

/// Automaton for a double- or single-quoted string token; accumulates the
/// decoded contents (already validated UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StrLexer {
    /// The opening quote, `"` or `'`; only the same quote closes the string.
    quote: u8,
    /// Decoded contents so far; always valid UTF-8 except possibly for the
    /// bytes of an in-progress multibyte character.
    buf: Vec<u8>,
    /// Sub-state.
    state: StrState,
}

impl StrLexer {
    /// Starts a string opened by `quote`.
    pub(super) fn new(quote: u8) -> Self {
        Self {
            quote,
            buf: Vec::new(),
            state: StrState::Plain,
        }
    }

    /// The quote character that will close this string.
    pub(super) fn quote(&self) -> u8 {
        self.quote
    }

    /// Whether the lexer is between characters (not inside an escape or a
    /// multibyte character), so a run of plain ASCII may be appended in bulk.
    pub(super) fn is_plain(&self) -> bool {
        self.state == StrState::Plain
    }

    /// Whether the next byte would be the character following a backslash.
    pub(super) fn after_backslash(&self) -> bool {
        matches!(
            self.state,
            StrState::Escape | StrState::AfterHighBackslash(_)
        )
    }

    /// Appends a run of plain printable ASCII bytes (no quote, no backslash,
    /// no control characters). Only valid while [`is_plain`](Self::is_plain).
    pub(super) fn push_plain_run(&mut self, run: &[u8]) {
        debug_assert!(self.is_plain());
        self.buf.extend_from_slice(run);
    }

    /// Appends a decoded character.
    fn push_char(&mut self, c: char) {
        let mut tmp = [0u8; 4];
        self.buf
            .extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
    }

    /// Feeds one byte (never a reset byte; the caller handles those).
    pub(super) fn step(&mut self, b: u8) -> StrStep {
        match std::mem::replace(&mut self.state, StrState::Plain) {
            StrState::Plain => self.step_plain(b),
            StrState::Utf8(mut seq) => match seq.next(b) {
                Ok(done) => {
                    self.buf.push(b);
                    if !done {
                        self.state = StrState::Utf8(seq);
                    }
                    StrStep::More
                }
                Err(()) => StrStep::fail(ERR_UTF8, true, false),
            },
            StrState::Escape => self.step_escape(b),
            StrState::Hex {
                count,
                unit,
                raw,
                high,
            } => self.step_hex(b, count, unit, raw, high),
            StrState::AfterHigh(high) => {
                if b == b'\\' {
                    self.state = StrState::AfterHighBackslash(high);
                    StrStep::More
                } else {
                    StrStep::fail(high.error(), true, false)
                }
            }
            StrState::AfterHighBackslash(high) => {
                if b == b'u' {
                    self.state = StrState::Hex {
                        count: 0,
                        unit: 0,
                        raw: [0; 4],
                        high: Some(high),
                    };
                    StrStep::More
                } else {
                    StrStep::fail(high.error(), true, true)
                }
            }
        }
    }

    /// [`step`](Self::step) in the `Plain` sub-state.
    fn step_plain(&mut self, b: u8) -> StrStep {
        if b == self.quote {
            return StrStep::Done;
        }
        match b {
            b'\\' => {
                self.state = StrState::Escape;
                StrStep::More
            }
            0x00..=0x1F => StrStep::fail(
                format!(
                    "JSON parse error, unescaped control character {:?} in string",
                    char::from(b)
                ),
                true,
                false,
            ),
            0x20..=0x7F => {
                self.buf.push(b);
                StrStep::More
            }
            _ => match Utf8Seq::start(b) {
                Some(seq) => {
                    self.buf.push(b);
                    self.state = StrState::Utf8(seq);
                    StrStep::More
                }
                None => StrStep::fail(ERR_UTF8, false, false),
            },
        }
    }

    /// [`step`](Self::step) right after a backslash.
    fn step_escape(&mut self, b: u8) -> StrStep {
        let c = match b {
            b'"' | b'\\' | b'/' | b'\'' => char::from(b),
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                self.state = StrState::Hex {
                    count: 0,
                    unit: 0,
                    raw: [0; 4],
                    high: None,
                };
                return StrStep::More;
            }
            _ => return StrStep::fail(ERR_ESCAPE, true, true),
        };
        self.push_char(c);
        StrStep::More
    }

    /// [`step`](Self::step) inside the hex digits of a `\u` escape.
    fn step_hex(
        &mut self,
        b: u8,
        count: u8,
        unit: u32,
        mut raw: [u8; 4],
        high: Option<Surrogate>,
    ) -> StrStep {
        let Some(digit) = char::from(b).to_digit(16) else {
            return StrStep::fail(ERR_HEX_ESCAPE, true, false);
        };
        raw[usize::from(count)] = b;
        let unit = unit * 16 + digit;
        let count = count + 1;
        if count < 4 {
            self.state = StrState::Hex {
                count,
                unit,
                raw,
                high,
            };
            return StrStep::More;
        }
        let is_high = (0xD800..=0xDBFF).contains(&unit);
        let is_low = (0xDC00..=0xDFFF).contains(&unit);
        match high {
            None if is_high => {
                self.state = StrState::AfterHigh(Surrogate { unit, raw });
                StrStep::More
            }
            None if is_low => StrStep::fail(lone_surrogate_error(raw), false, false),
            None => match char::from_u32(unit) {
                Some(c) => {
                    self.push_char(c);
                    StrStep::More
                }
                None => StrStep::fail(lone_surrogate_error(raw), false, false),
            },
            Some(high) if is_low => {
                let cp = 0x10000 + ((high.unit - 0xD800) << 10) + (unit - 0xDC00);
                match char::from_u32(cp) {
                    Some(c) => {
                        self.push_char(c);
                        StrStep::More
                    }
                    None => StrStep::fail(high.error(), false, false),
                }
            }
            Some(high) => StrStep::fail(high.error(), false, false),
        }
    }

    /// Finishes a string whose closing quote has been seen.
    pub(super) fn into_string(self) -> Result<String, String> {
        // The automaton only ever appends validated UTF-8, so this cannot
        // fail; report it as a UTF-8 error rather than panicking regardless.
        String::from_utf8(self.buf).map_err(|_| ERR_UTF8.to_owned())
    }
}

/// Sub-state of a number token (JSON number grammar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumState {
    /// After a leading `-`.
    Minus,
    /// After a leading `0` of the integer part.
    Zero,
    /// Inside integer digits (first was 1-9).
    Int,
    /// After the decimal point.
    Dot,
    /// Inside fraction digits.
    Frac,
    /// After `e`/`E`.
    Exp,
    /// After the exponent sign.
    ExpSign,
    /// Inside exponent digits.
    ExpDigits,
}

/// Automaton for a number token; keeps the token text for conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NumLexer {
    /// Token text so far (ASCII).
    text: String,
    /// Sub-state.
    state: NumState,
    /// Whether a `.` or exponent has been seen.
    is_float: bool,
}

impl NumLexer {
    /// Starts a number with its first byte (`-` or a digit).
    pub(super) fn new(first: u8) -> Self {
        let state = match first {
            b'-' => NumState::Minus,
            b'0' => NumState::Zero,
            _ => NumState::Int,
        };
        Self {
            text: char::from(first).to_string(),
            state,
            is_float: false,
        }
    }

    /// Feeds one word byte (see [`is_word_byte`]). Errors if the byte cannot
    /// continue a valid number; the error quotes the text including `b`.
    pub(super) fn push(&mut self, b: u8) -> Result<(), String> {
        use NumState::*;
        let digit = b.is_ascii_digit();
        let next = match (self.state, b) {
            (Minus, b'0') => Some(Zero),
            (Minus, _) if digit => Some(Int),
            (Int, _) if digit => Some(Int),
            (Zero | Int, b'.') => Some(Dot),
            (Zero | Int | Frac, b'e' | b'E') => Some(Exp),
            (Dot | Frac, _) if digit => Some(Frac),
            (Exp, b'+' | b'-') => Some(ExpSign),
            (Exp | ExpSign | ExpDigits, _) if digit => Some(ExpDigits),
            _ => None,
        };
        self.text.push(char::from(b));
        match next {
            Some(state) => {
                self.is_float |= matches!(state, Dot | Exp);
                self.state = state;
                Ok(())
            }
            None => Err(self.error()),
        }
    }

    /// The error reported for this (malformed) token text.
    fn error(&self) -> String {
        format!("JSON parse error, invalid number '{}'", excerpt(&self.text))
    }

    /// Converts the finished token to a value.
    ///
    /// Integers that fit `i64` become `i64`, else `u64` if they fit, else
    /// `f64`. Literals with a fraction or exponent become `f64`; a value too
    /// large for `f64` saturates to `±f64::MAX`, because `serde_json::Value`
    /// cannot represent infinity.
    pub(super) fn finish(self) -> Result<Value, String> {
        use NumState::*;
        if !matches!(self.state, Zero | Int | Frac | ExpDigits) {
            return Err(self.error());
        }
        if !self.is_float {
            if let Ok(i) = self.text.parse::<i64>() {
                return Ok(Value::from(i));
            }
            if let Ok(u) = self.text.parse::<u64>() {
                return Ok(Value::from(u));
            }
        }
        let f: f64 = self.text.parse().map_err(|_| self.error())?;
        let f = if f.is_finite() {
            f
        } else {
            f64::MAX.copysign(f)
        };
        Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| self.error())
    }
}

/// Automaton for a keyword token (`true`, `false`, `null`, or an invalid
/// word). Only a bounded prefix of the text is retained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WordLexer {
    /// The first [`EXCERPT_MAX`] bytes of the word (ASCII).
    head: String,
    /// Whether bytes beyond `head` were dropped.
    truncated: bool,
}

impl WordLexer {
    /// Starts a keyword with its first byte.
    pub(super) fn new(first: u8) -> Self {
        Self {
            head: char::from(first).to_string(),
            truncated: false,
        }
    }

    /// Feeds one word byte (see [`is_word_byte`]).
    pub(super) fn push(&mut self, b: u8) {
        if self.head.len() < EXCERPT_MAX {
            self.head.push(char::from(b));
        } else {
            self.truncated = true;
        }
    }

    /// Converts the finished token to a value.
    pub(super) fn finish(self) -> Result<Value, String> {
        match (self.truncated, self.head.as_str()) {
            (false, "true") => Ok(Value::Bool(true)),
            (false, "false") => Ok(Value::Bool(false)),
            (false, "null") => Ok(Value::Null),
            (truncated, head) => Err(format!(
                "JSON parse error, invalid keyword '{head}{}'",
                if truncated { "..." } else { "" }
            )),
        }
    }
}

//! The incremental parser: token dispatch, grammar, value building, limits
//! and error recovery. See the [module overview](super) for the rules.

use serde_json::{Map, Value};

use super::lexer::{
    excerpt, is_reset_byte, is_whitespace, is_word_byte, NumLexer, StrLexer, StrStep, Utf8Seq,
    WordLexer, ERR_UTF8,
};
use super::{JsonError, Limits};

/// Error text: a value was required.
const ERR_EXPECT_VALUE: &str = "JSON parse error, expecting value";
/// Error text: a non-string token where an object key was required.
const ERR_KEY_NOT_STRING: &str = "JSON parse error, key is not a string in object";
/// Error text: the `:` between key and value is missing.
const ERR_MISSING_COLON: &str = "JSON parse error, missing : in object pair";
/// Error text: an object member was not followed by `,` or `}`.
const ERR_EXPECT_OBJ_NEXT: &str = "JSON parse error, expecting ',' or '}'";
/// Error text: an array element was not followed by `,` or `]`.
const ERR_EXPECT_ARR_NEXT: &str = "JSON parse error, expecting ',' or ']'";
/// Error text: the same key appeared twice in one object.
const ERR_DUPLICATE_KEY: &str = "JSON parse error, duplicate key";
/// Error text: input ended inside a message (only from [`StreamParser::finish`]).
const ERR_EOF: &str = "JSON parse error, premature end of input";
/// Error text: nesting limit.
const ERR_DEPTH: &str = "JSON nesting depth limit exceeded";
/// Error text: message size limit.
const ERR_SIZE: &str = "JSON token size limit exceeded";
/// Error text: token count limit.
const ERR_TOKENS: &str = "JSON token count limit exceeded";

/// A container under construction.
#[derive(Debug)]
enum Frame {
    /// An array and its elements so far.
    Array(Vec<Value>),
    /// An object, its members so far, and the key awaiting its value.
    Object {
        map: Map<String, Value>,
        key: Option<String>,
    },
}

/// What the grammar accepts next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (top level, after `:`, after `,` in an array).
    Value,
    /// A value or `]` (right after `[`).
    ValueOrClose,
    /// A key or `}` (right after `{`).
    KeyOrClose,
    /// A key (after `,` in an object).
    Key,
    /// The `:` after a key.
    Colon,
    /// `,` or the closing bracket of the innermost container.
    CommaOrClose,
}

/// Classification of the first byte of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Whitespace between tokens.
    Space,
    /// `{`
    LBrace,
    /// `[`
    LBracket,
    /// `}`
    RBrace,
    /// `]`
    RBracket,
    /// `:`
    Colon,
    /// `,`
    Comma,
    /// `"` or `'`
    Quote,
    /// `-` or a digit
    Number,
    /// A letter or `_`
    Word,
    /// A lead byte of a well-formed multibyte UTF-8 character.
    Utf8(Utf8Seq),
    /// Anything else: cannot start a token.
    Stray,
}

impl Start {
    /// Classifies `b` (never a reset byte).
    fn of(b: u8) -> Self {
        match b {
            _ if is_whitespace(b) => Start::Space,
            b'{' => Start::LBrace,
            b'[' => Start::LBracket,
            b'}' => Start::RBrace,
            b']' => Start::RBracket,
            b':' => Start::Colon,
            b',' => Start::Comma,
            b'"' | b'\'' => Start::Quote,
            b'-' | b'0'..=b'9' => Start::Number,
            b'_' | b'a'..=b'z' | b'A'..=b'Z' => Start::Word,
            _ => Utf8Seq::start(b).map_or(Start::Stray, Start::Utf8),
        }
    }

    /// Whether this token is a value that is not a string.
    fn is_non_string_value(self) -> bool {
        matches!(
            self,
            Start::LBrace | Start::LBracket | Start::Number | Start::Word
        )
    }
}

/// Recovery scanner state: skipping the rest of a broken message without
/// buffering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Discard {
    /// Brackets of the broken message still open.
    depth: usize,
    /// Inside a string opened by this quote.
    in_str: Option<u8>,
    /// The next string byte is escaped.
    escaped: bool,
    /// Still inside the word (number/keyword) that failed.
    in_word: bool,
    /// Only whitespace seen since the last LF.
    line_start: bool,
}

impl Discard {
    /// A scanner for a message with `depth` open brackets.
    fn at(depth: usize) -> Self {
        Self {
            depth,
            in_str: None,
            escaped: false,
            in_word: false,
            line_start: false,
        }
    }

    /// Whether the broken message has been fully skipped.
    fn finished(&self) -> bool {
        self.depth == 0 && self.in_str.is_none() && !self.in_word
    }
}

/// Lexer state.
#[derive(Debug)]
enum State {
    /// Between tokens (or idle at top level).
    Between,
    /// Inside a string token.
    Str {
        /// The string automaton.
        lexer: StrLexer,
        /// Whether the string is an object key.
        is_key: bool,
    },
    /// Inside a number token.
    Num(NumLexer),
    /// Inside a keyword token.
    Word(WordLexer),
    /// Inside a multibyte UTF-8 character outside any string (an error,
    /// reported once the character is complete so it can be quoted).
    Stray {
        /// The sequence validator.
        seq: Utf8Seq,
        /// The bytes so far.
        bytes: [u8; 4],
        /// Number of valid entries in `bytes`.
        len: usize,
    },
    /// Skipping a broken message.
    Discard(Discard),
}

/// Incremental parser turning a QMP byte stream into JSON values.
///
/// Feed bytes with [`feed`](Self::feed) as they arrive; each complete
/// top-level item (normally a QMP command object) is pushed as `Ok(value)`,
/// each broken message as exactly one `Err`. See the [module
/// documentation](super) for the accepted dialect and the recovery rules.
#[derive(Debug)]
pub struct StreamParser {
    /// Per-message limits.
    limits: Limits,
    /// Lexer / recovery state.
    state: State,
    /// Open containers of the message in progress, innermost last.
    stack: Vec<Frame>,
    /// What the grammar accepts next.
    expect: Expect,
    /// Token text bytes of the message in progress.
    msg_bytes: usize,
    /// Tokens of the message in progress.
    msg_tokens: usize,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl StreamParser {
    /// Creates a parser enforcing `limits` on every message.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Between,
            stack: Vec::new(),
            expect: Expect::Value,
            msg_bytes: 0,
            msg_tokens: 0,
        }
    }

    /// The limits this parser enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Feeds bytes as they arrive from the socket, in any split: one message
    /// over many calls or many messages in one call. Pushes each completed
    /// top-level item (or its one error) onto `out`, in input order.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Result<Value, JsonError>>) {
        let mut i = 0;
        while i < bytes.len() {
            // Fast path: append runs of plain ASCII inside a string in bulk.
            if let State::Str { lexer, .. } = &mut self.state {
                if lexer.is_plain() {
                    let room = self.limits.max_message_bytes.saturating_sub(self.msg_bytes);
                    let quote = lexer.quote();
                    let run = bytes[i..]
                        .iter()
                        .take(room)
                        .take_while(|&&c| (0x20..0x80).contains(&c) && c != quote && c != b'\\')
                        .count();
                    if run > 0 {
                        lexer.push_plain_run(&bytes[i..i + run]);
                        self.msg_bytes += run;
                        i += run;
                        continue;
                    }
                }
            }
            let b = bytes[i];
            // `step` returns false when the byte must be looked at again in
            // the state it switched to; every such switch makes progress.
            while !self.step(b, out) {}
            i += 1;
        }
    }

    /// Signals end of input (the peer closed the connection).
    ///
    /// A top-level number or keyword still waiting for a delimiter is
    /// completed; any other unfinished message yields one
    /// `JSON parse error, premature end of input` error (none if the message
    /// was already being skipped after an error). The parser is then back at
    /// the top level and may be reused.
    pub fn finish(&mut self, out: &mut Vec<Result<Value, JsonError>>) {
        if matches!(
            self.state,
            State::Num(_) | State::Word(_) | State::Stray { .. }
        ) {
            while !self.step(b' ', out) {}
        }
        if self.in_message() && !matches!(self.state, State::Discard(_)) {
            out.push(Err(JsonError::new(ERR_EOF)));
        }
        self.reset();
    }

    /// Discards any partial message silently and returns to the top level.
    pub fn reset(&mut self) {
        self.state = State::Between;
        self.stack.clear();
        self.expect = Expect::Value;
        self.msg_bytes = 0;
        self.msg_tokens = 0;
    }

    /// Bytes of token text held for the message in progress (0 when idle or
    /// while skipping a broken message). Never exceeds
    /// [`Limits::max_message_bytes`]; the heap used by the partial value is
    /// proportional to it plus the message's token count.
    pub fn pending_bytes(&self) -> usize {
        match self.state {
            State::Discard(_) => 0,
            _ => self.msg_bytes,
        }
    }

    /// Whether a message is in progress: a token or container has been
    /// started and not completed, or the rest of a broken message is being
    /// skipped.
    pub fn in_message(&self) -> bool {
        match &self.state {
            State::Between => !self.stack.is_empty(),
            State::Discard(d) => !d.finished(),
            _ => true,
        }
    }

    /// Processes one byte. Returns `false` if the byte was not consumed and
    /// must be processed again in the (changed) state.
    fn step(&mut self, b: u8, out: &mut Vec<Result<Value, JsonError>>) -> bool {
        match std::mem::replace(&mut self.state, State::Between) {
            State::Between => {
                if is_reset_byte(b) {
                    self.fail_and_reset(stray_error_for_byte(b), out);
                    return true;
                }
                self.start_token(b, out)
            }
            State::Str { lexer, is_key } => self.step_string(lexer, is_key, b, out),
            State::Num(mut lexer) => {
                if !is_word_byte(b) {
                    return match lexer.finish() {
                        Ok(v) => {
                            self.complete_value(v, out);
                            false
                        }
                        Err(desc) => {
                            self.fail(desc, Discard::at(self.stack.len()), out);
                            false
                        }
                    };
                }
                if !self.count_byte() {
                    let d = Discard {
                        in_word: true,
                        ..Discard::at(self.stack.len())
                    };
                    self.fail(ERR_SIZE.into(), d, out);
                    return true;
                }
                match lexer.push(b) {
                    Ok(()) => self.state = State::Num(lexer),
                    Err(desc) => {
                        let d = Discard {
                            in_word: true,
                            ..Discard::at(self.stack.len())
                        };
                        self.fail(desc, d, out);
                    }
                }
                true
            }
            State::Word(mut lexer) => {
                if !is_word_byte(b) {
                    match lexer.finish() {
                        Ok(v) => self.complete_value(v, out),
                        Err(desc) => self.fail(desc, Discard::at(self.stack.len()), out),
                    }
                    return false;
                }
                if !self.count_byte() {
                    let d = Discard {
                        in_word: true,
                        ..Discard::at(self.stack.len())
                    };
                    self.fail(ERR_SIZE.into(), d, out);
                    return true;
                }
                lexer.push(b);
                self.state = State::Word(lexer);
                true
            }
            State::Stray {
                mut seq,
                mut bytes,
                len,
            } => match seq.next(b) {
                Ok(done) => {
                    bytes[len] = b;
                    if done {
                        let text = String::from_utf8_lossy(&bytes[..=len]).into_owned();
                        self.fail(stray_error(&text), Discard::at(self.stack.len()), out);
                    } else {
                        self.state = State::Stray {
                            seq,
                            bytes,
                            len: len + 1,
                        };
                    }
                    true
                }
                Err(()) => {
                    let d = Discard::at(self.stack.len());
                    self.fail(stray_error("\u{FFFD}"), d, out);
                    false
                }
            },
            State::Discard(d) => {
                let skip_word = d.in_word && is_word_byte(b);
                if d.depth == 0 && d.in_str.is_none() && !skip_word && !is_reset_byte(b) {
                    // The broken message is over; `b` starts something new.
                    self.state = State::Between;
                    return false;
                }
                self.absorb(d, b)
            }
        }
    }

    /// Handles a byte in [`State::Between`] (never a reset byte).
    fn start_token(&mut self, b: u8, out: &mut Vec<Result<Value, JsonError>>) -> bool {
        let kind = Start::of(b);
        match kind {
            Start::Space => return true,
            Start::Utf8(seq) => {
                let mut bytes = [0u8; 4];
                bytes[0] = b;
                self.state = State::Stray { seq, bytes, len: 1 };
                return true;
            }
            Start::Stray => {
                let d = Discard {
                    in_word: true,
                    ..Discard::at(self.stack.len())
                };
                self.fail(stray_error_for_byte(b), d, out);
                return true;
            }
            _ => {}
        }
        if let Some(desc) = self.syntax_error(kind) {
            if kind == Start::LBrace {
                // Rule: an unexpected `{` begins a new message.
                out.push(Err(JsonError::new(desc)));
                self.reset();
                return false;
            }
            return self.fail_absorbing(desc.into(), kind, b, out);
        }
        self.msg_tokens += 1;
        if self.msg_tokens > self.limits.max_tokens {
            return self.fail_absorbing(ERR_TOKENS.into(), kind, b, out);
        }
        if matches!(kind, Start::LBrace | Start::LBracket)
            && self.stack.len() >= self.limits.max_depth
        {
            return self.fail_absorbing(ERR_DEPTH.into(), kind, b, out);
        }
        if !self.count_byte() {
            return self.fail_absorbing(ERR_SIZE.into(), kind, b, out);
        }
        match kind {
            Start::LBrace => {
                self.stack.push(Frame::Object {
                    map: Map::new(),
                    key: None,
                });
                self.expect = Expect::KeyOrClose;
            }
            Start::LBracket => {
                self.stack.push(Frame::Array(Vec::new()));
                self.expect = Expect::ValueOrClose;
            }
            Start::RBrace | Start::RBracket => {
                let value = match self.stack.pop() {
                    Some(Frame::Array(items)) => Value::Array(items),
                    Some(Frame::Object { map, .. }) => Value::Object(map),
                    None => Value::Null, // unreachable: the grammar checked it
                };
                self.complete_value(value, out);
            }
            Start::Colon => self.expect = Expect::Value,
            Start::Comma => {
                self.expect = match self.stack.last() {
                    Some(Frame::Object { .. }) => Expect::Key,
                    _ => Expect::Value,
                };
            }
            Start::Quote => {
                let is_key = matches!(self.expect, Expect::Key | Expect::KeyOrClose);
                self.state = State::Str {
                    lexer: StrLexer::new(b),
                    is_key,
                };
            }
            Start::Number => self.state = State::Num(NumLexer::new(b)),
            Start::Word => self.state = State::Word(WordLexer::new(b)),
            Start::Space | Start::Utf8(_) | Start::Stray => {}
        }
        true
    }

    /// Handles a byte inside a string token.
    fn step_string(
        &mut self,
        mut lexer: StrLexer,
        is_key: bool,
        b: u8,
        out: &mut Vec<Result<Value, JsonError>>,
    ) -> bool {
        let quote = lexer.quote();
        let depth = self.stack.len();
        let in_string = |escaped| Discard {
            in_str: Some(quote),
            escaped,
            ..Discard::at(depth)
        };
        if is_reset_byte(b) {
            let desc = if b == 0xFF {
                ERR_UTF8.to_owned()
            } else {
                format!(
                    "JSON parse error, unescaped control character {:?} in string",
                    char::from(b)
                )
            };
            self.fail_and_reset(desc, out);
            return true;
        }
        if !self.count_byte() {
            let d = in_string(lexer.after_backslash());
            self.fail(ERR_SIZE.into(), d, out);
            return self.absorb(d, b);
        }
        match lexer.step(b) {
            StrStep::More => {
                self.state = State::Str { lexer, is_key };
                true
            }
            StrStep::Done => {
                match lexer.into_string() {
                    Ok(s) if is_key => self.set_key(s, out),
                    Ok(s) => self.complete_value(Value::String(s), out),
                    Err(desc) => self.fail(desc, Discard::at(self.stack.len()), out),
                }
                true
            }
            StrStep::Fail {
                desc,
                reabsorb,
                escaped,
            } => {
                let d = in_string(escaped);
                self.fail(desc, d, out);
                if reabsorb {
                    self.absorb(d, b)
                } else {
                    true
                }
            }
        }
    }

    /// Records a completed object key (rejecting duplicates).
    fn set_key(&mut self, key: String, out: &mut Vec<Result<Value, JsonError>>) {
        if let Some(Frame::Object { map, key: slot }) = self.stack.last_mut() {
            if map.contains_key(&key) {
                let d = Discard::at(self.stack.len());
                self.fail(ERR_DUPLICATE_KEY.into(), d, out);
                return;
            }
            *slot = Some(key);
        }
        self.expect = Expect::Colon;
    }

    /// Adds a completed value to the innermost container, or emits it if it
    /// is a top-level item.
    fn complete_value(&mut self, value: Value, out: &mut Vec<Result<Value, JsonError>>) {
        match self.stack.last_mut() {
            None => {
                out.push(Ok(value));
                self.reset();
            }
            Some(Frame::Array(items)) => {
                items.push(value);
                self.expect = Expect::CommaOrClose;
            }
            Some(Frame::Object { map, key }) => {
                if let Some(k) = key.take() {
                    map.insert(k, value);
                }
                self.expect = Expect::CommaOrClose;
            }
        }
    }

    /// Checks whether a token starting with `kind` may come next; returns the
    /// error text if not.
    fn syntax_error(&self, kind: Start) -> Option<&'static str> {
        let in_object = matches!(self.stack.last(), Some(Frame::Object { .. }));
        let ok = match (self.expect, kind) {
            (Expect::Value | Expect::ValueOrClose, k) => {
                k == Start::Quote
                    || k.is_non_string_value()
                    || (k == Start::RBracket && self.expect == Expect::ValueOrClose)
            }
            (Expect::Key | Expect::KeyOrClose, k) => {
                k == Start::Quote || (k == Start::RBrace && self.expect == Expect::KeyOrClose)
            }
            (Expect::Colon, k) => k == Start::Colon,
            (Expect::CommaOrClose, Start::Comma) => true,
            (Expect::CommaOrClose, Start::RBrace) => in_object,
            (Expect::CommaOrClose, Start::RBracket) => !in_object,
            (Expect::CommaOrClose, _) => false,
        };
        if ok {
            return None;
        }
        Some(match self.expect {
            Expect::Value | Expect::ValueOrClose => ERR_EXPECT_VALUE,
            Expect::Key | Expect::KeyOrClose if kind.is_non_string_value() => ERR_KEY_NOT_STRING,
            Expect::Key | Expect::KeyOrClose => ERR_EXPECT_VALUE,
            Expect::Colon => ERR_MISSING_COLON,
            Expect::CommaOrClose if in_object => ERR_EXPECT_OBJ_NEXT,
            Expect::CommaOrClose => ERR_EXPECT_ARR_NEXT,
        })
    }

    /// Counts one byte of token text; `false` if that exceeds the size limit.
    fn count_byte(&mut self) -> bool {
        self.msg_bytes += 1;
        self.msg_bytes <= self.limits.max_message_bytes
    }

    /// Reports an error for the message in progress and starts skipping its
    /// remainder with scanner state `d` (computed before the call, from the
    /// message's current depth).
    fn fail(&mut self, desc: String, d: Discard, out: &mut Vec<Result<Value, JsonError>>) {
        out.push(Err(JsonError::new(desc)));
        self.reset();
        self.state = State::Discard(d);
    }

    /// Reports an error for a token that failed at its first byte `b`, and
    /// feeds `b` to the recovery scanner as part of the broken message (so a
    /// bracket is counted and a quote opens a skipped string).
    fn fail_absorbing(
        &mut self,
        desc: String,
        kind: Start,
        b: u8,
        out: &mut Vec<Result<Value, JsonError>>,
    ) -> bool {
        let d = Discard {
            in_word: matches!(kind, Start::Number | Start::Word),
            ..Discard::at(self.stack.len())
        };
        self.fail(desc, d, out);
        self.absorb(d, b)
    }

    /// Reports an error caused by a reset byte and returns to the top level.
    fn fail_and_reset(&mut self, desc: String, out: &mut Vec<Result<Value, JsonError>>) {
        out.push(Err(JsonError::new(desc)));
        self.reset();
    }

    /// Feeds `b` to the recovery scanner as part of the broken message.
    /// Returns `false` if `b` instead begins a new message.
    fn absorb(&mut self, mut d: Discard, b: u8) -> bool {
        if is_reset_byte(b) {
            self.reset();
            return true;
        }
        if d.in_word {
            if is_word_byte(b) {
                self.state = State::Discard(d);
                return true;
            }
            d.in_word = false;
        }
        if let Some(quote) = d.in_str {
            if b == b'\n' {
                // A raw newline cannot be inside a valid string: the string
                // is over as far as resynchronisation is concerned.
                d.in_str = None;
                d.escaped = false;
                d.line_start = true;
            } else if d.escaped {
                d.escaped = false;
            } else if b == b'\\' {
                d.escaped = true;
            } else if b == quote {
                d.in_str = None;
            }
        } else {
            match b {
                b'\n' => d.line_start = true,
                b' ' | b'\t' | b'\r' => {}
                b'{' if d.line_start => {
                    self.reset();
                    return false;
                }
                b'{' | b'[' => {
                    d.depth = d.depth.saturating_add(1);
                    d.line_start = false;
                }
                b'}' | b']' => {
                    d.depth = d.depth.saturating_sub(1);
                    d.line_start = false;
                }
                b'"' | b'\'' => {
                    d.in_str = Some(b);
                    d.line_start = false;
                }
                _ => d.line_start = false,
            }
        }
        self.state = if d.finished() {
            State::Between
        } else {
            State::Discard(d)
        };
        true
    }
}

/// Error text for a byte that cannot start a token, quoted as `text`.
fn stray_error(text: &str) -> String {
    format!("JSON parse error, stray '{}'", excerpt(text))
}

/// Error text for a single stray byte (U+FFFD if it is not ASCII).
fn stray_error_for_byte(b: u8) -> String {
    if b.is_ascii() {
        stray_error(&char::from(b).to_string())
    } else {
        stray_error("\u{FFFD}")
    }
}

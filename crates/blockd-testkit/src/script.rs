//! Parsing a transcript (`.qmp` file) into steps.
//!
//! Line kinds (see `qmp-transcripts.md`, section "Lines"):
//!
//! | line | step |
//! | --- | --- |
//! | `# text` or blank | ignored |
//! | `> JSON` | [`StepKind::Send`] (a JSON object) |
//! | `>> TEXT` | [`StepKind::SendRaw`] |
//! | `< PATTERN` | [`StepKind::Response`] |
//! | `! PATTERN` | [`StepKind::Event`] |
//! | `!! PATTERN` | [`StepKind::NoEvent`] |
//! | `$ COMMAND` / `$! COMMAND` | [`StepKind::Shell`] |
//! | `~ close` | [`StepKind::Close`] |
//!
//! `@N ` (N in 1..=9) before `>`, `>>`, `<`, `!`, `!!` and `~` selects the
//! client connection. Substitutions such as `${TMP}` are applied to each line
//! before it is parsed. Every malformed line is reported, with its number, so
//! that a transcript fails before any server is started.

use std::fmt;

use serde_json::Value;

use crate::pattern::Pattern;

/// One step of a transcript.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// 1-based line number in the transcript file.
    pub line: usize,
    /// Client connection the step uses (1..=9; 1 for shell steps).
    pub conn: u8,
    /// What to do.
    pub kind: StepKind,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// `> JSON`: send `text` (a JSON object, sent as written) plus a newline.
    Send {
        /// The text after `> `, trimmed, sent verbatim.
        text: String,
        /// The parsed object.
        value: Value,
    },
    /// `>> TEXT`: send `text` exactly as written plus a newline.
    SendRaw {
        /// Everything after the single separating whitespace character.
        text: String,
    },
    /// `< PATTERN`: the next non-event message must match.
    Response(Pattern),
    /// `! PATTERN`: an event matching the pattern must arrive.
    Event(Pattern),
    /// `!! PATTERN`: no event matching the pattern may be pending or arrive
    /// within the absence window.
    NoEvent(Pattern),
    /// `$ COMMAND` / `$! COMMAND`: run with `sh -c`.
    Shell {
        /// The command line.
        command: String,
        /// `$!`: the command must exit non-zero (otherwise zero).
        expect_failure: bool,
    },
    /// `~ close`: close the connection.
    Close,
}

impl Step {
    /// The step as a transcript line (after substitution), for logs.
    pub fn show(&self) -> String {
        let c = self.conn;
        match &self.kind {
            StepKind::Send { text, .. } => format!("@{c} > {text}"),
            StepKind::SendRaw { text } => format!("@{c} >> {text}"),
            StepKind::Response(p) => format!("@{c} < {p}"),
            StepKind::Event(p) => format!("@{c} ! {p}"),
            StepKind::NoEvent(p) => format!("@{c} !! {p}"),
            StepKind::Shell {
                command,
                expect_failure,
            } => format!("{} {command}", if *expect_failure { "$!" } else { "$" }),
            StepKind::Close => format!("@{c} ~ close"),
        }
    }
}

/// A malformed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for SyntaxError {}

/// Parses a transcript. `subst` lists literal replacements applied, in order,
/// to every non-comment line before it is parsed (the runner passes
/// `${TMP}` and `${SOCK}`). Returns all steps, or every syntax error found.
pub fn parse(text: &str, subst: &[(&str, &str)]) -> Result<Vec<Step>, Vec<SyntaxError>> {
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    // Python reads the file with universal newlines: \r\n and lone \r end lines too.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    for (idx, raw) in text.split('\n').enumerate() {
        let line = idx + 1;
        match parse_line(raw, subst) {
            Ok(Some((conn, kind))) => steps.push(Step { line, conn, kind }),
            Ok(None) => {}
            Err(message) => errors.push(SyntaxError { line, message }),
        }
    }
    if errors.is_empty() {
        Ok(steps)
    } else {
        Err(errors)
    }
}

/// Splits `s` after its first character if that character is whitespace.
fn after_space(s: &str) -> Option<&str> {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_whitespace() => Some(chars.as_str()),
        _ => None,
    }
}

/// Parses one line: `Ok(None)` for blanks and comments.
fn parse_line(raw: &str, subst: &[(&str, &str)]) -> Result<Option<(u8, StepKind)>, String> {
    if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
        return Ok(None);
    }
    let mut owned = raw.to_string();
    for (key, value) in subst {
        owned = owned.replace(key, value);
    }
    let line = owned.trim_start();

    // shell steps: "$" or "$!" alone or followed by whitespace
    for (prefix, expect_failure) in [("$!", true), ("$", false)] {
        if let Some(rest) = line.strip_prefix(prefix) {
            if rest.is_empty() || after_space(rest).is_some() {
                return Ok(Some((
                    1,
                    StepKind::Shell {
                        command: rest.trim().to_string(),
                        expect_failure,
                    },
                )));
            }
        }
    }

    let cannot = || format!("cannot parse line: {line}");
    // optional "@N" + whitespace
    let mut conn = 1u8;
    let mut body = line;
    if let Some(after_at) = line.strip_prefix('@') {
        let digit = after_at.as_bytes().first().copied().ok_or_else(cannot)?;
        if !(b'1'..=b'9').contains(&digit) {
            return Err(cannot());
        }
        let rest = &after_at[1..];
        let trimmed = rest.trim_start();
        if trimmed.len() == rest.len() {
            return Err(cannot());
        }
        conn = digit - b'0';
        body = trimmed;
    }
    // the kind token, longest first, then end of line or one whitespace char
    let mut parsed = None;
    for token in [">>", ">", "<", "!!", "!", "~"] {
        if let Some(rest) = body.strip_prefix(token) {
            if rest.is_empty() {
                parsed = Some((token, ""));
                break;
            }
            if let Some(after) = after_space(rest) {
                parsed = Some((token, after));
                break;
            }
        }
    }
    let (token, rest) = parsed.ok_or_else(cannot)?;
    if token == ">>" {
        return Ok(Some((
            conn,
            StepKind::SendRaw {
                text: rest.to_string(),
            },
        )));
    }
    let rest = rest.trim();
    if token == "~" {
        if rest != "close" {
            return Err(format!("unknown ~ action '{rest}' (only 'close')"));
        }
        return Ok(Some((conn, StepKind::Close)));
    }
    let value: Value =
        serde_json::from_str(rest).map_err(|e| format!("invalid JSON ({e}): {rest}"))?;
    if token == ">" {
        if !value.is_object() {
            return Err("'>' needs a JSON object (use '>>' for other input)".into());
        }
        return Ok(Some((
            conn,
            StepKind::Send {
                text: rest.to_string(),
                value,
            },
        )));
    }
    let pattern = Pattern::new(value).map_err(|e| format!("bad pattern: {e}"))?;
    let kind = match token {
        "<" => StepKind::Response(pattern),
        "!" => StepKind::Event(pattern),
        _ => StepKind::NoEvent(pattern),
    };
    Ok(Some((conn, kind)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(line: &str) -> Step {
        let mut steps = parse(line, &[]).expect("parses");
        assert_eq!(steps.len(), 1, "{line}");
        steps.remove(0)
    }

    fn err(text: &str) -> SyntaxError {
        parse(text, &[]).expect_err("syntax error").remove(0)
    }

    #[test]
    fn comments_and_blanks() {
        let steps = parse("# hello\n\n   \n  # indented comment\n\t\n", &[]).unwrap();
        assert!(steps.is_empty());
    }

    #[test]
    fn send_object() {
        let s = one(r#"> {"execute": "qmp_capabilities"}  "#);
        assert_eq!(s.line, 1);
        assert_eq!(s.conn, 1);
        assert_eq!(
            s.kind,
            StepKind::Send {
                text: r#"{"execute": "qmp_capabilities"}"#.into(),
                value: json!({"execute": "qmp_capabilities"})
            }
        );
        assert_eq!(
            err("> [1]").message,
            "'>' needs a JSON object (use '>>' for other input)"
        );
        assert!(err("> {oops").message.starts_with("invalid JSON ("));
        assert!(err(">").message.starts_with("invalid JSON ("));
    }

    #[test]
    fn send_raw_keeps_text() {
        let s = one(r#">> {"execute": foo}  "#);
        assert_eq!(
            s.kind,
            StepKind::SendRaw {
                text: r#"{"execute": foo}  "#.into()
            }
        );
        // only the one separating whitespace is removed
        assert_eq!(one(">>   x").kind, StepKind::SendRaw { text: "  x".into() });
        assert_eq!(one(">>").kind, StepKind::SendRaw { text: "".into() });
    }

    #[test]
    fn response_event_noevent() {
        let p = Pattern::new(json!({"return": {}})).unwrap();
        assert_eq!(
            one(r#"< {"return": {}}"#).kind,
            StepKind::Response(p.clone())
        );
        assert_eq!(one(r#"! {"return": {}}"#).kind, StepKind::Event(p.clone()));
        assert_eq!(one(r#"!! {"return": {}}"#).kind, StepKind::NoEvent(p));
        // any JSON value is a pattern
        assert_eq!(
            one("< 1").kind,
            StepKind::Response(Pattern::new(json!(1)).unwrap())
        );
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(
            err(r#"< {"a": "$bogus"}"#).message,
            "bad pattern: $.a: unknown pattern word $bogus (write $$... for a literal)"
        );
        assert_eq!(
            err(r#"! "$absent""#).message,
            "bad pattern: $: $absent is only allowed as an object member value"
        );
        assert!(err("!! [2, \"$unordered\"]")
            .message
            .starts_with("bad pattern: $[1]"));
    }

    #[test]
    fn shell_steps() {
        assert_eq!(
            one("$ qemu-img create x 1M ").kind,
            StepKind::Shell {
                command: "qemu-img create x 1M".into(),
                expect_failure: false
            }
        );
        assert_eq!(
            one("  $!\tfalse").kind,
            StepKind::Shell {
                command: "false".into(),
                expect_failure: true
            }
        );
        assert_eq!(
            one("$").kind,
            StepKind::Shell {
                command: "".into(),
                expect_failure: false
            }
        );
        assert_eq!(
            one("$!").kind,
            StepKind::Shell {
                command: "".into(),
                expect_failure: true
            }
        );
        assert_eq!(err("$echo").message, "cannot parse line: $echo");
        assert_eq!(err("$!x").message, "cannot parse line: $!x");
    }

    #[test]
    fn connection_prefix() {
        let s = one(r#"@2 < {"return": {}}"#);
        assert_eq!(s.conn, 2);
        assert!(matches!(s.kind, StepKind::Response(_)));
        assert_eq!(one("@9\t>> x").conn, 9);
        assert_eq!(one("@3 ~ close").conn, 3);
        assert_eq!(err("@0 < {}").message, "cannot parse line: @0 < {}");
        assert_eq!(err("@2< {}").message, "cannot parse line: @2< {}");
        assert_eq!(err("@10 < {}").message, "cannot parse line: @10 < {}");
        assert_eq!(err("@ < {}").message, "cannot parse line: @ < {}");
        assert_eq!(err("@2 $ true").message, "cannot parse line: @2 $ true");
    }

    #[test]
    fn close() {
        assert_eq!(one("~ close").kind, StepKind::Close);
        assert_eq!(one("~  close  ").kind, StepKind::Close);
        assert_eq!(
            err("~ open").message,
            "unknown ~ action 'open' (only 'close')"
        );
        assert_eq!(err("~").message, "unknown ~ action '' (only 'close')");
    }

    #[test]
    fn unknown_lines() {
        assert_eq!(err("hello").message, "cannot parse line: hello");
        assert_eq!(
            err(r#"<{"a": 1}"#).message,
            r#"cannot parse line: <{"a": 1}"#
        );
        assert_eq!(err(">>x").message, "cannot parse line: >>x");
        assert_eq!(err("!!!").message, "cannot parse line: !!!");
    }

    #[test]
    fn line_numbers_and_all_errors() {
        let text = "# c\n< {\"QMP\": \"$any\"}\n\nbogus\n> {\"execute\": \"x\"}\n< \"$nope\"\n";
        let errors = parse(text, &[]).unwrap_err();
        assert_eq!(
            errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![4, 6]
        );
        let steps = parse("# c\r\n\r\n< 1\r\n> {}\r\n", &[]).unwrap();
        assert_eq!(steps.iter().map(|s| s.line).collect::<Vec<_>>(), vec![3, 4]);
    }

    #[test]
    fn substitution() {
        let subst = [
            ("${TMP}", "/tmp/bt-x/tmp"),
            ("${SOCK}", "/tmp/bt-x/qmp.sock"),
        ];
        let steps = parse(
            "# ${TMP} in a comment stays\n> {\"f\": \"${TMP}/a\"}\n$ ls ${SOCK}\n< \"${TMP}\"\n",
            &subst,
        )
        .unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(
            steps[0].kind,
            StepKind::Send {
                text: r#"{"f": "/tmp/bt-x/tmp/a"}"#.into(),
                value: json!({"f": "/tmp/bt-x/tmp/a"})
            }
        );
        assert_eq!(
            steps[1].kind,
            StepKind::Shell {
                command: "ls /tmp/bt-x/qmp.sock".into(),
                expect_failure: false
            }
        );
        assert!(
            matches!(&steps[2].kind, StepKind::Response(p) if p.value() == &json!("/tmp/bt-x/tmp"))
        );
    }

    #[test]
    fn show_round_trips() {
        let s = one(r#"@2 !! {"event":"X"}"#);
        assert_eq!(s.show(), r#"@2 !! {"event": "X"}"#);
        assert_eq!(one("$! false").show(), "$! false");
    }
}

//! QEMU's config-file parser (`qemu_config_parse`), for blkdebug's groups.
//!
//! Values are typed as QemuOpts types them (`qemu_opt_set`): numbers and
//! booleans with [`blockd_optval::qemu_opts`], strings as they are.

use std::collections::HashSet;

use blockd_core::BlockError;
use blockd_optval::qemu_opts;

use super::{c_int, inject_rule, Action, BlkdebugEvent, Rule};

/// fgets' buffer in QEMU's parser: longer lines are read in pieces.
const LINE_MAX: usize = 1023;

/// A section kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Group {
    InjectError,
    SetState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Num,
    Bool,
}

impl Group {
    fn from_name(name: &[u8]) -> Result<Group, BlockError> {
        match name {
            b"inject-error" => Ok(Group::InjectError),
            b"set-state" => Ok(Group::SetState),
            _ => Err(BlockError::invalid(format!(
                "There is no option group '{}'",
                String::from_utf8_lossy(name)
            ))),
        }
    }

    fn option_kind(self, name: &str) -> Option<Kind> {
        match (self, name) {
            (_, "event") => Some(Kind::Str),
            (_, "state") => Some(Kind::Num),
            (Group::InjectError, "iotype") => Some(Kind::Str),
            (Group::InjectError, "errno" | "sector") => Some(Kind::Num),
            (Group::InjectError, "once" | "immediately") => Some(Kind::Bool),
            (Group::SetState, "new_state") => Some(Kind::Num),
            _ => None,
        }
    }
}

/// A typed option value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Str(String),
    /// A number as QEMU reads it: an unsigned 64-bit value, negative
    /// input wrapped around.
    Num(u64),
    Bool(bool),
}

/// One section of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Section {
    pub(super) group: Group,
    opts: Vec<(String, Value)>,
}

impl Section {
    /// The last value set for `name` (QEMU's `qemu_opt_get`).
    fn get(&self, name: &str) -> Option<&Value> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    fn string(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn number(&self, name: &str) -> Option<u64> {
        match self.get(name) {
            Some(Value::Num(n)) => Some(*n),
            _ => None,
        }
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Value::Bool(true)))
    }

    fn event(&self) -> Result<BlkdebugEvent, BlockError> {
        self.string("event")
            .ok_or_else(|| BlockError::invalid("Missing event name for rule"))?
            .parse()
    }

    fn state(&self) -> i64 {
        c_int(self.number("state").unwrap_or(0) as i64)
    }

    /// The rule of an `[inject-error]` section.
    pub(super) fn inject_rule(&self) -> Result<Rule, BlockError> {
        inject_rule(
            self.event()?,
            self.state(),
            self.string("iotype"),
            self.number("errno").map(|e| c_int(e as i64)),
            self.number("sector").map(|s| s as i64),
            self.flag("once"),
            self.flag("immediately"),
        )
    }

    /// The rule of a `[set-state]` section.
    pub(super) fn set_state_rule(&self) -> Result<Rule, BlockError> {
        Ok(Rule {
            event: self.event()?,
            state: self.state(),
            action: Action::SetState(c_int(self.number("new_state").unwrap_or(0) as i64)),
        })
    }
}

/// C's `isspace`.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn skip_space(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    i
}

/// scanf's `%Ns`: skips white space, then takes 1 to `max` other bytes.
fn token(s: &[u8], i: usize, max: usize) -> Option<(&[u8], usize)> {
    let start = skip_space(s, i);
    let mut end = start;
    while end < s.len() && end - start < max && !is_space(s[end]) {
        end += 1;
    }
    (end > start).then(|| (&s[start..end], end))
}

/// scanf's `%N[^c]`: takes 1 to `max` bytes other than `stop`.
fn until(s: &[u8], i: usize, stop: u8, max: usize) -> Option<(&[u8], usize)> {
    let mut end = i;
    while end < s.len() && end - i < max && s[end] != stop {
        end += 1;
    }
    (end > i).then(|| (&s[i..end], end))
}

/// `[group "id"]`.
fn group_with_id(s: &[u8]) -> Option<(&[u8], &[u8])> {
    if s.first() != Some(&b'[') {
        return None;
    }
    let (group, i) = token(s, 1, 63)?;
    let i = skip_space(s, i);
    if s.get(i) != Some(&b'"') {
        return None;
    }
    let (id, _) = until(s, i + 1, b'"', 63)?;
    Some((group, id))
}

/// `[group]`.
fn group(s: &[u8]) -> Option<&[u8]> {
    if s.first() != Some(&b'[') {
        return None;
    }
    until(s, 1, b']', 63).map(|(g, _)| g)
}

/// `name = "value"`. As with QEMU's two `sscanf` calls, any line that
/// starts with a word is taken as an assignment, with an empty value
/// when the rest does not match.
fn assignment(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, i) = token(s, 0, 63)?;
    let value = (|| {
        let i = skip_space(s, i);
        if s.get(i) != Some(&b'=') {
            return None;
        }
        let i = skip_space(s, i + 1);
        if s.get(i) != Some(&b'"') {
            return None;
        }
        until(s, i + 1, b'"', 1023).map(|(v, _)| v)
    })();
    Some((name, value.unwrap_or(b"")))
}

/// QEMU's `id_wellformed` on the raw bytes of a config file (a non-UTF-8
/// id is not well-formed).
fn id_wellformed(id: &[u8]) -> bool {
    std::str::from_utf8(id).is_ok_and(blockd_core::qapi::id_wellformed)
}

/// Splits the text as `fgets` with QEMU's 1024-byte buffer reads it.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |p| p + 1)
            .min(LINE_MAX);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        Some(line)
    })
}

/// Parses a whole file into its sections, with QEMU's messages.
pub(super) fn parse(text: &[u8]) -> Result<Vec<Section>, BlockError> {
    let mut sections: Vec<Section> = Vec::new();
    let mut ids: HashSet<(bool, Vec<u8>)> = HashSet::new();
    // Index of the section assignments go to; None before the first
    // section or after a section whose id was refused.
    let mut current: Option<usize> = None;
    for raw in lines(text) {
        if raw[0] == b'\n' || raw[0] == b'#' {
            continue;
        }
        // sscanf stops at a NUL byte.
        let line = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        if let Some((g, id)) = group_with_id(line) {
            let group = Group::from_name(g)?;
            let key = (group == Group::InjectError, id.to_vec());
            current = if id_wellformed(id) && ids.insert(key) {
                sections.push(Section {
                    group,
                    opts: Vec::new(),
                });
                Some(sections.len() - 1)
            } else {
                None
            };
            continue;
        }
        if let Some(g) = group(line) {
            sections.push(Section {
                group: Group::from_name(g)?,
                opts: Vec::new(),
            });
            current = Some(sections.len() - 1);
            continue;
        }
        let Some((name, value)) = assignment(line) else {
            return Err(BlockError::invalid("parse error"));
        };
        let Some(section) = current.map(|i| &mut sections[i]) else {
            return Err(BlockError::invalid("no group defined"));
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        let value = match section.group.option_kind(&name) {
            None => return Err(BlockError::invalid(format!("Invalid parameter '{name}'"))),
            Some(Kind::Str) => Value::Str(value),
            Some(Kind::Num) => {
                Value::Num(qemu_opts::parse_number(&name, &value).map_err(BlockError::invalid)?)
            }
            Some(Kind::Bool) => {
                Value::Bool(qemu_opts::parse_bool(&name, &value).map_err(BlockError::invalid)?)
            }
        };
        section.opts.push((name, value));
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text.as_bytes()).unwrap_err().msg
    }

    #[test]
    fn sections_and_values() {
        let text = "# comment\n\n[inject-error]\n  event = \"read_aio\"\nerrno = \"0x1c\"\n\
                    sector = \"-1\"\nonce = \"on\"\n[set-state \"s1\"]\nevent = \"none\"\n\
                    new_state = \"010\"\n";
        let s = parse(text.as_bytes()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].group, Group::InjectError);
        assert_eq!(s[0].string("event"), Some("read_aio"));
        assert_eq!(s[0].number("errno"), Some(28));
        assert_eq!(s[0].number("sector"), Some(u64::MAX));
        assert!(s[0].flag("once"));
        assert_eq!(s[1].group, Group::SetState);
        assert_eq!(s[1].number("new_state"), Some(8));
    }

    #[test]
    fn later_values_win_and_empty_values_are_allowed_for_strings() {
        let s =
            parse(b"[inject-error]\nevent = \"a\"\nevent = \"read_aio\"\niotype = \"\"\n").unwrap();
        assert_eq!(s[0].string("event"), Some("read_aio"));
        assert_eq!(s[0].string("iotype"), Some(""));
    }

    #[test]
    fn errors_read_like_qemu() {
        assert_eq!(err("[foo]\n"), "There is no option group 'foo'");
        assert_eq!(err("[foo \"x\"]\n"), "There is no option group 'foo'");
        assert_eq!(err("event = \"read_aio\"\n"), "no group defined");
        assert_eq!(
            err("[set-state]\nerrno = \"5\"\n"),
            "Invalid parameter 'errno'"
        );
        assert_eq!(
            err("[inject-error]\nevent=\"read_aio\"\n"),
            "Invalid parameter 'event=\"read_aio\"'"
        );
        assert_eq!(
            err("[inject-error]\nerrno = \"5x\"\n"),
            "Parameter 'errno' expects a number"
        );
        assert_eq!(
            err("[inject-error]\nerrno = 5\n"),
            "Parameter 'errno' expects a number"
        );
        assert_eq!(
            err("[inject-error]\nsector = \"99999999999999999999\"\n"),
            "Value '99999999999999999999' is too large for parameter 'sector'"
        );
        assert_eq!(
            err("[inject-error]\nonce = \"maybe\"\n"),
            "Parameter 'once' expects 'on' or 'off'"
        );
        assert_eq!(err("[inject-error]\n   \n"), "parse error");
        assert_eq!(
            err("[inject-error ]\n"),
            "There is no option group 'inject-error '"
        );
    }

    #[test]
    fn refused_ids_drop_the_section() {
        // A malformed or duplicate id creates no section; assignments
        // after it have no group, as in QEMU.
        assert_eq!(
            err("[inject-error \"1bad\"]\nevent = \"none\"\n"),
            "no group defined"
        );
        assert_eq!(
            err("[inject-error \"a\"]\n[inject-error \"a\"]\nevent = \"none\"\n"),
            "no group defined"
        );
        assert_eq!(parse(b"[inject-error \"bad id\"]\n").unwrap(), vec![]);
    }

    #[test]
    fn numbers_are_qemu_opts_numbers() {
        let s = parse(b"[inject-error]\nerrno = \" +0x10\"\nsector = \"-2\"\nstate = \"017\"\n")
            .unwrap();
        assert_eq!(s[0].number("errno"), Some(16));
        assert_eq!(s[0].number("sector"), Some((-2i64) as u64));
        assert_eq!(s[0].number("state"), Some(15));
        for bad in ["", "0x", "08", "1 "] {
            let text = format!("[inject-error]\nerrno = \"{bad}\"\n");
            assert_eq!(err(&text), "Parameter 'errno' expects a number", "{bad:?}");
        }
    }
}

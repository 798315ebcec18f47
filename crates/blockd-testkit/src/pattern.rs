//! The pattern language of QMP transcripts: validation and matching.
//!
//! A pattern is a JSON value matched against a message received from the
//! server (see `qmp-transcripts.md`, section "Patterns"):
//!
//! - an object matches if every key of the pattern exists in the message with a
//!   matching value; extra keys in the message are allowed;
//! - `"$any"` matches any value; `"$absent"` (only as an object member value)
//!   requires the key to be missing; `"$int"`, `"$num"`, `"$str"`, `"$bool"`,
//!   `"$list"`, `"$obj"` and `"$null"` match any value of that JSON type
//!   (`true` is not a number);
//! - a list matches a list of the same length element by element; a list whose
//!   first element is `"$unordered"` matches the other elements as a multiset;
//!   with `"$contains"` first, each other element must match a distinct element
//!   of the list, which may hold more;
//! - numbers match by value, strings and booleans exactly; a string starting
//!   with `$$` matches the same string with one `$` removed; any other `$word`
//!   (a `$` followed by lowercase ASCII letters) is a syntax error.
//!
//! Behaviour and messages follow the Python reference runner
//! (`shared/tools/qmp-transcript`).
//!
//! ```
//! use blockd_testkit::Pattern;
//! use serde_json::json;
//!
//! let p = Pattern::parse(r#"{"return": {"qemu": "$obj"}, "id": "$absent"}"#).unwrap();
//! assert!(p.matches(&json!({"return": {"qemu": {"major": 10}}})));
//! assert!(!p.matches(&json!({"return": {"qemu": {}}, "id": 1})));
//! assert!(Pattern::parse(r#""$bogus""#).is_err());
//! ```

use std::fmt;

use serde_json::Value;

/// The type-pattern words and what they accept.
const TYPE_WORDS: [&str; 7] = ["$int", "$num", "$str", "$bool", "$list", "$obj", "$null"];

/// A validated pattern, ready to be matched against received messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    value: Value,
}

/// Why a pattern is malformed (a syntax error of the transcript).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    /// Where in the pattern, as a path such as `$.return[0]`.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for PatternError {}

/// Why a value does not match a pattern: the path of the first mismatch and
/// a description, e.g. `$.return.ro: expected false, received true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Mismatch {}

impl Pattern {
    /// Validates `value` as a pattern. `"$absent"` is refused as a whole
    /// pattern (it is only meaningful as an object member value).
    pub fn new(value: Value) -> Result<Self, PatternError> {
        if value.as_str() == Some("$absent") {
            return Err(PatternError {
                path: "$".into(),
                message: "$absent is only allowed as an object member value".into(),
            });
        }
        check(&value, "$")?;
        Ok(Pattern { value })
    }

    /// Parses JSON text and validates it as a pattern.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let value: Value = serde_json::from_str(text).map_err(|e| PatternError {
            path: "$".into(),
            message: format!("invalid JSON: {e}"),
        })?;
        Self::new(value)
    }

    /// The pattern as JSON.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Checks `message` against the pattern; `Err` says where and why not.
    pub fn check(&self, message: &Value) -> Result<(), Mismatch> {
        match match_value(&self.value, message, "$") {
            None => Ok(()),
            Some(why) => Err(Mismatch(why)),
        }
    }

    /// True if `message` matches the pattern.
    pub fn matches(&self, message: &Value) -> bool {
        match_value(&self.value, message, "$").is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_display(&self.value))
    }
}

impl std::str::FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::parse(s)
    }
}

impl TryFrom<Value> for Pattern {
    type Error = PatternError;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Pattern::new(value)
    }
}

/// True if `s` has the shape of a pattern word: `$` and lowercase ASCII
/// letters. Like Python's `re.match(r"^\$[a-z]+$")`, a single trailing
/// newline is tolerated.
fn is_special_word(s: &str) -> bool {
    let s = s.strip_suffix('\n').unwrap_or(s);
    match s.strip_prefix('$') {
        Some(rest) => !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase()),
        None => false,
    }
}

/// True if `v` is the string `"$unordered"` or `"$contains"`.
fn is_list_mode(v: &Value) -> bool {
    matches!(v.as_str(), Some("$unordered" | "$contains"))
}

fn check(pat: &Value, path: &str) -> Result<(), PatternError> {
    let err = |message: String| PatternError {
        path: path.to_string(),
        message,
    };
    match pat {
        Value::String(s) => {
            if s.starts_with("$$") || !is_special_word(s) {
                return Ok(());
            }
            if TYPE_WORDS.contains(&s.as_str()) || s == "$any" || s == "$absent" {
                return Ok(());
            }
            if s == "$unordered" || s == "$contains" {
                return Err(err(format!(
                    "{s} is only allowed as the first element of a list"
                )));
            }
            Err(err(format!(
                "unknown pattern word {s} (write $$... for a literal)"
            )))
        }
        Value::Object(map) => {
            for (k, v) in map {
                check(v, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            let items = match items.first() {
                Some(first) if is_list_mode(first) => &items[1..],
                _ => &items[..],
            };
            for (i, v) in items.iter().enumerate() {
                let sub = format!("{path}[{i}]");
                if v.as_str() == Some("$absent") {
                    return Err(PatternError {
                        path: sub,
                        message: "$absent is only allowed as an object member value".into(),
                    });
                }
                check(v, &sub)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn type_word_matches(word: &str, v: &Value) -> Option<bool> {
    Some(match word {
        "$int" => v.is_i64() || v.is_u64(),
        "$num" => v.is_number(),
        "$str" => v.is_string(),
        "$bool" => v.is_boolean(),
        "$list" => v.is_array(),
        "$obj" => v.is_object(),
        "$null" => v.is_null(),
        _ => return None,
    })
}

/// Numeric equality by value across integer and float representations
/// (exact, like Python's `int == float`).
fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    fn as_int(n: &serde_json::Number) -> Option<i128> {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    }
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => x == y,
        (Some(i), None) | (None, Some(i)) => {
            let f = if as_int(a).is_some() { b } else { a }
                .as_f64()
                .unwrap_or(f64::NAN);
            // i128 covers every integer serde_json holds; compare exactly.
            f.is_finite() && f.fract() == 0.0 && f.abs() < 1e38 && f as i128 == i
        }
        (None, None) => a.as_f64() == b.as_f64(),
    }
}

/// Returns `None` if `val` matches `pat`, else where and why not.
fn match_value(pat: &Value, val: &Value, path: &str) -> Option<String> {
    match pat {
        Value::String(s) => {
            if s == "$any" {
                return None;
            }
            if let Some(ok) = type_word_matches(s, val) {
                return if ok {
                    None
                } else {
                    Some(format!(
                        "{path}: expected {}, received {}",
                        &s[1..],
                        dumps(val, 200)
                    ))
                };
            }
            let lit = if s.starts_with("$$") { &s[1..] } else { &s[..] };
            if val.as_str() == Some(lit) {
                None
            } else {
                Some(format!(
                    "{path}: expected {}, received {}",
                    dumps(&Value::String(lit.to_string()), usize::MAX),
                    dumps(val, 200)
                ))
            }
        }
        Value::Bool(_) | Value::Null => {
            if pat == val {
                None
            } else {
                Some(format!(
                    "{path}: expected {}, received {}",
                    dumps(pat, usize::MAX),
                    dumps(val, 200)
                ))
            }
        }
        Value::Number(p) => match val {
            Value::Number(v) if numbers_equal(p, v) => None,
            _ => Some(format!(
                "{path}: expected {}, received {}",
                dumps(pat, usize::MAX),
                dumps(val, 200)
            )),
        },
        Value::Object(pmap) => {
            let Value::Object(vmap) = val else {
                return Some(format!(
                    "{path}: expected an object, received {}",
                    dumps(val, 200)
                ));
            };
            for (key, sub) in pmap {
                let sub_path = format!("{path}.{key}");
                if sub.as_str() == Some("$absent") {
                    if let Some(present) = vmap.get(key) {
                        return Some(format!(
                            "{sub_path}: expected no such key, received {}",
                            dumps(present, 200)
                        ));
                    }
                    continue;
                }
                let Some(v) = vmap.get(key) else {
                    return Some(format!("{sub_path}: missing"));
                };
                if let Some(why) = match_value(sub, v, &sub_path) {
                    return Some(why);
                }
            }
            None
        }
        Value::Array(pitems) => {
            let Value::Array(vitems) = val else {
                return Some(format!(
                    "{path}: expected a list, received {}",
                    dumps(val, 200)
                ));
            };
            if let Some(mode) = pitems.first().filter(|f| is_list_mode(f)) {
                let items = &pitems[1..];
                if mode == "$unordered" && items.len() != vitems.len() {
                    return Some(format!(
                        "{path}: expected {} elements (any order), received {}",
                        items.len(),
                        vitems.len()
                    ));
                }
                return match_multiset(items, vitems, path);
            }
            if pitems.len() != vitems.len() {
                return Some(format!(
                    "{path}: expected {} elements, received {}",
                    pitems.len(),
                    vitems.len()
                ));
            }
            pitems
                .iter()
                .zip(vitems)
                .enumerate()
                .find_map(|(i, (p, v))| match_value(p, v, &format!("{path}[{i}]")))
        }
    }
}

/// Each pattern in `items` must match a distinct element of `vals`
/// (bipartite matching by augmenting paths).
fn match_multiset(items: &[Value], vals: &[Value], path: &str) -> Option<String> {
    let cand: Vec<Vec<usize>> = items
        .iter()
        .map(|p| {
            (0..vals.len())
                .filter(|&j| match_value(p, &vals[j], "$").is_none())
                .collect()
        })
        .collect();
    for (i, c) in cand.iter().enumerate() {
        if c.is_empty() {
            let mut why = format!("{path}: no element matches {}", dumps(&items[i], 300));
            // point at the element that got furthest: the deepest mismatch
            let misses: Vec<String> = vals
                .iter()
                .enumerate()
                .filter_map(|(j, v)| match_value(&items[i], v, &format!("{path}[{j}]")))
                .collect();
            let depth = |m: &String| {
                let head = m.split(": ").next().unwrap_or("");
                head.matches('.').count() + head.matches('[').count()
            };
            // the first of the deepest, like Python's max()
            let mut best: Option<&String> = None;
            for m in &misses {
                if best.is_none_or(|b| depth(m) > depth(b)) {
                    best = Some(m);
                }
            }
            if let Some(best) = best {
                why.push_str(&format!(" (closest: {best})"));
            }
            return Some(why);
        }
    }
    let mut owner: Vec<Option<usize>> = vec![None; vals.len()];
    fn augment(
        i: usize,
        cand: &[Vec<usize>],
        owner: &mut [Option<usize>],
        seen: &mut [bool],
    ) -> bool {
        for &j in &cand[i] {
            if seen[j] {
                continue;
            }
            seen[j] = true;
            if owner[j].is_none_or(|k| augment(k, cand, owner, seen)) {
                owner[j] = Some(i);
                return true;
            }
        }
        false
    }
    for (i, item) in items.iter().enumerate() {
        let mut seen = vec![false; vals.len()];
        if !augment(i, &cand, &mut owner, &mut seen) {
            return Some(format!(
                "{path}: elements cannot be paired with patterns one to one (first unpaired: {})",
                dumps(item, 300)
            ));
        }
    }
    None
}

/// Formats JSON the way transcripts are written (`{"a": 1, "b": [1, 2]}`),
/// cut after `limit` characters with a note of how many more there were.
pub fn dumps(value: &Value, limit: usize) -> String {
    let text = to_display(value);
    let total = text.chars().count();
    if total <= limit {
        return text;
    }
    let cut: String = text.chars().take(limit).collect();
    format!("{cut} ...({} more chars)", total - limit)
}

/// Formats JSON on one line with a space after `,` and `:` (the style of the
/// transcripts and of Python's `json.dumps`).
pub fn to_display(value: &Value) -> String {
    let mut out = String::new();
    write_display(value, &mut out);
    out
}

fn write_display(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_display(v, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_display(v, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pat(v: Value) -> Pattern {
        Pattern::new(v).expect("valid pattern")
    }

    fn why(p: Value, v: Value) -> String {
        pat(p).check(&v).expect_err("should not match").0
    }

    #[test]
    fn object_subset_and_extra_keys() {
        let p = pat(json!({"return": {}}));
        assert!(p.matches(&json!({"return": {}})));
        assert!(p.matches(&json!({"return": {"x": 1}, "id": 3})));
        assert_eq!(
            why(json!({"return": {}}), json!({"error": {}})),
            "$.return: missing"
        );
        assert_eq!(
            why(json!({"a": {}}), json!({"a": []})),
            "$.a: expected an object, received []"
        );
        assert_eq!(
            why(json!({"a": 1}), json!([1])),
            "$: expected an object, received [1]"
        );
    }

    #[test]
    fn any_matches_everything() {
        let p = pat(json!("$any"));
        for v in [json!(null), json!(1), json!("x"), json!([]), json!({})] {
            assert!(p.matches(&v));
        }
        assert!(pat(json!({"a": "$any"})).matches(&json!({"a": null})));
        assert_eq!(why(json!({"a": "$any"}), json!({})), "$.a: missing");
    }

    #[test]
    fn absent_requires_missing_key() {
        let p = pat(json!({"return": "$any", "id": "$absent"}));
        assert!(p.matches(&json!({"return": {}})));
        assert_eq!(
            why(json!({"id": "$absent"}), json!({"id": 7})),
            "$.id: expected no such key, received 7"
        );
        // null is a value: the key is present
        assert!(!pat(json!({"id": "$absent"})).matches(&json!({"id": null})));
    }

    #[test]
    fn absent_is_only_a_member_value() {
        assert_eq!(
            Pattern::new(json!("$absent")).unwrap_err().message,
            "$absent is only allowed as an object member value"
        );
        let e = Pattern::new(json!({"a": [1, "$absent"]})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "$.a[1]: $absent is only allowed as an object member value"
        );
        let e = Pattern::new(json!(["$unordered", "$absent"])).unwrap_err();
        assert_eq!(e.path, "$[0]");
    }

    #[test]
    fn type_words() {
        let cases = [
            ("$int", json!(3), true),
            ("$int", json!(-3), true),
            ("$int", json!(u64::MAX), true),
            ("$int", json!(3.5), false),
            ("$int", json!(true), false),
            ("$num", json!(3), true),
            ("$num", json!(3.5), true),
            ("$num", json!(true), false),
            ("$num", json!("3"), false),
            ("$str", json!(""), true),
            ("$str", json!(1), false),
            ("$bool", json!(false), true),
            ("$bool", json!(0), false),
            ("$list", json!([]), true),
            ("$list", json!({}), false),
            ("$obj", json!({}), true),
            ("$obj", json!([]), false),
            ("$null", json!(null), true),
            ("$null", json!(false), false),
        ];
        for (word, v, ok) in cases {
            assert_eq!(pat(json!(word)).matches(&v), ok, "{word} vs {v}");
        }
        assert_eq!(
            why(json!({"n": "$int"}), json!({"n": "1"})),
            r#"$.n: expected int, received "1""#
        );
    }

    #[test]
    fn numbers_by_value() {
        assert!(pat(json!(1)).matches(&json!(1.0)));
        assert!(pat(json!(1.0)).matches(&json!(1)));
        assert!(pat(json!(1048576)).matches(&json!(1048576)));
        assert!(pat(json!(-2)).matches(&json!(-2)));
        assert!(pat(json!(0.5)).matches(&json!(0.5)));
        assert!(!pat(json!(1)).matches(&json!(2)));
        assert!(!pat(json!(1)).matches(&json!(true)));
        assert!(!pat(json!(0)).matches(&json!(false)));
        assert!(!pat(json!(1)).matches(&json!("1")));
        assert!(pat(json!(u64::MAX)).matches(&json!(u64::MAX)));
        assert!(!pat(json!(9007199254740993_u64)).matches(&json!(9007199254740992.0)));
        assert_eq!(why(json!(1), json!(2)), "$: expected 1, received 2");
    }

    #[test]
    fn strings_and_booleans_exact() {
        assert!(pat(json!("abc")).matches(&json!("abc")));
        assert!(!pat(json!("abc")).matches(&json!("ABC")));
        assert!(!pat(json!("1")).matches(&json!(1)));
        assert!(pat(json!(true)).matches(&json!(true)));
        assert!(!pat(json!(true)).matches(&json!(1)));
        assert!(!pat(json!(false)).matches(&json!(null)));
        assert!(pat(json!(null)).matches(&json!(null)));
        assert!(!pat(json!(null)).matches(&json!({})));
        assert_eq!(
            why(json!({"ro": false}), json!({"ro": true})),
            "$.ro: expected false, received true"
        );
        assert_eq!(
            why(json!({"desc": "a"}), json!({"desc": "b"})),
            r#"$.desc: expected "a", received "b""#
        );
    }

    #[test]
    fn double_dollar_is_a_literal() {
        let p = pat(json!("$$any"));
        assert!(p.matches(&json!("$any")));
        assert!(!p.matches(&json!("$$any")));
        assert!(!p.matches(&json!("x")));
        assert!(pat(json!("$$")).matches(&json!("$")));
        assert!(pat(json!("$$$x")).matches(&json!("$$x")));
    }

    #[test]
    fn dollar_strings_that_are_not_words_are_literals() {
        for s in ["$", "$Foo", "$foo-bar", "$1", "a$b", "$foo bar", "${TMP}"] {
            assert!(pat(json!(s)).matches(&json!(s)), "{s}");
        }
    }

    #[test]
    fn unknown_words_are_syntax_errors() {
        let e = Pattern::new(json!({"a": {"b": ["$intt"]}})).unwrap_err();
        assert_eq!(e.path, "$.a.b[0]");
        assert_eq!(
            e.message,
            "unknown pattern word $intt (write $$... for a literal)"
        );
        assert!(Pattern::new(json!("$foo\n")).is_err());
        assert!(Pattern::parse("\"$string\"").is_err());
        assert!(Pattern::parse("{not json").is_err());
    }

    #[test]
    fn list_mode_words_only_first() {
        let e = Pattern::new(json!([1, "$unordered"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "$[1]: $unordered is only allowed as the first element of a list"
        );
        assert!(Pattern::new(json!({"a": "$contains"})).is_err());
        assert!(Pattern::new(json!(["$contains", "$contains"])).is_err());
        assert!(Pattern::new(json!(["$unordered", ["$contains", 1]])).is_ok());
    }

    #[test]
    fn ordered_lists() {
        let p = pat(json!([1, "$str", {"a": 1}]));
        assert!(p.matches(&json!([1, "x", {"a": 1, "b": 2}])));
        assert_eq!(
            why(json!([1, 2]), json!([1, 2, 3])),
            "$: expected 2 elements, received 3"
        );
        assert_eq!(
            why(json!([1, 2]), json!([2, 1])),
            "$[0]: expected 1, received 2"
        );
        assert_eq!(
            why(json!({"r": []}), json!({"r": {}})),
            "$.r: expected a list, received {}"
        );
        assert!(pat(json!([])).matches(&json!([])));
    }

    #[test]
    fn unordered_lists() {
        let p = pat(json!(["$unordered", {"n": "a"}, {"n": "b"}]));
        assert!(p.matches(&json!([{"n": "b"}, {"n": "a"}])));
        assert!(p.matches(&json!([{"n": "a"}, {"n": "b"}])));
        assert_eq!(
            why(json!(["$unordered", 1]), json!([1, 2])),
            "$: expected 1 elements (any order), received 2"
        );
        assert!(pat(json!(["$unordered"])).matches(&json!([])));
        // duplicates must pair one to one
        assert!(!pat(json!(["$unordered", 1, 1])).matches(&json!([1, 2])));
        assert!(pat(json!(["$unordered", 1, 1])).matches(&json!([1, 1])));
        // a greedy pairing would fail here; augmenting paths must not
        let p = pat(json!(["$unordered", "$int", 1]));
        assert!(p.matches(&json!([1, 2])));
    }

    #[test]
    fn contains_lists() {
        let p = pat(json!(["$contains", {"node-name": "f0"}]));
        assert!(p.matches(&json!([{"node-name": "x"}, {"node-name": "f0"}])));
        assert!(!p.matches(&json!([])));
        assert!(pat(json!(["$contains"])).matches(&json!([1, 2])));
        assert!(!pat(json!(["$contains", 1, 1])).matches(&json!([1, 2])));
        assert!(pat(json!(["$contains", 1, 1])).matches(&json!([1, 3, 1])));
        assert_eq!(
            why(json!(["$contains", 1, 1]), json!([1, 2])),
            "$: elements cannot be paired with patterns one to one (first unpaired: 1)"
        );
        assert_eq!(
            why(json!(["$contains", 1]), json!({})),
            "$: expected a list, received {}"
        );
    }

    #[test]
    fn multiset_points_at_closest_element() {
        let w = why(
            json!(["$contains", {"a": {"b": 2}}]),
            json!([{"c": 1}, {"a": {"b": 3}}]),
        );
        assert_eq!(
            w,
            r#"$: no element matches {"a": {"b": 2}} (closest: $[1].a.b: expected 2, received 3)"#
        );
    }

    #[test]
    fn dumps_truncates_and_spaces() {
        let v = json!({"a": [1, 2], "b": "x"});
        assert_eq!(dumps(&v, 100), r#"{"a": [1, 2], "b": "x"}"#);
        assert_eq!(dumps(&json!("abcdef"), 3), r#""ab ...(5 more chars)"#);
    }

    #[test]
    fn display_and_fromstr() {
        let p: Pattern = r#"{"a":[1,"$int"]}"#.parse().unwrap();
        assert_eq!(p.to_string(), r#"{"a": [1, "$int"]}"#);
        assert_eq!(p.value(), &json!({"a": [1, "$int"]}));
        assert!(Pattern::try_from(json!("$nope")).is_err());
    }
}

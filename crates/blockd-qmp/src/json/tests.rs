//! Unit and property tests for the QMP JSON stream parser.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

/// One parsed item, with the error reduced to its text.
type Item = Result<Value, String>;

/// Small limits used by the bounded-memory tests.
const SMALL: Limits = Limits {
    max_depth: 8,
    max_message_bytes: 4096,
    max_tokens: 512,
};

/// Feeds `chunks` in order to a fresh parser.
fn run_chunks(limits: &Limits, chunks: &[&[u8]]) -> Vec<Item> {
    let mut p = StreamParser::new(limits.clone());
    let mut out = Vec::new();
    for c in chunks {
        p.feed(c, &mut out);
    }
    out.into_iter().map(|r| r.map_err(|e| e.desc)).collect()
}

/// Feeds `input` one byte at a time.
fn run_bytewise(limits: &Limits, input: &[u8]) -> Vec<Item> {
    let chunks: Vec<&[u8]> = input.chunks(1).collect();
    run_chunks(limits, &chunks)
}

/// Parses `input` whole with `limits`, asserting that byte-by-byte feeding
/// gives the same result.
fn parse_with(limits: &Limits, input: &[u8]) -> Vec<Item> {
    let whole = run_chunks(limits, &[input]);
    let bytewise = run_bytewise(limits, input);
    assert_eq!(whole, bytewise, "split feed differs for {input:?}");
    whole
}

/// [`parse_with`] using the default limits.
fn parse(input: &[u8]) -> Vec<Item> {
    parse_with(&Limits::default(), input)
}

/// Expected successful item.
fn ok(v: Value) -> Item {
    Ok(v)
}

/// Expected error item.
fn err(desc: &str) -> Item {
    Err(desc.to_owned())
}

/// Parses input that must yield exactly one error and returns its text.
fn single_error(input: &[u8]) -> String {
    let items = parse(input);
    match items.as_slice() {
        [Err(e)] => e.clone(),
        other => panic!("expected one error for {input:?}, got {other:?}"),
    }
}

/// Parses a string that must yield one string value.
fn string_value(input: &[u8]) -> String {
    match parse(input).as_slice() {
        [Ok(Value::String(s))] => s.clone(),
        other => panic!("expected one string for {input:?}, got {other:?}"),
    }
}

/// Nesting depth of a value (scalars are 0), computed iteratively.
fn depth_of(v: &Value) -> usize {
    let mut max = 0;
    let mut todo = vec![(v, 0usize)];
    while let Some((v, d)) = todo.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => todo.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => todo.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
        if matches!(v, Value::Array(a) if a.is_empty()) {
            max = max.max(d + 1);
        }
    }
    max
}

// ---------------------------------------------------------------- framing

#[test]
fn two_messages_on_one_line() {
    assert_eq!(
        parse(br#"{"a":1}{"b":2}"#),
        vec![ok(json!({"a": 1})), ok(json!({"b": 2}))]
    );
}

#[test]
fn object_over_three_lines_is_one_message() {
    assert_eq!(
        parse(b"{\"execute\":\n \"query-version\",\r\n\t\"id\": 7\n}\n"),
        vec![ok(json!({"execute": "query-version", "id": 7}))]
    );
}

#[test]
fn message_complete_without_newline() {
    let mut p = StreamParser::default();
    let mut out = Vec::new();
    p.feed(br#"{"execute":"x"}"#, &mut out);
    assert_eq!(out, vec![Ok(json!({"execute": "x"}))]);
    assert!(!p.in_message());
    assert_eq!(p.pending_bytes(), 0);
}

#[test]
fn blank_input_yields_nothing() {
    assert_eq!(parse(b""), vec![]);
    assert_eq!(parse(b" \t\r\n\n  \r\n"), vec![]);
    let mut p = StreamParser::default();
    let mut out = Vec::new();
    p.feed(b"\n \n", &mut out);
    assert!(!p.in_message());
}

#[test]
fn top_level_scalars_and_arrays_are_items() {
    assert_eq!(
        parse(b"null 42\n\"x\" true false [1,\"a\"] -7 1.5 'y'{}"),
        vec![
            ok(Value::Null),
            ok(json!(42)),
            ok(json!("x")),
            ok(json!(true)),
            ok(json!(false)),
            ok(json!([1, "a"])),
            ok(json!(-7)),
            ok(json!(1.5)),
            ok(json!("y")),
            ok(json!({})),
        ]
    );
}

#[test]
fn top_level_number_waits_for_delimiter_or_finish() {
    let mut p = StreamParser::default();
    let mut out = Vec::new();
    p.feed(b"42", &mut out);
    assert!(out.is_empty());
    assert!(p.in_message());
    p.feed(b"1", &mut out);
    p.finish(&mut out);
    assert_eq!(out, vec![Ok(json!(421))]);
    assert!(!p.in_message());
}

#[test]
fn finish_reports_incomplete_message_once() {
    let mut p = StreamParser::default();
    let mut out = Vec::new();
    p.feed(br#"{"execute": "x""#, &mut out);
    p.finish(&mut out);
    assert_eq!(
        out,
        vec![Err(JsonError::new(
            "JSON parse error, premature end of input"
        ))]
    );
    // After an error the skipped remainder is not reported again.
    let mut out = Vec::new();
    p.feed(br#"{"a" 1, [1,"#, &mut out);
    p.finish(&mut out);
    assert_eq!(out.len(), 1);
    // Nothing pending: nothing reported.
    let mut out = Vec::new();
    p.feed(b"true ", &mut out);
    p.finish(&mut out);
    assert_eq!(out, vec![Ok(json!(true))]);
}

#[test]
fn thousand_small_objects_in_one_feed() {
    let mut input = Vec::new();
    for i in 0..1000 {
        input.extend_from_slice(format!("{{\"execute\":\"x\",\"id\":{i}}}").as_bytes());
        if i % 3 == 0 {
            input.push(b'\n');
        }
    }
    let items = run_chunks(&Limits::default(), &[&input]);
    assert_eq!(items.len(), 1000);
    for (i, item) in items.into_iter().enumerate() {
        assert_eq!(item, ok(json!({"execute": "x", "id": i})));
    }
}

#[test]
fn key_order_is_preserved() {
    let items = parse(br#"{"z":1,"a":2,"m":3}"#);
    let Ok(Value::Object(map)) = &items[0] else {
        panic!("not an object: {items:?}")
    };
    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
    assert_eq!(keys, ["z", "a", "m"]);
}

#[test]
fn default_limits_and_error_display() {
    let l = Limits::default();
    assert_eq!(l.max_depth, 1024);
    assert_eq!(l.max_message_bytes, 64 * 1024 * 1024);
    assert_eq!(l.max_tokens, 2_097_152);
    let e = JsonError::new("JSON parse error, expecting value");
    assert_eq!(e.to_string(), e.desc);
    assert!(!e.is_limit());
    assert!(JsonError::new("JSON nesting depth limit exceeded").is_limit());
}

#[test]
fn finish_flushes_stray_utf8_prefix() {
    let mut p = StreamParser::default();
    let mut out = Vec::new();
    p.feed(b"[1] \xE2\x82", &mut out);
    p.finish(&mut out);
    assert_eq!(
        out,
        vec![
            Ok(json!([1])),
            Err(JsonError::new("JSON parse error, stray '\u{FFFD}'"))
        ]
    );
    assert!(!p.in_message());
}

// ---------------------------------------------------------------- strings

#[test]
fn single_quoted_strings() {
    assert_eq!(string_value(b"'abc'"), "abc");
    assert_eq!(string_value(br#"'say "hi"'"#), "say \"hi\"");
    assert_eq!(string_value(br"'it\'s'"), "it's");
    assert_eq!(string_value(br#""it\'s""#), "it's");
    assert_eq!(string_value(br#""it's""#), "it's");
    assert_eq!(
        parse(br#"{'execute':'qmp_capabilities'}"#),
        vec![ok(json!({"execute": "qmp_capabilities"}))]
    );
}

#[test]
fn all_escapes() {
    assert_eq!(
        string_value(br#""\"\\\/\b\f\n\r\t\'\u0041\u00e9\u20AC""#),
        "\"\\/\u{8}\u{c}\n\r\t'A\u{e9}\u{20ac}"
    );
}

#[test]
fn nul_escape_is_accepted() {
    assert_eq!(string_value(br#""a\u0000b""#), "a\0b");
}

#[test]
fn surrogate_pairs_combine() {
    assert_eq!(string_value(br#""\ud83d\ude00""#), "\u{1F600}");
    assert_eq!(string_value(br#""x\uD83D\uDE00y""#), "x\u{1F600}y");
}

#[test]
fn lone_surrogates_are_errors() {
    let msg = |e: &str| format!("JSON parse error, \\{e} is not a valid Unicode character");
    assert_eq!(single_error(br#""\ud800""#), msg("ud800"));
    assert_eq!(single_error(br#""\uD800x""#), msg("uD800"));
    assert_eq!(single_error(br#""\ude00""#), msg("ude00"));
    assert_eq!(single_error(br#""\ud83d\u0041""#), msg("ud83d"));
    assert_eq!(single_error(br#""\ud83d\n""#), msg("ud83d"));
    assert_eq!(single_error(br#""\ud83d\ud83d""#), msg("ud83d"));
    // The rest of the string is skipped, then parsing goes on.
    assert_eq!(
        parse(br#"{"a":"\udc00 ]}"} {"b":1}"#),
        vec![err(&msg("udc00")), ok(json!({"b": 1}))]
    );
}

#[test]
fn bad_escapes_are_errors() {
    let bad = "JSON parse error, invalid escape sequence in string";
    let bad_u = "JSON parse error, invalid \\u escape sequence in string";
    assert_eq!(single_error(br#""\x""#), bad);
    assert_eq!(single_error(br#""\u12G4""#), bad_u);
    assert_eq!(single_error(br#""\u12""#), bad_u);
    // An escaped quote after the bad escape does not end the skipped string.
    assert_eq!(
        parse(br#"["\q\"]", 1] [2]"#),
        vec![err(bad), ok(json!([2]))]
    );
}

#[test]
fn raw_control_characters_in_strings_are_errors() {
    for b in [0x09u8, 0x0D] {
        let input = [b'"', b'a', b, b'"'];
        let e = single_error(&input);
        assert!(
            e.starts_with("JSON parse error, unescaped control character"),
            "{e}"
        );
    }
    assert_eq!(
        single_error(b"\"a\tb\""),
        "JSON parse error, unescaped control character '\\t' in string"
    );
}

#[test]
fn valid_utf8_in_strings() {
    let s = "h\u{e9}llo \u{20ac} \u{1F600} \u{10FFFF} \u{7f}";
    let input = format!("\"{s}\"");
    assert_eq!(string_value(input.as_bytes()), s);
}

#[test]
fn invalid_utf8_in_strings() {
    let e = "JSON parse error, invalid UTF-8 sequence in string";
    for bad in [
        &b"\xC3\x28"[..],
        b"\xC0\xAF",
        b"\xED\xA0\x80",
        b"\xE0\x80\x80",
        b"\xF0\x80\x80\x80",
        b"\xF4\x90\x80\x80",
        b"\xF8\x88\x80\x80\x80",
        b"\x80",
        b"\xE2\x82",
        b"\xFE",
    ] {
        let mut input = b"[\"a".to_vec();
        input.extend_from_slice(bad);
        input.extend_from_slice(b"\"]{\"ok\":1}");
        assert_eq!(
            parse(&input),
            vec![err(e), ok(json!({"ok": 1}))],
            "input {input:?}"
        );
    }
}

#[test]
fn long_string_value_parses() {
    let big = "x".repeat(10 << 20);
    let input = format!(r#"{{"execute":"x","arguments":{{"data":"{big}"}}}}"#);
    let items = run_chunks(&Limits::default(), &[input.as_bytes()]);
    assert_eq!(items.len(), 1);
    let Ok(v) = &items[0] else { panic!("error") };
    assert_eq!(
        v["arguments"]["data"].as_str().map(str::len),
        Some(10 << 20)
    );
    // Same in uneven chunks.
    let chunks: Vec<&[u8]> = input.as_bytes().chunks(65_537).collect();
    assert_eq!(run_chunks(&Limits::default(), &chunks), items);
}

// ---------------------------------------------------------------- numbers

#[test]
fn integers_pick_the_narrowest_type() {
    let items = parse(
        b"0 -0 42 -42 9223372036854775807 -9223372036854775808 \
          9223372036854775808 18446744073709551615 18446744073709551616 \
          -9223372036854775809 ",
    );
    let v: Vec<Value> = items.into_iter().map(Result::unwrap).collect();
    assert_eq!(v[0].as_i64(), Some(0));
    assert_eq!(v[1].as_i64(), Some(0));
    assert_eq!(v[2].as_i64(), Some(42));
    assert_eq!(v[3].as_i64(), Some(-42));
    assert_eq!(v[4].as_i64(), Some(i64::MAX));
    assert_eq!(v[5].as_i64(), Some(i64::MIN));
    assert_eq!(v[6].as_u64(), Some(1 << 63));
    assert!(v[6].is_u64());
    assert_eq!(v[7].as_u64(), Some(u64::MAX));
    assert!(v[8].is_f64());
    assert_eq!(v[8].as_f64(), Some(18446744073709551616.0));
    assert!(v[9].is_f64());
    assert_eq!(v[9].as_f64(), Some(-9223372036854775809.0));
}

#[test]
fn floats() {
    let items = parse(b"[1.5, -0.25, 1e3, 1E-2, 2.5e+2, 0.1, 1e400, -1e400, 1e-400, -0.0]");
    let Ok(Value::Array(v)) = &items[0] else {
        panic!("{items:?}")
    };
    let f: Vec<f64> = v.iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(v.iter().all(Value::is_f64));
    assert_eq!(
        f,
        [
            1.5,
            -0.25,
            1000.0,
            0.01,
            250.0,
            0.1,
            f64::MAX,
            -f64::MAX,
            0.0,
            -0.0
        ]
    );
}

#[test]
fn malformed_numbers() {
    let e = |t: &str| format!("JSON parse error, invalid number '{t}'");
    assert_eq!(single_error(b"01 "), e("01"));
    assert_eq!(single_error(b"1. "), e("1."));
    assert_eq!(single_error(b"1.x "), e("1.x"));
    assert_eq!(single_error(b"- "), e("-"));
    assert_eq!(single_error(b"-a "), e("-a"));
    assert_eq!(single_error(b"1e "), e("1e"));
    assert_eq!(single_error(b"1e+ "), e("1e+"));
    assert_eq!(single_error(b"0x10 "), e("0x"));
    assert_eq!(single_error(b"1.5.5 "), e("1.5."));
    assert_eq!(single_error(b"[1-2]"), e("1-"));
    assert_eq!(single_error(b"[1.]"), e("1."));
    assert_eq!(single_error(b".5 "), "JSON parse error, stray '.'");
    assert_eq!(single_error(b"+1 "), "JSON parse error, stray '+'");
    // The broken word does not swallow what follows it.
    assert_eq!(
        parse(br#"-{"a":1}"#),
        vec![err(&e("-")), ok(json!({"a": 1}))]
    );
}

#[test]
fn long_numbers_within_limits() {
    let digits = "9".repeat(5000);
    let input = format!("[{digits}, 0.{digits}]");
    let items = parse(input.as_bytes());
    let Ok(Value::Array(v)) = &items[0] else {
        panic!("{items:?}")
    };
    assert_eq!(v[0].as_f64(), Some(f64::MAX));
    assert_eq!(v[1].as_f64(), Some(1.0));
}

// ---------------------------------------------------------------- keywords

#[test]
fn keywords() {
    assert_eq!(
        parse(b"[true,false,null]"),
        vec![ok(json!([true, false, null]))]
    );
    assert_eq!(
        single_error(b"foo "),
        "JSON parse error, invalid keyword 'foo'"
    );
    assert_eq!(
        single_error(b"[True]"),
        "JSON parse error, invalid keyword 'True'"
    );
    assert_eq!(
        single_error(b"[nulls]"),
        "JSON parse error, invalid keyword 'nulls'"
    );
    assert_eq!(
        single_error(b"{\"a\":query-version}"),
        "JSON parse error, invalid keyword 'query-version'"
    );
    let long = "a".repeat(1000);
    let e = single_error(format!("[{long}]").as_bytes());
    assert_eq!(
        e,
        format!("JSON parse error, invalid keyword '{}...'", &long[..64])
    );
}

// ---------------------------------------------------------------- grammar

#[test]
fn duplicate_key() {
    assert_eq!(
        parse(br#"{"a":1,"a":2} {"a":1,"b":{"a":2}}"#),
        vec![
            err("JSON parse error, duplicate key"),
            ok(json!({"a": 1, "b": {"a": 2}}))
        ]
    );
    assert_eq!(
        single_error(br#"{"a":1,'a':2}"#),
        "JSON parse error, duplicate key"
    );
}

#[test]
fn syntax_errors() {
    let value = "JSON parse error, expecting value";
    for input in [
        &b"[1,]"[..],
        b"{\"a\":1,}",
        b"{\"a\":}",
        b"{]",
        b"[,1]",
        b"{\"a\":,}",
        b"}",
        b"]",
        b":",
        b",",
        b"{,}",
    ] {
        assert_eq!(single_error(input), value, "input {input:?}");
    }
    assert_eq!(
        single_error(b"{\"a\" 1}"),
        "JSON parse error, missing : in object pair"
    );
    assert_eq!(
        single_error(b"[1 2]"),
        "JSON parse error, expecting ',' or ']'"
    );
    assert_eq!(
        single_error(b"[1}"),
        "JSON parse error, expecting ',' or ']'"
    );
    assert_eq!(
        single_error(b"{\"a\":1 \"b\":2}"),
        "JSON parse error, expecting ',' or '}'"
    );
    assert_eq!(
        single_error(b"{\"a\":1]"),
        "JSON parse error, expecting ',' or '}'"
    );
    assert_eq!(
        single_error(b"{1:2}"),
        "JSON parse error, key is not a string in object"
    );
    assert_eq!(
        single_error(b"{null:2}"),
        "JSON parse error, key is not a string in object"
    );
    assert_eq!(
        single_error(b"{\"a\":1,[]:2}"),
        "JSON parse error, key is not a string in object"
    );
}

#[test]
fn stray_bytes() {
    assert_eq!(single_error(b"%"), "JSON parse error, stray '%'");
    assert_eq!(single_error(b"#foo"), "JSON parse error, stray '#'");
    assert_eq!(single_error(b"\x01"), "JSON parse error, stray '\x01'");
    assert_eq!(single_error(b"\x00"), "JSON parse error, stray '\0'");
    assert_eq!(single_error(b"\x7f"), "JSON parse error, stray '\x7f'");
    assert_eq!(single_error(b"\xFF"), "JSON parse error, stray '\u{FFFD}'");
    assert_eq!(single_error(b"\xC0"), "JSON parse error, stray '\u{FFFD}'");
    assert_eq!(single_error(b"\xC3 "), "JSON parse error, stray '\u{FFFD}'");
    // The byte that broke the sequence is looked at afresh.
    assert_eq!(
        parse(b"\xC3{}"),
        vec![err("JSON parse error, stray '\u{FFFD}'"), ok(json!({}))]
    );
    assert_eq!(
        single_error("é".as_bytes()),
        "JSON parse error, stray '\u{e9}'"
    );
    assert_eq!(
        single_error("[1,\u{1F600}]".as_bytes()),
        "JSON parse error, stray '\u{1F600}'"
    );
}

// ---------------------------------------------------------------- limits

/// `n` nested arrays.
fn nested_arrays(n: usize) -> Vec<u8> {
    let mut v = vec![b'['; n];
    v.extend(std::iter::repeat_n(b']', n));
    v
}

#[test]
fn depth_1024_parses() {
    let items = parse(&nested_arrays(1024));
    assert_eq!(items.len(), 1);
    let v = items[0].as_ref().unwrap();
    assert_eq!(depth_of(v), 1024);
    let mut objects = Vec::new();
    for _ in 0..1024 {
        objects.extend_from_slice(br#"{"a":"#);
    }
    objects.extend_from_slice(b"1");
    objects.extend(std::iter::repeat_n(b'}', 1024));
    let items = parse(&objects);
    assert!(matches!(items.as_slice(), [Ok(Value::Object(_))]));
}

#[test]
fn depth_1025_is_one_error_then_recovers() {
    let mut input = nested_arrays(1025);
    input.extend_from_slice(br#"{"ok":1}"#);
    assert_eq!(
        parse(&input),
        vec![
            err("JSON nesting depth limit exceeded"),
            ok(json!({"ok": 1}))
        ]
    );
    // Far deeper: still exactly one error, and no buffering while skipping.
    let mut p = StreamParser::default();
    let mut out = Vec::new();
    p.feed(&vec![b'['; 100_000], &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(p.pending_bytes(), 0);
    assert!(p.in_message());
    p.feed(&vec![b']'; 100_000], &mut out);
    p.feed(br#"{"ok":1}"#, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[1], Ok(json!({"ok": 1})));
}

#[test]
fn size_limit_is_one_error() {
    let limits = Limits {
        max_message_bytes: 100,
        ..Limits::default()
    };
    let big = "y".repeat(500);
    let input =
        format!(r#"{{"execute":"x","arguments":{{"a":"{big}","b":[1,2,"]]]"]}}}} {{"ok":1}}"#);
    assert_eq!(
        parse_with(&limits, input.as_bytes()),
        vec![err("JSON token size limit exceeded"), ok(json!({"ok": 1}))]
    );
    // Exactly at the limit is fine.
    let exact = format!("\"{}\"", "z".repeat(98));
    assert_eq!(parse_with(&limits, exact.as_bytes()).len(), 1);
    assert!(parse_with(&limits, exact.as_bytes())[0].is_ok());
    let over = format!("\"{}\" 1 ", "z".repeat(99));
    assert_eq!(
        parse_with(&limits, over.as_bytes()),
        vec![err("JSON token size limit exceeded"), ok(json!(1))]
    );
    // Inside a long number or keyword.
    let num = format!("[{}] [2]", "1".repeat(500));
    assert_eq!(
        parse_with(&limits, num.as_bytes()),
        vec![err("JSON token size limit exceeded"), ok(json!([2]))]
    );
    let num = format!("{} [2]", "1".repeat(500));
    assert_eq!(
        parse_with(&limits, num.as_bytes()),
        vec![err("JSON token size limit exceeded"), ok(json!([2]))]
    );
    let word = format!("{} [2]", "t".repeat(500));
    assert_eq!(
        parse_with(&limits, word.as_bytes()),
        vec![err("JSON token size limit exceeded"), ok(json!([2]))]
    );
}

#[test]
fn size_limit_skips_without_buffering() {
    let limits = Limits {
        max_message_bytes: 1000,
        ..Limits::default()
    };
    let mut p = StreamParser::new(limits);
    let mut out = Vec::new();
    p.feed(br#"{"data":""#, &mut out);
    let chunk = vec![b'q'; 10_000];
    for _ in 0..100 {
        p.feed(&chunk, &mut out);
        assert!(p.pending_bytes() <= 1000);
    }
    assert_eq!(out.len(), 1);
    p.feed(br#""}{"ok":1}"#, &mut out);
    assert_eq!(
        out,
        vec![
            Err(JsonError::new("JSON token size limit exceeded")),
            Ok(json!({"ok": 1}))
        ]
    );
    assert!(out[0].as_ref().unwrap_err().is_limit());
}

#[test]
fn token_limit_is_one_error() {
    let limits = Limits {
        max_tokens: 10,
        ..Limits::default()
    };
    // [1,2,3,4,5] is 11 tokens.
    assert_eq!(
        parse_with(&limits, b"[1,2,3,4,5] [1,2,3,4] {\"ok\":1}"),
        vec![
            err("JSON token count limit exceeded"),
            ok(json!([1, 2, 3, 4])),
            ok(json!({"ok": 1}))
        ]
    );
    let many = format!("[{}0]\n[2]", "0,".repeat(10_000));
    assert_eq!(
        parse_with(&limits, many.as_bytes()),
        vec![err("JSON token count limit exceeded"), ok(json!([2]))]
    );
}

#[test]
fn limits_reset_per_message() {
    let limits = Limits {
        max_message_bytes: 20,
        max_tokens: 10,
        max_depth: 2,
    };
    let input = br#"{"a":[1]} {"b":[2]} {"c":[3]} [[4]] [[5]]"#;
    let items = parse_with(&limits, input);
    assert_eq!(items.len(), 5);
    assert!(items.iter().all(Result::is_ok));
}

// ---------------------------------------------------------------- recovery

#[test]
fn truncated_message_does_not_swallow_the_next() {
    let input = b"{\"execute\": \"query-version\"\n{\"execute\": \"query-version\", \"id\": 2}\n";
    assert_eq!(
        parse(input),
        vec![
            err("JSON parse error, expecting ',' or '}'"),
            ok(json!({"execute": "query-version", "id": 2}))
        ]
    );
    // Missing colon and missing key also resync at the unexpected `{`.
    assert_eq!(
        parse(br#"{"a" {"b":1}"#),
        vec![
            err("JSON parse error, missing : in object pair"),
            ok(json!({"b": 1}))
        ]
    );
    assert_eq!(
        parse(br#"{"a":1, {"b":1}"#),
        vec![
            err("JSON parse error, key is not a string in object"),
            ok(json!({"b": 1}))
        ]
    );
}

#[test]
fn brace_bracket_mismatch_then_recovers() {
    assert_eq!(
        parse(br#"{]{"execute":"x"}"#),
        vec![
            err("JSON parse error, expecting value"),
            ok(json!({"execute": "x"}))
        ]
    );
    assert_eq!(
        parse(b"{]\n{\"execute\":\"x\"}"),
        vec![
            err("JSON parse error, expecting value"),
            ok(json!({"execute": "x"}))
        ]
    );
}

#[test]
fn control_byte_after_value_then_recovers() {
    assert_eq!(
        parse(b"{\"a\":1}\x00{\"b\":2}"),
        vec![
            ok(json!({"a": 1})),
            err("JSON parse error, stray '\0'"),
            ok(json!({"b": 2}))
        ]
    );
}

#[test]
fn control_byte_resets_mid_message() {
    // Mid-object, mid-string, mid-number, mid-escape: one error, then reset.
    for prefix in [
        &br#"{"a":[1,{"b""#[..],
        br#"{"a":"xy"#,
        br#"{"a":12"#,
        br#"{"a":"\u12"#,
        br#"[[[[["#,
    ] {
        for reset in [0x00u8, 0x01, 0x1B, 0xFF] {
            let mut input = prefix.to_vec();
            input.push(reset);
            input.extend_from_slice(br#"["ok"]"#);
            let items = parse(&input);
            assert_eq!(items.len(), 2, "{input:?} -> {items:?}");
            assert!(items[0].is_err());
            assert_eq!(items[1], ok(json!(["ok"])));
        }
    }
    // A control byte while skipping after an error is silent.
    assert_eq!(
        parse(b"[[1 2, [[[\x01[3]"),
        vec![
            err("JSON parse error, expecting ',' or ']'"),
            ok(json!([3]))
        ]
    );
    // An invalid keyword terminated by a control byte is still one error.
    assert_eq!(
        parse(b"tru\x00[3]"),
        vec![
            err("JSON parse error, invalid keyword 'tru'"),
            ok(json!([3]))
        ]
    );
}

#[test]
fn skip_until_depth_returns_to_zero() {
    // Brackets inside skipped strings (either quote) are not counted.
    assert_eq!(
        parse(br#"{"a" "b", "c": ["}", '{', "\"]"]} {"ok":1}"#),
        vec![
            err("JSON parse error, missing : in object pair"),
            ok(json!({"ok": 1}))
        ]
    );
    // A bracket offending token counts toward the depth.
    assert_eq!(
        parse(br#"{"a":1 [2, {"x":[]}] } [3]"#),
        vec![
            err("JSON parse error, expecting ',' or '}'"),
            ok(json!([3]))
        ]
    );
}

#[test]
fn newline_brace_resyncs() {
    // The broken message never closes; a `{` at the start of a line (after
    // optional whitespace) begins the next message.
    assert_eq!(
        parse(b"{\"a\": [1 2, 3,\n  {\"execute\":\"x\"}\n"),
        vec![
            err("JSON parse error, expecting ',' or ']'"),
            ok(json!({"execute": "x"}))
        ]
    );
    // A `{` not at the start of a line is part of the broken message.
    assert_eq!(
        parse(b"[1 2, {\"a\":1}] [3]"),
        vec![
            err("JSON parse error, expecting ',' or ']'"),
            ok(json!([3]))
        ]
    );
    // A `[` at line start does not resync; it nests.
    assert_eq!(
        parse(b"{\"a\" 1,\n[2]\n}\n{\"ok\":1}"),
        vec![
            err("JSON parse error, missing : in object pair"),
            ok(json!({"ok": 1}))
        ]
    );
}

#[test]
fn raw_newline_in_string_then_resync() {
    assert_eq!(
        parse(b"{\"execute\":\"query-\nversion\"}\n{\"execute\":\"x\"}\n"),
        vec![
            err("JSON parse error, unescaped control character '\\n' in string"),
            ok(json!({"execute": "x"}))
        ]
    );
    // The newline ends the skipped string even when it contains a quote.
    assert_eq!(
        parse(b"{\"a\":\"x\ty\n{\"b\":\"'\"}"),
        vec![
            err("JSON parse error, unescaped control character '\\t' in string"),
            ok(json!({"b": "'"}))
        ]
    );
}

#[test]
fn top_level_errors_resume_immediately() {
    assert_eq!(
        parse(br#"foo {"a":1} ] [2] % "x""#),
        vec![
            err("JSON parse error, invalid keyword 'foo'"),
            ok(json!({"a": 1})),
            err("JSON parse error, expecting value"),
            ok(json!([2])),
            err("JSON parse error, stray '%'"),
            ok(json!("x")),
        ]
    );
}

#[test]
fn in_message_and_pending_bytes() {
    let mut p = StreamParser::default();
    let mut out = Vec::new();
    assert!(!p.in_message());
    p.feed(br#"{"abc": "#, &mut out);
    assert!(p.in_message());
    assert_eq!(p.pending_bytes(), 7);
    p.feed(br#""de"#, &mut out);
    assert_eq!(p.pending_bytes(), 10);
    p.feed(br#""}"#, &mut out);
    assert!(!p.in_message());
    assert_eq!(p.pending_bytes(), 0);
    assert_eq!(out, vec![Ok(json!({"abc": "de"}))]);
    p.feed(br#"{"a" 1, ["#, &mut out);
    assert!(p.in_message());
    assert_eq!(p.pending_bytes(), 0);
    p.reset();
    assert!(!p.in_message());
}

// ---------------------------------------------------------------- splits

/// Inputs, valid and invalid, for the split-equivalence tests.
const CORPUS: &[&[u8]] = &[
    br#"{"execute":"qmp_capabilities"}"#,
    b"{\"execute\": \"blockdev-add\", \"arguments\": {\"node-name\": \"n0\", \"driver\": \"null-co\", \"size\": 1048576, \"read-only\": false, \"x\": [1.5e3, -2, null, true]}, \"id\": 1}\n",
    "{'s': '\u{e9}\u{20ac}\u{1F600}', \"e\": \"\\ud83d\\ude00\\u0041\\n\"}".as_bytes(),
    b"{\"execute\": \"query-version\"\n{\"execute\": \"query-version\", \"id\": 2}\n",
    b"{]{\"execute\":\"x\"}",
    b"{\"a\":1}\x00{\"b\":2}",
    b"[[[1 2]]] 42 -0.5e-3 true nul [1,]\n",
    b"\"\\ud800\" \"a\xC3\x28\" \"\xED\xA0\x80\" {\"a\":1,\"a\":2}\xFF{}",
    b"1.x -{\"a\":1} \xF0\x9F\x98\x80 % 18446744073709551616 '\\'' ",
    b"{\"a\": \"x\ny\"}\n  {\"ok\": 1}",
    b"{\"a\" \"}\\\"\" [ ] \n{\"k\":'v'}",
];

#[test]
fn corpus_split_everywhere_matches_whole() {
    for input in CORPUS {
        let whole = run_chunks(&Limits::default(), &[input]);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(
                run_chunks(&Limits::default(), &[a, b]),
                whole,
                "cut at {cut} of {input:?}"
            );
        }
        assert_eq!(run_bytewise(&Limits::default(), input), whole);
        assert_eq!(run_bytewise(&SMALL, input), run_chunks(&SMALL, &[input]));
    }
}

#[test]
fn corpus_concatenated_is_concatenation() {
    // Every corpus entry ends cleanly, so feeding all of them to one parser
    // gives the concatenation of the individual results... except where an
    // entry ends mid-message; so only check the fully valid ones here.
    let valid = [CORPUS[0], CORPUS[1], CORPUS[2]];
    let mut expected = Vec::new();
    let mut all = Vec::new();
    for v in valid {
        expected.extend(run_chunks(&Limits::default(), &[v]));
        all.extend_from_slice(v);
    }
    assert_eq!(run_chunks(&Limits::default(), &[&all]), expected);
    assert_eq!(expected.len(), 3);
    assert!(expected.iter().all(Result::is_ok));
}

/// Splits `input` at the given (unsorted, possibly out of range) points.
fn split_at_points<'a>(input: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = points.iter().map(|p| p % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for c in cuts {
        chunks.push(&input[start..c]);
        start = c;
    }
    chunks.push(&input[start..]);
    chunks
}

/// Valid QMP commands used as seeds for mutation.
const QMP_SEEDS: &[&str] = &[
    r#"{"execute":"qmp_capabilities"}"#,
    r#"{"execute": "query-block", "id": "abc"}"#,
    r#"{'execute': 'blockdev-add', 'arguments': {'node-name': 'fmt0', 'driver': 'qcow2', 'file': 'proto0', 'cache': {'direct': true}}}"#,
    r#"{"execute":"block-job-cancel","arguments":{"device":"job\u00e9","force":false},"id":[1,2.5,-3e2,null]}"#,
];

/// Strategy: a mutated concatenation of QMP seed commands.
fn mutated_qmp() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(0..QMP_SEEDS.len(), 1..4),
        prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 0..6),
    )
        .prop_map(|(seeds, mutations)| {
            let mut v = Vec::new();
            for s in seeds {
                v.extend_from_slice(QMP_SEEDS[s].as_bytes());
                v.push(b'\n');
            }
            for (idx, op, byte) in mutations {
                let i = idx.index(v.len());
                match op {
                    0 => {
                        v.remove(i);
                    }
                    1 => v.insert(i, byte),
                    2 => v[i] = byte,
                    _ => {
                        let end = (i + usize::from(byte % 16)).min(v.len());
                        let dup = v[i..end].to_vec();
                        v.splice(i..i, dup);
                    }
                }
            }
            v
        })
}

/// Strategy: arbitrary bytes biased toward JSON punctuation.
fn jsonish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]:,\"'\\ \n\tu0123456789-.eEtrfalsn".to_vec()),
    ];
    prop::collection::vec(byte, 0..400)
}

/// Feeds `chunks`, checking the memory bound after each, and returns items.
fn run_checked(limits: &Limits, chunks: &[&[u8]]) -> Vec<Item> {
    let mut p = StreamParser::new(limits.clone());
    let mut out = Vec::new();
    for c in chunks {
        p.feed(c, &mut out);
        assert!(p.pending_bytes() <= limits.max_message_bytes + 8);
    }
    // Every error is one of the documented kinds.
    for item in &out {
        if let Err(e) = item {
            assert!(
                e.desc.starts_with("JSON parse error, ") || e.is_limit(),
                "{e}"
            );
        }
    }
    p.finish(&mut out);
    assert!(!p.in_message());
    out.into_iter().map(|r| r.map_err(|e| e.desc)).collect()
}

/// Strategy: arbitrary JSON values of depth at most 20.
fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(20, 200, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_and_stay_bounded(
        input in jsonish_bytes(),
        points in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let chunks = split_at_points(&input, &points);
        let split = run_checked(&SMALL, &chunks);
        let whole = run_checked(&SMALL, &[&input]);
        prop_assert_eq!(&split, &whole);
        prop_assert_eq!(run_checked(&SMALL, &input.chunks(1).collect::<Vec<_>>()), whole);
    }

    #[test]
    fn mutated_qmp_never_panics_and_splits_agree(
        input in mutated_qmp(),
        points in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let chunks = split_at_points(&input, &points);
        let split = run_checked(&SMALL, &chunks);
        let whole = run_checked(&SMALL, &[&input]);
        prop_assert_eq!(&split, &whole);
        let default_split = run_checked(&Limits::default(), &chunks);
        prop_assert_eq!(default_split, run_checked(&Limits::default(), &[&input]));
    }

    #[test]
    fn unmutated_qmp_parses_like_serde_json(
        seeds in prop::collection::vec(0..QMP_SEEDS.len(), 1..5),
        points in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut input = Vec::new();
        let mut expected = Vec::new();
        for s in seeds {
            let text = QMP_SEEDS[s];
            input.extend_from_slice(text.as_bytes());
            let normalised = text.replace('\'', "\"");
            expected.push(Ok(serde_json::from_str::<Value>(&normalised).unwrap()));
        }
        let chunks = split_at_points(&input, &points);
        prop_assert_eq!(run_checked(&SMALL, &chunks), expected);
    }

    #[test]
    fn serde_json_output_round_trips(
        value in arb_value(),
        pretty in any::<bool>(),
        points in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            serde_json::to_string(&value).unwrap()
        };
        // A trailing space delimits a top-level number.
        let input = format!("{text} ");
        let chunks = split_at_points(input.as_bytes(), &points);
        let items = run_chunks(&Limits::default(), &chunks);
        prop_assert_eq!(items, vec![Ok(value)]);
    }
}

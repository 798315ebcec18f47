//! Argument checking against the schema, worded as QEMU's QObject input
//! visitor words it.
//!
//! Members are visited in schema order, so the first missing or mistyped
//! member (in schema order) is the one reported; members the type does not
//! know are reported after its known members were checked, as QEMU does.
//! Paths are QEMU's "full names": `file.filename`, `actions[0].data.node`.
//! The check returns a normalised copy of the value (unsigned integers given
//! as negative numbers are wrapped, as QEMU still accepts them), ready for
//! typed deserialisation.

use serde_json::{Map, Number, Value};

use super::model::{Builtin, Schema, TypeDef, TypeRef};
use crate::error::QmpError;

/// One step of a path into the input.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// The path of the value being visited.
struct Path<'a> {
    segs: Vec<Seg<'a>>,
}

impl<'a> Path<'a> {
    /// QEMU's full name: `a.b[0].c`.
    fn full(&self) -> String {
        let mut s = String::new();
        for seg in &self.segs {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }

    /// The full name of member `key` of the value at this path.
    fn child(&self, key: &str) -> String {
        let mut s = self.full();
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(key);
        s
    }

    /// The bare member name QEMU uses in some messages (enum values,
    /// integer ranges); a list element has no name, which QEMU prints as
    /// "null".
    fn bare(&self) -> String {
        match self.segs.last() {
            Some(Seg::Key(k)) => k.to_string(),
            Some(Seg::Index(_)) => "null".to_string(),
            None => String::new(),
        }
    }

    fn with<T>(&mut self, seg: Seg<'a>, f: impl FnOnce(&mut Self) -> T) -> T {
        self.segs.push(seg);
        let r = f(self);
        self.segs.pop();
        r
    }
}

impl Schema {
    /// Checks a command's `arguments` (absent means `{}`) against its
    /// argument type and returns the normalised object.
    pub fn check_command_args(
        &self,
        command: &str,
        args: Option<&Map<String, Value>>,
    ) -> Result<Value, QmpError> {
        let cmd = self
            .command(command)
            .ok_or_else(|| QmpError::command_not_found(command))?;
        let empty = Map::new();
        let args = args.unwrap_or(&empty);
        let mut path = Path { segs: vec![] };
        if !cmd.passthrough {
            return self.visit_object(&cmd.args, args, &mut path);
        }
        // "gen": false: check the listed members, pass the others on.
        let listed: Vec<&str> = match &self.types[&cmd.args] {
            TypeDef::Struct(s) => s.members.iter().map(|m| m.name.as_str()).collect(),
            _ => Vec::new(),
        };
        let (known, extra): (Map<String, Value>, Map<String, Value>) = args
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| listed.contains(&k.as_str()));
        let mut out = self.visit_object(&cmd.args, &known, &mut path)?;
        if let Value::Object(m) = &mut out {
            m.extend(extra);
        }
        Ok(out)
    }

    /// Checks a value against a type; used for event data in tests.
    pub fn check_value(&self, ty: &str, v: &Value) -> Result<Value, QmpError> {
        let mut path = Path { segs: vec![] };
        self.visit(&TypeRef::Named(ty.to_string()), v, &mut path)
    }

    fn visit<'a>(
        &self,
        ty: &TypeRef,
        v: &'a Value,
        path: &mut Path<'a>,
    ) -> Result<Value, QmpError> {
        match ty {
            TypeRef::Builtin(b) => visit_builtin(*b, v, path),
            TypeRef::Array(elem) => {
                let Value::Array(items) = v else {
                    return Err(QmpError::invalid_parameter_type(&path.full(), "array"));
                };
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(path.with(Seg::Index(i), |p| self.visit(elem, item, p))?);
                }
                Ok(Value::Array(out))
            }
            TypeRef::Named(name) => match &self.types[name] {
                TypeDef::Enum(e) => {
                    let Value::String(s) = v else {
                        return Err(QmpError::invalid_parameter_type(&path.full(), "string"));
                    };
                    if e.values.iter().any(|x| x == s) {
                        Ok(v.clone())
                    } else {
                        Err(QmpError::bad_enum_value(&path.bare(), s))
                    }
                }
                TypeDef::Alternate(a) => {
                    let branch = a.branches.iter().find(|b| self.accepts_json_type(b, v));
                    match branch {
                        Some(b) => self.visit(b, v, path),
                        None => Err(QmpError::invalid_parameter_type(&path.full(), name)),
                    }
                }
                TypeDef::Struct(_) | TypeDef::Union(_) => {
                    let Value::Object(m) = v else {
                        return Err(QmpError::invalid_parameter_type(&path.full(), "object"));
                    };
                    self.visit_object(name, m, path)
                }
            },
        }
    }

    /// Whether an alternate branch takes a value of this JSON type (QEMU
    /// picks the branch by JSON type alone, then checks the value).
    fn accepts_json_type(&self, ty: &TypeRef, v: &Value) -> bool {
        match (ty, v) {
            (TypeRef::Array(_), Value::Array(_)) => true,
            (TypeRef::Builtin(b), _) => matches!(
                (b, v),
                (Builtin::Str, Value::String(_))
                    | (
                        Builtin::Int(_) | Builtin::Uint(_) | Builtin::Size | Builtin::Number,
                        Value::Number(_)
                    )
                    | (Builtin::Bool, Value::Bool(_))
                    | (Builtin::Null, Value::Null)
                    | (Builtin::Any, _)
            ),
            (TypeRef::Named(n), _) => matches!(
                (&self.types[n], v),
                (TypeDef::Enum(_), Value::String(_))
                    | (TypeDef::Struct(_) | TypeDef::Union(_), Value::Object(_))
            ),
            _ => false,
        }
    }

    fn visit_object<'a>(
        &self,
        name: &str,
        m: &'a Map<String, Value>,
        path: &mut Path<'a>,
    ) -> Result<Value, QmpError> {
        let mut out = Map::new();
        let mut known: Vec<&str> = Vec::new();
        match &self.types[name] {
            TypeDef::Struct(s) => {
                self.visit_members(&s.members, m, path, &mut out, &mut known)?;
            }
            TypeDef::Union(u) => {
                self.visit_members(&u.base, m, path, &mut out, &mut known)?;
                let tag = out
                    .get(&u.discriminator)
                    .and_then(Value::as_str)
                    .expect("discriminator was checked as a required enum member");
                let (_, case) = u
                    .cases
                    .iter()
                    .find(|(c, _)| c == tag)
                    .expect("every enum value has a case");
                let TypeDef::Struct(s) = &self.types[case] else {
                    unreachable!("union cases are structs")
                };
                self.visit_members(&s.members, m, path, &mut out, &mut known)?;
            }
            _ => unreachable!("visit_object on a non-object type"),
        }
        if let Some(extra) = m.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(QmpError::unexpected_parameter(&path.child(extra)));
        }
        Ok(Value::Object(out))
    }

    fn visit_members<'a, 's>(
        &'s self,
        members: &'s [super::model::Member],
        m: &'a Map<String, Value>,
        path: &mut Path<'a>,
        out: &mut Map<String, Value>,
        known: &mut Vec<&'s str>,
    ) -> Result<(), QmpError> {
        for mem in members {
            known.push(&mem.name);
            match m.get_key_value(mem.name.as_str()) {
                Some((k, v)) => {
                    let nv = path.with(Seg::Key(k.as_str()), |p| self.visit(&mem.ty, v, p))?;
                    out.insert(mem.name.clone(), nv);
                }
                None if mem.optional => {}
                None => {
                    return Err(QmpError::missing_parameter(&path.child(&mem.name)));
                }
            }
        }
        Ok(())
    }
}

fn visit_builtin(b: Builtin, v: &Value, path: &Path<'_>) -> Result<Value, QmpError> {
    match b {
        Builtin::Any => Ok(v.clone()),
        Builtin::Str => match v {
            Value::String(_) => Ok(v.clone()),
            _ => Err(QmpError::invalid_parameter_type(&path.full(), "string")),
        },
        Builtin::Bool => match v {
            Value::Bool(_) => Ok(v.clone()),
            _ => Err(QmpError::invalid_parameter_type(&path.full(), "boolean")),
        },
        Builtin::Null => match v {
            Value::Null => Ok(v.clone()),
            _ => Err(QmpError::invalid_parameter_type(&path.full(), "null")),
        },
        Builtin::Number => match v {
            Value::Number(_) => Ok(v.clone()),
            _ => Err(QmpError::invalid_parameter_type(&path.full(), "number")),
        },
        Builtin::Int(bits) => {
            let n = match v {
                Value::Number(n) => n.as_i64(),
                _ => None,
            }
            .ok_or_else(|| QmpError::invalid_parameter_type(&path.full(), "integer"))?;
            if bits < 64 {
                let max = (1i64 << (bits - 1)) - 1;
                if n < -max - 1 || n > max {
                    return Err(QmpError::invalid_parameter_value(
                        &path.bare(),
                        &format!("int{bits}_t"),
                    ));
                }
            }
            Ok(Value::Number(n.into()))
        }
        Builtin::Uint(_) | Builtin::Size => {
            // QEMU accepts a negative number for an unsigned member and
            // wraps it (kept "for backward compatibility"); so does blockd.
            // Range and meaning are the handler's to check.
            let n = match v {
                Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
                _ => None,
            }
            .ok_or_else(|| QmpError::invalid_parameter_value(&path.full(), "uint64"))?;
            if let Builtin::Uint(bits) = b {
                if bits < 64 && n >= (1u64 << bits) {
                    return Err(QmpError::invalid_parameter_value(
                        &path.bare(),
                        &format!("uint{bits}_t"),
                    ));
                }
            }
            Ok(Value::Number(Number::from(n)))
        }
    }
}

impl Schema {
    /// Converts a command's arguments given in QEMU's `key=value` command
    /// line form (every scalar a string, lists as objects with keys `0`,
    /// `1`, ...) to the JSON types the schema expects, as QEMU's keyval
    /// input visitor does: `on`/`off` (and `yes`/`no`, `true`/`false`) for
    /// booleans, decimal or `0x` numbers (with `k`/`M`/`G`/`T` suffixes
    /// for sizes). What cannot be converted is left for the normal check
    /// to report.
    pub fn coerce_keyval(&self, command: &str, args: Value) -> Value {
        match self.command(command) {
            Some(cmd) => {
                let ty = TypeRef::Named(cmd.args.clone());
                self.coerce(&ty, args)
            }
            None => args,
        }
    }

    /// [`Schema::coerce_keyval`] for a named type instead of a command.
    pub fn coerce_keyval_type(&self, ty: &str, v: Value) -> Value {
        if self.types.contains_key(ty) {
            self.coerce(&TypeRef::Named(ty.to_string()), v)
        } else {
            v
        }
    }

    fn coerce(&self, ty: &TypeRef, v: Value) -> Value {
        match ty {
            TypeRef::Builtin(b) => match (b, &v) {
                (Builtin::Bool, Value::String(s)) => match s.as_str() {
                    "on" | "yes" | "true" | "y" => Value::Bool(true),
                    "off" | "no" | "false" | "n" => Value::Bool(false),
                    _ => v,
                },
                (Builtin::Int(_), Value::String(s)) => {
                    parse_int(s).map(|n| Value::from(n as i64)).unwrap_or(v)
                }
                (Builtin::Uint(_), Value::String(s)) => parse_int(s).map(Value::from).unwrap_or(v),
                (Builtin::Size, Value::String(s)) => parse_size(s).map(Value::from).unwrap_or(v),
                (Builtin::Number, Value::String(s)) => s
                    .parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(v),
                _ => v,
            },
            TypeRef::Array(elem) => match v {
                Value::Object(m) => {
                    let mut items: Vec<(usize, Value)> = Vec::new();
                    for (k, x) in m.iter() {
                        match k.parse::<usize>() {
                            Ok(i) => items.push((i, x.clone())),
                            Err(_) => return Value::Object(m),
                        }
                    }
                    items.sort_by_key(|(i, _)| *i);
                    if items.iter().enumerate().any(|(n, (i, _))| n != *i) {
                        return Value::Object(m);
                    }
                    Value::Array(
                        items
                            .into_iter()
                            .map(|(_, x)| self.coerce(elem, x))
                            .collect(),
                    )
                }
                Value::Array(a) => {
                    Value::Array(a.into_iter().map(|x| self.coerce(elem, x)).collect())
                }
                other => other,
            },
            TypeRef::Named(n) => match (&self.types[n], v) {
                (TypeDef::Struct(s), Value::Object(m)) => {
                    Value::Object(self.coerce_members(&s.members, m))
                }
                (TypeDef::Union(u), Value::Object(m)) => {
                    let mut m = self.coerce_members(&u.base, m);
                    let case = m
                        .get(&u.discriminator)
                        .and_then(Value::as_str)
                        .and_then(|tag| u.cases.iter().find(|(c, _)| c == tag))
                        .map(|(_, st)| st.clone());
                    if let Some(st) = case {
                        if let TypeDef::Struct(s) = &self.types[&st] {
                            m = self.coerce_members(&s.members, m);
                        }
                    }
                    Value::Object(m)
                }
                (TypeDef::Alternate(a), v) => {
                    // An object picks the object branch; a string stays a string
                    // (a reference) unless only scalar branches exist.
                    let branch = a.branches.iter().find(|b| self.accepts_json_type(b, &v));
                    match branch {
                        Some(b) => self.coerce(b, v),
                        None => match a.branches.first() {
                            Some(b) => self.coerce(b, v),
                            None => v,
                        },
                    }
                }
                (_, v) => v,
            },
        }
    }

    fn coerce_members(
        &self,
        members: &[super::model::Member],
        mut m: Map<String, Value>,
    ) -> Map<String, Value> {
        for mem in members {
            if let Some(v) = m.remove(&mem.name) {
                let nv = self.coerce(&mem.ty, v);
                m.insert(mem.name.clone(), nv);
            }
        }
        m
    }
}

fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    if let Some(neg) = s.strip_prefix('-') {
        return neg.parse::<i64>().ok().map(|n| (-n) as u64);
    }
    s.parse().ok()
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if mult == 1 {
        return parse_int(num);
    }
    let f: f64 = num.parse().ok()?;
    if !(0.0..=(u64::MAX as f64) / mult as f64).contains(&f) {
        return None;
    }
    Some((f * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        let text = r#"[
          {"enum": "Drv", "doc": "d", "data": ["a", "b"]},
          {"struct": "A", "doc": "d", "data": {"size": "size", "flag": "bool", "*n": "int8", "*u": "uint32", "*list": ["int"]}},
          {"struct": "B", "doc": "d", "data": {"child": "Ref"}},
          {"alternate": "Ref", "doc": "d", "data": {"definition": "Opts", "reference": "str"}},
          {"union": "Opts", "doc": "d", "base": {"driver": "Drv", "*name": "str"}, "discriminator": "driver", "data": {"a": "A", "b": "B"}},
          {"command": "add", "doc": "d", "data": "Opts"},
          {"command": "plain", "doc": "d", "data": {"x": "int", "*e": "Drv", "*items": ["Drv"]}}
        ]"#;
        Schema::load(&[("t.json", text)]).unwrap()
    }

    fn err(s: &Schema, cmd: &str, v: Value) -> String {
        s.check_command_args(cmd, v.as_object()).unwrap_err().desc
    }

    #[test]
    fn gen_false_passes_unlisted_members_through() {
        let text = r#"[
          {"command": "dev", "doc": "d", "gen": false, "data": {"driver": "str", "*id": "str"}}
        ]"#;
        let s = Schema::load(&[("t.json", text)]).unwrap();
        assert_eq!(
            err(&s, "dev", json!({"x": 1})),
            "Parameter 'driver' is missing"
        );
        assert_eq!(
            err(&s, "dev", json!({"driver": 1})),
            "Invalid parameter type for 'driver', expected: string"
        );
        let v = s
            .check_command_args(
                "dev",
                json!({"driver": "d", "x": [1], "y": "z"}).as_object(),
            )
            .unwrap();
        assert_eq!(v, json!({"driver": "d", "x": [1], "y": "z"}));
        let bad = r#"[{"command": "c", "doc": "d", "gen": true}]"#;
        assert!(Schema::load(&[("t.json", bad)]).is_err());
    }

    #[test]
    fn qemu_wording_and_paths() {
        let s = schema();
        assert_eq!(err(&s, "plain", json!({})), "Parameter 'x' is missing");
        assert_eq!(
            err(&s, "plain", json!({"x": "1"})),
            "Invalid parameter type for 'x', expected: integer"
        );
        assert_eq!(
            err(&s, "plain", json!({"x": 1, "y": 2})),
            "Parameter 'y' is unexpected"
        );
        assert_eq!(
            err(&s, "plain", json!({"x": 1, "e": "zz"})),
            "Parameter 'e' does not accept value 'zz'"
        );
        assert_eq!(
            err(&s, "plain", json!({"x": 1, "items": ["a", "q"]})),
            "Parameter 'null' does not accept value 'q'"
        );
        assert_eq!(
            err(
                &s,
                "add",
                json!({"driver": "b", "child": {"driver": "a", "size": 1}})
            ),
            "Parameter 'child.flag' is missing"
        );
        assert_eq!(
            err(&s, "add", json!({"driver": "b", "child": 5})),
            "Invalid parameter type for 'child', expected: Ref"
        );
        assert_eq!(
            err(&s, "add", json!({"driver": "a", "size": "x", "flag": true})),
            "Parameter 'size' expects uint64"
        );
        assert_eq!(
            err(
                &s,
                "add",
                json!({"driver": "a", "size": 1, "flag": true, "n": 200})
            ),
            "Parameter 'n' expects int8_t"
        );
        assert_eq!(
            err(
                &s,
                "add",
                json!({"driver": "a", "size": 1, "flag": true, "u": -1})
            ),
            "Parameter 'u' expects uint32_t"
        );
        assert_eq!(
            err(
                &s,
                "add",
                json!({"driver": "a", "size": 1, "flag": true, "list": [1, "x"]})
            ),
            "Invalid parameter type for 'list[1]', expected: integer"
        );
        // Missing members are reported before unexpected ones.
        assert_eq!(
            err(&s, "plain", json!({"y": 1})),
            "Parameter 'x' is missing"
        );
    }

    #[test]
    fn negative_unsigned_wraps_like_qemu() {
        let s = schema();
        let v = s
            .check_command_args(
                "add",
                json!({"driver": "a", "size": -1, "flag": false}).as_object(),
            )
            .unwrap();
        assert_eq!(v["size"], json!(u64::MAX));
    }

    #[test]
    fn keyval_strings_become_typed() {
        let s = schema();
        let args = json!({"driver": "b", "child": {"driver": "a", "size": "1M", "flag": "on",
                          "n": "-3", "list": {"0": "1", "1": "0x10"}}});
        let v = s.coerce_keyval("add", args);
        assert_eq!(
            v,
            json!({"driver": "b", "child": {"driver": "a", "size": 1048576, "flag": true,
                    "n": -3, "list": [1, 16]}})
        );
        assert!(s.check_command_args("add", v.as_object()).is_ok());
        // A reference stays a string.
        let v = s.coerce_keyval("add", json!({"driver": "b", "child": "node0"}));
        assert_eq!(v["child"], "node0");
    }
}

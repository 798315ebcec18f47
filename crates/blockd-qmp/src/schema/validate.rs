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
//!
//! Options given in QEMU's `key=value` syntax ([`Schema::check_value_keyval`],
//! [`Schema::check_command_args_keyval`]) are checked in keyval mode, as
//! QEMU's keyval input visitor does: every scalar arrives as a string and
//! is read by the type the schema expects, when the visit reaches it
//! (`blockd_optval::keyval`: `Parameter 'size' expects integer`, `...
//! expects size`, `... expects 'on' or 'off'`), and an object where a
//! scalar belongs is `Parameters 'x.*' are unexpected`.

use blockd_optval::keyval;
use serde_json::{Map, Number, Value};

use super::model::{Builtin, Schema, TypeDef, TypeRef};
use crate::error::QmpError;

/// One step of a path into the input.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// The path of the value being visited, and how scalars are read.
struct Path<'a> {
    segs: Vec<Seg<'a>>,
    /// Keyval mode: scalars are strings to be read by their type.
    keyval: bool,
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
        let empty = Map::new();
        self.check_command(command, args.unwrap_or(&empty), false)
    }

    /// [`Schema::check_command_args`] for arguments given in QEMU's
    /// `key=value` syntax (keyval mode: every scalar a string).
    pub fn check_command_args_keyval(
        &self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        self.check_command(command, args, true)
    }

    fn check_command(
        &self,
        command: &str,
        args: &Map<String, Value>,
        keyval: bool,
    ) -> Result<Value, QmpError> {
        let cmd = self
            .command(command)
            .ok_or_else(|| QmpError::command_not_found(command))?;
        let mut path = Path {
            segs: vec![],
            keyval,
        };
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

    /// Checks a value against a type (event data, options of implicit
    /// nodes, `--nbd-server`).
    pub fn check_value(&self, ty: &str, v: &Value) -> Result<Value, QmpError> {
        let mut path = Path {
            segs: vec![],
            keyval: false,
        };
        self.visit(&TypeRef::Named(ty.to_string()), v, &mut path)
    }

    /// [`Schema::check_value`] in keyval mode (options given as
    /// `key=value`: every scalar a string).
    pub fn check_value_keyval(&self, ty: &str, v: &Value) -> Result<Value, QmpError> {
        let mut path = Path {
            segs: vec![],
            keyval: true,
        };
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
                    keyval_scalar_slot(v, path)?;
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

/// Keyval mode: an object or a list where a scalar belongs (`size.x=1`
/// for an integer `size`) is QEMU's "Parameters 'size.*' are unexpected".
fn keyval_scalar_slot(v: &Value, path: &Path<'_>) -> Result<(), QmpError> {
    if path.keyval && (v.is_object() || v.is_array()) {
        return Err(QmpError::generic(format!(
            "Parameters '{}.*' are unexpected",
            path.full()
        )));
    }
    Ok(())
}

/// Keyval mode: reads the string `s` as the builtin type `b` wants it, as
/// QEMU's `qobject_input_type_*_keyval` do. Range checks of the narrower
/// integer types are left to the JSON check that follows.
fn keyval_scalar(b: Builtin, s: &str, path: &Path<'_>) -> Result<Option<Value>, QmpError> {
    let name = path.full();
    let v = match b {
        Builtin::Bool => Value::Bool(keyval::boolean(&name, s).map_err(QmpError::generic)?),
        Builtin::Int(_) => Value::from(keyval::int(&name, s).map_err(QmpError::generic)?),
        Builtin::Uint(_) => Value::from(keyval::uint(&name, s).map_err(QmpError::generic)?),
        Builtin::Size => Value::from(keyval::size(&name, s).map_err(QmpError::generic)?),
        Builtin::Number => {
            let f = keyval::number(&name, s).map_err(QmpError::generic)?;
            Value::Number(
                Number::from_f64(f)
                    .ok_or_else(|| QmpError::invalid_parameter_type(&name, "number"))?,
            )
        }
        Builtin::Str | Builtin::Any | Builtin::Null => return Ok(None),
    };
    Ok(Some(v))
}

fn visit_builtin(b: Builtin, v: &Value, path: &Path<'_>) -> Result<Value, QmpError> {
    let converted;
    let v = match v {
        Value::String(s) if path.keyval => match keyval_scalar(b, s, path)? {
            Some(typed) => {
                converted = typed;
                &converted
            }
            None => v,
        },
        _ => {
            if b != Builtin::Any {
                keyval_scalar_slot(v, path)?;
            }
            v
        }
    };
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
                          "n": "-3", "list": ["1", "0x10"]}});
        let v = s
            .check_command_args_keyval("add", args.as_object().unwrap())
            .unwrap();
        assert_eq!(
            v,
            json!({"driver": "b", "child": {"driver": "a", "size": 1048576, "flag": true,
                    "n": -3, "list": [1, 16]}})
        );
        // A reference stays a string.
        let v = s
            .check_command_args_keyval(
                "add",
                json!({"driver": "b", "child": "node0"})
                    .as_object()
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(v["child"], "node0");
        assert_eq!(
            s.check_value_keyval("Opts", &json!({"driver": "a", "size": "1.5k", "flag": "y"}))
                .unwrap(),
            json!({"driver": "a", "size": 1536, "flag": true})
        );
    }

    #[test]
    fn keyval_errors_are_qemus() {
        let s = schema();
        let err = |v: Value| s.check_value_keyval("Opts", &v).unwrap_err().desc;
        // qemu-storage-daemon 10.0.2 answers these (for --blockdev null-co's
        // int 'size', --object's size 'size', 'read-only', 'size.x=1').
        assert_eq!(
            err(json!({"driver": "a", "size": "1e3", "flag": "on"})),
            "Parameter 'size' expects size"
        );
        assert_eq!(
            err(json!({"driver": "a", "size": "1", "flag": "maybe"})),
            "Parameter 'flag' expects 'on' or 'off'"
        );
        assert_eq!(
            err(json!({"driver": "a", "size": "1", "flag": "on", "n": "1.5k"})),
            "Parameter 'n' expects integer"
        );
        assert_eq!(
            err(json!({"driver": "a", "size": "1", "flag": "on", "n": "200"})),
            "Parameter 'n' expects int8_t"
        );
        assert_eq!(
            err(json!({"driver": "a", "size": "1", "flag": "on", "u": "-1"})),
            "Parameter 'u' expects uint32_t"
        );
        assert_eq!(
            err(json!({"driver": "a", "size": {"x": "1"}, "flag": "on"})),
            "Parameters 'size.*' are unexpected"
        );
        assert_eq!(
            err(json!({"driver": "b", "child": {"driver": "a", "size": "x", "flag": "on"}})),
            "Parameter 'child.size' expects size"
        );
        // Errors come in visit order: a missing member before a bad one
        // that follows it in the schema.
        assert_eq!(
            err(json!({"driver": "a", "flag": "x"})),
            "Parameter 'size' is missing"
        );
        assert_eq!(
            err(json!({"driver": "a", "size": "x", "bogus": "1"})),
            "Parameter 'size' expects size"
        );
        assert_eq!(
            err(json!({"driver": {"x": "y"}})),
            "Parameters 'driver.*' are unexpected"
        );
    }
}

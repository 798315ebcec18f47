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
        self.visit_object(&cmd.args, args, &mut path)
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

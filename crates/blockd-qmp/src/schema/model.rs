//! The schema model: definitions read from `schema/*.json`, resolved and checked.
//!
//! The file format is a QAPI-like JSON written for blockd. Each file is a JSON
//! array of definitions; each definition is an object with exactly one of the
//! keys `command`, `event`, `struct`, `enum`, `union` or `alternate` naming it,
//! plus:
//!
//! | key | used by | meaning |
//! | --- | --- | --- |
//! | `doc` | all | what it is (required) |
//! | `data` | all | members (`{"name": TYPE, "*optional": TYPE}`), enum values (`["a", "b"]`), union cases (`{"case": "StructName"}`), alternate branches (`{"branch": TYPE}`); for a command also the name of a struct or union used as the whole argument object |
//! | `base` | struct, union | a struct name, or (union only) inline members |
//! | `discriminator` | union | the base member (an enum) whose value picks the case |
//! | `returns` | command | the return type (absent: an empty object) |
//! | `features` | all, and members | feature names shown by introspection |
//! | `allow-oob` | command | may run out of band |
//! | `gen` | command | `false`: the listed members are checked, others are passed to the handler unchecked (QEMU's `'gen': false`, for `device_add`'s device properties) |
//!
//! A TYPE is a builtin (`str`, `int`, `int8`..`int64`, `uint8`..`uint64`,
//! `size`, `number`, `bool`, `null`, `any`), a defined type's name, `[TYPE]` for
//! an array, or `{"type": TYPE, "features": [...]}`.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

/// Builtin scalar types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    /// A JSON string.
    Str,
    /// A signed integer of the given bit width (64 for `int`).
    Int(u8),
    /// An unsigned integer of the given bit width.
    Uint(u8),
    /// An unsigned 64-bit byte count (`size`).
    Size,
    /// Any JSON number.
    Number,
    /// A JSON boolean.
    Bool,
    /// JSON null.
    Null,
    /// Any JSON value.
    Any,
}

impl Builtin {
    fn parse(name: &str) -> Option<Builtin> {
        Some(match name {
            "str" => Builtin::Str,
            "int" | "int64" => Builtin::Int(64),
            "int8" => Builtin::Int(8),
            "int16" => Builtin::Int(16),
            "int32" => Builtin::Int(32),
            "uint8" => Builtin::Uint(8),
            "uint16" => Builtin::Uint(16),
            "uint32" => Builtin::Uint(32),
            "uint64" => Builtin::Uint(64),
            "size" => Builtin::Size,
            "number" => Builtin::Number,
            "bool" => Builtin::Bool,
            "null" => Builtin::Null,
            "any" => Builtin::Any,
            _ => return None,
        })
    }

    /// The builtin's name in introspection (all integer types are `int`).
    pub fn introspect_name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Int(_) | Builtin::Uint(_) | Builtin::Size => "int",
            Builtin::Number => "number",
            Builtin::Bool => "bool",
            Builtin::Null => "null",
            Builtin::Any => "any",
        }
    }

    /// The `json-type` of the builtin in introspection.
    pub fn json_type(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int(_) | Builtin::Uint(_) | Builtin::Size => "int",
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "value",
        }
    }
}

/// A reference to a type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TypeRef {
    /// A builtin scalar.
    Builtin(Builtin),
    /// A defined (or implicit) type, by name.
    Named(String),
    /// An array of elements of a type.
    Array(Box<TypeRef>),
}

/// A member of a struct, union base, command argument or event.
#[derive(Debug, Clone)]
pub struct Member {
    /// Wire name.
    pub name: String,
    /// Its type.
    pub ty: TypeRef,
    /// Whether it may be absent.
    pub optional: bool,
    /// Features shown by introspection.
    pub features: Vec<String>,
}

/// A struct: an object with a fixed set of members (base members first).
#[derive(Debug, Clone)]
pub struct StructDef {
    /// All members, base members flattened in front.
    pub members: Vec<Member>,
    /// Features of the type.
    pub features: Vec<String>,
}

/// An enum and its values.
#[derive(Debug, Clone)]
pub struct EnumDef {
    /// The values, in order.
    pub values: Vec<String>,
    /// Features of each value (parallel to `values`).
    pub value_features: Vec<Vec<String>>,
    /// Features of the type.
    pub features: Vec<String>,
}

/// A flat union: base members plus the members of the case the discriminator picks.
#[derive(Debug, Clone)]
pub struct UnionDef {
    /// Members common to every case.
    pub base: Vec<Member>,
    /// Name of the base member (an enum) that picks the case.
    pub discriminator: String,
    /// The enum type of the discriminator.
    pub tag_enum: String,
    /// Every enum value with the struct that holds its extra members
    /// (`q_empty` for values without one).
    pub cases: Vec<(String, String)>,
    /// Features of the type.
    pub features: Vec<String>,
}

/// An alternate: one of several types, chosen by the JSON type of the value.
#[derive(Debug, Clone)]
pub struct AlternateDef {
    /// The branches, in order.
    pub branches: Vec<TypeRef>,
    /// Features of the type.
    pub features: Vec<String>,
}

/// A defined type.
#[derive(Debug, Clone)]
pub enum TypeDef {
    /// See [`StructDef`].
    Struct(StructDef),
    /// See [`EnumDef`].
    Enum(EnumDef),
    /// See [`UnionDef`].
    Union(UnionDef),
    /// See [`AlternateDef`].
    Alternate(AlternateDef),
}

/// A command.
#[derive(Debug, Clone)]
pub struct CommandDef {
    /// Wire name.
    pub name: String,
    /// The argument type (a struct or union; `q_empty` if there are none).
    pub args: String,
    /// The return type (`q_empty` if the command returns an empty object).
    pub ret: TypeRef,
    /// Whether the command may run out of band.
    pub allow_oob: bool,
    /// Whether members the argument type does not list are passed through
    /// unchecked (`"gen": false`).
    pub passthrough: bool,
    /// Features shown by introspection.
    pub features: Vec<String>,
}

/// An event.
#[derive(Debug, Clone)]
pub struct EventDef {
    /// Wire name.
    pub name: String,
    /// Type of its `data` (`q_empty` if it has none).
    pub data: String,
    /// Features shown by introspection.
    pub features: Vec<String>,
}

/// One schema entity in definition order (for introspection).
#[derive(Debug, Clone)]
pub enum Entity {
    /// A command, by index into [`Schema::commands`].
    Command(usize),
    /// An event, by index into [`Schema::events`].
    Event(usize),
}

/// The whole schema, resolved.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub(crate) types: HashMap<String, TypeDef>,
    pub(crate) commands: Vec<CommandDef>,
    pub(crate) events: Vec<EventDef>,
    pub(crate) order: Vec<Entity>,
    command_index: HashMap<String, usize>,
    event_index: HashMap<String, usize>,
}

/// The name of the implicit empty object type.
pub const EMPTY: &str = "q_empty";

/// A raw definition before resolution.
struct RawDef {
    kind: &'static str,
    name: String,
    body: Map<String, Value>,
    file: String,
}

impl Schema {
    /// Parses and resolves schema files given as `(file name, JSON text)`.
    ///
    /// Every error names the file and the definition; a schema that loads has
    /// every type reference resolved and every union well formed.
    pub fn load(files: &[(&str, &str)]) -> Result<Schema, String> {
        let mut raws = Vec::new();
        for (file, text) in files {
            let v: Value =
                serde_json::from_str(text).map_err(|e| format!("{file}: invalid JSON: {e}"))?;
            let Value::Array(defs) = v else {
                return Err(format!("{file}: must be a JSON array of definitions"));
            };
            for def in defs {
                raws.push(parse_raw(file, def)?);
            }
        }
        let mut schema = Schema::default();
        schema.types.insert(
            EMPTY.to_string(),
            TypeDef::Struct(StructDef {
                members: vec![],
                features: vec![],
            }),
        );
        // Names first, so forward references work.
        let mut seen = HashSet::new();
        for r in &raws {
            if !seen.insert((r.kind == "command" || r.kind == "event", r.name.clone())) {
                return Err(format!("{}: '{}' is defined twice", r.file, r.name));
            }
        }
        let declared: HashMap<String, &'static str> = raws
            .iter()
            .filter(|r| r.kind != "command" && r.kind != "event")
            .map(|r| (r.name.clone(), r.kind))
            .collect();
        let mut r = Resolver {
            declared: &declared,
            raws: &raws,
            done: HashMap::new(),
            visiting: HashSet::new(),
        };
        for raw in &raws {
            let ctx = format!("{}: {} '{}'", raw.file, raw.kind, raw.name);
            match raw.kind {
                "command" => {
                    let args = match raw.body.get("data") {
                        None => EMPTY.to_string(),
                        Some(Value::String(t)) => {
                            match declared.get(t) {
                                Some(&"struct") | Some(&"union") => {}
                                _ => {
                                    return Err(format!(
                                        "{ctx}: data '{t}' is not a struct or union"
                                    ))
                                }
                            }
                            t.clone()
                        }
                        Some(Value::Object(m)) => {
                            let name = format!("q_obj_{}-arg", raw.name);
                            let members = r.members(m, &ctx)?;
                            r.done.insert(
                                name.clone(),
                                TypeDef::Struct(StructDef {
                                    members,
                                    features: vec![],
                                }),
                            );
                            name
                        }
                        Some(_) => return Err(format!("{ctx}: bad 'data'")),
                    };
                    let ret = match raw.body.get("returns") {
                        None => TypeRef::Named(EMPTY.to_string()),
                        Some(v) => r.type_ref(v, &ctx)?,
                    };
                    let allow_oob = raw
                        .body
                        .get("allow-oob")
                        .map(|v| v.as_bool().ok_or(format!("{ctx}: bad 'allow-oob'")))
                        .transpose()?
                        .unwrap_or(false);
                    let passthrough = match raw.body.get("gen") {
                        None => false,
                        Some(Value::Bool(false)) => true,
                        Some(_) => return Err(format!("{ctx}: 'gen' must be false if present")),
                    };
                    schema
                        .command_index
                        .insert(raw.name.clone(), schema.commands.len());
                    schema.order.push(Entity::Command(schema.commands.len()));
                    schema.commands.push(CommandDef {
                        name: raw.name.clone(),
                        args,
                        ret,
                        allow_oob,
                        passthrough,
                        features: features(&raw.body, &ctx)?,
                    });
                }
                "event" => {
                    let data = match raw.body.get("data") {
                        None => EMPTY.to_string(),
                        Some(Value::Object(m)) => {
                            let name = format!("q_obj_{}-arg", raw.name);
                            let members = r.members(m, &ctx)?;
                            r.done.insert(
                                name.clone(),
                                TypeDef::Struct(StructDef {
                                    members,
                                    features: vec![],
                                }),
                            );
                            name
                        }
                        Some(_) => return Err(format!("{ctx}: bad 'data'")),
                    };
                    schema
                        .event_index
                        .insert(raw.name.clone(), schema.events.len());
                    schema.order.push(Entity::Event(schema.events.len()));
                    schema.events.push(EventDef {
                        name: raw.name.clone(),
                        data,
                        features: features(&raw.body, &ctx)?,
                    });
                }
                _ => {
                    r.resolve(&raw.name)?;
                }
            }
        }
        let done = std::mem::take(&mut r.done);
        schema.types.extend(done);
        Ok(schema)
    }

    /// The command named `name`.
    pub fn command(&self, name: &str) -> Option<&CommandDef> {
        self.command_index.get(name).map(|&i| &self.commands[i])
    }

    /// The event named `name`.
    pub fn event(&self, name: &str) -> Option<&EventDef> {
        self.event_index.get(name).map(|&i| &self.events[i])
    }

    /// All commands, in definition order.
    pub fn commands(&self) -> &[CommandDef] {
        &self.commands
    }

    /// All events, in definition order.
    pub fn events(&self) -> &[EventDef] {
        &self.events
    }

    /// The defined type named `name`.
    pub fn type_def(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }
}

fn parse_raw(file: &str, def: Value) -> Result<RawDef, String> {
    let Value::Object(mut body) = def else {
        return Err(format!("{file}: a definition must be an object"));
    };
    const KINDS: [&str; 6] = ["command", "event", "struct", "enum", "union", "alternate"];
    let kinds: Vec<&'static str> = KINDS
        .iter()
        .copied()
        .filter(|k| body.contains_key(*k))
        .collect();
    let [kind] = kinds[..] else {
        return Err(format!(
            "{file}: a definition needs exactly one of {KINDS:?}: {}",
            Value::Object(body)
        ));
    };
    let Some(Value::String(name)) = body.remove(kind) else {
        return Err(format!("{file}: the {kind} name must be a string"));
    };
    let allowed: &[&str] = match kind {
        "command" => &["doc", "data", "returns", "features", "allow-oob", "gen"],
        "event" => &["doc", "data", "features"],
        "struct" => &["doc", "data", "base", "features"],
        "enum" => &["doc", "data", "features"],
        "union" => &["doc", "data", "base", "discriminator", "features"],
        _ => &["doc", "data", "features"],
    };
    for key in body.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!("{file}: {kind} '{name}': unknown key '{key}'"));
        }
    }
    match body.get("doc") {
        Some(Value::String(d)) if !d.trim().is_empty() => {}
        _ => return Err(format!("{file}: {kind} '{name}' has no 'doc'")),
    }
    Ok(RawDef {
        kind,
        name,
        body,
        file: file.to_string(),
    })
}

fn features(body: &Map<String, Value>, ctx: &str) -> Result<Vec<String>, String> {
    match body.get("features") {
        None => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|f| {
                f.as_str()
                    .map(str::to_string)
                    .ok_or(format!("{ctx}: a feature must be a string"))
            })
            .collect(),
        Some(_) => Err(format!("{ctx}: 'features' must be an array")),
    }
}

struct Resolver<'a> {
    declared: &'a HashMap<String, &'static str>,
    raws: &'a [RawDef],
    done: HashMap<String, TypeDef>,
    visiting: HashSet<String>,
}

impl Resolver<'_> {
    fn type_ref(&self, v: &Value, ctx: &str) -> Result<TypeRef, String> {
        match v {
            Value::String(s) => {
                if let Some(b) = Builtin::parse(s) {
                    Ok(TypeRef::Builtin(b))
                } else if self.declared.contains_key(s) {
                    Ok(TypeRef::Named(s.clone()))
                } else {
                    Err(format!("{ctx}: unknown type '{s}'"))
                }
            }
            Value::Array(a) if a.len() == 1 => {
                Ok(TypeRef::Array(Box::new(self.type_ref(&a[0], ctx)?)))
            }
            _ => Err(format!("{ctx}: bad type {v}")),
        }
    }

    fn members(&self, m: &Map<String, Value>, ctx: &str) -> Result<Vec<Member>, String> {
        let mut out: Vec<Member> = Vec::new();
        for (key, spec) in m {
            let (name, optional) = match key.strip_prefix('*') {
                Some(n) => (n.to_string(), true),
                None => (key.clone(), false),
            };
            let (ty, feats) = match spec {
                Value::Object(o) => {
                    for k in o.keys() {
                        if k != "type" && k != "features" {
                            return Err(format!("{ctx}: member '{name}': unknown key '{k}'"));
                        }
                    }
                    let t = o
                        .get("type")
                        .ok_or(format!("{ctx}: member '{name}' has no type"))?;
                    (self.type_ref(t, ctx)?, features(o, ctx)?)
                }
                other => (self.type_ref(other, ctx)?, vec![]),
            };
            if out.iter().any(|x| x.name == name) {
                return Err(format!("{ctx}: member '{name}' appears twice"));
            }
            out.push(Member {
                name,
                ty,
                optional,
                features: feats,
            });
        }
        Ok(out)
    }

    fn raw(&self, name: &str) -> &RawDef {
        self.raws
            .iter()
            .find(|r| r.name == name && r.kind != "command" && r.kind != "event")
            .expect("declared type has a definition")
    }

    /// Struct members including the base's, for use as a base or union case.
    fn struct_members(&mut self, name: &str, ctx: &str) -> Result<Vec<Member>, String> {
        match self.resolve(name)? {
            TypeDef::Struct(s) => Ok(s.members.clone()),
            _ => Err(format!("{ctx}: '{name}' is not a struct")),
        }
    }

    fn resolve(&mut self, name: &str) -> Result<&TypeDef, String> {
        if !self.done.contains_key(name) {
            let raw = self.raw(name);
            let ctx = format!("{}: {} '{}'", raw.file, raw.kind, raw.name);
            let body = raw.body.clone();
            let kind = raw.kind;
            if !self.visiting.insert(name.to_string()) {
                return Err(format!("{ctx}: defined in terms of itself"));
            }
            let feats = features(&body, &ctx)?;
            let def = match kind {
                "struct" => {
                    let mut members = match body.get("base") {
                        None => vec![],
                        Some(Value::String(b)) => self.struct_members(b, &ctx)?,
                        Some(_) => return Err(format!("{ctx}: 'base' must name a struct")),
                    };
                    let own = match body.get("data") {
                        None => vec![],
                        Some(Value::Object(m)) => self.members(m, &ctx)?,
                        Some(_) => return Err(format!("{ctx}: 'data' must be an object")),
                    };
                    for m in own {
                        if members.iter().any(|x| x.name == m.name) {
                            return Err(format!(
                                "{ctx}: member '{}' clashes with the base",
                                m.name
                            ));
                        }
                        members.push(m);
                    }
                    TypeDef::Struct(StructDef {
                        members,
                        features: feats,
                    })
                }
                "enum" => {
                    let Some(Value::Array(vals)) = body.get("data") else {
                        return Err(format!("{ctx}: 'data' must be an array"));
                    };
                    let mut values = Vec::new();
                    let mut value_features = Vec::new();
                    for v in vals {
                        match v {
                            Value::String(s) => {
                                values.push(s.clone());
                                value_features.push(vec![]);
                            }
                            Value::Object(o) => {
                                let n = o
                                    .get("name")
                                    .and_then(Value::as_str)
                                    .ok_or(format!("{ctx}: enum value without name"))?;
                                values.push(n.to_string());
                                value_features.push(features(o, &ctx)?);
                            }
                            _ => return Err(format!("{ctx}: bad enum value {v}")),
                        }
                    }
                    TypeDef::Enum(EnumDef {
                        values,
                        value_features,
                        features: feats,
                    })
                }
                "union" => {
                    let base = match body.get("base") {
                        Some(Value::String(b)) => self.struct_members(b, &ctx)?,
                        Some(Value::Object(m)) => self.members(m, &ctx)?,
                        _ => return Err(format!("{ctx}: a union needs a 'base'")),
                    };
                    let disc = body
                        .get("discriminator")
                        .and_then(Value::as_str)
                        .ok_or(format!("{ctx}: a union needs a 'discriminator'"))?
                        .to_string();
                    let tag = base.iter().find(|m| m.name == disc).ok_or(format!(
                        "{ctx}: discriminator '{disc}' is not a base member"
                    ))?;
                    if tag.optional {
                        return Err(format!(
                            "{ctx}: discriminator '{disc}' must not be optional"
                        ));
                    }
                    let TypeRef::Named(tag_enum) = tag.ty.clone() else {
                        return Err(format!("{ctx}: discriminator '{disc}' must be an enum"));
                    };
                    let values = match self.resolve(&tag_enum)? {
                        TypeDef::Enum(e) => e.values.clone(),
                        _ => return Err(format!("{ctx}: discriminator '{disc}' must be an enum")),
                    };
                    let Some(Value::Object(data)) = body.get("data") else {
                        return Err(format!("{ctx}: 'data' must be an object"));
                    };
                    for case in data.keys() {
                        if !values.contains(case) {
                            return Err(format!(
                                "{ctx}: case '{case}' is not a value of {tag_enum}"
                            ));
                        }
                    }
                    let mut cases = Vec::new();
                    for v in &values {
                        let st = match data.get(v) {
                            None => EMPTY.to_string(),
                            Some(Value::String(s)) => {
                                let members = self.struct_members(s, &ctx)?;
                                if let Some(m) = members
                                    .iter()
                                    .find(|m| base.iter().any(|b| b.name == m.name))
                                {
                                    return Err(format!(
                                        "{ctx}: case '{v}' member '{}' clashes with the base",
                                        m.name
                                    ));
                                }
                                s.clone()
                            }
                            Some(_) => return Err(format!("{ctx}: case '{v}' must name a struct")),
                        };
                        cases.push((v.clone(), st));
                    }
                    TypeDef::Union(UnionDef {
                        base,
                        discriminator: disc,
                        tag_enum,
                        cases,
                        features: feats,
                    })
                }
                _ => {
                    let Some(Value::Object(data)) = body.get("data") else {
                        return Err(format!("{ctx}: 'data' must be an object"));
                    };
                    let mut branches = Vec::new();
                    for spec in data.values() {
                        branches.push(self.type_ref(spec, &ctx)?);
                    }
                    TypeDef::Alternate(AlternateDef {
                        branches,
                        features: feats,
                    })
                }
            };
            self.visiting.remove(name);
            self.done.insert(name.to_string(), def);
        }
        Ok(&self.done[name])
    }
}

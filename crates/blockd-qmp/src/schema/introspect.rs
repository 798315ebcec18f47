//! `query-qmp-schema`: the schema as QEMU's `SchemaInfo` list.
//!
//! The shape follows QEMU's introspection output: commands and events in
//! definition order, then every type they use, in order of first use. Type
//! names other than builtins are masked as numbers ("0", "1", ...; arrays are
//! `[N]`), so clients can only follow references, never rely on internal
//! names, exactly as with QEMU. Struct bases are flattened into `members`;
//! unions are objects with `tag` and `variants`; optional members carry
//! `"default": null`; all integer types appear as the builtin `int`.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Map, Value};

use super::model::{Builtin, Entity, Member, Schema, TypeDef, TypeRef};

/// Generates the `SchemaInfo` list.
pub fn schema_info(schema: &Schema) -> Vec<Value> {
    let mut g = Gen {
        schema,
        names: HashMap::new(),
        queue: VecDeque::new(),
        builtins_used: Vec::new(),
    };
    let mut out = Vec::new();
    for entity in &schema.order {
        match entity {
            Entity::Command(i) => {
                let c = &schema.commands[*i];
                let arg = g.use_type(&TypeRef::Named(c.args.clone()));
                let ret = g.use_type(&c.ret);
                let mut o = obj(&c.name, "command");
                o.insert("arg-type".into(), arg.into());
                o.insert("ret-type".into(), ret.into());
                if c.allow_oob {
                    o.insert("allow-oob".into(), true.into());
                }
                add_features(&mut o, &c.features);
                out.push(Value::Object(o));
            }
            Entity::Event(i) => {
                let e = &schema.events[*i];
                let arg = g.use_type(&TypeRef::Named(e.data.clone()));
                let mut o = obj(&e.name, "event");
                o.insert("arg-type".into(), arg.into());
                add_features(&mut o, &e.features);
                out.push(Value::Object(o));
            }
        }
    }
    while let Some(ty) = g.queue.pop_front() {
        out.push(g.entry(&ty));
    }
    out
}

struct Gen<'s> {
    schema: &'s Schema,
    names: HashMap<TypeRef, String>,
    queue: VecDeque<TypeRef>,
    builtins_used: Vec<&'static str>,
}

fn obj(name: &str, meta: &str) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("name".into(), name.into());
    o.insert("meta-type".into(), meta.into());
    o
}

fn add_features(o: &mut Map<String, Value>, features: &[String]) {
    if !features.is_empty() {
        o.insert("features".into(), json!(features));
    }
}

impl Gen<'_> {
    /// The introspection name of a type, queueing its entry on first use.
    fn use_type(&mut self, ty: &TypeRef) -> String {
        if let TypeRef::Builtin(b) = ty {
            let n = b.introspect_name();
            if !self.builtins_used.contains(&n) {
                self.builtins_used.push(n);
                self.queue.push_back(ty.clone());
            }
            return n.to_string();
        }
        if let Some(n) = self.names.get(ty) {
            return n.clone();
        }
        let name = match ty {
            TypeRef::Array(elem) => format!("[{}]", self.use_type(elem)),
            _ => {
                let masked = self
                    .names
                    .keys()
                    .filter(|k| matches!(k, TypeRef::Named(_)))
                    .count();
                masked.to_string()
            }
        };
        self.names.insert(ty.clone(), name.clone());
        self.queue.push_back(ty.clone());
        name
    }

    fn members(&mut self, members: &[Member]) -> Vec<Value> {
        members
            .iter()
            .map(|m| {
                let mut o = Map::new();
                o.insert("name".into(), m.name.clone().into());
                o.insert("type".into(), self.use_type(&m.ty).into());
                if m.optional {
                    o.insert("default".into(), Value::Null);
                }
                add_features(&mut o, &m.features);
                Value::Object(o)
            })
            .collect()
    }

    fn entry(&mut self, ty: &TypeRef) -> Value {
        match ty {
            TypeRef::Builtin(b) => {
                let mut o = obj(b.introspect_name(), "builtin");
                o.insert("json-type".into(), Builtin::json_type(*b).into());
                Value::Object(o)
            }
            TypeRef::Array(elem) => {
                let name = self.names[ty].clone();
                let mut o = obj(&name, "array");
                o.insert("element-type".into(), self.use_type(elem).into());
                Value::Object(o)
            }
            TypeRef::Named(n) => {
                let name = self.names[ty].clone();
                let def = self.schema.types[n].clone();
                match def {
                    TypeDef::Struct(s) => {
                        let mut o = obj(&name, "object");
                        o.insert("members".into(), self.members(&s.members).into());
                        add_features(&mut o, &s.features);
                        Value::Object(o)
                    }
                    TypeDef::Union(u) => {
                        let mut o = obj(&name, "object");
                        o.insert("members".into(), self.members(&u.base).into());
                        o.insert("tag".into(), u.discriminator.clone().into());
                        let variants: Vec<Value> = u
                            .cases
                            .iter()
                            .map(|(case, st)| {
                                json!({"case": case, "type": self.use_type(&TypeRef::Named(st.clone()))})
                            })
                            .collect();
                        o.insert("variants".into(), variants.into());
                        add_features(&mut o, &u.features);
                        Value::Object(o)
                    }
                    TypeDef::Enum(e) => {
                        let mut o = obj(&name, "enum");
                        let members: Vec<Value> = e
                            .values
                            .iter()
                            .zip(&e.value_features)
                            .map(|(v, f)| {
                                let mut m = Map::new();
                                m.insert("name".into(), v.clone().into());
                                add_features(&mut m, f);
                                Value::Object(m)
                            })
                            .collect();
                        o.insert("members".into(), members.into());
                        o.insert("values".into(), json!(e.values));
                        add_features(&mut o, &e.features);
                        Value::Object(o)
                    }
                    TypeDef::Alternate(a) => {
                        let mut o = obj(&name, "alternate");
                        let members: Vec<Value> = a
                            .branches
                            .iter()
                            .map(|b| json!({"type": self.use_type(b)}))
                            .collect();
                        o.insert("members".into(), members.into());
                        add_features(&mut o, &a.features);
                        Value::Object(o)
                    }
                }
            }
        }
    }
}

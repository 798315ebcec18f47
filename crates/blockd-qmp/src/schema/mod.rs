//! blockd's QMP schema: the single source of truth for commands, events and
//! types. The dispatcher's command table, argument checking, `query-commands`
//! and `query-qmp-schema` all come from it.

mod introspect;
mod model;
mod validate;

pub use introspect::schema_info;
pub use model::{
    AlternateDef, Builtin, CommandDef, EnumDef, EventDef, Member, Schema, StructDef, TypeDef,
    TypeRef, UnionDef, EMPTY,
};

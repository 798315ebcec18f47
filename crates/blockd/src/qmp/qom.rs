//! The QOM commands (QEMU's `qom/qom-qmp-cmds.c`: `qmp_qom_list`,
//! `qmp_qom_get`, `qmp_qom_set`, `qmp_qom_list_types`,
//! `qmp_qom_list_properties`) and `query-iothreads` (`iothread.c`,
//! `qmp_query_iothreads`).
//!
//! An unknown path or type is `DeviceNotFound`, as in QEMU; every other
//! refusal is a `GenericError`.

use blockd_qmp::{Ctx, Dispatcher, ErrorClass, QmpError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::objects::ObjectKind;
use crate::qom::{self, QomError};
use crate::state::State;

type R<T> = Result<T, QmpError>;

fn qom_err(e: QomError) -> QmpError {
    match e {
        QomError::NotFound(_) | QomError::ClassNotFound(_) => {
            QmpError::with_class(ErrorClass::DeviceNotFound, e.to_string())
        }
        _ => QmpError::generic(e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Path {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Get {
    path: String,
    property: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Set {
    path: String,
    property: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListTypes {
    implements: Option<String>,
    #[serde(rename = "abstract")]
    include_abstract: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypeName {
    typename: String,
}

#[derive(Serialize)]
struct PropertyInfo {
    name: String,
    #[serde(rename = "type")]
    ty: String,
}

#[derive(Serialize)]
struct TypeInfo {
    name: &'static str,
    #[serde(rename = "abstract", skip_serializing_if = "std::ops::Not::not")]
    is_abstract: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'static str>,
}

#[derive(Serialize)]
struct IoThreadInfo {
    id: String,
    #[serde(rename = "thread-id")]
    thread_id: u32,
    #[serde(rename = "poll-max-ns")]
    poll_max_ns: i64,
    #[serde(rename = "poll-grow")]
    poll_grow: i64,
    #[serde(rename = "poll-shrink")]
    poll_shrink: i64,
    #[serde(rename = "aio-max-batch")]
    aio_max_batch: i64,
}

fn infos(v: Vec<(String, String)>) -> Vec<PropertyInfo> {
    v.into_iter()
        .map(|(name, ty)| PropertyInfo { name, ty })
        .collect()
}

/// Registers the QOM commands and `query-iothreads`.
pub fn register(d: &mut Dispatcher<State>) {
    d.register("qom-list", |cx: Ctx<State>, a: Path| async move {
        R::Ok(infos(
            qom::list(&cx.state.objects, &a.path).map_err(qom_err)?,
        ))
    });
    d.register("qom-get", |cx: Ctx<State>, a: Get| async move {
        qom::get(&cx.state.objects, &a.path, &a.property).map_err(qom_err)
    });
    d.register("qom-set", |cx: Ctx<State>, a: Set| async move {
        // A throttle group's new limits apply under the control lock, as
        // block_set_io_throttle's do.
        let _g = cx.state.control.lock().await;
        qom::set(&cx.state.objects, &a.path, &a.property, &a.value).map_err(qom_err)?;
        R::Ok(blockd_qmp::Empty {})
    });
    d.register(
        "qom-list-types",
        |_cx: Ctx<State>, a: ListTypes| async move {
            let list = qom::types::list(a.implements.as_deref(), a.include_abstract == Some(true));
            R::Ok(
                list.into_iter()
                    .map(|t| TypeInfo {
                        name: t.name,
                        is_abstract: t.is_abstract,
                        parent: t.parent,
                    })
                    .collect::<Vec<_>>(),
            )
        },
    );
    d.register(
        "qom-list-properties",
        |_cx: Ctx<State>, a: TypeName| async move {
            R::Ok(infos(qom::type_properties(&a.typename).map_err(qom_err)?))
        },
    );
    d.register(
        "query-iothreads",
        |cx: Ctx<State>, _a: blockd_qmp::NoArgs| async move {
            let objs = &cx.state.objects;
            // qemu-system walks /objects' table forwards (qom-list
            // prepends, so its order is the reverse).
            let mut ids = objs.listed();
            ids.reverse();
            let pid = std::process::id();
            let mut out = Vec::new();
            for (id, _) in ids {
                let info = objs.with(&id, |o| match &o.kind {
                    ObjectKind::IoThread(t) => {
                        let p = |n| t.get(n).unwrap_or(0);
                        Some(IoThreadInfo {
                            id: o.id.clone(),
                            thread_id: pid,
                            poll_max_ns: p("poll-max-ns"),
                            poll_grow: p("poll-grow"),
                            poll_shrink: p("poll-shrink"),
                            aio_max_batch: p("aio-max-batch"),
                        })
                    }
                    ObjectKind::ThrottleGroup(_) | ObjectKind::Secret(_) => None,
                });
                out.extend(info.ok().flatten());
            }
            R::Ok(out)
        },
    );
}

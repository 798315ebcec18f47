//! Descriptor passing: `getfd`, `closefd`, `add-fd`, `remove-fd`, `query-fdsets`.

use blockd_qmp::{Ctx, Dispatcher, Empty, NoArgs, QmpError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FdName {
    fdname: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddFd {
    #[serde(rename = "fdset-id")]
    fdset_id: Option<i64>,
    opaque: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveFd {
    #[serde(rename = "fdset-id")]
    fdset_id: i64,
    fd: Option<i64>,
}

fn no_fd() -> QmpError {
    QmpError::generic("No file descriptor supplied via SCM_RIGHTS")
}

/// Registers the descriptor commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register("getfd", |cx: Ctx<State>, a: FdName| async move {
        let fd = cx.session.take_fd().ok_or_else(no_fd)?;
        if a.fdname.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::invalid_parameter_value(
                "fdname",
                "a name not starting with a digit",
            ));
        }
        // A name given again replaces (and closes) the old descriptor.
        cx.session
            .named_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(a.fdname, fd);
        R::Ok(Empty {})
    });
    d.register("closefd", |cx: Ctx<State>, a: FdName| async move {
        let removed = cx
            .session
            .named_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&a.fdname);
        match removed {
            Some(_) => R::Ok(Empty {}),
            None => Err(QmpError::generic(format!(
                "File descriptor named '{}' not found",
                a.fdname
            ))),
        }
    });
    d.register("add-fd", |cx: Ctx<State>, a: AddFd| async move {
        let fd = cx.session.take_fd().ok_or_else(no_fd)?;
        let (id, raw) = cx
            .state
            .fdsets
            .add(a.fdset_id, fd, a.opaque)
            .map_err(QmpError::generic)?;
        R::Ok(json!({"fdset-id": id, "fd": raw}))
    });
    d.register("remove-fd", |cx: Ctx<State>, a: RemoveFd| async move {
        cx.state
            .fdsets
            .remove(a.fdset_id, a.fd)
            .map_err(QmpError::generic)?;
        R::Ok(Empty {})
    });
    d.register("query-fdsets", |cx: Ctx<State>, _: NoArgs| async move {
        R::<Value>::Ok(cx.state.fdsets.query())
    });
}

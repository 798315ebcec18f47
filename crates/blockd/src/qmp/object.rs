//! `object-add` and `object-del` (QEMU's `qmp_object_add`,
//! `qmp_object_del`): throttle groups and iothreads under `/objects`.

use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Id {
    id: String,
}

/// Registers the object commands.
pub fn register(d: &mut Dispatcher<State>) {
    // The arguments were checked against ObjectOptions already.
    d.register(
        "object-add",
        |cx: Ctx<State>, a: Map<String, Value>| async move {
            // On a blocking thread: completing an object reads files, and
            // an encrypted TLS key's PBKDF2 may take a good part of a
            // second (certtool writes 600000 rounds).
            let st = cx.state.clone();
            tokio::task::spawn_blocking(move || st.objects.add(&st.throttle_groups, &a))
                .await
                .map_err(|e| QmpError::generic(format!("internal error: {e}")))?
                .map_err(QmpError::generic)?;
            R::Ok(Empty {})
        },
    );
    d.register("object-del", |cx: Ctx<State>, a: Id| async move {
        cx.state.objects.del(&a.id).map_err(QmpError::generic)?;
        R::Ok(Empty {})
    });
}

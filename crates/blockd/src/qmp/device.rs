//! Device commands: `device_add`, `device_del`, `x-blockd-set-tray-lock`.

use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::Deserialize;
use serde_json::Value;

use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceDel {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTrayLock {
    id: String,
    locked: bool,
}

/// Registers the device commands.
pub fn register(d: &mut Dispatcher<State>) {
    // The schema checked driver/bus/id; the device properties come along
    // unchecked ("gen": false) for the device model to judge.
    d.register("device_add", |cx: Ctx<State>, args: Value| async move {
        let Value::Object(m) = args else {
            return Err(QmpError::generic(
                "internal error: arguments are not an object",
            ));
        };
        let st = &cx.state;
        let _g = st.control.lock().await;
        st.machine.device_add(&st.graph, &m, true)?;
        R::Ok(Empty {})
    });
    d.register("device_del", |cx: Ctx<State>, a: DeviceDel| async move {
        let st = &cx.state;
        let g = st.control.lock().await;
        let nodes = st.machine.device_del(&st.graph, &a.id)?;
        drop(g);
        crate::machine::close_nodes(nodes).await;
        R::Ok(Empty {})
    });
    d.register(
        "x-blockd-set-tray-lock",
        |cx: Ctx<State>, a: SetTrayLock| async move {
            cx.state.machine.set_tray_lock(&a.id, a.locked)?;
            R::Ok(Empty {})
        },
    );
}

//! Protocol and server control: versions, introspection, run state, quit.

use blockd_core::runstate::RunStatus;
use blockd_qmp::{Ctx, Dispatcher, Empty, NoArgs, QmpError, ShutdownCause};
use serde::Serialize;
use serde_json::Value;

use crate::events::{Resume, Stop};
use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Serialize)]
struct StatusInfo {
    running: bool,
    status: &'static str,
}

/// Registers the control commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register("query-version", |cx: Ctx<State>, _: NoArgs| async move {
        R::Ok(cx.state.version.clone())
    });
    d.register("query-commands", |cx: Ctx<State>, _: NoArgs| async move {
        R::Ok(Value::clone(&cx.state.command_list))
    });
    d.register("query-qmp-schema", |cx: Ctx<State>, _: NoArgs| async move {
        R::Ok(Value::clone(&cx.state.schema_info))
    });
    d.register("query-status", |cx: Ctx<State>, _: NoArgs| async move {
        let s = cx.state.run.get();
        R::Ok(StatusInfo {
            running: s == RunStatus::Running,
            status: s.as_str(),
        })
    });
    d.register("stop", |cx: Ctx<State>, _: NoArgs| async move {
        // Only a running server stops (and sends STOP); a stopped one keeps
        // its state, io-error included (QEMU's vm_stop).
        if cx.state.run.stop(RunStatus::Paused) {
            cx.state.events.send(&Stop);
        }
        R::Ok(Empty {})
    });
    d.register("cont", |cx: Ctx<State>, _: NoArgs| async move {
        // As QEMU: cont clears every backend's io-status first.
        cx.state.machine.iostatus_reset_all();
        if cx.state.run.set(RunStatus::Running) {
            cx.state.events.send(&Resume);
        }
        R::Ok(Empty {})
    });
    d.register("quit", |cx: Ctx<State>, _: NoArgs| async move {
        cx.state.request_shutdown(ShutdownCause::HostQmpQuit);
        R::Ok(Empty {})
    });
}

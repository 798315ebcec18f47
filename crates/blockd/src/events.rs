//! The events the server itself emits, one type each (see
//! [`blockd_qmp::Event`]): sent with [`blockd_qmp::EventBus::send`], so
//! their names and members are spelled once, here. `SHUTDOWN` belongs to
//! the QMP server (`blockd_qmp::Shutdown`) and the job events to the job
//! layer (`blockd_jobs::JobStatusChange`, ...), which the server forwards.
//!
//! | event | emitted by |
//! | --- | --- |
//! | [`Stop`], [`Resume`] | `stop`, `cont`, a `stop` error policy ([`crate::machine`]) |
//! | [`BlockIoError`] | a backend's error policy ([`crate::machine::ErrorEvents`]) |
//! | [`DeviceTrayMoved`] | tray commands and media changes ([`crate::machine`]) |
//! | [`DeviceDeleted`] | `device_del` ([`crate::machine`]) |
//! | [`BlockExportDeleted`] | `block-export-del`, `nbd-server-remove` ([`crate::exports`]) |
//! | [`BlockWriteThreshold`] | a node's write threshold, armed by `block-set-write-threshold` |

use blockd_core::qapi::{BlockErrorAction, IoOperationType};
use blockd_qmp::Event;
use serde::Serialize;

/// `STOP`: the server paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stop;

/// `RESUME`: the server resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resume;

/// `BLOCK_IO_ERROR`: a request through a backend failed and its error
/// policy acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockIoError {
    /// The device's QOM path (empty without a device).
    #[serde(rename = "qom-path")]
    pub qom_path: String,
    /// The backend's name.
    pub device: String,
    /// The node the request failed on, if known.
    #[serde(rename = "node-name", skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The failed request.
    pub operation: IoOperationType,
    /// What the policy did.
    pub action: BlockErrorAction,
    /// Whether it was ENOSPC (only for backends with an I/O status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nospace: Option<bool>,
    /// The error's text.
    pub reason: String,
}

/// `DEVICE_TRAY_MOVED`: a device's tray opened or closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceTrayMoved {
    /// The backend's name (empty if anonymous).
    pub device: String,
    /// The device's id or QOM path.
    pub id: String,
    /// Whether the tray is now open.
    #[serde(rename = "tray-open")]
    pub tray_open: bool,
}

/// `DEVICE_DELETED`: a device is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceDeleted {
    /// Its id, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Its QOM path.
    pub path: String,
}

/// `BLOCK_EXPORT_DELETED`: an export is gone and its id free again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportDeleted {
    /// The export's id.
    pub id: String,
}

/// `BLOCK_WRITE_THRESHOLD`: a write went past a node's write threshold,
/// which is now disarmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockWriteThreshold {
    /// The node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// How far past the threshold the request reached.
    #[serde(rename = "amount-exceeded")]
    pub amount_exceeded: u64,
    /// The threshold it crossed.
    #[serde(rename = "write-threshold")]
    pub write_threshold: u64,
}

impl Event for BlockWriteThreshold {
    const NAME: &'static str = "BLOCK_WRITE_THRESHOLD";
}
impl Event for Stop {
    const NAME: &'static str = "STOP";
}
impl Event for Resume {
    const NAME: &'static str = "RESUME";
}
impl Event for BlockIoError {
    const NAME: &'static str = "BLOCK_IO_ERROR";
}
impl Event for DeviceTrayMoved {
    const NAME: &'static str = "DEVICE_TRAY_MOVED";
}
impl Event for DeviceDeleted {
    const NAME: &'static str = "DEVICE_DELETED";
}
impl Event for BlockExportDeleted {
    const NAME: &'static str = "BLOCK_EXPORT_DELETED";
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use blockd_jobs::{
        BlockJobCancelled, BlockJobCompleted, BlockJobError, BlockJobPending, BlockJobProgress,
        BlockJobReady, JobEvent, JobStatus, JobStatusChange, JobType,
    };
    use blockd_qmp::schema::TypeDef;
    use blockd_qmp::{Shutdown, ShutdownCause};
    use serde_json::{json, Value};

    use super::*;

    /// An event type's name and its data with every optional member set
    /// (`full`) and with none (`minimal`).
    struct Example {
        name: &'static str,
        full: Value,
        minimal: Value,
    }

    fn data(v: Value) -> Value {
        // Events without data serialise as null; their data type is empty.
        if v.is_null() {
            json!({})
        } else {
            v
        }
    }

    fn server<E: Event>(full: E, minimal: E) -> Example {
        Example {
            name: E::NAME,
            full: data(serde_json::to_value(full).unwrap()),
            minimal: data(serde_json::to_value(minimal).unwrap()),
        }
    }

    fn job<E: JobEvent>(full: E, minimal: E) -> Example {
        Example {
            name: E::NAME,
            full: serde_json::to_value(full).unwrap(),
            minimal: serde_json::to_value(minimal).unwrap(),
        }
    }

    fn io_error(optional: bool) -> BlockIoError {
        BlockIoError {
            qom_path: "/machine/peripheral/d0/virtio-backend".into(),
            device: "drive0".into(),
            node_name: optional.then(|| "#block123".into()),
            operation: IoOperationType::Write,
            action: BlockErrorAction::Stop,
            nospace: optional.then_some(true),
            reason: "No space left on device".into(),
        }
    }

    fn progress() -> BlockJobProgress {
        BlockJobProgress {
            job_type: JobType::Mirror,
            device: "job0".into(),
            len: 1 << 20,
            offset: 4096,
            speed: 0,
        }
    }

    /// One example of every event type blockd has, in every crate.
    fn examples() -> Vec<Example> {
        let deleted = |device: Option<&str>| DeviceDeleted {
            device: device.map(str::to_string),
            path: "/machine/peripheral/d0".into(),
        };
        let tray = DeviceTrayMoved {
            device: "cd0".into(),
            id: "ide0-cd0".into(),
            tray_open: true,
        };
        let threshold = BlockWriteThreshold {
            node_name: "n0".into(),
            amount_exceeded: 512,
            write_threshold: 1 << 20,
        };
        let shutdown = Shutdown {
            guest: false,
            reason: ShutdownCause::HostQmpQuit,
        };
        let completed = |error: Option<&str>| BlockJobCompleted {
            progress: progress(),
            error: error.map(str::to_string),
        };
        let status = JobStatusChange {
            id: "job0".into(),
            status: JobStatus::Concluded,
        };
        let pending = BlockJobPending {
            job_type: JobType::Commit,
            id: "job0".into(),
        };
        let job_error = BlockJobError {
            device: "job0".into(),
            operation: IoOperationType::Read,
            action: BlockErrorAction::Report,
        };
        vec![
            server(Stop, Stop),
            server(Resume, Resume),
            server(io_error(true), io_error(false)),
            server(tray.clone(), tray),
            server(deleted(Some("d0")), deleted(None)),
            server(
                BlockExportDeleted { id: "e0".into() },
                BlockExportDeleted { id: "e0".into() },
            ),
            server(shutdown.clone(), shutdown),
            server(threshold.clone(), threshold),
            job(status.clone(), status),
            job(BlockJobReady(progress()), BlockJobReady(progress())),
            job(BlockJobCancelled(progress()), BlockJobCancelled(progress())),
            job(completed(Some("Input/output error")), completed(None)),
            job(pending.clone(), pending),
            job(job_error.clone(), job_error),
        ]
    }

    /// Every event type serialises to data its definition accepts: member
    /// names and types (the check refuses unknown members and mistyped
    /// ones), optionality (the minimal example leaves out exactly the
    /// optional members, and still passes), and completeness (the full
    /// example has every member the definition has).
    #[test]
    fn every_event_type_matches_its_definition() {
        let schema = crate::schema::load();
        for ex in examples() {
            let def = schema
                .event(ex.name)
                .unwrap_or_else(|| panic!("{} has no definition", ex.name));
            for v in [&ex.full, &ex.minimal] {
                if let Err(e) = schema.check_value(&def.data, v) {
                    panic!("{} {v}: {}", ex.name, e.desc);
                }
            }
            let members = match schema.type_def(&def.data) {
                Some(TypeDef::Struct(s)) => s.members.clone(),
                other => panic!("{}: data type {other:?}", ex.name),
            };
            for m in &members {
                assert!(
                    ex.full.get(&m.name).is_some(),
                    "{}: the type has no member '{}'",
                    ex.name,
                    m.name
                );
                assert_eq!(
                    ex.minimal.get(&m.name).is_some(),
                    !m.optional,
                    "{}: member '{}' is {} in the definition",
                    ex.name,
                    m.name,
                    if m.optional { "optional" } else { "required" }
                );
            }
        }
    }

    /// Every event of blockd's schema has a type, and every type's event
    /// is in blockd's schema.
    #[test]
    fn every_schema_event_has_a_type() {
        let schema = crate::schema::load();
        let typed: HashSet<&str> = examples().iter().map(|e| e.name).collect();
        for ev in schema.events() {
            assert!(typed.contains(ev.name.as_str()), "{} has no type", ev.name);
        }
        for name in &typed {
            assert!(schema.event(name).is_some(), "{name} is not in the schema");
        }
    }

    /// The wire text is what the hand-built JSON was: members in the
    /// definition's order, optional ones left out when absent.
    #[test]
    fn wire_order() {
        assert_eq!(
            serde_json::to_string(&io_error(true)).unwrap(),
            r##"{"qom-path":"/machine/peripheral/d0/virtio-backend","device":"drive0","node-name":"#block123","operation":"write","action":"stop","nospace":true,"reason":"No space left on device"}"##
        );
        assert_eq!(
            serde_json::to_string(&io_error(false)).unwrap(),
            r#"{"qom-path":"/machine/peripheral/d0/virtio-backend","device":"drive0","operation":"write","action":"stop","reason":"No space left on device"}"#
        );
        assert_eq!(serde_json::to_value(Stop).unwrap(), Value::Null);
        assert_eq!(
            serde_json::to_string(&DeviceDeleted {
                device: None,
                path: "/p".into()
            })
            .unwrap(),
            r#"{"path":"/p"}"#
        );
    }
}

//! The state every QMP handler shares.

use std::sync::{Arc, Mutex};

use blockd_core::runstate::RunState;
use blockd_core::throttle::ThrottleGroups;
use blockd_core::{BlockGraph, ControlLock};
use blockd_drivers::Env;
use blockd_jobs::JobManager;

use crate::exports::Exports;
use crate::fds::FdSetStore;
use blockd_qmp::{EventBus, ShutdownCause};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Shared server state.
pub struct State {
    /// Where events go.
    pub events: EventBus,
    /// Running or paused.
    pub run: Arc<RunState>,
    /// Backends, devices and buses.
    pub machine: crate::machine::Machine,
    /// The block graph.
    pub graph: Arc<BlockGraph>,
    /// What drivers need from outside the graph (descriptor sets).
    pub env: Env,
    /// Descriptor sets (`add-fd`), also reachable through `env`.
    pub fdsets: Arc<FdSetStore>,
    /// Throttle groups by name (`block_set_io_throttle`, `throttle-group`
    /// objects, `throttle` filter nodes); also reachable through `env`.
    pub throttle_groups: Arc<ThrottleGroups>,
    /// `/objects`: throttle groups and iothreads (`object-add`).
    pub objects: crate::objects::Objects,
    /// The control-plane lock (QEMU's BQL): held by commands that change
    /// the graph and by jobs while they finalize.
    pub control: ControlLock,
    /// Jobs; they finalize under `control`.
    pub jobs: JobManager,
    /// The NBD server and the exports.
    pub exports: tokio::sync::Mutex<Exports>,
    /// The `VersionInfo` reported by the greeting and `query-version`.
    pub version: Value,
    /// `query-qmp-schema`'s answer, generated once from the schema.
    pub schema_info: Arc<Value>,
    /// `query-commands`'s answer.
    pub command_list: Arc<Value>,
    shutdown: CancellationToken,
    shutdown_reason: Mutex<Option<ShutdownCause>>,
}

impl State {
    /// New state around an event bus.
    pub fn new(
        events: EventBus,
        version: Value,
        schema_info: Value,
        command_list: Value,
        no_inline_writes: bool,
    ) -> Self {
        let fdsets = Arc::new(FdSetStore::default());
        let bus = events.clone();
        let control = ControlLock::new();
        let jobs = JobManager::new(
            // The job layer's events arrive typed and serialised.
            Arc::new(move |name: &str, data: Value| bus.forward(name, data)),
            control.clone(),
        );
        let run = Arc::new(RunState::default());
        let throttle_groups = ThrottleGroups::new();
        let objects = crate::objects::Objects::default();
        State {
            machine: crate::machine::Machine::new(events.clone(), run.clone()),
            control,
            jobs,
            exports: tokio::sync::Mutex::new(Exports::default()),
            events,
            run,
            graph: Arc::new(BlockGraph::new()),
            env: Env {
                fdsets: Some(fdsets.clone()),
                no_inline_writes,
                throttle_groups: Some(throttle_groups.clone()),
                tls: Some(objects.tls()),
                secrets: Some(objects.secrets.clone()),
                named_fds: None,
            },
            throttle_groups,
            objects,
            fdsets,
            version,
            schema_info: Arc::new(schema_info),
            command_list: Arc::new(command_list),
            shutdown: CancellationToken::new(),
            shutdown_reason: Mutex::new(None),
        }
    }

    /// Asks the server to shut down; the first reason given wins.
    pub fn request_shutdown(&self, reason: ShutdownCause) {
        let mut r = self
            .shutdown_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.get_or_insert(reason);
        self.shutdown.cancel();
    }

    /// Resolves once shutdown was requested, with the reason.
    pub async fn shutdown_requested(&self) -> ShutdownCause {
        self.shutdown.cancelled().await;
        self.shutdown_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(ShutdownCause::HostSignal)
    }
}

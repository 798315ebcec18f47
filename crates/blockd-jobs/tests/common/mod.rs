//! Test support: a recording event sink and a scriptable job driver.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockd_jobs::{
    BlockdevOnError, ControlGuard, ControlLock, FinalizeFuture, IoOperationType, JobCtx, JobDriver,
    JobError, JobEvents, JobFuture, JobManager, JobStatus, JOB_STATUS_CHANGE,
};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// One recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

impl Event {
    /// `running` for `JOB_STATUS_CHANGE {.., "status": "running"}`, else
    /// the event name.
    pub fn short(&self) -> String {
        if self.name == JOB_STATUS_CHANGE {
            self.data["status"].as_str().unwrap_or("?").to_owned()
        } else {
            self.name.clone()
        }
    }
}

/// Records every event and wakes waiters.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    notify: Notify,
    /// Thread yields before recording each event (a slow sink).
    yields: usize,
}

impl JobEvents for Recorder {
    fn emit(&self, name: &str, data: Value) {
        if name == JOB_STATUS_CHANGE {
            // Every status change event has exactly these members.
            let obj = data.as_object().expect("object");
            assert_eq!(obj.len(), 2, "{data}");
            assert!(obj["id"].is_string() && obj["status"].is_string(), "{data}");
        }
        for _ in 0..self.yields {
            std::thread::yield_now();
        }
        self.events.lock().unwrap().push(Event {
            name: name.to_owned(),
            data,
        });
        self.notify.notify_waiters();
    }
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder::default())
    }

    /// A recorder that yields its thread `yields` times before recording
    /// each event.
    pub fn slow(yields: usize) -> Arc<Self> {
        Arc::new(Recorder {
            yields,
            ..Recorder::default()
        })
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Events in short form (see [`Event::short`]).
    pub fn trace(&self) -> Vec<String> {
        self.events().iter().map(Event::short).collect()
    }

    /// Short forms of the events of job `id` (every event names its job in
    /// `id` or `device`).
    pub fn trace_of(&self, id: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e.data["id"] == id || e.data["device"] == id)
            .map(Event::short)
            .collect()
    }

    /// The first event called `name`.
    pub fn find(&self, name: &str) -> Option<Value> {
        self.events()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.data)
    }

    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }

    /// Waits (in virtual time, at most an hour) until `pred` holds for the
    /// recorded events.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[Event]) -> bool) {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if pred(&self.events.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(3600), wait)
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}; events: {:?}", self.trace());
        }
    }

    /// Waits until at least `n` events were recorded.
    pub async fn wait_len(&self, n: usize) {
        self.wait_until(&format!("{n} events"), |e| e.len() >= n)
            .await;
    }

    /// Waits until the `nth` (1-based) status change of `id` to `status`.
    pub async fn wait_status(&self, id: &str, status: JobStatus, nth: usize) {
        self.wait_until(&format!("{id} {status} #{nth}"), |events| {
            events
                .iter()
                .filter(|e| {
                    e.name == JOB_STATUS_CHANGE
                        && e.data == json!({"id": id, "status": status.as_str()})
                })
                .count()
                >= nth
        })
        .await;
    }

    /// Waits until an event named `name` was recorded.
    pub async fn wait_event(&self, name: &str) {
        self.wait_until(name, |events| events.iter().any(|e| e.name == name))
            .await;
    }
}

/// A flag the test opens to let a [`TestDriver`] body finish its work.
#[derive(Default)]
pub struct Gate(AtomicBool);

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Gate::default())
    }

    pub fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a [`TestDriver`] does.
#[derive(Clone)]
pub struct Script {
    /// `total-progress`; the body reports it all done when it finishes.
    pub total: u64,
    /// If set, the body loops (sleeps of `tick`, i.e. pause points) until the
    /// gate opens or it is cancelled.
    pub gate: Option<Arc<Gate>>,
    /// If set, report an I/O error with this policy once, before the gate.
    pub io_error: Option<BlockdevOnError>,
    /// After the work, go ready and wait for complete or cancel.
    pub ready: bool,
    /// The driver accepts `job-complete`.
    pub can_complete: bool,
    /// Soft cancel like mirror: only forced before ready.
    pub soft_cancel: bool,
    /// The body's result.
    pub result: Result<(), String>,
    /// `prepare`'s result.
    pub prepare: Result<(), String>,
    /// Panic in the body.
    pub panic: bool,
    /// The body's sleep between gate checks.
    pub tick: Duration,
    /// How long each finalization callback awaits (a sleep) before it
    /// returns; logged as "NAME done" when it has waited.
    pub finalize_delay: Option<Duration>,
    /// The finalization callback ("prepare", "commit", "abort", "clean")
    /// that panics: in the call itself, or after its delay if one is set.
    pub panic_in: Option<&'static str>,
    /// If set, each finalization callback checks that its guard is one of
    /// this lock and that the lock is held.
    pub control: Option<ControlLock>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            total: 1,
            gate: None,
            io_error: None,
            ready: false,
            can_complete: false,
            soft_cancel: false,
            result: Ok(()),
            prepare: Ok(()),
            panic: false,
            tick: Duration::from_secs(1),
            finalize_delay: None,
            panic_in: None,
            control: None,
        }
    }
}

/// A scriptable driver that logs its callbacks.
pub struct TestDriver {
    script: Script,
    log: Arc<Mutex<Vec<String>>>,
}

impl TestDriver {
    pub fn boxed(script: Script) -> (Box<dyn JobDriver>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (
            Box::new(TestDriver {
                script,
                log: log.clone(),
            }),
            log,
        )
    }

    fn log(&self, what: impl Into<String>) {
        self.log.lock().unwrap().push(what.into());
    }

    /// One finalization callback: log, check the guard, wait, maybe panic,
    /// then return `result`.
    fn step<'a, T: Send + 'a>(
        &'a self,
        name: &'static str,
        guard: &'a ControlGuard,
        result: T,
    ) -> FinalizeFuture<'a, T> {
        self.log(name);
        if let Some(lock) = &self.script.control {
            assert!(lock.holds(guard), "{name}: guard of another lock");
            assert!(lock.try_lock().is_none(), "{name}: lock not held");
        }
        let panics = self.script.panic_in == Some(name);
        let Some(delay) = self.script.finalize_delay else {
            assert!(!panics, "test {name} panic");
            return Box::pin(async move { result });
        };
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            self.log(format!("{name} done"));
            assert!(!panics, "test {name} panic after a wait");
            result
        })
    }
}

impl JobDriver for TestDriver {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        Box::pin(async move {
            let s = &self.script;
            self.log("run");
            ctx.set_total(s.total);
            if s.panic {
                panic!("test body panic");
            }
            if let Some(policy) = s.io_error {
                ctx.error_action(policy, IoOperationType::Write, false);
                ctx.pause_point().await;
            }
            if let Some(gate) = &s.gate {
                while !gate.is_open() {
                    if ctx.is_cancelled() {
                        return Ok(());
                    }
                    ctx.sleep(s.tick).await;
                }
            }
            if ctx.is_cancelled() {
                return Ok(());
            }
            ctx.add_progress(s.total);
            if s.ready {
                ctx.ready();
                loop {
                    if ctx.is_cancelled() {
                        return Ok(());
                    }
                    if ctx.completion_requested() || ctx.cancel_requested() {
                        break;
                    }
                    ctx.park().await;
                }
            }
            s.result.clone()
        })
    }

    fn can_complete(&self) -> bool {
        self.script.can_complete
    }

    fn complete(&self) -> Result<(), String> {
        self.log("complete");
        Ok(())
    }

    fn cancel(&self, force: bool, status: JobStatus) -> bool {
        self.log(format!("cancel({force}, {status})"));
        if self.script.soft_cancel {
            force || !status.is_ready()
        } else {
            true
        }
    }

    fn prepare<'a>(&'a self, guard: &'a ControlGuard) -> FinalizeFuture<'a, Result<(), String>> {
        self.step("prepare", guard, self.script.prepare.clone())
    }

    fn commit<'a>(&'a self, guard: &'a ControlGuard) -> FinalizeFuture<'a> {
        self.step("commit", guard, ())
    }

    fn abort<'a>(&'a self, guard: &'a ControlGuard) -> FinalizeFuture<'a> {
        self.step("abort", guard, ())
    }

    fn clean<'a>(&'a self, guard: &'a ControlGuard) -> FinalizeFuture<'a> {
        self.step("clean", guard, ())
    }

    fn set_speed(&self, speed: i64) {
        self.log(format!("set_speed({speed})"));
    }
}

/// A manager with a fresh recorder and a control-plane lock of its own.
pub fn manager() -> (JobManager, Arc<Recorder>) {
    let rec = Recorder::new();
    (JobManager::new(rec.clone(), ControlLock::new()), rec)
}

/// `job-cancel` as a QMP handler runs it: under the control-plane lock,
/// released on return.
pub async fn cancel(mgr: &JobManager, id: &str, force: bool) -> Result<(), JobError> {
    let guard = mgr.control_lock().lock().await;
    mgr.cancel(&guard, id, force).await
}

/// `block-job-cancel` under the control-plane lock.
pub async fn block_job_cancel(mgr: &JobManager, id: &str, force: bool) -> Result<(), JobError> {
    let guard = mgr.control_lock().lock().await;
    mgr.block_job_cancel(&guard, id, force).await
}

/// `job-finalize` under the control-plane lock.
pub async fn finalize(mgr: &JobManager, id: &str) -> Result<(), JobError> {
    let guard = mgr.control_lock().lock().await;
    mgr.finalize(&guard, id).await
}

/// `block-job-finalize` under the control-plane lock.
pub async fn block_job_finalize(mgr: &JobManager, id: &str) -> Result<(), JobError> {
    let guard = mgr.control_lock().lock().await;
    mgr.block_job_finalize(&guard, id).await
}

/// The log as `&str`s, for comparisons.
pub fn log_of(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    log.lock().unwrap().clone()
}

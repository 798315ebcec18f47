//! Lifecycle tests: exact event sequences (as measured on
//! qemu-storage-daemon 10.0.2), hooks, queries and command errors.

mod common;

use std::sync::Arc;

use blockd_jobs::{
    BlockdevOnError, ControlLock, IoStatus, JobError, JobErrorClass, JobManager, JobOptions,
    JobStatus, JobType, BLOCK_JOB_CANCELLED, BLOCK_JOB_COMPLETED, BLOCK_JOB_ERROR,
    BLOCK_JOB_PENDING, BLOCK_JOB_READY,
};
use common::{
    block_job_cancel, block_job_finalize, cancel, finalize, log_of, manager, Gate, Script,
    TestDriver,
};
use serde_json::json;

const MANUAL_DISMISS: JobOptions = JobOptions {
    auto_finalize: true,
    auto_dismiss: false,
};
const MANUAL_BOTH: JobOptions = JobOptions {
    auto_finalize: false,
    auto_dismiss: false,
};

fn generic(desc: &str) -> JobError {
    JobError::generic(desc)
}

fn verb_err(id: &str, status: &str, verb: &str) -> JobError {
    generic(&format!(
        "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
    ))
}

fn gated(total: u64) -> (Script, Arc<Gate>) {
    let gate = Gate::new();
    (
        Script {
            total,
            gate: Some(gate.clone()),
            ..Script::default()
        },
        gate,
    )
}

fn mirror_script() -> Script {
    Script {
        total: 8,
        ready: true,
        can_complete: true,
        soft_cancel: true,
        ..Script::default()
    }
}

#[tokio::test(start_paused = true)]
async fn blockdev_create_like_job() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script::default());
    let h = mgr
        .create("c1", JobType::Create, MANUAL_DISMISS, drv)
        .unwrap();
    assert_eq!(ev.trace(), ["created"]);
    assert_eq!(h.status(), JobStatus::Created);
    h.start();
    // Emitted before start() returns, before the body has run.
    assert_eq!(ev.trace(), ["created", "running"]);
    assert!(log_of(&log).is_empty());
    assert_eq!(
        ev.events()[1].data,
        json!({"id": "c1", "status": "running"})
    );

    assert_eq!(h.wait().await, Ok(()));
    assert_eq!(
        ev.trace(),
        ["created", "running", "waiting", "pending", "concluded"]
    );
    assert_eq!(
        serde_json::to_value(mgr.query()).unwrap(),
        json!([{"id": "c1", "type": "create", "status": "concluded",
                "current-progress": 1, "total-progress": 1}])
    );
    assert!(mgr.query_block_jobs().is_empty());
    assert_eq!(
        finalize(&mgr, "c1").await,
        Err(verb_err("c1", "concluded", "finalize"))
    );
    assert_eq!(
        cancel(&mgr, "c1", true).await,
        Err(verb_err("c1", "concluded", "cancel"))
    );
    let e = block_job_cancel(&mgr, "c1", false).await.unwrap_err();
    assert_eq!(e.class(), JobErrorClass::DeviceNotActive);
    assert_eq!(e.desc, "Block job 'c1' not found");

    mgr.dismiss("c1").unwrap();
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    assert!(mgr.query().is_empty());
    assert_eq!(h.status(), JobStatus::Null);
    assert_eq!(log_of(&log), ["run", "prepare", "commit", "clean"]);
    assert_eq!(mgr.dismiss("c1"), Err(generic("Job not found")));
}

#[tokio::test(start_paused = true)]
async fn block_job_success_with_defaults() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script {
        total: 64,
        ..Script::default()
    });
    let h = mgr
        .create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap();
    h.start();
    ev.wait_status("s1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        ev.find(BLOCK_JOB_COMPLETED).unwrap(),
        json!({"type": "stream", "device": "s1", "len": 64, "offset": 64, "speed": 0})
    );
    assert_eq!(log_of(&log), ["run", "prepare", "commit", "clean"]);
    assert!(mgr.query().is_empty());
    assert_eq!(h.wait().await, Ok(()));
}

#[tokio::test(start_paused = true)]
async fn manual_finalize_and_dismiss() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script::default());
    mgr.create("c1", JobType::Commit, MANUAL_BOTH, drv)
        .unwrap()
        .start();
    ev.wait_event(BLOCK_JOB_PENDING).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING"
        ]
    );
    assert_eq!(
        ev.find(BLOCK_JOB_PENDING).unwrap(),
        json!({"type": "commit", "id": "c1"})
    );
    assert_eq!(log_of(&log), ["run"]);
    assert_eq!(mgr.dismiss("c1"), Err(verb_err("c1", "pending", "dismiss")));
    assert_eq!(mgr.pause("c1"), Err(verb_err("c1", "pending", "pause")));
    assert_eq!(
        mgr.complete("c1"),
        Err(verb_err("c1", "pending", "complete"))
    );
    assert_eq!(mgr.job("c1").unwrap().status, JobStatus::Pending);

    finalize(&mgr, "c1").await.unwrap();
    assert_eq!(ev.trace()[5..], ["BLOCK_JOB_COMPLETED", "concluded"]);
    assert_eq!(log_of(&log), ["run", "prepare", "commit", "clean"]);
    assert_eq!(
        finalize(&mgr, "c1").await,
        Err(verb_err("c1", "concluded", "finalize"))
    );
    mgr.block_job_dismiss("c1").unwrap();
    assert_eq!(ev.trace().last().unwrap(), "null");
    assert!(mgr.query().is_empty());
}

#[tokio::test(start_paused = true)]
async fn failing_body() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script {
        total: 10,
        result: Err("boom".into()),
        ..Script::default()
    });
    let h = mgr
        .create("s1", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap();
    h.start();
    assert_eq!(h.wait().await, Err("boom".into()));
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded"
        ]
    );
    assert_eq!(
        ev.find(BLOCK_JOB_COMPLETED).unwrap(),
        json!({"type": "stream", "device": "s1", "len": 10, "offset": 10,
               "speed": 0, "error": "boom"})
    );
    assert_eq!(
        serde_json::to_value(mgr.query()).unwrap(),
        json!([{"id": "s1", "type": "stream", "status": "concluded",
                "current-progress": 10, "total-progress": 10, "error": "boom"}])
    );
    let bj = mgr.block_job("s1").unwrap();
    assert_eq!(bj.error.as_deref(), Some("boom"));
    assert_eq!(bj.status, JobStatus::Concluded);
    assert!(!bj.busy && !bj.ready && !bj.paused);
    assert_eq!(log_of(&log), ["run", "abort", "clean"]);
    mgr.dismiss("s1").unwrap();
    assert_eq!(ev.trace().last().unwrap(), "null");
}

#[tokio::test(start_paused = true)]
async fn failing_create_job_has_no_block_job_events() {
    let (mgr, ev) = manager();
    let msg = "Could not create '/nonexistent/x.img': No such file or directory";
    let (drv, _log) = TestDriver::boxed(Script {
        result: Err(msg.into()),
        ..Script::default()
    });
    let h = mgr
        .create("c2", JobType::Create, MANUAL_DISMISS, drv)
        .unwrap();
    h.start();
    h.wait().await.unwrap_err();
    assert_eq!(ev.trace(), ["created", "running", "aborting", "concluded"]);
    assert_eq!(mgr.job("c2").unwrap().error.as_deref(), Some(msg));
}

#[tokio::test(start_paused = true)]
async fn failing_prepare() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script {
        prepare: Err("prepare failed".into()),
        ..Script::default()
    });
    mgr.create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_status("s1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        ev.find(BLOCK_JOB_COMPLETED).unwrap()["error"],
        "prepare failed"
    );
    assert_eq!(log_of(&log), ["run", "prepare", "abort", "clean"]);
}

#[tokio::test(start_paused = true)]
async fn panicking_body_fails_the_job() {
    let (mgr, ev) = manager();
    let (drv, _log) = TestDriver::boxed(Script {
        panic: true,
        ..Script::default()
    });
    let h = mgr
        .create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap();
    h.start();
    assert_eq!(
        h.wait().await,
        Err("Job body panicked: test body panic".into())
    );
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_running_job() {
    let (mgr, ev) = manager();
    let (script, _gate) = gated(100);
    let (drv, log) = TestDriver::boxed(script);
    let h = mgr
        .create("s1", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap();
    h.start();
    cancel(&mgr, "s1", true).await.unwrap();
    assert_eq!(h.wait().await, Err("Operation canceled".into()));
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded"
        ]
    );
    assert_eq!(
        ev.find(BLOCK_JOB_CANCELLED).unwrap(),
        json!({"type": "stream", "device": "s1", "len": 100, "offset": 0, "speed": 0})
    );
    assert_eq!(
        mgr.job("s1").unwrap().error.as_deref(),
        Some("Operation canceled")
    );
    assert_eq!(
        log_of(&log),
        ["cancel(true, running)", "run", "abort", "clean"]
    );
}

#[tokio::test(start_paused = true)]
async fn soft_cancel_of_job_without_soft_mode_is_forced() {
    let (mgr, ev) = manager();
    let (script, _gate) = gated(5);
    let (drv, log) = TestDriver::boxed(script);
    mgr.create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    block_job_cancel(&mgr, "s1", false).await.unwrap();
    ev.wait_status("s1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(log_of(&log)[0], "cancel(false, running)");
}

#[tokio::test(start_paused = true)]
async fn cancel_paused_job() {
    let (mgr, ev) = manager();
    let (script, _gate) = gated(5);
    let (drv, _log) = TestDriver::boxed(script);
    mgr.create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    mgr.pause("s1").unwrap();
    ev.wait_status("s1", JobStatus::Paused, 1).await;
    assert_eq!(ev.trace(), ["created", "running", "paused"]);

    let bj = mgr.block_job("s1").unwrap();
    assert!(bj.paused && !bj.busy && !bj.ready);
    assert_eq!(bj.status, JobStatus::Paused);
    assert_eq!(bj.io_status, IoStatus::Ok);
    assert_eq!(mgr.pause("s1"), Err(generic("Job is already paused")));
    assert_eq!(
        block_job_cancel(&mgr, "s1", false).await,
        Err(generic("The block job for device 's1' is currently paused"))
    );

    cancel(&mgr, "s1", true).await.unwrap();
    ev.wait_status("s1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn pause_and_resume_are_counted() {
    let (mgr, ev) = manager();
    let (script, gate) = gated(3);
    let (drv, _log) = TestDriver::boxed(script);
    let h = mgr
        .create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap();
    // Paused before start: the body parks at its first pause point.
    mgr.pause("s1").unwrap();
    assert_eq!(mgr.pause("s1"), Err(generic("Job is already paused")));
    h.start();
    ev.wait_status("s1", JobStatus::Paused, 1).await;
    assert!(mgr.block_job("s1").unwrap().paused);

    mgr.resume("s1").unwrap();
    assert_eq!(
        mgr.resume("s1"),
        Err(generic("Can't resume a job that was not paused"))
    );
    ev.wait_status("s1", JobStatus::Running, 2).await;
    assert!(!mgr.block_job("s1").unwrap().paused);

    // Paused while sleeping: the sleep is cut short.
    mgr.block_job_pause("s1").unwrap();
    ev.wait_status("s1", JobStatus::Paused, 2).await;
    mgr.block_job_resume("s1").unwrap();
    ev.wait_status("s1", JobStatus::Running, 3).await;

    gate.open();
    ev.wait_status("s1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "paused",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn resume_of_unpaused_job_is_checked_before_the_verb() {
    let (mgr, _ev) = manager();
    let (drv, _log) = TestDriver::boxed(Script::default());
    let h = mgr
        .create("s1", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap();
    h.start();
    h.wait().await.unwrap();
    assert_eq!(
        mgr.resume("s1"),
        Err(generic("Can't resume a job that was not paused"))
    );
    assert_eq!(mgr.pause("s1"), Err(verb_err("s1", "concluded", "pause")));
}

#[tokio::test(start_paused = true)]
async fn ready_then_complete() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(mirror_script());
    mgr.create("m1", JobType::Mirror, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_event(BLOCK_JOB_READY).await;
    assert_eq!(
        ev.trace(),
        ["created", "running", "ready", "BLOCK_JOB_READY"]
    );
    assert_eq!(
        ev.find(BLOCK_JOB_READY).unwrap(),
        json!({"type": "mirror", "device": "m1", "len": 8, "offset": 8, "speed": 0})
    );
    let bj = mgr.block_job("m1").unwrap();
    assert!(bj.ready);
    assert_eq!(bj.status, JobStatus::Ready);

    mgr.complete("m1").unwrap();
    ev.wait_status("m1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        log_of(&log),
        ["run", "complete", "prepare", "commit", "clean"]
    );
}

#[tokio::test(start_paused = true)]
async fn complete_refusals() {
    let (mgr, ev) = manager();
    let (script, _gate) = gated(1);
    let (drv, _log) = TestDriver::boxed(script);
    mgr.create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    assert_eq!(
        mgr.complete("s1"),
        Err(verb_err("s1", "running", "complete"))
    );

    // Ready, but the driver has no completion.
    let (drv, _log) = TestDriver::boxed(Script {
        can_complete: false,
        ..mirror_script()
    });
    mgr.create("m1", JobType::Mirror, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_event(BLOCK_JOB_READY).await;
    assert_eq!(
        mgr.block_job_complete("m1"),
        Err(generic("The active block job 'm1' cannot be completed"))
    );
    cancel(&mgr, "m1", true).await.unwrap();
    cancel(&mgr, "s1", true).await.unwrap();
    ev.wait_status("m1", JobStatus::Null, 1).await;
    ev.wait_status("s1", JobStatus::Null, 1).await;
}

#[tokio::test(start_paused = true)]
async fn soft_cancel_of_ready_mirror_completes() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(mirror_script());
    mgr.create("m1", JobType::Mirror, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_event(BLOCK_JOB_READY).await;
    block_job_cancel(&mgr, "m1", false).await.unwrap();
    ev.wait_status("m1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        log_of(&log),
        ["run", "cancel(false, ready)", "prepare", "commit", "clean"]
    );
}

#[tokio::test(start_paused = true)]
async fn forced_cancel_of_ready_mirror() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(mirror_script());
    mgr.create("m1", JobType::Mirror, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_event(BLOCK_JOB_READY).await;
    cancel(&mgr, "m1", true).await.unwrap();
    ev.wait_status("m1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        log_of(&log),
        ["run", "cancel(true, ready)", "abort", "clean"]
    );
}

#[tokio::test(start_paused = true)]
async fn soft_cancel_of_mirror_before_ready_is_forced() {
    let (mgr, ev) = manager();
    let gate = Gate::new();
    let (drv, _log) = TestDriver::boxed(Script {
        gate: Some(gate),
        ..mirror_script()
    });
    mgr.create("m1", JobType::Mirror, JobOptions::default(), drv)
        .unwrap()
        .start();
    block_job_cancel(&mgr, "m1", false).await.unwrap();
    ev.wait_status("m1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn standby_complete_then_resume() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(mirror_script());
    mgr.create("m3", JobType::Mirror, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_event(BLOCK_JOB_READY).await;
    mgr.pause("m3").unwrap();
    ev.wait_status("m3", JobStatus::Standby, 1).await;
    let bj = mgr.block_job("m3").unwrap();
    assert!(bj.paused && bj.ready);
    assert_eq!(bj.status, JobStatus::Standby);

    // Accepted on standby; takes effect once resumed.
    mgr.complete("m3").unwrap();
    assert_eq!(
        ev.trace(),
        ["created", "running", "ready", "BLOCK_JOB_READY", "standby"]
    );
    mgr.resume("m3").unwrap();
    ev.wait_status("m3", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "standby",
            "ready",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(log_of(&log)[..2], ["run", "complete"]);
}

#[tokio::test(start_paused = true)]
async fn forced_cancel_of_standby_mirror() {
    let (mgr, ev) = manager();
    let (drv, _log) = TestDriver::boxed(mirror_script());
    mgr.create("m4", JobType::Mirror, MANUAL_DISMISS, drv)
        .unwrap()
        .start();
    ev.wait_event(BLOCK_JOB_READY).await;
    mgr.pause("m4").unwrap();
    ev.wait_status("m4", JobStatus::Standby, 1).await;
    assert_eq!(
        block_job_cancel(&mgr, "m4", false).await,
        Err(generic("The block job for device 'm4' is currently paused"))
    );
    block_job_cancel(&mgr, "m4", true).await.unwrap();
    ev.wait_status("m4", JobStatus::Concluded, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "standby",
            "ready",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded"
        ]
    );
    assert_eq!(
        mgr.job("m4").unwrap().error.as_deref(),
        Some("Operation canceled")
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_of_pending_job_aborts_at_once() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script::default());
    mgr.create(
        "s4",
        JobType::Stream,
        JobOptions {
            auto_finalize: false,
            auto_dismiss: true,
        },
        drv,
    )
    .unwrap()
    .start();
    ev.wait_event(BLOCK_JOB_PENDING).await;
    block_job_cancel(&mgr, "s4", false).await.unwrap();
    // Synchronous: no body left to wait for.
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        log_of(&log),
        ["run", "cancel(false, pending)", "abort", "clean"]
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_before_start() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script::default());
    let h = mgr
        .create("s1", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap();
    cancel(&mgr, "s1", true).await.unwrap();
    // Never started: no legacy event, dismissed despite manual dismiss.
    assert_eq!(ev.trace(), ["created", "aborting", "concluded", "null"]);
    assert!(mgr.query().is_empty());
    assert_eq!(log_of(&log), ["cancel(true, created)", "abort", "clean"]);
    h.start();
    assert_eq!(h.status(), JobStatus::Null);
    assert_eq!(h.wait().await, Err("Operation canceled".into()));
    assert_eq!(ev.trace().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn unstarted_handle_drop_is_early_fail() {
    let (mgr, ev) = manager();
    let (drv, _log) = TestDriver::boxed(Script::default());
    let h = mgr
        .create("j1", JobType::Backup, JobOptions::default(), drv)
        .unwrap();
    drop(h);
    let (drv, _log) = TestDriver::boxed(Script::default());
    mgr.create("j2", JobType::Backup, JobOptions::default(), drv)
        .unwrap()
        .early_fail();
    assert_eq!(ev.trace(), ["created", "null", "created", "null"]);
    assert!(mgr.query().is_empty());
}

#[tokio::test(start_paused = true)]
async fn job_ids() {
    let (mgr, ev) = manager();
    for bad in ["1bad", "", "a b", "-x", "job#1"] {
        let (drv, _log) = TestDriver::boxed(Script::default());
        assert_eq!(
            mgr.create(bad, JobType::Create, JobOptions::default(), drv)
                .unwrap_err(),
            generic(&format!("Invalid job ID '{bad}'"))
        );
    }
    assert!(ev.trace().is_empty());

    let long = "a".repeat(100);
    let (drv, _log) = TestDriver::boxed(Script::default());
    let h = mgr
        .create(&long, JobType::Create, MANUAL_DISMISS, drv)
        .unwrap();
    h.start();
    h.wait().await.unwrap();
    // Still taken while concluded.
    let (drv, _log) = TestDriver::boxed(Script::default());
    assert_eq!(
        mgr.create(&long, JobType::Stream, JobOptions::default(), drv)
            .unwrap_err(),
        generic(&format!("Job ID '{long}' already in use"))
    );
    assert!(mgr.contains(&long));
    mgr.dismiss(&long).unwrap();
    assert!(!mgr.contains(&long));
    let (drv, _log) = TestDriver::boxed(Script::default());
    mgr.create(&long, JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_status(&long, JobStatus::Null, 2).await;
}

#[tokio::test(start_paused = true)]
async fn unknown_jobs() {
    let (mgr, _ev) = manager();
    let (drv, _log) = TestDriver::boxed(Script::default());
    let _create = mgr
        .create("c1", JobType::Create, JobOptions::default(), drv)
        .unwrap();
    let opts = json!({});
    let not_found = generic("Job not found");
    assert_eq!(cancel(&mgr, "nope", true).await, Err(not_found.clone()));
    assert_eq!(mgr.pause("nope"), Err(not_found.clone()));
    assert_eq!(mgr.resume("nope"), Err(not_found.clone()));
    assert_eq!(mgr.complete("nope"), Err(not_found.clone()));
    assert_eq!(finalize(&mgr, "nope").await, Err(not_found.clone()));
    assert_eq!(mgr.dismiss("nope"), Err(not_found.clone()));
    assert_eq!(mgr.set_speed("nope", 1), Err(not_found.clone()));
    assert_eq!(mgr.change("nope", &opts), Err(not_found.clone()));
    assert_eq!(mgr.job("nope"), Err(not_found.clone()));
    assert_eq!(not_found.class, JobErrorClass::GenericError);

    // Block job commands: DeviceNotActive, also for non-block jobs.
    for id in ["nope", "c1"] {
        let e = JobError::device_not_active(format!("Block job '{id}' not found"));
        assert_eq!(block_job_cancel(&mgr, id, true).await, Err(e.clone()));
        assert_eq!(mgr.block_job_pause(id), Err(e.clone()));
        assert_eq!(mgr.block_job_resume(id), Err(e.clone()));
        assert_eq!(mgr.block_job_complete(id), Err(e.clone()));
        assert_eq!(block_job_finalize(&mgr, id).await, Err(e.clone()));
        assert_eq!(mgr.block_job_dismiss(id), Err(e.clone()));
        assert_eq!(mgr.block_job_set_speed(id, 1), Err(e.clone()));
        assert_eq!(mgr.block_job_change(id, &opts), Err(e.clone()));
        assert_eq!(mgr.block_job(id).unwrap_err(), e);
    }
    // The job-* family finds the create job.
    mgr.pause("c1").unwrap();
}

#[tokio::test(start_paused = true)]
async fn speed() {
    let (mgr, ev) = manager();
    let (script, _gate) = gated(4);
    let (drv, log) = TestDriver::boxed(script);
    let h = mgr
        .create("s1", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap();
    // Set between creation and start, as QEMU's block_job_create does.
    mgr.block_job_set_speed("s1", 65536).unwrap();
    h.start();
    assert_eq!(
        mgr.block_job_set_speed("s1", -1),
        Err(generic("Parameter 'speed' expects a non-negative value"))
    );
    mgr.block_job_set_speed("s1", 1000).unwrap();
    assert_eq!(mgr.block_job("s1").unwrap().speed, 1000);
    cancel(&mgr, "s1", true).await.unwrap();
    h.wait().await.unwrap_err();
    assert_eq!(ev.find(BLOCK_JOB_CANCELLED).unwrap()["speed"], 1000);
    assert_eq!(
        mgr.block_job_set_speed("s1", 1),
        Err(verb_err("s1", "concluded", "set-speed"))
    );
    assert_eq!(
        log_of(&log)[..3],
        [
            "set_speed(65536)",
            "set_speed(1000)",
            "cancel(true, running)"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn change() {
    let (mgr, _ev) = manager();
    let (drv, _log) = TestDriver::boxed(Script::default());
    let h = mgr
        .create("m1", JobType::Mirror, MANUAL_DISMISS, drv)
        .unwrap();
    assert_eq!(
        mgr.block_job_change("m1", &json!({"copy-mode": "write-blocking"})),
        Err(generic("Job type does not support change"))
    );
    h.start();
    h.wait().await.unwrap();
    assert_eq!(
        mgr.change("m1", &json!({})),
        Err(verb_err("m1", "concluded", "change"))
    );
}

#[tokio::test(start_paused = true)]
async fn io_error_with_stop_pauses_like_the_user() {
    let (mgr, ev) = manager();
    let (script, gate) = gated(2);
    let (drv, _log) = TestDriver::boxed(Script {
        io_error: Some(BlockdevOnError::Stop),
        ..script
    });
    mgr.create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_status("s1", JobStatus::Paused, 1).await;
    assert_eq!(
        ev.trace(),
        ["created", "running", "BLOCK_JOB_ERROR", "paused"]
    );
    assert_eq!(
        ev.find(BLOCK_JOB_ERROR).unwrap(),
        json!({"device": "s1", "operation": "write", "action": "stop"})
    );
    let bj = mgr.block_job("s1").unwrap();
    assert_eq!(bj.io_status, IoStatus::Failed);
    assert!(bj.paused);
    assert_eq!(mgr.pause("s1"), Err(generic("Job is already paused")));

    mgr.block_job_resume("s1").unwrap();
    assert_eq!(mgr.block_job("s1").unwrap().io_status, IoStatus::Ok);
    ev.wait_status("s1", JobStatus::Running, 2).await;
    gate.open();
    ev.wait_status("s1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "BLOCK_JOB_ERROR",
            "paused",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn io_error_with_report_does_not_pause() {
    let (mgr, ev) = manager();
    let (drv, _log) = TestDriver::boxed(Script {
        io_error: Some(BlockdevOnError::Enospc),
        ..Script::default()
    });
    mgr.create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    ev.wait_status("s1", JobStatus::Null, 1).await;
    assert_eq!(
        ev.find(BLOCK_JOB_ERROR).unwrap(),
        json!({"device": "s1", "operation": "write", "action": "report"})
    );
    assert!(!ev.trace().contains(&"paused".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn queries_list_newest_first() {
    let (mgr, _ev) = manager();
    let mut handles = Vec::new();
    for (id, t) in [
        ("a", JobType::Stream),
        ("b", JobType::Create),
        ("c", JobType::Mirror),
    ] {
        let (drv, _log) = TestDriver::boxed(Script::default());
        handles.push(mgr.create(id, t, JobOptions::default(), drv).unwrap());
    }
    let ids: Vec<_> = mgr.query().into_iter().map(|j| j.id).collect();
    assert_eq!(ids, ["c", "b", "a"]);
    let devices: Vec<_> = mgr
        .query_block_jobs()
        .into_iter()
        .map(|j| j.device)
        .collect();
    assert_eq!(devices, ["c", "a"]);
    let created = &mgr.query_block_jobs()[0];
    assert_eq!(created.status, JobStatus::Created);
    assert!(created.paused, "a created job counts one pause request");
    assert!(!created.busy);
    assert_eq!(
        serde_json::to_value(created).unwrap(),
        json!({"type": "mirror", "device": "c", "len": 0, "offset": 0, "busy": false,
               "paused": true, "speed": 0, "io-status": "ok", "ready": false,
               "status": "created", "auto-finalize": true, "auto-dismiss": true})
    );
}

#[tokio::test(start_paused = true)]
async fn event_sink_may_call_the_manager() {
    // The sink queries the manager on every event, dismisses the job
    // synchronously as soon as it is concluded (its `null` is queued while
    // `concluded` is being emitted) and finalizes it from a task of its own
    // as soon as it is pending (finalization needs the control-plane lock,
    // which a sink must not wait for): events still come out in order.
    struct Finalizer {
        mgr: std::sync::OnceLock<JobManager>,
        trace: std::sync::Mutex<Vec<String>>,
    }
    impl blockd_jobs::JobEvents for Finalizer {
        fn emit(&self, name: &str, data: serde_json::Value) {
            let mgr = self.mgr.get().unwrap();
            let _ = mgr.query();
            let short = if name == blockd_jobs::JOB_STATUS_CHANGE {
                data["status"].as_str().unwrap().to_owned()
            } else {
                name.to_owned()
            };
            self.trace.lock().unwrap().push(short.clone());
            let id = data["id"].as_str().unwrap_or_default().to_owned();
            if short == "concluded" {
                mgr.dismiss(&id).unwrap();
                // Not emitted yet: the flush that is calling us sends it
                // once we return.
                assert_eq!(self.trace.lock().unwrap().last().unwrap(), "concluded");
            }
            if name == BLOCK_JOB_PENDING {
                let mgr = mgr.clone();
                tokio::spawn(async move { finalize(&mgr, &id).await.unwrap() });
            }
        }
    }
    let sink = Arc::new(Finalizer {
        mgr: std::sync::OnceLock::new(),
        trace: std::sync::Mutex::new(Vec::new()),
    });
    let mgr = JobManager::new(sink.clone(), ControlLock::new());
    let _ = sink.mgr.set(mgr.clone());
    let (drv, _log) = TestDriver::boxed(Script::default());
    let h = mgr.create("c1", JobType::Commit, MANUAL_BOTH, drv).unwrap();
    h.start();
    h.wait().await.unwrap();
    assert_eq!(
        *sink.trace.lock().unwrap(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert!(mgr.query().is_empty());
}

#[tokio::test(start_paused = true)]
async fn cancel_sync_all_clears_every_job() {
    let (mgr, ev) = manager();
    let (script, _gate) = gated(1);
    let (drv, _) = TestDriver::boxed(script);
    mgr.create("running", JobType::Stream, JobOptions::default(), drv)
        .unwrap()
        .start();
    let (drv, _) = TestDriver::boxed(Script::default());
    mgr.create("pending", JobType::Commit, MANUAL_BOTH, drv)
        .unwrap()
        .start();
    let (drv, _) = TestDriver::boxed(Script::default());
    mgr.create("concluded", JobType::Create, MANUAL_DISMISS, drv)
        .unwrap()
        .start();
    let (drv, _) = TestDriver::boxed(mirror_script());
    mgr.create("ready", JobType::Mirror, MANUAL_DISMISS, drv)
        .unwrap()
        .start();
    let (drv, _) = TestDriver::boxed(Script::default());
    let unstarted = mgr
        .create("unstarted", JobType::Backup, JobOptions::default(), drv)
        .unwrap();
    ev.wait_status("pending", JobStatus::Pending, 1).await;
    ev.wait_status("concluded", JobStatus::Concluded, 1).await;
    ev.wait_status("ready", JobStatus::Ready, 1).await;

    mgr.cancel_sync_all().await;
    assert!(mgr.query().is_empty());
    for id in ["running", "pending", "concluded", "ready", "unstarted"] {
        assert_eq!(ev.trace_of(id).last().unwrap(), "null", "{id}");
    }
    assert_eq!(
        ev.trace_of("pending")[3..],
        [
            "pending",
            "BLOCK_JOB_PENDING",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        ev.trace_of("unstarted"),
        ["created", "aborting", "concluded", "null"]
    );
    drop(unstarted);
}

/// Every (reachable status, verb) pair the verb table refuses is refused by
/// the matching command with QEMU's wording.
#[tokio::test(start_paused = true)]
async fn refused_verbs_use_qemu_wording() {
    use blockd_jobs::JobVerb;

    let (mgr, ev) = manager();
    let mut handles = Vec::new();
    let mut start = |id: &str, t: JobType, opts: JobOptions, script: Script, go: bool| {
        let (drv, _) = TestDriver::boxed(script);
        let h = mgr.create(id, t, opts, drv).unwrap();
        if go {
            h.start();
        }
        handles.push(h);
    };
    let (gate_script, _gate) = gated(1);
    start(
        "created",
        JobType::Stream,
        JobOptions::default(),
        Script::default(),
        false,
    );
    start(
        "running",
        JobType::Stream,
        JobOptions::default(),
        gate_script.clone(),
        true,
    );
    start(
        "paused",
        JobType::Stream,
        JobOptions::default(),
        gate_script,
        true,
    );
    start(
        "ready",
        JobType::Mirror,
        JobOptions::default(),
        mirror_script(),
        true,
    );
    start(
        "standby",
        JobType::Mirror,
        JobOptions::default(),
        mirror_script(),
        true,
    );
    start(
        "pending",
        JobType::Stream,
        MANUAL_BOTH,
        Script::default(),
        true,
    );
    start(
        "concluded",
        JobType::Stream,
        MANUAL_DISMISS,
        Script::default(),
        true,
    );
    mgr.pause("paused").unwrap();
    ev.wait_status("ready", JobStatus::Ready, 1).await;
    ev.wait_status("standby", JobStatus::Ready, 1).await;
    mgr.pause("standby").unwrap();
    ev.wait_status("paused", JobStatus::Paused, 1).await;
    ev.wait_status("standby", JobStatus::Standby, 1).await;
    ev.wait_status("pending", JobStatus::Pending, 1).await;
    ev.wait_status("concluded", JobStatus::Concluded, 1).await;

    let mut checked = 0;
    for info in mgr.query() {
        let (id, status) = (info.id.as_str(), info.status);
        assert_eq!(id, status.as_str());
        for &verb in JobVerb::ALL {
            if status.accepts(verb) {
                continue;
            }
            let result = match verb {
                JobVerb::Cancel => cancel(&mgr, id, true).await,
                JobVerb::Pause => mgr.pause(id),
                JobVerb::Resume => mgr.resume(id),
                JobVerb::SetSpeed => mgr.set_speed(id, 1),
                JobVerb::Complete => mgr.complete(id),
                JobVerb::Dismiss => mgr.dismiss(id),
                JobVerb::Finalize => finalize(&mgr, id).await,
                JobVerb::Change => mgr.change(id, &json!({})),
            };
            let expected = if verb == JobVerb::Resume {
                // Checked before the verb: none of these is user-paused.
                generic("Can't resume a job that was not paused")
            } else {
                verb_err(id, status.as_str(), verb.as_str())
            };
            assert_eq!(result, Err(expected), "{status} {verb}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 + 3 + 3 + 2 + 2 + 6 + 7);
    mgr.cancel_sync_all().await;
}

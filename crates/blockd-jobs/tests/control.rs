//! Finalization under the control-plane lock: async callbacks that await
//! while commands queue for the lock, bodies that return while the lock is
//! held, shutdown that must not hold it while waiting, and callbacks that
//! fail or panic.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockd_jobs::{
    ControlLock, JobCtx, JobDriver, JobError, JobFuture, JobManager, JobOptions, JobStatus,
    JobType, BLOCK_JOB_COMPLETED,
};
use common::{cancel, finalize, log_of, manager, Gate, Recorder, Script, TestDriver};
use tokio::time::Instant;

const MANUAL_DISMISS: JobOptions = JobOptions {
    auto_finalize: true,
    auto_dismiss: false,
};
const MANUAL_BOTH: JobOptions = JobOptions {
    auto_finalize: false,
    auto_dismiss: false,
};
const DELAY: Duration = Duration::from_secs(10);

fn verb_err(id: &str, status: &str, verb: &str) -> JobError {
    JobError::generic(format!(
        "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
    ))
}

/// A script whose finalization callbacks each wait [`DELAY`] and check
/// that they run under `mgr`'s lock.
fn slow_finalization(mgr: &JobManager) -> Script {
    Script {
        finalize_delay: Some(DELAY),
        control: Some(mgr.control_lock().clone()),
        ..Script::default()
    }
}

#[tokio::test(start_paused = true)]
async fn awaiting_prepare_holds_off_a_command_until_finalized() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(slow_finalization(&mgr));
    let h = mgr
        .create("s1", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap();
    let t0 = Instant::now();
    h.start();
    // `pending` is emitted by the job's task, which holds the lock from
    // job_exit to the end of finalization.
    ev.wait_status("s1", JobStatus::Pending, 1).await;
    let command = {
        let mgr = mgr.clone();
        tokio::spawn(async move {
            let r = cancel(&mgr, "s1", true).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(DELAY / 2).await;
    assert!(
        !command.is_finished(),
        "the command did not wait for the lock"
    );
    assert_eq!(log_of(&log), ["run", "prepare"]);
    assert_eq!(h.status(), JobStatus::Pending);
    // Commands that do not need the lock are not held off.
    assert_eq!(mgr.job("s1").unwrap().status, JobStatus::Pending);
    assert_eq!(mgr.pause("s1"), Err(verb_err("s1", "pending", "pause")));

    let (result, done) = command.await.unwrap();
    // It ran after finalization: the job was concluded by then.
    assert_eq!(result, Err(verb_err("s1", "concluded", "cancel")));
    assert!(done >= t0 + 3 * DELAY, "{:?}", done - t0);
    assert_eq!(
        log_of(&log),
        [
            "run",
            "prepare",
            "prepare done",
            "commit",
            "commit done",
            "clean",
            "clean done"
        ]
    );
    assert_eq!(h.wait().await, Ok(()));
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn awaiting_abort_holds_off_commands_on_other_jobs() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script {
        result: Err("boom".into()),
        ..slow_finalization(&mgr)
    });
    let failing = mgr
        .create("f1", JobType::Stream, JobOptions::default(), drv)
        .unwrap();
    let gate = Gate::new();
    let (drv, _) = TestDriver::boxed(Script {
        gate: Some(gate.clone()),
        ..Script::default()
    });
    let other = mgr
        .create("o1", JobType::Stream, JobOptions::default(), drv)
        .unwrap();
    other.start();
    failing.start();
    ev.wait_status("f1", JobStatus::Aborting, 1).await;

    // Queued behind the job's task (the lock is FIFO): a cancel of an
    // unrelated job waits for the abort to finish.
    let command = {
        let mgr = mgr.clone();
        tokio::spawn(async move {
            let r = cancel(&mgr, "o1", true).await;
            (r, mgr.job("f1").map(|j| j.status))
        })
    };
    tokio::time::sleep(DELAY / 2).await;
    assert!(!command.is_finished());
    assert_eq!(log_of(&log), ["run", "abort"]);
    // Pause and resume need no lock.
    mgr.pause("o1").unwrap();
    mgr.resume("o1").unwrap();

    let (result, f1_then) = command.await.unwrap();
    assert_eq!(result, Ok(()));
    // By the time the cancel ran, f1 was finalized and gone.
    assert_eq!(f1_then, Err(JobError::job_not_found()));
    assert_eq!(
        log_of(&log),
        ["run", "abort", "abort done", "clean", "clean done"]
    );
    assert_eq!(failing.wait().await, Err("boom".into()));
    assert_eq!(other.wait().await, Err("Operation canceled".into()));
    assert_eq!(
        ev.trace_of("f1"),
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
async fn job_finalize_awaits_prepare_and_a_queued_command_runs_after() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(slow_finalization(&mgr));
    let h = mgr.create("c1", JobType::Commit, MANUAL_BOTH, drv).unwrap();
    h.start();
    ev.wait_status("c1", JobStatus::Pending, 1).await;
    assert_eq!(log_of(&log), ["run"]);

    let t0 = Instant::now();
    let guard = mgr.control_lock().lock().await;
    let queued = {
        let mgr = mgr.clone();
        tokio::spawn(async move { cancel(&mgr, "c1", true).await })
    };
    mgr.finalize(&guard, "c1").await.unwrap();
    // Finalized before finalize returned.
    assert_eq!(Instant::now() - t0, 3 * DELAY);
    assert_eq!(mgr.job("c1").unwrap().status, JobStatus::Concluded);
    assert!(!queued.is_finished());
    drop(guard);
    assert_eq!(
        queued.await.unwrap(),
        Err(verb_err("c1", "concluded", "cancel"))
    );
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn body_returning_under_a_held_lock_waits_for_it() {
    for (result, expected) in [
        (
            Ok(()),
            &[
                "created",
                "running",
                "waiting",
                "pending",
                "BLOCK_JOB_COMPLETED",
                "concluded",
                "null",
            ][..],
        ),
        (
            Err("boom".to_owned()),
            &[
                "created",
                "running",
                "aborting",
                "BLOCK_JOB_COMPLETED",
                "concluded",
                "null",
            ][..],
        ),
    ] {
        let (mgr, ev) = manager();
        let guard = mgr.control_lock().lock().await;
        let (drv, log) = TestDriver::boxed(Script {
            result: result.clone(),
            ..Script::default()
        });
        let h = mgr
            .create("s1", JobType::Stream, JobOptions::default(), drv)
            .unwrap();
        h.start();
        // Long enough for the body to return (it does not wait at all).
        let waited = tokio::time::timeout(Duration::from_secs(3600), h.wait()).await;
        assert!(waited.is_err(), "finalized while the lock was held");
        assert_eq!(log_of(&log), ["run"]);
        assert_eq!(h.status(), JobStatus::Running);
        assert_eq!(mgr.job("s1").unwrap().status, JobStatus::Running);
        assert_eq!(ev.trace(), ["created", "running"]);

        drop(guard);
        assert_eq!(h.wait().await, result);
        assert_eq!(ev.trace(), expected);
        let steps: &[&str] = if result.is_ok() {
            &["run", "prepare", "commit", "clean"]
        } else {
            &["run", "abort", "clean"]
        };
        assert_eq!(log_of(&log), steps);
    }
}

#[tokio::test(start_paused = true)]
async fn lock_holder_cancels_a_job_whose_body_has_returned() {
    // The body has returned successfully, but its task waits for the lock:
    // a cancel by the holder must not wait for the job (it would deadlock)
    // and turns the job into a cancelled one, as in QEMU.
    let (mgr, ev) = manager();
    let guard = mgr.control_lock().lock().await;
    let (drv, log) = TestDriver::boxed(Script::default());
    let h = mgr
        .create("s1", JobType::Stream, JobOptions::default(), drv)
        .unwrap();
    h.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log_of(&log), ["run"]);
    mgr.cancel(&guard, "s1", true).await.unwrap();
    assert_eq!(ev.trace(), ["created", "running"]);
    drop(guard);
    assert_eq!(h.wait().await, Err("Operation canceled".into()));
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
    assert_eq!(
        log_of(&log),
        ["run", "cancel(true, running)", "abort", "clean"]
    );
}

/// A body that notices cancellation at once but takes [`DELAY`] to stop
/// (a drain), ignoring pause points.
struct SlowToStop;

impl JobDriver for SlowToStop {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        Box::pin(async move {
            ctx.cancellation_token().cancelled().await;
            tokio::time::sleep(DELAY).await;
            Ok(())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn cancel_sync_all_does_not_hold_the_lock_while_waiting() {
    let (mgr, ev) = manager();
    for id in ["a", "b"] {
        mgr.create(
            id,
            JobType::Mirror,
            JobOptions::default(),
            Box::new(SlowToStop),
        )
        .unwrap()
        .start();
    }
    let (drv, _) = TestDriver::boxed(Script {
        result: Err("boom".into()),
        ..slow_finalization(&mgr)
    });
    mgr.create("slow-abort", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap()
        .start();
    ev.wait_status("slow-abort", JobStatus::Concluded, 1).await;

    let t0 = Instant::now();
    let all = {
        let mgr = mgr.clone();
        tokio::spawn(async move { mgr.cancel_sync_all().await })
    };
    tokio::time::sleep(DELAY / 2).await;
    // "slow-abort" (concluded) was dismissed at once; now it waits for "b"
    // to stop, and must not hold the lock meanwhile: b's task needs it.
    assert!(!all.is_finished());
    assert!(
        mgr.control_lock().try_lock().is_some(),
        "held while waiting"
    );
    all.await.unwrap();
    assert!(mgr.query().is_empty());
    assert_eq!(Instant::now() - t0, 2 * DELAY);
    for id in ["a", "b"] {
        assert_eq!(
            ev.trace_of(id),
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
}

// ---- failing and panicking callbacks ---------------------------------------

#[tokio::test(start_paused = true)]
async fn panicking_prepare_aborts_the_job_and_the_manager_carries_on() {
    for delay in [None, Some(DELAY)] {
        let (mgr, ev) = manager();
        let (drv, log) = TestDriver::boxed(Script {
            panic_in: Some("prepare"),
            finalize_delay: delay,
            ..Script::default()
        });
        let h = mgr
            .create("s1", JobType::Stream, JobOptions::default(), drv)
            .unwrap();
        h.start();
        let msg = if delay.is_some() {
            "Job prepare panicked: test prepare panic after a wait"
        } else {
            "Job prepare panicked: test prepare panic"
        };
        assert_eq!(h.wait().await, Err(msg.to_owned()));
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
        assert_eq!(ev.find(BLOCK_JOB_COMPLETED).unwrap()["error"], msg);
        let steps: &[&str] = if delay.is_some() {
            &[
                "run",
                "prepare",
                "prepare done",
                "abort",
                "abort done",
                "clean",
                "clean done",
            ]
        } else {
            &["run", "prepare", "abort", "clean"]
        };
        assert_eq!(log_of(&log), steps);

        // Not wedged: the lock is free and the next job finalizes.
        assert!(mgr.control_lock().try_lock().is_some());
        let (drv, _) = TestDriver::boxed(Script::default());
        let next = mgr
            .create("s2", JobType::Stream, JobOptions::default(), drv)
            .unwrap();
        next.start();
        assert_eq!(next.wait().await, Ok(()));
    }
}

#[tokio::test(start_paused = true)]
async fn panicking_commit_fails_the_job_without_abort() {
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script {
        panic_in: Some("commit"),
        ..Script::default()
    });
    let h = mgr
        .create("s1", JobType::Stream, MANUAL_DISMISS, drv)
        .unwrap();
    h.start();
    let msg = "Job commit panicked: test commit panic";
    assert_eq!(h.wait().await, Err(msg.to_owned()));
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded"
        ]
    );
    assert_eq!(ev.find(BLOCK_JOB_COMPLETED).unwrap()["error"], msg);
    assert_eq!(mgr.job("s1").unwrap().error.as_deref(), Some(msg));
    assert_eq!(log_of(&log), ["run", "prepare", "commit", "clean"]);
    mgr.dismiss("s1").unwrap();
}

#[tokio::test(start_paused = true)]
async fn panicking_abort_or_clean_keeps_the_result() {
    for (panic_in, result, steps) in [
        (
            "abort",
            Err("boom".to_owned()),
            &["run", "abort", "clean"][..],
        ),
        (
            "clean",
            Err("boom".to_owned()),
            &["run", "abort", "clean"][..],
        ),
        ("clean", Ok(()), &["run", "prepare", "commit", "clean"][..]),
    ] {
        let (mgr, ev) = manager();
        let (drv, log) = TestDriver::boxed(Script {
            panic_in: Some(panic_in),
            result: result.clone(),
            ..Script::default()
        });
        let h = mgr
            .create("s1", JobType::Stream, JobOptions::default(), drv)
            .unwrap();
        h.start();
        assert_eq!(h.wait().await, result, "{panic_in}");
        assert_eq!(log_of(&log), steps, "{panic_in}");
        assert_eq!(ev.trace().last().unwrap(), "null");
        assert!(mgr.control_lock().try_lock().is_some());
    }
}

#[tokio::test(start_paused = true)]
async fn failing_prepare_under_job_finalize() {
    // QEMU's job-finalize succeeds; the job concludes with the error.
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script {
        prepare: Err("prepare failed".into()),
        ..slow_finalization(&mgr)
    });
    let h = mgr.create("c1", JobType::Commit, MANUAL_BOTH, drv).unwrap();
    h.start();
    ev.wait_status("c1", JobStatus::Pending, 1).await;
    finalize(&mgr, "c1").await.unwrap();
    assert_eq!(mgr.job("c1").unwrap().status, JobStatus::Concluded);
    assert_eq!(h.wait().await, Err("prepare failed".into()));
    assert_eq!(
        ev.trace(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded"
        ]
    );
    assert_eq!(
        log_of(&log),
        [
            "run",
            "prepare",
            "prepare done",
            "abort",
            "abort done",
            "clean",
            "clean done"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn panicking_abort_under_a_cancel_command() {
    // A pending job aborted by the command itself: the command returns, the
    // job is concluded, the lock is released with the guard.
    let (mgr, ev) = manager();
    let (drv, log) = TestDriver::boxed(Script {
        panic_in: Some("abort"),
        ..Script::default()
    });
    let h = mgr.create("c1", JobType::Commit, MANUAL_BOTH, drv).unwrap();
    h.start();
    ev.wait_status("c1", JobStatus::Pending, 1).await;
    cancel(&mgr, "c1", true).await.unwrap();
    assert_eq!(h.wait().await, Err("Operation canceled".into()));
    assert_eq!(
        log_of(&log),
        ["run", "cancel(true, pending)", "abort", "clean"]
    );
    assert!(mgr.control_lock().try_lock().is_some());
}

// ---- the guard ------------------------------------------------------------

#[tokio::test]
#[cfg(debug_assertions)]
#[should_panic(expected = "not a guard of its ControlLock")]
async fn a_guard_of_another_lock_is_refused_in_debug_builds() {
    let (mgr, _ev) = manager();
    let other = ControlLock::new();
    let guard = other.lock().await;
    let _ = mgr.cancel(&guard, "nope", true).await;
}

#[test]
fn command_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mgr = JobManager::new(Arc::new(Recorder::default()), ControlLock::new());
    let guard = rt.block_on(mgr.control_lock().lock());
    assert_send(&mgr.cancel(&guard, "x", true));
    assert_send(&mgr.block_job_cancel(&guard, "x", true));
    assert_send(&mgr.finalize(&guard, "x"));
    assert_send(&mgr.block_job_finalize(&guard, "x"));
    assert_send(&mgr.cancel_sync_all());
}

//! Many jobs driven from many tasks on a multi-threaded runtime: no
//! deadlock, every job's status events form a legal path, and each job's
//! events reach the sink in exactly QEMU's order.

mod common;

use std::time::Duration;

use blockd_jobs::{ControlLock, JobManager, JobOptions, JobStatus, JobType, JOB_STATUS_CHANGE};
use common::{block_job_cancel, cancel, finalize, manager, Gate, Recorder, Script, TestDriver};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_keep_events_legal() {
    let (mgr, ev) = manager();
    let querier = {
        let mgr = mgr.clone();
        tokio::spawn(async move {
            loop {
                let _ = mgr.query();
                let _ = mgr.query_block_jobs();
                tokio::task::yield_now().await;
            }
        })
    };

    let mut tasks = Vec::new();
    for i in 0..32 {
        let mgr = mgr.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("job{i}");
            let gate = Gate::new();
            let mirror = i % 4 == 3;
            let script = Script {
                total: 10,
                gate: Some(gate.clone()),
                tick: Duration::from_millis(1),
                ready: mirror,
                can_complete: mirror,
                soft_cancel: mirror,
                ..Script::default()
            };
            let (drv, _log) = TestDriver::boxed(script);
            let job_type = if mirror {
                JobType::Mirror
            } else {
                JobType::Stream
            };
            let h = mgr
                .create(&id, job_type, JobOptions::default(), drv)
                .unwrap();
            h.start();
            match i % 4 {
                0 => {
                    let _ = mgr.pause(&id);
                    tokio::task::yield_now().await;
                    let _ = mgr.resume(&id);
                    gate.open();
                }
                1 => {
                    let _ = cancel(&mgr, &id, true).await;
                }
                2 => {
                    let _ = mgr.pause(&id);
                    tokio::task::yield_now().await;
                    let _ = block_job_cancel(&mgr, &id, true).await;
                }
                _ => {
                    gate.open();
                    let mut status = h.subscribe();
                    let _ = status.wait_for(|s| s.is_ready() || s.is_completed()).await;
                    let _ = mgr.pause(&id);
                    let _ = mgr.complete(&id);
                    let _ = mgr.resume(&id);
                    if i % 8 == 7 {
                        let _ = block_job_cancel(&mgr, &id, false).await;
                    }
                }
            }
            tokio::time::timeout(Duration::from_secs(30), h.wait())
                .await
                .unwrap_or_else(|_| panic!("{id} did not finish"))
                .map_err(|e| (id, e))
        }));
    }
    for t in tasks {
        let _ = t.await.unwrap();
    }
    querier.abort();
    assert!(mgr.query().is_empty());

    for i in 0..32 {
        let id = format!("job{i}");
        let statuses: Vec<JobStatus> = ev
            .events()
            .iter()
            .filter(|e| e.name == JOB_STATUS_CHANGE && e.data["id"] == id.as_str())
            .map(|e| e.data["status"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(statuses.first(), Some(&JobStatus::Created), "{id}");
        assert_eq!(statuses.last(), Some(&JobStatus::Null), "{id}");
        for pair in statuses.windows(2) {
            assert!(
                pair[0].can_transition_to(pair[1]) && pair[0] != pair[1],
                "{id}: {:?}",
                statuses
            );
        }
    }
}

/// The events each kind of job in [`events_of_concurrent_jobs_in_order`]
/// must produce, exactly and in this order (QEMU's orders).
fn expected_trace(kind: usize) -> &'static [&'static str] {
    match kind {
        // Succeeds, auto-finalize and auto-dismiss; async prepare.
        0 => &[
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ],
        // The body fails; async abort.
        1 => &[
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ],
        // Manual finalize and dismiss, by the test task.
        2 => &[
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ],
        // Cancelled while running.
        _ => &[
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null",
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_of_concurrent_jobs_in_order() {
    // A sink slow to record widens the window between popping an event and
    // delivering it: without serialised emission, a job's next event
    // (queued and emitted by its own task on another worker) would
    // overtake it.
    let ev = Recorder::slow(200);
    let mgr = JobManager::new(ev.clone(), ControlLock::new());
    let mut tasks = Vec::new();
    for i in 0..48 {
        let mgr = mgr.clone();
        let ev = ev.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("job{i}");
            let kind = i % 4;
            let gate = Gate::new();
            let script = Script {
                total: 10,
                result: if kind == 1 {
                    Err("boom".into())
                } else {
                    Ok(())
                },
                gate: (kind == 3).then(|| gate.clone()),
                tick: Duration::from_millis(1),
                finalize_delay: Some(Duration::from_millis(1)),
                control: Some(mgr.control_lock().clone()),
                ..Script::default()
            };
            let (drv, _log) = TestDriver::boxed(script);
            let options = JobOptions {
                auto_finalize: kind != 2,
                auto_dismiss: kind != 2,
            };
            let h = mgr.create(&id, JobType::Stream, options, drv).unwrap();
            // Emitted before create and start return, whatever other
            // threads are emitting.
            assert_eq!(ev.trace_of(&id), ["created"], "{id}");
            h.start();
            assert_eq!(ev.trace_of(&id)[..2], ["created", "running"], "{id}");
            match kind {
                2 => {
                    let mut status = h.subscribe();
                    let _ = status.wait_for(|s| *s == JobStatus::Pending).await;
                    finalize(&mgr, &id).await.unwrap();
                    mgr.dismiss(&id).unwrap();
                }
                3 => cancel(&mgr, &id, true).await.unwrap(),
                _ => {}
            }
            tokio::time::timeout(Duration::from_secs(30), h.wait())
                .await
                .unwrap_or_else(|_| panic!("{id} did not finish"))
                .map_err(|e| (id, e))
        }));
    }
    for t in tasks {
        let _ = t.await.unwrap();
    }
    ev.wait_until("every null", |events| {
        events
            .iter()
            .filter(|e| e.name == JOB_STATUS_CHANGE && e.data["status"] == "null")
            .count()
            == 48
    })
    .await;
    assert!(mgr.query().is_empty());
    for i in 0..48 {
        let id = format!("job{i}");
        assert_eq!(ev.trace_of(&id), expected_trace(i % 4), "{id}");
    }
}

//! Many jobs driven from many tasks on a multi-threaded runtime: no
//! deadlock, and every job's status events form a legal path.

mod common;

use std::time::Duration;

use blockd_jobs::{JobOptions, JobStatus, JobType, JOB_STATUS_CHANGE};
use common::{block_job_cancel, cancel, manager, Gate, Script, TestDriver};

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

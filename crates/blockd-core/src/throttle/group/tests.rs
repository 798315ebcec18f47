use std::sync::Arc;

use tokio::time::{Duration, Instant};

use super::*;
use crate::throttle::config::{BucketConfig, BucketType};

fn limits(t: BucketType, avg: u64) -> ThrottleConfig {
    let mut c = ThrottleConfig::default();
    *c.bucket_mut(t) = BucketConfig {
        avg,
        ..BucketConfig::default()
    };
    c
}

/// Runs `n` requests of `bytes` through `m`, `depth` at a time; returns
/// each one's start time (since `t0`).
async fn load(
    m: Arc<ThrottleMember>,
    n: usize,
    depth: usize,
    bytes: u64,
    t0: Instant,
) -> Vec<Duration> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let starts = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..depth {
        let (m, next, starts) = (m.clone(), next.clone(), starts.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                m.intercept(Direction::Read, bytes).await;
                starts.lock().unwrap().push(t0.elapsed());
                // The request itself takes a little while.
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut v = starts.lock().unwrap().clone();
    v.sort();
    v
}

#[tokio::test(start_paused = true)]
async fn one_member_holds_the_rate_with_queued_requests() {
    let groups = ThrottleGroups::new();
    let g = groups.get_or_create("g");
    g.set_config(limits(BucketType::OpsTotal, 100));
    let m = Arc::new(g.join());
    let t0 = Instant::now();
    let starts = load(m.clone(), 300, 8, 4096, t0).await;
    // 300 requests at 100/s: the last starts near 3 s (minus the slack
    // and the first one, which needs no budget).
    let last = starts.last().unwrap().as_secs_f64();
    assert!((2.97..=3.0).contains(&last), "{last}");
    // Over any second, at most 100 + 1 + slack.
    for w in 0..3 {
        let n = starts
            .iter()
            .filter(|s| s.as_secs_f64() >= w as f64 && s.as_secs_f64() < w as f64 + 1.0)
            .count();
        assert!((99..=102).contains(&n), "second {w}: {n}");
    }
    assert_eq!(m.queued(), [0, 0]);
}

#[tokio::test(start_paused = true)]
async fn members_share_the_group_budget_round_robin() {
    let groups = ThrottleGroups::new();
    let g = groups.get_or_create("shared");
    g.set_config(limits(BucketType::BpsTotal, 1 << 20));
    let t0 = Instant::now();
    let members: Vec<_> = (0..3).map(|_| Arc::new(g.join())).collect();
    // Each member has more than it can get in 3 s.
    let tasks: Vec<_> = members
        .iter()
        .map(|m| tokio::spawn(load(m.clone(), 1000, 4, 4096, t0)))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Count what each started in the first 3 s, then let them go.
    g.set_config(ThrottleConfig::default());
    let mut counts = Vec::new();
    for t in tasks {
        // A member never served would hang here: fail instead.
        let s = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a member was never served")
            .unwrap();
        counts.push(s.iter().filter(|d| d.as_secs_f64() < 3.0).count());
    }
    let total: usize = counts.iter().sum();
    // 3 MiB in 4 KiB requests: 768 (plus the slack and one).
    assert!((767..=772).contains(&total), "{counts:?}");
    for c in &counts {
        assert!(c.abs_diff(total / 3) <= 2, "unfair: {counts:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_drained_member_lets_queued_requests_go_at_once() {
    let groups = ThrottleGroups::new();
    let g = groups.get_or_create("d");
    g.set_config(limits(BucketType::OpsTotal, 1));
    let m = Arc::new(g.join());
    m.intercept(Direction::Write, 1).await;
    let t0 = Instant::now();
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move {
                m.intercept(Direction::Write, 1).await;
                t0.elapsed()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(m.queued(), [0, 5]);
    m.disable();
    for w in waiting {
        assert_eq!(w.await.unwrap(), Duration::from_millis(10));
    }
    // While disabled, nothing waits; afterwards the limit holds again.
    m.intercept(Direction::Write, 1).await;
    assert_eq!(t0.elapsed(), Duration::from_millis(10));
    m.enable();
    m.intercept(Direction::Write, 1).await;
    assert!(t0.elapsed() >= Duration::from_secs(6), "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn leaving_or_lifting_the_limits_releases_queued_requests() {
    let groups = ThrottleGroups::new();
    let g = groups.get_or_create("l");
    g.set_config(limits(BucketType::BpsWrite, 10));
    let a = Arc::new(g.join());
    let b = Arc::new(g.join());
    a.intercept(Direction::Write, 1000).await;
    let t0 = Instant::now();
    let spawn = |m: &Arc<ThrottleMember>| {
        let m = m.clone();
        tokio::spawn(async move {
            m.intercept(Direction::Write, 10).await;
            t0.elapsed()
        })
    };
    let (wa, wb) = (spawn(&a), spawn(&b));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!((a.queued(), b.queued()), ([0, 1], [0, 1]));
    // Reads are not limited by a write limit.
    a.intercept(Direction::Read, 1 << 30).await;
    assert_eq!(t0.elapsed(), Duration::from_millis(5));
    // b leaves (its handle is the last one once the task is done).
    g.leave(b.id);
    assert_eq!(wb.await.unwrap(), Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(5)).await;
    g.set_config(ThrottleConfig::default());
    assert_eq!(wa.await.unwrap(), Duration::from_millis(10));
    assert_eq!(g.member_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_goes_away_while_queued_does_not_stall_the_rest() {
    let groups = ThrottleGroups::new();
    let g = groups.get_or_create("c");
    g.set_config(limits(BucketType::OpsTotal, 10));
    let m = Arc::new(g.join());
    m.intercept(Direction::Read, 1).await;
    let t0 = Instant::now();
    let m2 = m.clone();
    let gone = tokio::spawn(async move { m2.intercept(Direction::Read, 1).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    gone.abort();
    let _ = gone.await;
    m.intercept(Direction::Read, 1).await;
    // It took the turn of the one that went away (~95 ms at 10/s).
    let e = t0.elapsed();
    assert!(e <= Duration::from_millis(100), "{e:?}");
}

#[test]
fn names_are_unique_and_groups_go_with_their_last_member() {
    let groups = ThrottleGroups::new();
    let g = groups.create("obj", ThrottleConfig::default()).unwrap();
    assert_eq!(
        groups.create("obj", ThrottleConfig::default()).unwrap_err(),
        "A group with this name already exists"
    );
    assert!(Arc::ptr_eq(&groups.get_or_create("obj"), &g));
    drop(g);
    assert!(groups.get("obj").is_none());
    let m = groups.get_or_create("anon").join();
    assert_eq!(groups.get("anon").unwrap().member_count(), 1);
    drop(m);
    assert!(groups.get("anon").is_none());
}

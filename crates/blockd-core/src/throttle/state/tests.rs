use proptest::prelude::*;

use super::*;
use crate::throttle::config::BucketConfig;

const S: u64 = 1_000_000_000;

fn one(t: BucketType, b: BucketConfig) -> ThrottleConfig {
    let mut c = ThrottleConfig::default();
    *c.bucket_mut(t) = b;
    c
}

fn avg(avg: u64) -> BucketConfig {
    BucketConfig {
        avg,
        ..BucketConfig::default()
    }
}

/// Admits `n` requests of `bytes` in `dir`, all queued at 0, each as soon
/// as the state allows; returns the start times.
fn run(st: &mut ThrottleState, dir: Direction, n: usize, bytes: u64) -> Vec<u64> {
    let mut now = 0;
    let mut starts = Vec::with_capacity(n);
    for _ in 0..n {
        loop {
            let w = st.wait_ns(dir, now);
            if w == 0 {
                break;
            }
            now += w;
        }
        st.account(dir, bytes, now);
        starts.push(now);
    }
    starts
}

#[test]
fn bps_paces_to_the_average_after_five_ms_of_slack() {
    // 1 MB/s in 64 KiB requests: the first goes at once, request k when
    // the level (k × 64 KiB) has drained to the 5 000-byte slack.
    let mut st = ThrottleState::new(one(BucketType::BpsTotal, avg(1_000_000)), 0);
    let starts = run(&mut st, Direction::Read, 160, 65536);
    assert_eq!(starts[0], 0);
    for (k, &t) in starts.iter().enumerate().skip(1) {
        assert_eq!(t, (k as u64 * 65536 - 5000) * 1000, "request {k}");
    }
}

#[test]
fn directions_fill_their_own_and_the_total_buckets() {
    let mut c = one(BucketType::BpsRead, avg(1000));
    *c.bucket_mut(BucketType::OpsWrite) = avg(10);
    let mut st = ThrottleState::new(c, 0);
    st.account(Direction::Read, 2000, 0);
    // Reads wait for the read bucket; writes do not see it.
    assert_eq!(st.wait_ns(Direction::Read, 0), 1_995_000_000);
    assert_eq!(st.wait_ns(Direction::Write, 0), 0);
    st.account(Direction::Write, 1 << 20, 0);
    // One write is one operation: 10/s with 0.05 of slack.
    assert_eq!(st.wait_ns(Direction::Write, 0), 95_000_000);
}

#[test]
fn iops_size_counts_large_requests_as_several() {
    let mut c = one(BucketType::OpsTotal, avg(100));
    c.op_size = 4096;
    let mut st = ThrottleState::new(c, 0);
    st.account(Direction::Write, 4096 * 10, 0);
    // Ten operations at 100/s, minus 0.5 of slack: 95 ms.
    assert_eq!(st.wait_ns(Direction::Read, 0), 95_000_000);
    let mut st = ThrottleState::new(c, 0);
    st.account(Direction::Write, 512, 0);
    // Smaller than iops_size: one operation.
    assert_eq!(st.wait_ns(Direction::Write, 0), 5_000_000);
}

#[test]
fn a_burst_runs_at_max_for_its_length_then_the_average_holds() {
    // bps 1000, bps_max 5000 for 2 s: the bucket holds 10 000 bytes;
    // filling it at 5000/s while it drains at 1000/s takes 2.5 s.
    let b = BucketConfig {
        avg: 1000,
        max: 5000,
        burst_length: 2,
    };
    let mut st = ThrottleState::new(one(BucketType::BpsTotal, b), 0);
    let starts = run(&mut st, Direction::Read, 200, 100);
    let by = |t: u64| starts.iter().filter(|&&s| s < t).count() as u64 * 100;
    // During the burst: the burst rate (plus its 25-byte slack and one
    // request).
    assert!(by(S) <= 5000 + 25 + 100, "{}", by(S));
    assert!(by(S) >= 5000 - 100, "{}", by(S));
    assert!(by(2 * S) - by(S) <= 5000 + 100);
    // After it: the average.
    let late = by(10 * S) - by(5 * S);
    assert!((4900..=5100).contains(&late), "{late}");
}

#[test]
fn new_limits_start_with_empty_buckets() {
    let mut st = ThrottleState::new(one(BucketType::BpsTotal, avg(10)), 0);
    st.account(Direction::Read, 1000, 0);
    assert!(st.wait_ns(Direction::Read, 0) > 0);
    st.set_config(one(BucketType::BpsTotal, avg(20)), 5);
    assert_eq!(st.wait_ns(Direction::Read, 5), 0);
    st.set_config(ThrottleConfig::default(), 6);
    st.account(Direction::Read, u64::MAX, 6);
    assert_eq!(st.wait_ns(Direction::Read, 6), 0);
}

fn bucket_size(b: &BucketConfig) -> u128 {
    if b.max == 0 {
        u128::from(b.avg) * NS / SLACK_DIV
    } else {
        u128::from(b.max) * u128::from(b.burst_length) * NS
    }
}

fn arb_bucket() -> impl Strategy<Value = BucketConfig> {
    (1u64..5_000_000, 0u64..4, 1u64..4).prop_map(|(avg, mult, len)| BucketConfig {
        avg,
        max: if mult == 0 { 0 } else { avg * mult },
        burst_length: if mult == 0 { 1 } else { len },
    })
}

proptest! {
    /// The reference model (the spec): over any stretch between two
    /// starts, what started in it never exceeds the average times the
    /// stretch plus the bucket; a request that waited could not have
    /// started a nanosecond earlier; a backlogged stream never falls
    /// behind the average by more than the bucket and one request.
    #[test]
    fn admitted_never_exceeds_the_budget_and_never_waits_longer_than_needed(
        b in arb_bucket(),
        bytes_bucket in any::<bool>(),
        reqs in proptest::collection::vec((1u64..200_000, 0u64..20_000_000, any::<bool>()), 1..120),
    ) {
        let t = if bytes_bucket { BucketType::BpsTotal } else { BucketType::OpsTotal };
        let cfg = one(t, b);
        prop_assert!(cfg.validate().is_ok());
        let mut st = ThrottleState::new(cfg, 0);
        let mut now = 0u64;
        let mut starts: Vec<(u64, u128)> = Vec::new();
        for (bytes, gap, write) in reqs {
            let dir = if write { Direction::Write } else { Direction::Read };
            now += gap;
            let arrived = now;
            let mut before = st.clone();
            loop {
                let w = st.wait_ns(dir, now);
                if w == 0 { break; }
                before = st.clone();
                now += w;
            }
            if now > arrived {
                prop_assert!(before.wait_ns(dir, now - 1) > 0, "started later than needed");
            }
            st.account(dir, bytes, now);
            let units = if t.is_bytes() { u128::from(bytes) * NS } else { NS };
            starts.push((now, units));
        }
        let size = bucket_size(&b);
        for i in 0..starts.len() {
            let mut sum = 0u128;
            for j in i + 1..starts.len() {
                sum += starts[j - 1].1;
                let budget = size + u128::from(b.avg) * u128::from(starts[j].0 - starts[i].0);
                prop_assert!(sum <= budget, "{} started in [{}, {}] > {}", sum, starts[i].0, starts[j].0, budget);
            }
        }
    }
}

//! The status-transition and verb tables, checked pair by pair against an
//! independent statement of QEMU's rules (`job.c`, QEMU 10.x).

use blockd_jobs::{JobStatus, JobVerb, JOB_STATUS_TRANSITIONS, JOB_VERB_TABLE};
use JobStatus::*;

/// The statuses each status may move to.
fn successors(from: JobStatus) -> &'static [JobStatus] {
    match from {
        Undefined => &[Created],
        Created => &[Running, Aborting, Null],
        Running => &[Paused, Ready, Waiting, Aborting],
        Paused => &[Running],
        Ready => &[Standby, Waiting, Aborting],
        Standby => &[Ready],
        Waiting => &[Pending, Aborting],
        Pending => &[Aborting, Concluded],
        Aborting => &[Aborting, Concluded],
        Concluded => &[Null],
        Null => &[],
    }
}

/// The statuses in which each verb is accepted.
fn accepted_in(verb: JobVerb) -> &'static [JobStatus] {
    match verb {
        JobVerb::Cancel => &[Created, Running, Paused, Ready, Standby, Waiting, Pending],
        JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
            &[Created, Running, Paused, Ready, Standby]
        }
        JobVerb::Complete => &[Ready, Standby],
        JobVerb::Finalize => &[Pending],
        JobVerb::Dismiss => &[Concluded],
    }
}

#[test]
fn every_transition_pair() {
    let mut allowed = 0;
    for &from in JobStatus::ALL {
        for &to in JobStatus::ALL {
            let expected = successors(from).contains(&to);
            assert_eq!(from.can_transition_to(to), expected, "{from} -> {to}");
            assert_eq!(JOB_STATUS_TRANSITIONS[from as usize][to as usize], expected);
            allowed += usize::from(expected);
        }
    }
    assert_eq!(allowed, 20);
    // Nothing leads back to undefined, nothing leaves null.
    assert!(JobStatus::ALL
        .iter()
        .all(|s| !s.can_transition_to(Undefined)));
    assert!(JobStatus::ALL.iter().all(|s| !Null.can_transition_to(*s)));
}

#[test]
fn every_verb_status_pair() {
    let mut allowed = 0;
    for &verb in JobVerb::ALL {
        for &status in JobStatus::ALL {
            let expected = accepted_in(verb).contains(&status);
            assert_eq!(status.accepts(verb), expected, "{verb} in {status}");
            assert_eq!(JOB_VERB_TABLE[verb as usize][status as usize], expected);
            allowed += usize::from(expected);
        }
    }
    assert_eq!(allowed, 7 + 5 * 4 + 2 + 1 + 1);
}

#[test]
fn status_predicates() {
    let ready: Vec<_> = JobStatus::ALL.iter().filter(|s| s.is_ready()).collect();
    assert_eq!(ready, [&Ready, &Standby]);
    let completed: Vec<_> = JobStatus::ALL.iter().filter(|s| s.is_completed()).collect();
    assert_eq!(
        completed,
        [&Waiting, &Pending, &Aborting, &Concluded, &Null]
    );
}

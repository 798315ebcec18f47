//! Job statuses, command verbs and job types, and the two tables that govern
//! them: which status may follow which ([`JOB_STATUS_TRANSITIONS`]) and which
//! verb a job accepts in which status ([`JOB_VERB_TABLE`]).
//!
//! Both tables hold the same facts as QEMU's `JobSTT` and `JobVerbTable`
//! (`job.c`, QEMU 10.x); the enums carry QEMU's QAPI wire names
//! (`qapi/job.json`) and are declared in QAPI order, so `as usize` is the
//! QAPI enum index.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string that is not the wire name of any value of an enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a valid {kind}")]
pub struct ParseWireNameError {
    /// The QAPI type name (`JobStatus`, `JobVerb`, ...).
    pub kind: &'static str,
    /// The rejected string.
    pub value: String,
}

/// Declares a fieldless enum whose values have QAPI wire names, with
/// `ALL`, `COUNT`, `as_str`, `Display`, `FromStr` and serde support.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            /// Every value, in QAPI declaration order (index = `as usize`).
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// Number of values.
            pub const COUNT: usize = Self::ALL.len();

            /// The QAPI wire name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseWireNameError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| ParseWireNameError {
                        kind: stringify!($name),
                        value: s.to_owned(),
                    })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

wire_enum! {
    /// The status of a job (QAPI `JobStatus`).
    pub enum JobStatus {
        /// Erroneous default; only a job under construction has it.
        Undefined => "undefined",
        /// Created but not started.
        Created => "created",
        /// The body is running.
        Running => "running",
        /// Running, but parked at a pause point.
        Paused => "paused",
        /// Running, waiting for `job-complete` (mirror, active commit).
        Ready => "ready",
        /// Ready, but parked at a pause point.
        Standby => "standby",
        /// Finished; waiting for the rest of its transaction.
        Waiting => "waiting",
        /// Finished; waiting to be finalized.
        Pending => "pending",
        /// Failing or cancelled; about to conclude with an error.
        Aborting => "aborting",
        /// All work done; waiting to be dismissed.
        Concluded => "concluded",
        /// Being torn down; never visible in queries.
        Null => "null",
    }
}

wire_enum! {
    /// A command verb that can be applied to a job (QAPI `JobVerb`).
    pub enum JobVerb {
        /// `job-cancel`, `block-job-cancel`.
        Cancel => "cancel",
        /// `job-pause`, `block-job-pause`.
        Pause => "pause",
        /// `job-resume`, `block-job-resume`.
        Resume => "resume",
        /// `block-job-set-speed`.
        SetSpeed => "set-speed",
        /// `job-complete`, `block-job-complete`.
        Complete => "complete",
        /// `job-dismiss`, `block-job-dismiss`.
        Dismiss => "dismiss",
        /// `job-finalize`, `block-job-finalize`.
        Finalize => "finalize",
        /// `block-job-change` (QEMU 8.2+).
        Change => "change",
    }
}

wire_enum! {
    /// The kind of a job (QAPI `JobType`).
    pub enum JobType {
        /// `block-commit`.
        Commit => "commit",
        /// `block-stream`.
        Stream => "stream",
        /// `drive-mirror` / `blockdev-mirror`.
        Mirror => "mirror",
        /// `drive-backup` / `blockdev-backup`.
        Backup => "backup",
        /// `blockdev-create`.
        Create => "create",
        /// `x-blockdev-amend`.
        Amend => "amend",
        /// `snapshot-load`.
        SnapshotLoad => "snapshot-load",
        /// `snapshot-save`.
        SnapshotSave => "snapshot-save",
        /// `snapshot-delete`.
        SnapshotDelete => "snapshot-delete",
    }
}

impl JobType {
    /// True for the types QEMU implements as block jobs (`BlockJob`):
    /// commit, stream, mirror and backup. Only these are visible to the
    /// `block-job-*` commands and `query-block-jobs`, and only these emit
    /// the legacy `BLOCK_JOB_*` events.
    pub const fn is_block_job(self) -> bool {
        matches!(
            self,
            JobType::Commit | JobType::Stream | JobType::Mirror | JobType::Backup
        )
    }
}

const Y: bool = true;
const N: bool = false;

/// Legal status transitions: `JOB_STATUS_TRANSITIONS[from][to]`, indexed by
/// `JobStatus as usize` (QEMU's `JobSTT`). A transition to the same status
/// is legal only where the table says so (`aborting → aborting`), and emits
/// no event.
///
/// Columns: U undefined, C created, R running, P paused, Y ready,
/// S standby, W waiting, D pending, X aborting, E concluded, N null.
#[rustfmt::skip]
pub const JOB_STATUS_TRANSITIONS: [[bool; JobStatus::COUNT]; JobStatus::COUNT] = [
    //               U  C  R  P  Y  S  W  D  X  E  N
    /* undefined */ [N, Y, N, N, N, N, N, N, N, N, N],
    /* created   */ [N, N, Y, N, N, N, N, N, Y, N, Y],
    /* running   */ [N, N, N, Y, Y, N, Y, N, Y, N, N],
    /* paused    */ [N, N, Y, N, N, N, N, N, N, N, N],
    /* ready     */ [N, N, N, N, N, Y, Y, N, Y, N, N],
    /* standby   */ [N, N, N, N, Y, N, N, N, N, N, N],
    /* waiting   */ [N, N, N, N, N, N, N, Y, Y, N, N],
    /* pending   */ [N, N, N, N, N, N, N, N, Y, Y, N],
    /* aborting  */ [N, N, N, N, N, N, N, N, Y, Y, N],
    /* concluded */ [N, N, N, N, N, N, N, N, N, N, Y],
    /* null      */ [N, N, N, N, N, N, N, N, N, N, N],
];

/// Verbs accepted per status: `JOB_VERB_TABLE[verb][status]`, indexed by
/// `JobVerb as usize` and `JobStatus as usize` (QEMU's `JobVerbTable`).
/// Columns as in [`JOB_STATUS_TRANSITIONS`].
#[rustfmt::skip]
pub const JOB_VERB_TABLE: [[bool; JobStatus::COUNT]; JobVerb::COUNT] = [
    //               U  C  R  P  Y  S  W  D  X  E  N
    /* cancel    */ [N, Y, Y, Y, Y, Y, Y, Y, N, N, N],
    /* pause     */ [N, Y, Y, Y, Y, Y, N, N, N, N, N],
    /* resume    */ [N, Y, Y, Y, Y, Y, N, N, N, N, N],
    /* set-speed */ [N, Y, Y, Y, Y, Y, N, N, N, N, N],
    /* complete  */ [N, N, N, N, Y, Y, N, N, N, N, N],
    /* dismiss   */ [N, N, N, N, N, N, N, N, N, Y, N],
    /* finalize  */ [N, N, N, N, N, N, N, Y, N, N, N],
    /* change    */ [N, Y, Y, Y, Y, Y, N, N, N, N, N],
];

impl JobStatus {
    /// Whether [`JOB_STATUS_TRANSITIONS`] allows `self → to`.
    pub const fn can_transition_to(self, to: JobStatus) -> bool {
        JOB_STATUS_TRANSITIONS[self as usize][to as usize]
    }

    /// Whether [`JOB_VERB_TABLE`] allows `verb` in this status.
    pub const fn accepts(self, verb: JobVerb) -> bool {
        JOB_VERB_TABLE[verb as usize][self as usize]
    }

    /// QEMU's `job_is_ready`: ready or standby.
    pub const fn is_ready(self) -> bool {
        matches!(self, JobStatus::Ready | JobStatus::Standby)
    }

    /// QEMU's `job_is_completed`: the body has finished (waiting, pending,
    /// aborting, concluded, null).
    pub const fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

pub use blockd_core::qapi::id_wellformed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(*s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for v in JobVerb::ALL {
            assert_eq!(v.as_str().parse::<JobVerb>(), Ok(*v));
        }
        for t in JobType::ALL {
            assert_eq!(t.as_str().parse::<JobType>(), Ok(*t));
            let back: JobType = serde_json::from_value(serde_json::json!(t.as_str())).unwrap();
            assert_eq!(back, *t);
        }
        assert_eq!(JobVerb::SetSpeed.as_str(), "set-speed");
        assert_eq!(JobType::SnapshotDelete.as_str(), "snapshot-delete");
        let err = "bogus".parse::<JobVerb>().unwrap_err();
        assert_eq!(err.to_string(), "'bogus' is not a valid JobVerb");
    }

    #[test]
    fn qapi_order() {
        let names: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null"
            ]
        );
        let verbs: Vec<_> = JobVerb::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(
            verbs,
            [
                "cancel",
                "pause",
                "resume",
                "set-speed",
                "complete",
                "dismiss",
                "finalize",
                "change"
            ]
        );
        let types: Vec<_> = JobType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "commit",
                "stream",
                "mirror",
                "backup",
                "create",
                "amend",
                "snapshot-load",
                "snapshot-save",
                "snapshot-delete"
            ]
        );
    }

    #[test]
    fn block_job_types() {
        let block: Vec<_> = JobType::ALL
            .iter()
            .filter(|t| t.is_block_job())
            .map(|t| t.as_str())
            .collect();
        assert_eq!(block, ["commit", "stream", "mirror", "backup"]);
    }

    #[test]
    fn ids() {
        for good in ["a", "Z", "job0", "a-b.c_d", "x1-", "a.", &"a".repeat(200)] {
            assert!(id_wellformed(good), "{good}");
        }
        for bad in [
            "", "1abc", "-a", "_a", ".a", "a b", "a#b", "a/b", "é", "aé", "a:b",
        ] {
            assert!(!id_wellformed(bad), "{bad}");
        }
    }
}

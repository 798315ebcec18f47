//! The error returned by job commands, with QEMU's wording.

use crate::status::{JobStatus, JobVerb};

/// The QMP error class of a [`JobError`]. The QMP layer maps it to its own
/// error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobErrorClass {
    /// `GenericError`: every job error except an unknown block job.
    GenericError,
    /// `DeviceNotActive`: a `block-job-*` command named no block job.
    DeviceNotActive,
}

impl JobErrorClass {
    /// The QMP wire name of the class.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobErrorClass::GenericError => "GenericError",
            JobErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// A refused job command: a QMP error class and QEMU's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct JobError {
    /// The QMP error class.
    pub class: JobErrorClass,
    /// The human-readable message (QMP `desc`).
    pub desc: String,
}

/// The message QEMU records for a job that was cancelled without an error of
/// its own (`strerror(ECANCELED)` on glibc).
pub const CANCELED_MESSAGE: &str = "Operation canceled";

impl JobError {
    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        JobError {
            class: JobErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotActive` error with `desc`.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        JobError {
            class: JobErrorClass::DeviceNotActive,
            desc: desc.into(),
        }
    }

    /// The error class.
    pub fn class(&self) -> JobErrorClass {
        self.class
    }

    /// The message.
    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// `job-*` commands naming no job: `Job not found`.
    pub fn job_not_found() -> Self {
        Self::generic("Job not found")
    }

    /// `block-job-*` commands naming no block job:
    /// `Block job 'ID' not found` (DeviceNotActive).
    pub fn block_job_not_found(id: &str) -> Self {
        Self::device_not_active(format!("Block job '{id}' not found"))
    }

    /// A verb refused by the verb table:
    /// `Job 'ID' in state 'STATE' cannot accept command verb 'VERB'`.
    pub fn verb_refused(id: &str, status: JobStatus, verb: JobVerb) -> Self {
        Self::generic(format!(
            "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
        ))
    }

    /// A job ID that is not well-formed: `Invalid job ID 'ID'`.
    pub fn invalid_id(id: &str) -> Self {
        Self::generic(format!("Invalid job ID '{id}'"))
    }

    /// A job ID already taken: `Job ID 'ID' already in use`.
    pub fn id_in_use(id: &str) -> Self {
        Self::generic(format!("Job ID '{id}' already in use"))
    }
}

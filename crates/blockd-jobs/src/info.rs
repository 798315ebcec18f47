//! Query results: `query-jobs` ([`JobInfo`]) and `query-block-jobs`
//! ([`BlockJobInfo`]), serialised as QEMU's QAPI structs.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::events::IoStatus;
use crate::status::{JobStatus, JobType};

/// One job as listed by `query-jobs` (QAPI `JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job ID.
    pub id: String,
    /// The kind of job.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The current status.
    pub status: JobStatus,
    /// Work done so far (arbitrary unit).
    pub current_progress: u64,
    /// Estimated `current-progress` at completion.
    pub total_progress: u64,
    /// Present once the job has failed or been cancelled: the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One block job as listed by `query-block-jobs` (QAPI `BlockJobInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The kind of job.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job ID (named `device` for historical reasons).
    pub device: String,
    /// Estimated total work (`total-progress`).
    pub len: u64,
    /// Work done (`current-progress`).
    pub offset: u64,
    /// Whether the body is running right now (not parked).
    pub busy: bool,
    /// Whether a pause is requested or in effect (pause count > 0).
    pub paused: bool,
    /// The rate limit in bytes per second (0: unlimited).
    pub speed: i64,
    /// The I/O status.
    pub io_status: IoStatus,
    /// Whether the job is ready or on standby.
    pub ready: bool,
    /// The current status.
    pub status: JobStatus,
    /// Whether the job finalizes itself when pending.
    pub auto_finalize: bool,
    /// Whether the job dismisses itself when concluded.
    pub auto_dismiss: bool,
    /// Present once the job has failed or been cancelled: the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Job-type specific members of the QAPI union (for example mirror's
    /// `actively-synced`), from [`crate::JobDriver::query_block_job`].
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_info_wire_form() {
        let mut info = JobInfo {
            id: "j".into(),
            job_type: JobType::Create,
            status: JobStatus::Concluded,
            current_progress: 1,
            total_progress: 1,
            error: None,
        };
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            json!({"id": "j", "type": "create", "status": "concluded",
                   "current-progress": 1, "total-progress": 1})
        );
        info.error = Some("boom".into());
        assert_eq!(serde_json::to_value(&info).unwrap()["error"], "boom");
    }

    #[test]
    fn block_job_info_wire_form() {
        let mut extra = Map::new();
        extra.insert("actively-synced".into(), json!(false));
        let info = BlockJobInfo {
            job_type: JobType::Mirror,
            device: "m".into(),
            len: 10,
            offset: 5,
            busy: false,
            paused: true,
            speed: 0,
            io_status: IoStatus::Ok,
            ready: true,
            status: JobStatus::Standby,
            auto_finalize: true,
            auto_dismiss: true,
            error: None,
            extra,
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(
            v,
            json!({"type": "mirror", "device": "m", "len": 10, "offset": 5,
                   "busy": false, "paused": true, "speed": 0, "io-status": "ok",
                   "ready": true, "status": "standby", "auto-finalize": true,
                   "auto-dismiss": true, "actively-synced": false})
        );
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.first().map(String::as_str), Some("type"));
        assert_eq!(keys.last().map(String::as_str), Some("actively-synced"));
    }
}

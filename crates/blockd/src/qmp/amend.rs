//! `x-blockdev-amend` (QEMU's `qmp_x_blockdev_amend`, `block/amend.c`):
//! a job that changes options of an open image through the driver's
//! amend callback. qcow2's (`qcow2_co_amend`) can only change the
//! encryption; blockd opens no encrypted images, so an `encrypt` change
//! fails in the job as QEMU's does for an image that is not encrypted,
//! and an amend without changes concludes successfully.

use blockd_jobs::{JobCtx, JobDriver, JobFuture, JobOptions, JobType};
use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::Deserialize;
use serde_json::Value;

use super::blockjob::lookup_bs;
use super::job::jerr;
use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Amend {
    job_id: String,
    node_name: String,
    options: Value,
    #[allow(dead_code)]
    force: Option<bool>,
}

/// The body of an `amend` job on a qcow2 node.
struct Qcow2AmendJob {
    encrypt: bool,
}

impl JobDriver for Qcow2AmendJob {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        let encrypt = self.encrypt;
        Box::pin(async move {
            ctx.set_total(1);
            let r = if encrypt {
                Err("image is not encrypted, can't amend".to_string())
            } else {
                Ok(())
            };
            ctx.add_progress(1);
            r
        })
    }
}

async fn amend(st: &State, a: Amend) -> R<()> {
    let bs = lookup_bs(st, None, Some(&a.node_name))?;
    // The schema checked the options: a known driver, its members valid.
    let driver = a.options["driver"].as_str().unwrap_or_default();
    if bs.driver().format_name() != driver {
        return Err(QmpError::generic(
            "x-blockdev-amend doesn't support changing the block driver",
        ));
    }
    if driver != "qcow2" {
        return Err(QmpError::generic(
            "Driver does not support x-blockdev-amend",
        ));
    }
    let job = Box::new(Qcow2AmendJob {
        encrypt: a.options.get("encrypt").is_some(),
    });
    // QEMU's amend job finalizes itself but waits for job-dismiss.
    let options = JobOptions {
        auto_finalize: true,
        auto_dismiss: false,
    };
    let handle = st
        .jobs
        .create(&a.job_id, JobType::Amend, options, job)
        .map_err(jerr)?;
    handle.start();
    Ok(())
}

/// Registers `x-blockdev-amend`.
pub fn register(d: &mut Dispatcher<State>) {
    d.register("x-blockdev-amend", |cx: Ctx<State>, a: Amend| async move {
        amend(&cx.state, a).await?;
        R::Ok(Empty {})
    });
}

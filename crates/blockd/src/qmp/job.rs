//! Jobs: `blockdev-create`, `query-jobs` and the `job-*` verbs.

use std::sync::Weak;

use blockd_core::{Perm, PermPair, Root, RootKind};
use blockd_drivers::create::{create_file, FileCreateOptions};
use blockd_drivers::options::BlockdevRef;
use blockd_drivers::qcow2::create::Qcow2CreateOptions;
use blockd_jobs::{JobCtx, JobDriver, JobError, JobErrorClass, JobFuture, JobOptions, JobType};
use blockd_qmp::{Ctx, Dispatcher, Empty, ErrorClass, NoArgs, QmpError};
use serde::Deserialize;
use serde_json::Value;

use crate::state::State;

type R<T> = Result<T, QmpError>;

/// A job error as a QMP error, with the class the job layer chose.
pub fn jerr(e: JobError) -> QmpError {
    let class = match e.class {
        JobErrorClass::DeviceNotActive => ErrorClass::DeviceNotActive,
        _ => ErrorClass::GenericError,
    };
    QmpError::with_class(class, e.desc)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobId {
    id: String,
}

#[derive(Deserialize)]
#[serde(tag = "driver")]
enum CreateOptions {
    #[serde(rename = "file")]
    File(FileCreateOptions),
    #[serde(rename = "qcow2")]
    Qcow2(Qcow2CreateOptions),
    #[cfg(feature = "rbd")]
    #[serde(rename = "rbd")]
    Rbd(Box<blockd_drivers::rbd::create::RbdCreateOptions>),
    #[cfg(not(feature = "rbd"))]
    #[serde(rename = "rbd")]
    Rbd(serde::de::IgnoredAny),
    #[serde(other)]
    Unsupported,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockdevCreate {
    #[serde(rename = "job-id")]
    job_id: String,
    options: Value,
}

/// The body of a `create` job for the file driver: the blocking work runs
/// on the blocking pool, so the event loop never waits for the disk.
struct FileCreateJob {
    opts: FileCreateOptions,
}

impl JobDriver for FileCreateJob {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        let opts = self.opts.clone();
        Box::pin(async move {
            ctx.set_total(1);
            let r = tokio::task::spawn_blocking(move || create_file(&opts))
                .await
                .map_err(|e| format!("image creation failed: {e}"))?;
            // QEMU counts the step as done whether or not it succeeded.
            ctx.add_progress(1);
            r.map_err(|e| e.msg)
        })
    }
}

/// The body of a `create` job for qcow2: the image is written onto an
/// existing node, which the job holds (write and resize, as QEMU's
/// creation takes them) while it writes.
struct Qcow2CreateJob {
    /// Weak: the job lives in the state's job list.
    state: Weak<State>,
    opts: Qcow2CreateOptions,
}

impl Qcow2CreateJob {
    async fn create(&self) -> Result<(), String> {
        blockd_drivers::qcow2::create::validate(&self.opts).map_err(|e| e.msg)?;
        let name = match &self.opts.file {
            BlockdevRef::Reference(r) => r.clone(),
            BlockdevRef::Definition(_) => {
                return Err("blockd's qcow2 creation needs 'file' to name an existing node".into())
            }
        };
        let state = self.state.upgrade().ok_or("the server is shutting down")?;
        let graph = &state.graph;
        let node = graph
            .get(&name)
            .ok_or_else(|| format!("Cannot find device='{name}' nor node-name='{name}'"))?;
        // QEMU's qcow2 creation holds the node through an anonymous
        // backend with write and resize.
        let perm = PermPair {
            perm: Perm::WRITE | Perm::RESIZE,
            shared: Perm::ALL,
        };
        let root = Root::new(RootKind::Job, "", perm);
        graph.attach_root(&root, &node).map_err(|e| e.msg)?;
        let r = blockd_drivers::qcow2::create::create(&node, &self.opts).await;
        graph.detach_root(&root);
        r.map_err(|e| e.msg)
    }
}

impl JobDriver for Qcow2CreateJob {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        Box::pin(async move {
            ctx.set_total(1);
            let r = self.create().await;
            ctx.add_progress(1);
            r
        })
    }
}

/// The body of a `create` job for rbd: connecting and creating block,
/// so they run on the blocking pool.
#[cfg(feature = "rbd")]
struct RbdCreateJob {
    opts: blockd_drivers::rbd::create::RbdCreateOptions,
    secrets: Option<std::sync::Arc<dyn blockd_drivers::secrets::Secrets>>,
}

#[cfg(feature = "rbd")]
impl JobDriver for RbdCreateJob {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        let opts = self.opts.clone();
        let secrets = self.secrets.clone();
        Box::pin(async move {
            ctx.set_total(1);
            let r = tokio::task::spawn_blocking(move || {
                blockd_drivers::rbd::create::create(&opts, secrets.as_deref())
            })
            .await
            .map_err(|e| format!("image creation failed: {e}"))?;
            ctx.add_progress(1);
            r.map_err(|e| e.msg)
        })
    }
}

macro_rules! verb {
    ($d:expr, $name:literal, $method:ident) => {
        $d.register($name, |cx: Ctx<State>, a: JobId| async move {
            cx.state.jobs.$method(&a.id).map_err(jerr)?;
            R::Ok(Empty {})
        });
    };
}

/// Registers the job commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "blockdev-create",
        |cx: Ctx<State>, a: BlockdevCreate| async move {
            let opts: CreateOptions = serde_json::from_value(a.options)
                .map_err(|e| QmpError::generic(format!("internal error: {e}")))?;
            let job: Box<dyn JobDriver> = match opts {
                CreateOptions::File(f) => Box::new(FileCreateJob { opts: f }),
                CreateOptions::Qcow2(q) => Box::new(Qcow2CreateJob {
                    state: std::sync::Arc::downgrade(&cx.state),
                    opts: q,
                }),
                #[cfg(feature = "rbd")]
                CreateOptions::Rbd(o) => Box::new(RbdCreateJob {
                    opts: *o,
                    secrets: cx.state.env.secrets.clone(),
                }),
                // As QEMU without its rbd module.
                #[cfg(not(feature = "rbd"))]
                CreateOptions::Rbd(_) => {
                    return Err(QmpError::generic(
                        "Block driver 'rbd' not found or not supported",
                    ));
                }
                CreateOptions::Unsupported => {
                    return Err(QmpError::generic("Driver does not support blockdev-create"));
                }
            };
            // QEMU's blockdev-create job finalizes itself but waits for
            // job-dismiss.
            let options = JobOptions {
                auto_finalize: true,
                auto_dismiss: false,
            };
            let handle = cx
                .state
                .jobs
                .create(&a.job_id, JobType::Create, options, job)
                .map_err(jerr)?;
            handle.start();
            R::Ok(Empty {})
        },
    );
    d.register("query-jobs", |cx: Ctx<State>, _: NoArgs| async move {
        R::Ok(cx.state.jobs.query())
    });
    // These change a job's state only: no control-plane lock.
    verb!(d, "job-pause", pause);
    verb!(d, "job-resume", resume);
    verb!(d, "job-complete", complete);
    verb!(d, "job-dismiss", dismiss);
    // These may finalize or abort a job on the spot, which runs its
    // finalization callbacks under the control-plane lock (QEMU: the BQL).
    d.register("job-finalize", |cx: Ctx<State>, a: JobId| async move {
        let g = cx.state.control.lock().await;
        cx.state.jobs.finalize(&g, &a.id).await.map_err(jerr)?;
        R::Ok(Empty {})
    });
    d.register("job-cancel", |cx: Ctx<State>, a: JobId| async move {
        let g = cx.state.control.lock().await;
        // job-cancel is always a forced cancel in QEMU.
        cx.state.jobs.cancel(&g, &a.id, true).await.map_err(jerr)?;
        R::Ok(Empty {})
    });
}

//! `block_set_io_throttle` (QEMU's `qmp_block_set_io_throttle`,
//! `blockdev.c`): I/O limits on a device's backend, shared by the backends
//! that name the same `group`.

use blockd_core::throttle::{BucketType, ThrottleConfig};
use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::Deserialize;

use crate::state::State;

type R<T> = Result<T, QmpError>;

/// `BlockIOThrottle`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockIoThrottle {
    device: Option<String>,
    id: Option<String>,
    bps: i64,
    bps_rd: i64,
    bps_wr: i64,
    iops: i64,
    iops_rd: i64,
    iops_wr: i64,
    bps_max: Option<i64>,
    bps_rd_max: Option<i64>,
    bps_wr_max: Option<i64>,
    iops_max: Option<i64>,
    iops_rd_max: Option<i64>,
    iops_wr_max: Option<i64>,
    bps_max_length: Option<i64>,
    bps_rd_max_length: Option<i64>,
    bps_wr_max_length: Option<i64>,
    iops_max_length: Option<i64>,
    iops_rd_max_length: Option<i64>,
    iops_wr_max_length: Option<i64>,
    iops_size: Option<i64>,
    group: Option<String>,
}

impl BlockIoThrottle {
    /// The limits, as QEMU fills its `ThrottleConfig`: the integers are
    /// taken as unsigned (a negative one is then out of range) and the
    /// burst lengths as 32-bit, as QEMU's fields are.
    fn config(&self) -> ThrottleConfig {
        use BucketType::*;
        let mut c = ThrottleConfig::default();
        let rows = [
            (BpsTotal, self.bps, self.bps_max, self.bps_max_length),
            (
                BpsRead,
                self.bps_rd,
                self.bps_rd_max,
                self.bps_rd_max_length,
            ),
            (
                BpsWrite,
                self.bps_wr,
                self.bps_wr_max,
                self.bps_wr_max_length,
            ),
            (OpsTotal, self.iops, self.iops_max, self.iops_max_length),
            (
                OpsRead,
                self.iops_rd,
                self.iops_rd_max,
                self.iops_rd_max_length,
            ),
            (
                OpsWrite,
                self.iops_wr,
                self.iops_wr_max,
                self.iops_wr_max_length,
            ),
        ];
        for (t, avg, max, len) in rows {
            let b = c.bucket_mut(t);
            b.avg = avg as u64;
            if let Some(m) = max {
                b.max = m as u64;
            }
            if let Some(l) = len {
                b.burst_length = u64::from(l as u32);
            }
        }
        if let Some(s) = self.iops_size {
            c.op_size = s as u64;
        }
        c
    }
}

/// Registers `block_set_io_throttle`.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "block_set_io_throttle",
        |cx: Ctx<State>, a: BlockIoThrottle| async move {
            let st = &cx.state;
            // One membership change at a time.
            let _g = st.control.lock().await;
            let blk = st
                .machine
                .lock()
                .get_blk(a.device.as_deref(), a.id.as_deref())?;
            if blk.root().is_none() {
                return Err(QmpError::generic("Device has no medium"));
            }
            let cfg = a.config();
            cfg.validate().map_err(QmpError::generic)?;
            let root = blk.root_handle();
            if cfg.enabled() {
                let current = root.throttle();
                let name = a.group.as_deref();
                let join = match &current {
                    None => Some(
                        name.or(a.device.as_deref())
                            .or(a.id.as_deref())
                            .unwrap_or_default(),
                    ),
                    // QEMU's blk_io_limits_update_group.
                    Some(m) => name.filter(|n| *n != m.group().name()),
                };
                if let Some(n) = join {
                    let m = st.throttle_groups.get_or_create(n).join();
                    // The old membership (if any) is released here.
                    drop(root.set_throttle(Some(m)));
                }
                if let Some(m) = root.throttle() {
                    m.group().set_config(cfg);
                }
            } else {
                drop(root.set_throttle(None));
            }
            R::Ok(Empty {})
        },
    );
}

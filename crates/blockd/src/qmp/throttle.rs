//! `block_set_io_throttle` (QEMU's `qmp_block_set_io_throttle`,
//! `blockdev.c`): I/O limits on a device's backend, shared by the backends
//! that name the same `group`.

use blockd_core::throttle::{BucketType, ThrottleConfig};
use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::Deserialize;

use crate::machine::io_limits;
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
    /// taken as unsigned, as QEMU's 64-bit fields take them (a negative
    /// one is then out of range; a negative burst length is too long for
    /// any burst rate, as qemu-storage-daemon's throttle-group objects
    /// show).
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
                b.burst_length = l as u64;
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
            // The device's own group if it is in none and names none.
            let own = a.device.as_deref().or(a.id.as_deref()).unwrap_or_default();
            io_limits::apply(
                &st.throttle_groups,
                blk.root_handle(),
                cfg,
                a.group.as_deref(),
                own,
            );
            R::Ok(Empty {})
        },
    );
}

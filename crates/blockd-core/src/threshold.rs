//! Write thresholds (QEMU's `block/write-threshold.c`): a node may carry
//! an offset; the first write, write-zeroes or discard that reaches past
//! it disarms the threshold (back to 0) and reports once, through the
//! sink given with the threshold, how far past it went. The request path
//! checks it before the request runs (QEMU's `bdrv_co_write_req_prepare`):
//! writes and write-zeroes with their range padded to the node's
//! alignment, discards as requested.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::node::BlockNode;

/// Where a crossed threshold is reported: `(node-name, amount exceeded,
/// threshold)`, QEMU's `BLOCK_WRITE_THRESHOLD`.
pub type ThresholdSink = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// A node's write threshold (0: none).
#[derive(Default)]
pub struct WriteThreshold {
    offset: AtomicU64,
    sink: Mutex<Option<ThresholdSink>>,
}

impl WriteThreshold {
    /// The armed threshold (0: none).
    pub fn get(&self) -> u64 {
        self.offset.load(Ordering::Acquire)
    }

    fn set(&self, offset: u64, sink: Option<ThresholdSink>) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = sink;
        self.offset.store(offset, Ordering::Release);
    }

    /// A request touching `[offset, end)` is about to run on `node`.
    pub(crate) fn check(&self, node: &str, end: u64) {
        let mut wtr = self.offset.load(Ordering::Relaxed);
        loop {
            if wtr == 0 || wtr >= end {
                return;
            }
            match self
                .offset
                .compare_exchange(wtr, 0, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => wtr = now,
            }
        }
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(s) = sink {
            s(node, end - wtr, wtr);
        }
    }
}

impl BlockNode {
    /// Arms (or with 0, disarms) the node's write threshold (QEMU's
    /// `bdrv_write_threshold_set`); `sink` hears of the crossing.
    pub fn set_write_threshold(&self, offset: u64, sink: Option<ThresholdSink>) {
        self.threshold.set(offset, sink);
    }

    /// The armed write threshold (0: none), QEMU's
    /// `bdrv_write_threshold_get`.
    pub fn write_threshold(&self) -> u64 {
        self.threshold.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_past_the_threshold_then_disarms() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let t = WriteThreshold::default();
        t.set(
            1000,
            Some(Arc::new(move |n: &str, a, w| {
                s.lock().unwrap().push((n.to_string(), a, w))
            })),
        );
        t.check("n", 1000);
        assert_eq!(t.get(), 1000, "reaching the threshold is not past it");
        t.check("n", 1500);
        t.check("n", 4000);
        assert_eq!(t.get(), 0);
        assert_eq!(*seen.lock().unwrap(), vec![("n".to_string(), 500, 1000)]);
    }
}

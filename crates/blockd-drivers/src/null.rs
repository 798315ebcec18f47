//! `null-co`: a node of a given size that discards writes and reads zeroes.
//! Every request takes `latency-ns` (default 0). Useful for tests and
//! benchmarks of everything above the storage.

use std::time::Duration;

use blockd_core::{BlockDriver, BlockError, BlockStatus, IoFuture, ReqFlags};
use bytes::Bytes;

use crate::options::NullOptions;

/// Default length: 1 GiB, as QEMU.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The `null-co` driver.
#[derive(Debug)]
pub struct NullDriver {
    size: u64,
    latency: Option<Duration>,
    read_zeroes: bool,
}

/// Checks the options (QEMU aborts on a negative size; blockd refuses it).
pub fn check(o: &NullOptions) -> Result<(), BlockError> {
    if let Some(s) = o.size {
        if s < 0 {
            return Err(BlockError::invalid(
                "Parameter 'size' expects a non-negative size",
            ));
        }
    }
    if let Some(l) = o.latency_ns {
        if l > i64::MAX as u64 {
            return Err(BlockError::invalid("latency-ns is invalid"));
        }
    }
    Ok(())
}

/// Opens a `null-co` node.
pub fn open(o: NullOptions) -> Result<NullDriver, BlockError> {
    check(&o)?;
    Ok(NullDriver {
        size: o.size.map(|s| s as u64).unwrap_or(DEFAULT_SIZE),
        latency: o.latency_ns.filter(|&l| l > 0).map(Duration::from_nanos),
        read_zeroes: o.read_zeroes.unwrap_or(false),
    })
}

impl NullDriver {
    async fn delay(&self) {
        if let Some(l) = self.latency {
            tokio::time::sleep(l).await;
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        "null-co"
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> Option<String> {
        Some("null-co://".to_string())
    }

    fn read(&self, _offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            self.delay().await;
            // QEMU leaves the buffer untouched without read-zeroes; blockd
            // never hands out uninitialised memory, so reads are zeroes.
            Ok(Bytes::from(vec![0u8; len]))
        })
    }

    fn write(&self, _offset: u64, _data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            Ok(BlockStatus {
                len,
                data: !self.read_zeroes,
                zero: self.read_zeroes,
                allocated: true,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: Option<i64>) -> NullOptions {
        NullOptions {
            size,
            latency_ns: None,
            read_zeroes: Some(true),
        }
    }

    #[test]
    fn negative_size_is_refused() {
        assert!(check(&opts(Some(-1))).is_err());
        assert!(check(&opts(Some(0))).is_ok());
    }

    #[tokio::test]
    async fn reads_zeroes_discards_writes() {
        let d = open(opts(Some(4096))).unwrap();
        assert_eq!(d.length(), 4096);
        d.write(0, Bytes::from_static(b"abc"), ReqFlags::default())
            .await
            .unwrap();
        assert_eq!(&d.read(0, 3).await.unwrap()[..], &[0, 0, 0]);
        let st = d.block_status(0, 4096).await.unwrap();
        assert!(st.zero && st.allocated);
    }
}

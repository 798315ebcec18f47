//! Serves a writable in-memory export named `e` on a Unix socket until
//! interrupted, for manual tests and benchmarks:
//!
//! ```text
//! cargo run --release -p blockd-nbd --example mem_server -- /tmp/e.sock 128M
//! qemu-img bench -f raw -t none -c 20000 -d 16 -s 4096 'nbd+unix:///e?socket=/tmp/e.sock'
//! ```

use std::io;
use std::sync::{Arc, RwLock};

use blockd_core::{BlockStatus, IoFuture};
use blockd_nbd::{ExportConfig, ExportIo, Listen, NbdServer, ServerOptions};
use bytes::Bytes;

/// A flat in-memory disk.
struct Mem(RwLock<Vec<u8>>);

impl Mem {
    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }
}

impl ExportIo for Mem {
    fn length(&self) -> u64 {
        self.0.read().unwrap().len() as u64
    }

    fn block_limits(&self) -> (u32, u32, u32) {
        (1, 4096, 32 << 20)
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        let r = self.range(offset, len as u64);
        let b = Bytes::copy_from_slice(&self.0.read().unwrap()[r]);
        Box::pin(async move { Ok(b) })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        let r = self.range(offset, data.len() as u64);
        self.0.write().unwrap()[r].copy_from_slice(&data);
        Box::pin(async { Ok(()) })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _: bool, _: bool, _: bool) -> IoFuture<'_, ()> {
        let r = self.range(offset, len);
        self.0.write().unwrap()[r].fill(0);
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            Ok(BlockStatus {
                len,
                data: true,
                zero: false,
                allocated: true,
            })
        })
    }

    fn allocation_depth(&self, _offset: u64, len: u64) -> IoFuture<'_, (u64, u32)> {
        Box::pin(async move { Ok((len, 1)) })
    }
}

/// A size as QEMU's tools read one (`128M`, `1.5G`, `0x1000`).
fn parse_size(s: &str) -> io::Result<u64> {
    blockd_optval::strtosz(s).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad size '{s}': {e:?}"),
        )
    })
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/tmp/blockd-nbd.sock".into());
    let size = parse_size(&args.next().unwrap_or_else(|| "128M".into()))?;
    let server = NbdServer::start(Listen::Unix(path.into()), ServerOptions::default()).await?;
    server
        .add_export(ExportConfig {
            name: "e".into(),
            description: Some("in-memory".into()),
            io: Arc::new(Mem(RwLock::new(vec![0; size as usize]))),
            writable: true,
            allocation_depth: true,
            bitmaps: Vec::new(),
        })
        .map_err(io::Error::other)?;
    eprintln!("serving 'e' ({size} bytes) on {}", server.local_addr());
    tokio::signal::ctrl_c().await?;
    server.stop().await;
    Ok(())
}

//! Reply encoding and the per-client writer task.
//!
//! Request tasks encode their replies into [`Reply`] values (a small inline
//! header plus an optional payload buffer, never copied) and queue them to
//! the client's writer, which sends whatever is ready in one vectored
//! write. A reply may carry the request's [`Permits`]; they are released
//! only once the reply is on the wire, so a client that does not read its
//! replies stops the server from reading its requests.

use std::io::{self, IoSlice};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::proto::{EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// Which reply headers the client negotiated (QEMU's `NBDMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    /// Non-fixed newstyle: only `NBD_OPT_EXPORT_NAME`, simple replies.
    ExportName,
    /// Fixed newstyle, simple replies.
    Simple,
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended headers (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

/// Room for the largest header: an extended chunk header (32 bytes) plus
/// the fixed part of a chunk payload (at most 12 bytes, `OFFSET_HOLE`).
const HEAD_MAX: usize = 48;

/// Most replies the writer sends in one vectored write.
const MAX_BATCH: usize = 64;

/// A request's share of the client's budgets, released when its last
/// reply has been written.
pub(crate) struct Permits {
    /// One of the client's request slots.
    pub _slot: OwnedSemaphorePermit,
    /// The request's payload bytes, if it has any.
    pub _bytes: Option<OwnedSemaphorePermit>,
}

/// One reply message (a simple reply or one chunk of a structured reply).
pub(crate) struct Reply {
    head: [u8; HEAD_MAX],
    head_len: u8,
    payload: Bytes,
    _permits: Option<Permits>,
}

impl Reply {
    /// A simple reply: `error` (an NBD error, 0 for success) and, for a
    /// successful read, the data.
    pub fn simple(cookie: u64, error: u32, payload: Bytes) -> Reply {
        let mut head = [0u8; HEAD_MAX];
        head[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        head[4..8].copy_from_slice(&error.to_be_bytes());
        head[8..16].copy_from_slice(&cookie.to_be_bytes());
        Reply {
            head,
            head_len: 16,
            payload,
            _permits: None,
        }
    }

    /// One chunk of a structured or extended reply: the chunk header, the
    /// fixed part of the chunk payload `prefix` (at most 12 bytes), then
    /// `payload`. `offset` is the request's offset (extended headers only).
    pub fn chunk(
        mode: Mode,
        cookie: u64,
        offset: u64,
        flags: u16,
        ty: u16,
        prefix: &[u8],
        payload: Bytes,
    ) -> Reply {
        debug_assert!(mode >= Mode::Structured);
        debug_assert!(prefix.len() <= 12);
        let len = (prefix.len() + payload.len()) as u64;
        let mut head = [0u8; HEAD_MAX];
        let n = if mode == Mode::Extended {
            head[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            head[4..6].copy_from_slice(&flags.to_be_bytes());
            head[6..8].copy_from_slice(&ty.to_be_bytes());
            head[8..16].copy_from_slice(&cookie.to_be_bytes());
            head[16..24].copy_from_slice(&offset.to_be_bytes());
            head[24..32].copy_from_slice(&len.to_be_bytes());
            32
        } else {
            head[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            head[4..6].copy_from_slice(&flags.to_be_bytes());
            head[6..8].copy_from_slice(&ty.to_be_bytes());
            head[8..16].copy_from_slice(&cookie.to_be_bytes());
            head[16..20].copy_from_slice(&(len as u32).to_be_bytes());
            20
        };
        head[n..n + prefix.len()].copy_from_slice(prefix);
        Reply {
            head,
            head_len: (n + prefix.len()) as u8,
            payload,
            _permits: None,
        }
    }

    /// Attaches the request's permits (to the reply that completes it).
    pub fn with_permits(mut self, permits: Option<Permits>) -> Reply {
        self._permits = permits;
        self
    }

    /// The encoded header (for tests).
    #[cfg(test)]
    fn head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }
}

/// Sends queued replies until every sender is gone (then shuts down the
/// write side) or `cancel` fires (then just stops). Returns the write
/// error that ended it, if any.
pub(crate) async fn run_writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: UnboundedReceiver<Reply>,
    cancel: CancellationToken,
) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            m = rx.recv() => m,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            // (A TLS stream needs the flush; a socket's does nothing.)
            r = async { write_batch(&mut w, &batch).await?; w.flush().await } => r?,
        }
        // Dropping the replies releases their permits.
        batch.clear();
    }
    let _ = w.shutdown().await;
    Ok(())
}

async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Reply]) -> io::Result<()> {
    let mut storage = [IoSlice::new(&[]); 2 * MAX_BATCH];
    let mut n = 0;
    for r in batch {
        storage[n] = IoSlice::new(&r.head[..r.head_len as usize]);
        n += 1;
        if !r.payload.is_empty() {
            storage[n] = IoSlice::new(&r.payload);
            n += 1;
        }
    }
    let mut slices = &mut storage[..n];
    while !slices.is_empty() {
        let written = w.write_vectored(slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layouts() {
        let r = Reply::simple(7, 22, Bytes::new());
        assert_eq!(
            r.head(),
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        let r = Reply::chunk(
            Mode::Structured,
            9,
            4096,
            1,
            2,
            &[1, 2, 3],
            Bytes::from_static(b"ab"),
        );
        assert_eq!(
            r.head(),
            &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 5, 1, 2, 3]
        );
        let r = Reply::chunk(Mode::Extended, 9, 4096, 1, 2, &[], Bytes::new());
        assert_eq!(r.head().len(), 32);
        assert_eq!(&r.head()[16..24], &4096u64.to_be_bytes());
        assert_eq!(&r.head()[24..32], &0u64.to_be_bytes());
    }

    #[tokio::test]
    async fn writer_sends_in_order_and_shuts_down() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run_writer(a, rx, CancellationToken::new()));
        for i in 0..100u64 {
            tx.send(Reply::simple(i, 0, Bytes::from(vec![i as u8; 3])))
                .unwrap();
        }
        drop(tx);
        let mut all = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut all)
            .await
            .unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(all.len(), 100 * 19);
        for (i, m) in all.chunks(19).enumerate() {
            assert_eq!(&m[8..16], &(i as u64).to_be_bytes());
            assert_eq!(&m[16..], &[i as u8; 3]);
        }
    }
}

//! Transmission: every command in every reply style, errors, limits, and
//! out-of-order replies, with a hand-written client.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blockd_nbd::proto::*;
use common::*;

const STYLES: [Style; 3] = [Style::Simple, Style::Structured, Style::Extended];

#[tokio::test]
async fn every_command_in_every_style() {
    for style in STYLES {
        let disk = Arc::new(MemDisk::new(1 << 20, true));
        let s = serve("cmd", "e", disk.clone(), true).await;
        let mut c = open(&s, "e", style).await;
        let data = pattern(12288, 3);
        assert_eq!(c.write(4096, &data, 0).await, 0);
        assert_eq!(disk.get(4096, 12288), data);
        assert_eq!(c.read(4096, 12288).await.unwrap(), data);
        // Unaligned and zero-length requests.
        assert_eq!(c.read(4097, 3).await.unwrap(), &data[1..4]);
        assert_eq!(c.write(5, b"hello", 0).await, 0);
        assert_eq!(disk.get(5, 5), b"hello");
        c.cmd(0, CMD_READ, 9, 0, 0, &[]).await;
        let r = c.reply(0).await;
        assert!(r.done() && r.error() == 0, "{r:?}");
        // FUA writes and reads, flush.
        let before = disk.flushes.load(Ordering::SeqCst);
        assert_eq!(c.write(0, &[1; 512], CMD_FLAG_FUA).await, 0);
        assert_eq!(c.simple_cmd(0, CMD_FLUSH, 0, 0).await, 0);
        assert_eq!(c.simple_cmd(CMD_FLAG_FUA, CMD_READ, 0, 0).await, 0);
        assert!(disk.flushes.load(Ordering::SeqCst) >= before + 2);
        // Write zeroes: punching, NO_HOLE, FAST_ZERO.
        assert_eq!(c.simple_cmd(0, CMD_WRITE_ZEROES, 4096, 4096).await, 0);
        assert_eq!(disk.get(4096, 4096), vec![0; 4096]);
        assert_eq!(
            c.simple_cmd(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 8192, 4096)
                .await,
            0
        );
        assert_eq!(
            c.simple_cmd(
                CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                CMD_WRITE_ZEROES,
                8192,
                4096
            )
            .await,
            NBD_ENOTSUP
        );
        assert_eq!(
            c.simple_cmd(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 100, 50)
                .await,
            0
        );
        // Trim and cache.
        assert_eq!(c.simple_cmd(CMD_FLAG_FUA, CMD_TRIM, 12288, 4096).await, 0);
        assert_eq!(disk.discards.load(Ordering::SeqCst), 1);
        assert_eq!(c.simple_cmd(0, CMD_CACHE, 0, 65536).await, 0);
        assert_eq!(disk.caches.load(Ordering::SeqCst), 1);
        // Disconnect: the server closes after DISC.
        c.cmd(0, CMD_DISC, 0, 0, 0, &[]).await;
        assert!(c.closed().await);
        s.stop().await;
    }
}

#[tokio::test]
async fn structured_reads_send_holes_unless_df() {
    let disk = Arc::new(MemDisk::new(1 << 20, true));
    disk.put(8192, &[5; 4096]);
    let s = serve("sparse", "e", disk.clone(), true).await;
    for style in [Style::Structured, Style::Extended] {
        let mut c = open(&s, "e", style).await;
        c.cmd(0, CMD_READ, 1, 4096, 12288, &[]).await;
        let chunks = c.chunks().await;
        let kinds: Vec<(u16, u16)> = chunks
            .iter()
            .map(|r| match r {
                Reply::Chunk { ty, flags, .. } => (*ty, *flags),
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (REPLY_TYPE_OFFSET_HOLE, 0),
                (REPLY_TYPE_OFFSET_DATA, 0),
                (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE)
            ]
        );
        if let Reply::Chunk {
            offset, payload, ..
        } = &chunks[1]
        {
            assert_eq!(&payload[..8], &8192u64.to_be_bytes());
            assert_eq!(payload.len(), 8 + 4096);
            // Extended replies echo the request's offset.
            assert_eq!(*offset, (style == Style::Extended).then_some(4096));
        }
        // DF: one data chunk.
        c.cmd(CMD_FLAG_DF, CMD_READ, 2, 4096, 12288, &[]).await;
        let chunks = c.chunks().await;
        assert_eq!(chunks.len(), 1);
        let Reply::Chunk { ty, payload, .. } = &chunks[0] else {
            panic!()
        };
        assert_eq!(*ty, REPLY_TYPE_OFFSET_DATA);
        assert_eq!(payload.len(), 8 + 12288);
    }
    // DF is refused without structured replies.
    let mut c = open(&s, "e", Style::Simple).await;
    assert_eq!(
        c.simple_cmd(CMD_FLAG_DF, CMD_READ, 0, 512).await,
        NBD_EINVAL
    );
    s.stop().await;
}

#[tokio::test]
async fn block_status_contexts() {
    let disk = Arc::new(MemDisk::new(1 << 20, true));
    disk.put(4096, &[1; 8192]);
    let s = blockd_nbd::NbdServer::start(
        blockd_nbd::Listen::Unix(sock_path("bs")),
        Default::default(),
    )
    .await
    .unwrap();
    s.add_export(blockd_nbd::ExportConfig {
        allocation_depth: true,
        bitmaps: Vec::new(),
        ..export("e", disk.clone(), true)
    })
    .unwrap();
    for style in [Style::Structured, Style::Extended] {
        let mut c =
            blockd_nbd_client(&s, style, &["base:allocation", "qemu:allocation-depth"]).await;
        let st = c.block_status(0, 0, 65536).await.unwrap();
        let hz = (STATE_HOLE | STATE_ZERO) as u64;
        assert_eq!(
            st,
            vec![
                (0, vec![(4096, hz), (8192, 0), (65536 - 12288, hz)]),
                (1, vec![(4096, 0), (8192, 1), (65536 - 12288, 0)])
            ]
        );
        // REQ_ONE: one extent per context.
        let st = c.block_status(CMD_FLAG_REQ_ONE, 4096, 65536).await.unwrap();
        assert_eq!(st, vec![(0, vec![(8192, 0)]), (1, vec![(8192, 1)])]);
        assert_eq!(c.block_status(0, 0, 0).await, Err(NBD_EINVAL));
        assert_eq!(c.block_status(0, 1 << 20, 1).await, Err(NBD_EINVAL));
        assert_eq!(
            c.block_status(CMD_FLAG_FUA | 64, 0, 1).await,
            Err(NBD_EINVAL)
        );
    }
    // Extended headers: a 64-bit length and a payload choosing contexts.
    let mut c = blockd_nbd_client(
        &s,
        Style::Extended,
        &["base:allocation", "qemu:allocation-depth"],
    )
    .await;
    let mut p = 65536u64.to_be_bytes().to_vec();
    p.extend_from_slice(&META_ID_ALLOCATION_DEPTH.to_be_bytes());
    c.cmd(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_BLOCK_STATUS,
        3,
        0,
        p.len() as u64,
        &p,
    )
    .await;
    let st = c.block_status_reply().await.unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].0, META_ID_ALLOCATION_DEPTH);
    // An id that was not negotiated: the payload is consumed, EINVAL.
    let mut p = 65536u64.to_be_bytes().to_vec();
    p.extend_from_slice(&7u32.to_be_bytes());
    c.cmd(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 4, 0, 12, &p)
        .await;
    assert_eq!(c.block_status_reply().await, Err(NBD_EINVAL));
    // Without contexts, block status is refused.
    let mut c = open(&s, "e", Style::Structured).await;
    assert_eq!(c.block_status(0, 0, 4096).await, Err(NBD_EINVAL));
    let mut c = open(&s, "e", Style::Simple).await;
    assert_eq!(c.simple_cmd(0, CMD_BLOCK_STATUS, 0, 4096).await, NBD_EINVAL);
    s.stop().await;
}

async fn blockd_nbd_client(s: &blockd_nbd::NbdServer, style: Style, ctx: &[&str]) -> Client {
    let mut c = Client::connect(&s.local_addr()).await;
    c.opt_ack(if style == Style::Extended {
        OPT_EXTENDED_HEADERS
    } else {
        OPT_STRUCTURED_REPLY
    })
    .await;
    assert_eq!(c.set_meta("e", ctx).await.len(), ctx.len());
    c.go("e").await;
    c
}

#[tokio::test]
async fn errors_and_limits() {
    for style in STYLES {
        let mut disk = MemDisk::new(64 << 20, false);
        disk.fail_read = Some(1 << 20);
        let disk = Arc::new(disk);
        let s = serve("err", "rw", disk.clone(), true).await;
        s.add_export(export("ro", disk.clone(), false)).unwrap();
        let mut c = open(&s, "ro", style).await;
        assert_eq!(c.write(0, &[1; 512], 0).await, NBD_EPERM);
        assert_eq!(c.simple_cmd(0, CMD_TRIM, 0, 512).await, NBD_EPERM);
        assert_eq!(c.simple_cmd(0, CMD_WRITE_ZEROES, 0, 512).await, NBD_EPERM);
        assert_eq!(c.read(0, 512).await.unwrap(), vec![0; 512]);

        let mut c = open(&s, "rw", style).await;
        let size = 64u64 << 20;
        // Out of bounds.
        assert_eq!(c.read(size - 512, 1024).await, Err(NBD_EINVAL));
        assert_eq!(c.simple_cmd(0, CMD_TRIM, size, 1).await, NBD_EINVAL);
        assert_eq!(c.write(size - 1, &[1, 2], 0).await, NBD_EINVAL);
        assert_eq!(
            c.simple_cmd(0, CMD_WRITE_ZEROES, u64::MAX, 2).await,
            NBD_EINVAL
        );
        // Bad flags, unknown command.
        assert_eq!(
            c.simple_cmd(CMD_FLAG_NO_HOLE, CMD_TRIM, 0, 512).await,
            NBD_EINVAL
        );
        assert_eq!(c.simple_cmd(0, 42, 0, 512).await, NBD_EINVAL);
        // Backend errors map through errno.
        assert_eq!(c.read((1 << 20) - 4096, 8192).await, Err(NBD_EIO));
        // Reads over 32 MiB are refused; the connection survives.
        assert_eq!(c.read(0, MAX_BUFFER_SIZE + 1).await, Err(NBD_EINVAL));
        let big = c.read(2 << 20, MAX_BUFFER_SIZE).await.unwrap();
        assert_eq!(big.len(), MAX_BUFFER_SIZE as usize);
        assert_eq!(c.read(0, 512).await.unwrap(), vec![0; 512]);
        // A write payload over 32 MiB: refused, then disconnected.
        let flags = if style == Style::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        c.cmd(flags, CMD_WRITE, 5, 0, MAX_BUFFER_SIZE as u64 + 1, &[])
            .await;
        assert_eq!(c.reply(0).await.error(), NBD_EINVAL);
        assert!(c.closed().await);
        s.stop().await;
    }
}

#[tokio::test]
async fn extended_headers_payloads_and_64bit_lengths() {
    let disk = Arc::new(MemDisk::new(1 << 20, true));
    let s = serve("ext", "e", disk.clone(), true).await;
    let mut c = open(&s, "e", Style::Extended).await;
    // A write without PAYLOAD_LEN is tolerated (QEMU only traces it).
    c.cmd(0, CMD_WRITE, 1, 0, 4, b"abcd").await;
    assert_eq!(c.reply(0).await.error(), 0);
    assert_eq!(disk.get(0, 4), b"abcd");
    // A payload on a command without one: consumed, then EINVAL.
    c.cmd(CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 2, 0, 3, b"xyz")
        .await;
    assert_eq!(c.reply(0).await.error(), NBD_EINVAL);
    // Lengths over 4 GiB are effect lengths (here past EOF).
    assert_eq!(c.simple_cmd(0, CMD_TRIM, 0, 1 << 33).await, NBD_EINVAL);
    assert_eq!(c.read(0, 4).await.unwrap(), b"abcd");
    s.stop().await;
}

#[tokio::test]
async fn replies_come_out_of_order() {
    let mut disk = MemDisk::new(1 << 20, false);
    disk.slow_read = Some((0, Duration::from_millis(500)));
    let disk = Arc::new(disk);
    disk.put(4096, &[9; 512]);
    let s = serve("ooo", "e", disk.clone(), true).await;
    for style in STYLES {
        let mut c = open(&s, "e", style).await;
        c.cmd(0, CMD_READ, 100, 0, 512, &[]).await;
        c.cmd(0, CMD_READ, 200, 4096, 512, &[]).await;
        let first = c.reply(512).await;
        assert_eq!(first.cookie(), 200, "the fast read answers first");
        let mut second = c.reply(512).await;
        while !second.done() {
            second = c.reply(512).await;
        }
        assert_eq!(second.cookie(), 100);
    }
    s.stop().await;
}

#[tokio::test]
async fn bad_request_magic_drops_only_that_client() {
    let disk = Arc::new(MemDisk::new(1 << 20, false));
    let s = serve("magic", "e", disk.clone(), true).await;
    let mut good = open(&s, "e", Style::Structured).await;
    let mut bad = open(&s, "e", Style::Structured).await;
    let mut req = encode_request(Style::Simple, 0, CMD_READ, 1, 0, 512, &[]);
    req[0] ^= 0xff;
    tokio::io::AsyncWriteExt::write_all(&mut bad.s, &req)
        .await
        .unwrap();
    assert!(bad.closed().await);
    assert_eq!(good.write(0, &[3; 100], 0).await, 0);
    assert_eq!(good.read(0, 100).await.unwrap(), vec![3; 100]);
    let mut again = open(&s, "e", Style::Extended).await;
    assert_eq!(again.read(0, 100).await.unwrap(), vec![3; 100]);
    s.stop().await;
}

#[tokio::test]
async fn many_requests_in_flight() {
    let disk = Arc::new(MemDisk::new(8 << 20, false));
    let s = serve("many", "e", disk.clone(), true).await;
    for style in STYLES {
        let mut c = open(&s, "e", style).await;
        // Pipeline 500 writes then 500 reads without waiting.
        let flags = if style == Style::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let mut buf = Vec::new();
        for i in 0..500u64 {
            let d = pattern(4096, i as u8);
            buf.extend(encode_request(
                c.style,
                flags,
                CMD_WRITE,
                i,
                i * 4096,
                4096,
                &d,
            ));
        }
        let (mut rd, mut wr) = c.s.into_split();
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut wr, &buf)
                .await
                .unwrap();
            wr
        });
        let mut seen = vec![false; 500];
        c.s = {
            let mut tmp = Vec::new();
            // Successful writes get simple replies unless extended.
            let n = if style == Style::Extended { 32 } else { 16 };
            for _ in 0..500 {
                let mut h = vec![0u8; n];
                tokio::io::AsyncReadExt::read_exact(&mut rd, &mut h)
                    .await
                    .unwrap();
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                assert!(!seen[cookie as usize]);
                seen[cookie as usize] = true;
                tmp.push(cookie);
            }
            let wr = writer.await.unwrap();
            rd.reunite(wr).unwrap()
        };
        assert!(seen.iter().all(|&x| x));
        for i in (0..500u64).step_by(37) {
            assert_eq!(
                c.read(i * 4096, 4096).await.unwrap(),
                pattern(4096, i as u8)
            );
        }
    }
    s.stop().await;
}

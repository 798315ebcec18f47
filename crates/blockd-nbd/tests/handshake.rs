//! Option haggling, with a hand-written client.

mod common;

use std::sync::Arc;

use blockd_nbd::proto::*;
use blockd_nbd::{ExportConfig, Listen, NbdServer, ServerOptions};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn two_exports() -> (NbdServer, Arc<MemDisk>) {
    let disk = Arc::new(MemDisk::new(1 << 20, true));
    let s = NbdServer::start(Listen::Unix(sock_path("hs")), ServerOptions::default())
        .await
        .unwrap();
    s.add_export(ExportConfig {
        name: "a".into(),
        description: Some("first disk".into()),
        io: disk.clone(),
        writable: true,
        allocation_depth: true,
        bitmaps: Vec::new(),
    })
    .unwrap();
    s.add_export(ExportConfig {
        name: "b".into(),
        description: None,
        io: Arc::new(MemDisk::new(3 << 20 | 1000, false)),
        writable: false,
        allocation_depth: false,
        bitmaps: Vec::new(),
    })
    .unwrap();
    (s, disk)
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let (s, _) = two_exports().await;
    for cflags in [
        FLAG_C_FIXED_NEWSTYLE,
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
        0,
    ] {
        let mut c = Client::connect_flags(&s.local_addr(), cflags).await;
        c.opt(OPT_EXPORT_NAME, b"b").await;
        let n = if cflags & FLAG_C_NO_ZEROES != 0 {
            10
        } else {
            134
        };
        let mut b = vec![0u8; n];
        c.s.read_exact(&mut b).await.unwrap();
        // 3 MiB + 1000 is exported as whole sectors.
        assert_eq!(
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            3 << 20 | 512
        );
        let flags = u16::from_be_bytes([b[8], b[9]]);
        assert_eq!(
            flags,
            FLAG_HAS_FLAGS
                | FLAG_READ_ONLY
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_CACHE
                | FLAG_CAN_MULTI_CONN
        );
        assert!(b[10..].iter().all(|&x| x == 0));
        // Simple replies in transmission.
        c.cmd(0, CMD_READ, 5, 0, 512, &[]).await;
        let r = c.reply(512).await;
        assert!(matches!(
            r,
            Reply::Simple {
                cookie: 5,
                error: 0,
                ..
            }
        ));
    }
    s.stop().await;
}

#[tokio::test]
async fn go_and_info_report_what_qemu_reports() {
    let (s, _) = two_exports().await;
    let mut c = Client::connect(&s.local_addr()).await;
    c.opt_ack(OPT_STRUCTURED_REPLY).await;
    let reps = c
        .info(
            OPT_INFO,
            "a",
            &[INFO_NAME, INFO_BLOCK_SIZE, INFO_DESCRIPTION],
        )
        .await;
    let kinds: Vec<u16> = reps
        .iter()
        .filter(|r| r.ty == REP_INFO)
        .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
        .collect();
    assert_eq!(
        kinds,
        vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, INFO_EXPORT]
    );
    assert_eq!(&reps[0].data[2..], b"a");
    assert_eq!(&reps[1].data[2..], b"first disk");
    assert_eq!(reps.last().unwrap().ty, REP_ACK);
    assert_eq!(c.size, 1 << 20);
    assert_eq!(
        c.flags,
        FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_SEND_DF
    );
    // GO without asking for names: no NBD_INFO_NAME, but a description.
    let reps = c.info(OPT_GO, "a", &[]).await;
    let sizes = reps
        .iter()
        .find(|r| r.ty == REP_INFO && r.data[..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .unwrap();
    let v: Vec<u32> = sizes.data[2..]
        .chunks(4)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(v, vec![1, 4096, 32 << 20]);
    assert_eq!(reps.len(), 4);
    assert_eq!(reps.last().unwrap().ty, REP_ACK);
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
    s.stop().await;
}

#[tokio::test]
async fn block_size_minimum_and_block_size_reqd() {
    let mut d = MemDisk::new(1 << 20, false);
    d.limits = (512, 65536, 1 << 20);
    let s = serve("bs", "e", Arc::new(d), true).await;
    let mut c = Client::connect(&s.local_addr()).await;
    let reps = c.info(OPT_INFO, "e", &[]).await;
    assert_eq!(reps.last().unwrap().ty, REP_ERR_BLOCK_SIZE_REQD);
    let reps = c.info(OPT_INFO, "e", &[INFO_BLOCK_SIZE]).await;
    assert_eq!(reps.last().unwrap().ty, REP_ACK);
    let sz = &reps.iter().find(|r| r.data[..2] == [0, 3]).unwrap().data[2..];
    assert_eq!(sz, &[0, 0, 2, 0, 0, 1, 0, 0, 0, 16, 0, 0]);
    // GO without the request is tolerated, advertising a minimum of 1.
    let reps = c.info(OPT_GO, "e", &[]).await;
    let sz = &reps.iter().find(|r| r.data[..2] == [0, 3]).unwrap().data[2..];
    assert_eq!(&sz[..4], &[0, 0, 0, 1]);
    assert_eq!(reps.last().unwrap().ty, REP_ACK);
    s.stop().await;
}

#[tokio::test]
async fn list_abort_unknown_and_tls() {
    let (s, _) = two_exports().await;
    let mut c = Client::connect(&s.local_addr()).await;
    c.opt(OPT_LIST, &[]).await;
    let mut seen = Vec::new();
    loop {
        let r = c.rep().await;
        if r.ty == REP_ACK {
            break;
        }
        assert_eq!(r.ty, REP_SERVER);
        let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
        seen.push((
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap(),
            String::from_utf8(r.data[4 + n..].to_vec()).unwrap(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            ("a".into(), "first disk".into()),
            ("b".into(), String::new())
        ]
    );
    c.opt(OPT_LIST, b"x").await;
    assert_eq!(c.rep().await.ty, REP_ERR_INVALID);
    c.opt(99, b"some payload").await;
    let r = c.rep().await;
    assert_eq!((r.opt, r.ty), (99, REP_ERR_UNSUP));
    assert_eq!(r.data, b"Unsupported option 99 (<unknown>)");
    c.opt(OPT_STARTTLS, &[]).await;
    assert_eq!(c.rep().await.ty, REP_ERR_POLICY);
    let reps = c.info(OPT_GO, "nope", &[]).await;
    assert_eq!(reps[0].ty, REP_ERR_UNKNOWN);
    assert_eq!(reps[0].data, b"export 'nope' not present");
    c.opt(OPT_ABORT, &[]).await;
    assert_eq!(c.rep().await.ty, REP_ACK);
    assert!(c.closed().await);
    s.stop().await;
}

#[tokio::test]
async fn bad_lengths_and_fatal_errors() {
    let (s, _) = two_exports().await;
    let addr = s.local_addr();
    let mut c = Client::connect(&addr).await;
    // Name length beyond the option.
    let mut p = info_payload("a", &[]);
    p[3] = 50;
    c.opt(OPT_GO, &p).await;
    let r = c.rep().await;
    assert_eq!(r.ty, REP_ERR_INVALID);
    assert_eq!(r.data, b"Inconsistent lengths in option go");
    // Trailing garbage.
    let mut p = info_payload("a", &[]);
    p.push(0);
    c.opt(OPT_INFO, &p).await;
    assert_eq!(c.rep().await.ty, REP_ERR_INVALID);
    // Too long a name.
    let long = "x".repeat(5000);
    c.opt(OPT_GO, &info_payload(&long, &[])).await;
    assert_eq!(c.rep().await.ty, REP_ERR_INVALID);
    c.opt(OPT_STRUCTURED_REPLY, b"zz").await;
    assert_eq!(c.rep().await.ty, REP_ERR_INVALID);
    c.opt_ack(OPT_STRUCTURED_REPLY).await;
    c.opt(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.rep().await.ty, REP_ERR_INVALID);
    c.opt_ack(OPT_EXTENDED_HEADERS).await;
    c.opt(OPT_EXTENDED_HEADERS, &[]).await;
    assert_eq!(c.rep().await.ty, REP_ERR_INVALID);
    c.opt(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.rep().await.ty, REP_ERR_EXT_HEADER_REQD);
    // The connection still works after all that.
    c.go("a").await;
    assert_eq!(c.read(0, 512).await.unwrap(), vec![0; 512]);

    // Fatal: EXPORT_NAME after extended headers.
    let mut c = Client::connect(&addr).await;
    c.opt_ack(OPT_EXTENDED_HEADERS).await;
    c.opt(OPT_EXPORT_NAME, b"a").await;
    assert!(c.closed().await);
    // Fatal: unknown export with EXPORT_NAME.
    let mut c = Client::connect(&addr).await;
    c.opt(OPT_EXPORT_NAME, b"zzz").await;
    assert!(c.closed().await);
    // Fatal: an option over 32 MiB, refused before reading it.
    let mut c = Client::connect(&addr).await;
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(MAX_BUFFER_SIZE + 1).to_be_bytes());
    c.s.write_all(&h).await.unwrap();
    assert!(c.closed().await);
    // Fatal: bad option magic, unknown client flags.
    let mut c = Client::connect(&addr).await;
    c.s.write_all(&[0u8; 16]).await.unwrap();
    assert!(c.closed().await);
    let mut c = Client::connect_flags(&addr, 1 << 7).await;
    assert!(c.closed().await);
    // Non-fixed newstyle: anything but EXPORT_NAME ends it.
    let mut c = Client::connect_flags(&addr, 0).await;
    c.opt(OPT_LIST, &[]).await;
    assert!(c.try_rep().await.is_none());
    s.stop().await;
}

#[tokio::test]
async fn unknown_option_payload_is_skipped_up_to_32m() {
    let (s, _) = two_exports().await;
    let mut c = Client::connect(&s.local_addr()).await;
    c.opt(1234, &vec![7u8; 3 << 20]).await;
    assert_eq!(c.rep().await.ty, REP_ERR_UNSUP);
    c.go("a").await;
    s.stop().await;
}

#[tokio::test]
async fn meta_contexts() {
    let (s, _) = two_exports().await;
    let mut c = Client::connect(&s.local_addr()).await;
    // LIST with no queries: everything the export has, ids 0.
    let all = c.meta(OPT_LIST_META_CONTEXT, "a", &[]).await.unwrap();
    assert_eq!(
        all,
        vec![
            (0, "base:allocation".into()),
            (0, "qemu:allocation-depth".into())
        ]
    );
    let b = c.meta(OPT_LIST_META_CONTEXT, "b", &[]).await.unwrap();
    assert_eq!(b, vec![(0, "base:allocation".into())]);
    let q = c
        .meta(
            OPT_LIST_META_CONTEXT,
            "a",
            &["qemu:", "other:", "base:nope"],
        )
        .await
        .unwrap();
    assert_eq!(q, vec![(0, "qemu:allocation-depth".into())]);
    // SET needs structured replies.
    assert_eq!(
        c.meta(OPT_SET_META_CONTEXT, "a", &["base:allocation"])
            .await,
        Err(REP_ERR_INVALID)
    );
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "zz", &[]).await,
        Err(REP_ERR_UNKNOWN)
    );
    c.opt_ack(OPT_STRUCTURED_REPLY).await;
    // SET with "base:" selects nothing (LIST only).
    assert_eq!(c.set_meta("a", &["base:"]).await, vec![]);
    let set = c
        .set_meta("a", &["qemu:allocation-depth", "base:allocation"])
        .await;
    assert_eq!(
        set,
        vec![
            (META_ID_BASE_ALLOCATION, "base:allocation".into()),
            (META_ID_ALLOCATION_DEPTH, "qemu:allocation-depth".into())
        ]
    );
    c.go("a").await;
    let st = c.block_status(0, 0, 65536).await.unwrap();
    assert_eq!(st.len(), 2);

    // Contexts set for another export do not carry over.
    let mut c = Client::connect(&s.local_addr()).await;
    c.opt_ack(OPT_STRUCTURED_REPLY).await;
    c.set_meta("b", &["base:allocation"]).await;
    c.go("a").await;
    assert_eq!(c.block_status(0, 0, 4096).await, Err(NBD_EINVAL));
    s.stop().await;
}

#[tokio::test]
async fn extended_headers_advertise_block_status_payload() {
    let (s, _) = two_exports().await;
    let mut c = Client::connect(&s.local_addr()).await;
    c.opt_ack(OPT_EXTENDED_HEADERS).await;
    c.info(OPT_INFO, "a", &[]).await;
    assert_ne!(c.flags & FLAG_BLOCK_STAT_PAYLOAD, 0);
    c.go("a").await;
    assert_eq!(c.flags & FLAG_BLOCK_STAT_PAYLOAD, 0, "no contexts set");
    let mut c = Client::connect(&s.local_addr()).await;
    c.opt_ack(OPT_EXTENDED_HEADERS).await;
    c.set_meta("a", &["base:allocation"]).await;
    c.go("a").await;
    assert_ne!(c.flags & FLAG_BLOCK_STAT_PAYLOAD, 0);
    assert_ne!(c.flags & FLAG_SEND_DF, 0);
    s.stop().await;
}

#[tokio::test]
async fn single_connection_servers_do_not_offer_multi_conn() {
    let s = NbdServer::start(
        Listen::Unix(sock_path("mc")),
        ServerOptions {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.add_export(export("e", Arc::new(MemDisk::new(65536, false)), true))
        .unwrap();
    let c = open(&s, "e", Style::Simple).await;
    assert_eq!(c.flags & FLAG_CAN_MULTI_CONN, 0);
    drop(c);
    s.stop().await;
}

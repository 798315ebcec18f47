//! Unit tests of [`super`] against a fake server on a pipe.
use super::*;

fn info() -> ExportInfo {
    ExportInfo {
        size: 1 << 20,
        structured: true,
        min_block: 1,
        max_block: 1 << 20,
        ..Default::default()
    }
}

async fn read_req(s: &mut (impl AsyncRead + Unpin)) -> (u16, u64, u64, u32) {
    let mut h = [0u8; 28];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        REQUEST_MAGIC
    );
    (
        u16::from_be_bytes([h[6], h[7]]),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        u64::from_be_bytes(h[16..24].try_into().unwrap()),
        u32::from_be_bytes(h[24..28].try_into().unwrap()),
    )
}

fn chunk_hdr(flags: u16, ty: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Two reads in flight; the server answers the second first, the
/// first in a data chunk and a hole chunk; then a server error.
#[tokio::test]
async fn replies_are_demultiplexed_by_cookie() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let c1 = conn.clone();
    let a = tokio::spawn(async move { c1.request(CMD_READ, 0, 0, 8, None, 0).await });
    let (cmd, ca, off, len) = read_req(&mut server).await;
    assert_eq!((cmd, off, len), (CMD_READ, 0, 8));
    let c2 = conn.clone();
    let b = tokio::spawn(async move { c2.request(CMD_READ, 0, 100, 4, None, 0).await });
    let (_, cb, off, _) = read_req(&mut server).await;
    assert_eq!(off, 100);
    let mut out = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cb, 12);
    out.extend_from_slice(&100u64.to_be_bytes());
    out.extend_from_slice(b"bbbb");
    out.extend(chunk_hdr(0, REPLY_TYPE_OFFSET_DATA, ca, 12));
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(b"aaaa");
    out.extend(chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, ca, 12));
    out.extend_from_slice(&4u64.to_be_bytes());
    out.extend_from_slice(&4u32.to_be_bytes());
    server.write_all(&out).await.unwrap();
    let rb = b.await.unwrap().unwrap();
    assert_eq!(&rb.data.unwrap()[..], b"bbbb");
    let ra = a.await.unwrap().unwrap();
    assert_eq!(&ra.data.unwrap()[..], b"aaaa\0\0\0\0");

    let c3 = conn.clone();
    let e = tokio::spawn(async move { c3.request(CMD_FLUSH, 0, 0, 0, None, 0).await });
    let (cmd, ce, _, _) = read_req(&mut server).await;
    assert_eq!(cmd, CMD_FLUSH);
    let mut out = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, ce, 6);
    out.extend_from_slice(&NBD_ENOSPC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    server.write_all(&out).await.unwrap();
    match e.await.unwrap() {
        Err(ConnError::Server(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC)),
        other => panic!("unexpected {other:?}"),
    }
}

/// A write whose caller gives up once it is queued still goes out
/// whole (the writer task owns the frame), so the next request's
/// header follows the payload on the wire instead of cutting into it.
#[tokio::test]
async fn a_write_given_up_after_queueing_goes_out_whole() {
    // A pipe much smaller than the payload: the write needs many
    // rounds while the server reads.
    let (client, mut server) = tokio::io::duplex(4096);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let payload = Bytes::from(vec![0x5a; 64 << 10]);
    {
        let f = conn.request(CMD_WRITE, 0, 0, payload.len() as u64, Some(payload), 0);
        tokio::pin!(f);
        // One poll queues it; then the caller drops it.
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(f.as_mut(), cx).is_pending())
        })
        .await;
        assert!(polled);
    }
    let c = conn.clone();
    let next = tokio::spawn(async move { c.request(CMD_FLUSH, 0, 0, 0, None, 0).await });
    let (cmd, _, off, len) = read_req(&mut server).await;
    assert_eq!((cmd, off, len), (CMD_WRITE, 0, 64 << 10));
    let mut data = vec![0u8; 64 << 10];
    // (A cut frame leaves the payload short: the read never ends.)
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        server.read_exact(&mut data),
    )
    .await
    .expect("the payload was cut short")
    .unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    let (cmd, cookie, _, _) = read_req(&mut server).await;
    assert_eq!(cmd, CMD_FLUSH);
    let out = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    server.write_all(&out).await.unwrap();
    assert!(next.await.unwrap().is_ok());
}

/// Read chunks in any order, with holes between, before and after
/// data, assemble into the right bytes; so does a simple reply.
#[tokio::test]
async fn read_chunks_in_any_order_and_holes_assemble() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let data = |off: u64, d: &[u8]| {
        let mut v = (off).to_be_bytes().to_vec();
        v.extend_from_slice(d);
        v
    };
    let hole = |off: u64, n: u32| {
        let mut v = off.to_be_bytes().to_vec();
        v.extend_from_slice(&n.to_be_bytes());
        v
    };
    // (chunks of [off, off + 12) as (is_data, offset, bytes or length))
    type Chunk = (bool, u64, &'static [u8], u32);
    let cases: [(&[Chunk], &[u8]); 4] = [
        (
            &[(true, 104, b"efgh", 0), (true, 100, b"abcd", 0)],
            b"abcdefgh\0\0\0\0",
        ),
        (
            &[(false, 100, b"", 4), (true, 104, b"efgh", 0)],
            b"\0\0\0\0efgh\0\0\0\0",
        ),
        (
            &[(true, 108, b"ijkl", 0), (false, 100, b"", 8)],
            b"\0\0\0\0\0\0\0\0ijkl",
        ),
        (&[(true, 100, b"abcdefghijkl", 0)], b"abcdefghijkl"),
    ];
    for (chunks, want) in cases {
        let c = conn.clone();
        let t = tokio::spawn(async move { c.request(CMD_READ, 0, 100, 12, None, 0).await });
        let (_, cookie, _, _) = read_req(&mut server).await;
        let mut out = Vec::new();
        for (i, &(is_data, off, d, n)) in chunks.iter().enumerate() {
            let flags = if i + 1 == chunks.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let (ty, payload) = if is_data {
                (REPLY_TYPE_OFFSET_DATA, data(off, d))
            } else {
                (REPLY_TYPE_OFFSET_HOLE, hole(off, n))
            };
            out.extend(chunk_hdr(flags, ty, cookie, payload.len() as u32));
            out.extend(payload);
        }
        server.write_all(&out).await.unwrap();
        let got = t.await.unwrap().unwrap().data.unwrap();
        assert_eq!(&got[..], want, "{chunks:?}");
    }
    // a simple reply
    let c = conn.clone();
    let t = tokio::spawn(async move { c.request(CMD_READ, 0, 0, 6, None, 0).await });
    let (_, cookie, _, _) = read_req(&mut server).await;
    let mut out = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(b"simple");
    server.write_all(&out).await.unwrap();
    assert_eq!(&t.await.unwrap().unwrap().data.unwrap()[..], b"simple");
}

/// At most MAX_REQUESTS requests go out; the next one is sent when a
/// reply frees a slot (QEMU's MAX_NBD_REQUESTS and free_sema).
#[tokio::test]
async fn requests_beyond_the_cap_wait_for_a_reply() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let mut tasks = Vec::new();
    for _ in 0..MAX_REQUESTS + 4 {
        let c = conn.clone();
        tasks.push(tokio::spawn(async move {
            c.request(CMD_FLUSH, 0, 0, 0, None, 0).await
        }));
    }
    let mut cookies = Vec::new();
    for _ in 0..MAX_REQUESTS {
        cookies.push(read_req(&mut server).await.1);
    }
    let more =
        tokio::time::timeout(std::time::Duration::from_millis(200), read_req(&mut server)).await;
    assert!(more.is_err(), "a request beyond the cap was sent");
    // one reply: exactly one more request goes out
    let done = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookies[0], 0);
    server.write_all(&done).await.unwrap();
    cookies.push(read_req(&mut server).await.1);
    let more =
        tokio::time::timeout(std::time::Duration::from_millis(200), read_req(&mut server)).await;
    assert!(more.is_err(), "two requests went out for one reply");
    // answer everything; the rest follow as slots free up
    let mut answered = 1;
    while answered < MAX_REQUESTS + 4 {
        let c = cookies[answered];
        let done = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_NONE, c, 0);
        server.write_all(&done).await.unwrap();
        answered += 1;
        if cookies.len() < MAX_REQUESTS + 4 {
            cookies.push(read_req(&mut server).await.1);
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// A request waiting for a slot fails when the connection is lost.
#[tokio::test]
async fn a_request_waiting_for_a_slot_fails_when_the_connection_goes() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let mut tasks = Vec::new();
    for _ in 0..=MAX_REQUESTS {
        let c = conn.clone();
        tasks.push(tokio::spawn(async move {
            c.request(CMD_FLUSH, 0, 0, 0, None, 0).await
        }));
    }
    for _ in 0..MAX_REQUESTS {
        read_req(&mut server).await;
    }
    drop(server);
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Err(ConnError::Lost)));
    }
}

/// A lost connection fails the requests in flight and later ones.
#[tokio::test]
async fn a_lost_connection_fails_everything() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let c1 = conn.clone();
    let a = tokio::spawn(async move { c1.request(CMD_READ, 0, 0, 8, None, 0).await });
    read_req(&mut server).await;
    drop(server);
    assert!(matches!(a.await.unwrap(), Err(ConnError::Lost)));
    conn.closed().await;
    assert!(matches!(
        conn.request(CMD_FLUSH, 0, 0, 0, None, 0).await,
        Err(ConnError::Lost)
    ));
}

/// A reply with an unknown cookie is a protocol error: the connection
/// is dropped rather than a wrong request completed.
#[tokio::test]
async fn an_unknown_cookie_breaks_the_connection() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let c1 = conn.clone();
    let a = tokio::spawn(async move { c1.request(CMD_FLUSH, 0, 0, 0, None, 0).await });
    let (_, cookie, _, _) = read_req(&mut server).await;
    server
        .write_all(&chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie + 7, 0))
        .await
        .unwrap();
    assert!(matches!(a.await.unwrap(), Err(ConnError::Lost)));
    assert!(conn.is_dead());
}

/// A block status reply carries one chunk per negotiated context: the
/// asked context's extents come back as `extents`, the others by id.
#[tokio::test]
async fn block_status_chunks_of_every_context_are_kept() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(client);
    let conn = Connection::start(info(), Box::new(r), Box::new(w));
    let c = conn.clone();
    let t = tokio::spawn(async move {
        c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20, None, 7)
            .await
    });
    let (cmd, cookie, _, _) = read_req(&mut server).await;
    assert_eq!(cmd, CMD_BLOCK_STATUS);
    let status = |id: u32, ext: &[(u32, u32)]| {
        let mut v = id.to_be_bytes().to_vec();
        for (l, f) in ext {
            v.extend_from_slice(&l.to_be_bytes());
            v.extend_from_slice(&f.to_be_bytes());
        }
        v
    };
    let mut out = Vec::new();
    // the depth context first, then base:allocation (any order is valid)
    for (flags, p) in [
        (0, status(9, &[(4096, 0)])),
        (
            REPLY_FLAG_DONE,
            status(7, &[(65536, STATE_HOLE | STATE_ZERO)]),
        ),
    ] {
        out.extend(chunk_hdr(
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            p.len() as u32,
        ));
        out.extend(p);
    }
    server.write_all(&out).await.unwrap();
    let rep = t.await.unwrap().unwrap();
    assert_eq!(rep.extents, vec![(65536, STATE_HOLE | STATE_ZERO)]);
    assert_eq!(rep.others, vec![(9, vec![(4096, 0)])]);
}

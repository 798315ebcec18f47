//! Fuzz-style property tests: random and truncated handshakes, random
//! request headers and random byte streams after a valid handshake never
//! panic the server; a long-lived client keeps working throughout and new
//! clients are still accepted.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blockd_nbd::proto::*;
use blockd_nbd::NbdServer;
use common::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::runtime::Runtime;

static PANICKED: AtomicBool = AtomicBool::new(false);

struct World {
    rt: Runtime,
    server: NbdServer,
    /// The canary's own disk, out of the fuzzers' reach.
    disk: Arc<MemDisk>,
    canary: tokio::sync::Mutex<Client>,
}

/// The server's socket path, removed at exit (the world is never dropped).
static SOCKET: OnceLock<std::ffi::CString> = OnceLock::new();

extern "C" fn remove_socket() {
    if let Some(p) = SOCKET.get() {
        // SAFETY: `p` is a valid NUL-terminated path that lives forever.
        unsafe { libc::unlink(p.as_ptr()) };
    }
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            prev(info);
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let fuzzed = Arc::new(MemDisk::new(1 << 20, true));
        let disk = Arc::new(MemDisk::new(1 << 20, false));
        let (server, canary) = rt.block_on(async {
            let s = serve("fuzz", "e", fuzzed.clone(), true).await;
            s.add_export(blockd_nbd::ExportConfig {
                allocation_depth: true,
                bitmaps: Vec::new(),
                ..export("d", fuzzed.clone(), false)
            })
            .unwrap();
            s.add_export(export("c", disk.clone(), true)).unwrap();
            let path = std::ffi::CString::new(s.local_addr()).unwrap();
            if SOCKET.set(path).is_ok() {
                // SAFETY: registers a plain function without captured state.
                unsafe { libc::atexit(remove_socket) };
            }
            let c = open(&s, "c", Style::Structured).await;
            (s, c)
        });
        World {
            rt,
            server,
            disk,
            canary: tokio::sync::Mutex::new(canary),
        }
    })
}

/// Sends `bytes` on `s`, then reads whatever comes back for a short while
/// (the server may answer, wait, or hang up).
async fn poke(mut s: UnixStream, bytes: &[u8], half_close: bool) {
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// The long-lived client still reads and writes, and a new client gets in.
fn check_alive(w: &World) {
    assert!(!PANICKED.load(Ordering::SeqCst), "a server task panicked");
    w.rt.block_on(async {
        let mut c = w.canary.lock().await;
        let data = pattern(4096, 42);
        assert_eq!(c.write(1 << 19, &data, 0).await, 0);
        assert_eq!(c.read(1 << 19, 4096).await.unwrap(), data);
        let mut n = tokio::time::timeout(
            Duration::from_secs(5),
            open(&w.server, "c", Style::Extended),
        )
        .await
        .expect("new clients are accepted");
        assert_eq!(n.read(1 << 19, 16).await.unwrap(), &data[..16]);
    });
    assert_eq!(w.disk.get(1 << 19, 4), pattern(4, 42));
}

async fn connect(w: &World) -> UnixStream {
    UnixStream::connect(w.server.local_addr()).await.unwrap()
}

/// An option as the fuzzer builds it: a code, a claimed length, and the
/// bytes actually sent (which may disagree).
fn option() -> impl Strategy<Value = Vec<u8>> {
    let codes = prop_oneof![
        1u32..=12,
        Just(OPT_GO),
        Just(OPT_SET_META_CONTEXT),
        any::<u32>()
    ];
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        ("[a-e]{0,3}", proptest::collection::vec(any::<u16>(), 0..4))
            .prop_map(|(n, r)| info_payload(&n, &r)),
        (
            "[a-e]{0,3}",
            proptest::collection::vec("(base|qemu|x):[a-z-]{0,16}", 0..4)
        )
            .prop_map(|(n, q)| meta_payload(&n, &q.iter().map(String::as_str).collect::<Vec<_>>())),
    ];
    let lie = prop_oneof![
        Just(None),
        any::<u32>().prop_map(Some),
        (0u32..80).prop_map(Some)
    ];
    (codes, body, lie, any::<bool>()).prop_map(|(code, body, lie, magic_ok)| {
        let mut b = Vec::new();
        let magic = if magic_ok { IHAVEOPT } else { IHAVEOPT ^ 1 };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&lie.unwrap_or(body.len() as u32).to_be_bytes());
        b.extend_from_slice(&body);
        b
    })
}

/// A request header with the right magic and random fields, plus some payload.
fn request(ext: bool) -> impl Strategy<Value = Vec<u8>> {
    let ty = prop_oneof![0u16..=8, any::<u16>()];
    let off = prop_oneof![0u64..(2 << 20), any::<u64>()];
    let len = prop_oneof![0u64..65536, Just(MAX_BUFFER_SIZE as u64 + 1), any::<u64>()];
    (
        any::<u16>(),
        ty,
        any::<u64>(),
        off,
        len,
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(move |(flags, ty, cookie, off, len, payload)| {
            let style = if ext { Style::Extended } else { Style::Simple };
            let len = if ext { len } else { len & 0xffff_ffff };
            encode_request(style, flags, ty, cookie, off, len, &payload)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_before_or_after_the_greeting(bytes in proptest::collection::vec(any::<u8>(), 0..2048), read_greeting: bool, half_close: bool) {
        let w = world();
        w.rt.block_on(async {
            let mut s = connect(w).await;
            if read_greeting {
                let mut g = [0u8; 18];
                let _ = s.read_exact(&mut g).await;
            }
            poke(s, &bytes, half_close).await;
        });
        check_alive(w);
    }

    #[test]
    fn random_options(flags in prop_oneof![Just(3u32), Just(1), Just(0), any::<u32>()], opts in proptest::collection::vec(option(), 0..6), cut in any::<prop::sample::Index>(), half_close: bool) {
        let w = world();
        let mut bytes = flags.to_be_bytes().to_vec();
        for o in &opts {
            bytes.extend_from_slice(o);
        }
        // Sometimes cut the stream short.
        let keep = if half_close { cut.index(bytes.len() + 1) } else { bytes.len() };
        w.rt.block_on(async {
            let s = connect(w).await;
            poke(s, &bytes[..keep], half_close).await;
        });
        check_alive(w);
    }

    #[test]
    fn random_requests_after_a_valid_handshake(style in 0..3u8, export_ro: bool, reqs in proptest::collection::vec(request(false), 0..8), ereqs in proptest::collection::vec(request(true), 0..8), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let w = world();
        let style = [Style::Simple, Style::Structured, Style::Extended][style as usize];
        w.rt.block_on(async {
            let mut c = Client::connect(&w.server.local_addr()).await;
            match style {
                Style::Simple => {}
                Style::Structured => c.opt_ack(OPT_STRUCTURED_REPLY).await,
                Style::Extended => c.opt_ack(OPT_EXTENDED_HEADERS).await,
            }
            if style != Style::Simple {
                c.set_meta(if export_ro { "d" } else { "e" }, &["base:allocation", "qemu:allocation-depth"]).await;
            }
            c.go(if export_ro { "d" } else { "e" }).await;
            let mut bytes = Vec::new();
            for r in if style == Style::Extended { &ereqs } else { &reqs } {
                bytes.extend_from_slice(r);
            }
            bytes.extend_from_slice(&tail);
            poke(c.s, &bytes, true).await;
        });
        check_alive(w);
    }

    #[test]
    fn random_stream_after_a_valid_handshake(style in 0..3u8, bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let w = world();
        let style = [Style::Simple, Style::Structured, Style::Extended][style as usize];
        w.rt.block_on(async {
            let c = open(&w.server, "e", style).await;
            poke(c.s, &bytes, false).await;
        });
        check_alive(w);
    }
}

//! An NBD load generator with a reference image written in parallel, for
//! the block job load tests (`job_load.rs`).
//!
//! `writers` NBD connections (fixed newstyle, `NBD_OPT_GO`, simple
//! replies) each keep `depth` requests in flight: writes of random data
//! (4 KiB to 256 KiB, 512-byte aligned, some with FUA), write-zeroes (with
//! and without `NBD_CMD_FLAG_NO_HOLE`), trims, reads and flushes. Every request
//! that touches data first reserves its byte range in a set shared by all
//! connections: no two requests in flight ever overlap, whichever
//! connection sent them. So a request is ordered after every earlier
//! request it overlaps (those completed before it was sent), and the
//! effect of the whole run is the effect of the requests in the order they
//! were sent. The reference image (in memory, written out as a raw file
//! at the end) is updated in that order, when a write is sent, and the
//! expected data of a read is taken from it at that moment; a read whose
//! reply differs is a failure, as is any error reply.
//!
//! The final content of the export is therefore exactly the reference,
//! whatever the server did meanwhile (jobs, pivots), if it lost nothing.
//!
//! Trims: after `NBD_CMD_TRIM` the NBD protocol leaves the content open
//! until the next write, and a server may ignore a trim. The reference
//! keeps what was there before and marks the 512-byte sectors trimmed;
//! a trimmed sector must read either as before or as zeroes (QEMU's
//! guarantee: a discard never uncovers older data, such as a backing
//! file's), and a write ends the mark. [`Reference::adopt`] takes the
//! export's final content of trimmed sectors, once checked, so that the
//! reference can be compared exactly with the image afterwards.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;

/// splitmix64: a small, good-enough PRNG.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// An open NBD connection in the transmission phase.
pub struct Conn {
    stream: UnixStream,
    /// The export's size.
    pub size: u64,
    /// Its transmission flags.
    pub flags: u16,
}

fn rd_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn rd_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn rd_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Conn {
    /// Connects to `export` on the Unix socket `sock`.
    pub fn connect(sock: &Path, export: &str) -> io::Result<Conn> {
        let mut s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        if rd_u64(&mut s)? != NBDMAGIC || rd_u64(&mut s)? != IHAVEOPT {
            return Err(proto("not a newstyle NBD server"));
        }
        let hflags = rd_u16(&mut s)?;
        // FIXED_NEWSTYLE, and NO_ZEROES if offered.
        s.write_all(&u32::from(hflags & 3).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0);
        loop {
            if rd_u64(&mut s)? != REPLY_MAGIC_OPT {
                return Err(proto("bad option reply magic"));
            }
            let _opt = rd_u32(&mut s)?;
            let ty = rd_u32(&mut s)?;
            let len = rd_u32(&mut s)? as usize;
            let mut data = vec![0; len];
            s.read_exact(&mut data)?;
            if ty & 0x8000_0000 != 0 {
                return Err(proto(format!(
                    "NBD_OPT_GO failed ({ty:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            if ty == REP_INFO && len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT
            {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                flags = u16::from_be_bytes([data[10], data[11]]);
            }
            if ty == REP_ACK {
                break;
            }
        }
        let size = size.ok_or_else(|| proto("no NBD_INFO_EXPORT"))?;
        Ok(Conn {
            stream: s,
            size,
            flags,
        })
    }

    fn send(
        &mut self,
        ty: u16,
        flags: u16,
        cookie: u64,
        off: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&ty.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&off.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.stream.write_all(&h)
    }

    fn reply(&mut self) -> io::Result<(u32, u64)> {
        if rd_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(proto("bad reply magic"));
        }
        let err = rd_u32(&mut self.stream)?;
        Ok((err, rd_u64(&mut self.stream)?))
    }

    /// Reads `[off, off + len)` synchronously.
    pub fn read(&mut self, off: u64, len: u32) -> io::Result<Vec<u8>> {
        self.send(CMD_READ, 0, 1, off, len, &[])?;
        let (err, _) = self.reply()?;
        if err != 0 {
            return Err(proto(format!("read at {off}: NBD error {err}")));
        }
        let mut b = vec![0; len as usize];
        self.stream.read_exact(&mut b)?;
        Ok(b)
    }

    /// Writes `data` at `off` synchronously.
    pub fn write(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        self.send(CMD_WRITE, 0, 2, off, data.len() as u32, data)?;
        match self.reply()? {
            (0, _) => Ok(()),
            (e, _) => Err(proto(format!("write at {off}: NBD error {e}"))),
        }
    }

    /// The whole export.
    pub fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.size as usize);
        let mut off = 0;
        while off < self.size {
            let n = (self.size - off).min(4 << 20);
            out.extend_from_slice(&self.read(off, n as u32)?);
            off += n;
        }
        Ok(out)
    }

    /// Says goodbye.
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, 0, &[]);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

const SECTOR: usize = 512;

/// The expected content: data, and which sectors are trimmed (as they
/// were before, or zeroes).
pub struct Reference {
    /// The content (of trimmed sectors: before the trim).
    pub img: Vec<u8>,
    trimmed: Vec<bool>,
}

/// Where `got` differs from `want`, with the sectors `trimmed` allowed to
/// read as zeroes: the first bad byte and the number of bad sectors.
fn mismatch(got: &[u8], want: &[u8], trimmed: &[bool]) -> Option<(usize, usize)> {
    let mut first = None;
    let mut bad = 0;
    for (i, (g, w)) in got.chunks(SECTOR).zip(want.chunks(SECTOR)).enumerate() {
        if g == w || (trimmed[i] && g.iter().all(|&b| b == 0)) {
            continue;
        }
        bad += 1;
        first.get_or_insert(i * SECTOR + g.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0));
    }
    first.map(|f| (f, bad))
}

/// Describes a mismatch at byte `i` of data read at `base`.
fn describe(got: &[u8], want: &[u8], trimmed: &[bool], base: u64, i: usize, bad: usize) -> String {
    format!(
        "{bad} sectors differ from the reference, the first at byte {:#x}: got {:02x?}, want {:02x?}{}",
        base + i as u64,
        &got[i..(i + 8).min(got.len())],
        &want[i..(i + 8).min(want.len())],
        if trimmed[i / SECTOR] { " (trimmed: or zeroes)" } else { "" }
    )
}

impl Reference {
    /// Checks the export's whole content `got` (trimmed sectors as before
    /// or zeroes), then takes it for the trimmed sectors: afterwards the
    /// reference is exact. Returns how many trimmed sectors changed (to
    /// zeroes).
    pub fn adopt(&mut self, got: &[u8]) -> Result<usize, String> {
        assert_eq!(got.len(), self.img.len());
        if let Some((i, bad)) = mismatch(got, &self.img, &self.trimmed) {
            return Err(describe(got, &self.img, &self.trimmed, 0, i, bad));
        }
        let mut zeroed = 0;
        for (i, t) in self.trimmed.iter_mut().enumerate() {
            if *t {
                let r = i * SECTOR..(i + 1) * SECTOR;
                if self.img[r.clone()] != got[r.clone()] {
                    zeroed += 1;
                }
                self.img[r.clone()].copy_from_slice(&got[r]);
                *t = false;
            }
        }
        Ok(zeroed)
    }

    /// Sectors trimmed and not written since.
    pub fn trimmed_sectors(&self) -> usize {
        self.trimmed.iter().filter(|&&t| t).count()
    }
}

/// The reference image and the ranges in flight.
struct RefState {
    r: Reference,
    inflight: Vec<(u64, u64)>,
}

/// What the writers share.
struct Shared {
    state: Mutex<RefState>,
    freed: Condvar,
    stop: AtomicBool,
    failures: Mutex<Vec<String>>,
    ops: [AtomicU64; 5],
    bytes: AtomicU64,
    /// While set, writers send nothing new (a quiet window).
    hold: AtomicBool,
    /// While set, quiet windows come and go (see [`Load::pulse`]).
    pulse: AtomicBool,
}

impl Shared {
    fn fail(&self, m: String) {
        eprintln!("load failure: {m}");
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(m);
        }
    }
}

/// How the load looks.
#[derive(Clone)]
pub struct LoadConfig {
    /// The NBD server's Unix socket.
    pub socket: PathBuf,
    /// The export's name.
    pub export: String,
    /// Connections.
    pub writers: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Percentages of write-zeroes, trims and reads (the rest writes,
    /// about 1% flushes).
    pub zero_pct: u64,
    pub trim_pct: u64,
    pub read_pct: u64,
    /// Seed of the random choices.
    pub seed: u64,
}

impl LoadConfig {
    /// 4 writers at depth 16: 10% write-zeroes, 5% trims, 20% reads.
    pub fn new(socket: PathBuf, export: &str, seed: u64) -> LoadConfig {
        LoadConfig {
            socket,
            export: export.to_string(),
            writers: 4,
            depth: 16,
            zero_pct: 10,
            trim_pct: 5,
            read_pct: 20,
            seed,
        }
    }
}

/// A running load; [`stop`](Load::stop) it to get the reference.
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

/// What a load did.
#[derive(Debug)]
pub struct Stats {
    pub writes: u64,
    pub zeroes: u64,
    pub trims: u64,
    pub reads: u64,
    pub flushes: u64,
    pub bytes: u64,
    pub secs: f64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} writes, {} write-zeroes, {} trims, {} reads, {} flushes, {} MiB in {:.1} s",
            self.writes,
            self.zeroes,
            self.trims,
            self.reads,
            self.flushes,
            self.bytes >> 20,
            self.secs
        )
    }
}

const OP_WRITE: usize = 0;
const OP_ZERO: usize = 1;
const OP_READ: usize = 2;
const OP_FLUSH: usize = 3;
const OP_TRIM: usize = 4;

struct Pending {
    range: Option<(u64, u64)>,
    op: usize,
    /// For a read: the reference, and which sectors are trimmed.
    expect: Option<(Vec<u8>, Vec<bool>)>,
}

impl Load {
    /// Starts the load over an export whose content is `initial`.
    pub fn start(cfg: LoadConfig, initial: Vec<u8>) -> Load {
        let shared = Arc::new(Shared {
            state: Mutex::new(RefState {
                r: Reference {
                    trimmed: vec![false; initial.len().div_ceil(SECTOR)],
                    img: initial,
                },
                inflight: Vec::new(),
            }),
            freed: Condvar::new(),
            stop: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
            ops: Default::default(),
            bytes: AtomicU64::new(0),
            hold: AtomicBool::new(false),
            pulse: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for w in 0..cfg.writers {
            let conn = Conn::connect(&cfg.socket, &cfg.export)
                .unwrap_or_else(|e| panic!("NBD connection {w}: {e}"));
            let size = shared.state.lock().unwrap().r.img.len() as u64;
            assert_eq!(conn.size, size, "the export's size");
            let (shared, cfg) = (shared.clone(), cfg.clone());
            threads.push(std::thread::spawn(move || {
                writer(w, conn, &cfg, &shared);
            }));
        }
        let pulser = shared.clone();
        threads.push(std::thread::spawn(move || pulses(&pulser)));
        Load {
            shared,
            threads,
            started: Instant::now(),
        }
    }

    /// While `on`, the writers pause now and then, all at once: 200 ms of
    /// load, then a quiet window that starts at 5 ms and doubles each time
    /// up to 320 ms. A mirror in background mode is READY only at a
    /// moment when nothing is dirty and nothing in flight (QEMU's
    /// `mirror_run` as well); under load without any pause that moment
    /// need never come.
    pub fn pulse(&self, on: bool) {
        self.shared.pulse.store(on, Ordering::SeqCst);
    }

    /// Failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.shared.failures.lock().unwrap().clone()
    }

    /// Panics if anything failed so far.
    pub fn check(&self, when: &str) {
        let f = self.failures();
        assert!(f.is_empty(), "{when}: NBD load failures: {f:#?}");
    }

    /// Requests sent so far (all kinds).
    pub fn ops(&self) -> u64 {
        self.shared
            .ops
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .sum()
    }

    /// Writers send nothing new while `on` (what is in flight finishes).
    pub fn hold(&self, on: bool) {
        self.shared.hold.store(on, Ordering::SeqCst);
    }

    /// Stops the writers (after their requests in flight) and returns the
    /// reference image and the statistics; panics on any failure.
    pub fn stop(self) -> (Reference, Stats) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("a load thread panicked");
        }
        let f = self.shared.failures.lock().unwrap().clone();
        assert!(f.is_empty(), "NBD load failures: {f:#?}");
        let s = &self.shared.ops;
        let stats = Stats {
            writes: s[OP_WRITE].load(Ordering::Relaxed),
            zeroes: s[OP_ZERO].load(Ordering::Relaxed),
            trims: s[OP_TRIM].load(Ordering::Relaxed),
            reads: s[OP_READ].load(Ordering::Relaxed),
            flushes: s[OP_FLUSH].load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            secs: self.started.elapsed().as_secs_f64(),
        };
        let shared = Arc::try_unwrap(self.shared)
            .ok()
            .expect("load threads are gone");
        (shared.state.into_inner().unwrap().r, stats)
    }
}

fn pulses(shared: &Shared) {
    let mut quiet = 5;
    while !shared.stop.load(Ordering::SeqCst) {
        if !shared.pulse.load(Ordering::SeqCst) {
            quiet = 5;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
        shared.hold.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(quiet));
        shared.hold.store(false, Ordering::SeqCst);
        quiet = (quiet * 2).min(320);
    }
    shared.hold.store(false, Ordering::SeqCst);
}

fn overlaps(v: &[(u64, u64)], s: u64, e: u64) -> bool {
    v.iter().any(|&(a, b)| a < e && s < b)
}

/// One connection: a sender (this thread) and a receiver thread.
fn writer(w: usize, conn: Conn, cfg: &LoadConfig, shared: &Arc<Shared>) {
    let size = conn.size;
    let mut rng = Rng::new(cfg.seed.wrapping_mul(1000).wrapping_add(w as u64));
    let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
    // Free slots of the connection's queue.
    let slots = Arc::new((Mutex::new(cfg.depth), Condvar::new()));
    let rstream = conn.stream.try_clone().expect("clone the NBD socket");
    let receiver = {
        let (pending, slots, shared) = (pending.clone(), slots.clone(), shared.clone());
        std::thread::spawn(move || receive(w, rstream, &pending, &slots, &shared))
    };
    let mut conn = conn;
    let mut cookie = 0u64;
    let mut buf = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.hold.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        {
            let (m, cv) = &*slots;
            let mut free = m.lock().unwrap();
            while *free == 0 && !receiver.is_finished() {
                free = cv.wait_timeout(free, Duration::from_millis(100)).unwrap().0;
            }
            if *free == 0 {
                shared.fail(format!("writer {w}: the connection is gone"));
                break;
            }
            *free -= 1;
        }
        cookie += 1;
        let dice = rng.range(0, 99);
        let op = if dice == 0 {
            OP_FLUSH
        } else if dice <= cfg.zero_pct {
            OP_ZERO
        } else if dice <= cfg.zero_pct + cfg.trim_pct {
            OP_TRIM
        } else if dice <= cfg.zero_pct + cfg.trim_pct + cfg.read_pct {
            OP_READ
        } else {
            OP_WRITE
        };
        if op == OP_FLUSH {
            pending.lock().unwrap().insert(
                cookie,
                Pending {
                    range: None,
                    op,
                    expect: None,
                },
            );
            shared.ops[op].fetch_add(1, Ordering::Relaxed);
            if let Err(e) = conn.send(CMD_FLUSH, 0, cookie, 0, 0, &[]) {
                shared.fail(format!("writer {w}: sending a flush: {e}"));
                break;
            }
            continue;
        }
        let len = rng.range(8, 512) * 512;
        let len = len.min(size);
        // Reserve a range that overlaps nothing in flight.
        let (off, expect) = {
            let mut st = shared.state.lock().unwrap();
            let off = loop {
                let cand = (0..8)
                    .map(|_| rng.range(0, (size - len) / 512) * 512)
                    .find(|&o| !overlaps(&st.inflight, o, o + len));
                match cand {
                    Some(o) => break o,
                    None => {
                        st = shared
                            .freed
                            .wait_timeout(st, Duration::from_millis(10))
                            .unwrap()
                            .0
                    }
                }
            };
            st.inflight.push((off, off + len));
            let r = off as usize..(off + len) as usize;
            let sectors = r.start / SECTOR..r.end / SECTOR;
            let rf = &mut st.r;
            let expect = match op {
                OP_WRITE => {
                    buf.resize(len as usize, 0);
                    rng.fill(&mut buf);
                    rf.img[r].copy_from_slice(&buf);
                    rf.trimmed[sectors].fill(false);
                    None
                }
                OP_ZERO => {
                    rf.img[r].fill(0);
                    rf.trimmed[sectors].fill(false);
                    None
                }
                OP_TRIM => {
                    rf.trimmed[sectors].fill(true);
                    None
                }
                _ => Some((rf.img[r].to_vec(), rf.trimmed[sectors].to_vec())),
            };
            (off, expect)
        };
        pending.lock().unwrap().insert(
            cookie,
            Pending {
                range: Some((off, off + len)),
                op,
                expect,
            },
        );
        shared.ops[op].fetch_add(1, Ordering::Relaxed);
        shared.bytes.fetch_add(len, Ordering::Relaxed);
        let r = match op {
            OP_WRITE => {
                let fua = if rng.range(0, 9) == 0 { FLAG_FUA } else { 0 };
                conn.send(CMD_WRITE, fua, cookie, off, len as u32, &buf)
            }
            OP_ZERO => {
                let f = if rng.range(0, 1) == 0 {
                    FLAG_NO_HOLE
                } else {
                    0
                };
                conn.send(CMD_WRITE_ZEROES, f, cookie, off, len as u32, &[])
            }
            OP_TRIM => conn.send(CMD_TRIM, 0, cookie, off, len as u32, &[]),
            _ => conn.send(CMD_READ, 0, cookie, off, len as u32, &[]),
        };
        if let Err(e) = r {
            shared.fail(format!("writer {w}: sending a request: {e}"));
            break;
        }
    }
    // Wait for what is in flight, then say goodbye.
    {
        let (m, cv) = &*slots;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut free = m.lock().unwrap();
        while *free < cfg.depth && Instant::now() < deadline && !receiver.is_finished() {
            free = cv.wait_timeout(free, Duration::from_millis(100)).unwrap().0;
        }
        if *free < cfg.depth {
            shared.fail(format!(
                "writer {w}: {} requests never answered",
                cfg.depth - *free
            ));
        }
    }
    conn.disconnect();
    receiver.join().expect("a receiver panicked");
}

fn receive(
    w: usize,
    stream: UnixStream,
    pending: &Mutex<HashMap<u64, Pending>>,
    slots: &(Mutex<usize>, Condvar),
    shared: &Shared,
) {
    let mut r = BufReader::with_capacity(1 << 20, stream);
    loop {
        let magic = match rd_u32(&mut r) {
            Ok(m) => m,
            // The server closes after NBD_CMD_DISC.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return,
            Err(e) => {
                if !shared.stop.load(Ordering::SeqCst) || !pending.lock().unwrap().is_empty() {
                    shared.fail(format!("writer {w}: reading a reply: {e}"));
                }
                return;
            }
        };
        let head = (|| {
            if magic != SIMPLE_REPLY_MAGIC {
                return Err(proto(format!("bad reply magic {magic:#x}")));
            }
            Ok((rd_u32(&mut r)?, rd_u64(&mut r)?))
        })();
        let (err, cookie) = match head {
            Ok(h) => h,
            Err(e) => {
                shared.fail(format!("writer {w}: reading a reply: {e}"));
                return;
            }
        };
        let Some(p) = pending.lock().unwrap().remove(&cookie) else {
            shared.fail(format!("writer {w}: reply for unknown cookie {cookie}"));
            return;
        };
        let what = ["write", "write-zeroes", "read", "flush", "trim"][p.op];
        if err != 0 {
            shared.fail(format!(
                "writer {w}: {what} {:?} failed with NBD error {err}",
                p.range
            ));
        } else if let (Some((expect, trimmed)), Some((s, _))) = (&p.expect, p.range) {
            let mut got = vec![0; expect.len()];
            if let Err(e) = r.read_exact(&mut got) {
                shared.fail(format!("writer {w}: reading read data: {e}"));
                return;
            }
            if let Some((i, bad)) = mismatch(&got, expect, trimmed) {
                shared.fail(format!(
                    "writer {w}: read of {} bytes at {s:#x}: {}",
                    expect.len(),
                    describe(&got, expect, trimmed, s, i, bad)
                ));
            }
        }
        if let Some((s, e)) = p.range {
            let mut st = shared.state.lock().unwrap();
            let i = st
                .inflight
                .iter()
                .position(|&x| x == (s, e))
                .expect("a range in flight");
            st.inflight.swap_remove(i);
            drop(st);
            shared.freed.notify_all();
        }
        let (m, cv) = slots;
        *m.lock().unwrap() += 1;
        cv.notify_all();
    }
}

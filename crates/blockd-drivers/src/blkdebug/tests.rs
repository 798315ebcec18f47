//! Tests of the blkdebug driver.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use blockd_core::{BlockGraph, BlockNode, NodeOptions};
use serde_json::{json, Value};

use super::*;
use crate::open::{blockdev_add, Env};
use crate::options::BlockdevOptions;

// -- A recording in-memory child. ---------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Read(u64, usize),
    Write(u64, Vec<u8>),
    Zeroes(u64, u64),
    Discard(u64, u64),
    Flush,
}

#[derive(Default)]
struct Log {
    ops: Mutex<Vec<Op>>,
    /// Address of the last written buffer, to see it was not copied.
    last_write_ptr: AtomicUsize,
}

impl Log {
    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

struct MemDriver {
    data: Mutex<Vec<u8>>,
    align: u32,
    log: Arc<Log>,
}

impl BlockDriver for MemDriver {
    fn format_name(&self) -> &'static str {
        "mem"
    }
    fn limits(&self) -> IoLimits {
        IoLimits {
            request_alignment: self.align,
            ..IoLimits::default()
        }
    }
    fn length(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn filename(&self) -> Option<String> {
        Some("mem://".to_string())
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        self.log.ops.lock().unwrap().push(Op::Read(offset, len));
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        let b = Bytes::copy_from_slice(&d[o..o + len]);
        Box::pin(async move { Ok(b) })
    }
    fn write(&self, offset: u64, data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        self.log
            .last_write_ptr
            .store(data.as_ptr() as usize, Ordering::SeqCst);
        self.log
            .ops
            .lock()
            .unwrap()
            .push(Op::Write(offset, data.to_vec()));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(&data);
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _flags: ReqFlags) -> IoFuture<'_, ()> {
        self.log.ops.lock().unwrap().push(Op::Zeroes(offset, len));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Box::pin(async { Ok(()) })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.log.ops.lock().unwrap().push(Op::Discard(offset, len));
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.log.ops.lock().unwrap().push(Op::Flush);
        Box::pin(async { Ok(()) })
    }
}

const SIZE: usize = 64 * 1024;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

struct Setup {
    _graph: BlockGraph,
    dbg: Arc<BlockNode>,
    log: Arc<Log>,
}

/// A graph with a recording child `mem` (holding `pattern`) and a
/// blkdebug node `dbg` over it with the given extra options.
async fn try_setup(child_align: u32, extra: Value) -> Result<Setup, BlockError> {
    let graph = BlockGraph::new();
    let log = Arc::new(Log::default());
    let mem = MemDriver {
        data: Mutex::new(pattern(SIZE)),
        align: child_align,
        log: log.clone(),
    };
    let node = Arc::new(BlockNode::new(
        "mem".into(),
        false,
        NodeOptions {
            discard_unmap: true,
            ..NodeOptions::default()
        },
        Box::new(mem),
    ));
    graph
        .insert(std::slice::from_ref(&node), &node, true)
        .unwrap();
    let mut opts = json!({"driver": "blkdebug", "node-name": "dbg", "image": "mem"});
    for (k, v) in extra.as_object().unwrap() {
        opts[k] = v.clone();
    }
    let opts: BlockdevOptions = serde_json::from_value(opts).unwrap();
    let dbg = blockdev_add(&graph, &Env::default(), opts).await?;
    Ok(Setup {
        _graph: graph,
        dbg,
        log,
    })
}

async fn setup_err(child_align: u32, extra: Value) -> BlockError {
    match try_setup(child_align, extra).await {
        Ok(_) => panic!("blkdebug opened"),
        Err(e) => e,
    }
}

async fn setup(extra: Value) -> Setup {
    try_setup(1, extra).await.unwrap()
}

fn errno<T: fmt::Debug>(r: io::Result<T>) -> i32 {
    r.unwrap_err().raw_os_error().unwrap()
}

fn options(extra: Value) -> BlkdebugOptions {
    let mut opts = json!({"image": "mem"});
    for (k, v) in extra.as_object().unwrap() {
        opts[k] = v.clone();
    }
    serde_json::from_value(opts).unwrap()
}

fn check_err(extra: Value) -> String {
    check_with_config(&options(extra)).unwrap_err().msg
}

/// A file in the temporary directory, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(contents: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "blockd-blkdebug-{}-{}.conf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// -- Requests. -----------------------------------------------------------

#[tokio::test]
async fn filter_passes_data_through_unchanged() {
    let s = setup(json!({})).await;
    let d = s.dbg.driver();
    assert!(d.is_filter());
    assert_eq!(d.format_name(), "blkdebug");
    assert_eq!(s.dbg.length(), SIZE as u64);
    assert_eq!(s.dbg.children()[0].name(), "image");
    assert_eq!(
        s.dbg.children()[0].role(),
        ChildRole::FILTERED | ChildRole::PRIMARY
    );
    assert_eq!(s.dbg.filename(), "blkdebug::mem://");

    let got = s.dbg.read(1000, 3000).await.unwrap();
    assert_eq!(&got[..], &pattern(SIZE)[1000..4000]);
    let data = Bytes::from(vec![0xa5u8; 4096]);
    let ptr = data.as_ptr() as usize;
    s.dbg
        .write(8192, data.clone(), ReqFlags::default())
        .await
        .unwrap();
    // The very buffer reached the child: no copy on the way.
    assert_eq!(s.log.last_write_ptr.load(Ordering::SeqCst), ptr);
    assert_eq!(&s.dbg.read(8192, 4096).await.unwrap()[..], &data[..]);
    assert_eq!(
        s.log.take(),
        vec![
            Op::Read(1000, 3000),
            Op::Write(8192, data.to_vec()),
            Op::Read(8192, 4096)
        ]
    );
}

#[tokio::test]
async fn reads_fail_on_the_chosen_sector_only() {
    let s = setup(json!({"inject-error": [{"event": "read_aio", "sector": 8}]})).await;
    let p = pattern(SIZE);
    // Sector 8 is bytes 4096..4608.
    assert_eq!(errno(s.dbg.read(4096, 512).await), libc::EIO);
    assert_eq!(errno(s.dbg.read(0, 8192).await), libc::EIO);
    assert_eq!(errno(s.dbg.read(4095, 2).await), libc::EIO);
    // Requests that do not contain the sector's first byte succeed
    // (QEMU's rule_check), with the child's data byte for byte.
    assert_eq!(&s.dbg.read(0, 4096).await.unwrap()[..], &p[..4096]);
    assert_eq!(&s.dbg.read(4608, 512).await.unwrap()[..], &p[4608..5120]);
    assert_eq!(&s.dbg.read(4097, 100).await.unwrap()[..], &p[4097..4197]);
    // Failed reads never reached the child.
    assert_eq!(
        s.log.take(),
        vec![Op::Read(0, 4096), Op::Read(4608, 512), Op::Read(4097, 100)]
    );
    // The rule stays active and, without iotype, applies to writes too.
    assert_eq!(
        errno(
            s.dbg
                .write(4096, Bytes::from(vec![1u8; 512]), ReqFlags::default())
                .await
        ),
        libc::EIO
    );
    s.dbg
        .write(0, Bytes::from(vec![1u8; 512]), ReqFlags::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn writes_fail_with_the_chosen_errno() {
    let s = setup(json!({"inject-error": [
        {"event": "write_aio", "iotype": "write", "errno": 28, "immediately": true}
    ]}))
    .await;
    let e = s
        .dbg
        .write(0, Bytes::from(vec![1u8; 4096]), ReqFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    // Write-zeroes is another iotype, and reads raise another event.
    s.dbg
        .write_zeroes(0, 4096, ReqFlags::default())
        .await
        .unwrap();
    assert_eq!(&s.dbg.read(0, 4096).await.unwrap()[..], &[0u8; 4096][..]);
    assert_eq!(s.log.take(), vec![Op::Zeroes(0, 4096), Op::Read(0, 4096)]);
}

#[tokio::test]
async fn flush_fails_once_something_was_written() {
    let s = setup(json!({"inject-error": [{"event": "flush_to_disk", "iotype": "flush"}]})).await;
    // Nothing written yet: the block layer skips the node's flush.
    s.dbg.flush().await.unwrap();
    assert_eq!(s.log.take(), vec![Op::Flush]);
    s.dbg
        .write(0, Bytes::from_static(b"x"), ReqFlags::default())
        .await
        .unwrap();
    assert_eq!(errno(s.dbg.flush().await), libc::EIO);
    assert_eq!(errno(s.dbg.flush().await), libc::EIO);
    assert_eq!(s.log.take(), vec![Op::Write(0, b"x".to_vec())]);
    assert_eq!(
        s.dbg.stats.failed_flush_operations.load(Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn once_fires_once() {
    let s = setup(json!({"inject-error": [
        {"event": "read_aio", "errno": 5, "once": true}
    ]}))
    .await;
    assert_eq!(errno(s.dbg.read(0, 512).await), libc::EIO);
    assert_eq!(&s.dbg.read(0, 512).await.unwrap()[..], &pattern(512)[..]);
    assert_eq!(&s.dbg.read(0, 512).await.unwrap()[..], &pattern(512)[..]);
}

#[tokio::test]
async fn set_state_drives_which_rules_activate() {
    let s = setup(json!({
        "inject-error": [
            {"event": "read_aio", "state": 2, "errno": 5},
            {"event": "read_aio", "state": 3, "errno": 0}
        ],
        "set-state": [
            {"event": "read_aio", "state": 1, "new_state": 2},
            {"event": "write_aio", "state": 2, "new_state": 3}
        ]
    }))
    .await;
    // State 1: the read moves to state 2; the state-2 rule was not
    // active when the event was raised.
    s.dbg.read(0, 512).await.unwrap();
    // State 2: the rule activates and fires, and keeps firing.
    assert_eq!(errno(s.dbg.read(0, 512).await), libc::EIO);
    assert_eq!(errno(s.dbg.read(0, 512).await), libc::EIO);
    // A write moves to state 3. Only a set-state rule matches
    // write_aio, so the active list is unchanged and its rule (no
    // iotype: all types) fails the write too.
    assert_eq!(
        errno(
            s.dbg
                .write(0, Bytes::from_static(b"ab"), ReqFlags::default())
                .await
        ),
        libc::EIO
    );
    // State 3: the errno-0 rule replaces the active list: reads pass.
    assert_eq!(&s.dbg.read(0, 512).await.unwrap()[..], &pattern(512)[..]);
}

#[tokio::test]
async fn immediately_and_deferred_failures_both_skip_the_child() {
    for immediately in [false, true] {
        let s = setup(json!({"inject-error": [
            {"event": "read_aio", "immediately": immediately}
        ]}))
        .await;
        assert_eq!(errno(s.dbg.read(0, 512).await), libc::EIO);
        assert_eq!(s.log.take(), vec![]);
    }
}

#[tokio::test]
async fn none_rules_are_active_from_the_start() {
    let s = setup(json!({"inject-error": [
        {"event": "none", "iotype": "block-status", "errno": 61}
    ]}))
    .await;
    assert_eq!(errno(s.dbg.block_status(0, 4096).await), libc::ENODATA);
    s.dbg.read(0, 512).await.unwrap();
    // A rule without iotype does not apply to block-status.
    let s = setup(json!({"inject-error": [{"event": "none"}]})).await;
    assert_eq!(s.dbg.block_status(0, 4096).await.unwrap().len, 4096);
    assert_eq!(errno(s.dbg.read(0, 512).await), libc::EIO);
}

#[tokio::test]
async fn align_makes_the_core_pad_writes() {
    let s = setup(json!({"align": 4096})).await;
    assert_eq!(s.dbg.driver().limits().request_alignment, 4096);
    let data: Vec<u8> = (0..512).map(|i| (i % 13) as u8 + 100).collect();
    s.dbg
        .write(100, Bytes::from(data.clone()), ReqFlags::default())
        .await
        .unwrap();
    let mut expected = pattern(4096);
    expected[100..612].copy_from_slice(&data);
    assert_eq!(
        s.log.take(),
        vec![Op::Read(0, 4096), Op::Write(0, expected.clone())]
    );
    assert_eq!(&s.dbg.read(100, 512).await.unwrap()[..], &data[..]);
    assert_eq!(&s.dbg.read(0, 4096).await.unwrap()[..], &expected[..]);
    assert_eq!(s.log.take(), vec![Op::Read(0, 4096), Op::Read(0, 4096)]);
}

#[tokio::test]
async fn write_zeroes_is_split_for_opt_write_zero() {
    let s = setup(json!({
        "align": 512, "opt-write-zero": 4096,
        "inject-error": [{"event": "pwritev_zero", "iotype": "write-zeroes", "sector": 16, "once": true}]
    }))
    .await;
    s.dbg
        .write_zeroes(512, 8192, ReqFlags::default())
        .await
        .unwrap();
    assert_eq!(
        s.log.take(),
        vec![
            Op::Write(512, vec![0; 3584]),
            Op::Zeroes(4096, 4096),
            Op::Write(8192, vec![0; 512]),
        ]
    );
    // The aligned middle part (sector 16 is byte 8192) fails; the
    // short head before it was written as zeroes.
    assert_eq!(
        errno(s.dbg.write_zeroes(6144, 8192, ReqFlags::default()).await),
        libc::EIO
    );
    assert_eq!(s.log.take(), vec![Op::Write(6144, vec![0; 2048])]);
    // no_fallback refuses the short pieces.
    let flags = ReqFlags {
        no_fallback: true,
        ..ReqFlags::default()
    };
    assert_eq!(
        errno(s.dbg.write_zeroes(512, 512, flags).await),
        libc::ENOTSUP
    );
}

#[tokio::test]
async fn discard_is_split_by_max_discard() {
    let s = setup(json!({
        "discard": "unmap", "align": 512, "max-discard": 4096,
        "inject-error": [{"event": "none", "iotype": "discard", "sector": 16}]
    }))
    .await;
    s.dbg.discard(0, 6144).await.unwrap();
    assert_eq!(
        s.log.take(),
        vec![Op::Discard(0, 4096), Op::Discard(4096, 2048)]
    );
    assert_eq!(errno(s.dbg.discard(4096, 8192).await), libc::EIO);
    assert_eq!(s.log.take(), vec![Op::Discard(4096, 4096)]);
}

#[tokio::test]
async fn limits_are_declared() {
    let s = setup(json!({
        "align": 512, "max-transfer": 65536, "opt-write-zero": 4096, "opt-discard": 8192
    }))
    .await;
    assert_eq!(
        s.dbg.driver().limits(),
        IoLimits {
            request_alignment: 512,
            max_transfer: 65536,
            pwrite_zeroes_alignment: 4096,
            pdiscard_alignment: 8192,
        }
    );
    // With options other than image/config there is no blkdebug: name.
    assert_eq!(s.dbg.filename(), "mem://");
}

// -- Options and checks. -------------------------------------------------

#[test]
fn limit_checks_read_like_qemu() {
    assert_eq!(
        check_err(json!({"align": 3})),
        "Cannot meet constraints with align 3"
    );
    assert_eq!(
        check_err(json!({"align": 1i64 << 31})),
        "Cannot meet constraints with align 2147483648"
    );
    assert_eq!(
        check_err(json!({"align": -1})),
        "Value '-1' is out of range for parameter 'align'"
    );
    assert_eq!(
        check_err(json!({"align": 512, "max-transfer": 1000})),
        "Cannot meet constraints with max-transfer 1000"
    );
    assert_eq!(
        check_err(json!({"opt-write-zero": 4096, "max-write-zero": 6144})),
        "Cannot meet constraints with max-write-zero 6144"
    );
    assert_eq!(
        check_err(json!({"align": 4096, "opt-discard": 512})),
        "Cannot meet constraints with opt-discard 512"
    );
    assert_eq!(
        check_err(json!({"opt-discard": 1024, "max-discard": 1536})),
        "Cannot meet constraints with max-discard 1536"
    );
    assert_eq!(
        check_err(json!({"max-discard": -5})),
        "Value '-5' is out of range for parameter 'max-discard'"
    );
    // 0 means "no override", as in QEMU.
    check_with_config(&options(json!({"align": 0, "max-transfer": 0}))).unwrap();
    check_with_config(&options(
        json!({"align": 4096, "max-transfer": 8192, "opt-write-zero": 12288}),
    ))
    .unwrap();
}

#[tokio::test]
async fn limits_are_checked_against_the_childs_alignment() {
    let e = setup_err(4096, json!({"max-transfer": 512})).await;
    assert_eq!(e.msg, "Cannot meet constraints with max-transfer 512");
    try_setup(4096, json!({"max-transfer": 8192}))
        .await
        .unwrap();
}

#[test]
fn rule_values_are_checked() {
    assert_eq!(
        check_err(json!({"inject-error": [{"event": "read_aio", "errno": -5}]})),
        "inject-error: errno must be between 0 and 4095, not -5"
    );
    assert_eq!(
        check_err(json!({"inject-error": [{"event": "read_aio", "sector": -2}]})),
        "inject-error: sector must be -1 (any) or a sector number, not -2"
    );
    assert_eq!(
        check_err(json!({"inject-error": [{"event": "read_aio", "sector": i64::MAX}]})),
        format!("inject-error: sector {} is out of range", i64::MAX)
    );
    check_with_config(&options(
        json!({"inject-error": [{"event": "read_aio", "sector": -1, "errno": 0}]}),
    ))
    .unwrap();
}

#[test]
fn rule_defaults_and_order() {
    let cfg = TempFile::new(
        "[set-state]\nevent = \"l2_load\"\nnew_state = \"7\"\n\
         [inject-error]\nevent = \"l2_load\"\n",
    );
    let rules = rules_of(&options(json!({
        "config": cfg.path(),
        "inject-error": [{"event": "read_aio", "state": 2, "iotype": "discard",
                          "errno": 28, "sector": 3, "once": true, "immediately": true}],
        "set-state": [{"event": "write_aio", "new_state": 4}]
    })))
    .unwrap();
    let file_inject = Rule {
        event: BlkdebugEvent::L2Load,
        state: 0,
        action: Action::Inject(Inject {
            iotypes: DEFAULT_IOTYPES,
            errno: libc::EIO,
            offset: None,
            once: false,
            immediately: false,
        }),
    };
    let qmp_inject = Rule {
        event: BlkdebugEvent::ReadAio,
        state: 2,
        action: Action::Inject(Inject {
            iotypes: BlkdebugIoType::Discard.bit(),
            errno: libc::ENOSPC,
            offset: Some(1536),
            once: true,
            immediately: true,
        }),
    };
    let file_set = Rule {
        event: BlkdebugEvent::L2Load,
        state: 0,
        action: Action::SetState(7),
    };
    let qmp_set = Rule {
        event: BlkdebugEvent::WriteAio,
        state: 0,
        action: Action::SetState(4),
    };
    assert_eq!(rules, vec![file_inject, qmp_inject, file_set, qmp_set]);
}

// -- Config files. -------------------------------------------------------

#[tokio::test]
async fn config_file_rules_apply() {
    let cfg = TempFile::new(
        "# fail the first read of sector 0 with ENOSPC, then go to state 2\n\
         [inject-error]\n  event = \"read_aio\"\n  errno = \"28\"\n  sector = \"0\"\n  state = \"1\"\n\
         \n\
         [set-state]\n  event = \"read_aio\"\n  state = \"1\"\n  new_state = \"2\"\n",
    );
    let s = setup(json!({"config": cfg.path()})).await;
    assert_eq!(s.dbg.filename(), format!("blkdebug:{}:mem://", cfg.path()));
    assert_eq!(errno(s.dbg.read(0, 512).await), libc::ENOSPC);
    // The rule stays active in state 2 (no rule of read_aio activates
    // in state 2, so the active list is kept).
    assert_eq!(errno(s.dbg.read(0, 512).await), libc::ENOSPC);
    assert_eq!(
        &s.dbg.read(512, 512).await.unwrap()[..],
        &pattern(1024)[512..]
    );
}

#[test]
fn bad_config_files_are_refused() {
    let cases = [
        (
            "[inject-error]\nevent = \"nope\"\n",
            "invalid parameter value: nope",
        ),
        (
            "[inject-error]\nerrno = \"5\"\n",
            "Missing event name for rule",
        ),
        (
            "[set-state]\nnew_state = \"5\"\n",
            "Missing event name for rule",
        ),
        (
            "[inject-error]\nevent = \"read_aio\"\niotype = \"bogus\"\n",
            "invalid parameter value: bogus",
        ),
        (
            "[inject-error]\nonce = \"1\"\n",
            "Parameter 'once' expects 'on' or 'off'",
        ),
        ("[bogus]\n", "There is no option group 'bogus'"),
        ("event = \"read_aio\"\n", "no group defined"),
        ("[inject-error]\n \n", "parse error"),
        (
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"-1\"\n",
            "inject-error: errno must be between 0 and 4095, not -1",
        ),
    ];
    for (text, msg) in cases {
        let cfg = TempFile::new(text);
        assert_eq!(check_err(json!({"config": cfg.path()})), msg, "{text:?}");
    }
    // Errors in the file come before those of the limits.
    let cfg = TempFile::new("parse error?\n");
    assert_eq!(
        check_err(json!({"config": cfg.path(), "align": 3})),
        "no group defined"
    );
}

#[tokio::test]
async fn missing_or_unreadable_config_file() {
    let e =
        check_with_config(&options(json!({"config": "/nonexistent/blkdebug.conf"}))).unwrap_err();
    assert_eq!(
        e.msg,
        "Could not read blkdebug config file: No such file or directory"
    );
    assert_eq!(e.kind, blockd_core::ErrorKind::NotFound);
    let dir = std::env::temp_dir();
    assert_eq!(
        check_err(json!({"config": dir.to_str().unwrap()})),
        "Cannot read config file: Is a directory"
    );
    // open() reads the file again and reports the same.
    let e = setup_err(1, json!({"config": "/nonexistent/blkdebug.conf"})).await;
    assert_eq!(
        e.msg,
        "Could not read blkdebug config file: No such file or directory"
    );
}

#[test]
fn event_and_iotype_names() {
    assert_eq!(BlkdebugEvent::ALL.len(), 48);
    for e in BlkdebugEvent::ALL {
        assert_eq!(e.as_str().parse::<BlkdebugEvent>().unwrap(), *e);
    }
    for t in BlkdebugIoType::ALL {
        assert_eq!(t.as_str().parse::<BlkdebugIoType>().unwrap(), t);
    }
    assert_eq!(
        "l1_grow.alloc_table"
            .parse::<BlkdebugEvent>()
            .unwrap_err()
            .msg,
        "invalid parameter value: l1_grow.alloc_table"
    );
}

// -- The rule engine. ----------------------------------------------------

fn inject(event: BlkdebugEvent, state: i64, errno: i32) -> Rule {
    Rule {
        event,
        state,
        action: Action::Inject(Inject {
            iotypes: DEFAULT_IOTYPES,
            errno,
            offset: None,
            once: false,
            immediately: true,
        }),
    }
}

fn set_state(event: BlkdebugEvent, state: i64, new_state: i64) -> Rule {
    Rule {
        event,
        state,
        action: Action::SetState(new_state),
    }
}

use BlkdebugEvent::{L2Load, ReadAio, WriteAio};

fn fails(r: &mut Rules) -> Option<i32> {
    r.check(0, 512, BlkdebugIoType::Read).map(|f| f.errno)
}

#[test]
fn oldest_active_rule_fires_first() {
    let mut r = Rules::new(vec![inject(ReadAio, 0, 5), inject(ReadAio, 0, 28)]);
    assert_eq!(fails(&mut r), None);
    r.event(ReadAio);
    assert_eq!(fails(&mut r), Some(5));
}

#[test]
fn activation_replaces_the_active_list_only_when_a_rule_matches() {
    let mut r = Rules::new(vec![inject(ReadAio, 0, 5), inject(L2Load, 0, 28)]);
    r.event(ReadAio);
    r.event(WriteAio); // No rule: the list stays.
    assert_eq!(fails(&mut r), Some(5));
    r.event(L2Load);
    assert_eq!(fails(&mut r), Some(28));
}

#[test]
fn set_state_uses_the_state_before_the_event_and_the_oldest_rule_wins() {
    let mut r = Rules::new(vec![
        inject(L2Load, 2, 5),
        set_state(L2Load, 1, 2),
        set_state(L2Load, 0, 9),
        set_state(L2Load, 2, 3),
    ]);
    assert_eq!(r.state, 1);
    r.event(L2Load);
    // Rules for state 1 and any state acted; the oldest (1 -> 2) wins.
    assert_eq!(r.state, 2);
    assert_eq!(fails(&mut r), None);
    // In state 2 the state-2 inject rule activates, and of the
    // matching set-state rules (any -> 9, 2 -> 3) the oldest wins.
    r.event(L2Load);
    assert_eq!(r.state, 9);
    assert_eq!(fails(&mut r), Some(5));
}

#[test]
fn once_deletes_the_rule() {
    let mut rule = inject(ReadAio, 0, 5);
    if let Action::Inject(i) = &mut rule.action {
        i.once = true;
    }
    let mut r = Rules::new(vec![rule]);
    r.event(ReadAio);
    assert_eq!(fails(&mut r), Some(5));
    assert_eq!(fails(&mut r), None);
    r.event(ReadAio);
    assert_eq!(fails(&mut r), None);
    assert!(r.list.is_empty());
}

#[test]
fn sector_and_iotype_filter() {
    let mut rule = inject(ReadAio, 0, 5);
    if let Action::Inject(i) = &mut rule.action {
        i.offset = Some(1024);
        i.iotypes = BlkdebugIoType::Write.bit();
    }
    let mut r = Rules::new(vec![rule]);
    r.event(ReadAio);
    let w = BlkdebugIoType::Write;
    assert!(r.check(1024, 1, w).is_some());
    assert!(r.check(0, 1025, w).is_some());
    assert!(r.check(0, 1024, w).is_none());
    assert!(r.check(1025, 512, w).is_none());
    assert!(r.check(1024, 512, BlkdebugIoType::Read).is_none());
    // Zero-length requests (flush) only match rules without a sector.
    assert!(r.check(1024, 0, w).is_none());
}

//! `blkdebug`: an error-injecting filter for tests (QEMU's `blkdebug`).
//!
//! The node passes every request through to its `image` child unchanged
//! (the data buffers themselves, without copying), except where a rule
//! says otherwise.
//!
//! # Rules
//!
//! Rules come from the `inject-error` and `set-state` options and from the
//! `config` file (QEMU's ini-like syntax, see below). Each rule belongs to
//! an *event* and, optionally, a *state* (0 or absent: any state). The
//! node has a state number, 1 after opening.
//!
//! When an event is raised, the rules of that event whose state matches the
//! current state act, newest rule first (QEMU keeps them in a list it
//! prepends to):
//!
//! * `set-state` rules compute the new state (the oldest matching rule
//!   wins); it takes effect once all rules of the event have acted, so the
//!   state check above uses the state from before the event.
//! * `inject-error` rules become *active*: if at least one matches, the
//!   active list is replaced by the matching rules, oldest first. If none
//!   matches, the active list is left as it was: active rules stay active
//!   until another event activates other rules, or until they fire `once`.
//!
//! Every request then checks the active list (QEMU's `rule_check`): the
//! first rule whose `iotype` includes the request's type and whose `sector`
//! is -1 or has its first byte (`sector * 512`) inside the request fails the
//! request with `errno` (a rule with `errno` 0 matches but lets the request
//! through). The failed request never reaches the child, whether or not the
//! rule is `immediately`: `immediately` only makes the failure synchronous,
//! without it the request first yields to the scheduler once, as QEMU
//! completes it from a later iteration of its event loop. A `once` rule is
//! deleted when it fires. Without `iotype`, a rule applies to reads,
//! writes, write-zeroes, discards and flushes, but not to block-status
//! queries.
//!
//! # Events
//!
//! Formats above can raise any event through [`BlkdebugDriver::debug_event`].
//! The node raises these itself:
//!
//! | when | events |
//! | --- | --- |
//! | at the end of opening | `none` |
//! | each read | `read_aio`\* |
//! | each write | `write_aio`\*, `pwritev`, then after the request `pwritev_done` |
//! | each write-zeroes | `write_aio`\*, `pwritev_zero`, then after the request `pwritev_done` |
//! | each flush | `flush_to_os`\*, then, if anything was written since the last successful flush, `flush_to_disk`\* |
//!
//! `pwritev`, `pwritev_zero` and `pwritev_done` are what QEMU's generic
//! write path raises on the node. The events marked \* are, in QEMU, raised
//! by the node *above* blkdebug (a format's data reads and writes, a
//! parent's flush); blockd raises them here so that rules on them work
//! without such a format. [`BlkdebugDriver::set_implicit_events`] turns
//! them off for a format that raises them itself.
//!
//! Like QEMU's block layer, a flush with nothing written since the last
//! successful flush skips the node's own flush (no `flush_to_disk`, no rule
//! check) and only flushes the child. Writes, write-zeroes, discards and
//! truncates count as written, whether they succeeded or not.
//!
//! Not raised: the read-modify-write events (`pwritev_rmw_*`), because
//! blockd's core pads requests before they reach the driver; a padding
//! read arrives as an ordinary read (and raises `read_aio`).
//!
//! # Limits
//!
//! `align` becomes the node's request alignment (0 or absent: 1), so the
//! core pads requests for it. `max-transfer` becomes the largest transfer,
//! `opt-discard` the discard granularity (when it is a power of two).
//! Write-zeroes requests are split as QEMU's block layer splits them for
//! `opt-write-zero` and `max-write-zero`: pieces smaller than
//! `max(align, opt-write-zero)` are written as zero buffers (rule type
//! `write`, or ENOTSUP with `no_fallback`), the rest as write-zeroes of at
//! most `max-write-zero` bytes. Discards are split by `max-discard`, and
//! an injected ENOTSUP on a discard is ignored, as QEMU ignores it.
//!
//! # Config file
//!
//! QEMU's `-readconfig` syntax, line by line: empty lines and lines
//! starting with `#` are skipped; `[inject-error]` or `[set-state]` (or
//! `[group "id"]`) starts a section; `name = "value"` sets an option of the
//! current section. Options: `event`, `state`, `iotype`, `errno`, `sector`,
//! `once`, `immediately` for `inject-error`; `event`, `state`, `new_state`
//! for `set-state`. Numbers are C integers (decimal, `0x` hex or `0`
//! octal), booleans `on`/`off` (or `yes`/`no`, `true`/`false`, `y`/`n`).
//! Rules of the file come before the ones from the options, and all
//! `inject-error` rules before all `set-state` rules.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use blockd_core::{
    BlockDriver, BlockError, BlockStatus, ChildRef, ChildRole, IoFuture, IoLimits, ReqFlags,
};
use bytes::Bytes;

use crate::open::OpenCtx;
use crate::options::{BlkdebugInjectError, BlkdebugOptions, BlkdebugSetState};

/// Bytes of a sector, the unit of a rule's `sector`.
const SECTOR_SIZE: u64 = 512;
/// C's `INT_MAX`, QEMU's bound for the limits.
const INT_MAX: u64 = i32::MAX as u64;
/// Largest zero buffer written at once by the write-zeroes fallback
/// (QEMU's `MAX_BOUNCE_BUFFER`).
const MAX_BOUNCE_BUFFER: u64 = 32768 * 512;
/// Largest errno a rule may inject (Linux's `MAX_ERRNO`).
const MAX_ERRNO: i64 = 4095;

macro_rules! events {
    ($($variant:ident => $name:literal,)*) => {
        /// `BlkdebugEvent`: a point where rules can act.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum BlkdebugEvent {
            $(
                #[doc = concat!("`", $name, "`.")]
                $variant,
            )*
        }

        impl BlkdebugEvent {
            /// Every event, in schema order.
            pub const ALL: &'static [BlkdebugEvent] = &[$(BlkdebugEvent::$variant,)*];

            /// The schema name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(BlkdebugEvent::$variant => $name,)*
                }
            }
        }
    };
}

events! {
    L1Update => "l1_update",
    L1GrowAllocTable => "l1_grow_alloc_table",
    L1GrowWriteTable => "l1_grow_write_table",
    L1GrowActivateTable => "l1_grow_activate_table",
    L2Load => "l2_load",
    L2Update => "l2_update",
    L2UpdateCompressed => "l2_update_compressed",
    L2AllocCowRead => "l2_alloc_cow_read",
    L2AllocWrite => "l2_alloc_write",
    ReadAio => "read_aio",
    ReadBackingAio => "read_backing_aio",
    ReadCompressed => "read_compressed",
    WriteAio => "write_aio",
    WriteCompressed => "write_compressed",
    VmstateLoad => "vmstate_load",
    VmstateSave => "vmstate_save",
    CowRead => "cow_read",
    CowWrite => "cow_write",
    ReftableLoad => "reftable_load",
    ReftableGrow => "reftable_grow",
    ReftableUpdate => "reftable_update",
    RefblockLoad => "refblock_load",
    RefblockUpdate => "refblock_update",
    RefblockUpdatePart => "refblock_update_part",
    RefblockAlloc => "refblock_alloc",
    RefblockAllocHookup => "refblock_alloc_hookup",
    RefblockAllocWrite => "refblock_alloc_write",
    RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
    RefblockAllocWriteTable => "refblock_alloc_write_table",
    RefblockAllocSwitchTable => "refblock_alloc_switch_table",
    ClusterAlloc => "cluster_alloc",
    ClusterAllocBytes => "cluster_alloc_bytes",
    ClusterFree => "cluster_free",
    FlushToOs => "flush_to_os",
    FlushToDisk => "flush_to_disk",
    PwritevRmwHead => "pwritev_rmw_head",
    PwritevRmwAfterHead => "pwritev_rmw_after_head",
    PwritevRmwTail => "pwritev_rmw_tail",
    PwritevRmwAfterTail => "pwritev_rmw_after_tail",
    Pwritev => "pwritev",
    PwritevZero => "pwritev_zero",
    PwritevDone => "pwritev_done",
    EmptyImagePrepare => "empty_image_prepare",
    L1ShrinkWriteTable => "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
    CorWrite => "cor_write",
    ClusterAllocSpace => "cluster_alloc_space",
    None => "none",
}

impl FromStr for BlkdebugEvent {
    type Err = BlockError;

    /// Parses a schema name, failing with QEMU's `qapi_enum_parse` message.
    fn from_str(s: &str) -> Result<Self, BlockError> {
        BlkdebugEvent::ALL
            .iter()
            .copied()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| invalid_value(s))
    }
}

impl fmt::Display for BlkdebugEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `BlkdebugIOType`: the kind of request a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlkdebugIoType {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `write-zeroes`.
    WriteZeroes,
    /// `discard`.
    Discard,
    /// `flush`.
    Flush,
    /// `block-status`.
    BlockStatus,
}

impl BlkdebugIoType {
    /// Every type, in schema order.
    pub const ALL: [BlkdebugIoType; 6] = [
        BlkdebugIoType::Read,
        BlkdebugIoType::Write,
        BlkdebugIoType::WriteZeroes,
        BlkdebugIoType::Discard,
        BlkdebugIoType::Flush,
        BlkdebugIoType::BlockStatus,
    ];

    /// The schema name.
    pub fn as_str(self) -> &'static str {
        match self {
            BlkdebugIoType::Read => "read",
            BlkdebugIoType::Write => "write",
            BlkdebugIoType::WriteZeroes => "write-zeroes",
            BlkdebugIoType::Discard => "discard",
            BlkdebugIoType::Flush => "flush",
            BlkdebugIoType::BlockStatus => "block-status",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl FromStr for BlkdebugIoType {
    type Err = BlockError;

    /// Parses a schema name, failing with QEMU's `qapi_enum_parse` message.
    fn from_str(s: &str) -> Result<Self, BlockError> {
        BlkdebugIoType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| invalid_value(s))
    }
}

/// The types a rule without `iotype` applies to: all but block-status.
const DEFAULT_IOTYPES: u8 = (1 << BlkdebugIoType::Read as u8)
    | (1 << BlkdebugIoType::Write as u8)
    | (1 << BlkdebugIoType::WriteZeroes as u8)
    | (1 << BlkdebugIoType::Discard as u8)
    | (1 << BlkdebugIoType::Flush as u8);

fn invalid_value(s: &str) -> BlockError {
    BlockError::invalid(format!("invalid parameter value: {s}"))
}

/// What an `inject-error` rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inject {
    /// Bit set of [`BlkdebugIoType`]s the rule applies to.
    iotypes: u8,
    /// The errno requests fail with (0: they do not fail).
    errno: i32,
    /// Byte offset of the rule's sector; `None` for any request.
    offset: Option<u64>,
    /// Delete the rule once it fired.
    once: bool,
    /// Fail without yielding first.
    immediately: bool,
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// `inject-error`.
    Inject(Inject),
    /// `set-state`: the state to move to.
    SetState(i64),
}

/// A rule, as QEMU's `add_rule` builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    event: BlkdebugEvent,
    /// Only in this state (0: any).
    state: i64,
    action: Action,
}

/// A rule that fired: how to fail the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure {
    errno: i32,
    immediately: bool,
}

/// The rule engine: the rules, the active ones and the state.
#[derive(Debug)]
struct Rules {
    state: i64,
    /// Rules with their ids, oldest first.
    list: Vec<(u64, Rule)>,
    /// Ids of the active `inject-error` rules, in the order they are checked.
    active: Vec<u64>,
}

impl Rules {
    fn new(rules: Vec<Rule>) -> Rules {
        Rules {
            state: 1,
            list: (0u64..).zip(rules).collect(),
            active: Vec::new(),
        }
    }

    fn rule(&self, id: u64) -> Option<&Rule> {
        self.list.iter().find(|(i, _)| *i == id).map(|(_, r)| r)
    }

    /// Raises `event` (QEMU's `blkdebug_co_debug_event`).
    fn event(&mut self, event: BlkdebugEvent) {
        let current = self.state;
        let mut new_state = current;
        let mut activated: Option<Vec<u64>> = None;
        for (id, rule) in self.list.iter().rev() {
            if rule.event != event || (rule.state != 0 && rule.state != current) {
                continue;
            }
            match rule.action {
                Action::Inject(_) => activated.get_or_insert_with(Vec::new).insert(0, *id),
                Action::SetState(s) => new_state = s,
            }
        }
        if let Some(a) = activated {
            self.active = a;
        }
        self.state = new_state;
    }

    /// Whether a request of `iotype` on `offset..offset + bytes` fails
    /// (QEMU's `rule_check`); deletes a `once` rule that fires.
    fn check(&mut self, offset: u64, bytes: u64, iotype: BlkdebugIoType) -> Option<Failure> {
        let (pos, inject) = self.active.iter().enumerate().find_map(|(pos, id)| {
            let Some(Rule {
                action: Action::Inject(inject),
                ..
            }) = self.rule(*id)
            else {
                return None;
            };
            let hits = inject
                .offset
                .is_none_or(|o| bytes > 0 && o >= offset && o - offset < bytes);
            (hits && inject.iotypes & iotype.bit() != 0).then_some((pos, *inject))
        })?;
        if inject.errno == 0 {
            return None;
        }
        if inject.once {
            let id = self.active.remove(pos);
            self.list.retain(|(i, _)| *i != id);
        }
        Some(Failure {
            errno: inject.errno,
            immediately: inject.immediately,
        })
    }
}

// ---------------------------------------------------------------------------
// Options and the config file.

/// The limit options, checked to be non-negative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Limits {
    align: u64,
    max_transfer: u64,
    opt_write_zero: u64,
    max_write_zero: u64,
    opt_discard: u64,
    max_discard: u64,
}

impl Limits {
    /// Reads the limit options as QEMU's size options (QemuOpts reads the
    /// number QMP gave as a string): negative values are refused, absent
    /// ones are 0 (no override).
    fn from_options(o: &BlkdebugOptions) -> Result<Limits, BlockError> {
        fn size(name: &str, v: Option<i64>) -> Result<u64, BlockError> {
            match v {
                Some(v) => blockd_optval::qemu_opts::parse_size(name, &v.to_string())
                    .map_err(BlockError::invalid),
                None => Ok(0),
            }
        }
        Ok(Limits {
            align: size("align", o.align)?,
            max_transfer: size("max-transfer", o.max_transfer.map(i64::from))?,
            opt_write_zero: size("opt-write-zero", o.opt_write_zero.map(i64::from))?,
            max_write_zero: size("max-write-zero", o.max_write_zero.map(i64::from))?,
            opt_discard: size("opt-discard", o.opt_discard.map(i64::from))?,
            max_discard: size("max-discard", o.max_discard.map(i64::from))?,
        })
    }

    /// QEMU's consistency checks, against the larger of `align` and the
    /// child's request alignment.
    fn check(&self, child_align: u64) -> Result<(), BlockError> {
        let fail = |name: &str, v: u64| {
            Err(BlockError::invalid(format!(
                "Cannot meet constraints with {name} {v}"
            )))
        };
        let bad = |v: u64, multiple_of: u64| v != 0 && (v >= INT_MAX || v % multiple_of != 0);
        if self.align != 0 && (self.align >= INT_MAX || !self.align.is_power_of_two()) {
            return fail("align", self.align);
        }
        let align = self.align.max(child_align).max(1);
        if bad(self.max_transfer, align) {
            return fail("max-transfer", self.max_transfer);
        }
        if bad(self.opt_write_zero, align) {
            return fail("opt-write-zero", self.opt_write_zero);
        }
        if bad(self.max_write_zero, self.opt_write_zero.max(align)) {
            return fail("max-write-zero", self.max_write_zero);
        }
        if bad(self.opt_discard, align) {
            return fail("opt-discard", self.opt_discard);
        }
        if bad(self.max_discard, self.opt_discard.max(align)) {
            return fail("max-discard", self.max_discard);
        }
        Ok(())
    }
}

/// A C `int` from a rule number, as QEMU stores `state` and `new_state`.
fn c_int(v: i64) -> i64 {
    v as i32 as i64
}

/// Builds an `inject-error` rule from its option values.
fn inject_rule(
    event: BlkdebugEvent,
    state: i64,
    iotype: Option<&str>,
    errno: Option<i64>,
    sector: Option<i64>,
    once: bool,
    immediately: bool,
) -> Result<Rule, BlockError> {
    let errno = errno.unwrap_or(i64::from(libc::EIO));
    if !(0..=MAX_ERRNO).contains(&errno) {
        return Err(BlockError::invalid(format!(
            "inject-error: errno must be between 0 and {MAX_ERRNO}, not {errno}"
        )));
    }
    let sector = sector.unwrap_or(-1);
    if sector < -1 {
        return Err(BlockError::invalid(format!(
            "inject-error: sector must be -1 (any) or a sector number, not {sector}"
        )));
    }
    let offset = match sector {
        -1 => None,
        s => Some((s as u64).checked_mul(SECTOR_SIZE).ok_or_else(|| {
            BlockError::invalid(format!("inject-error: sector {s} is out of range"))
        })?),
    };
    let iotypes = match iotype {
        Some(t) => t.parse::<BlkdebugIoType>()?.bit(),
        None => DEFAULT_IOTYPES,
    };
    Ok(Rule {
        event,
        state: c_int(state),
        action: Action::Inject(Inject {
            iotypes,
            errno: errno as i32,
            offset,
            once,
            immediately,
        }),
    })
}

fn qmp_inject_rule(r: &BlkdebugInjectError) -> Result<Rule, BlockError> {
    inject_rule(
        r.event.parse()?,
        r.state.unwrap_or(0),
        r.iotype.as_deref(),
        r.errno,
        r.sector,
        r.once.unwrap_or(false),
        r.immediately.unwrap_or(false),
    )
}

fn qmp_set_state_rule(r: &BlkdebugSetState) -> Result<Rule, BlockError> {
    Ok(Rule {
        event: r.event.parse()?,
        state: c_int(r.state.unwrap_or(0)),
        action: Action::SetState(c_int(r.new_state)),
    })
}

/// Builds the rules from the config file's contents (if any) and the
/// options, in QEMU's order: inject-error rules (file, then options), then
/// set-state rules (file, then options).
fn build_rules(config: Option<&[u8]>, o: &BlkdebugOptions) -> Result<Vec<Rule>, BlockError> {
    let sections = match config {
        Some(text) => config::parse(text)?,
        None => Vec::new(),
    };
    let mut rules = Vec::new();
    for s in sections
        .iter()
        .filter(|s| s.group == config::Group::InjectError)
    {
        rules.push(s.inject_rule()?);
    }
    for r in o.inject_error.iter().flatten() {
        rules.push(qmp_inject_rule(r)?);
    }
    for s in sections
        .iter()
        .filter(|s| s.group == config::Group::SetState)
    {
        rules.push(s.set_state_rule()?);
    }
    for r in o.set_state.iter().flatten() {
        rules.push(qmp_set_state_rule(r)?);
    }
    Ok(rules)
}

fn config_open_error(e: io::Error) -> BlockError {
    BlockError::io("Could not read blkdebug config file", e)
}

fn config_read_error(e: io::Error) -> BlockError {
    BlockError::io("Cannot read config file", e)
}

/// Reads the config file (blocking; for the static checks).
#[cfg(test)]
fn read_config_sync(path: &str) -> Result<Vec<u8>, BlockError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(config_open_error)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(config_read_error)?;
    Ok(buf)
}

/// Reads the config file.
async fn read_config(path: &str) -> Result<Vec<u8>, BlockError> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(config_open_error)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).await.map_err(config_read_error)?;
    Ok(buf)
}

mod config;

// ---------------------------------------------------------------------------
// The driver.

/// Checks the options that need no child: limits (QEMU's messages, against
/// `align` alone), the config file and the rules.
pub fn check(o: &BlkdebugOptions) -> Result<(), BlockError> {
    // Static checks only: the config file is read (off the event loop) at
    // open, so a file that blocks (a FIFO) delays only this command.
    let limits = Limits::from_options(o)?;
    build_rules(None, o)?;
    limits.check(1)
}

/// Opens a `blkdebug` node over its `image` child.
pub async fn open(o: BlkdebugOptions, ctx: &mut OpenCtx<'_>) -> Result<BlkdebugDriver, BlockError> {
    let limits = Limits::from_options(&o)?;
    let config = match o.config.as_deref() {
        Some(path) => Some(read_config(path).await?),
        None => None,
    };
    let rules = build_rules(config.as_deref(), &o)?;
    let plain = o.align.is_none()
        && o.max_transfer.is_none()
        && o.opt_write_zero.is_none()
        && o.max_write_zero.is_none()
        && o.opt_discard.is_none()
        && o.max_discard.is_none()
        && o.inject_error.as_ref().is_none_or(Vec::is_empty)
        && o.set_state.as_ref().is_none_or(Vec::is_empty);
    let image = ctx
        .open_child("image", o.image, ChildRole::FILTERED | ChildRole::PRIMARY)
        .await?;
    let child_align = u64::from(image.node().driver().limits().request_alignment);
    limits.check(child_align)?;
    let driver = BlkdebugDriver {
        image,
        limits,
        config: o.config,
        plain,
        rules: Mutex::new(Rules::new(rules)),
        implicit_events: AtomicBool::new(true),
        write_gen: AtomicU64::new(0),
        flushed_gen: AtomicU64::new(0),
    };
    driver.debug_event(BlkdebugEvent::None);
    Ok(driver)
}

/// The `blkdebug` filter driver.
#[derive(Debug)]
pub struct BlkdebugDriver {
    image: ChildRef,
    limits: Limits,
    config: Option<String>,
    /// Opened with only `image` and `config`: the node has a
    /// `blkdebug:CONFIG:IMAGE` file name.
    plain: bool,
    rules: Mutex<Rules>,
    implicit_events: AtomicBool,
    /// Write-like requests so far (QEMU's `write_gen`).
    write_gen: AtomicU64,
    /// `write_gen` at the last successful flush.
    flushed_gen: AtomicU64,
}

fn min_non_zero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, b) => b,
        (a, 0) => a,
        (a, b) => a.min(b),
    }
}

impl BlkdebugDriver {
    fn lock(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises `event`: `set-state` rules of the event move the state and
    /// its `inject-error` rules become the active ones (see the module
    /// documentation). The hook for formats above the node.
    pub fn debug_event(&self, event: BlkdebugEvent) {
        self.lock().event(event);
    }

    /// The current state (1 after opening).
    pub fn state(&self) -> i64 {
        self.lock().state
    }

    /// Whether the node raises `read_aio`, `write_aio`, `flush_to_os` and
    /// `flush_to_disk` for its own requests (on by default). In QEMU the
    /// node above raises them; a format that raises them itself through
    /// [`Self::debug_event`] turns this off.
    pub fn set_implicit_events(&self, on: bool) {
        self.implicit_events.store(on, Ordering::Relaxed);
    }

    fn implicit_event(&self, event: BlkdebugEvent) {
        if self.implicit_events.load(Ordering::Relaxed) {
            self.debug_event(event);
        }
    }

    fn rule_check_now(&self, offset: u64, bytes: u64, iotype: BlkdebugIoType) -> Option<Failure> {
        self.lock().check(offset, bytes, iotype)
    }

    /// Fails the request if an active rule says so (the lock is released
    /// before yielding).
    async fn rule_check(&self, offset: u64, bytes: u64, iotype: BlkdebugIoType) -> io::Result<()> {
        match self.rule_check_now(offset, bytes, iotype) {
            None => Ok(()),
            Some(f) => {
                if !f.immediately {
                    tokio::task::yield_now().await;
                }
                Err(io::Error::from_raw_os_error(f.errno))
            }
        }
    }

    fn request_alignment(&self) -> u64 {
        self.limits.align.max(1)
    }

    fn wrote(&self) {
        self.write_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Write-zeroes as QEMU's block layer splits it for this node: pieces
    /// shorter than the write-zeroes alignment fall back to writing zeroes.
    async fn write_zeroes_split(
        &self,
        mut offset: u64,
        mut bytes: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let child = self.image.node();
        let align = self.request_alignment().max(self.limits.opt_write_zero);
        let max_zeroes = min_non_zero(self.limits.max_write_zero, INT_MAX);
        let max_zeroes = max_zeroes - max_zeroes % align;
        let max_transfer = min_non_zero(self.limits.max_transfer, MAX_BOUNCE_BUFFER);
        let tail = (offset + bytes) % align;
        while bytes > 0 {
            let head = offset % align;
            let mut num = bytes;
            if head != 0 {
                num = bytes.min(max_transfer).min(align - head);
            } else if tail != 0 && num > align {
                num -= tail;
            }
            num = num.min(max_zeroes);
            if num >= align {
                self.rule_check(offset, num, BlkdebugIoType::WriteZeroes)
                    .await?;
                child.write_zeroes(offset, num, flags).await?;
            } else {
                // blkdebug refuses short write-zeroes (ENOTSUP), so the
                // block layer writes a buffer of zeroes instead.
                if flags.no_fallback {
                    return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
                }
                let wflags = ReqFlags {
                    fua: flags.fua,
                    ..ReqFlags::default()
                };
                let zeroes = Bytes::from(vec![0u8; num.min(max_transfer) as usize]);
                let mut done = 0;
                while done < num {
                    let n = (num - done).min(max_transfer);
                    self.rule_check(offset + done, n, BlkdebugIoType::Write)
                        .await?;
                    child
                        .write(offset + done, zeroes.slice(..n as usize), wflags)
                        .await?;
                    done += n;
                }
            }
            offset += num;
            bytes -= num;
        }
        Ok(())
    }

    /// Discards in pieces of at most `max-discard`; ENOTSUP is not an error.
    async fn discard_split(&self, mut offset: u64, mut bytes: u64) -> io::Result<()> {
        let child = self.image.node();
        let align = self.request_alignment().max(self.limits.opt_discard);
        let max = min_non_zero(self.limits.max_discard, i64::MAX as u64);
        let max = (max - max % align).max(align);
        while bytes > 0 {
            let num = bytes.min(max);
            let r = match self.rule_check(offset, num, BlkdebugIoType::Discard).await {
                Ok(()) => child.discard(offset, num).await,
                Err(e) => Err(e),
            };
            match r {
                Err(e) if e.raw_os_error() != Some(libc::ENOTSUP) => return Err(e),
                _ => {}
            }
            offset += num;
            bytes -= num;
        }
        Ok(())
    }
}

impl BlockDriver for BlkdebugDriver {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn limits(&self) -> IoLimits {
        let discard = self.limits.opt_discard;
        IoLimits {
            request_alignment: self.request_alignment() as u32,
            max_transfer: self.limits.max_transfer as u32,
            pwrite_zeroes_alignment: self.limits.opt_write_zero as u32,
            pdiscard_alignment: if discard.is_power_of_two() {
                discard as u32
            } else {
                0
            },
        }
    }

    fn length(&self) -> u64 {
        self.image.node().length()
    }

    fn filename(&self) -> Option<String> {
        if !self.plain {
            return None;
        }
        let child = self.image.node().filename();
        if child.is_empty() || child.starts_with("json:") {
            return None;
        }
        Some(format!(
            "blkdebug:{}:{child}",
            self.config.as_deref().unwrap_or("")
        ))
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            self.implicit_event(BlkdebugEvent::ReadAio);
            self.rule_check(offset, len as u64, BlkdebugIoType::Read)
                .await?;
            self.image.node().read(offset, len).await
        })
    }

    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.implicit_event(BlkdebugEvent::WriteAio);
            self.debug_event(BlkdebugEvent::Pwritev);
            let r = match self
                .rule_check(offset, data.len() as u64, BlkdebugIoType::Write)
                .await
            {
                Ok(()) => self.image.node().write(offset, data, flags).await,
                Err(e) => Err(e),
            };
            self.debug_event(BlkdebugEvent::PwritevDone);
            self.wrote();
            r
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.implicit_event(BlkdebugEvent::WriteAio);
            self.debug_event(BlkdebugEvent::PwritevZero);
            let r = self.write_zeroes_split(offset, len, flags).await;
            self.debug_event(BlkdebugEvent::PwritevDone);
            self.wrote();
            r
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = self.discard_split(offset, len).await;
            self.wrote();
            r
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let current = self.write_gen.load(Ordering::Acquire);
            self.implicit_event(BlkdebugEvent::FlushToOs);
            if self.flushed_gen.load(Ordering::Acquire) == current {
                // Nothing written since the last flush: only the child.
                return self.image.node().flush().await;
            }
            self.implicit_event(BlkdebugEvent::FlushToDisk);
            self.rule_check(0, 0, BlkdebugIoType::Flush).await?;
            self.image.node().flush().await?;
            self.flushed_gen.fetch_max(current, Ordering::AcqRel);
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let a = self.request_alignment();
            let start = offset - offset % a;
            let end = (offset + len).div_ceil(a) * a;
            self.rule_check(start, end - start, BlkdebugIoType::BlockStatus)
                .await?;
            let mut st = self.image.node().block_status(offset, len).await?;
            st.len = st.len.clamp(1, len);
            Ok(st)
        })
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = self.image.node().truncate(len).await;
            self.wrote();
            r
        })
    }
}

/// The rules a node would have, for the checks in tests.
/// [`check`] plus the config file, read synchronously: what `open` checks
/// before it opens the child (tests only).
#[cfg(test)]
fn check_with_config(o: &BlkdebugOptions) -> Result<(), BlockError> {
    let limits = Limits::from_options(o)?;
    let config = o.config.as_deref().map(read_config_sync).transpose()?;
    build_rules(config.as_deref(), o)?;
    limits.check(1)
}

#[cfg(test)]
fn rules_of(o: &BlkdebugOptions) -> Result<Vec<Rule>, BlockError> {
    let config = o.config.as_deref().map(read_config_sync).transpose()?;
    build_rules(config.as_deref(), o)
}

#[cfg(test)]
mod tests;

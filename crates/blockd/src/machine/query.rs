//! `query-block` and `query-blockstats` (QEMU's `block/qapi.c`).
//!
//! A backend's entry carries its own accounting (what front ends issued
//! through it); the node entries below it (`parent`: the node that holds
//! the data, e.g. the protocol node under a format; `backing`: the backing
//! or filtered node) carry the nodes' own request counters. QEMU reports
//! zeroes for nodes except `wr_highest_offset`; blockd reports what each
//! node actually did, with `account_invalid`/`account_failed` false as QEMU.
//!
//! Replies are written straight to JSON text from typed structures (fast
//! with thousands of entries). [`block_info`] builds a `query-block` entry
//! as a JSON value with the shared `block_device_info` builder: the
//! reference that [`super::fast`] is tested against.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockd_core::accounting::{AcctSnapshot, TimedLatency, TimedSnapshot, TypeCounters};
use blockd_core::{BlockBackend, BlockNode, ChildRole};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::qmp::block_device_info;

/// `BlockInfo` of a backend, built as a JSON value.
pub fn block_info(blk: &BlockBackend) -> Value {
    let mut m = Map::new();
    m.insert("device".into(), blk.name().into());
    let qdev = blk.attached_dev_id();
    if !qdev.is_empty() {
        m.insert("qdev".into(), qdev.into());
    }
    m.insert("type".into(), "unknown".into());
    m.insert("removable".into(), blk.has_removable_media().into());
    m.insert("locked".into(), blk.is_medium_locked().into());
    if let Some(root) = blk.root() {
        let mut info = block_device_info(&root, false);
        if let Some(Value::Object(c)) = info.get_mut("cache") {
            c.insert("writeback".into(), blk.write_cache().into());
        }
        if let Some((avg, l)) = crate::machine::fast::limits(blk) {
            let names = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"];
            if let (Value::Object(m), Ok(Value::Object(extra))) =
                (&mut info, serde_json::to_value(l))
            {
                for (k, v) in names.iter().zip(avg) {
                    m.insert((*k).into(), v.into());
                }
                m.extend(extra);
            }
        }
        m.insert("inserted".into(), info);
    }
    if blk.has_tray() {
        m.insert("tray_open".into(), blk.is_tray_open().into());
    }
    if blk.iostatus_is_enabled() {
        m.insert("io-status".into(), blk.iostatus().as_str().into());
    }
    Value::Object(m)
}

/// `BlockDeviceTimedStats`.
#[derive(Serialize)]
struct TimedStats {
    interval_length: u32,
    min_rd_latency_ns: u64,
    max_rd_latency_ns: u64,
    avg_rd_latency_ns: u64,
    min_wr_latency_ns: u64,
    max_wr_latency_ns: u64,
    avg_wr_latency_ns: u64,
    min_zone_append_latency_ns: u64,
    max_zone_append_latency_ns: u64,
    avg_zone_append_latency_ns: u64,
    min_flush_latency_ns: u64,
    max_flush_latency_ns: u64,
    avg_flush_latency_ns: u64,
    avg_rd_queue_depth: f64,
    avg_wr_queue_depth: f64,
    avg_zone_append_queue_depth: f64,
}

impl From<&TimedSnapshot> for TimedStats {
    fn from(t: &TimedSnapshot) -> Self {
        let l = |x: &TimedLatency| (x.min_ns, x.max_ns, x.avg_ns);
        let (min_rd, max_rd, avg_rd) = l(&t.read);
        let (min_wr, max_wr, avg_wr) = l(&t.write);
        let (min_za, max_za, avg_za) = l(&t.zone_append);
        let (min_fl, max_fl, avg_fl) = l(&t.flush);
        TimedStats {
            interval_length: t.interval_length,
            min_rd_latency_ns: min_rd,
            max_rd_latency_ns: max_rd,
            avg_rd_latency_ns: avg_rd,
            min_wr_latency_ns: min_wr,
            max_wr_latency_ns: max_wr,
            avg_wr_latency_ns: avg_wr,
            min_zone_append_latency_ns: min_za,
            max_zone_append_latency_ns: max_za,
            avg_zone_append_latency_ns: avg_za,
            min_flush_latency_ns: min_fl,
            max_flush_latency_ns: max_fl,
            avg_flush_latency_ns: avg_fl,
            avg_rd_queue_depth: t.read.avg_queue_depth,
            avg_wr_queue_depth: t.write.avg_queue_depth,
            avg_zone_append_queue_depth: t.zone_append.avg_queue_depth,
        }
    }
}

/// `BlockDeviceStats`, members in QEMU's order.
#[derive(Serialize)]
struct DeviceStats {
    rd_bytes: u64,
    wr_bytes: u64,
    zone_append_bytes: u64,
    unmap_bytes: u64,
    rd_operations: u64,
    wr_operations: u64,
    zone_append_operations: u64,
    flush_operations: u64,
    unmap_operations: u64,
    rd_total_time_ns: u64,
    wr_total_time_ns: u64,
    zone_append_total_time_ns: u64,
    flush_total_time_ns: u64,
    unmap_total_time_ns: u64,
    wr_highest_offset: u64,
    rd_merged: u64,
    wr_merged: u64,
    zone_append_merged: u64,
    unmap_merged: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_time_ns: Option<u64>,
    failed_rd_operations: u64,
    failed_wr_operations: u64,
    failed_zone_append_operations: u64,
    failed_flush_operations: u64,
    failed_unmap_operations: u64,
    invalid_rd_operations: u64,
    invalid_wr_operations: u64,
    invalid_zone_append_operations: u64,
    invalid_flush_operations: u64,
    invalid_unmap_operations: u64,
    account_invalid: bool,
    account_failed: bool,
    timed_stats: Vec<TimedStats>,
}

fn device_stats(s: &AcctSnapshot, wr_highest_offset: u64) -> DeviceStats {
    let (r, w, z, f, u) = (&s.read, &s.write, &s.zone_append, &s.flush, &s.unmap);
    DeviceStats {
        rd_bytes: r.bytes,
        wr_bytes: w.bytes,
        zone_append_bytes: z.bytes,
        unmap_bytes: u.bytes,
        rd_operations: r.ops,
        wr_operations: w.ops,
        zone_append_operations: z.ops,
        flush_operations: f.ops,
        unmap_operations: u.ops,
        rd_total_time_ns: r.total_time_ns,
        wr_total_time_ns: w.total_time_ns,
        zone_append_total_time_ns: z.total_time_ns,
        flush_total_time_ns: f.total_time_ns,
        unmap_total_time_ns: u.total_time_ns,
        wr_highest_offset,
        rd_merged: r.merged,
        wr_merged: w.merged,
        zone_append_merged: z.merged,
        unmap_merged: u.merged,
        idle_time_ns: s.idle_time_ns,
        failed_rd_operations: r.failed,
        failed_wr_operations: w.failed,
        failed_zone_append_operations: z.failed,
        failed_flush_operations: f.failed,
        failed_unmap_operations: u.failed,
        invalid_rd_operations: r.invalid,
        invalid_wr_operations: w.invalid,
        invalid_zone_append_operations: z.invalid,
        invalid_flush_operations: f.invalid,
        invalid_unmap_operations: u.invalid,
        account_invalid: s.account_invalid,
        account_failed: s.account_failed,
        timed_stats: s.timed.iter().map(TimedStats::from).collect(),
    }
}

/// `BlockStatsSpecificFile` with its `driver` tag.
#[derive(Serialize)]
struct FileStats {
    driver: &'static str,
    #[serde(rename = "discard-nb-ok")]
    discard_nb_ok: u64,
    #[serde(rename = "discard-nb-failed")]
    discard_nb_failed: u64,
    #[serde(rename = "discard-bytes-ok")]
    discard_bytes_ok: u64,
}

/// `BlockStats`.
#[derive(Serialize)]
struct BlockStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qdev: Option<String>,
    #[serde(rename = "node-name", skip_serializing_if = "Option::is_none")]
    node_name: Option<String>,
    stats: DeviceStats,
    #[serde(rename = "driver-specific", skip_serializing_if = "Option::is_none")]
    driver_specific: Option<FileStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<Box<BlockStats>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing: Option<Box<BlockStats>>,
}

/// A node's own counters as an accounting snapshot.
fn node_snapshot(n: &BlockNode) -> AcctSnapshot {
    let s = &n.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    AcctSnapshot {
        read: TypeCounters {
            bytes: get(&s.rd_bytes),
            ops: get(&s.rd_operations),
            failed: get(&s.failed_rd_operations),
            ..TypeCounters::default()
        },
        write: TypeCounters {
            bytes: get(&s.wr_bytes),
            ops: get(&s.wr_operations),
            failed: get(&s.failed_wr_operations),
            ..TypeCounters::default()
        },
        flush: TypeCounters {
            ops: get(&s.flush_operations),
            failed: get(&s.failed_flush_operations),
            ..TypeCounters::default()
        },
        unmap: TypeCounters {
            bytes: get(&s.unmap_bytes),
            ops: get(&s.unmap_operations),
            failed: get(&s.failed_unmap_operations),
            ..TypeCounters::default()
        },
        account_invalid: false,
        account_failed: false,
        ..AcctSnapshot::default()
    }
}

/// The child whose statistics go under `parent`: the primary child if it
/// holds data, else the only data child.
fn data_child(n: &BlockNode) -> Option<Arc<BlockNode>> {
    let children = n.children();
    let holds_data = |r: ChildRole| r.has(ChildRole::DATA) || r.has(ChildRole::FILTERED);
    if let Some(c) = children
        .iter()
        .find(|c| c.role().has(ChildRole::PRIMARY) && holds_data(c.role()))
    {
        return Some(c.node());
    }
    let mut data = children.iter().filter(|c| holds_data(c.role()));
    match (data.next(), data.next()) {
        (Some(c), None) => Some(c.node()),
        _ => None,
    }
}

/// The backing or filtered child.
fn filter_or_cow_child(n: &BlockNode) -> Option<Arc<BlockNode>> {
    let children = n.children();
    if let Some(c) = children.iter().find(|c| c.role().has(ChildRole::COW)) {
        return Some(c.node());
    }
    if n.driver().is_filter() {
        return children.first().map(|c| c.node());
    }
    None
}

/// QEMU's `bdrv_query_bds_stats`: a node's `BlockStats` with `parent` and,
/// at backend level, `backing`.
fn node_stats(n: &BlockNode, blk_level: bool) -> BlockStats {
    let hwo = n.stats.wr_highest_offset.load(Ordering::Relaxed);
    let driver_specific = match n.driver().format_name() {
        d @ ("file" | "host_device") => {
            let s = &n.stats;
            Some(FileStats {
                driver: d,
                discard_nb_ok: s.unmap_operations.load(Ordering::Relaxed),
                discard_nb_failed: s.failed_unmap_operations.load(Ordering::Relaxed),
                discard_bytes_ok: s.unmap_bytes.load(Ordering::Relaxed),
            })
        }
        _ => None,
    };
    BlockStats {
        device: None,
        qdev: None,
        node_name: Some(n.name().to_string()),
        stats: device_stats(&node_snapshot(n), hwo),
        driver_specific,
        parent: data_child(n).map(|p| Box::new(node_stats(&p, blk_level))),
        backing: if blk_level {
            filter_or_cow_child(n).map(|b| Box::new(node_stats(&b, blk_level)))
        } else {
            None
        },
    }
}

/// `BlockStats` of a backend.
fn backend_stats(blk: &BlockBackend) -> BlockStats {
    let snap = blk.stats().snapshot();
    let qdev = blk.attached_dev_id();
    let mut s = match blk.root() {
        Some(root) => {
            let hwo = root.stats.wr_highest_offset.load(Ordering::Relaxed);
            let mut s = node_stats(&root, true);
            s.stats = device_stats(&snap, hwo);
            s
        }
        None => BlockStats {
            device: None,
            qdev: None,
            node_name: None,
            stats: device_stats(&snap, 0),
            driver_specific: None,
            parent: None,
            backing: None,
        },
    };
    s.device = Some(blk.name().to_string());
    s.qdev = (!qdev.is_empty()).then_some(qdev);
    s
}

/// The `query-blockstats` reply for backends, as ASCII JSON text.
pub fn blockstats_backends(backends: &[Arc<BlockBackend>]) -> String {
    let list: Vec<BlockStats> = backends.iter().map(|b| backend_stats(b)).collect();
    blockd_qmp::wire::to_ascii_json_sized(&list, 1800 * list.len() + 16)
}

/// The `query-blockstats` reply with `query-nodes`, as ASCII JSON text.
pub fn blockstats_nodes(nodes: &[Arc<BlockNode>]) -> String {
    let list: Vec<BlockStats> = nodes.iter().map(|n| node_stats(n, false)).collect();
    blockd_qmp::wire::to_ascii_json_sized(&list, 1200 * list.len() + 16)
}

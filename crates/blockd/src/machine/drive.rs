//! Opening media by file name, and `--drive` (QEMU's `drive_new`,
//! `blockdev_init` and the probing part of `bdrv_open`).
//!
//! A medium is opened in two steps, as QEMU does: the protocol node first
//! (`file`), then — after reading its first sector to guess the format if
//! none was given — the format node on top of it; that is the drivers'
//! implicit open path ([`blockd_drivers::implicit`]), which backing files
//! take too. This module builds the options of both nodes and types them
//! against the schema. Both are implicit nodes (generated names unless
//! `node-name` is given, not owned by the monitor), so they leave the
//! graph with the backend that uses them. A raw format that was guessed
//! protects the first sector against writes that would make the image
//! look like another format (the backend's guard), and a warning is
//! printed, as QEMU does.

use std::sync::{Arc, OnceLock};

use blockd_core::backend::{OnError, RootState};
use blockd_core::{BlockError, BlockGraph, BlockNode, DetectZeroes, Perm, PermPair};
use blockd_drivers::filename::{self, NameSpec};
use blockd_drivers::options::BlockdevOptions;
use blockd_drivers::{Env, ImageRequest};
use blockd_optval::qemu_opts;
use blockd_qmp::schema::{Schema, TypeDef};
use serde_json::{json, Map, Value};

use super::{BackendEntry, Legacy, Machine};

/// The compiled-in schema, for checking the options of implicit nodes.
pub fn schema() -> &'static Schema {
    static S: OnceLock<Arc<Schema>> = OnceLock::new();
    S.get_or_init(crate::schema::load)
}

/// What to open as a medium.
#[derive(Debug, Clone, Default)]
pub struct MediumSpec {
    /// The image file.
    pub filename: String,
    /// The format; probed if `None`.
    pub format: Option<String>,
    /// The format node's name (generated if `None`).
    pub node_name: Option<String>,
    /// Open read-only.
    pub read_only: bool,
    /// Fall back to read-only if the file cannot be opened read-write.
    pub auto_read_only: bool,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`.
    pub cache_no_flush: bool,
    /// `discard=unmap`.
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `force-share`.
    pub force_share: bool,
    /// Further options of the protocol node (`file.*`), as strings or JSON.
    pub file_opts: Map<String, Value>,
    /// Further options of the format node.
    pub format_opts: Map<String, Value>,
    /// Options come from a command line (strings to be typed by the schema).
    pub keyval: bool,
}

impl MediumSpec {
    /// The spec for a medium opened with a backend's remembered options.
    pub fn from_root_state(filename: &str, format: Option<&str>, rs: &RootState) -> Self {
        MediumSpec {
            filename: filename.to_string(),
            format: format.map(str::to_string),
            read_only: rs.read_only,
            cache_direct: rs.cache_direct,
            cache_no_flush: rs.cache_no_flush,
            discard_unmap: rs.discard_unmap,
            detect_zeroes: rs.detect_zeroes,
            ..MediumSpec::default()
        }
    }
}

/// Whether `name` is a driver blockd has.
fn known_driver(name: &str) -> bool {
    match schema().type_def("BlockdevDriver") {
        Some(TypeDef::Enum(e)) => e.values.iter().any(|v| v == name),
        _ => false,
    }
}

fn unknown_driver(name: &str) -> BlockError {
    BlockError::invalid(format!("Unknown driver: '{name}'"))
}

/// Checks options against the schema and types them.
fn typed(mut v: Value, keyval: bool, format: &str) -> Result<BlockdevOptions, BlockError> {
    // The Ceph settings of an `rbd:` name are not in the schema (QEMU's
    // internal `=keyvalue-pairs`): the driver takes them, unchecked.
    let pairs = v
        .as_object_mut()
        .and_then(|m| m.remove(blockd_drivers::filename_rbd::KEYVALUE_PAIRS));
    let s = schema();
    let checked = if keyval {
        s.check_value_keyval("BlockdevOptions", &v)
    } else {
        s.check_value("BlockdevOptions", &v)
    };
    let v = checked.map_err(|e| {
        let msg = match e.desc.strip_prefix("Parameter '") {
            Some(rest) if rest.ends_with("' is unexpected") => {
                let opt = &rest[..rest.len() - "' is unexpected".len()];
                format!("Block format '{format}' does not support the option '{opt}'")
            }
            _ => e.desc,
        };
        BlockError::invalid(msg)
    })?;
    let mut v = v;
    if let (Some(p), Some(m)) = (pairs, v.as_object_mut()) {
        m.insert(blockd_drivers::filename_rbd::KEYVALUE_PAIRS.into(), p);
    }
    serde_json::from_value(v).map_err(|e| BlockError::invalid(format!("internal error: {e}")))
}

fn common(spec: &MediumSpec, read_only: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("read-only".into(), read_only.into());
    m.insert(
        "cache".into(),
        json!({"direct": spec.cache_direct, "no-flush": spec.cache_no_flush}),
    );
    m.insert(
        "discard".into(),
        if spec.discard_unmap {
            "unmap"
        } else {
            "ignore"
        }
        .into(),
    );
    if spec.force_share {
        m.insert("force-share".into(), true.into());
    }
    m
}

/// Opens a medium named by `json:` options with a driver: the whole node
/// (its children opened from the options), with the medium's options
/// over the JSON's (QEMU joins the JSON's under the explicit ones).
async fn open_named_node(
    graph: &BlockGraph,
    env: &Env,
    spec: &MediumSpec,
    opts: Map<String, Value>,
) -> Result<(Arc<BlockNode>, bool), BlockError> {
    let driver = opts
        .get("driver")
        .and_then(Value::as_str)
        .unwrap_or("raw")
        .to_string();
    let mut top = common(spec, spec.read_only);
    top.insert("auto-read-only".into(), spec.auto_read_only.into());
    format_node_options(&mut top, spec);
    for (k, v) in opts {
        top.entry(k).or_insert(v);
    }
    let node = typed(Value::Object(top), spec.keyval, &driver)?;
    Ok((
        blockd_drivers::open_implicit(graph, env, node).await?,
        false,
    ))
}

/// Opens a medium: protocol node, probing, format node (the drivers'
/// implicit open path, [`blockd_drivers::open_image`]). Returns the node
/// and whether its raw format was guessed.
pub async fn open_medium(
    graph: &BlockGraph,
    env: &Env,
    spec: &MediumSpec,
) -> Result<(Arc<BlockNode>, bool), BlockError> {
    let fmt_name = spec.format.clone().unwrap_or_else(|| "raw".into());
    // QEMU looks the driver up before opening anything. (qcow2 is checked
    // after its signature, so that a build without the driver still says
    // what QEMU says about a file that is not qcow2.)
    if let Some(f) = &spec.format {
        if !known_driver(f) && f != "qcow2" {
            return Err(unknown_driver(f));
        }
    }
    // A name that is more than a file name (QEMU's bdrv_fill_options):
    // `json:` options, or a protocol's name (an NBD URI).
    let named = if filename::is_plain_file(&spec.filename) {
        None
    } else {
        Some(filename::resolve(&spec.filename, spec.format.as_deref())?)
    };
    let (protocol_opts, format) = match named {
        None => (None, spec.format.clone()),
        Some(NameSpec::Layered { protocol, format }) => (Some(protocol), format),
        Some(NameSpec::Node(opts)) => return open_named_node(graph, env, spec, opts).await,
    };
    let mut proto = common(spec, spec.read_only);
    match protocol_opts {
        None => {
            proto.insert("driver".into(), "file".into());
            proto.insert("filename".into(), spec.filename.clone().into());
        }
        Some(p) => proto.extend(p),
    }
    proto.insert("auto-read-only".into(), spec.auto_read_only.into());
    for (k, v) in &spec.file_opts {
        proto.insert(k.clone(), v.clone());
    }
    let protocol_only = spec.format.as_deref() == Some("file") && spec.format_opts.is_empty();
    if protocol_only {
        if let Some(n) = &spec.node_name {
            proto.insert("node-name".into(), n.clone().into());
        }
        if spec.detect_zeroes != DetectZeroes::Off {
            proto.insert("detect-zeroes".into(), spec.detect_zeroes.as_str().into());
        }
    }
    let protocol = typed(Value::Object(proto), spec.keyval, "file")?;
    if protocol_only {
        return Ok((
            blockd_drivers::open_implicit(graph, env, protocol).await?,
            false,
        ));
    }
    let request = ImageRequest { protocol, format };
    let image = blockd_drivers::open_image(graph, env, request, |format, file| {
        if !known_driver(format) {
            return Err(unknown_driver(format));
        }
        let mut top = common(spec, file.read_only());
        top.insert("driver".into(), format.into());
        top.insert("file".into(), file.name().into());
        format_node_options(&mut top, spec);
        typed(Value::Object(top), spec.keyval, &fmt_name)
    })
    .await?;
    Ok((image.node, image.probed_raw))
}

/// The medium's own options on its format node: its node name, its
/// `detect-zeroes`, and the format options given with it.
fn format_node_options(top: &mut Map<String, Value>, spec: &MediumSpec) {
    if let Some(n) = &spec.node_name {
        top.insert("node-name".into(), n.clone().into());
    }
    if spec.detect_zeroes != DetectZeroes::Off {
        top.insert("detect-zeroes".into(), spec.detect_zeroes.as_str().into());
    }
    for (k, v) in &spec.format_opts {
        top.insert(k.clone(), v.clone());
    }
}

/// Puts `a.b.c = v` into nested objects.
fn nest(m: &mut Map<String, Value>, key: &str, v: Value) {
    match key.split_once('.') {
        None => {
            m.insert(key.to_string(), v);
        }
        Some((head, rest)) => {
            let e = m
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !e.is_object() {
                *e = Value::Object(Map::new());
            }
            if let Value::Object(inner) = e {
                nest(inner, rest, v);
            }
        }
    }
}

/// A `--drive` without `file=`: the driver and its options say what to
/// open (`driver=null-co,size=1M`, `driver=blkdebug,image.filename=...`).
async fn open_without_file(
    graph: &BlockGraph,
    env: &Env,
    spec: &MediumSpec,
) -> Result<(Arc<BlockNode>, bool), BlockError> {
    let Some(driver) = &spec.format else {
        return Err(BlockError::invalid("Must specify either driver or file"));
    };
    if !known_driver(driver) {
        return Err(unknown_driver(driver));
    }
    let mut top = common(spec, spec.read_only);
    top.insert("driver".into(), driver.clone().into());
    if let Some(n) = &spec.node_name {
        top.insert("node-name".into(), n.clone().into());
    }
    if spec.detect_zeroes != DetectZeroes::Off {
        top.insert("detect-zeroes".into(), spec.detect_zeroes.as_str().into());
    }
    for (k, v) in &spec.format_opts {
        nest(&mut top, k, v.clone());
    }
    for (k, v) in &spec.file_opts {
        nest(&mut top, &format!("file.{k}"), v.clone());
    }
    let top = crate::keyval::listify_root(top).map_err(BlockError::invalid)?;
    let opts = typed(Value::Object(top), spec.keyval, driver)?;
    Ok((
        blockd_drivers::open_implicit(graph, env, opts).await?,
        false,
    ))
}

/// A parsed `--drive`.
#[derive(Debug, Clone)]
pub struct DriveSpec {
    /// The backend name (generated if absent).
    pub id: Option<String>,
    /// The interface (`none` only).
    pub iface: String,
    /// `index=`.
    pub index: Option<u32>,
    /// `bus=`.
    pub bus: Option<u32>,
    /// `unit=`.
    pub unit: Option<u32>,
    /// `media=cdrom`.
    pub media_cd: bool,
    /// The image, if any.
    pub file: Option<String>,
    /// `snapshot=on`.
    pub snapshot: bool,
    /// The write cache (`cache.writeback`, or from `cache=`).
    pub writeback: bool,
    /// `rerror=`.
    pub rerror: OnError,
    /// `werror=`.
    pub werror: OnError,
    /// `stats-account-invalid`/`-failed` (`None`: default).
    pub account: (Option<bool>, Option<bool>),
    /// `stats-intervals.N`.
    pub intervals: Vec<u32>,
    /// The medium options.
    pub medium: MediumSpec,
    /// Whether any block option besides `file` was given (an empty drive
    /// has none).
    pub has_block_opts: bool,
    /// `throttling.*` (or the legacy `bps=`, `iops=`, `group=`, ...).
    pub limits: super::io_limits::DriveLimits,
}

fn bool_opt(key: &str, v: &str) -> Result<bool, String> {
    qemu_opts::parse_bool(key, v)
}

/// `bus`, `unit` and `index`: QemuOpts numbers, which `drive_new` keeps in
/// a C `int` (so only the low 32 bits count).
fn num_opt(key: &str, v: &str) -> Result<u32, String> {
    Ok(qemu_opts::parse_number(key, v)? as u32)
}

/// `unit` and `index`: -1 is QEMU's "not given".
fn given(n: u32) -> Option<u32> {
    (n != u32::MAX).then_some(n)
}

fn on_error(v: &str, is_read: bool) -> Result<OnError, String> {
    match OnError::parse(v) {
        Some(OnError::Enospc) if is_read => Err(format!("'{v}' invalid read error action")),
        Some(a) if a != OnError::Auto => Ok(a),
        _ => Err(format!(
            "'{v}' invalid {} error action",
            if is_read { "read" } else { "write" }
        )),
    }
}

/// Parses a `--drive` option string with QEMU's rules and messages.
pub fn parse(s: &str) -> Result<DriveSpec, String> {
    let mut opts = crate::cli::split_qemu_opts(s, None)?;
    super::io_limits::rename_legacy(&mut opts)?;
    if opts.iter().any(|(k, _)| k == "readonly") {
        if opts.iter().any(|(k, _)| k == "read-only") {
            return Err(
                "'read-only' and its alias 'readonly' can't be used at the same time".into(),
            );
        }
        for (k, _) in opts.iter_mut().filter(|(k, _)| k == "readonly") {
            *k = "read-only".into();
        }
    }
    let mut d = DriveSpec {
        id: None,
        iface: "none".into(),
        index: None,
        bus: None,
        unit: None,
        media_cd: false,
        file: None,
        snapshot: false,
        writeback: true,
        rerror: OnError::Report,
        werror: OnError::Enospc,
        account: (None, None),
        intervals: Vec::new(),
        medium: MediumSpec::default(),
        has_block_opts: false,
        limits: Default::default(),
    };
    let mut cache: Option<(bool, bool, bool)> = None;
    let (mut wb, mut direct, mut no_flush) = (None, None, None);
    let mut read_only = false;
    let mut format = None;
    let mut driver = None;
    for (k, v) in opts {
        if d.limits.take(&k, &v)? {
            continue;
        }
        match k.as_str() {
            "id" => {
                if !super::id_wellformed(&v) {
                    return Err("Parameter 'id' expects an identifier".into());
                }
                d.id = Some(v);
            }
            "cache" => {
                cache = Some(match v.as_str() {
                    "writeback" => (true, false, false),
                    "none" | "off" => (true, true, false),
                    "writethrough" => (false, false, false),
                    "directsync" => (false, true, false),
                    "unsafe" => (true, false, true),
                    _ => return Err("invalid cache option".into()),
                })
            }
            "cache.writeback" => wb = Some(bool_opt(&k, &v)?),
            "cache.direct" => direct = Some(bool_opt(&k, &v)?),
            "cache.no-flush" => no_flush = Some(bool_opt(&k, &v)?),
            "media" => match v.as_str() {
                "disk" => d.media_cd = false,
                "cdrom" => d.media_cd = true,
                _ => return Err(format!("'{v}' invalid media")),
            },
            "read-only" => read_only = bool_opt(&k, &v)?,
            "copy-on-read" => {
                if bool_opt(&k, &v)? {
                    return Err("copy-on-read is not supported by blockd".into());
                }
            }
            "if" => d.iface = v,
            "bus" => d.bus = Some(num_opt(&k, &v)?),
            "unit" => d.unit = given(num_opt(&k, &v)?),
            "index" => d.index = given(num_opt(&k, &v)?),
            "file" => d.file = (!v.is_empty()).then_some(v),
            "snapshot" => d.snapshot = bool_opt(&k, &v)?,
            "rerror" => d.rerror = on_error(&v, true)?,
            "werror" => d.werror = on_error(&v, false)?,
            "format" => format = Some(v),
            "driver" => driver = Some(v),
            "aio" => {
                if !["threads", "native", "io_uring"].contains(&v.as_str()) {
                    return Err("invalid aio option".into());
                }
                if v != "io_uring" {
                    d.medium.file_opts.insert("aio".into(), v.into());
                }
            }
            "detect-zeroes" => {
                d.medium.detect_zeroes = match v.as_str() {
                    "off" => DetectZeroes::Off,
                    "on" => DetectZeroes::On,
                    "unmap" => DetectZeroes::Unmap,
                    _ => return Err(format!("invalid parameter value: {v}")),
                }
            }
            "stats-account-invalid" => d.account.0 = Some(bool_opt(&k, &v)?),
            "stats-account-failed" => d.account.1 = Some(bool_opt(&k, &v)?),
            k if k.starts_with("stats-intervals.") => {
                match blockd_optval::parse_uint_full(&v, 10) {
                    Ok(n) if n > 0 && n <= u64::from(u32::MAX) => d.intervals.push(n as u32),
                    _ => return Err(format!("Invalid interval length: {v}")),
                }
            }
            "node-name" => {
                d.medium.node_name = Some(v);
                d.has_block_opts = true;
            }
            "discard" => {
                d.medium.discard_unmap = match v.as_str() {
                    "ignore" | "off" => false,
                    "unmap" | "on" => true,
                    _ => return Err("Invalid discard option".into()),
                };
                d.has_block_opts = true;
            }
            "auto-read-only" => {
                d.medium.auto_read_only = bool_opt(&k, &v)?;
                d.has_block_opts = true;
            }
            "force-share" => {
                d.medium.force_share = bool_opt(&k, &v)?;
                d.has_block_opts = true;
            }
            k if k.starts_with("file.") => {
                d.medium.file_opts.insert(k[5..].to_string(), v.into());
                d.has_block_opts = true;
            }
            _ => {
                d.medium.format_opts.insert(k, v.into());
                d.has_block_opts = true;
            }
        }
    }
    if format.is_some() && driver.is_some() {
        return Err("Cannot specify both 'driver' and 'format'".into());
    }
    let (cwb, cdirect, cnf) = cache.unwrap_or((true, false, false));
    d.writeback = wb.unwrap_or(cwb);
    d.medium.cache_direct = direct.unwrap_or(cdirect);
    d.medium.cache_no_flush = no_flush.unwrap_or(cnf);
    d.medium.read_only = read_only || d.media_cd;
    d.medium.auto_read_only = true;
    d.medium.format = format.or(driver);
    d.medium.keyval = true;
    if d.medium.format.is_some() {
        d.has_block_opts = true;
    }
    if d.iface != "none" {
        const KNOWN: [&str; 9] = [
            "none", "ide", "scsi", "floppy", "pflash", "mtd", "sd", "virtio", "xen",
        ];
        if !KNOWN.contains(&d.iface.as_str()) {
            return Err(format!("unsupported bus type '{}'", d.iface));
        }
        return Err(format!(
            "if={} is not supported: blockd has no board to connect drives to; use if=none and --device",
            d.iface
        ));
    }
    if d.index.is_some() && (d.bus.is_some() || d.unit.is_some()) {
        return Err("index cannot be used with bus and unit".into());
    }
    // extract_common_blockdev_options
    d.limits.config.validate()?;
    if d.snapshot && d.medium.read_only {
        // QEMU opens the image read-only anyway; the overlay takes writes.
    }
    Ok(d)
}

impl Machine {
    /// Creates the backend of a `--drive`.
    pub async fn drive_new(
        &self,
        graph: &BlockGraph,
        env: &Env,
        mut d: DriveSpec,
    ) -> Result<(), String> {
        let (bus, unit) = {
            let g = self.lock();
            let bus = d.bus.unwrap_or(0);
            let used = |u: u32| {
                g.backends.iter().any(|e| {
                    e.legacy
                        .as_ref()
                        .is_some_and(|l| l.iface == d.iface && l.bus == bus && l.unit == u)
                })
            };
            let unit = match d.index.or(d.unit) {
                Some(u) => u,
                None => (0..).find(|&u| !used(u)).unwrap_or(0),
            };
            if used(unit) {
                return Err(format!(
                    "drive with bus={bus}, unit={unit} (index={}) exists",
                    d.index.map(i64::from).unwrap_or(-1)
                ));
            }
            (bus, unit)
        };
        let id = d.id.clone().unwrap_or_else(|| format!("{}{unit}", d.iface));
        {
            let g = self.lock();
            if g.backend_by_name(&id).is_some() {
                return Err(format!("Duplicate ID '{id}' for drive"));
            }
            if graph.contains(&id) {
                return Err(format!(
                    "Device name '{id}' conflicts with an existing node name"
                ));
            }
        }
        let mut perm = Perm::CONSISTENT_READ;
        if !d.medium.read_only {
            perm = perm | Perm::WRITE;
        }
        let shared = Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE;
        let blk = self.new_backend(&id, PermPair { perm, shared });
        let medium = match &d.file {
            None if !d.has_block_opts => {
                blk.set_root_state(RootState {
                    read_only: d.medium.read_only,
                    cache_direct: d.medium.cache_direct,
                    cache_no_flush: d.medium.cache_no_flush,
                    discard_unmap: d.medium.discard_unmap,
                    detect_zeroes: d.medium.detect_zeroes,
                });
                None
            }
            None => Some(
                open_without_file(graph, env, &d.medium)
                    .await
                    .map_err(|e| e.msg)?,
            ),
            Some(f) => {
                d.medium.filename = f.clone();
                let (node, probed) = if d.snapshot {
                    super::snapshot::open_snapshot(graph, env, &d.medium).await
                } else {
                    open_medium(graph, env, &d.medium).await
                }
                .map_err(|e| e.msg)?;
                Some((node, probed))
            }
        };
        if let Some((node, probed)) = medium {
            if node.read_only() {
                // auto-read-only fell back: the backend cannot write either.
                let _ = blk.set_perm(
                    graph,
                    PermPair {
                        perm: Perm::CONSISTENT_READ,
                        shared,
                    },
                );
            }
            if let Err(e) = blk.insert(graph, node.clone()) {
                crate::machine::close_nodes(graph.release(&node)).await;
                return Err(e.msg);
            }
            blk.set_probed_raw(probed);
        }
        if let Some(groups) = &env.throttle_groups {
            // blockdev_init: the drive's own group unless one is named.
            let l = &d.limits;
            super::io_limits::apply(groups, blk.root_handle(), l.config, l.group.as_deref(), &id);
        }
        blk.set_write_cache(d.writeback);
        blk.set_on_error(d.rerror, d.werror);
        blk.stats().setup(d.account.0, d.account.1);
        for i in &d.intervals {
            blk.stats().add_interval(*i);
        }
        let legacy = Legacy {
            iface: d.iface.clone(),
            bus,
            unit,
            media_cd: d.media_cd,
        };
        self.lock().backends.push(BackendEntry {
            blk,
            legacy: Some(legacy),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_options_are_checked_like_qemu() {
        let d = parse("if=none,id=cd,media=cdrom,cache=none,rerror=stop,werror=report").unwrap();
        assert_eq!(d.id.as_deref(), Some("cd"));
        assert!(d.media_cd && d.medium.read_only && d.medium.cache_direct && d.writeback);
        assert_eq!((d.rerror, d.werror), (OnError::Stop, OnError::Report));
        assert!(!d.has_block_opts);
        let d = parse("file=/x,format=raw,readonly=on,cache=writethrough").unwrap();
        assert!(d.medium.read_only && !d.writeback);
        assert_eq!(d.medium.format.as_deref(), Some("raw"));
        assert_eq!(parse("media=tape").unwrap_err(), "'tape' invalid media");
        assert_eq!(parse("cache=fast").unwrap_err(), "invalid cache option");
        assert_eq!(
            parse("rerror=enospc").unwrap_err(),
            "'enospc' invalid read error action"
        );
        assert_eq!(
            parse("werror=x").unwrap_err(),
            "'x' invalid write error action"
        );
        assert_eq!(parse("if=usb").unwrap_err(), "unsupported bus type 'usb'");
        assert!(parse("if=ide").unwrap_err().contains("if=none"));
        assert_eq!(
            parse("readonly=on,read-only=on").unwrap_err(),
            "'read-only' and its alias 'readonly' can't be used at the same time"
        );
        assert_eq!(
            parse("format=raw,driver=raw").unwrap_err(),
            "Cannot specify both 'driver' and 'format'"
        );
        assert_eq!(
            parse("id=1x").unwrap_err(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            parse("index=1,unit=0").unwrap_err(),
            "index cannot be used with bus and unit"
        );
        let d = parse("file=/x,stats-intervals.0=60,stats-intervals.1=5,file.locking=off").unwrap();
        assert_eq!(d.intervals, vec![60, 5]);
        assert_eq!(d.medium.file_opts.get("locking"), Some(&Value::from("off")));
        // bus, unit and index are QemuOpts numbers (blockdev.c).
        let d = parse("bus=0x1,unit=010").unwrap();
        assert_eq!((d.bus, d.unit), (Some(1), Some(8)));
        assert_eq!(parse("index=-1").unwrap().index, None);
        assert_eq!(
            parse("bus=x").unwrap_err(),
            "Parameter 'bus' expects a number"
        );
        assert_eq!(
            parse("unit=99999999999999999999").unwrap_err(),
            "Value '99999999999999999999' is too large for parameter 'unit'"
        );
        // stats-intervals: parse_uint_full in base 10.
        assert_eq!(parse("stats-intervals.0= 5").unwrap().intervals, vec![5]);
        assert_eq!(
            parse("stats-intervals.0=0x5").unwrap_err(),
            "Invalid interval length: 0x5"
        );
        assert_eq!(
            parse("read-only=maybe").unwrap_err(),
            "Parameter 'read-only' expects 'on' or 'off'"
        );
    }
}

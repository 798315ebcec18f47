//! Typed `blockdev-add` options, mirroring `schema/block-core.json`.
//!
//! The QMP layer checks arguments against the schema first (so errors are
//! QEMU's), then deserialises them into these types; they must therefore
//! accept exactly what the schema accepts.

use serde::{Deserialize, Serialize};

/// `BlockdevDiscardOptions`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// Discard requests are ignored.
    #[default]
    Ignore,
    /// Discard requests are passed down.
    Unmap,
}

/// `BlockdevDetectZeroesOptions`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DetectZeroesOpt {
    /// Off.
    #[default]
    Off,
    /// On.
    On,
    /// On, and may unmap.
    Unmap,
}

/// `BlockdevCacheOptions`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CacheOptions {
    /// O_DIRECT.
    pub direct: Option<bool>,
    /// Ignore flushes.
    #[serde(rename = "no-flush")]
    pub no_flush: Option<bool>,
}

/// `OnOffAuto`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnOffAuto {
    /// Automatic.
    #[default]
    Auto,
    /// On.
    On,
    /// Off.
    Off,
}

/// `BlockdevAioOptions`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aio {
    /// Thread pool.
    #[default]
    Threads,
    /// Accepted for compatibility; same as threads.
    Native,
}

/// `BlockdevOptionsFile`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileOptions {
    /// Path, or `/dev/fdset/N`.
    pub filename: String,
    /// Image locking.
    pub locking: Option<OnOffAuto>,
    /// I/O method.
    pub aio: Option<Aio>,
    /// Accepted, unused.
    #[serde(rename = "aio-max-batch")]
    pub aio_max_batch: Option<i64>,
    /// Accepted, unused.
    #[serde(rename = "drop-cache")]
    pub drop_cache: Option<bool>,
}

/// `BlockdevOptionsNull`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NullOptions {
    /// Length in bytes.
    pub size: Option<i64>,
    /// Latency of every request.
    #[serde(rename = "latency-ns")]
    pub latency_ns: Option<u64>,
    /// Whether reads return zeroes.
    #[serde(rename = "read-zeroes")]
    pub read_zeroes: Option<bool>,
}

/// `BlockdevRef`: new options inline, or an existing node's name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// The node-name of an existing node.
    Reference(String),
    /// A new node.
    Definition(Box<BlockdevOptions>),
}

/// `BlockdevRefOrNull`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum BlockdevRefOrNull {
    /// No child.
    Null(()),
    /// The node-name of an existing node.
    Reference(String),
    /// A new node.
    Definition(Box<BlockdevOptions>),
}

/// `BlockdevOptionsRaw`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOptions {
    /// The storage child.
    pub file: BlockdevRef,
    /// Start of the window.
    pub offset: Option<i64>,
    /// Length of the window.
    pub size: Option<i64>,
}

/// `BlkdebugInjectErrorOptions`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlkdebugInjectError {
    /// Where the rule triggers.
    pub event: String,
    /// Only in this state.
    pub state: Option<i64>,
    /// Only requests of this type.
    pub iotype: Option<String>,
    /// The errno to fail with (default EIO).
    pub errno: Option<i64>,
    /// Only requests touching this sector.
    pub sector: Option<i64>,
    /// Remove the rule once it fired.
    pub once: Option<bool>,
    /// Fail before the child sees the request.
    pub immediately: Option<bool>,
}

/// `BlkdebugSetStateOptions`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlkdebugSetState {
    /// Where the rule triggers.
    pub event: String,
    /// Only in this state.
    pub state: Option<i64>,
    /// The state to move to.
    pub new_state: i64,
}

/// `BlockdevOptionsBlkdebug`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlkdebugOptions {
    /// The filtered child.
    pub image: BlockdevRef,
    /// A rules file in QEMU's blkdebug config syntax.
    pub config: Option<String>,
    /// Request alignment to declare.
    pub align: Option<i64>,
    /// Largest transfer to declare.
    #[serde(rename = "max-transfer")]
    pub max_transfer: Option<i32>,
    /// Preferred write-zeroes size.
    #[serde(rename = "opt-write-zero")]
    pub opt_write_zero: Option<i32>,
    /// Largest write-zeroes.
    #[serde(rename = "max-write-zero")]
    pub max_write_zero: Option<i32>,
    /// Preferred discard size.
    #[serde(rename = "opt-discard")]
    pub opt_discard: Option<i32>,
    /// Largest discard.
    #[serde(rename = "max-discard")]
    pub max_discard: Option<i32>,
    /// Error injection rules.
    #[serde(rename = "inject-error")]
    pub inject_error: Option<Vec<BlkdebugInjectError>>,
    /// State change rules.
    #[serde(rename = "set-state")]
    pub set_state: Option<Vec<BlkdebugSetState>>,
}

/// Deserialises a present member as `Some`, so that `null` stays
/// distinguishable from an absent member (for `BlockdevRefOrNull`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `BlockdevOptionsQcow2`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Qcow2Options {
    /// The image file.
    pub file: BlockdevRef,
    /// The backing node: absent (the header's), `null` (none) or a node.
    #[serde(default, deserialize_with = "present")]
    pub backing: Option<BlockdevRefOrNull>,
    /// Lazy refcounts (default: the image's compatible feature bit).
    #[serde(rename = "lazy-refcounts")]
    pub lazy_refcounts: Option<bool>,
    /// Pass guest discards down to the file (default: `discard=unmap`).
    #[serde(rename = "pass-discard-request")]
    pub pass_discard_request: Option<bool>,
    /// Pass discards of clusters freed by snapshot deletion (default on).
    #[serde(rename = "pass-discard-snapshot")]
    pub pass_discard_snapshot: Option<bool>,
    /// Pass discards of other freed clusters (default off).
    #[serde(rename = "pass-discard-other")]
    pub pass_discard_other: Option<bool>,
    /// Keep discarded clusters allocated (as zero clusters).
    #[serde(rename = "discard-no-unref")]
    pub discard_no_unref: Option<bool>,
    /// Metadata overlap checks: accepted (blockd's allocator never places
    /// data over metadata it knows).
    #[serde(rename = "overlap-check")]
    pub overlap_check: Option<serde_json::Value>,
    /// Combined L2 and refcount cache size in bytes.
    #[serde(rename = "cache-size")]
    pub cache_size: Option<i64>,
    /// L2 table cache size in bytes.
    #[serde(rename = "l2-cache-size")]
    pub l2_cache_size: Option<i64>,
    /// L2 cache entry size (validated; blockd caches whole tables).
    #[serde(rename = "l2-cache-entry-size")]
    pub l2_cache_entry_size: Option<i64>,
    /// Refcount block cache size in bytes.
    #[serde(rename = "refcount-cache-size")]
    pub refcount_cache_size: Option<i64>,
    /// Seconds after which unused cache entries are dropped.
    #[serde(rename = "cache-clean-interval")]
    pub cache_clean_interval: Option<i64>,
    /// Encryption options: refused (blockd has no qcow2 encryption).
    pub encrypt: Option<serde_json::Value>,
    /// External data file: refused (blockd has no external data files).
    #[serde(rename = "data-file")]
    pub data_file: Option<BlockdevRef>,
}

/// `InetSocketAddress` (the members blockd's schema has).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InetAddr {
    /// Host name or address.
    pub host: String,
    /// Port number or service name.
    pub port: String,
    /// Accepted, unused.
    pub numeric: Option<bool>,
    /// Accepted, unused.
    pub ipv4: Option<bool>,
    /// Accepted, unused.
    pub ipv6: Option<bool>,
}

/// `SocketAddress` (flat form).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddr {
    /// TCP.
    Inet(InetAddr),
    /// A Unix socket path.
    Unix {
        /// The path.
        path: String,
    },
    /// A connected socket: a descriptor number.
    Fd {
        /// The descriptor (number or name).
        str: String,
    },
}

/// `BlockdevOptionsNbd`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NbdOptions {
    /// The server.
    pub server: SocketAddr,
    /// Export name (default: the empty name).
    pub export: Option<String>,
    /// TLS credentials: refused (no TLS yet).
    #[serde(rename = "tls-creds")]
    pub tls_creds: Option<String>,
    /// TLS host name: only meaningful with `tls-creds`.
    #[serde(rename = "tls-hostname")]
    pub tls_hostname: Option<String>,
    /// Meta context to report as block status.
    #[serde(rename = "x-dirty-bitmap")]
    pub x_dirty_bitmap: Option<String>,
    /// Seconds requests wait for a lost server to come back.
    #[serde(rename = "reconnect-delay")]
    pub reconnect_delay: Option<u32>,
    /// Seconds the first connection is retried.
    #[serde(rename = "open-timeout")]
    pub open_timeout: Option<u32>,
}

/// `RbdAuthMode`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RbdAuthMode {
    /// Ceph's shared-key authentication.
    Cephx,
    /// No authentication.
    None,
}

/// `InetSocketAddressBase`: a host and a port (number or service name).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InetAddrBase {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: String,
}

/// `RbdImageEncryptionFormat`: how an rbd image is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RbdImageEncryptionFormat {
    /// LUKS version 1.
    Luks,
    /// LUKS version 2.
    Luks2,
    /// Either LUKS version (what the header says).
    LuksAny,
}

impl RbdImageEncryptionFormat {
    /// The value's number in QEMU's enum (its messages print it).
    pub fn index(self) -> u32 {
        self as u32
    }
}

/// `RbdEncryptionOptions`: the encryption to load when opening an rbd
/// image (every format takes the passphrase's secret; `parent` is the
/// encryption of the image's parent, for a clone formatted on its own).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RbdEncryptionOptions {
    /// The format.
    pub format: RbdImageEncryptionFormat,
    /// The parent image's encryption (layered encryption).
    pub parent: Option<Box<RbdEncryptionOptions>>,
    /// The id of the `secret` object holding the passphrase.
    #[serde(rename = "key-secret")]
    pub key_secret: String,
}

/// `BlockdevOptionsRbd`: an image in a Ceph cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RbdOptions {
    /// The pool.
    pub pool: String,
    /// The namespace in the pool (default: none).
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// A Ceph configuration file (default: Ceph's default locations).
    pub conf: Option<String>,
    /// A snapshot to open (read-only).
    pub snapshot: Option<String>,
    /// The image's LUKS encryption, loaded with librbd's (the node
    /// then shows the payload).
    pub encrypt: Option<RbdEncryptionOptions>,
    /// The Ceph user (client id) to authenticate as.
    pub user: Option<String>,
    /// Acceptable authentication modes, in order.
    #[serde(rename = "auth-client-required")]
    pub auth_client_required: Option<Vec<RbdAuthMode>>,
    /// The id of a `secret` object holding the user's key.
    #[serde(rename = "key-secret")]
    pub key_secret: Option<String>,
    /// Monitors to contact (instead of the configuration's).
    pub server: Option<Vec<InetAddrBase>>,
    /// Ceph settings from an `rbd:` name's `KEY=VALUE` options, set with
    /// `rados_conf_set` after the configuration file is read (QEMU's
    /// internal `=keyvalue-pairs`: not in the QMP schema, so blockdev-add
    /// refuses it; only [`crate::filename_rbd`] sets it).
    #[serde(rename = "=keyvalue-pairs", default, skip_serializing)]
    pub keyvalue_pairs: Vec<(String, String)>,
}

/// The driver and its own options (the union's variants).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "driver")]
pub enum DriverOptions {
    /// `blkdebug`.
    #[serde(rename = "blkdebug")]
    Blkdebug(BlkdebugOptions),
    /// `file`.
    #[serde(rename = "file")]
    File(FileOptions),
    /// `nbd`.
    #[serde(rename = "nbd")]
    Nbd(NbdOptions),
    /// `null-co`.
    #[serde(rename = "null-co")]
    Null(NullOptions),
    /// `qcow2`.
    #[serde(rename = "qcow2")]
    Qcow2(Qcow2Options),
    /// `raw`.
    #[serde(rename = "raw")]
    Raw(RawOptions),
    /// `rbd`.
    #[serde(rename = "rbd")]
    Rbd(RbdOptions),
    /// `throttle`.
    #[serde(rename = "throttle")]
    Throttle(crate::throttle::ThrottleOptions),
}

impl DriverOptions {
    /// The driver name.
    pub fn name(&self) -> &'static str {
        match self {
            DriverOptions::Blkdebug(_) => "blkdebug",
            DriverOptions::File(_) => "file",
            DriverOptions::Nbd(_) => "nbd",
            DriverOptions::Null(_) => "null-co",
            DriverOptions::Qcow2(_) => "qcow2",
            DriverOptions::Raw(_) => "raw",
            DriverOptions::Rbd(_) => "rbd",
            DriverOptions::Throttle(_) => "throttle",
        }
    }
}

/// `BlockdevOptions`: common options plus the driver's.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BlockdevOptions {
    /// The node-name (generated if absent, except for a root).
    #[serde(rename = "node-name")]
    pub node_name: Option<String>,
    /// Discard handling.
    pub discard: Option<Discard>,
    /// Cache modes.
    pub cache: Option<CacheOptions>,
    /// Read-only.
    #[serde(rename = "read-only")]
    pub read_only: Option<bool>,
    /// Fall back to read-only if read-write is not possible.
    #[serde(rename = "auto-read-only")]
    pub auto_read_only: Option<bool>,
    /// Ignore other processes' locks (read-only nodes only).
    #[serde(rename = "force-share")]
    pub force_share: Option<bool>,
    /// Zero detection.
    #[serde(rename = "detect-zeroes")]
    pub detect_zeroes: Option<DetectZeroesOpt>,
    /// The driver and its options.
    #[serde(flatten)]
    pub driver: DriverOptions,
}

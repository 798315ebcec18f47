//! Device properties: which ones each model has, and how their values are
//! parsed, worded as QEMU's qdev property setters and keyval visitor word
//! their errors.
//!
//! `device_add` hands QEMU every property as a string (numbers are printed,
//! booleans become `on`/`off`, lists and objects are dropped), and each
//! property parses the string with its own type; blockd does the same, so
//! `"scsi-id": 1` and `"scsi-id": "1"` are one thing. The strings are read
//! as QEMU's keyval visitor reads them ([`blockd_optval::keyval`]):
//! integers in C's base-0 syntax, sizes by `qemu_strtosz`, QEMU's boolean
//! spellings.

use blockd_optval::keyval;
use serde_json::Value;

use super::devices::Model;

/// The type of a property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Any string.
    Str,
    /// `on`/`off` and friends.
    Bool,
    /// An unsigned 32-bit number.
    U32,
    /// A signed 32-bit number.
    I32,
    /// A block size: a power of two from 512 to 2 MiB.
    BlockSize,
    /// A byte count.
    Size,
    /// `on`, `off` or `auto`.
    OnOffAuto,
    /// `auto`, `report`, `ignore`, `enospc` or `stop`.
    OnError,
    /// A backend or node name.
    Drive,
    /// A reference to an object blockd does not have (iothreads).
    Link,
    /// A list of interval lengths in seconds.
    Intervals,
    /// One of the listed values.
    Enum(&'static [&'static str]),
}

/// Properties of every block device (`DEFINE_BLOCK_PROPERTIES`,
/// `DEFINE_BLOCK_ERROR_PROPERTIES`).
const BLOCK: &[(&str, Kind)] = &[
    ("drive", Kind::Drive),
    ("logical_block_size", Kind::BlockSize),
    ("physical_block_size", Kind::BlockSize),
    ("min_io_size", Kind::Size),
    ("opt_io_size", Kind::Size),
    ("discard_granularity", Kind::Size),
    ("write-cache", Kind::OnOffAuto),
    ("share-rw", Kind::Bool),
    ("account-invalid", Kind::OnOffAuto),
    ("account-failed", Kind::OnOffAuto),
    ("stats-intervals", Kind::Intervals),
    ("rerror", Kind::OnError),
    ("werror", Kind::OnError),
];

/// Properties of PCI devices.
const PCI: &[(&str, Kind)] = &[
    ("addr", Kind::Str),
    ("multifunction", Kind::Bool),
    ("romfile", Kind::Str),
    ("rombar", Kind::U32),
    ("x-pcie-lnksta-dllla", Kind::Bool),
];

/// Properties of virtio PCI proxies.
const VIRTIO_PCI: &[(&str, Kind)] = &[
    ("vectors", Kind::U32),
    ("ioeventfd", Kind::Bool),
    ("disable-legacy", Kind::OnOffAuto),
    ("disable-modern", Kind::Bool),
    ("event_idx", Kind::Bool),
    ("indirect_desc", Kind::Bool),
    ("iommu_platform", Kind::Bool),
    ("packed", Kind::Bool),
    ("iothread", Kind::Link),
];

const VIRTIO_BLK: &[(&str, Kind)] = &[
    ("serial", Kind::Str),
    ("bootindex", Kind::I32),
    ("num-queues", Kind::U32),
    ("queue-size", Kind::U32),
    ("config-wce", Kind::Bool),
    ("request-merging", Kind::Bool),
    ("discard", Kind::Bool),
    ("write-zeroes", Kind::Bool),
    ("max-discard-sectors", Kind::U32),
    ("max-write-zeroes-sectors", Kind::U32),
    ("seg-max-adjust", Kind::Bool),
    ("backend_defaults", Kind::OnOffAuto),
    ("cyls", Kind::U32),
    ("heads", Kind::U32),
    ("secs", Kind::U32),
];

const VIRTIO_SCSI: &[(&str, Kind)] = &[
    ("num_queues", Kind::U32),
    ("virtqueue_size", Kind::U32),
    ("seg_max_adjust", Kind::Bool),
    ("max_sectors", Kind::U32),
    ("cmd_per_lun", Kind::U32),
    ("hotplug", Kind::Bool),
    ("param_change", Kind::Bool),
];

const SCSI_DISK: &[(&str, Kind)] = &[
    ("channel", Kind::U32),
    ("scsi-id", Kind::U32),
    ("lun", Kind::U32),
    ("bootindex", Kind::I32),
    ("serial", Kind::Str),
    ("vendor", Kind::Str),
    ("product", Kind::Str),
    ("ver", Kind::Str),
    ("device_id", Kind::Str),
    ("wwn", Kind::Str),
    ("port_wwn", Kind::Str),
    ("port_index", Kind::U32),
    ("max_io_size", Kind::Size),
    ("scsi_version", Kind::I32),
    ("backend_defaults", Kind::OnOffAuto),
];

const SCSI_HD: &[(&str, Kind)] = &[
    ("removable", Kind::Bool),
    ("dpofua", Kind::Bool),
    ("rotation_rate", Kind::U32),
    ("max_unmap_size", Kind::Size),
    ("cyls", Kind::U32),
    ("heads", Kind::U32),
    ("secs", Kind::U32),
    ("lcyls", Kind::U32),
    ("lheads", Kind::U32),
    ("lsecs", Kind::U32),
];

const IDE: &[(&str, Kind)] = &[
    ("unit", Kind::U32),
    ("serial", Kind::Str),
    ("model", Kind::Str),
    ("ver", Kind::Str),
    ("wwn", Kind::Str),
    ("bootindex", Kind::I32),
];

const IDE_HD: &[(&str, Kind)] = &[
    ("cyls", Kind::U32),
    ("heads", Kind::U32),
    ("secs", Kind::U32),
    ("lcyls", Kind::U32),
    ("lheads", Kind::U32),
    ("lsecs", Kind::U32),
    (
        "bios-chs-trans",
        Kind::Enum(&["auto", "none", "lba", "large", "rechs"]),
    ),
    ("rotation_rate", Kind::U32),
];

const FLOPPY: &[(&str, Kind)] = &[
    ("unit", Kind::U32),
    (
        "drive-type",
        Kind::Enum(&["144", "288", "120", "none", "auto"]),
    ),
];

/// The properties of a model, in lookup order.
fn tables(m: Model) -> &'static [&'static [(&'static str, Kind)]] {
    match m {
        Model::VirtioBlkPci => &[BLOCK, PCI, VIRTIO_PCI, VIRTIO_BLK],
        Model::VirtioScsiPci => &[PCI, VIRTIO_PCI, VIRTIO_SCSI],
        Model::ScsiHd => &[BLOCK, SCSI_DISK, SCSI_HD],
        Model::ScsiCd => &[BLOCK, SCSI_DISK],
        Model::IdeHd => &[BLOCK, IDE, IDE_HD],
        Model::IdeCd => &[BLOCK, IDE],
        Model::Floppy => &[BLOCK, FLOPPY],
    }
}

/// The type of property `name` of model `m`.
pub fn kind(m: Model, name: &str) -> Option<Kind> {
    tables(m)
        .iter()
        .flat_map(|t| t.iter())
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
}

/// A parsed property value.
#[derive(Debug, Clone, PartialEq)]
pub enum PropValue {
    /// A string (also drives and links).
    Str(String),
    /// A boolean.
    Bool(bool),
    /// A number.
    Num(i64),
    /// `on`/`off`/`auto`: `None` is `auto`.
    Auto(Option<bool>),
    /// Interval lengths.
    List(Vec<u32>),
}

/// The string QEMU's option conversion makes of a JSON scalar; `None` for
/// lists and objects, which `device_add` ignores.
pub fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(if *b { "on" } else { "off" }.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn expects(name: &str, what: &str) -> String {
    format!("Parameter '{name}' expects {what}")
}

/// Parses the value `raw` of property `name` (of type `kind`) of a device
/// of type `typename`.
pub fn parse(typename: &str, name: &str, kind: Kind, raw: &Value) -> Result<PropValue, String> {
    if kind == Kind::Intervals {
        let items: Vec<Value> = match raw {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        let mut out = Vec::new();
        for it in items {
            let s = scalar_string(&it).unwrap_or_default();
            match blockd_optval::strtoi64(&s) {
                Ok(n) if n > 0 && n <= i64::from(u32::MAX) => out.push(n as u32),
                _ => return Err(format!("Invalid interval length: {s}")),
            }
        }
        return Ok(PropValue::List(out));
    }
    let s = scalar_string(raw).unwrap_or_default();
    Ok(match kind {
        Kind::Str | Kind::Drive | Kind::Link => PropValue::Str(s),
        Kind::Bool => PropValue::Bool(keyval::boolean(name, &s)?),
        Kind::U32 => {
            let n = keyval::uint(name, &s)?;
            if n > u64::from(u32::MAX) {
                return Err(expects(name, "uint32_t"));
            }
            PropValue::Num(n as i64)
        }
        Kind::I32 => {
            let n = keyval::int(name, &s)?;
            if i32::try_from(n).is_err() {
                return Err(expects(name, "int32_t"));
            }
            PropValue::Num(n)
        }
        Kind::Size => PropValue::Num(keyval::size(name, &s)? as i64),
        Kind::BlockSize => {
            let n = keyval::size(name, &s)?;
            if !n.is_power_of_two() || !(512..=2 << 20).contains(&n) {
                return Err(format!(
                    "Property {typename}.{name} doesn't take value {n} (must be a power of 2 between 512 and 2097152)"
                ));
            }
            PropValue::Num(n as i64)
        }
        Kind::OnOffAuto => PropValue::Auto(match s.as_str() {
            "on" => Some(true),
            "off" => Some(false),
            "auto" => None,
            _ => return Err(format!("Parameter '{name}' does not accept value '{s}'")),
        }),
        Kind::OnError => {
            if !["auto", "report", "ignore", "enospc", "stop"].contains(&s.as_str()) {
                return Err(format!("Parameter '{name}' does not accept value '{s}'"));
            }
            PropValue::Str(s)
        }
        Kind::Enum(values) => {
            if !values.contains(&s.as_str()) {
                return Err(format!("Parameter '{name}' does not accept value '{s}'"));
            }
            PropValue::Str(s)
        }
        Kind::Intervals => unreachable!("handled above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_parsed_from_their_string_form() {
        let p = |k, v| parse("scsi-cd", "x", k, &v);
        assert_eq!(p(Kind::U32, json!(3)), Ok(PropValue::Num(3)));
        assert_eq!(p(Kind::U32, json!("0x10")), Ok(PropValue::Num(16)));
        assert_eq!(
            p(Kind::U32, json!("z")),
            Err("Parameter 'x' expects integer".into())
        );
        assert_eq!(
            p(Kind::U32, json!(-1)),
            Err("Parameter 'x' expects uint32_t".into())
        );
        assert_eq!(p(Kind::Bool, json!(true)), Ok(PropValue::Bool(true)));
        assert_eq!(p(Kind::Bool, json!("off")), Ok(PropValue::Bool(false)));
        assert_eq!(
            p(Kind::Bool, json!("maybe")),
            Err("Parameter 'x' expects 'on' or 'off'".into())
        );
        assert_eq!(p(Kind::OnOffAuto, json!("auto")), Ok(PropValue::Auto(None)));
        assert_eq!(
            p(Kind::OnError, json!("panic")),
            Err("Parameter 'x' does not accept value 'panic'".into())
        );
        assert_eq!(p(Kind::Str, json!(12)), Ok(PropValue::Str("12".into())));
        assert_eq!(
            p(Kind::Intervals, json!([60, "5"])),
            Ok(PropValue::List(vec![60, 5]))
        );
        assert!(p(Kind::Intervals, json!([0])).is_err());
        assert_eq!(p(Kind::BlockSize, json!("4k")), Ok(PropValue::Num(4096)));
        assert_eq!(p(Kind::Size, json!("1.5k")), Ok(PropValue::Num(1536)));
        assert_eq!(p(Kind::Size, json!("0x10")), Ok(PropValue::Num(16)));
        assert_eq!(
            p(Kind::Size, json!("1e3")),
            Err("Parameter 'x' expects size".into())
        );
        // Too large for 64 bits: not a number at all, as QEMU says.
        assert_eq!(
            p(Kind::U32, json!("18446744073709551616")),
            Err("Parameter 'x' expects integer".into())
        );
        assert_eq!(p(Kind::U32, json!(" 7")), Ok(PropValue::Num(7)));
        assert_eq!(p(Kind::I32, json!("-0x10")), Ok(PropValue::Num(-16)));
        assert_eq!(
            p(Kind::I32, json!("2147483648")),
            Err("Parameter 'x' expects int32_t".into())
        );
        assert_eq!(p(Kind::Bool, json!("y")), Ok(PropValue::Bool(true)));
        assert!(p(Kind::BlockSize, json!(1000)).is_err());
    }

    #[test]
    fn models_have_their_properties() {
        assert_eq!(kind(Model::ScsiCd, "scsi-id"), Some(Kind::U32));
        assert_eq!(kind(Model::ScsiCd, "removable"), None);
        assert_eq!(kind(Model::ScsiHd, "removable"), Some(Kind::Bool));
        assert_eq!(kind(Model::VirtioBlkPci, "serial"), Some(Kind::Str));
        assert_eq!(kind(Model::VirtioScsiPci, "drive"), None);
        assert_eq!(
            kind(Model::Floppy, "drive-type"),
            Some(Kind::Enum(&["144", "288", "120", "none", "auto"]))
        );
    }
}

//! I/O limits on a block backend's root, shared by `--drive` and
//! `block_set_io_throttle` (QEMU's `blockdev.c`): the `throttling.*`
//! options of `-drive` and their legacy spellings (`drive_new`'s
//! `opt_renames`, `extract_common_blockdev_options`), and the one step
//! both take to put limits on a root (`blockdev_init`'s and
//! `qmp_block_set_io_throttle`'s calls of `blk_io_limits_enable`,
//! `blk_io_limits_update_group` and `blk_set_io_limits`).
//!
//! ```text
//!  --drive ...,throttling.bps-total=N,throttling.group=g ─┐
//!  --drive ...,bps=N,group=g  (legacy, renamed first)  ───┤  apply():
//!  block_set_io_throttle {"bps": N, "group": "g", ...} ───┘  join g (or the
//!                                  device's own group), set g's limits
//! ```

use blockd_core::root::Root;
use blockd_core::throttle::{BucketType, ThrottleConfig, ThrottleGroups};
use blockd_optval::qemu_opts;

/// `-drive`'s legacy throttling options and their names since QEMU 2.4,
/// in the order `drive_new` renames them.
pub const LEGACY: [(&str, &str); 14] = [
    ("iops", "throttling.iops-total"),
    ("iops_rd", "throttling.iops-read"),
    ("iops_wr", "throttling.iops-write"),
    ("bps", "throttling.bps-total"),
    ("bps_rd", "throttling.bps-read"),
    ("bps_wr", "throttling.bps-write"),
    ("iops_max", "throttling.iops-total-max"),
    ("iops_rd_max", "throttling.iops-read-max"),
    ("iops_wr_max", "throttling.iops-write-max"),
    ("bps_max", "throttling.bps-total-max"),
    ("bps_rd_max", "throttling.bps-read-max"),
    ("bps_wr_max", "throttling.bps-write-max"),
    ("iops_size", "throttling.iops-size"),
    ("group", "throttling.group"),
];

/// Renames the legacy spellings in `opts` (`qemu_opt_rename`): a legacy
/// option given together with its new name is refused.
pub fn rename_legacy(opts: &mut [(String, String)]) -> Result<(), String> {
    for (from, to) in LEGACY {
        if !opts.iter().any(|(k, _)| k == from) {
            continue;
        }
        if opts.iter().any(|(k, _)| k == to) {
            return Err(format!(
                "'{to}' and its alias '{from}' can't be used at the same time"
            ));
        }
        for (k, _) in opts.iter_mut().filter(|(k, _)| k == from) {
            *k = to.to_string();
        }
    }
    Ok(())
}

/// The limits and group of a `--drive` (QEMU's `throttling.*` options).
#[derive(Debug, Clone, Default)]
pub struct DriveLimits {
    /// The limits (none set: no throttling).
    pub config: ThrottleConfig,
    /// `throttling.group`.
    pub group: Option<String>,
}

impl DriveLimits {
    /// Takes `throttling.KEY=value` if it is one of QEMU's options
    /// (numbers as `QEMU_OPT_NUMBER` reads them); `Ok(false)` for any
    /// other key.
    pub fn take(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let Some(name) = key.strip_prefix("throttling.") else {
            return Ok(false);
        };
        if name == "group" {
            self.group = Some(value.to_string());
            return Ok(true);
        }
        if name == "iops-size" {
            self.config.op_size = qemu_opts::parse_number(key, value)?;
            return Ok(true);
        }
        let (bucket, field) = match name.rsplit_once("-max") {
            Some((b, "")) => (b, 1),
            Some((b, "-length")) => (b, 2),
            _ => (name, 0),
        };
        let Some(t) = bucket_type(bucket) else {
            return Ok(false);
        };
        let n = qemu_opts::parse_number(key, value)?;
        let b = self.config.bucket_mut(t);
        match field {
            0 => b.avg = n,
            1 => b.max = n,
            _ => b.burst_length = n,
        }
        Ok(true)
    }
}

fn bucket_type(name: &str) -> Option<BucketType> {
    use BucketType::*;
    Some(match name {
        "bps-total" => BpsTotal,
        "bps-read" => BpsRead,
        "bps-write" => BpsWrite,
        "iops-total" => OpsTotal,
        "iops-read" => OpsRead,
        "iops-write" => OpsWrite,
        _ => return None,
    })
}

/// Puts limits on a root as QEMU does for a backend: with limits, the
/// root joins `group` (or, when it is in no group yet, the group named
/// `own`, the device's name) and the group takes the limits; a root
/// already in a group changes groups only when `group` names another
/// one (`blk_io_limits_update_group`). Without limits the root leaves its
/// group (`blk_io_limits_disable`); a group that loses its last member
/// goes away unless an object holds it.
pub fn apply(
    groups: &ThrottleGroups,
    root: &Root,
    cfg: ThrottleConfig,
    group: Option<&str>,
    own: &str,
) {
    if !cfg.enabled() {
        drop(root.set_throttle(None));
        return;
    }
    let join = match root.throttle() {
        None => Some(group.unwrap_or(own)),
        Some(m) => group.filter(|n| *n != m.group().name()),
    };
    if let Some(n) = join {
        let m = groups.get_or_create(n).join();
        // The old membership (if any) is released here.
        drop(root.set_throttle(Some(m)));
    }
    if let Some(m) = root.throttle() {
        m.group().set_config(cfg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd_core::root::RootKind;
    use blockd_core::{Perm, PermPair};

    fn opts(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn legacy_names_are_renamed_once() {
        let mut o = opts(&[("bps", "100"), ("group", "g"), ("iops_rd", "5")]);
        rename_legacy(&mut o).unwrap();
        let keys: Vec<_> = o.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            keys,
            [
                "throttling.bps-total",
                "throttling.group",
                "throttling.iops-read"
            ]
        );
        let mut o = opts(&[("throttling.bps-total", "1"), ("bps", "2")]);
        assert_eq!(
            rename_legacy(&mut o).unwrap_err(),
            "'throttling.bps-total' and its alias 'bps' can't be used at the same time"
        );
    }

    #[test]
    fn every_throttling_option_lands_in_its_field() {
        let mut l = DriveLimits::default();
        for (k, v) in [
            ("throttling.bps-read", "10"),
            ("throttling.bps-read-max", "20"),
            ("throttling.bps-read-max-length", "3"),
            ("throttling.iops-write", "7"),
            ("throttling.iops-size", "4096"),
            ("throttling.group", "g0"),
        ] {
            assert!(l.take(k, v).unwrap(), "{k}");
        }
        let b = l.config.bucket(BucketType::BpsRead);
        assert_eq!((b.avg, b.max, b.burst_length), (10, 20, 3));
        assert_eq!(l.config.bucket(BucketType::OpsWrite).avg, 7);
        assert_eq!(l.config.op_size, 4096);
        assert_eq!(l.group.as_deref(), Some("g0"));
        assert!(!l.take("throttling.nope", "1").unwrap());
        assert!(!l.take("bps", "1").unwrap());
        assert_eq!(
            l.take("throttling.bps-total", "x").unwrap_err(),
            "Parameter 'throttling.bps-total' expects a number"
        );
    }

    #[tokio::test]
    async fn roots_join_leave_and_share_groups() {
        let groups = ThrottleGroups::new();
        let root = |n| {
            let p = PermPair {
                perm: Perm::CONSISTENT_READ,
                shared: Perm::CONSISTENT_READ,
            };
            Root::new(RootKind::Backend, n, p)
        };
        let (a, b) = (root("a"), root("b"));
        let mut cfg = ThrottleConfig::default();
        cfg.bucket_mut(BucketType::BpsTotal).avg = 100;
        apply(&groups, &a, cfg, Some("g"), "a");
        apply(&groups, &b, cfg, Some("g"), "b");
        assert_eq!(groups.get("g").unwrap().member_count(), 2);
        // New limits through one member are the group's.
        cfg.bucket_mut(BucketType::BpsTotal).avg = 300;
        apply(&groups, &b, cfg, None, "b");
        assert_eq!(a.throttle().unwrap().group().config(), cfg);
        // No limits: b leaves; the group stays for a.
        apply(&groups, &b, ThrottleConfig::default(), None, "b");
        assert!(b.throttle().is_none());
        assert_eq!(groups.get("g").unwrap().member_count(), 1);
        // Without a group name a root in no group joins its own.
        apply(&groups, &b, cfg, None, "b");
        assert_eq!(b.throttle().unwrap().group().name(), "b");
    }
}

//! `blockdev-create` for `rbd` (QEMU's `qemu_rbd_do_create`): connects as
//! an open would (without librbd's cache) and creates the image; with
//! `encrypt`, opens it and formats it with librbd's LUKS
//! ([`super::encrypt::format`]), removing it again if that fails.

use blockd_core::error::strerror;
use blockd_core::BlockError;

use super::encrypt::RbdEncryptionCreateOptions;
use crate::options::RbdOptions;
use crate::secrets::Secrets;

/// `BlockdevCreateOptionsRbd`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdCreateOptions {
    /// Where the image goes (its pool, name, and how to connect).
    pub location: RbdOptions,
    /// Its length.
    pub size: u64,
    /// The object size (a power of two, at least 4 KiB; default librbd's).
    #[serde(rename = "cluster-size")]
    pub cluster_size: Option<u64>,
    /// The LUKS format to give the image (its payload has `size` bytes).
    pub encrypt: Option<RbdEncryptionCreateOptions>,
}

/// The object order (log2 of the object size; 0: librbd's default), with
/// QEMU's checks.
pub fn validate(o: &RbdCreateOptions) -> Result<i32, BlockError> {
    if o.location.snapshot.is_some() {
        return Err(BlockError::invalid(
            "Can't use snapshot name for image creation",
        ));
    }
    match o.cluster_size {
        None => Ok(0),
        Some(s) if !s.is_power_of_two() => {
            Err(BlockError::invalid("obj size needs to be power of 2"))
        }
        Some(s) if s < 4096 => Err(BlockError::invalid("obj size too small")),
        Some(s) => Ok(s.trailing_zeros() as i32),
    }
}

/// Creates the image (blocking: run it off the event loop).
pub fn create(o: &RbdCreateOptions, secrets: Option<&dyn Secrets>) -> Result<(), BlockError> {
    let order = validate(o)?;
    let key = super::key_base64(&o.location, secrets)?;
    let pool = super::connect(&o.location, false, key.as_deref())?;
    let io = |m: String| BlockError::new(blockd_core::ErrorKind::Io, m);
    let name = &o.location.image;
    pool.create_image(name, o.size, order)
        .map_err(|e| io(format!("error rbd create: {}", strerror(&e))))?;
    let Some(enc) = &o.encrypt else {
        return Ok(());
    };
    let image = pool.open_image(name, None).map_err(|e| {
        io(format!(
            "error opening image '{name}' for encryption format: {}",
            strerror(&e)
        ))
    })?;
    let r = super::encrypt::format(&image, enc, secrets);
    let pool = image.into_pool();
    if r.is_err() {
        // As QEMU: try to remove the image, and report the first error.
        let _ = pool.remove_image(name);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: serde_json::Value) -> RbdCreateOptions {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn object_sizes_as_qemu_checks_them() {
        let loc = serde_json::json!({"pool": "p", "image": "i"});
        let o = |cs: u64| opts(serde_json::json!({"location": loc, "size": 1, "cluster-size": cs}));
        assert_eq!(validate(&o(1 << 22)).unwrap(), 22);
        assert_eq!(
            validate(&o(3000)).unwrap_err().msg,
            "obj size needs to be power of 2"
        );
        assert_eq!(validate(&o(2048)).unwrap_err().msg, "obj size too small");
        let snap = opts(
            serde_json::json!({"location": {"pool": "p", "image": "i", "snapshot": "s"}, "size": 1}),
        );
        assert_eq!(
            validate(&snap).unwrap_err().msg,
            "Can't use snapshot name for image creation"
        );
    }
}

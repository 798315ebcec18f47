//! What a qcow2 image accepts as a new persistent dirty bitmap (QEMU's
//! `qcow2_co_can_store_new_dirty_bitmap` and `check_constraints_on_bitmap`,
//! `block/qcow2-bitmap.c`), checked before the bitmap exists. Names already
//! stored in the image and the directory's size are the business of the
//! code that reads and writes the bitmaps extension.

use blockd_core::dirty::StoreRefusal;

use super::Geo;

/// Smallest and largest granularity a bitmap directory entry holds (bits).
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 31;
/// Longest bitmap name.
const MAX_NAME_SIZE: usize = 1023;
/// Largest bitmap data, in bytes, and bitmap table, in entries.
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MAX_TABLE_SIZE: u64 = 0x800_0000;

/// Whether a bitmap `name` of `granularity` bytes per bit could be stored.
pub(super) fn can_store_new(geo: &Geo, name: &str, granularity: u64) -> Result<(), StoreRefusal> {
    let refuse = |m: String| Err(StoreRefusal::Refused(m));
    if geo.version < 3 {
        return refuse("Cannot store dirty bitmaps in qcow2 v2 files".into());
    }
    let bits = granularity.trailing_zeros();
    if bits > MAX_GRANULARITY_BITS {
        return refuse(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if bits < MIN_GRANULARITY_BITS {
        return refuse(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = geo.size.div_ceil(granularity).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes.div_ceil(geo.cs) > MAX_TABLE_SIZE {
        return refuse(
            "Too much space will be occupied by the bitmap. Use larger granularity".into(),
        );
    }
    if name.len() > MAX_NAME_SIZE {
        return refuse(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let v3 = Geo::new(16, 3, 1 << 30);
        assert!(can_store_new(&v3, "b", 65536).is_ok());
        assert!(can_store_new(&v3, &"x".repeat(1023), 512).is_ok());
        assert_eq!(
            can_store_new(&v3, &"x".repeat(1024), 512),
            Err(StoreRefusal::Refused(
                "Name length exceeds maximum (1023 characters)".into()
            ))
        );
        assert_eq!(
            can_store_new(&Geo::new(16, 2, 1 << 30), "b", 65536),
            Err(StoreRefusal::Refused(
                "Cannot store dirty bitmaps in qcow2 v2 files".into()
            ))
        );
    }
}

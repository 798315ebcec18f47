//! The schema files under `schema/`, compiled into the binary.

use std::sync::Arc;

use blockd_qmp::schema::Schema;

/// Every schema file, by name (a test checks the list against the folder).
pub const FILES: &[(&str, &str)] =
    &[("control.json", include_str!("../../../schema/control.json"))];

/// Loads the compiled-in schema.
///
/// # Panics
/// If the schema is inconsistent: a build that passes its tests never does.
pub fn load() -> Arc<Schema> {
    match Schema::load(FILES) {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("blockd's schema is inconsistent: {e}"),
    }
}

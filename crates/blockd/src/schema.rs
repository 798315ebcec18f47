//! The schema files under `schema/`, compiled into the binary.

use std::sync::Arc;

use blockd_qmp::schema::Schema;

/// Every schema file, by name (a test checks the list against the folder).
pub const FILES: &[(&str, &str)] = &[
    ("control.json", include_str!("../../../schema/control.json")),
    (
        "block-core.json",
        include_str!("../../../schema/block-core.json"),
    ),
    ("misc.json", include_str!("../../../schema/misc.json")),
    ("job.json", include_str!("../../../schema/job.json")),
    (
        "block-job.json",
        include_str!("../../../schema/block-job.json"),
    ),
    (
        "block-export.json",
        include_str!("../../../schema/block-export.json"),
    ),
    (
        "block-backend.json",
        include_str!("../../../schema/block-backend.json"),
    ),
    ("device.json", include_str!("../../../schema/device.json")),
    ("qom.json", include_str!("../../../schema/qom.json")),
    (
        "transaction.json",
        include_str!("../../../schema/transaction.json"),
    ),
    (
        "block-bitmap.json",
        include_str!("../../../schema/block-bitmap.json"),
    ),
];

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_file_is_compiled_in() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schema");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "schema/ and schema::FILES differ");
    }

    #[test]
    fn schema_loads_and_every_command_has_a_handler() {
        let schema = load();
        let d = crate::qmp::dispatcher(schema.clone());
        assert_eq!(d.missing_handlers(), Vec::<String>::new());
        // register() panics for a handler without a schema entry, so
        // building the dispatcher above checked the other direction.
    }
}

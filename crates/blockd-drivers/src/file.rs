//! TEMPORARY placeholder: being replaced by the full `file` driver.
use crate::open::Env;
use crate::options::FileOptions;
use blockd_core::{BlockError, NodeOptions};
/// Placeholder.
pub type FileDriver = crate::null::NullDriver;
/// Placeholder.
pub fn check(_o: &FileOptions) -> Result<(), BlockError> {
    Ok(())
}
/// Placeholder.
pub async fn open(
    _o: FileOptions,
    _n: &NodeOptions,
    _e: &Env,
) -> Result<(FileDriver, bool), BlockError> {
    Err(BlockError::unsupported("file driver not yet built"))
}

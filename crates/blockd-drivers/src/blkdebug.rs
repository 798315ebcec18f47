//! TEMPORARY placeholder: being replaced by the full `blkdebug` driver.
use crate::open::OpenCtx;
use crate::options::BlkdebugOptions;
use blockd_core::BlockError;
/// Placeholder.
pub type BlkdebugDriver = crate::null::NullDriver;
/// Placeholder.
pub fn check(_o: &BlkdebugOptions) -> Result<(), BlockError> {
    Ok(())
}
/// Placeholder.
pub async fn open(_o: BlkdebugOptions, _c: &mut OpenCtx<'_>) -> Result<BlkdebugDriver, BlockError> {
    Err(BlockError::unsupported("blkdebug driver not yet built"))
}

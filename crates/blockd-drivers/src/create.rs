//! Image creation (`blockdev-create`) for the `file` driver; the `qcow2`
//! format's is [`crate::qcow2::create`].

use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use blockd_core::error::strerror;
use blockd_core::BlockError;

/// `PreallocMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prealloc {
    /// Sparse.
    #[default]
    Off,
    /// Format metadata only (qcow2); refused for files.
    Metadata,
    /// Reserved with fallocate.
    Falloc,
    /// Written with zeroes.
    Full,
}

/// `BlockdevCreateOptionsFile`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCreateOptions {
    /// Path of the new image.
    pub filename: String,
    /// Its length.
    pub size: u64,
    /// Allocation mode.
    pub preallocation: Option<Prealloc>,
    /// Accepted; blockd does not set the NOCOW attribute.
    pub nocow: Option<bool>,
    /// Accepted; blockd does not set extent size hints.
    #[serde(rename = "extent-size-hint")]
    pub extent_size_hint: Option<u64>,
}

/// Largest image size accepted (QEMU's limit for a file: `INT64_MAX`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Creates (or truncates and regrows) a file image, blocking: run it off
/// the event loop. Errors are worded as QEMU's.
pub fn create_file(o: &FileCreateOptions) -> Result<(), BlockError> {
    if o.size > MAX_SIZE {
        return Err(BlockError::invalid(format!(
            "Image size must be less than 8 EiB! (size {} requested)",
            o.size
        )));
    }
    if o.preallocation == Some(Prealloc::Metadata) {
        return Err(BlockError::invalid(
            "Unsupported preallocation mode: metadata",
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(&o.filename)
        .map_err(|e| BlockError::io(format!("Could not create '{}'", o.filename), e))?;
    let ctx = |what: &str, e: io::Error| {
        BlockError::new(
            blockd_core::ErrorKind::Io,
            format!("Could not {what} '{}': {}", o.filename, strerror(&e)),
        )
    };
    // QEMU's raw_co_create: take the write and resize locks (resize not
    // shared), check nobody else's locks conflict, and only then clear the
    // file: an image another node or process has open stays intact.
    {
        use crate::file::lock;
        use blockd_core::Perm;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let cmds = if lock::has_ofd(fd) {
            lock::LockCmds::Ofd
        } else {
            lock::LockCmds::Posix
        };
        let perm = Perm(Perm::WRITE.0 | Perm::RESIZE.0);
        let shared = Perm(Perm::ALL.0 & !Perm::RESIZE.0);
        lock::check(fd, cmds, perm, shared)?;
    }
    // Clear whatever the file held, then grow it as asked.
    f.set_len(0).map_err(|e| ctx("resize image", e))?;
    match o.preallocation.unwrap_or_default() {
        Prealloc::Off => f.set_len(o.size).map_err(|e| ctx("resize image", e))?,
        Prealloc::Metadata => unreachable!("refused above"),
        Prealloc::Falloc => {
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            let r = unsafe {
                libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, o.size as i64)
            };
            if r != 0 {
                return Err(ctx(
                    "preallocate new data in",
                    io::Error::from_raw_os_error(r),
                ));
            }
        }
        Prealloc::Full => {
            let chunk = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < o.size {
                let n = (o.size - done).min(chunk.len() as u64) as usize;
                f.write_all_at(&chunk[..n], done)
                    .map_err(|e| ctx("write zeroes to", e))?;
                done += n as u64;
            }
        }
    }
    f.sync_all().map_err(|e| ctx("flush", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn opts(path: &std::path::Path, size: u64, p: Prealloc) -> FileCreateOptions {
        FileCreateOptions {
            filename: path.to_string_lossy().into_owned(),
            size,
            preallocation: Some(p),
            nocow: None,
            extent_size_hint: None,
        }
    }

    #[test]
    fn creates_sparse_and_preallocated_files() {
        let d = std::env::temp_dir().join(format!("blockd-create-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("sparse");
        std::fs::write(&p, b"old contents").unwrap();
        create_file(&opts(&p, 1 << 20, Prealloc::Off)).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 1 << 20);
        assert_eq!(
            &std::fs::read(&p).unwrap()[..12],
            &[0u8; 12],
            "old data cleared"
        );
        let full = d.join("full");
        create_file(&opts(&full, 1 << 20, Prealloc::Full)).unwrap();
        assert!(std::fs::metadata(&full).unwrap().blocks() * 512 >= 1 << 20);
        let e = create_file(&opts(&d.join("no/such/dir"), 1, Prealloc::Off)).unwrap_err();
        assert!(e.msg.starts_with("Could not create '"), "{}", e.msg);
        assert!(e.msg.ends_with("No such file or directory"), "{}", e.msg);
        let e = create_file(&opts(&p, u64::MAX, Prealloc::Off)).unwrap_err();
        assert!(e.msg.contains("8 EiB"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}

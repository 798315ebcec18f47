//! The `blockd` command: parses the command line and runs the server.

fn main() {
    // glibc's allocator serves a request buffer (up to 32 MiB, NBD's
    // largest payload) from mmap once it passes the dynamic threshold,
    // or trims the heap after a burst: either way the next buffer of
    // the kind faults in fresh zeroed pages. Measured with the shared
    // harness's 1 MiB NBD reads of a qcow2 image: page faults and page
    // clearing took a large share of the server's CPU; buffers that stay
    // in the heap once freed roughly double that throughput, for a few
    // tens of MiB of heap kept after a burst.
    // SAFETY: mallopt only sets allocator parameters, before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
    std::process::exit(blockd::main_with_args(std::env::args_os()));
}

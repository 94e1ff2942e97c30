//! Thin safe wrappers over the few OS calls std does not offer.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Reserve disk blocks for `[offset, offset + len)` of `f` without changing its size
/// (`fallocate(FALLOC_FL_KEEP_SIZE)`), so later appends there need no block allocation.
/// Best effort: filesystems without support just return an error, which callers ignore.
pub fn preallocate_keep_size(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a valid, open file descriptor owned by `f`; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

//! Thin safe wrappers over the few OS calls std does not offer.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `access(path, W_OK)`: may this process write `path` (permission bits, ownership, a
/// read-only mount; root without CAP_DAC_OVERRIDE is checked like anyone else)? Unlike
/// opening the file to find out, this takes no file descriptor, so it cannot release the
/// POSIX locks SQLite holds on the file (closing any descriptor of a file drops them all).
pub fn check_writable(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; access() only reads it.
    let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

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

/// A `MAP_SHARED` read-write mapping of the first `words * 4` bytes of a file, seen as 32-bit
/// atomics: stores are visible to every process mapping the same file (one page cache), loads
/// and stores are single machine instructions (no syscall).
///
/// The file is grown (never shrunk) to the mapped size when opened. Nobody may truncate it
/// below that size while it is mapped (access past EOF would raise SIGBUS); our files are only
/// ever created and grown by this code.
pub struct SharedWords {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU32>,
    words: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics; it is not tied to
// the thread that created it.
unsafe impl Send for SharedWords {}
// SAFETY: as above; `&SharedWords` only hands out `&[AtomicU32]`, which is Sync.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Map `words` 32-bit words of `f` (opened read-write), growing the file if it is shorter.
    pub fn map(f: &File, words: usize) -> std::io::Result<SharedWords> {
        let len = words * 4;
        if words == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        if f.metadata()?.len() < len as u64 {
            f.set_len(len as u64)?;
        }
        // SAFETY: mmap of a valid open fd; we ask the kernel to choose the address, so no
        // existing memory is affected. The result is checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(SharedWords { ptr, words })
    }

    /// The mapped words (page-aligned, hence 4-byte aligned).
    pub fn words(&self) -> &[std::sync::atomic::AtomicU32] {
        // SAFETY: `ptr` is a live, page-aligned mapping of `words * 4` bytes (unmapped only in
        // Drop, which needs `&mut self`, so not while this borrow lives). AtomicU32 has the size
        // and alignment of u32, and all access goes through atomics, so concurrent stores by
        // other threads or processes are not data races.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `map` created; no borrow of it can outlive
        // `&self` (see `words`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.words * 4);
        }
    }
}

/// Test fault injection: `REPL_FAULT_KILL_AT=<point>:<n>` makes the process `SIGKILL` itself the
/// `n`-th time (counting from 1) it reaches `point`. Read once; without the variable every
/// call is one relaxed load. Points: `between-header-copies` (a wal-index publish with copy 2
/// written and copy 1 not, wal-spec G15 c).
pub fn fault_point(point: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some((p, n)) = crate::config::get().fault_kill_at.as_ref() else {
        return;
    };
    if p == point && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        eprintln!(
            "REPL_FAULT_KILL_AT: killing pid {} at {point} #{n}",
            std::process::id()
        );
        // SAFETY: kill(2) of our own pid with SIGKILL; no memory is involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Sets `TCP_NODELAY` on a listening socket: Linux copies it to every accepted connection, so
/// a response written in two parts (headers, then body) is not held back by Nagle's algorithm
/// waiting for the client's delayed ACK (40 ms per long-poll answer otherwise).
pub fn set_tcp_nodelay(sock: &impl AsRawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a valid socket fd owned by `sock`, with a pointer to a live c_int
    // and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

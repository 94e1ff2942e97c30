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

/// This process's id without a system call per use (the write intent stores it on every
/// commit; `getpid` costs a kernel entry each time, and glibc no longer caches it). The cache
/// is cleared in a forked child by a `pthread_atfork` handler, registered with the first use,
/// and only when this library is pinned (`pin_this_library`: the handler must stay mapped for
/// the life of the process); unpinned, every call asks the kernel.
pub fn pid() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static PID: AtomicU32 = AtomicU32::new(0);
    static CACHED: OnceLock<bool> = OnceLock::new();
    extern "C" fn forked_child() {
        PID.store(0, Ordering::Relaxed);
    }
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    let p = std::process::id();
    let cached = *CACHED.get_or_init(|| {
        // SAFETY: registers a child handler that only stores to a static atomic (async-signal
        // safe), in a library that stays mapped for the life of the process (pinned).
        pin_this_library() && unsafe { libc::pthread_atfork(None, None, Some(forked_child)) } == 0
    });
    if cached {
        PID.store(p, Ordering::Relaxed);
    }
    p
}

/// Test fault injection: `REPL_FAULT_KILL_AT=<point>:<n>` makes the process `SIGKILL` itself the
/// `n`-th time (counting from 1) it reaches `point`. Read once; without the variable every
/// call is one relaxed load. Points: `between-header-copies` (a wal-index publish with copy 2
/// written and copy 1 not, WAL.md §G15 (c)); the asynchronous capture's `t2-before-claim`
/// (committed, not claimed), `t2-after-claim`, `append-before-records`, `append-after-record`
/// (each record of a pass), `append-before-position` (records in the log, position file
/// behind) and `restart-before-append` (the restart hook, before it appends).
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

/// Test fault injection: `REPL_FAULT_DELAY_AT=<point>:<ms>` makes every call for `point`
/// sleep `ms` milliseconds, after logging `event=fault kind=delay point=<point>` (so a test knows
/// the thread is there). Points: `append-worker-holds` (the append worker, after a pass,
/// still holding its reference to the primary), `t3-holds-write` (T3 holding WRITE).
pub fn fault_delay(point: &str) {
    if let Some((p, ms)) = crate::config::get().fault_delay_at.as_ref() {
        if p == point {
            crate::logging::event(&format!("event=fault kind=delay point={point} ms={ms}"));
            std::thread::sleep(std::time::Duration::from_millis(*ms));
        }
    }
}

/// Test fault injection: `REPL_FAULT_FAIL_AT=<point>:<n>` makes the `n`-th call for `point`
/// (counting from one) return true, and the caller fail its operation there with an I/O error.
/// Points: `log-append` (capture's append of a transaction record, after the record was built:
/// the per-page checksums already include it).
pub fn fault_fails(point: &str) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some((p, n)) = crate::config::get().fault_fail_at.as_ref() else {
        return false;
    };
    p == point && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n
}

/// Keep this shared library mapped for the life of the process, whatever the host does later.
/// Once the VFS is registered, SQLite and the host hold pointers into our code; a host that
/// `dlclose`s us (SQLite does when an extension's init returns an error) must not unmap it.
/// Returns false when the library could not be pinned (then the caller must not fail the load).
pub fn pin_this_library() -> bool {
    static PINNED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PINNED.get_or_init(|| {
        // SAFETY: dladdr writes into the zeroed Dl_info we own; the address is a function of
        // this library. dlopen with RTLD_NOLOAD only takes a new reference to an object that is
        // already loaded (dli_fname is its NUL-terminated path, valid while it is loaded), and
        // RTLD_NODELETE makes later dlclose calls leave it mapped.
        unsafe {
            let mut info: libc::Dl_info = std::mem::zeroed();
            let addr = pin_this_library as *const libc::c_void;
            if libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
                return false;
            }
            let h = libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            );
            !h.is_null()
        }
    })
}

/// A non-blocking inotify instance (Linux): the HTTP server's event loop registers its fd and
/// learns when a log directory's durable watermark file changes, so a long-poll waiting for
/// records committed by ANOTHER process costs no polling.
pub struct Inotify {
    fd: std::os::fd::OwnedFd,
}

impl Inotify {
    pub fn new() -> std::io::Result<Inotify> {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(Inotify {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watch `dir` for files written, closed after writing, created or renamed into it.
    /// Returns the watch descriptor (the same one again for a directory already watched).
    pub fn watch_dir(&self, dir: &std::path::Path) -> std::io::Result<i32> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mask = libc::IN_MODIFY | libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_CREATE;
        // SAFETY: valid inotify fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Drain pending events; returns the watch descriptors that saw any (deduplicated).
    pub fn drain(&self) -> Vec<i32> {
        let mut wds = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer we own, of its exact length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return wds;
            }
            let mut off = 0usize;
            let n = n as usize;
            let hdr = std::mem::size_of::<libc::inotify_event>();
            while off + hdr <= n {
                // The kernel writes whole events: wd (i32) first, then mask, cookie, len.
                let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4]));
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap_or([0; 4]));
                if !wds.contains(&wd) {
                    wds.push(wd);
                }
                off += hdr + len as usize;
            }
        }
    }
}

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// The soft limit on open files of this process (`RLIMIT_NOFILE`), if it has one.
pub fn open_file_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// Lower the calling thread's scheduling priority to `REPL_BACKGROUND_NICE` (default 0: as
/// inherited), so on a busy machine the application's threads get the CPU first (best effort:
/// an error leaves it unchanged). On Linux a thread id given to
/// `setpriority(PRIO_PROCESS)` names that thread alone.
pub fn lower_this_thread_priority() {
    let nice = crate::config::get().background_nice;
    if nice == 0 {
        return;
    }
    // SAFETY: gettid and setpriority on the calling thread; no memory is involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cached_pid_is_the_childs_own_after_fork() {
        let parent = super::pid();
        assert_eq!(parent, std::process::id());
        assert_eq!(super::pid(), parent); // cached now
                                          // SAFETY: fork in a test; the child only reads its pid, compares and _exits (no
                                          // allocation, no lock another thread could hold).
        let child = unsafe { libc::fork() };
        if child == 0 {
            let ok = super::pid() == unsafe { libc::getpid() } as u32 && super::pid() != parent;
            // SAFETY: _exit ends the child at once, running no destructors or atexit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        assert!(child > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waitpid on the child we just forked, writing its status into our int.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(r, child);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child saw the parent's pid"
        );
        assert_eq!(super::pid(), parent);
    }
}

//! The per-process agent handle on a database (WAL.md §D.2 "agent lock", §E.1 step 3): a file
//! opened with the *underlying* VFS's `xOpen` on the main database, with a filename made by
//! `sqlite3_create_filename()` (the unix VFS scans memory before the name for URI parameters),
//! holding a SHARED database lock for its whole life and the wal-index mapped.
//!
//! The SHARED lock blocks, in every process: the last-closer checkpoint + WAL delete,
//! journal-mode switches and exclusive-locking-mode connections. WAL locks taken through this
//! handle are arbitrated by the unix VFS against same-process connections. All shm operations
//! are serialised by an internal mutex (the unix shm object of one handle is not thread-safe).

use super::base;
use super::file::{read_real, shm_read_head};
use super::DbFileIo;
use crate::error::{Error, Result};
use crate::ffi::{self, sqlite3_file};
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct AgentHandle {
    file: *mut sqlite3_file,
    mem: Vec<u64>,
    fname: *const c_char,
    path: String,
    state: Mutex<AgentState>,
    /// Set by `close`: no call reaches the underlying file any more.
    closed: AtomicBool,
    /// The underlying file was closed (exactly once: `close_file`).
    file_closed: AtomicBool,
    /// Calls in progress on the underlying file (see `enter`); `close` waits for them.
    users: AtomicUsize,
}

/// How long `close` waits for calls in progress before it gives up and leaves the handle
/// open (a leak, logged) rather than closing a file another thread still uses.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// One call in progress on an open handle (`AgentHandle::enter`).
struct InUse<'a>(&'a AgentHandle);

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a handle whose file was replaced keeps off the wal-index (see `AgentHandle::moved`).
const REPLACED: &str = "was deleted or replaced by another file since this handle opened it";

struct AgentState {
    /// Mapped wal-index regions (32 KiB each); `regions[0]` is block 0 once mapped.
    regions: Vec<*mut c_void>,
    /// The underlying VFS has opened this handle's wal-index (the first `xShmMap` succeeded,
    /// even if it mapped nothing yet): later calls reuse that, they never open it again.
    shm_opened: bool,
    write_locked: bool,
    /// WAL lock slots held through `LiveShm` (bit i = slot i; exclusive only).
    held: u8,
}

// SAFETY: the underlying unix file object may be used from any thread; every call that
// touches per-handle mutable state (shm map/lock) is serialised through `state`, and reads
// (pread) are thread-safe in the unix VFS.
unsafe impl Send for AgentHandle {}
// SAFETY: see Send; shared access only goes through `&self` methods that lock `state`.
unsafe impl Sync for AgentHandle {}

impl AgentHandle {
    /// Open the agent handle on the main database `path` and take a SHARED lock.
    pub fn open(path: &str) -> Result<AgentHandle> {
        let b = base();
        let sz = (b.szOsFile as usize).div_ceil(8).max(1);
        let mut mem = vec![0u64; sz];
        let file = mem.as_mut_ptr() as *mut sqlite3_file;
        let db = CString::new(path).map_err(|_| Error::Misuse("path contains NUL".into()))?;
        let wal = CString::new(format!("{path}-wal")).unwrap_or_default();
        let jrnl = CString::new(format!("{path}-journal")).unwrap_or_default();
        let create = ffi::api().create_filename.ok_or_else(|| {
            Error::Unsupported("the host SQLite lacks sqlite3_create_filename (needs 3.32+)".into())
        })?;
        // SAFETY: valid C strings, no URI parameters; the result is freed in Drop.
        let fname = unsafe {
            create(
                db.as_ptr(),
                jrnl.as_ptr(),
                wal.as_ptr(),
                0,
                std::ptr::null_mut(),
            )
        };
        if fname.is_null() {
            return Err(Error::Other("out of memory creating a filename".into()));
        }
        let mut out = 0;
        let flags = ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_READWRITE;
        // SAFETY: `file` is a zeroed buffer of szOsFile bytes, 8-byte aligned, that lives as
        // long as `mem`, i.e. as long as this handle.
        let rc =
            unsafe { b.xOpen.expect("xOpen")(super::base_ptr(), fname, file, flags, &mut out) };
        let h = AgentHandle {
            file,
            mem,
            fname,
            path: path.to_string(),
            state: Mutex::new(AgentState {
                regions: Vec::new(),
                shm_opened: false,
                write_locked: false,
                held: 0,
            }),
            closed: AtomicBool::new(false),
            file_closed: AtomicBool::new(false),
            users: AtomicUsize::new(0),
        };
        if rc != ffi::SQLITE_OK {
            return Err(Error::Other(format!(
                "cannot open agent handle on {path}: code {rc}"
            )));
        }
        // SAFETY: the file is open; SHARED is the lock every WAL-mode connection holds.
        let rc =
            unsafe { (*(*file).pMethods).xLock.expect("xLock")(file, ffi::SQLITE_LOCK_SHARED) };
        if rc != ffi::SQLITE_OK {
            return Err(Error::Busy(format!(
                "cannot take a shared lock on {path} (code {rc}): another process holds it exclusively"
            )));
        }
        Ok(h)
    }

    /// Register a call on the underlying file; `None` once `close` began. Re-entrant (a
    /// counter), so a call made while a `LiveShm` of the same thread is alive is fine.
    fn enter(&self) -> Option<InUse<'_>> {
        self.users.fetch_add(1, Ordering::SeqCst);
        let g = InUse(self);
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        Some(g)
    }

    fn closed_error(&self) -> Error {
        Error::Other(format!(
            "the agent handle on {} is closed: the role ended in this process",
            self.path
        ))
    }

    /// Close the handle now, in the calling thread: drop the WAL WRITE lock if held, unmap
    /// the wal-index, drop the SHARED lock and close the file. Later calls on the handle
    /// fail (or do nothing) instead of reaching the file. Waits for calls in progress.
    ///
    /// A role's end calls this from the thread that closed the application's last
    /// connection, so the file is closed before `sqlite3_close` returns: the application may
    /// call `sqlite3_shutdown()` next, after which a close from a background thread (which
    /// held the last reference) would use the host VFS's torn-down mutex and hang or crash.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        while self.users.load(Ordering::SeqCst) != 0 {
            if Instant::now() >= deadline {
                crate::logging::event(&format!(
                    "event=agent_close_abandoned db={:?} reason=\"calls still in progress after {} s; the handle stays open\"",
                    self.path,
                    CLOSE_WAIT.as_secs()
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.close_file();
    }

    /// The close itself, once `closed` is set and no call is in progress (after `close`'s
    /// wait, or in `Drop`, where nobody else can hold the handle).
    fn close_file(&self) {
        if self.file_closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: reading the method pointer our own xOpen call set (NULL if it failed).
        let opened = unsafe { !(*self.file).pMethods.is_null() };
        if opened {
            self.unlock_write_locked(&mut st);
            let m = self.methods();
            // SAFETY: no call is in progress and none can start (`closed`): unmapping
            // without delete, dropping our lock and closing the handle we opened; each
            // exactly once (`file_closed`).
            unsafe {
                if let Some(u) = m.xShmUnmap {
                    u(self.file, 0);
                }
                if let Some(u) = m.xUnlock {
                    u(self.file, ffi::SQLITE_LOCK_NONE);
                }
                if let Some(c) = m.xClose {
                    c(self.file);
                }
            }
        }
        if let Some(free) = ffi::api().free_filename {
            // SAFETY: the name `open` made with sqlite3_create_filename, freed once.
            unsafe { free(self.fname as *mut c_char as _) };
        }
        st.regions.clear();
    }

    fn methods(&self) -> &'static ffi::sqlite3_io_methods {
        // SAFETY: the file was opened successfully (constructor), methods are static.
        unsafe { &*(*self.file).pMethods }
    }

    /// True when the path no longer names the file this handle has open: it was deleted, or
    /// replaced by another file (a restore, or SQLite's tests copying a saved image over it).
    ///
    /// Such a handle must not open the wal-index. The unix VFS finds a database's shared memory
    /// by *name* (`<db>-shm`) but keeps its per-process wal-index and lock bookkeeping per
    /// database *inode*, and POSIX locks never conflict within one process. So the first
    /// `xShmMap` of a handle on the old inode opens the `-shm` of the NEW file as a second
    /// wal-index object, sees no other holder of its DMS lock (only other processes' locks
    /// are visible) and truncates it, as the first opener does: under this process's live
    /// connections to the new file (SQLite's walfault.test in primary mode: SIGBUS in
    /// `walIndexRecover`, the mapping now past the end of the file; a writer could lose its
    /// wal-index instead). Taking WAL locks through such a handle would likewise not exclude
    /// this process's connections to the new file.
    fn moved(&self) -> bool {
        let Some(fc) = self.methods().xFileControl else {
            return false;
        };
        let mut moved: c_int = 0;
        // SAFETY: SQLITE_FCNTL_HAS_MOVED writes one int through the pointer; the handle is open.
        let rc = unsafe {
            fc(
                self.file,
                ffi::SQLITE_FCNTL_HAS_MOVED,
                &mut moved as *mut c_int as *mut c_void,
            )
        };
        rc == ffi::SQLITE_OK && moved != 0
    }

    /// Open this handle's wal-index now, in the calling thread (mapping region 0 if it
    /// exists; never creating or growing it). Call right after `open`, from the thread that
    /// opened the database: the unix VFS opens `<db>-shm` by name, so the first `xShmMap`
    /// must not run on a background thread while the application may be replacing the files
    /// (a restore; SQLite's faultsim tests copy a saved image over the database between two
    /// connections). `moved` narrows that race for a later first open (after this one failed,
    /// e.g. out of memory) but cannot close it: the check and the open are two steps.
    pub fn open_wal_index(&self) {
        let Some(_u) = self.enter() else { return };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.map0(&mut st);
    }

    /// Map region 0 if not yet mapped (never creates or grows the wal-index).
    fn map0(&self, st: &mut AgentState) -> Option<*mut c_void> {
        self.map_region(st, 0, false).ok().flatten()
    }

    /// Map region `k` (32 KiB), growing the wal-index when `extend` (caller holds WRITE).
    /// `Ok(None)`: the region does not exist and `extend` is false.
    fn map_region(&self, st: &mut AgentState, k: u32, extend: bool) -> Result<Option<*mut c_void>> {
        if let Some(p) = st.regions.get(k as usize).filter(|p| !p.is_null()) {
            return Ok(Some(*p));
        }
        let Some(m) = self.methods().xShmMap else {
            return Err(Error::Unsupported(
                "the underlying VFS has no shared-memory support (xShmMap)".into(),
            ));
        };
        if !st.shm_opened && self.moved() {
            return Err(Error::Other(format!(
                "not opening the wal-index: {} {REPLACED}",
                self.path
            )));
        }
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: mapping region k of 32 KiB through our own open handle; `p` receives it.
        let rc = unsafe { m(self.file, k as c_int, 32768, c_int::from(extend), &mut p) };
        if rc == ffi::SQLITE_OK {
            st.shm_opened = true;
        }
        if rc != ffi::SQLITE_OK {
            return Err(Error::io(
                format!("mapping wal-index region {k}"),
                std::io::Error::other(format!("SQLite error code {rc}")),
            ));
        }
        if p.is_null() {
            return Ok(None);
        }
        if st.regions.len() <= k as usize {
            st.regions.resize(k as usize + 1, std::ptr::null_mut());
        }
        st.regions[k as usize] = p;
        Ok(Some(p))
    }

    /// Exclusive access to the wal-index through this handle (the applier's view): block
    /// access, WAL locks, the barrier. `Ok(None)` when the wal-index is not initialised yet.
    pub fn live_shm(&self) -> Result<Option<LiveShm<'_>>> {
        let u = self.enter().ok_or_else(|| self.closed_error())?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.map_region(&mut st, 0, false)?.is_none() {
            return Ok(None);
        }
        Ok(Some(LiveShm { h: self, st, _u: u }))
    }

    fn shm_lock_raw(&self, ofst: u32, n: u32, flags: c_int) -> c_int {
        match self.methods().xShmLock {
            // SAFETY: a WAL lock request through our own open handle with a mapped shm.
            Some(l) => unsafe { l(self.file, ofst as c_int, n as c_int, flags) },
            None => ffi::SQLITE_IOERR,
        }
    }

    /// Write database-file bytes at `offset` through the underlying VFS.
    pub fn write_db(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let _u = self.enter().ok_or_else(|| self.closed_error())?;
        let w = self.methods().xWrite.expect("xWrite");
        // SAFETY: `buf` is valid for `len` bytes; the handle is open.
        let rc = unsafe {
            w(
                self.file,
                buf.as_ptr() as *const c_void,
                buf.len() as c_int,
                offset as i64,
            )
        };
        code_to_result(rc, "writing the database file")
    }

    /// Truncate the database file to `size` bytes.
    pub fn truncate_db(&self, size: u64) -> Result<()> {
        let _u = self.enter().ok_or_else(|| self.closed_error())?;
        let t = self.methods().xTruncate.expect("xTruncate");
        // SAFETY: plain call on our open handle.
        let rc = unsafe { t(self.file, size as i64) };
        code_to_result(rc, "truncating the database file")
    }

    /// fsync the database file.
    pub fn sync_db(&self) -> Result<()> {
        let _u = self.enter().ok_or_else(|| self.closed_error())?;
        let s = self.methods().xSync.expect("xSync");
        // SAFETY: plain call on our open handle (SQLITE_SYNC_NORMAL = 2).
        let rc = unsafe { s(self.file, 2) };
        code_to_result(rc, "syncing the database file")
    }

    /// Size of the database file in bytes.
    pub fn db_size(&self) -> Result<u64> {
        let _u = self.enter().ok_or_else(|| self.closed_error())?;
        let f = self.methods().xFileSize.expect("xFileSize");
        let mut n: i64 = 0;
        // SAFETY: `n` receives the size.
        let rc = unsafe { f(self.file, &mut n) };
        code_to_result(rc, "reading the database file size")?;
        Ok(n.max(0) as u64)
    }

    /// Take the database-file lock up to EXCLUSIVE (RESERVED first, as SQLite does). Fails
    /// with `Busy` when another connection reads or writes; the handle stays SHARED then.
    pub fn lock_db_exclusive(&self) -> Result<()> {
        let _u = self.enter().ok_or_else(|| self.closed_error())?;
        let l = self.methods().xLock.expect("xLock");
        for level in [ffi::SQLITE_LOCK_RESERVED, ffi::SQLITE_LOCK_EXCLUSIVE] {
            // SAFETY: lock escalation on our open handle, which holds SHARED.
            let rc = unsafe { l(self.file, level) };
            if rc != ffi::SQLITE_OK {
                self.unlock_db_to_shared();
                return Err(Error::Busy(
                    "the database file is in use by another connection (read or write \
                     transaction open); retry when it is idle"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Drop back to the SHARED database-file lock this handle keeps for its life.
    pub fn unlock_db_to_shared(&self) {
        let Some(_u) = self.enter() else { return };
        if let Some(u) = self.methods().xUnlock {
            // SAFETY: lowering our own lock.
            unsafe { u(self.file, ffi::SQLITE_LOCK_SHARED) };
        }
    }

    /// Try to take the WAL WRITE lock (never waits). Returns false when busy.
    pub fn try_lock_write(&self) -> bool {
        let Some(_u) = self.enter() else {
            return false;
        };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.write_locked || self.map0(&mut st).is_none() || self.moved() {
            return false;
        }
        let Some(l) = self.methods().xShmLock else {
            return false;
        };
        // SAFETY: slot 0 exclusive try-lock through our own handle.
        let rc = unsafe {
            l(
                self.file,
                0,
                1,
                ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE,
            )
        };
        st.write_locked = rc == ffi::SQLITE_OK;
        st.write_locked
    }

    /// Release the WAL WRITE lock taken by `try_lock_write`.
    pub fn unlock_write(&self) {
        let Some(_u) = self.enter() else { return };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.unlock_write_locked(&mut st);
    }

    fn unlock_write_locked(&self, st: &mut AgentState) {
        if !st.write_locked {
            return;
        }
        if let Some(l) = self.methods().xShmLock {
            // SAFETY: releasing the lock we hold.
            unsafe {
                l(
                    self.file,
                    0,
                    1,
                    ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE,
                )
            };
        }
        st.write_locked = false;
    }
}

fn code_to_result(rc: c_int, what: &str) -> Result<()> {
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(Error::io(
            what.to_string(),
            std::io::Error::other(format!("SQLite I/O error code {rc}")),
        ))
    }
}

/// The applier's exclusive view of the wal-index behind an `AgentHandle` (WAL.md §E.2): the
/// pure algorithms of `wal` run on it through `ShmAccess`. Words are accessed atomically, as
/// SQLite does. Locks taken with `try_lock` are released when this value is dropped, so no
/// error path can leave WRITE (or READ1..4) held.
pub struct LiveShm<'a> {
    h: &'a AgentHandle,
    st: std::sync::MutexGuard<'a, AgentState>,
    _u: InUse<'a>,
}

impl LiveShm<'_> {
    /// Try to take WAL lock slots `ofst..ofst+n` exclusively (never waits).
    pub fn try_lock_exclusive(&mut self, ofst: u32, n: u32) -> bool {
        let mask = slot_mask(ofst, n);
        if self.st.held & mask != 0 || (ofst == 0 && self.st.write_locked) {
            return false;
        }
        let rc = self
            .h
            .shm_lock_raw(ofst, n, ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE);
        if rc == ffi::SQLITE_OK {
            self.st.held |= mask;
            true
        } else {
            false
        }
    }

    /// Release slots taken with `try_lock_exclusive`.
    pub fn unlock_exclusive(&mut self, ofst: u32, n: u32) {
        let mask = slot_mask(ofst, n);
        if self.st.held & mask == mask {
            self.h
                .shm_lock_raw(ofst, n, ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE);
            self.st.held &= !mask;
        }
    }

    /// Start of mapped block `k`; panics (inside the FFI guard) if it is not mapped: callers
    /// check `block_count` / call `ensure_block` first.
    fn region(&self, k: u32) -> *mut c_void {
        let p = self
            .st
            .regions
            .get(k as usize)
            .copied()
            .unwrap_or(std::ptr::null_mut());
        assert!(!p.is_null(), "wal-index block {k} not mapped");
        p
    }

    /// The aligned 32-bit word at `off` of block `k`. Other processes access these words
    /// concurrently, so they are only ever used atomically (as SQLite's own are word-sized).
    fn word(&self, k: u32, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= 32768,
            "aligned in-block offset"
        );
        let p = self.region(k);
        // SAFETY: `p` is a live 32 KiB shared mapping that stays mapped until the handle is
        // dropped (which outlives this borrow); `off` is aligned and inside it.
        unsafe { AtomicU32::from_ptr((p as *mut u32).add(off / 4)) }
    }

    /// The aligned 16-bit half-word at `off` of block `k` (hash slots).
    fn half_word(&self, k: u32, off: usize) -> &AtomicU16 {
        assert!(
            off.is_multiple_of(2) && off + 2 <= 32768,
            "aligned in-block offset"
        );
        let p = self.region(k);
        // SAFETY: as in `word`, for a 2-byte aligned offset inside the mapping.
        unsafe { AtomicU16::from_ptr((p as *mut u16).add(off / 2)) }
    }
}

fn slot_mask(ofst: u32, n: u32) -> u8 {
    (((1u16 << n) - 1) << ofst) as u8
}

impl Drop for LiveShm<'_> {
    fn drop(&mut self) {
        for slot in 0..8u32 {
            if self.st.held & (1 << slot) != 0 {
                self.h
                    .shm_lock_raw(slot, 1, ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE);
            }
        }
        self.st.held = 0;
    }
}

impl crate::wal::WalLocks for LiveShm<'_> {
    fn try_lock_exclusive(&mut self, ofst: u32, n: u32) -> bool {
        LiveShm::try_lock_exclusive(self, ofst, n)
    }
    fn unlock_exclusive(&mut self, ofst: u32, n: u32) {
        LiveShm::unlock_exclusive(self, ofst, n)
    }
}

impl crate::wal::ShmAccess for LiveShm<'_> {
    fn between_header_copies(&self) {
        crate::sys::fault_point("between-header-copies");
    }

    fn block_count(&self) -> u32 {
        self.st.regions.iter().take_while(|p| !p.is_null()).count() as u32
    }

    fn ensure_block(&mut self, k: u32) -> Result<()> {
        for i in 0..=k {
            let st = &mut *self.st;
            if self.h.map_region(st, i, true)?.is_none() {
                return Err(Error::Other(format!(
                    "wal-index region {i} could not be created"
                )));
            }
        }
        Ok(())
    }

    fn read_u32(&self, block: u32, off: usize) -> u32 {
        self.word(block, off).load(Ordering::Acquire)
    }

    fn write_u32(&mut self, block: u32, off: usize, v: u32) {
        self.word(block, off).store(v, Ordering::Release)
    }

    fn read_u16(&self, block: u32, off: usize) -> u16 {
        self.half_word(block, off).load(Ordering::Acquire)
    }

    fn write_u16(&mut self, block: u32, off: usize, v: u16) {
        // A single 16-bit atomic store, as WAL.md §B.5 requires for hash slots.
        self.half_word(block, off).store(v, Ordering::Release)
    }

    fn barrier(&self) {
        match self.h.methods().xShmBarrier {
            // SAFETY: the underlying VFS's memory barrier on our own handle.
            Some(b) => unsafe { b(self.h.file) },
            None => std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

impl DbFileIo for AgentHandle {
    fn shm_head(&self) -> Option<[u8; 136]> {
        let _u = self.enter()?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let p = self.map0(&mut st)?;
        // SAFETY: `p` is our live region-0 mapping (unmapped only in Drop).
        Some(unsafe { shm_read_head(p) })
    }

    fn read_db(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _u = self.enter().ok_or_else(|| self.closed_error())?;
        read_real(self.file, offset, buf)
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        ffi::guard((), || {
            // Nobody else holds the handle any more (we own it): no wait needed.
            self.closed.store(true, Ordering::SeqCst);
            self.close_file();
            let _ = &self.mem;
        })
    }
}

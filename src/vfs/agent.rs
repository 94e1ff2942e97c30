//! The per-process agent handle on a database (wal-spec D.2 "agent lock", E.1 step 3): a file
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
use crate::error::{Error, Result};
use crate::ffi::{self, sqlite3_file};
use crate::primary::DbFileIo;
use std::ffi::{c_char, c_void, CString};
use std::sync::Mutex;

pub struct AgentHandle {
    file: *mut sqlite3_file,
    mem: Vec<u64>,
    fname: *const c_char,
    state: Mutex<AgentState>,
}

struct AgentState {
    shm0: *mut c_void,
    write_locked: bool,
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
            state: Mutex::new(AgentState {
                shm0: std::ptr::null_mut(),
                write_locked: false,
            }),
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

    fn methods(&self) -> &'static ffi::sqlite3_io_methods {
        // SAFETY: the file was opened successfully (constructor), methods are static.
        unsafe { &*(*self.file).pMethods }
    }

    /// Map region 0 if not yet mapped (never creates or grows the wal-index).
    fn map0(&self, st: &mut AgentState) -> Option<*mut c_void> {
        if st.shm0.is_null() {
            let mut p: *mut c_void = std::ptr::null_mut();
            let m = self.methods().xShmMap?;
            // SAFETY: mapping region 0 of 32 KiB without extending; `p` receives it.
            let rc = unsafe { m(self.file, 0, 32768, 0, &mut p) };
            if rc != ffi::SQLITE_OK || p.is_null() {
                return None;
            }
            st.shm0 = p;
        }
        Some(st.shm0)
    }

    /// Try to take the WAL WRITE lock (never waits). Returns false when busy.
    pub fn try_lock_write(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.write_locked || self.map0(&mut st).is_none() {
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
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
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

impl DbFileIo for AgentHandle {
    fn shm_head(&self) -> Option<[u8; 136]> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let p = self.map0(&mut st)?;
        // SAFETY: `p` is our live region-0 mapping (unmapped only in Drop).
        Some(unsafe { shm_read_head(p) })
    }

    fn read_db(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_real(self.file, offset, buf)
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        ffi::guard((), || {
            self.unlock_write();
            let m = self.methods();
            // SAFETY: unmapping without delete, dropping our lock and closing the handle we
            // opened, then freeing the filename; each exactly once.
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
                if let Some(free) = ffi::api().free_filename {
                    free(self.fname as *mut c_char as _);
                }
            }
            let _ = &self.mem;
        })
    }
}

//! The replicating VFS `replica`: a shim over the host's default VFS (normally `unix`).
//!
//! Every method forwards to the underlying VFS; the shim adds, per database file, the hooks the
//! replication roles need (see `file.rs`): capture triggers at the WAL write lock (WAL.md §D.2
//! T1/T2), guards (PRAGMA veto, WAL writes without the write lock, writes on replicas), and the
//! bookkeeping that tells capture whether the WAL was synced. The unsafe code of the crate lives
//! here and in `ffi/`: trampolines only; decisions are made by safe code above, reached through
//! the `Hooks` installed at load time (`hooks.rs`): the shim knows no role.
//!
//! Layout of our `sqlite3_file`: `ShimFile` (our fields) followed, at `SHIM_SIZE`, by the
//! underlying VFS's file object, in the single allocation of `szOsFile` bytes SQLite makes.

mod agent;
mod file;
mod hooks;

pub use agent::{AgentHandle, LiveShm};
pub use hooks::{set_hooks, DbFileIo, DbHooks, Hooks, RoleKind, WalCounters, Witness};

use crate::ffi::{self, guard, sqlite3_file, sqlite3_vfs};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};

pub const VFS_NAME: &CStr = c"replica";

static BASE: AtomicPtr<sqlite3_vfs> = AtomicPtr::new(std::ptr::null_mut());
static OURS: AtomicPtr<sqlite3_vfs> = AtomicPtr::new(std::ptr::null_mut());

/// The underlying VFS (set once by `register`).
pub(crate) fn base() -> &'static sqlite3_vfs {
    let p = BASE.load(Ordering::Acquire);
    assert!(!p.is_null(), "replica VFS used before registration");
    // SAFETY: set once to a registered VFS object, which SQLite never frees.
    unsafe { &*p }
}

pub(crate) fn base_ptr() -> *mut sqlite3_vfs {
    BASE.load(Ordering::Acquire)
}

/// Register the `replica` VFS over the current default VFS and make it the default.
/// Idempotent: a second call (another connection loading the extension) changes nothing,
/// except that it makes `replica` the default again when the host reset the default to the
/// VFS it wraps: after
/// `sqlite3_shutdown()` + `sqlite3_initialize()` the host's own VFSes are registered anew,
/// `unix` first and default (ours stays registered, not default).
pub fn register() -> Result<(), String> {
    let ours = OURS.load(Ordering::Acquire);
    if !ours.is_null() {
        // Only when the default went back to the VFS we wrap (a host reset); a VFS the
        // application stacked on top of ours and made the default stays the default.
        if ffi::vfs_find(None) == base_ptr() && !base_ptr().is_null() {
            let rc = ffi::vfs_register(ours, true);
            if rc != ffi::SQLITE_OK {
                return Err(format!(
                    "could not make the replica VFS the default again (code {rc})"
                ));
            }
        }
        return Ok(());
    }
    // Already registered by an earlier load of this library (e.g. a second copy)?
    let existing = ffi::vfs_find(Some(VFS_NAME));
    if !existing.is_null() {
        OURS.store(existing, Ordering::Release);
        return Ok(());
    }
    let base = ffi::vfs_find(None);
    if base.is_null() {
        return Err("the host SQLite has no default VFS".into());
    }
    // SAFETY: vfs_find returned a registered, immutable VFS object.
    let b = unsafe { &*base };
    if b.iVersion < 2 || b.xOpen.is_none() {
        return Err("the host's default VFS is too old (iVersion < 2)".into());
    }
    BASE.store(base, Ordering::Release);
    let v = Box::new(sqlite3_vfs {
        iVersion: b.iVersion.min(3),
        szOsFile: (file::SHIM_SIZE + b.szOsFile as usize) as c_int,
        mxPathname: b.mxPathname,
        pNext: std::ptr::null_mut(),
        zName: VFS_NAME.as_ptr(),
        pAppData: std::ptr::null_mut(),
        xOpen: Some(file::x_open),
        xDelete: Some(x_delete),
        xAccess: Some(x_access),
        xFullPathname: Some(x_full_pathname),
        xDlOpen: b.xDlOpen.map(|_| x_dl_open as _),
        xDlError: b.xDlError.map(|_| x_dl_error as _),
        xDlSym: b.xDlSym.map(|_| x_dl_sym as _),
        xDlClose: b.xDlClose.map(|_| x_dl_close as _),
        xRandomness: Some(x_randomness),
        xSleep: Some(x_sleep),
        xCurrentTime: Some(x_current_time),
        xGetLastError: Some(x_get_last_error),
        xCurrentTimeInt64: b.xCurrentTimeInt64.map(|_| x_current_time_int64 as _),
        // Forwarded when the base has them (unix does): tests and tools override system calls
        // through the default VFS (SQLite's test_syscall, e.g. a 64 KiB page size).
        xSetSystemCall: b.xSetSystemCall.map(|_| x_set_system_call as _),
        xGetSystemCall: b.xGetSystemCall.map(|_| x_get_system_call as _),
        xNextSystemCall: b.xNextSystemCall.map(|_| x_next_system_call as _),
    });
    let raw = Box::into_raw(v); // lives for the process: SQLite keeps pointers to it
    let rc = ffi::vfs_register(raw, true);
    if rc != ffi::SQLITE_OK {
        return Err(format!("sqlite3_vfs_register failed with code {rc}"));
    }
    OURS.store(raw, Ordering::Release);
    Ok(())
}

/// True if `f` is a file opened through our VFS (its methods are ours).
pub fn is_ours(f: *mut sqlite3_file) -> bool {
    file::is_shim(f)
}

/// The per-database hooks behind a user's main-database file, if it was opened through us.
pub fn db_of_file(f: *mut sqlite3_file) -> Option<std::sync::Arc<dyn DbHooks>> {
    file::db_of(f)
}

unsafe extern "C" fn x_delete(_v: *mut sqlite3_vfs, name: *const c_char, sync_dir: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        let b = base();
        // SAFETY: forwarding the caller's arguments to the underlying VFS.
        unsafe { b.xDelete.expect("xDelete")(base_ptr(), name, sync_dir) }
    })
}

unsafe extern "C" fn x_access(
    _v: *mut sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: forwarding the caller's arguments to the underlying VFS.
        unsafe { base().xAccess.expect("xAccess")(base_ptr(), name, flags, out) }
    })
}

unsafe extern "C" fn x_full_pathname(
    _v: *mut sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    guard(ffi::SQLITE_CANTOPEN, || {
        // SAFETY: forwarding the caller's arguments to the underlying VFS.
        unsafe { base().xFullPathname.expect("xFullPathname")(base_ptr(), name, n, out) }
    })
}

unsafe extern "C" fn x_dl_open(_v: *mut sqlite3_vfs, name: *const c_char) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarding; only installed when the base VFS has xDlOpen.
        unsafe { base().xDlOpen.expect("xDlOpen")(base_ptr(), name) }
    })
}

unsafe extern "C" fn x_dl_error(_v: *mut sqlite3_vfs, n: c_int, out: *mut c_char) {
    guard((), || {
        // SAFETY: forwarding; only installed when the base VFS has xDlError.
        unsafe { base().xDlError.expect("xDlError")(base_ptr(), n, out) }
    })
}

type DlSym = Option<unsafe extern "C" fn(*mut sqlite3_vfs, *mut c_void, *const c_char)>;
unsafe extern "C" fn x_dl_sym(_v: *mut sqlite3_vfs, h: *mut c_void, sym: *const c_char) -> DlSym {
    guard(None, || {
        // SAFETY: forwarding; only installed when the base VFS has xDlSym.
        unsafe { base().xDlSym.expect("xDlSym")(base_ptr(), h, sym) }
    })
}

unsafe extern "C" fn x_dl_close(_v: *mut sqlite3_vfs, h: *mut c_void) {
    guard((), || {
        // SAFETY: forwarding; only installed when the base VFS has xDlClose.
        unsafe { base().xDlClose.expect("xDlClose")(base_ptr(), h) }
    })
}

unsafe extern "C" fn x_randomness(_v: *mut sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    guard(0, || {
        // SAFETY: forwarding the caller's buffer.
        unsafe { base().xRandomness.expect("xRandomness")(base_ptr(), n, out) }
    })
}

unsafe extern "C" fn x_sleep(_v: *mut sqlite3_vfs, us: c_int) -> c_int {
    guard(0, || {
        // SAFETY: forwarding.
        unsafe { base().xSleep.expect("xSleep")(base_ptr(), us) }
    })
}

unsafe extern "C" fn x_current_time(_v: *mut sqlite3_vfs, out: *mut f64) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        // SAFETY: forwarding the caller's out pointer.
        unsafe { base().xCurrentTime.expect("xCurrentTime")(base_ptr(), out) }
    })
}

unsafe extern "C" fn x_get_last_error(_v: *mut sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    guard(0, || match base().xGetLastError {
        // SAFETY: forwarding the caller's buffer.
        Some(f) => unsafe { f(base_ptr(), n, out) },
        None => 0,
    })
}

unsafe extern "C" fn x_current_time_int64(_v: *mut sqlite3_vfs, out: *mut i64) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        // SAFETY: forwarding; only installed when the base VFS has it.
        unsafe { base().xCurrentTimeInt64.expect("xCurrentTimeInt64")(base_ptr(), out) }
    })
}

unsafe extern "C" fn x_set_system_call(
    _v: *mut sqlite3_vfs,
    name: *const c_char,
    f: sqlite3ext_sys::sqlite3_syscall_ptr,
) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        // SAFETY: forwarding; only installed when the base VFS has it.
        unsafe { base().xSetSystemCall.expect("xSetSystemCall")(base_ptr(), name, f) }
    })
}

unsafe extern "C" fn x_get_system_call(
    _v: *mut sqlite3_vfs,
    name: *const c_char,
) -> sqlite3ext_sys::sqlite3_syscall_ptr {
    guard(None, || {
        // SAFETY: forwarding; only installed when the base VFS has it.
        unsafe { base().xGetSystemCall.expect("xGetSystemCall")(base_ptr(), name) }
    })
}

unsafe extern "C" fn x_next_system_call(
    _v: *mut sqlite3_vfs,
    name: *const c_char,
) -> *const c_char {
    guard(std::ptr::null(), || {
        // SAFETY: forwarding; only installed when the base VFS has it.
        unsafe { base().xNextSystemCall.expect("xNextSystemCall")(base_ptr(), name) }
    })
}

/// Name of the underlying VFS as a C string (to open connections that bypass the shim).
pub fn base_name_cstr() -> &'static CStr {
    // SAFETY: registered VFS objects are immutable and live for the process; zName is a
    // NUL-terminated static string.
    unsafe { CStr::from_ptr(base().zName) }
}

/// Name of the underlying VFS (for repl_debug).
pub fn base_name() -> String {
    let p = BASE.load(Ordering::Acquire);
    if p.is_null() {
        return "(not registered)".into();
    }
    // SAFETY: registered VFS objects are immutable and live for the process.
    ffi::cstr_to_string(unsafe { (*p).zName }).unwrap_or_default()
}

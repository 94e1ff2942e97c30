//! The host boundary: the host's `sqlite3_api_routines` table (every SQLite call of this crate
//! goes through it, so the extension never links or calls a second SQLite), the one panic
//! guard used at every `extern "C"` entry, and safe wrappers for the few host APIs we use:
//! messages, internal connections, file controls, SQL function registration and values.
//!
//! Invariant: `API` is set exactly once, by the entry point, before any other function of this
//! module runs, and the table outlives the process (SQLite never frees it).

pub mod conn;
pub mod func;
pub mod hooks;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};

pub use sqlite3ext_sys::{
    sqlite3, sqlite3_api_routines, sqlite3_context, sqlite3_file, sqlite3_io_methods,
    sqlite3_value, sqlite3_vfs,
};

pub const SQLITE_OK: c_int = 0;
pub const SQLITE_ERROR: c_int = 1;
pub const SQLITE_BUSY: c_int = 5;
pub const SQLITE_NOMEM: c_int = 7;
pub const SQLITE_READONLY: c_int = 8;
pub const SQLITE_IOERR: c_int = 10;
pub const SQLITE_FULL: c_int = 13;
pub const SQLITE_CANTOPEN: c_int = 14;
pub const SQLITE_ROW: c_int = 100;
pub const SQLITE_DONE: c_int = 101;
pub const SQLITE_OK_LOAD_PERMANENTLY: c_int = 256;
pub const SQLITE_IOERR_WRITE: c_int = SQLITE_IOERR | (3 << 8);

pub const SQLITE_OPEN_READONLY: c_int = 0x0000_0001;
pub const SQLITE_OPEN_READWRITE: c_int = 0x0000_0002;
pub const SQLITE_OPEN_MAIN_DB: c_int = 0x0000_0100;
pub const SQLITE_OPEN_WAL: c_int = 0x0008_0000;

pub const SQLITE_FCNTL_FILE_POINTER: c_int = 7;
pub const SQLITE_FCNTL_VFS_POINTER: c_int = 27;
pub const SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE: c_int = 1006;
pub const SQLITE_FCNTL_PRAGMA: c_int = 14;
pub const SQLITE_FCNTL_HAS_MOVED: c_int = 20;

pub const SQLITE_SHM_UNLOCK: c_int = 1;
pub const SQLITE_SHM_LOCK: c_int = 2;
pub const SQLITE_SHM_SHARED: c_int = 4;
pub const SQLITE_SHM_EXCLUSIVE: c_int = 8;

pub const SQLITE_LOCK_SHARED: c_int = 1;
pub const SQLITE_LOCK_NONE: c_int = 0;
pub const SQLITE_LOCK_RESERVED: c_int = 2;
pub const SQLITE_LOCK_EXCLUSIVE: c_int = 4;

static API: AtomicPtr<sqlite3_api_routines> = AtomicPtr::new(std::ptr::null_mut());

/// Record the host's API table (entry point only). The first table wins for the life of the
/// process: `Err(first)` when `p` is the table of a different SQLite library than the one
/// recorded (two SQLite libraries in one process, e.g. apsw's and the system's), since every
/// global of this crate (the VFS, its base VFS, the API table) belongs to the first.
pub fn set_api(p: *mut sqlite3_api_routines) -> Result<(), *mut sqlite3_api_routines> {
    if p.is_null() {
        return Ok(());
    }
    match API.compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            // SAFETY: `p` is the non-null table SQLite passed to the entry point; it lives for
            // the whole process. sqlite-loadable's helpers (value/result accessors) read the
            // same table.
            unsafe { sqlite_loadable::ext::faux_sqlite_extension_init2(p) };
            Ok(())
        }
        Err(first) if first == p => Ok(()),
        Err(first) => Err(first),
    }
}

/// `sqlite3_libversion_number()` of a table that may not be the recorded one.
pub fn libversion_number_of(p: *const sqlite3_api_routines) -> i32 {
    // SAFETY: `p` is a non-null API table handed to an entry point by a live SQLite library;
    // the getter takes no arguments.
    unsafe { (*p).libversion_number.map_or(0, |f| f()) }
}

/// An error message allocated by the SQLite library of table `p` (which frees it), for an
/// entry point that must not use the recorded table.
pub fn mprintf_with(p: *const sqlite3_api_routines, msg: &str) -> *mut c_char {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: `p` is a live API table; "%s" with one valid NUL-terminated string argument.
    unsafe {
        match (*p).mprintf {
            Some(f) => f(c"%s".as_ptr(), c.as_ptr()),
            None => std::ptr::null_mut(),
        }
    }
}

/// A version number as text, e.g. 3040001 -> "3.40.1".
pub fn version_text(v: i32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// The host's API table. Panics (caught by `guard`) if called before the entry point ran.
pub fn api() -> &'static sqlite3_api_routines {
    let p = API.load(Ordering::Acquire);
    assert!(
        !p.is_null(),
        "sqlite-replica: host API table used before the entry point ran"
    );
    // SAFETY: set once from the pointer SQLite gave us; SQLite's table is static and immutable.
    unsafe { &*p }
}

/// Run `f`, converting a panic into `on_panic` so no unwind crosses into C. The one guard used
/// by every `extern "C"` function of this crate.
pub fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            crate::logging::event(&format!(
                "event=panic_caught component=sqlite-replica message={msg:?}"
            ));
            on_panic
        }
    }
}

/// Host SQLite version number, e.g. 3040001.
pub fn libversion_number() -> i32 {
    let f = api().libversion_number.expect("libversion_number");
    // SAFETY: plain getter without arguments.
    unsafe { f() }
}

/// Copy `msg` into memory from `sqlite3_malloc` (what SQLite frees error messages with).
pub fn mprintf(msg: &str) -> *mut c_char {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let f = api().mprintf.expect("mprintf");
    // SAFETY: "%s" with one valid NUL-terminated string argument.
    unsafe { f(c"%s".as_ptr(), c.as_ptr()) }
}

/// Free memory obtained from SQLite.
pub fn sqlite_free(p: *mut c_void) {
    if let Some(f) = api().free {
        // SAFETY: `p` was allocated by sqlite3_malloc/mprintf (or is null, which free accepts).
        unsafe { f(p) }
    }
}

/// Copy a C string owned by SQLite into a Rust String (lossy); None for NULL.
pub fn cstr_to_string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null pointers handed to us by SQLite are NUL-terminated strings that stay
    // valid for the duration of the call we are inside.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// `sqlite3_vfs_find(name)`.
pub fn vfs_find(name: Option<&CStr>) -> *mut sqlite3_vfs {
    let f = api().vfs_find.expect("vfs_find");
    // SAFETY: NULL or a valid C string.
    unsafe { f(name.map_or(std::ptr::null(), |n| n.as_ptr())) }
}

/// `sqlite3_vfs_register(vfs, make_default)`.
pub fn vfs_register(vfs: *mut sqlite3_vfs, make_default: bool) -> c_int {
    let f = api().vfs_register.expect("vfs_register");
    // SAFETY: `vfs` points to a 'static, fully initialised sqlite3_vfs.
    unsafe { f(vfs, make_default as c_int) }
}

/// Register `entry` as an auto-extension (runs for every new connection).
pub fn auto_extension(entry: unsafe extern "C" fn()) -> c_int {
    let f = api().auto_extension.expect("auto_extension");
    // SAFETY: `entry` is an extension entry point with the canonical signature, cast to the
    // `void(*)(void)` type the API declares (as SQLite documents).
    unsafe { f(Some(entry)) }
}

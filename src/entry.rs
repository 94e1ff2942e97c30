//! The extension entry point `sqlite3_replica_init` (SQLite derives the name from
//! `libreplica.so`). Order, as Litestream's VFS does it: check the host version, register the
//! VFS as the default, register the functions on this connection and, through an
//! auto-extension, on every later one, then stay loaded permanently.
//!
//! Two loads are refused, each with a message that says what to do:
//! - from a second, different SQLite library in the same process (the crate's globals — the
//!   API table, the VFS and the VFS it wraps — belong to the first library; mixing them
//!   crashes the process);
//! - on a connection whose main database already has a replication role (primary or replica)
//!   but was opened before the extension was loaded, so it does not go through the VFS: its
//!   writes would bypass capture (a primary would see a foreign writer and start a new
//!   generation, every replica re-copying the database). The VFS is registered first, so the
//!   next connection the application opens does go through it (a connection pool whose
//!   connect hook loads the extension gets one loud failure, then working connections).

use crate::ffi::{self, guard, sqlite3, sqlite3_api_routines};
use std::ffi::{c_char, c_int};

/// Oldest host we serve: `sqlite3_create_filename` (agent handles) appeared in 3.32.0.
pub const MIN_SQLITE: i32 = 3_032_000;

/// # Safety
/// Called by SQLite's extension loader with a valid connection and API table.
#[no_mangle]
pub unsafe extern "C" fn sqlite3_replica_init(
    db: *mut sqlite3,
    pz_err_msg: *mut *mut c_char,
    p_api: *mut sqlite3_api_routines,
) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        let fail = |msg: &str, api: *const sqlite3_api_routines| {
            if !pz_err_msg.is_null() {
                // SAFETY: SQLite gives us a writable slot for a message allocated by the same
                // library's sqlite3_malloc.
                unsafe { *pz_err_msg = ffi::mprintf_with(api, msg) };
            }
            ffi::SQLITE_ERROR
        };
        if let Err(first) = ffi::set_api(p_api) {
            return fail(
                &format!(
                    "sqlite-replica is already loaded by another SQLite library in this process \
                     (SQLite {}; this one is SQLite {}): one process can replicate through one SQLite \
                     library only. Load the extension only into that library's connections, or use \
                     this library from a separate process",
                    ffi::version_text(ffi::libversion_number_of(first)),
                    ffi::version_text(ffi::libversion_number_of(p_api))
                ),
                p_api,
            );
        }
        match init(db) {
            Ok(()) => ffi::SQLITE_OK_LOAD_PERMANENTLY,
            Err(msg) => fail(&msg, p_api),
        }
    })
}

fn init(db: *mut sqlite3) -> Result<(), String> {
    let v = ffi::libversion_number();
    if v < MIN_SQLITE {
        return Err(format!(
            "sqlite-replica needs SQLite 3.32.0 or newer; this host is {}.{}.{}: upgrade SQLite",
            v / 1_000_000,
            (v / 1000) % 1000,
            v % 1000
        ));
    }
    crate::vfs::set_hooks(&crate::roles::HOOKS);
    crate::vfs::register()?;
    crate::functions::register_all(db).map_err(|e| e.to_string())?;
    // Every load (re)registers the auto-extension: SQLite ignores a duplicate, and
    // sqlite3_shutdown() clears the list, after which loading again must restore it.
    // SAFETY: `auto_entry` has the extension entry signature SQLite calls auto-extensions
    // with; the API declares the parameter as `void(*)(void)`, hence the cast.
    let f: unsafe extern "C" fn() = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(
                *mut sqlite3,
                *mut *mut c_char,
                *const sqlite3_api_routines,
            ) -> c_int,
            unsafe extern "C" fn(),
        >(auto_entry)
    };
    let rc = ffi::auto_extension(f);
    if rc != ffi::SQLITE_OK {
        return Err(format!("sqlite3_auto_extension failed with code {rc}"));
    }
    check_main_db_goes_through_vfs(db)
}

/// Refuse the load on a connection whose main database has a replication role but was opened
/// before the VFS existed (see the module comment). Only when this library is pinned in memory:
/// SQLite `dlclose`s an extension whose init fails, and the VFS registered above must outlive it.
fn check_main_db_goes_through_vfs(db: *mut sqlite3) -> Result<(), String> {
    let conn = ffi::conn::DbRef(db);
    let Some(path) = conn.filename("main") else {
        return Ok(());
    };
    let through_vfs = conn.file_pointer("main").is_some_and(crate::vfs::is_ours);
    if through_vfs {
        return Ok(());
    }
    let Some(role) = crate::roles::remembered_role(&path) else {
        return Ok(());
    };
    if !crate::sys::pin_this_library() {
        return Ok(());
    }
    // This connection bypasses the VFS: when the application closes it (a pool drops a
    // connection whose setup failed), SQLite would checkpoint and delete the WAL through the
    // plain VFS if it is the last one on the file, a WAL reset no capture witnessed (a gap, a
    // new generation). Closing it must leave the WAL alone.
    conn.db_config_flag(ffi::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
    Err(format!(
        "sqlite-replica: {path} is a {role}, but this connection opened it before the extension was \
         loaded, so its {} would bypass replication. The extension is loaded now: open {path} again \
         with a new connection (or load the extension on a ':memory:' connection before opening \
         any database)",
        if role == "primary" { "writes" } else { "reads and writes" }
    ))
}

/// Runs for every connection opened after the first load: registers the functions.
unsafe extern "C" fn auto_entry(
    db: *mut sqlite3,
    pz_err_msg: *mut *mut c_char,
    _p_api: *const sqlite3_api_routines,
) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        // Functions, then the repl_* URI parameters (repl_listen, repl_token, repl_follow):
        // an error there makes sqlite3_open() fail with our message.
        let r = crate::functions::register_all(db)
            .and_then(|()| crate::functions::apply_uri_parameters(db));
        match r {
            Ok(()) => ffi::SQLITE_OK,
            // Out of memory while registering: the connection is marked as having failed a
            // malloc, and sqlite3_open() reports "out of memory" itself, as it would without
            // us (an error of ours would turn it into "automatic extension loading failed").
            Err(e) if e.sqlite_code() & 0xff == ffi::SQLITE_NOMEM => ffi::SQLITE_OK,
            Err(e) => {
                if !pz_err_msg.is_null() {
                    // SAFETY: SQLite gives us a writable slot for an sqlite3_malloc'd message.
                    unsafe { *pz_err_msg = ffi::mprintf(&e.to_string()) };
                }
                ffi::SQLITE_ERROR
            }
        }
    })
}

//! The extension entry point `sqlite3_replica_init` (SQLite derives the name from
//! `libreplica.so`). Order, as Litestream's VFS does it: check the host version, register the
//! VFS as the default, register the functions on this connection and, through an
//! auto-extension, on every later one, then stay loaded permanently.

use crate::ffi::{self, guard, sqlite3, sqlite3_api_routines};
use std::ffi::{c_char, c_int};
use std::sync::Once;

/// Oldest host we serve: `sqlite3_create_filename` (agent handles) appeared in 3.32.0.
pub const MIN_SQLITE: i32 = 3_032_000;

static AUTO: Once = Once::new();

/// # Safety
/// Called by SQLite's extension loader with a valid connection and API table.
#[no_mangle]
pub unsafe extern "C" fn sqlite3_replica_init(
    db: *mut sqlite3,
    pz_err_msg: *mut *mut c_char,
    p_api: *mut sqlite3_api_routines,
) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        ffi::set_api(p_api);
        match init(db) {
            Ok(()) => ffi::SQLITE_OK_LOAD_PERMANENTLY,
            Err(msg) => {
                if !pz_err_msg.is_null() {
                    // SAFETY: SQLite gives us a writable slot for an sqlite3_malloc'd message.
                    unsafe { *pz_err_msg = ffi::mprintf(&msg) };
                }
                ffi::SQLITE_ERROR
            }
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
    let mut rc = ffi::SQLITE_OK;
    AUTO.call_once(|| {
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
        rc = ffi::auto_extension(f);
    });
    if rc != ffi::SQLITE_OK {
        return Err(format!("sqlite3_auto_extension failed with code {rc}"));
    }
    Ok(())
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

//! The callbacks and controls the extension sets on its own connections (the `/v1/exec`
//! connection): an authorizer, a progress handler or, where the host lacks one, a deadline
//! watchdog, `sqlite3_db_config` flags and run-time limits.

use super::conn::{sql_error, OwnedDb};
use super::*;
use crate::error::{Error, Result};
use std::sync::Arc;

/// A connection handle moved to the deadline thread of `OwnedDb::interrupt_at`.
struct SendDb(*mut sqlite3);
// SAFETY: only `sqlite3_interrupt`, which SQLite documents as safe from any thread, is called
// through it, and only while the owning `InterruptGuard` keeps the connection open.
unsafe impl Send for SendDb {}

/// Disarms an `interrupt_at` deadline when dropped.
pub struct InterruptGuard<'a> {
    shared: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    _db: std::marker::PhantomData<&'a OwnedDb>,
}

impl Drop for InterruptGuard<'_> {
    fn drop(&mut self) {
        let (done, cv) = &*self.shared;
        *done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

/// What `sqlite3_set_authorizer` asks about one action while a statement is prepared: the
/// action code (SQLITE_INSERT, SQLITE_PRAGMA, ...) and its four text arguments (for most
/// actions: object name, second name, database name, trigger or view name).
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    pub action: i32,
    pub arg1: Option<&'a str>,
    pub arg2: Option<&'a str>,
    pub db: Option<&'a str>,
    pub inner: Option<&'a str>,
}

/// An authorizer: `true` allows the action, `false` refuses the statement (SQLITE_DENY: its
/// prepare fails with SQLITE_AUTH).
pub type Authorizer = Box<dyn Fn(&AuthRequest<'_>) -> bool + Send>;
/// A progress handler: `true` interrupts the running statement (SQLITE_INTERRUPT).
pub type ProgressFn = Box<dyn Fn() -> bool + Send>;

pub const SQLITE_DENY: c_int = 1;
pub const SQLITE_AUTH: c_int = 23;
pub const SQLITE_INTERRUPT: c_int = 9;
pub const SQLITE_TOOBIG: c_int = 18;
pub const SQLITE_DBCONFIG_DEFENSIVE: c_int = 1010;
pub const SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE: c_int = 1006;
pub const SQLITE_LIMIT_ATTACHED: c_int = 7;

unsafe extern "C" fn authorizer_trampoline(
    ctx: *mut c_void,
    action: c_int,
    a1: *const c_char,
    a2: *const c_char,
    a3: *const c_char,
    a4: *const c_char,
) -> c_int {
    guard(SQLITE_DENY, || {
        let s = |p: *const c_char| {
            // SAFETY: SQLite passes NULL or NUL-terminated strings valid for this call.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("\u{fffd}"))
        };
        // SAFETY: `ctx` is the address of the `Authorizer` boxed in the connection's `Hooks`,
        // alive until the connection is closed (it is dropped after close_v2).
        let f = unsafe { &*(ctx as *const Authorizer) };
        let req = AuthRequest {
            action,
            arg1: s(a1),
            arg2: s(a2),
            db: s(a3),
            inner: s(a4),
        };
        if f(&req) {
            SQLITE_OK
        } else {
            SQLITE_DENY
        }
    })
}

unsafe extern "C" fn progress_trampoline(ctx: *mut c_void) -> c_int {
    guard(1, || {
        // SAFETY: as for the authorizer: the boxed closure outlives the connection.
        let f = unsafe { &*(ctx as *const ProgressFn) };
        f() as c_int
    })
}

impl OwnedDb {
    /// `sqlite3_set_authorizer`: `f` judges every action of every statement prepared on this
    /// connection from now on (re-preparations included).
    pub fn set_authorizer(&mut self, f: Authorizer) -> Result<()> {
        let set = api().set_authorizer.ok_or_else(|| {
            Error::Unsupported("the host SQLite has no sqlite3_set_authorizer".into())
        })?;
        let boxed: Box<Authorizer> = Box::new(f);
        let ctx = &*boxed as *const Authorizer as *mut c_void;
        // SAFETY: valid handle; `ctx` points to the closure kept in `self.1` until after close.
        let rc = unsafe { set(self.0 .0, Some(authorizer_trampoline), ctx) };
        if rc != SQLITE_OK {
            return Err(sql_error(
                rc,
                format!("sqlite3_set_authorizer: {}", self.0.errmsg()),
            ));
        }
        self.1.authorizer = Some(boxed);
        Ok(())
    }

    /// `sqlite3_progress_handler`: `f` runs about every `every` virtual-machine steps of a
    /// running statement and interrupts it by returning true.
    pub fn set_progress_handler(&mut self, every: i32, f: ProgressFn) -> Result<()> {
        let set = api().progress_handler.ok_or_else(|| {
            Error::Unsupported("the host SQLite has no sqlite3_progress_handler".into())
        })?;
        let boxed: Box<ProgressFn> = Box::new(f);
        let ctx = &*boxed as *const ProgressFn as *mut c_void;
        // SAFETY: valid handle; `ctx` points to the closure kept in `self.1` until after close.
        unsafe { set(self.0 .0, every, Some(progress_trampoline), ctx) };
        self.1.progress = Some(boxed);
        Ok(())
    }

    /// True when the host has `sqlite3_progress_handler` (better-sqlite3 builds SQLite with
    /// `SQLITE_OMIT_PROGRESS_CALLBACK`: then `interrupt_at` is the way to stop a statement).
    pub fn has_progress_handler() -> bool {
        api().progress_handler.is_some()
    }

    /// Interrupt whatever this connection runs at `deadline` (`sqlite3_interrupt` from a
    /// watchdog thread) when `fire()` says so then; returns a guard whose drop (which the
    /// borrow ties to before the connection closes) disarms it for good. For hosts without a
    /// progress handler.
    pub fn interrupt_at(
        &self,
        deadline: std::time::Instant,
        fire: Box<dyn Fn() -> bool + Send>,
    ) -> Result<InterruptGuard<'_>> {
        let f = api()
            .interruptx
            .ok_or_else(|| Error::Unsupported("the host SQLite has no sqlite3_interrupt".into()))?;
        let shared = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let db = SendDb(self.0 .0);
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("repl-exec-deadline".into())
            .spawn(move || {
                let db = db;
                let (done, cv) = &*sh;
                let mut g = done.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if *g {
                        return;
                    }
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    g = cv
                        .wait_timeout(g, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                // Still under the lock: the guard cannot be dropped, so the connection cannot
                // be closed, while we interrupt it.
                if fire() {
                    // SAFETY: `db` is open: `done` is false and the guard, which the borrow
                    // keeps alive until before the connection closes, sets it (under this same
                    // lock) when dropped. sqlite3_interrupt may be called from any thread.
                    unsafe { f(db.0) };
                }
            })
            .map_err(|e| Error::io("starting the exec deadline thread", e))?;
        Ok(InterruptGuard {
            shared,
            _db: std::marker::PhantomData,
        })
    }

    /// `sqlite3_db_config(db, op, on, &out)` for a boolean option; returns the value in force.
    pub fn db_config_flag(&self, op: c_int, on: bool) -> Result<bool> {
        let f = api()
            .db_config
            .ok_or_else(|| Error::Unsupported("the host SQLite has no sqlite3_db_config".into()))?;
        let mut out: c_int = -1;
        // SAFETY: valid handle; boolean options take (int, int*), the int* receives the value.
        let rc = unsafe { f(self.0 .0, op, on as c_int, &mut out as *mut c_int) };
        if rc != SQLITE_OK {
            return Err(Error::Unsupported(format!(
                "sqlite3_db_config({op}) is not supported by the host SQLite ({})",
                version_text(libversion_number())
            )));
        }
        Ok(out == 1)
    }

    /// `sqlite3_limit(db, id, value)`: sets a run-time limit; returns the previous value.
    pub fn limit(&self, id: c_int, value: c_int) -> Result<c_int> {
        let f = api()
            .limit
            .ok_or_else(|| Error::Unsupported("the host SQLite has no sqlite3_limit".into()))?;
        // SAFETY: valid handle; an unknown id is ignored by SQLite (returns -1).
        Ok(unsafe { f(self.0 .0, id, value) })
    }
}

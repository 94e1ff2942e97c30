//! Our `sqlite3_file`: `ShimFile` in front of the underlying VFS's file object, and the
//! `sqlite3_io_methods` trampolines. Hooks (all decisions are delegated to safe code):
//! - main db `xShmLock`: LOCK|EXCLUSIVE on WRITE succeeded ⇒ capture T1 (catch-up);
//!   UNLOCK|EXCLUSIVE of WRITE ⇒ capture T2 *before* forwarding the unlock (WAL.md §D.1).
//! - main db `xFileControl(SQLITE_FCNTL_PRAGMA)`: veto `locking_mode=EXCLUSIVE` and leaving
//!   WAL on primaries.
//! - `-wal` `xWrite`: refused on a primary while no connection of this process holds WRITE
//!   through the shim (exclusive locking mode, heap-memory WAL); counts writes and syncs so
//!   capture knows whether the frames it ships are durable.

use super::hooks::{hooks, DbFileIo, DbHooks, RoleKind, Witness};
use super::{base, base_ptr};
use crate::ffi::{self, guard, sqlite3_file, sqlite3_io_methods, sqlite3_vfs};
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    MainDb,
    Wal,
    Other,
}

#[repr(C)]
pub(super) struct ShimFile {
    base: sqlite3_file,
    real: *mut sqlite3_file,
    kind: Kind,
    db: Option<Arc<dyn DbHooks>>,
    /// Region 0 of the wal-index as mapped for this connection (main db only).
    shm0: *mut c_void,
    /// This connection holds the WAL WRITE lock (taken through us).
    holds_write: bool,
    /// What T1 established when this connection took WRITE (consumed by T2).
    witness: Option<Witness>,
    /// This connection committed and has asked for no lock since, except to release its read
    /// mark: a checkpoint lock it asks for now is SQLite's automatic checkpoint of that commit.
    after_commit: bool,
}

/// Our fields, rounded up so the underlying file object is 16-byte aligned.
pub(super) const SHIM_SIZE: usize = std::mem::size_of::<ShimFile>().div_ceil(16) * 16;

static METHODS: sqlite3_io_methods = sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

pub(super) fn is_shim(f: *mut sqlite3_file) -> bool {
    // SAFETY: `f` is a live sqlite3_file handed to us by SQLite (FILE_POINTER result).
    !f.is_null() && std::ptr::eq(unsafe { (*f).pMethods }, &METHODS)
}

pub(super) fn db_of(f: *mut sqlite3_file) -> Option<Arc<dyn DbHooks>> {
    if !is_shim(f) {
        return None;
    }
    // SAFETY: `is_shim` proved `f` is a ShimFile we initialised in x_open.
    let s = unsafe { &*(f as *mut ShimFile) };
    (s.kind == Kind::MainDb).then(|| s.db.clone()).flatten()
}

/// Access to the underlying methods of a file we wrap.
fn real_methods(s: &ShimFile) -> &'static sqlite3_io_methods {
    // SAFETY: `real` was opened successfully (x_open only installs METHODS then), so its
    // pMethods points to the underlying VFS's static method table.
    unsafe { &*(*s.real).pMethods }
}

/// # Safety
/// `f` must be a file opened by `x_open` (SQLite only calls our methods on such files).
unsafe fn shim<'a>(f: *mut sqlite3_file) -> &'a mut ShimFile {
    // SAFETY: per the function contract.
    unsafe { &mut *(f as *mut ShimFile) }
}

pub(super) unsafe extern "C" fn x_open(
    _vfs: *mut sqlite3_vfs,
    name: *const c_char,
    file: *mut sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    guard(ffi::SQLITE_CANTOPEN, || {
        // SAFETY: SQLite allocated szOsFile = SHIM_SIZE + base size bytes at `file`.
        let real = unsafe { (file as *mut u8).add(SHIM_SIZE) } as *mut sqlite3_file;
        let kind = if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
            Kind::MainDb
        } else if flags & ffi::SQLITE_OPEN_WAL != 0 {
            Kind::Wal
        } else {
            Kind::Other
        };
        // SAFETY: writing our header into the caller's allocation; pMethods stays NULL until
        // the underlying open succeeded, so SQLite never calls x_close on a half-open file.
        unsafe {
            std::ptr::write(
                file as *mut ShimFile,
                ShimFile {
                    base: sqlite3_file {
                        pMethods: std::ptr::null(),
                    },
                    real,
                    kind,
                    db: None,
                    shm0: std::ptr::null_mut(),
                    holds_write: false,
                    witness: None,
                    after_commit: false,
                },
            );
            (*real).pMethods = std::ptr::null();
        }
        // SAFETY: forwarding the caller's arguments with our sub-allocation as the file.
        let rc = unsafe { base().xOpen.expect("xOpen")(base_ptr(), name, real, flags, out_flags) };
        // SAFETY: `file` holds the ShimFile written above.
        let s = unsafe { shim(file) };
        if rc != ffi::SQLITE_OK {
            // SAFETY: some VFSes leave pMethods set on failure; then the file must be closed.
            unsafe {
                if !(*real).pMethods.is_null() {
                    if let Some(c) = (*(*real).pMethods).xClose {
                        c(real);
                    }
                }
            }
            // SAFETY: our fields were initialised above and are dropped exactly once here.
            unsafe { std::ptr::drop_in_place(s as *mut ShimFile) };
            // SAFETY: restore the NULL methods so SQLite does not call x_close.
            unsafe { (*file).pMethods = std::ptr::null() };
            return rc;
        }
        let path = ffi::cstr_to_string(name);
        s.db = match (kind, path, hooks()) {
            (Kind::MainDb, Some(p), Some(h)) => Some(h.open_main(&p)),
            (Kind::Wal, Some(_), Some(h)) => filename_database(name).and_then(|p| h.lookup(&p)),
            _ => None,
        };
        // SAFETY: install our methods now that the underlying file is open.
        unsafe { (*file).pMethods = &METHODS };
        ffi::SQLITE_OK
    })
}

/// `sqlite3_filename_database(name)` for a WAL/journal name SQLite passed to xOpen.
fn filename_database(name: *const c_char) -> Option<String> {
    let f = ffi::api().filename_database?;
    // SAFETY: `name` is the filename SQLite passed to xOpen (created by SQLite itself), which
    // is the only kind of pointer filename_database accepts.
    ffi::cstr_to_string(unsafe { f(name) })
}

unsafe extern "C" fn x_close(f: *mut sqlite3_file) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls xClose once on a file we opened.
        let s = unsafe { shim(f) };
        if s.holds_write {
            if let Some(db) = &s.db {
                db.counters().write_holders.fetch_sub(1, Ordering::AcqRel);
            }
        }
        // A connection to a primary closing: make its last commits durable for replicas now
        // (synchronous=NORMAL leaves them to the group fsync, which a process exiting right
        // after its last close would never run).
        if s.kind == Kind::MainDb {
            if let Some(db) = &s.db {
                db.main_closing();
            }
        }
        let closed_main = if s.kind == Kind::MainDb {
            s.db.clone()
        } else {
            None
        };
        // SAFETY: forwarding; then dropping our fields exactly once.
        let rc = unsafe { real_methods(s).xClose.expect("xClose")(s.real) };
        unsafe { std::ptr::drop_in_place(s as *mut ShimFile) };
        // After the file is really closed: the last connection of this process ends the role.
        if let Some(db) = closed_main {
            db.main_closed();
        }
        rc
    })
}

unsafe extern "C" fn x_read(f: *mut sqlite3_file, buf: *mut c_void, n: c_int, off: i64) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding the caller's buffer.
        unsafe { real_methods(s).xRead.expect("xRead")(s.real, buf, n, off) }
    })
}

unsafe extern "C" fn x_write(
    f: *mut sqlite3_file,
    buf: *const c_void,
    n: c_int,
    off: i64,
) -> c_int {
    guard(ffi::SQLITE_IOERR_WRITE, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        if s.kind == Kind::Wal {
            if let Some(db) = &s.db {
                let role = db.role();
                if db.read_only() {
                    // Backstop: the WRITE-lock refusal below stops writers before this point.
                    crate::logging::event(&format!(
                        "event=wal_write_refused db={:?} reason=\"read-only (a replica, or a deposed primary)\"",
                        db.path()
                    ));
                    return ffi::SQLITE_READONLY;
                }
                if role == RoleKind::Primary
                    && db.counters().write_holders.load(Ordering::Acquire) == 0
                {
                    crate::logging::event(&format!(
                        "event=wal_write_refused db={:?} reason=\"no WAL write lock taken through the replica VFS: \
                         exclusive locking mode, or a VFS stacked above replica that keeps its own shared \
                         memory (SQLite's testvfs); capture would not see this commit\"",
                        db.path()
                    ));
                    return ffi::SQLITE_IOERR_WRITE;
                }
                db.counters().wal_write_seq.fetch_add(1, Ordering::AcqRel);
            }
        }
        // SAFETY: forwarding the caller's buffer.
        unsafe { real_methods(s).xWrite.expect("xWrite")(s.real, buf, n, off) }
    })
}

unsafe extern "C" fn x_truncate(f: *mut sqlite3_file, size: i64) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding.
        unsafe { real_methods(s).xTruncate.expect("xTruncate")(s.real, size) }
    })
}

unsafe extern "C" fn x_sync(f: *mut sqlite3_file, flags: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        let seq =
            s.db.as_ref()
                .map(|d| d.counters().wal_write_seq.load(Ordering::Acquire));
        // SAFETY: forwarding.
        let rc = unsafe { real_methods(s).xSync.expect("xSync")(s.real, flags) };
        if rc == ffi::SQLITE_OK && s.kind == Kind::Wal {
            if let (Some(db), Some(seq)) = (&s.db, seq) {
                db.counters()
                    .wal_synced_seq
                    .fetch_max(seq, Ordering::AcqRel);
            }
        }
        rc
    })
}

unsafe extern "C" fn x_file_size(f: *mut sqlite3_file, out: *mut i64) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding.
        let rc = unsafe { real_methods(s).xFileSize.expect("xFileSize")(s.real, out) };
        if rc == ffi::SQLITE_OK && s.kind == Kind::MainDb {
            // SAFETY: `out` was just written by the real xFileSize.
            let size = unsafe { *out };
            if size > 0 && s.db.as_ref().is_some_and(|d| d.shows_empty()) {
                // SAFETY: as above; an unfinished bootstrap reads as the empty file it was.
                unsafe { *out = 0 };
            }
        }
        rc
    })
}

unsafe extern "C" fn x_lock(f: *mut sqlite3_file, level: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding.
        unsafe { real_methods(s).xLock.expect("xLock")(s.real, level) }
    })
}

unsafe extern "C" fn x_unlock(f: *mut sqlite3_file, level: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding.
        unsafe { real_methods(s).xUnlock.expect("xUnlock")(s.real, level) }
    })
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut sqlite3_file, out: *mut c_int) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding.
        unsafe {
            real_methods(s)
                .xCheckReservedLock
                .expect("xCheckReservedLock")(s.real, out)
        }
    })
}

unsafe extern "C" fn x_file_control(f: *mut sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        if op == ffi::SQLITE_FCNTL_PRAGMA && s.kind == Kind::MainDb {
            // SAFETY: for FCNTL_PRAGMA, `arg` is a `char*[3]`: [0] error out, [1] name, [2] value.
            let args = arg as *mut *mut c_char;
            let (name, value) = unsafe {
                (
                    ffi::cstr_to_string(*args.add(1)),
                    ffi::cstr_to_string(*args.add(2)),
                )
            };
            if let (Some(db), Some(name)) = (&s.db, name) {
                if let Some(msg) = db.pragma_veto(&name, value.as_deref()) {
                    // SAFETY: SQLite frees azArg[0] with sqlite3_free; mprintf allocates with it.
                    unsafe { *args = ffi::mprintf(&msg) };
                    return ffi::SQLITE_ERROR;
                }
            }
        }
        // SAFETY: forwarding.
        unsafe { real_methods(s).xFileControl.expect("xFileControl")(s.real, op, arg) }
    })
}

unsafe extern "C" fn x_sector_size(f: *mut sqlite3_file) -> c_int {
    guard(4096, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding.
        unsafe { real_methods(s).xSectorSize.map_or(4096, |x| x(s.real)) }
    })
}

unsafe extern "C" fn x_device_characteristics(f: *mut sqlite3_file) -> c_int {
    guard(0, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        // SAFETY: forwarding.
        unsafe {
            real_methods(s)
                .xDeviceCharacteristics
                .map_or(0, |x| x(s.real))
        }
    })
}

unsafe extern "C" fn x_shm_map(
    f: *mut sqlite3_file,
    pg: c_int,
    sz: c_int,
    extend: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        let Some(m) = real_methods(s).xShmMap else {
            return ffi::SQLITE_IOERR;
        };
        // SAFETY: forwarding; `pp` receives the mapping.
        let rc = unsafe { m(s.real, pg, sz, extend, pp) };
        if rc == ffi::SQLITE_OK && pg == 0 {
            // SAFETY: `pp` is valid for reads after a successful call.
            s.shm0 = unsafe { *pp };
        }
        rc
    })
}

unsafe extern "C" fn x_shm_barrier(f: *mut sqlite3_file) {
    guard((), || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        if let Some(b) = real_methods(s).xShmBarrier {
            // SAFETY: forwarding.
            unsafe { b(s.real) }
        }
    })
}

unsafe extern "C" fn x_shm_unmap(f: *mut sqlite3_file, delete: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        s.shm0 = std::ptr::null_mut();
        // SAFETY: forwarding.
        unsafe {
            real_methods(s)
                .xShmUnmap
                .map_or(ffi::SQLITE_OK, |u| u(s.real, delete))
        }
    })
}

unsafe extern "C" fn x_fetch(
    f: *mut sqlite3_file,
    off: i64,
    n: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        match real_methods(s).xFetch {
            // SAFETY: forwarding.
            Some(x) if real_methods(s).iVersion >= 3 => unsafe { x(s.real, off, n, pp) },
            _ => {
                // SAFETY: "no mapping available" is always a valid answer.
                unsafe { *pp = std::ptr::null_mut() };
                ffi::SQLITE_OK
            }
        }
    })
}

unsafe extern "C" fn x_unfetch(f: *mut sqlite3_file, off: i64, p: *mut c_void) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        match real_methods(s).xUnfetch {
            // SAFETY: forwarding.
            Some(x) if real_methods(s).iVersion >= 3 => unsafe { x(s.real, off, p) },
            _ => ffi::SQLITE_OK,
        }
    })
}

/// How long an application writer's WRITE request waits out a background job of ours (see
/// `DbHooks::background_may_hold_write`) before it answers SQLITE_BUSY after all.
const BACKGROUND_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Retry a busy WRITE request while `background` says a job of ours may hold WRITE: such a
/// job holds it for microseconds (a reader's header check, T3's capture), so spin briefly,
/// then poll every 50 µs. Once no job runs, one last try decides; SQLITE_BUSY after
/// `BACKGROUND_WRITE_WAIT` (another connection holds WRITE: its owner's busy handler applies).
/// Also used for an application's checkpoint lock while an assisted checkpoint (milliseconds)
/// holds it.
fn retry_while_background_writes(
    mut try_lock: impl FnMut() -> c_int,
    background: impl Fn() -> bool,
) -> c_int {
    let deadline = std::time::Instant::now() + BACKGROUND_WRITE_WAIT;
    let mut tries = 0u32;
    loop {
        if !background() {
            return try_lock();
        }
        if tries < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        tries += 1;
        let rc = try_lock();
        if rc != ffi::SQLITE_BUSY || std::time::Instant::now() >= deadline {
            return rc;
        }
    }
}

/// Does the lock request (ofst, n) cover slot 0 (WRITE)?
fn covers_write(ofst: c_int, n: c_int) -> bool {
    ofst <= 0 && 0 < ofst + n
}

/// Is (ofst, n) the checkpoint lock (CKPT, slot 1)? Every checkpoint, automatic or asked
/// for, takes it first, without a busy handler.
fn is_checkpoint_lock(ofst: c_int, n: c_int) -> bool {
    ofst == 1 && n == 1
}

/// Is (ofst, n) READ1..READ4 at once? SQLite asks for exactly that range, exclusively, only to
/// restart the WAL (a writer's first frame after a complete checkpoint) or in a RESTART or
/// TRUNCATE checkpoint: the moment WAL frames can be overwritten or cut.
fn is_restart_range(ofst: c_int, n: c_int) -> bool {
    ofst == 4 && n == 4
}

unsafe extern "C" fn x_shm_lock(
    f: *mut sqlite3_file,
    ofst: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    guard(ffi::SQLITE_IOERR, || {
        // SAFETY: SQLite calls io methods only on files we opened.
        let s = unsafe { shim(f) };
        let Some(lock) = real_methods(s).xShmLock else {
            return ffi::SQLITE_IOERR;
        };
        // Any request but the release of a read mark ends "just committed".
        let after_commit = if flags == ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_SHARED {
            s.after_commit
        } else {
            std::mem::take(&mut s.after_commit)
        };
        let db = match (&s.db, s.kind) {
            (Some(db), Kind::MainDb) if covers_write(ofst, n) => db.clone(),
            (Some(db), Kind::MainDb)
                if is_checkpoint_lock(ofst, n)
                    && flags == ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE =>
            {
                // SQLite's automatic checkpoint of the commit just made: the assist may take
                // it over.
                if after_commit
                    && valid_header(s).is_some_and(|h| db.checkpoint_handoff(h.mx_frame))
                {
                    return ffi::SQLITE_BUSY;
                }
                // SAFETY: forwarding.
                let rc = unsafe { lock(s.real, ofst, n, flags) };
                if rc == ffi::SQLITE_BUSY && !after_commit && db.background_may_hold_write() {
                    // A checkpoint the application asked for meets our assist's run: it
                    // waits for the run instead of failing (an automatic one just tries
                    // again at the next commit).
                    return retry_while_background_writes(
                        // SAFETY: forwarding the same request again.
                        || unsafe { lock(s.real, ofst, n, flags) },
                        || db.background_may_hold_write(),
                    );
                }
                return rc;
            }
            (Some(db), Kind::MainDb)
                if is_restart_range(ofst, n)
                    && flags == ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE
                    && db.role() == RoleKind::Primary =>
            {
                // The primary's log must hold every committed frame before they can go.
                if !db.wal_restarting() {
                    return ffi::SQLITE_BUSY;
                }
                // SAFETY: forwarding.
                return unsafe { lock(s.real, ofst, n, flags) };
            }
            // SAFETY: forwarding.
            _ => return unsafe { lock(s.real, ofst, n, flags) },
        };
        if flags == ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE
            && db.read_only()
            // A replica is read-only: refuse the WAL write lock to connections of ours before
            // they write anything (SQLite reports SQLITE_READONLY, "attempt to write a readonly
            // database"). Recovery of an invalid wal-index also needs WRITE: allow that.
            && valid_header(s).is_some()
        {
            return ffi::SQLITE_READONLY;
        }
        if flags == ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE {
            // SAFETY: forwarding.
            let mut rc = unsafe { lock(s.real, ofst, n, flags) };
            if rc == ffi::SQLITE_BUSY && db.background_may_hold_write() {
                rc = retry_while_background_writes(
                    // SAFETY: forwarding the same request again.
                    || unsafe { lock(s.real, ofst, n, flags) },
                    || db.background_may_hold_write(),
                );
            }
            if rc == ffi::SQLITE_OK && !s.holds_write {
                s.holds_write = true;
                db.counters().write_holders.fetch_add(1, Ordering::AcqRel);
                if let Some(w) = db.write_locked(&ConnIo { s }) {
                    if w.refuse {
                        // The primary cannot log this write (its log is unwritable, e.g. the
                        // disk is full): give WRITE back before anything is written.
                        s.holds_write = false;
                        db.counters().write_holders.fetch_sub(1, Ordering::AcqRel);
                        // SAFETY: forwarding the unlock of the range just locked.
                        unsafe {
                            lock(
                                s.real,
                                ofst,
                                n,
                                ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE,
                            )
                        };
                        return ffi::SQLITE_FULL;
                    }
                    s.witness = Some(w);
                }
            }
            return rc;
        }
        let mut committed = None;
        let mut wal_synced = false;
        if flags == ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE && s.holds_write {
            let w = s.witness.take();
            wal_synced = db.counters().wal_synced();
            committed = db.write_unlocking(&ConnIo { s }, w, wal_synced);
            s.holds_write = false;
            s.witness = None;
            db.counters().write_holders.fetch_sub(1, Ordering::AcqRel);
        }
        // SAFETY: forwarding (always, even when capture failed: WRITE must never stay held).
        let rc = unsafe { lock(s.real, ofst, n, flags) };
        // A commit that synced the WAL (synchronous=FULL) keeps its own checkpoint: the WAL
        // would grow past 1,000 frames and every commit's fsync then also commits file-size
        // metadata (1.9x plain at FULL with the hand-off, measured).
        s.after_commit = committed.is_some() && !wal_synced;
        if let Some(lsn) = committed {
            // After the release: a synchronous-replication wait holds up this commit only.
            db.write_released(lsn);
        }
        rc
    })
}

/// Read a 32-bit word of a live wal-index mapping atomically.
///
/// # Safety
/// `base` must be a live mapping of at least `word_off * 4 + 4` bytes, 4-byte aligned.
pub(super) unsafe fn shm_load_u32(base: *mut c_void, word_off: usize) -> u32 {
    // SAFETY: per the contract; other processes/threads write these words concurrently, so
    // they are accessed atomically (SQLite itself treats them as aligned 32-bit words).
    unsafe { AtomicU32::from_ptr((base as *mut u32).add(word_off)).load(Ordering::Acquire) }
}

/// The wal-index header as this connection's mapping holds it, when it is valid (None
/// before the connection mapped region 0, or while the header copies disagree).
fn valid_header(s: &ShimFile) -> Option<crate::wal::WalIndexHeader> {
    if s.shm0.is_null() {
        return None;
    }
    // SAFETY: shm0 is this connection's live region-0 mapping (set by x_shm_map, cleared by
    // x_shm_unmap).
    let head = unsafe { shm_read_head(s.shm0) };
    crate::wal::WalIndexHeader::read_valid(&head[..96])
}

/// The first 136 bytes of block 0 (header copies + checkpoint info) from a mapping.
///
/// # Safety
/// `base` must be a live wal-index region 0 mapping (32 KiB).
pub(super) unsafe fn shm_read_head(base: *mut c_void) -> [u8; 136] {
    let mut out = [0u8; 136];
    for w in 0..34 {
        // SAFETY: region 0 is 32 KiB; 34 words = 136 bytes.
        let v = unsafe { shm_load_u32(base, w) };
        out[w * 4..w * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    out
}

/// The committing connection's view, used by T1/T2.
struct ConnIo<'a> {
    s: &'a ShimFile,
}

impl DbFileIo for ConnIo<'_> {
    fn shm_head(&self) -> Option<[u8; 136]> {
        if self.s.shm0.is_null() {
            return None;
        }
        // SAFETY: shm0 is this connection's live region-0 mapping (cleared on unmap).
        Some(unsafe { shm_read_head(self.s.shm0) })
    }

    fn read_db(&self, offset: u64, buf: &mut [u8]) -> crate::error::Result<()> {
        read_real(self.s.real, offset, buf)
    }
}

/// Read from an underlying file; a short read zero-fills (as SQLite does).
pub(super) fn read_real(
    real: *mut sqlite3_file,
    offset: u64,
    buf: &mut [u8],
) -> crate::error::Result<()> {
    // SAFETY: `real` is an open underlying file; xRead is thread-safe for the unix VFS (pread).
    let rc = unsafe {
        (*(*real).pMethods).xRead.expect("xRead")(
            real,
            buf.as_mut_ptr() as *mut c_void,
            buf.len() as c_int,
            offset as i64,
        )
    };
    match rc {
        ffi::SQLITE_OK => Ok(()),
        // SQLITE_IOERR_SHORT_READ: the buffer was zero-filled past EOF.
        x if x == (ffi::SQLITE_IOERR | (2 << 8)) => Ok(()),
        x => Err(crate::error::Error::io(
            format!("reading the database at offset {offset}"),
            std::io::Error::other(format!("SQLite I/O error code {x}")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn busy_write_is_retried_only_while_a_background_job_runs() {
        // No job of ours: one more try decides (an application's own contention stays BUSY).
        let tries = Cell::new(0);
        let rc = retry_while_background_writes(
            || {
                tries.set(tries.get() + 1);
                ffi::SQLITE_BUSY
            },
            || false,
        );
        assert_eq!((rc, tries.get()), (ffi::SQLITE_BUSY, 1));

        // A job holds WRITE for a few tries, then releases it: the request succeeds.
        let tries = Cell::new(0);
        let rc = retry_while_background_writes(
            || {
                tries.set(tries.get() + 1);
                if tries.get() < 5 {
                    ffi::SQLITE_BUSY
                } else {
                    ffi::SQLITE_OK
                }
            },
            || true,
        );
        assert_eq!((rc, tries.get()), (ffi::SQLITE_OK, 5));

        // The job ends while WRITE is still busy (someone else holds it): the last try
        // after the job's end answers.
        let tries = Cell::new(0);
        let rc = retry_while_background_writes(
            || {
                tries.set(tries.get() + 1);
                ffi::SQLITE_BUSY
            },
            || tries.get() < 3,
        );
        assert_eq!((rc, tries.get()), (ffi::SQLITE_BUSY, 4));
    }

    #[test]
    fn busy_write_wait_is_bounded() {
        let started = std::time::Instant::now();
        let rc = retry_while_background_writes(|| ffi::SQLITE_BUSY, || true);
        assert_eq!(rc, ffi::SQLITE_BUSY);
        assert!(started.elapsed() >= BACKGROUND_WRITE_WAIT);
    }
}

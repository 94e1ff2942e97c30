//! The per-process registry of databases opened through the VFS, keyed by the full path SQLite
//! gives the VFS: it attaches, resumes and detaches the roles (primary, replica) and implements
//! the VFS hooks (`vfs::DbHooks`) by handing each one to the role attached. A `Db` carries the
//! role and the shim's bookkeeping shared across connections of this process (who holds the
//! WAL write lock through the shim, whether every WAL write of this process has been synced).
//!
//! Lifetime (issue 18): a role lives as long as the database is open in this process. Every
//! main-database file opened through the VFS counts in `Db::opens`; when the last one closes,
//! the role is detached (a primary flushes: group fsync, watermark, log sync; then its
//! background work stops and its handle, locks and fds are released) and the entry leaves the
//! map, unless a follower (`repl_follow`) or a server (`repl_primary('addr')`) started in this
//! process keeps it alive. The next open finds no entry, creates one and resumes the role from
//! disk. Attaching, resuming and detaching all happen under `Db::attach_lock`, so an open that
//! races with the last close waits for the detach to finish and then resumes.
//!
//! Invariant: an entry is removed only while no file of this process holds it (`opens` is 0,
//! checked under the map's lock, which every open takes to count itself), so every `Arc<Db>`
//! handed to a file stays the one for its path while the file is open.

use crate::error::Result;
use crate::ffi::sqlite3_file;
use crate::primary::Primary;
use crate::replica::Replica;
use crate::txlog::log_dir;
use crate::vfs::{DbFileIo, DbHooks, Hooks, RoleKind, WalCounters, Witness};
use once_cell::sync::Lazy;
use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Clone, Default)]
pub enum Role {
    #[default]
    None,
    Primary(Arc<Primary>),
    Replica(Arc<Replica>),
}

pub struct Db {
    pub path: String,
    pub role: RwLock<Role>,
    /// The shim's per-database bookkeeping (WRITE holders, WAL write/sync counters).
    pub counters: WalCounters,
    /// Serialises attaching, resuming and detaching the role.
    pub attach_lock: Mutex<()>,
    /// Main-database files of this process open on this path (one per connection).
    opens: AtomicUsize,
}

/// The hooks the VFS calls (installed by the entry point).
pub static HOOKS: Registry = Registry;

/// The process-wide registry as the VFS sees it.
pub struct Registry;

impl Hooks for Registry {
    fn open_main(&self, path: &str) -> Arc<dyn DbHooks> {
        on_open_main(path)
    }

    fn lookup(&self, path: &str) -> Option<Arc<dyn DbHooks>> {
        lookup(path).map(|d| d as Arc<dyn DbHooks>)
    }
}

impl DbHooks for Db {
    fn path(&self) -> &str {
        &self.path
    }

    fn counters(&self) -> &WalCounters {
        &self.counters
    }

    fn role(&self) -> RoleKind {
        match &*self.role.read().unwrap_or_else(|e| e.into_inner()) {
            Role::None => RoleKind::None,
            Role::Primary(_) => RoleKind::Primary,
            Role::Replica(_) => RoleKind::Replica,
        }
    }

    /// A connection to a primary closing: make its last commits durable for replicas now
    /// (synchronous=NORMAL leaves them to the group fsync, which a process exiting right
    /// after its last close would never run).
    fn main_closing(&self) {
        if let Some(p) = self.primary() {
            p.flush();
        }
    }

    fn main_closed(&self) {
        if self.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            release_if_idle(self);
        }
    }

    fn pragma_veto(&self, name: &str, value: Option<&str>) -> Option<String> {
        pragma_veto(self, name, value)
    }

    fn write_locked(&self, io: &dyn DbFileIo) -> Option<Witness> {
        self.primary().map(|p| p.on_write_locked(io))
    }

    fn wal_restarting(&self) -> bool {
        self.primary().is_none_or(|p| p.before_wal_restart())
    }

    fn write_unlocking(
        &self,
        io: &dyn DbFileIo,
        w: Option<Witness>,
        wal_synced: bool,
    ) -> Option<u64> {
        self.primary()
            .and_then(|p| p.on_write_unlocking(io, w, wal_synced))
    }

    fn write_released(&self, lsn: u64) {
        if let Some(p) = self.primary() {
            p.wait_for_replicas(lsn);
        }
    }

    fn shows_empty(&self) -> bool {
        self.role() != RoleKind::Primary && crate::replica::bootstrap_pending(&self.path)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// The `Db` behind a user's main-database file, if it was opened through our VFS.
pub fn db_of_file(f: *mut sqlite3_file) -> Option<Arc<Db>> {
    crate::vfs::db_of_file(f)?.into_any().downcast::<Db>().ok()
}

static DBS: Lazy<Mutex<HashMap<String, Arc<Db>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

impl Db {
    pub fn primary(&self) -> Option<Arc<Primary>> {
        match &*self.role.read().unwrap_or_else(|e| e.into_inner()) {
            Role::Primary(p) => Some(p.clone()),
            _ => None,
        }
    }

    pub fn replica(&self) -> Option<Arc<Replica>> {
        match &*self.role.read().unwrap_or_else(|e| e.into_inner()) {
            Role::Replica(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// True when the role is set (primary or replica).
    pub fn has_role(&self) -> bool {
        !matches!(
            &*self.role.read().unwrap_or_else(|e| e.into_inner()),
            Role::None
        )
    }
}

/// Find the entry for `path` without creating one.
pub fn lookup(path: &str) -> Option<Arc<Db>> {
    DBS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .cloned()
}

/// The entry for `path` (created on first use), counting one more open file on it.
fn open_entry(path: &str) -> Arc<Db> {
    let mut m = DBS.lock().unwrap_or_else(|e| e.into_inner());
    let db = m
        .entry(path.to_string())
        .or_insert_with(|| {
            Arc::new(Db {
                path: path.to_string(),
                role: RwLock::new(Role::None),
                counters: WalCounters::default(),
                attach_lock: Mutex::new(()),
                opens: AtomicUsize::new(0),
            })
        })
        .clone();
    db.opens.fetch_add(1, Ordering::AcqRel);
    db
}

/// True when a main-database file of this process is open on `path` through the VFS (possibly
/// under another VFS stacked on top of it).
pub fn is_open_here(path: &str) -> bool {
    lookup(path).is_some_and(|d| d.opens.load(Ordering::Acquire) > 0)
}

/// The last file of `db` in this process closed: end its role unless something started in
/// this process keeps it alive, then forget the entry (the next open resumes from disk).
fn release_if_idle(db: &Db) {
    {
        let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
        if db.opens.load(Ordering::Acquire) > 0 {
            return; // reopened meanwhile
        }
        let role = db.role.read().unwrap_or_else(|e| e.into_inner()).clone();
        match role {
            Role::Primary(p) if p.keeps_alive() => return,
            Role::Replica(r) if r.following() => return,
            Role::Primary(p) => p.detach(),
            Role::Replica(_) | Role::None => {}
        }
        *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::None;
    }
    let mut m = DBS.lock().unwrap_or_else(|e| e.into_inner());
    if db.opens.load(Ordering::Acquire) == 0 && !db.has_role() {
        let ours = m
            .get(&db.path)
            .is_some_and(|d| std::ptr::eq(Arc::as_ptr(d), db));
        if ours {
            m.remove(&db.path);
        }
    }
}

/// The role remembered on disk for `path` ("primary" or "replica"), whether or not this
/// process has it open: a primary has `<db>-replica/meta.json`, a replica its replica state.
pub fn remembered_role(path: &str) -> Option<&'static str> {
    if crate::replica::is_replica_dir(path) {
        Some("replica")
    } else if Path::new(&log_dir(path)).join("meta.json").exists() {
        Some("primary")
    } else {
        None
    }
}

/// Called by the VFS when a main database file is opened: returns its entry and, if the
/// database has a remembered role (a log directory with meta.json), resumes that role.
pub fn on_open_main(path: &str) -> Arc<Db> {
    let db = open_entry(path);
    // Under the attach lock: a detach by the last close racing with this open finishes first.
    let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = db.primary() {
        // The files were deleted or replaced under a live primary (tests do this; so do
        // restores): the old capture state describes another file. Drop it and start over.
        if !p.still_describes(path) {
            crate::logging::event(&format!("event=primary_detached db={path:?} reason=\"database file or log directory replaced\""));
            p.detach();
            *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::None;
        }
    }
    if !db.has_role() && remembered_role(path).is_some() {
        if let Err(e) = resume_role_locked(&db) {
            crate::logging::event(&format!(
                "event=resume_failed db={path:?} error={:?}",
                e.to_string()
            ));
        }
    }
    drop(_g);
    db
}

/// Veto a PRAGMA on a primary database (WAL.md §D.2 T4). Returns the error message to show.
pub fn pragma_veto(db: &Db, name: &str, value: Option<&str>) -> Option<String> {
    let role = if db.primary().is_some() {
        "primary"
    } else if db.replica().is_some() {
        "replica"
    } else {
        return None;
    };
    let v = value?
        .trim()
        .trim_matches(|c| c == '\'' || c == '"')
        .to_ascii_lowercase();
    if name.eq_ignore_ascii_case("locking_mode") && v == "exclusive" {
        return Some(format!(
            "sqlite-replica: PRAGMA locking_mode=EXCLUSIVE is refused on a {role}: exclusive mode \
             hides commits from replication and blocks the applier; keep locking_mode=NORMAL"
        ));
    }
    if name.eq_ignore_ascii_case("journal_mode") && v != "wal" {
        return Some(format!(
            "sqlite-replica: PRAGMA journal_mode={v} is refused on a {role}: replication needs WAL mode"
        ));
    }
    None
}

/// `repl_primary()`: make the database at `path` (opened through our VFS) a primary.
pub fn make_primary(db: &Arc<Db>) -> Result<Arc<Primary>> {
    let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = db.primary() {
        return Ok(p);
    }
    let p = Primary::attach(&db.path, true)?;
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Primary(p.clone());
    // From here on every commit of this process goes through the role's hooks.
    p.release_init_write();
    // What was captured while the role was being made (LSN 1 of a new lineage: the commits
    // made during its first snapshot) durable for replicas now, outside the write lock.
    p.flush();
    Ok(p)
}

/// Resume the role remembered on disk (the caller holds `attach_lock`).
fn resume_role_locked(db: &Arc<Db>) -> Result<()> {
    if db.has_role() {
        return Ok(());
    }
    if crate::replica::is_replica_dir(&db.path) {
        let r = Replica::attach(&db.path, false)?;
        *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Replica(r);
        return Ok(());
    }
    let dir = log_dir(&db.path);
    let meta = crate::txlog::Log::open(&dir, Default::default())?
        .meta()
        .clone();
    if meta.role == "primary" {
        let p = Primary::attach(&db.path, false)?;
        *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Primary(p);
    }
    Ok(())
}

/// `repl_sync()` on a database without a role: attach the replica role (creating its directory).
/// Undoes `make_replica` for a replica whose first sync failed before anything was applied
/// (the database file still empty): the role is dropped and `<db>-replica/` removed, so a
/// refused first `repl_sync()` leaves no files behind.
pub fn unmake_new_replica(db: &Arc<Db>) {
    let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
    let empty = std::fs::metadata(&db.path).map_or(true, |m| m.len() == 0);
    if !empty || db.replica().is_none() {
        return;
    }
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::None;
    let _ = std::fs::remove_dir_all(log_dir(&db.path));
}

pub fn make_replica(db: &Arc<Db>) -> Result<Arc<Replica>> {
    let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = db.replica() {
        return Ok(r);
    }
    let r = Replica::attach(&db.path, true)?;
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Replica(r.clone());
    Ok(r)
}

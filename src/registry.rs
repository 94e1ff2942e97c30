//! Per-process registry of databases opened through the VFS, keyed by the full path SQLite gives
//! the VFS. A `Db` carries the role (none / primary / replica) and the bookkeeping the VFS hooks share
//! across connections of this process: who holds the WAL write lock through the shim, and
//! whether every WAL write of this process has been synced.
//!
//! Invariant: a `Db` is never removed (the map is small and entries are cheap), so every
//! `Arc<Db>` handed to a file stays the one for its path.

use crate::error::Result;
use crate::primary::Primary;
use crate::replica::Replica;
use once_cell::sync::Lazy;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// Connections of this process that hold the WAL WRITE lock through the shim (0 or 1).
    pub write_holders: AtomicU32,
    /// Incremented before every WAL write made through the shim in this process.
    pub wal_write_seq: AtomicU64,
    /// The highest `wal_write_seq` known to be covered by a completed WAL sync.
    pub wal_synced_seq: AtomicU64,
    /// Serialises attaching a role (first open, repl_primary).
    pub attach_lock: Mutex<()>,
}

static DBS: Lazy<Mutex<HashMap<String, Arc<Db>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// The directory holding the replication log of `db_path`.
pub fn log_dir(db_path: &str) -> PathBuf {
    PathBuf::from(format!("{db_path}-replica"))
}

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

    /// True when all WAL writes made through this process are covered by a sync.
    pub fn wal_synced(&self) -> bool {
        self.wal_synced_seq.load(Ordering::Acquire) >= self.wal_write_seq.load(Ordering::Acquire)
    }
}

/// Find the entry for `path` without creating one.
pub fn lookup(path: &str) -> Option<Arc<Db>> {
    DBS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .cloned()
}

/// The entry for `path`, created on first use.
pub fn get_or_create(path: &str) -> Arc<Db> {
    let mut m = DBS.lock().unwrap_or_else(|e| e.into_inner());
    m.entry(path.to_string())
        .or_insert_with(|| {
            Arc::new(Db {
                path: path.to_string(),
                role: RwLock::new(Role::None),
                write_holders: AtomicU32::new(0),
                wal_write_seq: AtomicU64::new(0),
                wal_synced_seq: AtomicU64::new(0),
                attach_lock: Mutex::new(()),
            })
        })
        .clone()
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
    let db = get_or_create(path);
    if let Some(p) = db.primary() {
        // The files were deleted or replaced under a live primary (tests do this; so do
        // restores): the old capture state describes another file. Drop it and start over.
        if !p.still_describes(path) {
            crate::logging::event(&format!("event=primary_detached db={path:?} reason=\"database file or log directory replaced\""));
            p.stop();
            *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::None;
        }
    }
    if !db.has_role() && remembered_role(path).is_some() {
        if let Err(e) = resume_role(&db) {
            crate::logging::event(&format!(
                "event=resume_failed db={path:?} error={:?}",
                e.to_string()
            ));
        }
    }
    db
}

fn resume_role(db: &Arc<Db>) -> Result<()> {
    let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
    if db.has_role() {
        return Ok(());
    }
    if crate::replica::is_replica_dir(&db.path) {
        let r = Replica::attach(db, false)?;
        *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Replica(r);
        return Ok(());
    }
    let dir = log_dir(&db.path);
    let meta = crate::txlog::Log::open(&dir, Default::default())?
        .meta()
        .clone();
    if meta.role == "primary" {
        let p = Primary::attach(db, false)?;
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
    let r = Replica::attach(db, true)?;
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Replica(r.clone());
    Ok(r)
}

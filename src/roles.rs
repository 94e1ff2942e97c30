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

    fn read_only(&self) -> bool {
        match &*self.role.read().unwrap_or_else(|e| e.into_inner()) {
            Role::Replica(_) => true,
            // A deposed primary (a newer epoch is known: primary/fence.rs) refuses writes like
            // a replica, and stays a primary for capture (its claimed records still append).
            Role::Primary(p) => p.is_fenced(),
            Role::None => false,
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

    fn checkpoint_handoff(&self, mx_frame: u32) -> bool {
        self.primary()
            .is_some_and(|p| p.checkpoint_handoff(mx_frame))
    }

    fn background_may_hold_write(&self) -> bool {
        self.primary()
            .is_some_and(|p| p.background_may_hold_write())
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
            Role::Replica(r) => r.release(),
            Role::None => {}
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

/// `repl_promote()`: the replica attached to `db` becomes the primary of the next epoch
/// (`Replica::promote` prepares its directory; here the roles are swapped). The primary
/// resumes capture from the directory like any reopened primary.
pub fn promote(
    db: &Arc<Db>,
    force: bool,
    epoch: Option<crate::types::Epoch>,
) -> Result<(Arc<Primary>, crate::replica::Promoted)> {
    let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
    let r = db.replica().ok_or_else(|| {
        crate::error::Error::Misuse(format!(
            "repl_promote(): {} is not a replica; only a replica can be promoted",
            db.path
        ))
    })?;
    let done = r.promote(force, epoch)?;
    // The primary's agent handle (its SHARED lock) before the replica's handle and applier
    // connection close: otherwise that close may be the last one and checkpoint and reset
    // the WAL, which capture would have to take for a gap (a new generation).
    let p = Primary::attach(&db.path, false).map_err(|e| {
        crate::error::Error::Other(format!(
            "repl_promote(): {} was promoted to epoch {} (its log directory is a primary's now) but \
             capture could not start: {e}; reopen the database to resume it",
            db.path, done.epoch
        ))
    })?;
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Primary(p.clone());
    drop(r);
    Ok((p, done))
}

/// After a promotion: tell the former primary it was deposed, when it can be reached (a
/// request carrying the new epoch makes its server raise its fence; a directory source gets
/// its fence file written). Best effort: a primary that is down learns it from the first
/// follower or from `repl_sync()` pointed at the new primary.
pub fn notify_former(done: &crate::replica::Promoted, new_primary: &str) {
    let Some(spec) = &done.former else {
        return;
    };
    let fence = crate::txlog::Fence {
        epoch: done.epoch,
        primary: Some(new_primary.to_string()),
        seen_ms: crate::util::now_ms(),
    };
    let r = spec.open().and_then(|src| {
        if let Some(dir) = src.log_dir() {
            crate::txlog::raise_fence(dir, &fence)?;
            crate::transport::notify::fenced(dir);
            return Ok(());
        }
        src.set_epoch(done.epoch, Some(new_primary));
        // Answered 409 by a server that learns it was deposed: that is the point.
        match src.info() {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("409") => Ok(()),
            Err(e) => Err(e),
        }
    });
    if let Err(e) = r {
        crate::logging::event(&format!(
            "event=promote_notify_failed former={:?} epoch={} error={:?}",
            spec.to_string(),
            done.epoch,
            e.to_string()
        ));
    }
}

/// `repl_sync(source)` / `repl_follow(source)` on a primary: when `source` is a primary of the
/// same lineage and a newer epoch, this primary was deposed and comes back as its replica.
/// Its records after the new epoch's start (its unreplicated tail) are reported and kept in
/// `<db>-replica/orphaned-<epoch>-<first lsn>/` with an `orphaned.json` (FORMAT.md §2); a
/// primary whose state is exactly the new epoch's start continues from it without a
/// re-snapshot. `Ok(false)`: not deposed by `source` (nothing was changed).
pub fn rejoin_as_replica(db: &Arc<Db>, source: &str) -> Result<bool> {
    use crate::error::Error;
    let Some(p) = db.primary() else {
        return Ok(false);
    };
    let spec = crate::transport::SourceSpec::parse(source)?;
    let info = spec.open()?.info()?;
    if info.lineage != p.lineage() || info.epoch <= p.epoch() {
        return Ok(false);
    }
    let Some((start, start_sum)) = info.epoch_start else {
        return Err(Error::Corrupt(format!(
            "{spec} is a primary of epoch {} but does not say where its epoch starts; cannot rejoin",
            info.epoch
        )));
    };
    let old_epoch = p.epoch();
    let dir = p.dir().to_path_buf();
    // Every process of this primary stops writing first (fenced), then this one captures
    // nothing more: what the log holds now is the whole old history.
    crate::txlog::raise_fence(
        &dir,
        &crate::txlog::Fence {
            epoch: info.epoch,
            primary: Some(spec.to_string()),
            seen_ms: crate::util::now_ms(),
        },
    )?;
    crate::transport::notify::fenced(&dir);
    let (lsn, generation, sum) = p.position_summary()?;
    let _g = db.attach_lock.lock().unwrap_or_else(|e| e.into_inner());
    p.detach();
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::None;
    drop(p);
    let same = lsn == start && sum == start_sum;
    let mut orphaned = None;
    let files = [
        "meta.json",
        "durable",
        "position",
        "log",
        "snap",
        "config.json",
        "fence",
        "init.lock",
        "maintenance.lock",
        "append.lock",
        "acks",
    ];
    if same {
        for f in files {
            let path = dir.join(f);
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    } else {
        let aside = dir.join(format!("orphaned-{old_epoch}-{}", start.0 + 1));
        std::fs::create_dir_all(&aside)
            .map_err(|e| Error::io(format!("creating {}", aside.display()), e))?;
        for f in files {
            let from = dir.join(f);
            if from.exists() {
                std::fs::rename(&from, aside.join(f))
                    .map_err(|e| Error::io(format!("moving {} aside", from.display()), e))?;
            }
        }
        let (first, what) = if lsn > start {
            (start.0 + 1, "records this primary wrote after the new epoch started, which the new primary never got")
        } else {
            (
                lsn.0,
                "this primary's state at the new epoch's start differs from the new primary's",
            )
        };
        let report = serde_json::json!({
            "epoch": old_epoch.0,
            "first_lsn": first,
            "last_lsn": lsn.0,
            "checksum": sum.to_string(),
            "new_epoch": info.epoch.0,
            "new_epoch_start_lsn": start.0,
            "new_primary": spec.to_string(),
            "what": what,
            "files": "log/ holds the segments (sqlite-replica verify/rebuild read them); snap/ the snapshots",
        });
        crate::txlog::write_file_synced(
            &aside.join("orphaned.json"),
            report.to_string().as_bytes(),
        )?;
        let mut shown = report;
        shown["dir"] = serde_json::json!(aside.display().to_string());
        orphaned = Some(shown);
        crate::logging::event(&format!(
            "event=orphaned_tail db={:?} epoch={old_epoch} first_lsn={first} last_lsn={lsn} new_epoch={} new_epoch_start_lsn={start} dir={:?}",
            db.path,
            info.epoch,
            aside.display().to_string()
        ));
    }
    crate::txlog::sync_dir(&dir)?;
    let r = Replica::attach(&db.path, true)?;
    if same {
        r.start_from(start, generation, sum)?;
    } else if let Some(report) = orphaned {
        r.note_orphaned(report)?;
    }
    crate::logging::event(&format!(
        "event=primary_rejoined db={:?} epoch={old_epoch} new_epoch={} new_primary={:?} lsn={lsn} resnapshot={}",
        db.path,
        info.epoch,
        spec.to_string(),
        !same
    ));
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Replica(r);
    Ok(true)
}

//! The replica role (WAL.md §E): one `Replica` per database per process. `repl_sync()` pulls
//! records from a `Source` and the applier writes them into the replica's own WAL and
//! wal-index exactly as SQLite's writer would, so readers in any process keep their
//! snapshots and never wait for a sync.
//!
//! Files in `<db>-replica/`: `replica.json` (role, source, lineage), `applied` (the recorded
//! position, see `position.rs`), `applier.lock` (an flock held by the process that applies,
//! so two syncing processes take turns instead of mistaking each other for foreign writers).
//!
//! Invariants: the in-memory checksums (`sums`) equal the live content at `lsn` whenever
//! `loaded`; every batch is verified against the primary's checksum *before* it is written;
//! a state that matches neither the recorded position nor its intent, a foreign write, or an
//! LSN older than the source retains is answered with a re-snapshot applied as one WAL
//! transaction (E.10), never with a guess.
//!
//! Files by responsibility: `source.rs` (which primary, `replica.json`, lineage and page-size
//! checks, snapshot download), `bootstrap.rs` (E.1 bootstrap, E.10 re-snapshot), `download.rs`
//! (the resumable download of a snapshot file into `snapshot.part`), `live.rs`
//! (the sync loop, load by content, one batch = one commit), `plan.rs` and `apply.rs` (the
//! pure batch plan and the WAL writer), `drain.rs` (checkpoints, E.6 drain), `follow.rs` (the
//! follower, a state machine on the HTTP engine's workers), `wait.rs` (`repl_wait`, `repl_exec`), `status.rs` (queries),
//! `position.rs` (the applied position file). This file holds the role's state, `attach` and
//! the sync entry points under the applier lock.

mod apply;
mod bootstrap;
mod download;
pub use bootstrap::bootstrap_pending;
pub use promote::Promoted;
mod drain;
mod epoch;
mod follow;
mod live;
mod plan;
mod position;
mod promote;
mod source;
mod status;
mod wait;

use crate::error::{Error, Result};
use crate::ffi::conn::OwnedDb;
use crate::transport::{self, Source, SourceSpec};
use crate::txlog::DbChecksum;
use crate::types::{Generation, Lsn, PageSize};
use crate::util::now_ms;
use crate::vfs::AgentHandle;
use crate::wal::WalIndexHeader;
use position::PositionFile;
use source::{write_meta, Given, ReplicaMeta};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Page bytes fetched per batch (one replica commit).
const BATCH_BYTES: usize = 32 << 20;
/// How long the applier waits for the WAL write lock before reporting busy.
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(5);

struct State {
    meta: ReplicaMeta,
    /// The source opened for `meta.source` (the one handle syncs fetch through).
    source: Option<Box<dyn Source>>,
    // ---- the applier: what the live content is, and the handles it writes through ----
    loaded: bool,
    /// The live state is not a state of the primary (divergence, foreign write): re-snapshot.
    diverged: Option<String>,
    lsn: Lsn,
    generation: Generation,
    sums: DbChecksum,
    page_size: Option<PageSize>,
    last_hdr: Option<WalIndexHeader>,
    seen_seq: u64,
    wal: Option<File>,
    ckpt: Option<OwnedDb>,
    /// What `repl_status()` reports (and the drain's memory of a pinned WAL).
    stats: Stats,
    /// The source is the primary of a newer epoch (epoch, where its history starts): handled
    /// once the live state is loaded (`epoch::switch_epoch`).
    pending_epoch: Option<(crate::types::Epoch, Option<(Lsn, crate::types::Checksum)>)>,
}

/// Counters and last-seen values shown by `repl_status()`.
#[derive(Default)]
struct Stats {
    last_error: Option<String>,
    last_sync_ms: Option<u64>,
    primary_lsn: Option<Lsn>,
    last_record_ms: Option<u64>,
    batches: u64,
    resnapshots: u64,
    foreign_writes: u64,
    checkpoints: u64,
    restarts_seen: u64,
    /// (first LSN, last LSN, pages, contained a snapshot) of the last batch written.
    last_batch: Option<(Lsn, Lsn, usize, bool)>,
    primary_first_lsn: Option<Lsn>,
    drains: u64,
    /// Longest successful drain (the lag a drain adds to one sync).
    max_drain_ms: u64,
    /// Set when the last drain timed out: a reader held the WAL longer than the drain timeout.
    wal_pinned: Option<String>,
}

pub struct Replica {
    db_path: String,
    dir: PathBuf,
    handle: AgentHandle,
    pos: PositionFile,
    lock_file: File,
    state: Mutex<State>,
    /// Serialises appliers of this process (see `applier_lock`).
    applier_mx: Mutex<()>,
    /// The newest LSN a sync in this process reached; `repl_wait` waits on `applied_cv`.
    applied: Mutex<Lsn>,
    applied_cv: std::sync::Condvar,
    /// The source handle shared by the follower, `repl_wait` and `repl_exec` (opened once per
    /// source; forgotten after a failed fetch so that the next user reopens it). Syncs use
    /// `State::source`, under the state mutex.
    shared_source: Mutex<Option<(SourceSpec, Arc<dyn Source>)>>,
    /// The background follower (`repl_follow`), when running.
    follower: Mutex<Option<follow::Follower>>,
    /// Bytes done / total of a bootstrap or re-snapshot in progress (readable while the
    /// sync holds `state`).
    progress: Mutex<Option<Progress>>,
    /// What the queries (`repl_lsn`, `repl_status`, `repl_wait`, `repl_exec`) read while a
    /// sync holds `state`, possibly for as long as a stalled network makes it: refreshed at the
    /// end of every sync, so no query ever waits for the network.
    published: Mutex<Published>,
    /// Network requests in flight by a sync that holds `state` (see `network_call`).
    network: std::sync::atomic::AtomicUsize,
    /// The newest epoch seen and where (`replica.json`), for sources opened outside a sync.
    seen_epoch: Mutex<(crate::types::Epoch, Option<String>)>,
}

/// Marks a network request made while holding `state` (queries then answer from `published`
/// instead of waiting for it).
pub(super) struct NetworkCall<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for NetworkCall<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The replica as its last finished sync left it (see `Replica::published`).
#[derive(Clone, Default)]
pub(super) struct Published {
    pub(super) source: Option<SourceSpec>,
    pub(super) lineage: Option<String>,
    /// The LSN the state was at.
    pub(super) lsn: Lsn,
    /// `repl_status()` as of that moment.
    pub(super) status: Option<serde_json::Value>,
}

/// A follower's batch: what the source said about itself and the records it sent.
type Followed = (transport::SourceInfo, Vec<crate::txlog::Record>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A snapshot download in progress: phase, bytes of the snapshot file done and total, and
/// where (`base`) and when this transfer started (a resumed bootstrap starts past 0), for the
/// rate and ETA of `repl_status()` and the progress events.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Progress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
    pub base: u64,
    pub started: Instant,
}

impl Progress {
    /// (bytes per second, ETA in ms) of this transfer so far (`util::rate_eta`).
    pub fn rate_eta(&self) -> (u64, Option<u64>) {
        let ms = self.started.elapsed().as_millis() as u64;
        crate::util::rate_eta(self.done, self.base, self.total, ms)
    }

    pub fn json(&self) -> serde_json::Value {
        let (rate, eta) = self.rate_eta();
        serde_json::json!({"phase": self.phase, "bytes": self.done, "total": self.total,
                           "rate_bytes_s": rate, "eta_ms": eta, "resumed_at": self.base})
    }
}

fn log_event(line: &str) {
    crate::logging::event(line);
}

/// Refuse a sync before anything is written when this process cannot write the files the
/// applier writes: the database (bootstrap, checkpoints), its `-wal` and `-shm` (the appended
/// commits, the wal-index) and `<db>-replica/applied` (the position). Missing ones are
/// created later and need no check here.
pub fn check_writable(db_path: &str) -> Result<()> {
    let applied = crate::txlog::log_dir(db_path).join("applied");
    let files = [
        PathBuf::from(db_path),
        PathBuf::from(format!("{db_path}-wal")),
        PathBuf::from(format!("{db_path}-shm")),
        applied,
    ];
    let denied: Vec<String> = files
        .iter()
        .filter_map(|p| match crate::sys::check_writable(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Some(format!("{} ({e})", p.display()))
            }
            _ => None,
        })
        .collect();
    if denied.is_empty() {
        return Ok(());
    }
    Err(Error::ReadOnly(format!(
        "repl_sync(): the replica's files are read-only for this process: {}; nothing was changed \
         and {db_path} can still be read. To sync, make them writable by this user \
         (chmod u+w / chown, or remount read-write), or call repl_sync() from a process that may write them",
        denied.join(", ")
    )))
}

/// Does `<db>-replica/replica.json` exist (the database is a replica)?
pub fn is_replica_dir(db_path: &str) -> bool {
    crate::txlog::log_dir(db_path).join("replica.json").exists()
}

impl Replica {
    /// The role ends in this process (its last connection closed, nothing follows): close
    /// the applier's handle now, in this thread, not with the last reference, which a
    /// background thread may hold after the application called `sqlite3_shutdown()`.
    pub fn release(&self) {
        self.handle.close();
    }

    /// Attach the replica role to the database at `db_path` (creating
    /// `<db>-replica/replica.json` when `create`).
    pub fn attach(db_path: &str, create: bool) -> Result<Arc<Replica>> {
        let dir = crate::txlog::log_dir(db_path);
        let meta_path = dir.join("replica.json");
        let meta = if meta_path.exists() {
            let text = std::fs::read_to_string(&meta_path)
                .map_err(|e| Error::io(format!("reading {}", meta_path.display()), e))?;
            ReplicaMeta::from_json(&text).ok_or_else(|| {
                Error::Corrupt(format!(
                    "{} is not valid replica metadata; remove {} to start the replica over",
                    meta_path.display(),
                    meta_path
                        .parent()
                        .map_or(String::new(), |d| d.display().to_string())
                ))
            })?
        } else if create {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let m = ReplicaMeta {
                format: 1,
                role: "replica".into(),
                source: None,
                lineage: None,
                created_ms: now_ms(),
                epoch: crate::types::Epoch::FIRST,
                epoch_primary: None,
                orphaned: None,
            };
            write_meta(&dir, &m)?;
            m
        } else {
            return Err(Error::Other(format!("{db_path} is not a replica")));
        };
        let handle = open_handle(db_path)?;
        let pos = PositionFile::open(&dir)?;
        let lp = dir.join("applier.lock");
        // Read-only when this process may not write it (flock works on any descriptor):
        // the role then still resumes for reading, and `sync` refuses with the reason.
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lp)
            .or_else(|e| File::open(&lp).map_err(|_| e))
            .map_err(|e| Error::io(format!("opening {}", lp.display()), e))?;
        Ok(Arc::new(Replica {
            db_path: db_path.to_string(),
            dir,
            handle,
            pos,
            lock_file,
            applier_mx: Mutex::new(()),
            applied: Mutex::new(Lsn(0)),
            applied_cv: std::sync::Condvar::new(),
            follower: Mutex::new(None),
            shared_source: Mutex::new(None),
            progress: Mutex::new(None),
            network: std::sync::atomic::AtomicUsize::new(0),
            seen_epoch: Mutex::new((meta.epoch, meta.epoch_primary.clone())),
            published: Mutex::new(Published {
                source: meta.source.clone(),
                lineage: meta.lineage.clone(),
                lsn: Lsn(0),
                status: None,
            }),
            state: Mutex::new(State {
                meta,
                source: None,
                loaded: false,
                diverged: None,
                lsn: Lsn(0),
                generation: Generation(0),
                sums: DbChecksum::new(PageSize::new(4096).expect("valid")),
                page_size: None,
                last_hdr: None,
                seen_seq: 0,
                wal: None,
                ckpt: None,
                stats: Stats::default(),
                pending_epoch: None,
            }),
        }))
    }

    /// `repl_sync([source])`: pull and apply everything the source has now; returns the LSN.
    pub fn sync(&self, source: Option<&str>) -> Result<Lsn> {
        self.sync_inner(source.map(Given::Text), None)
    }

    /// `repl_sync(spec)` with the source already opened by the caller (a first sync checks
    /// it answers before creating the replica's files: it is then not opened twice).
    pub fn sync_opened(&self, spec: SourceSpec, opened: Box<dyn Source>) -> Result<Lsn> {
        self.sync_inner(Some(Given::Opened(spec, opened)), None)
    }

    /// The handle shared by the follower, `repl_wait` and `repl_exec` for `spec`.
    pub(super) fn shared_source(&self, spec: &SourceSpec) -> Result<Arc<dyn Source>> {
        let mut g = lock(&self.shared_source);
        if let Some((_, src)) = g.as_ref().filter(|(s, _)| s == spec) {
            return Ok(src.clone());
        }
        let src: Arc<dyn Source> = Arc::from(spec.open()?);
        let (e, p) = lock(&self.seen_epoch).clone();
        src.set_epoch(e, p.as_deref());
        *g = Some((spec.clone(), src.clone()));
        Ok(src)
    }

    /// After a failed fetch through `src`: the next user of the shared handle reopens it.
    pub(super) fn forget_shared_source(&self, src: &Arc<dyn Source>) {
        let mut g = lock(&self.shared_source);
        if g.as_ref().is_some_and(|(_, s)| Arc::ptr_eq(s, src)) {
            *g = None;
        }
    }

    /// What a follower received: `records` (from the replica's next LSN) and `info`, which
    /// it asked the source for itself. Applied without any request to the source while the
    /// applier lock and the state mutex are held, so a stalled primary never blocks
    /// `repl_lsn()`, `repl_status()` or `repl_wait()` (they take the state mutex). Records
    /// that no longer fit are dropped (the follower's next poll fetches them again).
    pub fn apply_fetched(
        &self,
        info: transport::SourceInfo,
        records: Vec<crate::txlog::Record>,
    ) -> Result<Lsn> {
        self.sync_inner(None, Some((info, records)))
    }

    fn sync_inner(&self, source: Option<Given<'_>>, followed: Option<Followed>) -> Result<Lsn> {
        let _applier = self.applier_lock()?;
        let mut st = lock(&self.state);
        let r = check_writable(&self.db_path)
            .and_then(|()| self.sync_locked(&mut st, source, followed));
        st.stats.last_sync_ms = Some(now_ms());
        match &r {
            Ok(lsn) => {
                st.stats.last_error = None;
                let mut a = lock(&self.applied);
                *a = *lsn;
                self.applied_cv.notify_all();
            }
            Err(e) => st.stats.last_error = Some(e.to_string()),
        }
        self.publish(&st);
        r
    }

    /// Publish `st` and mark a network request until the returned guard drops: queries do
    /// not wait for a sync stuck on the network.
    fn network_call(&self, st: &State) -> NetworkCall<'_> {
        self.publish(st);
        self.network
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        NetworkCall(&self.network)
    }

    /// The state for a query: waits while a sync works locally (applying, which is bounded
    /// and keeps the answers consistent with each other), None while that sync waits for the
    /// network or downloads a snapshot (then the query answers from `published`).
    fn state_for_query(&self) -> Option<std::sync::MutexGuard<'_, State>> {
        loop {
            match self.state.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if self.network.load(std::sync::atomic::Ordering::Acquire) > 0
                || lock(&self.progress).is_some()
            {
                return None;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Copy what queries need out of `st` (see `published`).
    fn publish(&self, st: &State) {
        let status = self.status_from(st);
        *lock(&self.published) = Published {
            source: st.meta.source.clone(),
            lineage: st.meta.lineage.clone(),
            lsn: if st.loaded { st.lsn } else { Lsn(0) },
            status: Some(status),
        };
    }

    /// Records an error met outside a sync (a follower's failed long-poll). Never waits: the
    /// follower runs on a shared worker, and a sync may hold the state while it waits for the
    /// network; then the error shows in `repl_status().follow` only.
    pub(crate) fn note_error(&self, e: &Error) {
        let st = match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(mut st) = st {
            st.stats.last_error = Some(e.to_string());
        }
    }

    /// A `repl_sync()` refused before it reached `sync` (a read-only connection): shown by
    /// `repl_status()` like any failed sync.
    pub fn note_refused_sync(&self, e: &Error) {
        let mut st = lock(&self.state);
        st.stats.last_sync_ms = Some(now_ms());
        st.stats.last_error = Some(e.to_string());
    }

    fn applier_lock(&self) -> Result<ApplierGuard<'_>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Threads of this process first: an flock is shared by every thread using the same
        // open file, so it alone would not keep a follower (on an engine worker) and a repl_sync() on
        // another connection apart (and the first to finish would unlock it for both).
        let local = loop {
            match self.applier_mx.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if Instant::now() > deadline {
                return Err(Error::Busy(format!(
                    "another connection of this process has been applying to {} for 30 s; retry later",
                    self.db_path
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        loop {
            match self.lock_file.try_lock() {
                Ok(()) => return Ok(ApplierGuard(&self.lock_file, local)),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io("locking applier.lock", e))
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Busy(format!(
                    "another process has been applying to {} for 30 s; retry repl_sync() later",
                    self.db_path
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn sync_locked(
        &self,
        st: &mut State,
        spec: Option<Given<'_>>,
        followed: Option<Followed>,
    ) -> Result<Lsn> {
        // A follower's batch: apply only the records given, with the info it came with; no
        // request to the source while the locks are held.
        let only_prefetched = followed.is_some();
        let (known, prefetched) = followed.unzip();
        if !self.dir.join("replica.json").exists() && self.dir.join("meta.json").exists() {
            // Promoted by another process (repl_promote): this process's replica role is
            // stale and must not apply anything on top of the new primary's writes.
            return Err(Error::Misuse(format!(
                "{} was promoted to a primary (by another process): this connection still sees it as                  a replica; nothing was applied. Reopen the database",
                self.db_path
            )));
        }
        self.open_source(st, spec)?;
        self.check_source(st, known)?;
        if self.pos.read().is_none()
            && (self.handle.db_size()? == 0 || bootstrap::bootstrap_pending(&self.db_path))
        {
            self.bootstrap(st)?;
            // A new replica starts with its source's epoch: nothing to compare.
            if let Some((e, _)) = st.pending_epoch {
                self.adopt_epoch(st, e)?;
            }
        }
        self.ensure_open(st)?;
        if self.pos.read().map(|a| a.seq) != Some(st.seen_seq) {
            st.loaded = false; // another process applied since we last looked
        }
        self.apply_available(st, prefetched, only_prefetched)?;
        // The source serves only durable records: its durable LSN is at least what was
        // applied, also when it moved on between the info above and the fetches.
        if st.stats.primary_lsn.is_some_and(|p| p < st.lsn) {
            st.stats.primary_lsn = Some(st.lsn);
        }
        self.maybe_checkpoint(st);
        Ok(st.lsn)
    }
}

/// The applier's handle takes SHARED on the database. The last connection to close (any
/// process, e.g. a stock reader) holds it EXCLUSIVE for a moment while it checkpoints and
/// deletes the WAL: wait that out. Failing here would leave the connection being opened
/// without the replica role — not read-only, and "not a replica" to repl_sync().
fn open_handle(path: &str) -> Result<AgentHandle> {
    let deadline = Instant::now() + WRITE_LOCK_WAIT;
    loop {
        match AgentHandle::open(path) {
            Err(Error::Busy(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            r => return r,
        }
    }
}

/// The applier flock and this process's applier mutex; the flock is released first.
struct ApplierGuard<'a>(&'a File, #[allow(dead_code)] std::sync::MutexGuard<'a, ()>);

impl Drop for ApplierGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

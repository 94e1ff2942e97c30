//! The replica role (wal-spec E): one `Replica` per database per process. `repl_sync()` pulls
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

mod apply;
mod follow;
mod plan;
mod position;

pub use apply::{append_commit, ApplyError};
pub use plan::{plan_batch, BatchPlan, PlanError};

use crate::error::{Error, Result};
use crate::ffi::conn::OwnedDb;
use crate::transport::{self, Fetch, Source};
use crate::txlog::DbChecksum;
use crate::types::{Checksum, Generation, Lsn, PageNo, PageSize};
use crate::vfs::{AgentHandle, LiveShm};
use crate::wal::{
    self, hash_lookup_checked, shm_read_header, WalIndexHeader, SLOT_READ1, SLOT_WRITE,
};
use position::{Applied, PositionFile};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Page bytes fetched per batch (one replica commit).
const BATCH_BYTES: usize = 32 << 20;
/// Drain (E.6): past `REPL_DRAIN_FRAMES` frames (default 4000) the applier stops appending
/// until a checkpoint has backfilled everything and no reader pins the WAL, so the next batch
/// restarts it. It waits at most `REPL_DRAIN_TIMEOUT_MS` (default 2000) for readers, then
/// reports the pinned WAL and goes on appending; while the WAL stays pinned, later syncs only
/// make one attempt each (no wait), so a long reader costs replication lag only once.
/// A PASSIVE checkpoint runs after every batch once the WAL holds a quarter of that.
struct DrainPolicy {
    frames: u32,
    timeout: Duration,
}

fn drain_policy() -> &'static DrainPolicy {
    static P: once_cell::sync::Lazy<DrainPolicy> = once_cell::sync::Lazy::new(|| {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        DrainPolicy {
            frames: env("REPL_DRAIN_FRAMES").map_or(4000, |v| v.clamp(16, u32::MAX as u64) as u32),
            timeout: Duration::from_millis(env("REPL_DRAIN_TIMEOUT_MS").unwrap_or(2000)),
        }
    });
    &P
}
/// How long the applier waits for the WAL write lock before reporting busy.
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
struct ReplicaMeta {
    format: u32,
    role: String,
    source: Option<String>,
    lineage: Option<String>,
    created_ms: u64,
}

struct State {
    meta: ReplicaMeta,
    source: Option<Box<dyn Source>>,
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
    /// The source forwarded writes go to (`repl_exec`), kept open between calls.
    exec_source: Mutex<Option<(String, Box<dyn Source>)>>,
    /// The background follower (`repl_follow`), when running.
    follower: Mutex<Option<follow::Follower>>,
    /// Bytes done / total of a bootstrap or re-snapshot in progress (readable while the
    /// sync holds `state`).
    progress: Mutex<Option<(&'static str, u64, u64)>>,
}

/// A follower's batch: what the source said about itself and the records it sent.
type Followed = (transport::SourceInfo, Vec<crate::txlog::Record>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn log_event(line: &str) {
    eprintln!("{line}");
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
            exec_source: Mutex::new(None),
            progress: Mutex::new(None),
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
                last_error: None,
                last_sync_ms: None,
                primary_lsn: None,
                last_record_ms: None,
                batches: 0,
                resnapshots: 0,
                foreign_writes: 0,
                checkpoints: 0,
                restarts_seen: 0,
                last_batch: None,
                primary_first_lsn: None,
                drains: 0,
                max_drain_ms: 0,
                wal_pinned: None,
            }),
        }))
    }

    /// `repl_sync([source])`: pull and apply everything the source has now; returns the LSN.
    pub fn sync(&self, source: Option<&str>) -> Result<Lsn> {
        self.sync_inner(source, None)
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

    fn sync_inner(&self, source: Option<&str>, followed: Option<Followed>) -> Result<Lsn> {
        let _applier = self.applier_lock()?;
        let mut st = lock(&self.state);
        let r = check_writable(&self.db_path)
            .and_then(|()| self.sync_locked(&mut st, source, followed));
        st.last_sync_ms = Some(now_ms());
        match &r {
            Ok(lsn) => {
                st.last_error = None;
                let mut a = lock(&self.applied);
                *a = *lsn;
                self.applied_cv.notify_all();
            }
            Err(e) => st.last_error = Some(e.to_string()),
        }
        r
    }

    /// Records an error met outside a sync (a follower's failed long-poll).
    pub(crate) fn note_error(&self, e: &Error) {
        lock(&self.state).last_error = Some(e.to_string());
    }

    /// A `repl_sync()` refused before it reached `sync` (a read-only connection): shown by
    /// `repl_status()` like any failed sync.
    pub fn note_refused_sync(&self, e: &Error) {
        let mut st = lock(&self.state);
        st.last_sync_ms = Some(now_ms());
        st.last_error = Some(e.to_string());
    }

    fn applier_lock(&self) -> Result<ApplierGuard<'_>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Threads of this process first: an flock is shared by every thread using the same
        // open file, so it alone would not keep a follower thread and a repl_sync() on
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
        spec: Option<&str>,
        followed: Option<Followed>,
    ) -> Result<Lsn> {
        // A follower's batch: apply only the records given, with the info it came with; no
        // request to the source while the locks are held.
        let only_prefetched = followed.is_some();
        let (known, mut prefetched) = followed.unzip();
        if let Some(spec) = spec {
            if st.meta.source.as_deref() != Some(spec) || st.source.is_none() {
                let src = transport::open_source(spec)?;
                let info = src.info()?;
                if let Some(l) = &st.meta.lineage {
                    if *l != info.lineage {
                        // Say so when the page sizes differ too: that alone rules the file out.
                        let sizes = match (src.page_size().ok().flatten(), self.file_page_size()) {
                            (Some(theirs), Some(ours)) if theirs != ours => {
                                format!(" and its page size is {theirs}, this replica's {ours}")
                            }
                            _ => String::new(),
                        };
                        return Err(Error::Misuse(format!(
                            "repl_sync('{}'): that primary serves lineage {}{sizes} but {} replicates lineage {l} \
                             (from {}); a replica follows one primary: use a new database file for another one",
                            transport::http::redact(spec),
                            info.lineage,
                            self.db_path,
                            st.meta.source.as_deref().map_or("?".into(), transport::http::redact)
                        )));
                    }
                }
                st.meta.source = Some(spec.to_string());
                st.meta.lineage = Some(info.lineage);
                write_meta(&self.dir, &st.meta)?;
                st.source = Some(src);
            }
        }
        if st.source.is_none() {
            let Some(spec) = st.meta.source.clone() else {
                return Err(Error::Misuse(format!(
                    "repl_sync(): {} has no source yet; pass the primary, e.g. repl_sync('/path/to/primary.db')",
                    self.db_path
                )));
            };
            st.source = Some(transport::open_source(&spec)?);
        }
        let info = match known {
            Some(i) => i,
            None => st.source.as_ref().expect("set").info()?,
        };
        if st.meta.lineage.as_deref() != Some(info.lineage.as_str()) {
            return Err(Error::Misuse(format!(
                "the source now serves lineage {} but this replica follows {}: the primary was re-created; \
                 bootstrap a new replica file",
                info.lineage,
                st.meta.lineage.as_deref().unwrap_or("?")
            )));
        }
        st.primary_lsn = info.durable_lsn;
        st.primary_first_lsn = info.first_lsn;
        if self.handle.db_size()? == 0 && self.pos.read().is_none() {
            self.bootstrap(st)?;
        }
        self.ensure_open(st)?;
        if self.pos.read().map(|a| a.seq) != Some(st.seen_seq) {
            st.loaded = false; // another process applied since we last looked
        }
        loop {
            if !st.loaded {
                // First sync in this process, another applier moved on, or write_plan found
                // the WAL emptied behind us: derive the state from the live content first.
                self.load(st)?;
            }
            if let Some(why) = st.diverged.take() {
                if let Err(e) = self.resnapshot(st, &why) {
                    // The content is still not (known to be) the primary's, so the
                    // next sync must re-snapshot too (not apply on top of it).
                    st.diverged = Some(why);
                    return Err(e);
                }
                continue;
            }
            let pre = prefetched
                .take()
                .filter(|v| v.first().is_some_and(|r| r.meta.lsn == st.lsn.next()));
            let fetched = match pre {
                Some(v) => Fetch::Records(v),
                None if only_prefetched => break,
                None => st
                    .source
                    .as_ref()
                    .expect("set")
                    .fetch(st.lsn.next(), BATCH_BYTES)
                    .map_err(|e| self.damaged_source(st, e))?,
            };
            let records = match fetched {
                Fetch::Truncated { first_lsn } => {
                    let why = format!(
                        "replica is at LSN {} and the primary's log now starts at {first_lsn}",
                        st.lsn
                    );
                    self.resnapshot(st, &why)?;
                    continue;
                }
                Fetch::Records(r) if r.is_empty() => break,
                Fetch::Records(r) => r,
            };
            if let Some(r) = records
                .iter()
                .find(|r| Some(r.meta.page_size) != st.page_size)
            {
                return Err(self.page_size_changed(st, &r.meta));
            }
            self.maybe_drain(st);
            match plan_batch(st.lsn, st.generation, &mut st.sums, &records) {
                Ok(plan) => self.write_plan(st, &plan)?,
                Err(PlanError::Divergence(m)) => st.diverged = Some(m),
                Err(PlanError::Sequence(m)) => {
                    st.loaded = false;
                    return Err(Error::Corrupt(format!(
                        "{m}; the source's log is inconsistent"
                    )));
                }
            }
        }
        self.maybe_checkpoint(st);
        Ok(st.lsn)
    }

    /// E.1 bootstrap of an empty file: the snapshot written straight into the database file
    /// under an EXCLUSIVE lock (no reader can see it half-written: page 1, which makes the
    /// file a database, is written last), then synced.
    /// Downloads the source's snapshot, reporting progress in `repl_status()` and, past a few
    /// MB, one log line per 10 %.
    fn fetch_snapshot(&self, st: &State, what: &'static str) -> Result<crate::txlog::Record> {
        let mut logged = 0u64;
        let r = st
            .source
            .as_ref()
            .expect("set")
            .snapshot_progress(&mut |done, total| {
                *lock(&self.progress) = Some((what, done, total));
                let step = (total / 10).max(8 << 20);
                if total >= 8 << 20 && (done >= logged + step || done == total) {
                    logged = done;
                    log_event(&format!(
                        "event=progress db={:?} phase={what:?} bytes={done} total={total}",
                        self.db_path
                    ));
                }
            });
        if r.is_err() {
            *lock(&self.progress) = None;
        }
        r
    }

    fn bootstrap(&self, st: &mut State) -> Result<()> {
        let snap = self.fetch_snapshot(st, "bootstrap download")?;
        let ps = snap.meta.page_size;
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self.handle.lock_db_exclusive() {
            if Instant::now() > deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = (|| -> Result<()> {
            if self.handle.db_size()? != 0 {
                return Err(Error::Busy(format!(
                    "{} was written by someone else while bootstrapping; retry",
                    self.db_path
                )));
            }
            // A stale WAL or wal-index next to an empty file would be recovered over the
            // snapshot: nobody can use them while we hold EXCLUSIVE.
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.db_path));
            }
            let total = snap.pages.len() as u64 * ps.get() as u64;
            for (i, p) in snap.pages.iter().filter(|p| p.pgno.get() != 1).enumerate() {
                self.handle
                    .write_db((p.pgno.get() as u64 - 1) * ps.get() as u64, &p.data)?;
                if i % 256 == 0 {
                    *lock(&self.progress) =
                        Some(("bootstrap write", i as u64 * ps.get() as u64, total));
                }
            }
            if let Some(p1) = snap.pages.iter().find(|p| p.pgno.get() == 1) {
                self.handle.write_db(0, &p1.data)?;
            }
            self.handle
                .truncate_db(snap.meta.commit_size as u64 * ps.get() as u64)?;
            self.handle.sync_db()
        })();
        self.handle.unlock_db_to_shared();
        *lock(&self.progress) = None;
        r?;
        let mut sums = DbChecksum::new(ps);
        sums.apply(&snap);
        if sums.total() != snap.meta.db_checksum {
            return Err(Error::Corrupt(format!(
                "snapshot LSN {}: pages do not match its checksum",
                snap.meta.lsn
            )));
        }
        let a = self.pos.write(&Applied {
            lsn: snap.meta.lsn,
            generation: snap.meta.generation,
            checksum: sums.total(),
            ..Default::default()
        })?;
        self.pos.sync()?;
        st.seen_seq = a.seq;
        st.sums = sums;
        st.lsn = snap.meta.lsn;
        st.generation = snap.meta.generation;
        st.page_size = Some(ps);
        st.loaded = true;
        st.last_hdr = None;
        st.last_record_ms = Some(snap.meta.timestamp_ms);
        log_event(&format!(
            "event=bootstrap db={:?} lsn={} pages={} bytes={}",
            self.db_path,
            snap.meta.lsn,
            snap.pages.len(),
            snap.pages.len() * ps.bytes()
        ));
        Ok(())
    }

    /// E.1 step 2: the applier's own SQLite connection (the host's underlying VFS, not ours)
    /// keeps the wal-index alive, runs stock recovery when needed and does the checkpoints.
    fn ensure_open(&self, st: &mut State) -> Result<()> {
        if st.ckpt.is_none() {
            let c = OwnedDb::open(
                &self.db_path,
                crate::ffi::SQLITE_OPEN_READWRITE,
                Some(crate::vfs::base_name_cstr()),
            )?;
            c.busy_timeout(5000);
            let mode = c.db().query_value("PRAGMA journal_mode")?;
            if mode != crate::ffi::conn::SqlValue::Text("wal".into()) {
                return Err(Error::Corrupt(format!(
                    "{} is not in WAL mode (journal_mode {mode:?}); a replica must be bootstrapped from the primary",
                    self.db_path
                )));
            }
            c.db().query_value("PRAGMA schema_version")?;
            st.ckpt = Some(c);
        }
        if st.wal.is_none() {
            let p = format!("{}-wal", self.db_path);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(|e| Error::io(format!("opening {p}"), e))?;
            st.wal = Some(f);
        }
        Ok(())
    }

    /// Run a read on the applier connection: performs stock recovery of an invalid wal-index.
    fn recover(&self, st: &State) {
        if let Some(c) = &st.ckpt {
            let _ = c.db().query_value("PRAGMA schema_version");
        }
    }

    /// Take WRITE through our handle (recovering an invalid header on the way).
    fn write_locked<'a>(&'a self, st: &State) -> Result<LiveShm<'a>> {
        let deadline = Instant::now() + WRITE_LOCK_WAIT;
        let mut pause = Duration::from_micros(100);
        loop {
            match self.handle.live_shm()? {
                Some(mut shm) => {
                    if shm.try_lock_exclusive(SLOT_WRITE, 1) {
                        if shm_read_header(&shm).is_some() {
                            return Ok(shm);
                        }
                        // Invalid header: release WRITE, let stock recovery rebuild it, and
                        // retry within the same deadline (never spin on a header that stays bad).
                        drop(shm);
                        self.recover(st);
                    }
                }
                None => self.recover(st),
            }
            if Instant::now() > deadline {
                return Err(Error::Busy(format!(
                    "the WAL write lock of {} has been busy, or its wal-index invalid, for {} s \
                     (a checkpoint, a foreign writer, or an unwritable -shm); retry",
                    self.db_path,
                    WRITE_LOCK_WAIT.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Recompute the checksums of the live content and decide which LSN it is (E.8).
    fn load(&self, st: &mut State) -> Result<()> {
        let shm = self.write_locked(st)?;
        let h =
            shm_read_header(&shm).ok_or_else(|| Error::Other("wal-index header invalid".into()))?;
        let wal = st.wal.as_ref().expect("opened");
        let mut head = [0u8; 100];
        read_page_into(
            &self.handle,
            &shm,
            wal,
            &h,
            PageNo::new(1).expect("1"),
            None,
            &mut head,
        )?;
        let ps = PageSize::from_db_header(&head).ok_or_else(|| {
            Error::Corrupt(format!("{}: bad page size in the header", self.db_path))
        })?;
        let n_page = if h.mx_frame > 0 {
            h.n_page
        } else {
            (self.handle.db_size()? / ps.get() as u64) as u32
        };
        let mut sums = DbChecksum::new(ps);
        let mut buf = vec![0u8; ps.bytes()];
        let lock_page = ps.lock_byte_page().get();
        for pg in 1..=n_page {
            if pg == lock_page {
                continue;
            }
            let p = PageNo::new(pg).expect("pg >= 1");
            read_page_into(&self.handle, &shm, wal, &h, p, Some(ps), &mut buf)?;
            sums.set_page(p, &buf);
        }
        sums.truncate(n_page);
        drop(shm);
        let a = self.pos.read().unwrap_or_default();
        st.seen_seq = a.seq;
        st.sums = sums;
        st.page_size = Some(ps);
        st.last_hdr = Some(h);
        st.loaded = true;
        let total = st.sums.total();
        if total == a.checksum && a.seq > 0 {
            st.lsn = a.lsn;
            st.generation = a.generation;
        } else if let Some((l, g, c)) = a.intent.filter(|i| i.2 == total) {
            st.lsn = l;
            st.generation = g;
            let w = self.pos.write(&Applied {
                lsn: l,
                generation: g,
                checksum: c,
                intent: None,
                seq: 0,
            })?;
            st.seen_seq = w.seq;
        } else {
            st.lsn = a.lsn;
            st.generation = a.generation;
            st.diverged = Some(format!(
                "the replica's content (checksum {total}) is neither LSN {} ({}) nor the batch in flight: \
                 it was modified outside the applier",
                a.lsn, a.checksum
            ));
        }
        Ok(())
    }

    fn resnapshot(&self, st: &mut State, why: &str) -> Result<()> {
        let snap = self.fetch_snapshot(st, "re-snapshot download");
        *lock(&self.progress) = None;
        let snap = snap?;
        // The newest snapshot may be older than what readers already saw (st.lsn): publishing
        // it alone would take them back in time (to an empty database when it is the LSN 0
        // snapshot). So the records after it up to at least st.lsn go into the same WAL
        // transaction, and readers switch from st.lsn to a state no older than it at once.
        let (snap_lsn, snap_gen) = (snap.meta.lsn, snap.meta.generation);
        let mut batch = vec![snap];
        while batch.last().expect("non-empty").meta.lsn.0 < st.lsn.0 {
            let next = batch.last().expect("non-empty").meta.lsn.next();
            let fetched = st
                .source
                .as_ref()
                .expect("set")
                .fetch(next, BATCH_BYTES)
                .map_err(|e| self.damaged_source(st, e))?;
            match fetched {
                Fetch::Records(r) if !r.is_empty() => batch.extend(r),
                _ => break, // the log moved past the snapshot meanwhile, or ends: as far as it goes
            }
        }
        if let Some(r) = batch
            .iter()
            .find(|r| Some(r.meta.page_size) != st.page_size)
        {
            return Err(self.page_size_changed(st, &r.meta));
        }
        log_event(&format!(
            "event=resnapshot db={:?} reason={why:?} from_lsn={} to_lsn={} snapshot_lsn={}",
            self.db_path,
            st.lsn,
            batch.last().expect("non-empty").meta.lsn,
            snap_lsn
        ));
        let mut sums = DbChecksum::new(batch[0].meta.page_size);
        let plan = plan_batch(
            Lsn(snap_lsn.0.saturating_sub(1)),
            snap_gen,
            &mut sums,
            &batch,
        )?;
        st.sums = sums;
        st.last_hdr = None; // whatever is in the WAL now, the snapshot overrides every page
        st.resnapshots += 1;
        self.write_plan(st, &plan)
    }

    /// The source now serves pages of another size than the replica's (the primary was
    /// VACUUMed with a new page_size and started a new generation). A WAL cannot change its
    /// page size, so nothing is written: the caller returns this before touching any file.
    fn page_size_changed(&self, st: &State, m: &crate::txlog::RecordMeta) -> Error {
        let src = st
            .meta
            .source
            .as_deref()
            .map_or("the primary".into(), transport::http::redact);
        Error::Unsupported(format!(
            "repl_sync(): the primary {src} now has a page size of {} (generation {} from LSN {}) \
             but this replica's page size is {}, and a replica cannot change its page size; \
             bootstrap a new replica into a new, empty file with repl_sync('{src}') and move readers to it. \
             {} was not changed: it still holds LSN {} and stays readable",
            m.page_size,
            m.generation,
            m.lsn,
            st.page_size.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
            self.db_path,
            st.lsn
        ))
    }

    /// A record the source cannot read back intact (the txlog decoder checks every record's
    /// checksum before it leaves the source): say which replica state is kept and what to do.
    fn damaged_source(&self, st: &State, e: Error) -> Error {
        let remote = st
            .source
            .as_ref()
            .is_some_and(|s| s.describe().starts_with("http://"));
        match e {
            // Over HTTP the bytes may have been damaged on the way (a retry fetches them
            // again) or be damaged in the primary's log: there is no local log path to check.
            Error::Corrupt(m) if remote => Error::Corrupt(format!(
                "repl_sync(): {m}. {} still holds LSN {} and stays readable. A transfer damaged on the \
                 way is fetched again by the next repl_sync(); if the error persists, the primary's log \
                 itself may be damaged: run sqlite-replica verify on the primary's <db>-replica directory",
                self.db_path, st.lsn
            )),
            Error::Corrupt(m) => Error::Corrupt(format!(
                "repl_sync(): the primary's log is damaged after LSN {lsn}: {m}. Nothing was applied: {} \
                 still holds LSN {lsn} and stays readable. Check the primary's storage \
                 (sqlite-replica verify {}); repl_sync() continues once the log reads back intact",
                self.db_path,
                st.source.as_ref().map_or_else(
                    || "<primary>-replica".to_string(),
                    |s| crate::txlog::log_dir(&s.describe()).display().to_string()
                ),
                lsn = st.lsn
            )),
            e => e,
        }
    }

    /// This replica's page size as its database file's header says (None: empty file).
    fn file_page_size(&self) -> Option<PageSize> {
        let mut head = [0u8; 100];
        crate::vfs::DbFileIo::read_db(&self.handle, 0, &mut head).ok()?;
        PageSize::from_db_header(&head)
    }

    /// Write one planned batch as one replica commit and record the new position.
    /// Sets `loaded = false` without writing when the live content must be re-verified first
    /// (the sync loop then reloads and re-plans).
    fn write_plan(&self, st: &mut State, plan: &BatchPlan) -> Result<()> {
        let r = self.write_plan_inner(st, plan);
        if !matches!(r, Ok(true)) {
            st.loaded = false; // sums were advanced by the plan: re-derive them next time
        }
        r.map(|_| ())
    }

    /// Ok(false): nothing written, the content must be re-verified (see below).
    fn write_plan_inner(&self, st: &mut State, plan: &BatchPlan) -> Result<bool> {
        self.pos
            .write_intent((plan.last_lsn, plan.generation, plan.db_checksum))?;
        let mut shm = self.write_locked(st)?;
        // An empty WAL that is not the one we published: a stock RESTART/TRUNCATE checkpoint
        // copied everything into the database file — possibly including a foreign commit made
        // before it, which the header no longer shows. The plan was verified against our
        // in-memory checksums, so re-derive them from the live content (a foreign change then
        // shows up as divergence → re-snapshot) before writing anything on top.
        if let (Some(last), Some(live)) = (st.last_hdr.as_ref(), shm_read_header(&shm)) {
            if live.mx_frame == 0
                && (live.mx_frame, live.salts, live.frame_cksum)
                    != (last.mx_frame, last.salts, last.frame_cksum)
            {
                return Ok(false);
            }
        }
        let wal = st.wal.as_ref().expect("opened");
        let page1;
        let mut pages: Vec<(u32, &[u8])> =
            plan.pages.iter().map(|(p, d)| (*p, d.as_slice())).collect();
        if pages.is_empty() {
            // A pure truncation still needs a commit frame: page 1's current image.
            let h = shm_read_header(&shm)
                .ok_or_else(|| Error::Other("wal-index header invalid".into()))?;
            let mut b = vec![0u8; plan.page_size.bytes()];
            read_page_into(
                &self.handle,
                &shm,
                wal,
                &h,
                PageNo::new(1).expect("1"),
                Some(plan.page_size),
                &mut b,
            )?;
            page1 = b;
            pages.push((1, page1.as_slice()));
        }
        let before = shm_read_header(&shm).map(|h| h.salts);
        let res = append_commit(
            &mut shm,
            wal,
            st.last_hdr.as_ref(),
            plan.page_size,
            &pages,
            plan.commit_size,
        );
        drop(shm);
        let h = match res {
            Ok(h) => h,
            Err(ApplyError::Foreign(m)) => {
                st.foreign_writes += 1;
                log_event(&format!(
                    "event=foreign_write db={:?} detail={m:?}",
                    self.db_path
                ));
                st.diverged = Some(m);
                return Ok(true);
            }
            Err(ApplyError::NeedRecovery) => {
                return Err(Error::Busy("the wal-index needs recovery; retry".into()))
            }
            Err(ApplyError::Other(e)) => return Err(e),
        };
        if before.is_some_and(|s| s != h.salts) {
            st.restarts_seen += 1;
        }
        st.last_hdr = Some(h);
        // E.5: durable before the position says so (published already: readers did not wait).
        wal.sync_data()
            .map_err(|e| Error::io("syncing the replica's WAL", e))?;
        st.lsn = plan.last_lsn;
        st.generation = plan.generation;
        st.page_size = Some(plan.page_size);
        st.batches += 1;
        st.last_batch = Some((
            plan.first_lsn,
            plan.last_lsn,
            plan.pages.len(),
            plan.has_snapshot,
        ));
        st.last_record_ms = Some(plan.timestamp_ms);
        let w = self.pos.write(&Applied {
            seq: 0,
            lsn: plan.last_lsn,
            generation: plan.generation,
            checksum: plan.db_checksum,
            intent: None,
        })?;
        st.seen_seq = w.seq;
        Ok(true)
    }

    /// E.6: checkpoint PASSIVE through the applier connection once the WAL is long.
    fn maybe_checkpoint(&self, st: &mut State) {
        let long = st
            .last_hdr
            .is_some_and(|h| h.mx_frame >= drain_policy().frames / 4);
        if let (true, Some(c)) = (long, &st.ckpt) {
            if c.db().exec("PRAGMA wal_checkpoint(PASSIVE)").is_ok() {
                st.checkpoints += 1;
            }
        }
    }

    /// E.6 drain: when the WAL is long, checkpoint until every frame is backfilled and no
    /// reader holds READ1..4 (new readers then read the database file), so the next append
    /// restarts the WAL. Gives up after DRAIN_TIMEOUT and reports the pinning reader.
    fn maybe_drain(&self, st: &mut State) {
        let policy = drain_policy();
        let Some(h) = st.last_hdr.filter(|h| h.mx_frame >= policy.frames) else {
            return;
        };
        let started = Instant::now();
        let deadline = if st.wal_pinned.is_some() {
            started // still pinned at the last sync: one attempt, no wait
        } else {
            started + policy.timeout
        };
        loop {
            if let Some(c) = &st.ckpt {
                let _ = c.db().exec("PRAGMA wal_checkpoint(PASSIVE)");
            }
            let ready = match self.handle.live_shm() {
                Ok(Some(mut shm)) => {
                    let ck = crate::wal::shm_ckpt_info(&shm);
                    let done = ck.n_backfill >= h.mx_frame;
                    done && {
                        let free = shm.try_lock_exclusive(SLOT_READ1, 4);
                        shm.unlock_exclusive(SLOT_READ1, 4);
                        free
                    }
                }
                _ => false,
            };
            if ready {
                st.drains += 1;
                st.wal_pinned = None;
                st.max_drain_ms = st.max_drain_ms.max(started.elapsed().as_millis() as u64);
                return;
            }
            if Instant::now() > deadline {
                let readers = self.pinning_readers();
                let msg = format!(
                    "the replica's WAL holds {} frames and a reader kept it pinned for more than {} s \
                     ({readers}); the WAL grows until that read transaction ends (end long read \
                     transactions on the replica, or raise REPL_DRAIN_TIMEOUT_MS)",
                    h.mx_frame,
                    policy.timeout.as_secs_f64()
                );
                if st.wal_pinned.is_none() {
                    log_event(&format!(
                        "event=wal_pinned db={:?} frames={} waited_ms={} readers={readers:?}",
                        self.db_path,
                        h.mx_frame,
                        started.elapsed().as_millis()
                    ));
                }
                st.wal_pinned = Some(msg);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Which read-mark slots are in use and the frame each reader's snapshot ends at, e.g.
    /// "read-mark 1 at frame 4210" (or why that cannot be told).
    fn pinning_readers(&self) -> String {
        let Ok(Some(mut shm)) = self.handle.live_shm() else {
            return "the wal-index is not readable".into();
        };
        let ck = crate::wal::shm_ckpt_info(&shm);
        let mut held = Vec::new();
        for i in 1..=4u32 {
            let slot = SLOT_READ1 + i - 1;
            if shm.try_lock_exclusive(slot, 1) {
                shm.unlock_exclusive(slot, 1);
            } else {
                held.push(format!(
                    "read-mark {i} at frame {}",
                    ck.read_marks[i as usize]
                ));
            }
        }
        if held.is_empty() {
            format!(
                "no reader holds a read-mark now; {} of the frames are backfilled",
                ck.n_backfill
            )
        } else {
            held.join(", ")
        }
    }

    // ---- queries used by the SQL functions ----

    pub fn lsn(&self) -> Lsn {
        let st = lock(&self.state);
        if st.loaded {
            return st.lsn;
        }
        drop(st);
        self.pos.read().map_or(Lsn(0), |a| a.lsn)
    }

    /// Checksum of the live content (loads the state if this process has not synced).
    pub fn checksum(&self) -> Result<(Lsn, Checksum)> {
        let _applier = self.applier_lock()?;
        let mut st = lock(&self.state);
        let stale = self.pos.read().map(|a| a.seq) != Some(st.seen_seq);
        // The cached sums describe the WAL we published last; if the live wal-index shows
        // another one (a foreign commit, a stock RESTART/TRUNCATE), recompute from the content
        // instead of reporting what the primary's checksum was.
        let key = |h: &WalIndexHeader| (h.mx_frame, h.salts, h.frame_cksum);
        let moved = match (st.last_hdr.as_ref(), self.handle.live_shm()?) {
            (Some(last), Some(shm)) => shm_read_header(&shm).map(|h| key(&h)) != Some(key(last)),
            _ => false,
        };
        if !st.loaded || stale || moved {
            self.ensure_open(&mut st)?;
            self.load(&mut st)?;
        }
        Ok((st.lsn, st.sums.total()))
    }

    pub fn status_json(&self) -> serde_json::Value {
        // A sync in progress holds the state for its whole duration (a bootstrap may take
        // minutes): answer from what is readable without it rather than wait.
        let patience = Instant::now() + Duration::from_millis(200);
        let st = loop {
            match self.state.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            let progress = *lock(&self.progress);
            if progress.is_none() && Instant::now() < patience {
                std::thread::sleep(Duration::from_millis(1)); // a short sync: wait for it
                continue;
            }
            return serde_json::json!({
                "role": "replica",
                "db": self.db_path,
                "syncing": true,
                "lsn": self.pos.read().map_or(0, |a| a.lsn.0),
                "progress": progress.map(|(phase, done, total)| serde_json::json!({"phase": phase, "bytes": done, "total": total})),
                "follow": self.follow_json(),
            });
        };
        let lsn = if st.loaded {
            st.lsn.0
        } else {
            self.pos.read().map_or(0, |a| a.lsn.0)
        };
        let lag_lsn = st.primary_lsn.map(|p| p.0.saturating_sub(lsn));
        // Behind: the replica's content is at most this old (the newest applied record's
        // commit time on the primary); caught up: 0.
        let lag_ms = match (lag_lsn, st.last_record_ms) {
            (Some(0), _) => Some(0),
            (Some(_), Some(t)) => Some(now_ms().saturating_sub(t)),
            _ => None,
        };
        serde_json::json!({
            "role": "replica",
            "db": self.db_path,
            "source": st.source.as_ref().map(|s| s.describe()).or(st.meta.source.as_deref().map(transport::http::redact)),
            "primary": st.meta.source.as_deref().map(transport::http::redact),
            "primary_first_lsn": st.primary_first_lsn.map(|l| l.0),
            "last_batch": st.last_batch.map(|(f, l, n, s)| serde_json::json!({
                "first_lsn": f.0, "last_lsn": l.0, "pages": n, "snapshot": s})),
            "lineage": st.meta.lineage,
            "lsn": lsn,
            // The checksum at `lsn` (as applied by this process; null before its first sync).
            "checksum": st.loaded.then(|| st.sums.total().to_string()),
            "generation": st.generation.0,
            "primary_lsn": st.primary_lsn.map(|l| l.0),
            "lag_lsn": lag_lsn,
            "lag_ms": lag_ms,
            "last_sync_ms": st.last_sync_ms,
            "last_record_ms": st.last_record_ms,
            "wal": st.last_hdr.map(|h| serde_json::json!({"mx_frame": h.mx_frame, "pages": h.n_page})),
            "batches": st.batches,
            "resnapshots": st.resnapshots,
            "foreign_writes": st.foreign_writes,
            "checkpoints": st.checkpoints,
            "drains": st.drains,
            "max_drain_ms": st.max_drain_ms,
            "wal_pinned": st.wal_pinned,
            "follow": self.follow_json(),
            "progress": lock(&self.progress).map(|(phase, done, total)| serde_json::json!({"phase": phase, "bytes": done, "total": total})),
            "last_error": st.last_error,
        })
    }

    pub fn lineage(&self) -> Option<String> {
        lock(&self.state).meta.lineage.clone()
    }

    pub fn source(&self) -> Option<String> {
        lock(&self.state).meta.source.clone()
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

fn write_meta(dir: &Path, m: &ReplicaMeta) -> Result<()> {
    let p = dir.join("replica.json");
    let tmp = dir.join(format!("replica.json.{}.tmp", std::process::id()));
    let text = m.to_json();
    // Owner-only: the source URL may carry the primary's token (?token=).
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io(format!("renaming to {}", p.display()), e))
}

/// Read page `p` of the state published in `h`: the newest WAL frame ≤ mxFrame holding it
/// (WRITE is held, so no restart can reuse the frame), else the database file. `ps` None reads
/// just `buf.len()` bytes (page 1's header before the page size is known).
fn read_page_into(
    handle: &AgentHandle,
    shm: &LiveShm<'_>,
    wal: &File,
    h: &WalIndexHeader,
    p: PageNo,
    ps: Option<PageSize>,
    buf: &mut [u8],
) -> Result<()> {
    let frame = if h.mx_frame > 0 {
        hash_lookup_checked(shm, p.get(), 1, h.mx_frame)?
    } else {
        None
    };
    match frame {
        Some(f) => {
            let ps = match ps {
                Some(ps) => ps,
                None => PageSize::new(h.page_size)
                    .ok_or_else(|| Error::Corrupt("wal-index page size invalid".into()))?,
            };
            let off = wal::frame_offset(ps, f) + wal::FRAME_HEADER_SIZE as u64;
            wal.read_exact_at(buf, off)
                .map_err(|e| Error::io(format!("reading WAL frame {f}"), e))
        }
        None => {
            let ps = ps.map_or(buf.len() as u64, |p| p.get() as u64);
            crate::vfs::DbFileIo::read_db(handle, (p.get() as u64 - 1) * ps, buf)
        }
    }
}

impl ReplicaMeta {
    fn to_json(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "format": self.format,
            "role": self.role,
            "source": self.source,
            "lineage": self.lineage,
            "created_ms": self.created_ms,
        }))
        .unwrap_or_default()
    }

    fn from_json(text: &str) -> Option<ReplicaMeta> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        Some(ReplicaMeta {
            format: v.get("format")?.as_u64()? as u32,
            role: s("role").filter(|r| r == "replica")?,
            source: s("source"),
            lineage: s("lineage"),
            created_ms: v.get("created_ms").and_then(|x| x.as_u64()).unwrap_or(0),
        })
    }
}

//! The primary's capture agent (WAL.md §D): one per database per process. It turns every
//! committed WAL transaction into exactly one log record with LSN = previous + 1.
//!
//! Triggers: T1 (this process took the WAL WRITE lock: catch up before anyone of ours can
//! restart the WAL), T2 (WRITE is about to be released: capture what was just committed), T3
//! (a periodic check on the shared workers: commits by writers that bypass the shim ⇒ gap).
//! The agent handle holds a SHARED lock on the database while the role lives in this process
//! (until its last connection closes, `roles`); the background work runs on the process's
//! shared workers (`workers`), never on threads of its own.
//!
//! Shared state across processes (WAL.md §D.3) is the log itself plus `<dir>/position`, both
//! modified only while holding WRITE. The process-local mutex `Primary::state` is always taken
//! *after* WRITE, never the other way round, so there is no lock-order cycle.
//!
//! Invariants: the log has no hole: a capture that cannot prove continuity (a WAL restart we
//! did not witness, a WAL that went backwards, a broken checksum chain) starts a new generation
//! with a full snapshot. `sums` always equals the per-page checksums of the state at `pos.lsn`.
//!
//! ## Crashed writers of ours vs writers without the extension (the write intent)
//!
//! Committed frames beyond the shared position, found by a WRITE holder that did not write
//! them, have two possible authors: a writer without the extension (the lineage promise says:
//! gap, new generation + snapshot) or one of ours that was killed between its commit and its
//! T2 (WAL.md §D.7: catch up, ordinary records, no gap). Capturing checksummed WAL frames
//! is loss-free either way; what must be decided is only *who* wrote them. The position file
//! therefore carries a second record, the *intent*: T1, once it has caught up, stores "a write
//! session of pid P is open at salts S, frame F, iChange C, LSN L, generation G"; a capture
//! under WRITE that leaves the position at the header clears it (normally T2 of the same
//! session, after its position write). WRITE is exclusive, so an intent seen by the next
//! WRITE holder that is not that session's T2 belongs to a session that never reached T2: its
//! process died. Its frames are accepted iff the position is still exactly (S, F, L, G) and
//! the WAL is consistent with *one* write session (SQLite releases WRITE after every commit):
//!
//! * same salts: (F, mxFrame] holds exactly one transaction (padding collapsed);
//! * new salts, mxFrame > 0: the session restarted the WAL after catching up (witnessed by its
//!   intent) and committed one transaction in frames 1..mxFrame;
//! * new salts, mxFrame 0: a TRUNCATE checkpoint (or restart + rollback): reset, no LSN;
//! * and the header's iChange (+1 per commit, kept across restarts) is C + that count, or 0
//!   (recovery rebuilt the header, e.g. every process died: then only the frame structure is
//!   checked).
//!
//! Anything else (two transactions, a foreign commit on top of ours, a foreign commit after a
//! session of ours died without committing *and* the iChange matching is the one case the
//! intent cannot tell apart) stays a gap, as do uncaptured frames without an intent. A session
//! killed while storing its intent leaves a tag that does not match: read as no intent, which
//! is right because it had not written to the WAL yet. T2's own capture failing leaves the
//! intent in place, so the next WRITE holder captures those frames instead of calling them a
//! gap. Cost: the intent lives in a `MAP_SHARED` mapping of the position file
//! (`sys::SharedWords`), so T1 stores ten words and T2 one, and T1 reads the position from
//! the mapping instead of `pread`: no syscall added to the commit path. The position itself
//! is still written with one `pwrite` by T2 (its checksum lets lock-free readers detect a torn
//! copy).
//!
//! The mapping also holds the *append flag*: set by `capture` before it may append, cleared
//! once its position is written. Found set, an appender died in between, and the log is
//! rescanned; otherwise nobody appended behind our handle's back (every appender writes the
//! position, which `sync_shared` compares), so `Log::append` need not `stat` the segment.

use crate::error::{Error, Result};
use crate::txlog::{DbChecksum, Log, Meta, Record};
use crate::types::{Generation, Lsn, PageSize};
use crate::util::now_ms;
use crate::vfs::{AgentHandle, DbFileIo};
use crate::wal::{WalHeader, WalIndexHeader};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

mod append;
mod backup;
mod capture;
mod checkpoint;
mod durability;
pub(crate) mod exec;
pub(crate) mod fence;
pub(crate) mod maintenance;
mod plan;
mod position;
mod recover;
mod snapshot;
mod status;
mod sync;
mod workers;

use position::{PosFile, Position};

struct Capture {
    log: Log,
    wal: Option<Arc<File>>,
    /// The WAL header of the current generation (re-read when the salts change).
    wal_hdr: Option<WalHeader>,
    pos: Position,
    sums: DbChecksum,
    page_size: Option<PageSize>,
    last_error: Option<String>,
    durable: Lsn,
    /// Records not yet durable (synchronous=NORMAL): the next round fdatasyncs the WAL.
    pending: bool,
    /// Records up to here are durable already (their commit synced the WAL,
    /// synchronous=FULL): the next round only raises the watermark file, without an fsync.
    synced: Option<Position>,
    /// The background thread was woken for `pending`/`synced` and has not gone idle since:
    /// later commits need not wake it again (a futex wake per commit is not free).
    round_scheduled: bool,
    gaps: u64,
    captured_txns: u64,
    /// Set by T2 when T1 of the same WRITE session already synced with the shared state.
    skip_shared_once: bool,
    /// Position and checksums loaded (done under WRITE, lazily for resumed primaries).
    loaded: bool,
    /// Consecutive captures that failed to write the log (I/O: disk full...): while > 0 and
    /// the log is behind the WAL, T1 refuses writes with SQLITE_FULL.
    log_failures: u32,
    /// No gap snapshot attempt before this (backoff after a failed one: it reads the whole
    /// database under WRITE, so not on every write lock).
    snapshot_retry_after: Option<Instant>,
    /// No T3 capture attempt before this while the log cannot be written.
    t3_retry_after: Option<Instant>,
    /// Records at or below the durable watermark were lost and not re-captured: the next
    /// capture starts a new generation past the watermark whatever the WAL shows (recover.rs).
    force_gap: Option<String>,
    /// A claim whose frames the WAL no longer holds (see `append`).
    unprovable: Option<Position>,
}

pub struct Primary {
    db_path: String,
    dir: PathBuf,
    agent: AgentHandle,
    state: Mutex<Capture>,
    /// This primary, for scheduling its rounds from `&self` (T2).
    me: Weak<Primary>,
    /// Set when the role ends in this process: background jobs no longer start.
    stop: AtomicBool,
    /// Held by a group-fsync round or T3 check of the shared workers (see `workers`).
    busy: Mutex<()>,
    /// Held by a maintenance pass (separate, so a compaction never delays a group fsync).
    maintenance_busy: Mutex<()>,
    last_maintenance: Mutex<Option<Instant>>,
    /// The object-storage uploader of this primary in this process (`backup.rs`).
    backup: Mutex<Option<backup::Backup>>,
    /// The backup target and settings as last read (`backup.rs`).
    backup_seen: Mutex<backup::BackupSeen>,
    /// `repl_primary()` loaded the state under WRITE and keeps it until the registry has
    /// installed the role (`release_init_write`): a commit by another connection of this
    /// process in between would not go through the role's hooks and would read as a gap.
    init_write_held: AtomicBool,
    posf: once_cell::sync::OnceCell<PosFile>,
    durable_file: crate::txlog::DurableFile,
    file_id: Option<(u64, u64)>,
    dir_id: Option<(u64, u64)>,
    /// T3: the (header, shared position) mismatch seen on the previous tick.
    t3_seen: Mutex<Option<T3Seen>>,
    /// The HTTP server of this primary's log, when `repl_primary('addr')` started one here.
    server: Mutex<Option<crate::transport::server::Server>>,
    /// The commit path may use the shared claim alone (`capture`: the fast T1/T2): this
    /// process loaded the state once, and no new generation is owed.
    fast: AtomicBool,
    /// An append pass is queued or lingering on the workers: T2 need not wake them.
    append_scheduled: AtomicBool,
    /// Consecutive append passes that found nothing to do (the pass stops lingering).
    append_idle: std::sync::atomic::AtomicU32,
    /// Held by an append pass of the shared workers (`detach` waits for it).
    append_busy: Mutex<()>,
    /// `<dir>/append.lock`, flocked by whoever appends to the log (any process).
    append_lockf: once_cell::sync::OnceCell<File>,
    /// `capture_lag_max` of the policy.
    lag_max: std::sync::atomic::AtomicU64,
    /// The last append pass failed with an I/O error (disk full...).
    append_failing: AtomicBool,
    /// Claims up to this LSN were made by commits that synced the WAL (synchronous=FULL).
    wal_synced_lsn: std::sync::atomic::AtomicU64,
    /// Synchronous replication settings (the policy's) and counters (`sync.rs`).
    sync_replicas: std::sync::atomic::AtomicU64,
    sync_level: std::sync::atomic::AtomicU64,
    sync_timeout_ms: std::sync::atomic::AtomicU64,
    sync_waits: std::sync::atomic::AtomicU64,
    sync_timeouts: std::sync::atomic::AtomicU64,
    /// A newer epoch of the lineage, when one is known (`fence.rs`).
    fence_state: fence::FenceState,
    /// Checkpoint assist (`checkpoint.rs`): the policy's frame threshold (0 = off), a run
    /// queued or running, held by a run (`detach` waits for it), and what the runs did.
    ckpt_assist: std::sync::atomic::AtomicU64,
    ckpt_scheduled: AtomicBool,
    ckpt_busy: Mutex<()>,
    ckpt_stats: Mutex<checkpoint::CheckpointStats>,
    /// Automatic checkpoints of this process's connections handed to the assist.
    ckpt_handoffs: std::sync::atomic::AtomicU64,
    /// Background jobs of this process that may hold the WAL WRITE lock for a moment right
    /// now (an assisted checkpoint's connection, T3's capture): see `background_may_hold_write`.
    bg_write: AtomicUsize,
}

type T3Seen = ([u8; 8], u32, u32, Option<(Lsn, u32)>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Primary {
    /// Attach capture to the database at `db_path` (create = start a new lineage if there is no log yet).
    pub fn attach(db_path: &str, create: bool) -> Result<Arc<Primary>> {
        let dir = crate::txlog::log_dir(db_path);
        let agent = AgentHandle::open(db_path)?;
        recover::refuse_rollback_mode(&agent, db_path)?;
        // Here, in the opening thread, not lazily on the background thread (see the method).
        agent.open_wal_index();
        let policy = maintenance::load_policy(&dir).unwrap_or_default();
        let cfg = crate::txlog::LogConfig {
            segment_bytes: policy.segment_bytes,
            compression: crate::txlog::Compression::from_code(policy.compress).unwrap_or_default(),
        };
        let log = if dir.join("meta.json").exists() {
            Log::open(&dir, cfg)?
        } else if create {
            let mut head = [0u8; 100];
            agent.read_db(0, &mut head)?;
            let page_size = PageSize::from_db_header(&head).map_or(0, PageSize::get);
            let meta = Meta {
                format: 1,
                lineage: random_hex(16),
                role: "primary".into(),
                page_size,
                created_ms: now_ms(),
                epoch: crate::types::Epoch::FIRST,
                epoch_start: None,
            };
            Log::create(&dir, &meta, cfg)?
        } else {
            return Err(Error::Other(format!(
                "no replication log at {}",
                dir.display()
            )));
        };
        let mut log = log;
        // A damaged tail is truncated even below the watermark: capture restores it from the
        // WAL or starts a new generation past it (recover.rs), rather than failing for good.
        log.repair_damaged_tail(true);
        let cap = Capture {
            log,
            wal: None,
            wal_hdr: None,
            pos: Position::default(),
            sums: DbChecksum::new(PageSize::new(4096).expect("valid")),
            page_size: None,
            last_error: None,
            durable: Lsn(0),
            pending: false,
            synced: None,
            round_scheduled: false,
            gaps: 0,
            captured_txns: 0,
            loaded: false,
            log_failures: 0,
            snapshot_retry_after: None,
            t3_retry_after: None,
            force_gap: None,
            unprovable: None,
            skip_shared_once: false,
        };
        let durable_file = crate::txlog::DurableFile::open(&dir)?;
        let p = Arc::new_cyclic(|me| Primary {
            db_path: db_path.to_string(),
            dir: dir.clone(),
            agent,
            state: Mutex::new(cap),
            me: me.clone(),
            stop: AtomicBool::new(false),
            busy: Mutex::new(()),
            maintenance_busy: Mutex::new(()),
            last_maintenance: Mutex::new(None),
            backup: Mutex::new(None),
            backup_seen: Mutex::new(None),
            init_write_held: AtomicBool::new(false),
            t3_seen: Mutex::new(None),
            server: Mutex::new(None),
            fast: AtomicBool::new(false),
            append_scheduled: AtomicBool::new(false),
            append_idle: std::sync::atomic::AtomicU32::new(0),
            append_busy: Mutex::new(()),
            append_lockf: once_cell::sync::OnceCell::new(),
            lag_max: std::sync::atomic::AtomicU64::new(policy.capture_lag_max.max(1)),
            append_failing: AtomicBool::new(false),
            wal_synced_lsn: std::sync::atomic::AtomicU64::new(0),
            sync_replicas: std::sync::atomic::AtomicU64::new(policy.sync_replicas),
            sync_level: std::sync::atomic::AtomicU64::new(policy.sync_level),
            sync_timeout_ms: std::sync::atomic::AtomicU64::new(policy.sync_timeout_ms),
            sync_waits: std::sync::atomic::AtomicU64::new(0),
            sync_timeouts: std::sync::atomic::AtomicU64::new(0),
            posf: once_cell::sync::OnceCell::new(),
            durable_file,
            file_id: file_identity(db_path),
            dir_id: file_identity(&dir),
            fence_state: fence::FenceState::default(),
            ckpt_assist: std::sync::atomic::AtomicU64::new(policy.checkpoint_assist),
            ckpt_scheduled: AtomicBool::new(false),
            ckpt_busy: Mutex::new(()),
            ckpt_stats: Mutex::new(checkpoint::CheckpointStats::default()),
            ckpt_handoffs: std::sync::atomic::AtomicU64::new(0),
            bg_write: AtomicUsize::new(0),
        });
        p.fence_state.epoch.store(
            lock(&p.state).log.meta().epoch.0,
            std::sync::atomic::Ordering::Release,
        );
        p.reload_fence();
        if create {
            p.initialise()?;
        }
        if let Err(e) = workers::register(&p) {
            p.release_init_write();
            return Err(e);
        }
        if !create {
            p.discard_unpublished_frames();
        }
        Ok(p)
    }

    /// Take the agent's WRITE lock, polling with a 10 s deadline.
    fn lock_write_polling(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.agent.try_lock_write() {
            if Instant::now() > deadline {
                return Err(Error::Busy(
                    "could not take the WAL write lock within 10 s: another connection keeps a write \
                     transaction open; commit or roll it back and retry"
                        .into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Load the state now (`repl_primary()`): a new lineage takes its first snapshot without
    /// blocking writers (`first_snapshot`), an existing one loads under WRITE.
    fn initialise(&self) -> Result<()> {
        // One process at a time creates a lineage; a second repl_primary() waits here, then
        // finds the snapshot and loads it.
        let init_lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("init.lock"))
            .map_err(|e| {
                Error::io(
                    format!("opening {}", self.dir.join("init.lock").display()),
                    e,
                )
            })?;
        init_lock
            .lock()
            .map_err(|e| Error::io("locking init.lock", e))?;
        let new_lineage = {
            let st = lock(&self.state);
            st.log.latest_snapshot(None)?.is_none() && st.log.last().is_none()
        };
        if new_lineage {
            return self.first_snapshot();
        }
        drop(init_lock);
        self.lock_write_polling()?;
        let r = match read_header(&self.agent) {
            Some(h) => {
                let mut st = lock(&self.state);
                self.append_lock().and_then(|_g| {
                    self.ensure_loaded(&mut st, &self.agent, &h)?;
                    // Claims left by a process that died before their append: in the log now.
                    self.sync_shared(&mut st, &h, false)?;
                    if st.unprovable.is_none() {
                        // (An unprovable claim stays for the next capture: a gap.)
                        self.publish_claim(&mut st);
                    }
                    Ok(())
                })
            }
            None => Err(Error::Other(
                "the wal-index is not initialised; is the database in WAL mode?".into(),
            )),
        };
        if r.is_ok() {
            self.init_write_held
                .store(true, std::sync::atomic::Ordering::Release);
        } else {
            self.agent.unlock_write();
        }
        r
    }

    /// Releases the WRITE lock `repl_primary()` kept until the role was installed (no-op
    /// when it holds none).
    pub fn release_init_write(&self) {
        if self
            .init_write_held
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.agent.unlock_write();
        }
    }

    /// With WRITE held: load the position and checksums (or take the first snapshot of a new
    /// lineage) if this process has not done so yet. Resumed primaries load lazily here, at
    /// the first write lock, because the wal-index may not exist when the file is opened.
    fn ensure_loaded(&self, st: &mut Capture, io: &dyn DbFileIo, h: &WalIndexHeader) -> Result<()> {
        if st.loaded {
            return Ok(());
        }
        let snap = st.log.latest_snapshot(None)?;
        if snap.is_none() && st.log.last().is_none() {
            // A new lineage: the state now is LSN 0, generation 1. Unless repl_primary() in
            // some process is taking the first snapshot right now (it holds init.lock, without
            // WRITE): then this commit is left to it (its LSN 1 holds every page changed since
            // its snapshot), and this process loads at its next write lock.
            let init_lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join("init.lock"))
                .map_err(|e| Error::io("opening init.lock", e))?;
            if init_lock.try_lock().is_err() {
                return Err(Error::Busy(
                    "the first snapshot of this lineage is being taken by repl_primary(); this \
                     process loads the state at its next write"
                        .into(),
                ));
            }
            let (meta, _) = self.write_snapshot_streamed(st, io, h, Lsn(0), Generation(1))?;
            st.pos = Position::from_meta(&meta);
            self.save_position(st)?;
            Log::write_durable(&self.dir, Lsn(0), Generation(1))?;
            log_event(&format!(
                "event=lineage_created db={:?} pages={}",
                self.db_path, meta.page_count
            ));
        } else {
            self.load_state(st, h)?;
            log_event(&format!(
                "event=primary_resumed db={:?} lsn={} generation={}",
                self.db_path, st.pos.lsn, st.pos.generation
            ));
        }
        st.loaded = true;
        Ok(())
    }

    /// Rebuild the per-page checksums at the log's tail from the latest snapshot + records.
    fn load_state(&self, st: &mut Capture, h: &WalIndexHeader) -> Result<()> {
        let Some((smeta, spath)) = st.log.latest_snapshot(None)? else {
            return Err(Error::Corrupt(format!(
                "{}: the log has records but no snapshot",
                self.dir.display()
            )));
        };
        // Streamed: a page at a time into the checksums, never the whole snapshot in memory.
        let (_, sums) =
            crate::txlog::stream_snapshot_file(&spath, &mut |_| Ok(()), &mut |_, _| Ok(()))?;
        st.page_size = Some(smeta.page_size);
        st.sums = sums;
        let mut pos = Position::from_meta(&smeta);
        let _ = st.log.refresh_for_append()?;
        for r in st.log.read_from(smeta.lsn.next(), None)? {
            let r = r?;
            apply_to_sums(&mut st.sums, &r);
            pos = Position::from_meta(&r.meta);
        }
        st.pos = pos;
        if let Some(fp) = self.read_position() {
            if fp.lsn == pos.lsn {
                st.pos = fp; // same LSN, possibly a newer WAL position (reset to frame 0)
            } else if fp.lsn > pos.lsn && fp.generation >= pos.generation {
                // The log lost its tail (OS crash before the group fsync, or a torn tail
                // truncated just now): re-capture it from the WAL, under the same LSNs.
                self.recover_lost_tail(st, fp, h, false)?;
            }
        }
        self.check_served_tail(st);
        st.durable = Log::read_durable(&self.dir)?
            .map(|(l, _)| l)
            .unwrap_or(Lsn(0));
        Ok(())
    }

    /// True while the database file and log directory are the ones this agent attached to.
    pub fn still_describes(&self, path: &str) -> bool {
        use std::os::unix::fs::MetadataExt;
        let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        id(std::path::Path::new(path)) == self.file_id && id(&self.dir) == self.dir_id
    }

    /// Serve this primary's log over HTTP on `addr` from this process (idempotent for the
    /// same address; another address while serving is an error).
    /// Is this primary already served by this process on `addr` (same address, or the same
    /// IP with port 0)? `Err` when it is served elsewhere: one server per primary.
    pub fn serving(&self, addr: &str) -> Result<bool> {
        let g = lock(&self.server);
        let Some(s) = g.as_ref() else {
            return Ok(false);
        };
        let same = addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a == s.addr() || (a.port() == 0 && a.ip() == s.addr().ip()));
        if same {
            return Ok(true);
        }
        Err(Error::Misuse(format!(
            "repl_primary('{addr}'): this process already serves {} on {}; one server per primary",
            self.db_path,
            s.addr()
        )))
    }

    /// Serve the log on a socket from `Server::bind` (see `serving` for the idempotent case).
    pub fn serve(self: &Arc<Self>, bound: crate::transport::server::Bound) -> Result<()> {
        let mut g = lock(&self.server);
        if g.is_some() {
            return Err(Error::Misuse(format!(
                "this process already serves {}; one server per primary",
                self.db_path
            )));
        }
        let handler: crate::transport::server::ExecHandler =
            Arc::new(exec::Forwarded(Arc::downgrade(self)));
        *g = Some(crate::transport::server::Server::start_bound(
            &self.db_path,
            bound,
            Some(handler),
        )?);
        Ok(())
    }

    pub fn lineage(&self) -> String {
        lock(&self.state).log.meta().lineage.clone()
    }

    /// The log directory `<db>-replica/`.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

fn apply_to_sums(sums: &mut DbChecksum, r: &Record) {
    if r.meta.snapshot {
        *sums = DbChecksum::new(r.meta.page_size);
    }
    for pg in &r.pages {
        sums.set_page(pg.pgno, &pg.data);
    }
    sums.truncate(r.meta.commit_size);
}

fn read_header(io: &dyn DbFileIo) -> Option<WalIndexHeader> {
    let head = io.shm_head()?;
    WalIndexHeader::read_valid(&head[..96])
}

fn log_event(line: &str) {
    crate::logging::event(line);
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = crate::util::urandom(&mut b);
    crate::util::hex(&b)
}

fn file_identity(p: impl AsRef<std::path::Path>) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

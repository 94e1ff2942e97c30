//! The primary's capture agent (WAL.md §D): one per database per process. It turns every
//! committed WAL transaction into exactly one log record with LSN = previous + 1.
//!
//! Triggers: T1 (this process took the WAL WRITE lock: catch up before anyone of ours can
//! restart the WAL), T2 (WRITE is about to be released: capture what was just committed), T3
//! (a poll thread: commits by writers that bypass the shim ⇒ gap). The agent handle holds a
//! SHARED lock on the database for the life of the process.
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
//! (`ffi::os::SharedWords`), so T1 stores ten words and T2 one, and T1 reads the position from
//! the mapping instead of `pread`: no syscall added to the commit path. The position itself
//! is still written with one `pwrite` by T2 (its checksum lets lock-free readers detect a torn
//! copy).
//!
//! The mapping also holds the *append flag*: set by `capture` before it may append, cleared
//! once its position is written. Found set, an appender died in between, and the log is
//! rescanned; otherwise nobody appended behind our handle's back (every appender writes the
//! position, which `sync_shared` compares), so `Log::append` need not `stat` the segment.

use crate::error::{Error, Result};
use crate::registry::{self, Db, Role};
use crate::txlog::{DbChecksum, Log, Meta, Page, Record, RecordMeta};
use crate::types::{Checksum, Generation, Lsn, PageNo, PageSize};
use crate::vfs::AgentHandle;
use crate::wal::{FrameReader, WalHeader, WalIndexHeader};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
#[allow(unused_imports)]
use DbFileIo as _;

mod background;
pub(crate) mod exec;
pub(crate) mod maintenance;
mod position;
mod snapshot;

use position::{Intent, IntentCheck, PosFile, Position};

/// What capture needs from a database file handle (a connection's, or the agent's).
pub trait DbFileIo {
    /// The first 136 bytes of the wal-index (header copies + checkpoint info), if mapped.
    fn shm_head(&self) -> Option<[u8; 136]>;
    /// Read database-file bytes at `offset`; zero-fills past EOF.
    fn read_db(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// What T1 established for the connection that now holds WRITE.
#[derive(Clone, Copy, Debug)]
pub struct T1Witness {
    /// After T1, every committed frame was captured (position == header).
    caught_up: bool,
}

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
    last_log_sync: Instant,
    /// Set by T2 when T1 of the same WRITE session already synced with the shared state.
    skip_shared_once: bool,
    /// Position and checksums loaded (done under WRITE, lazily for resumed primaries).
    loaded: bool,
}

pub struct Primary {
    db_path: String,
    dir: PathBuf,
    agent: AgentHandle,
    state: Mutex<Capture>,
    wake: Condvar,
    stop: AtomicBool,
    posf: once_cell::sync::OnceCell<PosFile>,
    durable_file: crate::txlog::DurableFile,
    file_id: Option<(u64, u64)>,
    dir_id: Option<(u64, u64)>,
    /// T3: the (header, shared position) mismatch seen on the previous tick.
    t3_seen: Mutex<Option<T3Seen>>,
    /// The HTTP server of this primary's log, when `repl_primary('addr')` started one here.
    server: Mutex<Option<crate::transport::server::Server>>,
}

type T3Seen = ([u8; 8], u32, u32, Option<(Lsn, u32)>);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Veto a PRAGMA on a primary database (WAL.md §D.2, T4). Returns the error message to show.
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
    let _g = lock(&db.attach_lock);
    if let Some(p) = db.primary() {
        return Ok(p);
    }
    let p = Primary::attach(db, true)?;
    *db.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Primary(p.clone());
    Ok(p)
}

impl Primary {
    /// Attach capture to `db` (create = start a new lineage if there is no log yet).
    pub fn attach(db: &Arc<Db>, create: bool) -> Result<Arc<Primary>> {
        let dir = registry::log_dir(&db.path);
        let agent = AgentHandle::open(&db.path)?;
        let policy = maintenance::load_policy(&dir).unwrap_or_default();
        let cfg = crate::txlog::LogConfig {
            segment_bytes: policy.segment_bytes,
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
            };
            Log::create(&dir, &meta, cfg)?
        } else {
            return Err(Error::Other(format!(
                "no replication log at {}",
                dir.display()
            )));
        };
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
            last_log_sync: Instant::now(),
            skip_shared_once: false,
        };
        let p = Arc::new(Primary {
            db_path: db.path.clone(),
            dir: dir.clone(),
            agent,
            state: Mutex::new(cap),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            t3_seen: Mutex::new(None),
            server: Mutex::new(None),
            posf: once_cell::sync::OnceCell::new(),
            durable_file: crate::txlog::DurableFile::open(&dir)?,
            file_id: file_identity(&db.path),
            dir_id: file_identity(&dir),
        });
        if create {
            p.initialise()?;
        }
        let weak = Arc::downgrade(&p);
        std::thread::Builder::new()
            .name("repl-capture".into())
            .spawn(move || background::background(weak))
            .map_err(|e| Error::io("starting the capture thread", e))?;
        let weak = Arc::downgrade(&p);
        std::thread::Builder::new()
            .name("repl-maintain".into())
            .spawn(move || maintenance::maintenance(weak))
            .map_err(|e| Error::io("starting the log maintenance thread", e))?;
        Ok(p)
    }

    /// Take the agent's WRITE lock (polling with a deadline) and load the state now.
    fn initialise(&self) -> Result<()> {
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
        let r = match read_header(&self.agent) {
            Some(h) => {
                let mut st = lock(&self.state);
                self.ensure_loaded(&mut st, &self.agent, &h)
            }
            None => Err(Error::Other(
                "the wal-index is not initialised; is the database in WAL mode?".into(),
            )),
        };
        self.agent.unlock_write();
        r
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
            // A new lineage: the state now is LSN 0, generation 1.
            let rec = self.snapshot_record(st, io, h, Lsn(0), Generation(1))?;
            st.log.write_snapshot(&rec)?;
            st.pos = Position::from_meta(&rec.meta);
            self.save_position(st)?;
            Log::write_durable(&self.dir, Lsn(0), Generation(1))?;
            log_event(&format!(
                "event=lineage_created db={:?} pages={}",
                self.db_path,
                rec.pages.len()
            ));
        } else {
            self.load_state(st)?;
            log_event(&format!(
                "event=primary_resumed db={:?} lsn={} generation={}",
                self.db_path, st.pos.lsn, st.pos.generation
            ));
        }
        st.loaded = true;
        Ok(())
    }

    /// Rebuild the per-page checksums at the log's tail from the latest snapshot + records.
    fn load_state(&self, st: &mut Capture) -> Result<()> {
        let Some((smeta, spath)) = st.log.latest_snapshot(None)? else {
            return Err(Error::Corrupt(format!(
                "{}: the log has records but no snapshot",
                self.dir.display()
            )));
        };
        let snap = Log::read_snapshot(&spath)?;
        st.page_size = Some(smeta.page_size);
        st.sums = DbChecksum::new(smeta.page_size);
        apply_to_sums(&mut st.sums, &snap);
        let mut pos = Position::from_meta(&smeta);
        let _ = st.log.refresh_for_append()?;
        for r in st.log.read_from(smeta.lsn.next(), None)? {
            let r = r?;
            apply_to_sums(&mut st.sums, &r);
            pos = Position::from_meta(&r.meta);
        }
        if let Some(fp) = self.read_position() {
            if fp.lsn == pos.lsn {
                pos = fp; // same LSN, possibly a newer WAL position (reset to frame 0)
            }
        }
        st.pos = pos;
        st.durable = Log::read_durable(&self.dir)?
            .map(|(l, _)| l)
            .unwrap_or(Lsn(0));
        Ok(())
    }

    /// Adopt records appended by other processes (call with WRITE held).
    fn sync_shared(&self, st: &mut Capture, force: bool) -> Result<()> {
        // Every appender rewrites the position file right after appending, so an unchanged
        // position file means nobody else appended: skip the log re-scan (the commit path).
        // A process that died between its append and its position write leaves a record our
        // handle does not know, and the append flag set: `capture` then passes `force`.
        if !force && std::mem::take(&mut st.skip_shared_once) {
            return Ok(());
        }
        let fp = self.read_position();
        if !force && st.loaded && fp == Some(st.pos) {
            return Ok(());
        }
        let new = st.log.refresh_for_append()?;
        for r in &new {
            apply_to_sums(&mut st.sums, r);
            st.pos = Position::from_meta(&r.meta);
            st.page_size = Some(r.meta.page_size);
        }
        if let Some(fp) = fp {
            if fp.lsn == st.pos.lsn && fp.generation == st.pos.generation {
                st.pos = fp;
            }
        }
        Ok(())
    }

    /// T1: this process's connection just took WRITE.
    pub fn on_write_locked(&self, io: &dyn DbFileIo) -> T1Witness {
        let Some(h) = read_header(io) else {
            return T1Witness { caught_up: false }; // recovery about to run; T2 handles it
        };
        let mut st = lock(&self.state);
        self.capture(&mut st, io, &h, false, false);
        // Caught up = the position is the header: anything this WRITE session publishes is
        // then ours. (Not tied to last_error: a past gap must not poison later sessions.)
        let caught_up = st.loaded && st.pos.salts == h.salts && st.pos.frame == h.mx_frame;
        if caught_up {
            // Tell whoever holds WRITE next, should this process die before T2, that what
            // follows this position is this session's work (at most one transaction).
            self.write_intent(Some(&Intent {
                pid: std::process::id(),
                salts: h.salts,
                frame: h.mx_frame,
                change: h.change,
                lsn: st.pos.lsn,
                generation: st.pos.generation,
            }));
        }
        T1Witness { caught_up }
    }

    /// T2: the connection holding WRITE is about to release it.
    pub fn on_write_unlocking(&self, io: &dyn DbFileIo, w: Option<T1Witness>, wal_synced: bool) {
        let Some(h) = read_header(io) else {
            lock(&self.state).last_error =
                Some("wal-index header invalid at write-lock release".into());
            return;
        };
        let witnessed = w.is_some_and(|w| w.caught_up);
        let mut st = lock(&self.state);
        // Nobody else can have appended since T1: we held WRITE all along.
        st.skip_shared_once = witnessed;
        self.capture(&mut st, io, &h, witnessed, witnessed && wal_synced);
        // Our own intent (or a dead session's, resolved by this capture) is done with once the
        // position is the header; if capture failed it stays, and the next WRITE holder treats
        // the frames as this (then dead or failed) session's.
        self.clear_intent_if_caught_up(&st, &h);
    }

    /// Capture everything between the position and header `h` (WRITE held by the caller).
    fn capture(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        witnessed: bool,
        durable: bool,
    ) {
        if let Err(e) = self.ensure_loaded(st, io, h) {
            st.last_error = Some(e.to_string());
            log_event(&format!(
                "event=load_error db={:?} error={:?}",
                self.db_path,
                e.to_string()
            ));
            return;
        }
        let before = st.pos.lsn;
        // The append flag: set while a capture may append, cleared once its position is
        // written. Found set, its capture died in between: the log may hold records our handle
        // does not know, so rescan it. This is what lets `append` skip its `stat` of the segment.
        let flag = self.append_flag();
        let died_mid_append = flag.is_none_or(|f| f.load(Ordering::Acquire) != 0);
        st.log.trust_tail(flag.is_some());
        if let Err(e) = self.sync_shared(st, died_mid_append) {
            st.last_error = Some(e.to_string());
            log_event(&format!(
                "event=capture_error db={:?} error={:?}",
                self.db_path,
                e.to_string()
            ));
            return;
        }
        if let Some(f) = flag {
            f.store(std::process::id().max(1), Ordering::Release);
        }
        let mut r = self.capture_once(st, io, h, witnessed);
        if matches!(r, Err(Error::Misuse(_))) {
            // The log does not continue where our handle thinks (check_sequence refused).
            r = self
                .sync_shared(st, true)
                .and_then(|_| self.capture_once(st, io, h, witnessed));
        }
        match r {
            Ok(()) => {
                if let Some(f) = flag {
                    f.store(0, Ordering::Release);
                }
                if st.pos.lsn != before || st.pending {
                    if durable {
                        // The commit synced the WAL: everything captured so far is durable.
                        // The watermark file is raised by the background thread (one
                        // pread + pwrite per round instead of per commit).
                        st.pending = false;
                        st.synced = Some(st.pos);
                    } else {
                        st.pending = true;
                    }
                    // Wake the background thread only for the first record of a round: later
                    // commits join the same round at no cost to the commit path.
                    if !st.round_scheduled {
                        st.round_scheduled = true;
                        self.wake.notify_one();
                    }
                }
            }
            Err(e) => {
                st.last_error = Some(e.to_string());
                log_event(&format!(
                    "event=capture_error db={:?} error={:?}",
                    self.db_path,
                    e.to_string()
                ));
            }
        }
    }

    fn capture_once(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        witnessed: bool,
    ) -> Result<()> {
        let r = match self.plan(st, h, witnessed) {
            Ok(Plan::Nothing) => Ok(()),
            Ok(Plan::Reset) => {
                st.pos.salts = h.salts;
                st.pos.frame = 0;
                st.pos.cksum = (0, 0);
                self.save_position(st)
            }
            Ok(Plan::Frames {
                start,
                running,
                check,
            }) => match self.capture_frames(st, h, start, running, check) {
                Ok(Some(why)) => self.new_generation(st, io, h, &why),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            Ok(Plan::ResetIfDbMatches(why)) => match self.db_file_matches(st, io) {
                Ok(true) => {
                    st.pos.salts = h.salts;
                    st.pos.frame = 0;
                    st.pos.cksum = (0, 0);
                    self.save_position(st)
                }
                Ok(false) => self.new_generation(st, io, h, &why),
                Err(e) => Err(e),
            },
            Ok(Plan::Gap(reason)) => self.new_generation(st, io, h, &reason),
            Err(e) => Err(e),
        };
        match r {
            // The WAL could not be read as the position promised: never leave a hole.
            Err(Error::Corrupt(m)) => {
                self.new_generation(st, io, h, &format!("capture failed: {m}"))
            }
            r => r,
        }
    }

    fn plan(&self, st: &mut Capture, h: &WalIndexHeader, witnessed: bool) -> Result<Plan> {
        let pos = st.pos;
        // Not the owning session's T2, and an intent is pending: its session's process died
        // (WRITE is exclusive and we hold it). It vouches for the frames only while the
        // position is still exactly where that session's T1 left it.
        let dead = if witnessed {
            None
        } else {
            self.read_intent()
                .filter(|i| {
                    i.lsn == pos.lsn
                        && i.generation == pos.generation
                        && i.salts == pos.salts
                        && i.frame == pos.frame
                })
                .map(|intent| IntentCheck { intent })
        };
        if h.mx_frame == 0 {
            if h.salts == pos.salts {
                if pos.frame == 0 {
                    return Ok(Plan::Nothing);
                }
                return Ok(Plan::Gap(format!(
                    "the WAL went backwards: empty with the same salts, captured up to frame {}",
                    pos.frame
                )));
            }
            if pos.frame == 0 || witnessed {
                return Ok(Plan::Reset);
            }
            if let Some(c) = dead {
                // The dead session reset the WAL (a TRUNCATE checkpoint, or a restart whose
                // transaction rolled back) after catching up: loss-free if nothing committed
                // since, which an unchanged iChange proves. A rebuilt header (iChange reset by
                // recovery) proves nothing: the WAL may also have been checkpointed and deleted
                // by a writer without the extension closing last. Then the database file (the
                // whole state while the WAL is empty) must equal the captured state.
                if h.change == c.intent.change {
                    return Ok(Plan::Reset);
                }
                return Ok(Plan::ResetIfDbMatches(format!(
                    "the WAL was reset after write session of pid {} died, iChange {} -> {}, and \
                     the database file differs from the captured state",
                    c.intent.pid, c.intent.change, h.change
                )));
            }
            return Ok(Plan::Gap(format!(
                "the WAL was reset (salts changed, now empty) by a writer we did not witness; captured up to frame {}",
                pos.frame
            )));
        }
        let wal_hdr = self.wal_header(st, h.salts)?;
        if h.salts == pos.salts {
            if h.mx_frame < pos.frame {
                return Ok(Plan::Gap(format!(
                    "the WAL went backwards: mxFrame {} < captured frame {} (lost committed frames?)",
                    h.mx_frame, pos.frame
                )));
            }
            if h.mx_frame == pos.frame {
                if h.frame_cksum != pos.cksum && pos.frame > 0 {
                    return Ok(Plan::Gap(
                        "WAL checksum at the captured frame changed".into(),
                    ));
                }
                return Ok(Plan::Nothing);
            }
            if !witnessed && dead.is_none() {
                // Committed frames nobody of ours captured under WRITE and no crashed write
                // session of ours to account for them: a writer without the extension. They
                // could be read, but the lineage promise is that every commit went through
                // capture; answer with a new generation and a snapshot that includes them.
                return Ok(Plan::Gap(format!(
                    "frames {}..{} were committed without capture (a writer without the extension)",
                    pos.frame + 1,
                    h.mx_frame
                )));
            }
            let (start, running) = if pos.frame == 0 {
                (1, wal_hdr.cksum)
            } else {
                (pos.frame + 1, pos.cksum)
            };
            return Ok(Plan::Frames {
                start,
                running,
                check: dead,
            });
        }
        if witnessed || dead.is_some() {
            // A restart by this session (after T1 caught up), or by the dead one (its intent
            // says it had caught up; the frames must then be its one transaction).
            return Ok(Plan::Frames {
                start: 1,
                running: wal_hdr.cksum,
                check: dead,
            });
        }
        Ok(Plan::Gap(
            "the WAL was restarted (new salts) by a writer we did not witness".into(),
        ))
    }

    fn wal_file(&self, st: &mut Capture) -> Result<Arc<File>> {
        if st.wal.is_none() {
            let p = format!("{}-wal", self.db_path);
            let f = File::open(&p).map_err(|e| Error::io(format!("opening {p}"), e))?;
            st.wal = Some(Arc::new(f));
        }
        Ok(st.wal.clone().expect("set above"))
    }

    /// The WAL header whose salts are `salts` (cached per generation).
    fn wal_header(&self, st: &mut Capture, salts: [u8; 8]) -> Result<WalHeader> {
        if let Some(h) = st.wal_hdr.filter(|h| h.salts == salts) {
            return Ok(h);
        }
        let f = self.wal_file(st)?;
        let mut b = [0u8; 32];
        f.read_exact_at(&mut b, 0)
            .map_err(|e| Error::io("reading the WAL header", e))?;
        let h = WalHeader::parse(&b)?;
        if h.salts != salts {
            return Err(Error::Corrupt(
                "WAL header salts differ from the wal-index header".into(),
            ));
        }
        st.wal_hdr = Some(h);
        Ok(h)
    }

    /// Read frames start..=h.mx_frame, split them into transactions, append one record each.
    /// With `check` (frames of a dead write session), the records are held back until the
    /// whole range passed it; `Ok(Some(reason))` = it did not: the caller answers with a gap.
    fn capture_frames(
        &self,
        st: &mut Capture,
        h: &WalIndexHeader,
        start: u32,
        running: (u32, u32),
        check: Option<IntentCheck>,
    ) -> Result<Option<String>> {
        let f = self.wal_file(st)?;
        let hdr = self.wal_header(st, h.salts)?;
        let ps = hdr.page_size;
        if st.page_size.is_some_and(|p| p != ps) {
            return Err(Error::Corrupt(format!(
                "page size changed to {ps} inside WAL mode"
            )));
        }
        st.page_size = Some(ps);
        let mut reader = FrameReader::new(&*f, &hdr, start, running);
        let mut txn: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut txn_frames = 0u32;
        let mut last_commit: Option<(u32, u32, Vec<u8>)> = None;
        let mut held: Vec<(Record, Position)> = Vec::new();
        let mut pos = st.pos;
        pos.salts = h.salts;
        while reader.next_frame_no() <= h.mx_frame {
            let fr = reader.next_frame()?.ok_or_else(|| {
                Error::Corrupt(format!("WAL ends before published frame {}", h.mx_frame))
            })?;
            txn_frames += 1;
            let commit = fr.header.commit_size;
            if commit == 0 {
                txn.insert(fr.header.pgno, fr.data);
                continue;
            }
            // Padding (sync=FULL, psow=0): a one-frame commit identical to the previous commit frame.
            let is_padding = txn_frames == 1
                && last_commit
                    .as_ref()
                    .is_some_and(|(p, c, d)| *p == fr.header.pgno && *c == commit && *d == fr.data);
            pos.frame = fr.frame_no;
            pos.cksum = reader.running();
            txn_frames = 0;
            if is_padding {
                txn.clear();
            } else {
                let pgno = fr.header.pgno;
                last_commit = Some((pgno, commit, fr.data.clone()));
                txn.insert(pgno, fr.data);
                pos.lsn = pos.lsn.next();
                let rec = self.txn_record(st, ps, &mut txn, commit, pos);
                if check.is_some() {
                    held.push((rec, pos));
                    continue;
                }
                st.log.append(&rec)?;
                st.captured_txns += 1;
            }
            if check.is_none() {
                st.pos = pos;
            }
        }
        if reader.running() != h.frame_cksum {
            return Err(Error::Corrupt(format!(
                "checksum at frame {} does not match the wal-index header",
                h.mx_frame
            )));
        }
        if let Some(c) = check {
            if let Err(why) = c.accepts(h, held.len() as u64) {
                return Ok(Some(format!(
                    "frames {start}..{} were committed without capture and are not one crashed \
                     write session of ours: {why}",
                    h.mx_frame
                )));
            }
            log_event(&format!(
                "event=crash_catch_up db={:?} pid={} frames={start}..{} txns={}",
                self.db_path,
                c.intent.pid,
                h.mx_frame,
                held.len()
            ));
            for (rec, p) in held {
                st.log.append(&rec)?;
                st.captured_txns += 1;
                st.pos = p;
            }
        }
        st.pos = pos;
        self.save_position(st)?;
        Ok(None)
    }

    fn txn_record(
        &self,
        st: &mut Capture,
        ps: PageSize,
        txn: &mut BTreeMap<u32, Vec<u8>>,
        commit: u32,
        pos: Position,
    ) -> Record {
        let lock_page = ps.lock_byte_page().get();
        let mut pages = Vec::with_capacity(txn.len());
        for (pgno, data) in std::mem::take(txn) {
            if pgno > commit || pgno == lock_page {
                continue;
            }
            let p = PageNo::new(pgno).expect("frame reader rejects page 0");
            st.sums.set_page(p, &data);
            pages.push(Page { pgno: p, data });
        }
        st.sums.truncate(commit);
        Record {
            meta: RecordMeta {
                lsn: pos.lsn,
                generation: pos.generation,
                snapshot: false,
                page_size: ps,
                commit_size: commit,
                timestamp_ms: now_ms(),
                wal_salts: pos.salts,
                wal_frame: pos.frame,
                wal_cksum: pos.cksum,
                db_checksum: st.sums.total(),
                page_count: pages.len() as u32,
            },
            pages,
        }
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
        let weak = Arc::downgrade(self);
        let handler: crate::transport::server::ExecHandler = Arc::new(move |body| {
            let Some(p) = weak.upgrade() else {
                return (
                    503,
                    serde_json::json!({"error": "the primary is shutting down"}),
                );
            };
            match p.exec_enabled() {
                Ok(true) => {}
                Err(e) => return (500, serde_json::json!({"error": e.to_string()})),
                Ok(false) => {
                    return (
                        403,
                        serde_json::json!({"error": "forwarded writes are off on this primary: run \
                        repl_config('exec', 1) on it to accept them (see docs/SQL.md, repl_exec)"}),
                    )
                }
            }
            let req = match exec::request_from_json(body) {
                Ok(r) => r,
                Err(m) => return (400, serde_json::json!({ "error": m })),
            };
            exec::http_answer(p.exec_checked(&req))
        });
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

    /// Stop the background thread (the agent is released when the last reference goes).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    // ---- queries used by the SQL functions ----

    /// The latest LSN (refreshed from the shared position if another process moved it).
    pub fn lsn(&self) -> Lsn {
        let st = lock(&self.state);
        let mine = st.pos.lsn;
        drop(st);
        self.read_position().map_or(mine, |p| p.lsn.max(mine))
    }

    /// Database checksum at the current LSN.
    pub fn checksum(&self) -> Result<(Lsn, Checksum)> {
        let stale = {
            let st = lock(&self.state);
            !st.loaded || self.read_position().is_some_and(|p| p.lsn > st.pos.lsn)
        };
        if stale {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !self.agent.try_lock_write() {
                if Instant::now() > deadline {
                    return Err(Error::Busy(
                        "the primary is busy writing; retry repl_checksum()".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let r = match read_header(&self.agent) {
                Some(h) => {
                    let mut st = lock(&self.state);
                    self.ensure_loaded(&mut st, &self.agent, &h)
                        .and_then(|_| self.sync_shared(&mut st, true))
                }
                None => Err(Error::Other("the wal-index is not initialised".into())),
            };
            self.agent.unlock_write();
            r?;
        }
        let st = lock(&self.state);
        Ok((st.pos.lsn, st.sums.total()))
    }

    pub fn status_json(&self) -> serde_json::Value {
        let st = lock(&self.state);
        let durable = Log::read_durable(&self.dir)
            .ok()
            .flatten()
            .map(|(l, _)| l.0);
        let (segs, bytes) = std::fs::read_dir(self.dir.join("log"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .fold((0u64, 0u64), |(n, b), m| (n + 1, b + m.len()))
            })
            .unwrap_or((0, 0));
        serde_json::json!({
            "role": "primary",
            "db": self.db_path,
            "lsn": st.pos.lsn.0.max(self.read_position().map_or(0, |p| p.lsn.0)),
            "generation": st.pos.generation.0,
            "lineage": st.log.meta().lineage,
            "checksum": st.sums.total().to_string(),
            "wal": {"frame": st.pos.frame, "salts": hex(&st.pos.salts)},
            "log": {
                "dir": self.dir.display().to_string(),
                "first_lsn": Log::first_segment_lsn(&self.dir).ok().flatten().map(|l| l.0),
                "last_lsn": st.log.last().map(|m| m.lsn.0),
                "durable_lsn": durable,
                "segments": segs,
                "bytes": bytes,
            },
            "snapshot": crate::txlog::newest_snapshot(&self.dir).ok().flatten()
                .map(|(l, b)| serde_json::json!({"lsn": l.0, "bytes": b})),
            "settings": maintenance::load_policy(&self.dir).ok().map(|p| maintenance::policy_json(&p)),
            "server": lock(&self.server).as_ref().map(|s| serde_json::json!({
                "addr": s.addr().to_string(),
                "url": format!("http://{}", s.addr()),
                "auth": s.has_token(),
                "exec_auth": s.has_exec_token(),
                "followers": s.followers_json(),
            })),
            "captured_txns": st.captured_txns,
            "gaps": st.gaps,
            "last_error": st.last_error,
        })
    }
}

enum Plan {
    Nothing,
    Reset,
    /// Reset if the database file equals the captured state, else a gap (the reason).
    ResetIfDbMatches(String),
    /// Capture frames start..=mxFrame; with `check`, only if they pass it (else a gap).
    Frames {
        start: u32,
        running: (u32, u32),
        check: Option<IntentCheck>,
    },
    Gap(String),
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = f.read_exact_at(&mut b, 0);
    }
    hex(&b)
}

fn file_identity(p: impl AsRef<std::path::Path>) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

//! Live apply (E.2, E.8): the applier's connection and WAL handle, the WAL write lock, deriving
//! the applied LSN from the live content, and writing one planned batch as one replica commit.

use super::apply::{append_commit, ApplyError};
use super::plan::{plan_batch, BatchPlan, PlanError};
use super::position::Applied;
use super::{log_event, Replica, State, BATCH_BYTES, WRITE_LOCK_WAIT};
use crate::error::{Error, Result};
use crate::ffi::conn::OwnedDb;
use crate::transport::Fetch;
use crate::txlog::DbChecksum;
use crate::types::{PageNo, PageSize};
use crate::vfs::{AgentHandle, LiveShm};
use crate::wal::{self, hash_lookup_checked, shm_read_header, WalIndexHeader, SLOT_WRITE};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

impl Replica {
    /// Fetch (or take the follower's `prefetched` records), plan and write batches until the
    /// source has nothing more (`only_prefetched`: nothing beyond what was given), reloading
    /// and re-snapshotting on the way when the live content is not what was applied.
    pub(super) fn apply_available(
        &self,
        st: &mut State,
        mut prefetched: Option<Vec<crate::txlog::Record>>,
        only_prefetched: bool,
    ) -> Result<()> {
        let mut forked_once = false;
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
                // The snapshot came from the source: its epoch is this replica's now.
                if let Some((e, _)) = st.pending_epoch {
                    self.adopt_epoch(st, e)?;
                }
                continue;
            }
            if st.pending_epoch.is_some() {
                // The source is a newer epoch's primary (issue 16): prefix or rewind.
                self.switch_epoch(st)?;
                continue;
            }
            let pre = prefetched
                .take()
                .filter(|v| v.first().is_some_and(|r| r.meta.lsn == st.lsn.next()));
            let fetched = match pre {
                Some(v) => Fetch::Records(v),
                None if only_prefetched => break,
                None => {
                    let _net = self.network_call(st);
                    st.source
                        .as_ref()
                        .expect("set")
                        .fetch(st.lsn.next(), BATCH_BYTES)
                }
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
            self.check_record_epochs(st, &records)?;
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
                Err(PlanError::Sequence(m))
                    if !forked_once && records[0].meta.generation > st.generation =>
                {
                    // The source moved to a newer generation at or below this replica's LSN:
                    // the replica holds an LSN of a history the primary lost (a primary that
                    // reused it, before issue 14's fix, or records it lost below its
                    // watermark). Its content cannot be trusted past the fork: re-snapshot,
                    // once per call (a source that stays inconsistent is an error below).
                    forked_once = true;
                    let why = format!(
                        "{m}: the source's generation {} started at or below the replica's LSN {}                          (the replica holds records of a history the primary lost)",
                        records[0].meta.generation, st.lsn
                    );
                    self.resnapshot(st, &why)?;
                }
                Err(PlanError::Sequence(m)) => {
                    st.loaded = false;
                    return Err(Error::Corrupt(format!(
                        "{m}; the source's log is inconsistent"
                    )));
                }
            }
        }
        Ok(())
    }

    /// E.1 step 2: the applier's own SQLite connection (the host's underlying VFS, not ours)
    /// keeps the wal-index alive, runs stock recovery when needed and does the checkpoints.
    pub(super) fn ensure_open(&self, st: &mut State) -> Result<()> {
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
    pub(super) fn recover(&self, st: &State) {
        if let Some(c) = &st.ckpt {
            let _ = c.db().query_value("PRAGMA schema_version");
        }
    }

    /// Take WRITE through our handle (recovering an invalid header on the way).
    pub(super) fn write_locked<'a>(&'a self, st: &State) -> Result<LiveShm<'a>> {
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
    pub(super) fn load(&self, st: &mut State) -> Result<()> {
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

    /// Write one planned batch as one replica commit and record the new position.
    /// Sets `loaded = false` without writing when the live content must be re-verified first
    /// (the sync loop then reloads and re-plans).
    pub(super) fn write_plan(&self, st: &mut State, plan: &BatchPlan) -> Result<()> {
        let r = self.write_plan_inner(st, plan);
        if !matches!(r, Ok(true)) {
            st.loaded = false; // sums were advanced by the plan: re-derive them next time
        }
        r.map(|_| ())
    }

    /// Ok(false): nothing written, the content must be re-verified (see below).
    pub(super) fn write_plan_inner(&self, st: &mut State, plan: &BatchPlan) -> Result<bool> {
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
                st.stats.foreign_writes += 1;
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
            st.stats.restarts_seen += 1;
        }
        st.last_hdr = Some(h);
        // E.5: durable before the position says so (published already: readers did not wait).
        wal.sync_data()
            .map_err(|e| Error::io("syncing the replica's WAL", e))?;
        st.lsn = plan.last_lsn;
        st.generation = plan.generation;
        st.page_size = Some(plan.page_size);
        st.stats.batches += 1;
        st.stats.last_batch = Some((
            plan.first_lsn,
            plan.last_lsn,
            plan.pages.len(),
            plan.has_snapshot,
        ));
        st.stats.last_record_ms = Some(plan.timestamp_ms);
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
}

/// Read page `p` of the state published in `h`: the newest WAL frame ≤ mxFrame holding it
/// (WRITE is held, so no restart can reuse the frame), else the database file. `ps` None reads
/// just `buf.len()` bytes (page 1's header before the page size is known).
pub(super) fn read_page_into(
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

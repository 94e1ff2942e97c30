//! Capture (WAL.md §D.1, D.2 T1/T2): under the WAL WRITE lock, turn every transaction
//! committed beyond the capture position into one log record, or, when continuity cannot be
//! proven (`plan.rs`), start a new generation with a snapshot (`snapshot.rs`). Adopts records
//! appended by other processes first (the log and the position file are shared).

use super::plan::{self, Plan};
use super::position::{Intent, IntentCheck, Position};
use super::{apply_to_sums, lock, log_event, read_header, Capture, Primary};
use crate::error::{Error, Result};
use crate::txlog::{Page, Record, RecordMeta};
use crate::types::{PageNo, PageSize};
use crate::util::now_ms;
use crate::vfs::{DbFileIo, Witness as T1Witness};
use crate::wal::{FrameReader, WalHeader, WalIndexHeader};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Primary {
    /// Adopt records appended by other processes, then append every claimed transaction the
    /// log lacks (the append lock held; WRITE held, or the claimed frames are kept by the
    /// restart hook: see `append`).
    pub(super) fn sync_shared(
        &self,
        st: &mut Capture,
        h: &WalIndexHeader,
        force: bool,
    ) -> Result<()> {
        let fp = self.read_position();
        let claim = self.read_claim();
        let claim_ahead = |st: &Capture| {
            claim.is_some_and(|c| c.generation == st.pos.generation && c.lsn > st.pos.lsn)
        };
        if !force && st.loaded && fp == Some(st.pos) && !claim_ahead(st) {
            return Ok(());
        }
        if force || fp != Some(st.pos) {
            let new = st.log.refresh_for_append()?;
            for r in &new {
                apply_to_sums(&mut st.sums, r);
                st.pos = Position::from_meta(&r.meta);
                st.page_size = Some(r.meta.page_size);
            }
            if let Some(fp) = fp {
                if fp.lsn == st.pos.lsn && fp.generation == st.pos.generation {
                    st.pos = fp;
                } else if fp.lsn > st.pos.lsn && fp.generation >= st.pos.generation {
                    // The position file names records the log does not hold: its tail was
                    // lost or torn (recover.rs).
                    self.recover_lost_tail(st, fp, h, false)?;
                    self.check_served_tail(st);
                }
            }
        }
        if claim_ahead(st) {
            // Committed and claimed (the fast T2), not appended yet: append them now, from
            // the WAL, under the LSNs claimed (checked: the frames must chain to the claim).
            let c = claim.expect("claim_ahead");
            // `h` may predate the claim (an append pass reads it first): a header read now,
            // after the claim, shows at least the claimed frames — or other salts, when the
            // WAL was restarted over them. A header that cannot be read right now (a writer is
            // between its two copies) or that still shows less than the claim is no evidence
            // of anything: leave the append to the next pass, never call the claim lost.
            let fresh;
            let h = if c.salts == h.salts && c.frame <= h.mx_frame {
                h
            } else {
                let Some(x) = (0..1000).find_map(|_| {
                    let x = read_header(&self.agent);
                    if x.is_none() {
                        std::hint::spin_loop();
                    }
                    x
                }) else {
                    return Ok(());
                };
                if x.salts == c.salts && x.mx_frame < c.frame {
                    return Ok(());
                }
                fresh = x;
                &fresh
            };
            let flag = self.append_flag();
            if let Some(f) = flag {
                f.store(crate::sys::pid().max(1), Ordering::Release);
            }
            let before = st.pos.lsn;
            crate::sys::fault_point("append-before-records");
            // In batches of at most `recover::BATCH_BYTES` of pages.
            loop {
                let at = st.pos.lsn;
                self.recover_lost_tail(st, c, h, true)?;
                if st.pos.lsn == at || st.pos.lsn >= c.lsn {
                    break;
                }
            }
            // Not provable from the WAL (a writer without the extension restarted it over
            // them): the capture under WRITE answers with a gap; appenders stop trying.
            st.unprovable = (st.pos.lsn < c.lsn).then_some(c);
            if st.pos.lsn != before {
                st.captured_txns += st.pos.lsn.0 - before.0;
                crate::sys::fault_point("append-before-position");
                self.save_position(st)?;
                if self.wal_synced_lsn.load(Ordering::Acquire) >= st.pos.lsn.0 && !st.pending {
                    // The commits claiming these synced the WAL (synchronous=FULL): the round
                    // only fsyncs the segments and raises the watermark.
                    st.synced = Some(st.pos);
                } else {
                    st.pending = true;
                }
            }
            if let Some(f) = flag {
                f.store(0, Ordering::Release);
            }
        }
        Ok(())
    }

    /// T1: this process's connection just took WRITE.
    pub fn on_write_locked(&self, io: &dyn DbFileIo) -> T1Witness {
        let Some(h) = read_header(io) else {
            return T1Witness {
                caught_up: false,
                refuse: false,
                change: 0,
                fast: false,
            }; // recovery about to run; T2 handles it
        };
        if let Some(w) = self.fast_write_locked(&h) {
            return w;
        }
        let mut st = lock(&self.state);
        self.capture(&mut st, io, &h, false, false);
        // Caught up = the position is the header: anything this WRITE session publishes is
        // then ours. (Not tied to last_error: a past gap must not poison later sessions.)
        let caught_up = st.loaded && st.pos.salts == h.salts && st.pos.frame == h.mx_frame;
        if caught_up {
            // Tell whoever holds WRITE next, should this process die before T2, that what
            // follows this position is this session's work (at most one transaction).
            self.write_intent(Some(&Intent {
                pid: crate::sys::pid(),
                salts: h.salts,
                frame: h.mx_frame,
                change: h.change,
                lsn: st.pos.lsn,
                generation: st.pos.generation,
            }));
        }
        // The log cannot be written (disk full, an I/O error): at most the one transaction
        // already committed is missing from it (kept in the WAL, which no writer of ours can
        // restart while this holds), so refuse further writes until the log catches up.
        let refuse = !caught_up && st.log_failures > 0;
        if refuse {
            self.log_refusal(&st.last_error.clone().unwrap_or_default());
        }
        T1Witness {
            caught_up,
            refuse,
            change: h.change,
            fast: false,
        }
    }

    pub(super) fn log_refusal(&self, error: &str) {
        log_event(&format!(
            "event=write_refused db={:?} reason=\"the replication log cannot be written\" error={error:?}",
            self.db_path,
        ));
    }

    /// T2: the connection holding WRITE is about to release it. Returns the LSN this session
    /// committed, if it committed one.
    pub fn on_write_unlocking(
        &self,
        io: &dyn DbFileIo,
        w: Option<T1Witness>,
        wal_synced: bool,
    ) -> Option<u64> {
        let Some(h) = read_header(io) else {
            lock(&self.state).last_error =
                Some("wal-index header invalid at write-lock release".into());
            return None;
        };
        if let Some(w) = w.filter(|w| w.fast) {
            if let Some(committed) = self.fast_write_unlocking(&h, &w, wal_synced) {
                return committed;
            }
        }
        let witnessed = w.is_some_and(|w| w.caught_up);
        let mut st = lock(&self.state);
        // Nobody else can have appended since a slow T1: we held WRITE all along. (A fast T1
        // did not look at the log: claimed records may wait for their append.)
        st.skip_shared_once = witnessed && !w.is_some_and(|w| w.fast);
        let before = self.read_claim().map(|c| c.lsn);
        self.capture(&mut st, io, &h, witnessed, witnessed && wal_synced);
        // Our own intent (or a dead session's, resolved by this capture) is done with once the
        // position is the header; if capture failed it stays, and the next WRITE holder treats
        // the frames as this (then dead or failed) session's.
        self.clear_intent_if_caught_up(&st, &h);
        let after = st.pos.lsn;
        (witnessed && before.is_some_and(|b| after > b)).then_some(after.0)
    }

    /// Capture everything between the position and header `h` (WRITE held by the caller).
    pub(super) fn capture(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        witnessed: bool,
        durable: bool,
    ) {
        let _append = match self.append_lock() {
            Ok(g) => g,
            Err(e) => {
                st.last_error = Some(e.to_string());
                return;
            }
        };
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
        let claim_before = self.read_claim();
        let synced = self.sync_shared(st, h, died_mid_append);
        // A witnessed session's frames follow the claim its T1 saw: if that claim could not
        // be appended (its frames are gone), what follows the log's tail is not ours alone.
        let witnessed = witnessed
            && claim_before
                .is_none_or(|c| c.lsn == st.pos.lsn && c.generation == st.pos.generation);
        if let Err(e) = synced {
            self.capture_failed(st, e);
            return;
        }
        if let Some(c) = st.unprovable.filter(|c| Some(*c) == self.read_claim()) {
            // Committed and claimed, but their frames are gone before their append (a process
            // without the extension restarted or truncated the WAL): whatever the WAL shows
            // now, the log lacks them. A gap: its snapshot holds them (a restart or a
            // truncation needs a complete checkpoint first, so they are in the database file).
            st.force_gap.get_or_insert_with(|| {
                format!(
                    "transactions {}..={} were committed and claimed, but their WAL frames were                      overwritten before their append (a process without the extension restarted                      or truncated the WAL)",
                    st.pos.lsn.next(),
                    c.lsn
                )
            });
        }
        if let Some(f) = flag {
            f.store(crate::sys::pid().max(1), Ordering::Release);
        }
        let mut r = self.capture_once(st, io, h, witnessed);
        if matches!(r, Err(Error::OutOfSequence(_) | Error::StaleHandle(_))) {
            // The log does not continue where our handle thinks (check_sequence refused, or
            // another writer appended behind our handle).
            r = self
                .sync_shared(st, h, true)
                .and_then(|_| self.capture_once(st, io, h, witnessed));
        }
        match r {
            Ok(()) => {
                if let Some(f) = flag {
                    f.store(0, Ordering::Release);
                }
                if st.log_failures > 0 {
                    log_event(&format!(
                        "event=capture_resumed db={:?} failures={} lsn={}",
                        self.db_path, st.log_failures, st.pos.lsn
                    ));
                }
                st.log_failures = 0;
                self.append_failing.store(false, Ordering::Release);
                st.snapshot_retry_after = None;
                st.t3_retry_after = None;
                // Everything committed is in the log: the claim is the position again.
                self.publish_claim(st);
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
                    // Schedule a round only for the first record of a round: later commits
                    // join the same round at no cost to the commit path.
                    if !st.round_scheduled {
                        st.round_scheduled = true;
                        super::workers::schedule(&self.me);
                    }
                }
            }
            Err(e) => self.capture_failed(st, e),
        }
    }

    fn capture_failed(&self, st: &mut Capture, e: Error) {
        st.last_error = Some(e.to_string());
        log_event(&format!(
            "event=capture_error db={:?} error={:?}",
            self.db_path,
            e.to_string()
        ));
        // A failed append (or snapshot) may have left the per-page checksums, and `pos`, ahead
        // of what the log holds: rebuild both from the log (the truth) at the next capture
        // instead of stamping later records with a wrong checksum.
        st.loaded = false;
        if matches!(e, Error::Io { .. }) {
            // Writes are refused (T1) until a capture succeeds. An append is retried at every
            // write lock (cheap); a gap snapshot only after a backoff (`new_generation`).
            st.log_failures = st.log_failures.saturating_add(1);
            let wait = std::time::Duration::from_millis(50)
                .saturating_mul(1 << st.log_failures.min(7))
                .min(std::time::Duration::from_secs(5));
            st.t3_retry_after = Some(std::time::Instant::now() + wait);
        }
    }

    /// A WAL reset nobody witnessed: when the database file shows the captured state
    /// (`matches`), the position moves to the empty WAL with no LSN; otherwise it is a gap.
    fn reset_or_gap(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        matches: Result<bool>,
        why: &str,
    ) -> Result<()> {
        if matches? {
            st.pos.salts = h.salts;
            st.pos.frame = 0;
            st.pos.cksum = (0, 0);
            self.save_position(st)
        } else {
            self.new_generation(st, io, h, why)
        }
    }

    pub(super) fn capture_once(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        witnessed: bool,
    ) -> Result<()> {
        if let Some(why) = st.force_gap.clone() {
            self.new_generation(st, io, h, &why)?;
            st.force_gap = None;
            return Ok(());
        }
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
            Ok(Plan::ResetIfPage1Matches(why)) => {
                let matches = self.db_page1_matches(st, io);
                self.reset_or_gap(st, io, h, matches, &why)
            }
            Ok(Plan::ResetIfDbMatches(why)) => {
                let matches = self.db_file_matches(st, io);
                self.reset_or_gap(st, io, h, matches, &why)
            }
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

    /// Read what the capture decision needs (under WRITE) and take it (`plan::plan`).
    fn plan(&self, st: &mut Capture, h: &WalIndexHeader, witnessed: bool) -> Result<Plan> {
        let intent = if witnessed { None } else { self.read_intent() };
        // The WAL header is read (and its salts checked) whenever the WAL has frames, before
        // anything is decided: a WAL that cannot be read as the wal-index says is a gap.
        let wal_cksum = if h.mx_frame == 0 {
            (0, 0)
        } else {
            self.wal_header(st, h.salts)?.cksum
        };
        Ok(plan::plan(&plan::Inputs {
            pos: st.pos,
            header: h,
            witnessed,
            intent,
            wal_cksum,
        }))
    }

    pub(super) fn wal_file(&self, st: &mut Capture) -> Result<Arc<File>> {
        if st.wal.is_none() {
            let p = format!("{}-wal", self.db_path);
            let f = File::open(&p).map_err(|e| Error::io(format!("opening {p}"), e))?;
            st.wal = Some(Arc::new(f));
        }
        Ok(st.wal.clone().expect("set above"))
    }

    /// The WAL header whose salts are `salts` (cached per generation).
    pub(super) fn wal_header(&self, st: &mut Capture, salts: [u8; 8]) -> Result<WalHeader> {
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
    pub(super) fn capture_frames(
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
                injected_append_failure()?;
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

    pub(super) fn txn_record(
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
                epoch: st.log.meta().epoch,
            },
            pages,
        }
    }
}

/// Test fault injection (`REPL_FAULT_FAIL_AT=log-append:<n>`): the n-th append to the log fails
/// as an I/O error would, after its record was built.
pub(super) fn injected_append_failure() -> Result<()> {
    if crate::sys::fault_fails("log-append") {
        return Err(Error::io(
            "appending to the log (REPL_FAULT_FAIL_AT)",
            std::io::Error::other("injected failure"),
        ));
    }
    Ok(())
}

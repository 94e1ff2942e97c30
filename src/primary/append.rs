//! Asynchronous capture (issue 14): the commit path only *claims* the next LSN; an append pass
//! on the shared workers reads the claimed frames from the WAL and appends their records.
//!
//! **The claim** is a position (LSN, generation, WAL salts, frame, running checksum) in the
//! shared mapping of the position file (`position.rs`), next to the write intent: the capture
//! position including the transactions committed but not appended yet. Only a WRITE holder
//! writes it, so it moves in commit order across processes:
//!
//! * **fast T1** (`fast_write_locked`): the claim equals the wal-index header (everything
//!   committed is claimed) → caught up; store the intent as before. Memory loads and stores.
//! * **fast T2** (`fast_write_unlocking`): same salts as the claim and iChange + 1 (one commit,
//!   no restart: a restart changes the salts) → the claim becomes
//!   (LSN + 1, header's mxFrame and frame checksum); no commit (iChange unchanged, same
//!   mxFrame) → nothing. Anything else takes the synchronous path of `capture.rs`.
//! * **append pass** (`append_pass`, any process, no WRITE): under the append lock (an flock
//!   on `<dir>/append.lock`, never a WAL lock, so applications never wait for it) adopt what
//!   others appended, then re-capture the frames after the log's tail up to the claim with the
//!   proof of `recover.rs` (they must chain to the claim's frame and checksum and hold exactly
//!   the claimed number of transactions), append them, write the position file.
//! * **frames cannot disappear first**: frames are overwritten only by a WAL restart or cut by
//!   a TRUNCATE checkpoint, and SQLite asks for READ1..READ4 exclusively right before either.
//!   The shim hands that request to `before_wal_restart`, which appends everything claimed
//!   first, or refuses (SQLITE_BUSY: SQLite then keeps appending to the WAL, or reports the
//!   checkpoint busy) when the log cannot be written. A process without the extension can still
//!   restart the WAL over claimed frames: the pass then cannot prove them and the next capture
//!   under WRITE answers with a gap (they were never in the log, never served: no LSN reuse).
//! * **crash**: the claim lives in a file mapping, so it survives the process; the next append
//!   pass or WRITE holder of any process appends from the WAL what the log lacks. A process
//!   killed between its commit and its claim leaves the intent, resolved as before.
//! * **readers** of "what is in the log" (`repl_lsn()`, `repl_checksum()`, `repl_status()`,
//!   the last close) run a pass first.
//! * **bound**: while the log cannot be written the claims run ahead of it; at
//!   `capture_lag_max` claimed-but-unappended transactions T1 refuses writes with SQLITE_FULL
//!   (and while it can be written, a writer that far ahead appends itself: back-pressure).

use super::position::Position;
use super::{lock, log_event, read_header, Capture, Primary};
use crate::error::{Error, Result};
use crate::vfs::Witness;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long an append pass waits before looking again while commits keep coming, and how many
/// empty looks end it (then the next commit wakes the workers again).
const LINGER: Duration = Duration::from_micros(200);
const LINGER_LOOKS: u32 = 10;

/// The append lock: an flock on `<dir>/append.lock`, released on drop.
pub(super) struct AppendGuard<'a>(&'a File);

impl Drop for AppendGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl Primary {
    /// Take the append lock (blocks while another process appends: microseconds).
    pub(super) fn append_lock(&self) -> Result<AppendGuard<'_>> {
        let f = self.append_lockf.get_or_try_init(|| {
            let p = self.dir.join("append.lock");
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(|e| Error::io(format!("opening {}", p.display()), e))
        })?;
        f.lock().map_err(|e| Error::io("locking append.lock", e))?;
        Ok(AppendGuard(f))
    }

    /// After a capture under WRITE left everything committed in the log: the claim is the
    /// position again, and the commit path may take the fast way (unless a new generation is
    /// owed).
    pub(super) fn publish_claim(&self, st: &mut Capture) {
        if st.loaded {
            st.unprovable = None;
            self.store_claim(&st.pos);
            self.fast.store(st.force_gap.is_none(), Ordering::Release);
        }
    }

    /// Fast T1 (see the module doc); `None` = take the synchronous path.
    pub(super) fn fast_write_locked(&self, h: &crate::wal::WalIndexHeader) -> Option<Witness> {
        if !self.fast.load(Ordering::Acquire) {
            return None;
        }
        let c = self.read_claim()?;
        if c.salts != h.salts || c.frame != h.mx_frame {
            return None;
        }
        let appended = self.read_position()?;
        if appended.generation != c.generation || appended.lsn > c.lsn {
            return None;
        }
        if c.lsn.0 - appended.lsn.0 >= self.lag_max.load(Ordering::Relaxed) {
            // The log is far behind: append here (back-pressure), or, when it cannot be
            // written, refuse the write before anything is written.
            if !self.append_failing.load(Ordering::Acquire) {
                let mut st = lock(&self.state);
                let _ = self.append_pass(&mut st);
            }
            let appended = self.read_position()?;
            if c.lsn.0.saturating_sub(appended.lsn.0) >= self.lag_max.load(Ordering::Relaxed) {
                let err = lock(&self.state).last_error.clone().unwrap_or_default();
                self.log_refusal(&err);
                self.kick_appender();
                return Some(Witness {
                    caught_up: false,
                    refuse: true,
                    change: h.change,
                    fast: false,
                });
            }
        }
        self.write_intent(Some(&super::position::Intent {
            pid: crate::sys::pid(),
            salts: h.salts,
            frame: h.mx_frame,
            change: h.change,
            lsn: c.lsn,
            generation: c.generation,
        }));
        Some(Witness {
            caught_up: true,
            refuse: false,
            change: h.change,
            fast: true,
        })
    }

    /// Fast T2 (see the module doc): `Some(the LSN committed, if any)`; `None` = take the
    /// synchronous path.
    pub(super) fn fast_write_unlocking(
        &self,
        h: &crate::wal::WalIndexHeader,
        w: &Witness,
        wal_synced: bool,
    ) -> Option<Option<u64>> {
        let c = self.read_claim()?;
        if c.salts != h.salts {
            return None;
        }
        if h.change == w.change && h.mx_frame == c.frame {
            self.write_intent(None); // no commit
            return Some(None);
        }
        if h.change != w.change.wrapping_add(1) || h.mx_frame <= c.frame {
            return None;
        }
        crate::sys::fault_point("t2-before-claim");
        self.store_claim(&Position {
            lsn: c.lsn.next(),
            generation: c.generation,
            salts: h.salts,
            frame: h.mx_frame,
            cksum: h.frame_cksum,
        });
        if wal_synced {
            // Every WAL write of this process, this commit's last, is synced: so is every
            // frame before it (fdatasync is per file), whoever wrote them.
            self.wal_synced_lsn.fetch_max(c.lsn.0 + 1, Ordering::AcqRel);
        }
        crate::sys::fault_point("t2-after-claim");
        self.write_intent(None);
        self.kick_appender();
        Some(Some(c.lsn.0 + 1))
    }

    /// Make sure an append pass will run (a futex wake only when none is queued or lingering).
    pub(super) fn kick_appender(&self) {
        if !self.append_scheduled.swap(true, Ordering::SeqCst) {
            self.append_idle.store(0, Ordering::Relaxed);
            super::workers::schedule_append(&self.me);
        }
    }

    /// Is the claim ahead of the position file (transactions waiting for their append)?
    fn claim_pending(&self) -> bool {
        match (self.read_claim(), self.read_position()) {
            (Some(c), Some(p)) => c.generation == p.generation && c.lsn > p.lsn,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// One append pass on a worker. `Some(delay)`: run again after it.
    pub(super) fn run_append(&self) -> Option<Duration> {
        let _b = lock(&self.append_busy);
        if self.stop.load(Ordering::Acquire) {
            self.append_scheduled.store(false, Ordering::SeqCst);
            return None;
        }
        let r = {
            let mut st = lock(&self.state);
            self.append_pass(&mut st)
        };
        match r {
            Ok(true) => {
                self.append_idle.store(0, Ordering::Relaxed);
                self.maybe_assist_checkpoint();
                Some(LINGER)
            }
            Ok(false) => {
                if self.append_idle.fetch_add(1, Ordering::Relaxed) + 1 < LINGER_LOOKS {
                    return Some(LINGER);
                }
                // Done lingering. A claim stored after the flag is cleared kicks again; one
                // stored before it is seen here.
                self.append_scheduled.store(false, Ordering::SeqCst);
                if self.claim_pending() && !self.append_scheduled.swap(true, Ordering::SeqCst) {
                    self.append_idle.store(0, Ordering::Relaxed);
                    return Some(LINGER);
                }
                None
            }
            Err(_) => {
                // The log cannot be written: retry with a backoff (50 ms doubling to 1 s).
                let n = lock(&self.state).log_failures;
                Some(
                    Duration::from_millis(50)
                        .saturating_mul(1 << n.min(5))
                        .min(Duration::from_secs(1)),
                )
            }
        }
    }

    /// Append every claimed transaction the log lacks (no WRITE needed; see the module doc).
    /// `Ok(true)` when records were appended.
    pub(super) fn append_pass(&self, st: &mut Capture) -> Result<bool> {
        if !self.claim_pending() || (st.unprovable.is_some() && self.read_claim() == st.unprovable)
        {
            return Ok(false);
        }
        let Some(h) = read_header(&self.agent) else {
            return Ok(false);
        };
        let _g = self.append_lock()?;
        let flag = self.append_flag();
        let died_mid_append = flag.is_none_or(|f| f.load(Ordering::Acquire) != 0);
        st.log.trust_tail(flag.is_some());
        let before = st.pos.lsn;
        let r = (|| -> Result<()> {
            if !st.loaded {
                // A failed append left the checksums unknown: rebuild them from the log.
                self.load_state(st, &h)?;
                st.loaded = true;
            }
            self.sync_shared(st, &h, died_mid_append)
        })();
        if st.force_gap.is_some() {
            // Served records were lost: the next capture under WRITE starts a new generation.
            self.fast.store(false, Ordering::Release);
        }
        match r {
            Ok(()) => {
                if st.log_failures > 0 {
                    log_event(&format!(
                        "event=capture_resumed db={:?} failures={} lsn={}",
                        self.db_path, st.log_failures, st.pos.lsn
                    ));
                    st.log_failures = 0;
                    st.t3_retry_after = None;
                }
                self.append_failing.store(false, Ordering::Release);
                let appended = st.pos.lsn != before;
                if appended && !st.pending && st.synced.is_none() {
                    st.pending = true; // adopted from another process
                }
                if appended && !st.round_scheduled {
                    st.round_scheduled = true;
                    super::workers::schedule(&self.me);
                }
                Ok(appended)
            }
            Err(e) => {
                st.last_error = Some(e.to_string());
                st.loaded = false;
                if matches!(e, Error::Io { .. }) {
                    if st.log_failures == 0 {
                        log_event(&format!(
                            "event=capture_error db={:?} error={:?}",
                            self.db_path,
                            e.to_string()
                        ));
                    }
                    st.log_failures = st.log_failures.saturating_add(1);
                    self.append_failing.store(true, Ordering::Release);
                } else {
                    log_event(&format!(
                        "event=capture_error db={:?} error={:?}",
                        self.db_path,
                        e.to_string()
                    ));
                }
                Err(e)
            }
        }
    }

    /// Run an append pass now, in the calling thread (readers of the log, the last close).
    pub(super) fn append_now(&self) {
        if self.claim_pending() {
            let _ = self.append_pass(&mut lock(&self.state));
        }
    }

    /// For T3: claimed transactions wait for their append (`Some(false)`: kick the appender),
    /// or cannot be proven from the WAL any more (`Some(true)`: a capture under WRITE must
    /// answer with a gap).
    pub(super) fn claim_state(&self) -> Option<bool> {
        if !self.claim_pending() {
            return None;
        }
        let st = lock(&self.state);
        Some(st.unprovable.is_some() && self.read_claim() == st.unprovable)
    }

    /// The shim's restart hook: the connection holding WRITE is about to restart or truncate
    /// the WAL. Append everything claimed first; `false` (refuse) when that fails.
    pub fn before_wal_restart(&self) -> bool {
        if !self.claim_pending() {
            return true;
        }
        crate::sys::fault_point("restart-before-append");
        self.append_now();
        !self.claim_pending()
    }
}

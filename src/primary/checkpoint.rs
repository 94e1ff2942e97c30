//! Checkpoint assist: the primary checkpoints its WAL in the background, so the application's
//! commits rarely pay for it.
//!
//! SQLite runs an automatic checkpoint in the committing thread once the WAL holds
//! `wal_autocheckpoint` frames (1000 by default): the WAL fsync, the copy of the changed pages
//! into the database and its fsync, about a quarter of a small commit's cost at
//! `synchronous=NORMAL` on our test VM. A primary's append pass (`append.rs`) already looks at
//! the wal-index after every batch; when the WAL holds `checkpoint_assist` frames (a setting,
//! default 500, 0 = off) and a good share of them are not backfilled yet, it asks the
//! "repl-checkpoint" thread for a `PRAGMA wal_checkpoint(PASSIVE)` on a short-lived connection
//! of its own.
//!
//! **The hand-off.** SQLite's automatic checkpoint of a commit is taken over too while the
//! WAL holds 1,000 (SQLite's default threshold) to 4,000 frames, at `synchronous=NORMAL`:
//! the shim sees a connection ask for the checkpoint lock right after its commit (no other
//! lock in between but the release of its read mark), answers SQLITE_BUSY — which the
//! automatic checkpoint ignores, as it does whenever another connection is checkpointing —
//! and schedules the assist (`checkpoint_handoff`). This is what Litestream's writer gains
//! from Litestream's read lock (its checkpoints become no-ops), without holding anything.
//! Past 4,000 frames the writer's own checkpoint runs (once no assist run holds the lock),
//! copies what the assist has not, and its next commit restarts the WAL: a writer committing
//! back to back never leaves the assist a moment with nothing left to copy, and a stuck
//! assist cannot let the WAL grow. Not for a commit that synced the WAL
//! (`synchronous=FULL`): each commit's fsync would then meet a WAL growing past 1,000 frames,
//! and an fsync of a growing file also commits its size (measured: 1.9× plain at FULL with
//! the hand-off, 1.05× without; the checkpoint is a small share of a FULL commit anyway).
//!
//! Why this is safe and changes nothing the application can rely on:
//! * **PASSIVE** never waits for a lock; it never restarts or truncates the WAL (only a writer
//!   or a RESTART/TRUNCATE checkpoint does, and those still go through the shim's restart
//!   hook). A checkpoint the application asks for itself (any mode) is not held back: nothing
//!   here holds a read mark or a lock between runs, and the hand-off answers busy only to the
//!   checkpoint lock a connection asks for right after committing with 1,000..4,000 frames in
//!   the WAL, i.e. SQLite's automatic checkpoint. Not told apart: an application that raised
//!   or disabled `wal_autocheckpoint`, or checkpoints from its own `wal_hook`, and asks for a
//!   checkpoint as the very next thing after a commit in that window; that one checkpoint is
//!   answered busy (as it could be by any concurrent checkpointer) and the assist runs it.
//! * **No busy from a run.** A checkpoint the application asks for takes the checkpoint lock
//!   without a busy handler, so one that met an assist run holding it failed at once (a
//!   TRUNCATE right after a burst of commits, typically). The shim now retries it while a run
//!   is in progress (bounded, like WRITE below), so it waits for the run instead.
//! * **WRITE for a moment.** Like any SQLite reader, the assist's connection takes the WAL
//!   WRITE lock for a moment when it reads a wal-index header that a commit is rewriting (to
//!   check whether recovery is needed; the commit has released WRITE by then). An application
//!   writer asking for WRITE in that moment got SQLITE_BUSY, which a single-connection
//!   application without a busy timeout never expects (`make bench` met it once in ~340 runs
//!   of 5000 commits). While a run is in progress the shim therefore retries a busy WRITE
//!   request (`Primary::background_may_hold_write`, `vfs::file::x_shm_lock`), bounded.
//! * The connection is opened through the host's own VFS (as a stock process would: a
//!   checkpoint writes the database file, which the capture never reads), with
//!   `SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE` so closing it never checkpoints or deletes the WAL, and
//!   it is closed after each run, so it never keeps the application's last close from
//!   removing the WAL (or a stock process from changing the journal mode).
//! * Applications that manage checkpoints themselves (`wal_autocheckpoint=0`, their own
//!   `wal_hook`, a copy of the database file that must not change) turn it off with
//!   `repl_config('checkpoint_assist', 0)`, which turns the hand-off off too.

use super::{lock, log_event, Primary};
use crate::error::Result;
use crate::ffi::conn::OwnedDb;
use crate::vfs::DbFileIo;
use crate::wal::{CkptInfo, WalIndexHeader};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What `repl_status()` shows about the assist.
#[derive(Default)]
pub(super) struct CheckpointStats {
    pub(super) runs: u64,
    pub(super) last_error: Option<String>,
}

/// Ask for a checkpoint once the WAL holds `assist` frames of which at least this fraction
/// (1/n) is not backfilled: a run copies a useful batch, and runs do not follow each other
/// back to back while the writer adds a few frames at a time.
const UNBACKFILLED_SHARE: u32 = 4;

/// SQLite's default `wal_autocheckpoint`: below it a checkpoint lock asked for right after a
/// commit is not an automatic one (unless the application lowered the setting, and then it
/// is simply not handed off), so it is never answered busy.
const AUTOCHECKPOINT_DEFAULT: u32 = 1000;

/// Past this many WAL frames an automatic checkpoint is no longer handed off: the writer's
/// own checkpoint (once no assist run holds the checkpoint lock) copies what the assist has
/// not and lets the next commit restart the WAL (a writer committing back to back never
/// leaves the assist a moment with nothing left to copy). 16 MiB of WAL at 4 KiB pages.
const HANDOFF_MAX_FRAMES: u32 = 4000;

/// Is an automatic checkpoint at `mx_frame` frames handed to the assist? (`assist` 0 = off.)
pub(super) fn handoff_due(assist: u64, mx_frame: u32) -> bool {
    assist > 0 && (AUTOCHECKPOINT_DEFAULT..HANDOFF_MAX_FRAMES).contains(&mx_frame)
}

/// Should the assist run, given the WAL's frame count and backfill? (`assist` 0 = off.)
pub(super) fn assist_due(assist: u64, mx_frame: u32, n_backfill: u32) -> bool {
    let Ok(assist) = u32::try_from(assist) else {
        return false;
    };
    assist > 0
        && mx_frame >= assist
        && mx_frame.saturating_sub(n_backfill) >= (assist / UNBACKFILLED_SHARE).max(1)
}

/// Marks a background job that may hold the WAL WRITE lock (`Primary::background_write`).
pub(super) struct BackgroundWrite<'a>(&'a AtomicUsize);

impl Drop for BackgroundWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Primary {
    /// Count a background job of this process that may take WRITE while the value lives.
    pub(super) fn background_write(&self) -> BackgroundWrite<'_> {
        self.bg_write.fetch_add(1, Ordering::SeqCst);
        BackgroundWrite(&self.bg_write)
    }

    /// True while a background job of this process may hold WRITE for a moment: the shim
    /// then retries an application writer's busy WRITE request instead of answering
    /// SQLITE_BUSY (which an application without a busy timeout reports as an error).
    pub fn background_may_hold_write(&self) -> bool {
        self.bg_write.load(Ordering::SeqCst) > 0
    }

    /// SQLite's automatic checkpoint of a commit of this process (the shim's `x_shm_lock`):
    /// while `handoff_due`, the assist runs it instead (scheduled now) and the committing
    /// thread goes on; `false` lets the connection checkpoint itself.
    pub fn checkpoint_handoff(&self, mx_frame: u32) -> bool {
        if !handoff_due(self.ckpt_assist.load(Ordering::Relaxed), mx_frame) {
            return false;
        }
        self.ckpt_handoffs.fetch_add(1, Ordering::Relaxed);
        if !self.ckpt_scheduled.swap(true, Ordering::SeqCst) {
            super::workers::schedule_checkpoint(&self.me);
        }
        true
    }

    /// After an append pass: schedule a background checkpoint when `assist_due`.
    pub(super) fn maybe_assist_checkpoint(&self) {
        let assist = self.ckpt_assist.load(Ordering::Relaxed);
        if assist == 0 {
            return;
        }
        let Some(head) = self.agent.shm_head() else {
            return;
        };
        let Some(h) = WalIndexHeader::read_valid(&head[..96]) else {
            return;
        };
        let ck = CkptInfo::parse(&head);
        if assist_due(assist, h.mx_frame, ck.n_backfill)
            && !self.ckpt_scheduled.swap(true, Ordering::SeqCst)
        {
            super::workers::schedule_checkpoint(&self.me);
        }
    }

    /// One assisted checkpoint, on the "repl-checkpoint" thread.
    pub(super) fn run_assisted_checkpoint(&self) {
        let _b = lock(&self.ckpt_busy);
        if !self.stop.load(Ordering::Acquire) {
            let r = self.checkpoint_passive();
            let mut s = lock(&self.ckpt_stats);
            match r {
                Ok(()) => {
                    s.runs += 1;
                    s.last_error = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if s.last_error.as_deref() != Some(e.as_str()) {
                        log_event(&format!(
                            "event=checkpoint_assist_error db={:?} error={e:?}",
                            self.db_path
                        ));
                    }
                    s.last_error = Some(e);
                }
            }
        }
        self.ckpt_scheduled.store(false, Ordering::SeqCst);
    }

    fn checkpoint_passive(&self) -> Result<()> {
        // Its connection takes WRITE for a moment when it reads a wal-index header a commit
        // is rewriting (SQLite's reader then checks whether recovery is needed, under WRITE):
        // the application's writers wait for that in the shim instead of failing with BUSY.
        let _w = self.background_write();
        let db = OwnedDb::open(
            &self.db_path,
            crate::ffi::SQLITE_OPEN_READWRITE,
            Some(crate::vfs::base_name_cstr()),
        )?;
        db.db()
            .db_config_flag(crate::ffi::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
        db.db().exec("PRAGMA wal_checkpoint(PASSIVE)")
    }

    pub(super) fn checkpoint_json(&self) -> serde_json::Value {
        let s = lock(&self.ckpt_stats);
        serde_json::json!({
            "assist_frames": self.ckpt_assist.load(Ordering::Relaxed),
            "assisted": s.runs,
            "handed_off": self.ckpt_handoffs.load(Ordering::Relaxed),
            "last_error": s.last_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{assist_due, handoff_due};

    #[test]
    fn automatic_checkpoints_are_handed_off_between_the_default_threshold_and_the_bound() {
        assert!(!handoff_due(0, 1500), "assist off: never");
        assert!(
            !handoff_due(500, 999),
            "below SQLite's default threshold: not an automatic checkpoint"
        );
        assert!(handoff_due(500, 1000));
        assert!(handoff_due(500, 3999));
        assert!(
            !handoff_due(500, 4000),
            "past the bound the writer checkpoints"
        );
        assert!(!handoff_due(500, u32::MAX));
    }

    #[test]
    fn assist_runs_past_the_threshold_with_enough_to_copy() {
        assert!(!assist_due(0, 5000, 0), "0 = off");
        assert!(!assist_due(500, 499, 0), "below the threshold");
        assert!(assist_due(500, 500, 0));
        assert!(assist_due(500, 900, 775));
        assert!(
            !assist_due(500, 900, 776),
            "fewer than a quarter left to copy"
        );
        assert!(!assist_due(500, 900, 900), "all backfilled");
        assert!(
            !assist_due(500, 10, 900),
            "backfill past the end (a restart raced)"
        );
        assert!(assist_due(1, 1, 0));
        assert!(
            !assist_due(u64::MAX, u32::MAX, 0),
            "beyond a frame count: never"
        );
    }
}

//! Keeping the replica's WAL bounded (E.6): PASSIVE checkpoints after each sync, and the
//! drain that waits for readers to leave the WAL before it grows past a limit.
//!
//! Drain (E.6): past `REPL_DRAIN_FRAMES` frames (default 4000) the applier stops appending
//! until a checkpoint has backfilled everything and no reader pins the WAL, so the next batch
//! restarts it. It waits at most `REPL_DRAIN_TIMEOUT_MS` (default 2000) for readers, then
//! reports the pinned WAL and goes on appending; while the WAL stays pinned, later syncs only
//! make one attempt each (no wait), so a long reader costs replication lag only once.
//! A PASSIVE checkpoint runs after every batch once the WAL holds a quarter of that.
//! (Both settings are read once, `config::Config`.)

use super::{log_event, Replica, State};
use crate::wal::SLOT_READ1;
use std::time::{Duration, Instant};

impl Replica {
    /// E.6: checkpoint PASSIVE through the applier connection once the WAL is long.
    pub(super) fn maybe_checkpoint(&self, st: &mut State) {
        let long = st
            .last_hdr
            .is_some_and(|h| h.mx_frame >= crate::config::get().drain_frames / 4);
        if let (true, Some(c)) = (long, &st.ckpt) {
            if c.db().exec("PRAGMA wal_checkpoint(PASSIVE)").is_ok() {
                st.stats.checkpoints += 1;
            }
        }
    }

    /// E.6 drain: when the WAL is long, checkpoint until every frame is backfilled and no
    /// reader holds READ1..4 (new readers then read the database file), so the next append
    /// restarts the WAL. Gives up after DRAIN_TIMEOUT and reports the pinning reader.
    pub(super) fn maybe_drain(&self, st: &mut State) {
        let policy = crate::config::get();
        let Some(h) = st.last_hdr.filter(|h| h.mx_frame >= policy.drain_frames) else {
            return;
        };
        let started = Instant::now();
        let deadline = if st.stats.wal_pinned.is_some() {
            started // still pinned at the last sync: one attempt, no wait
        } else {
            started + policy.drain_timeout
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
                st.stats.drains += 1;
                st.stats.wal_pinned = None;
                st.stats.max_drain_ms = st
                    .stats
                    .max_drain_ms
                    .max(started.elapsed().as_millis() as u64);
                return;
            }
            if Instant::now() > deadline {
                let readers = self.pinning_readers();
                let msg = format!(
                    "the replica's WAL holds {} frames and a reader kept it pinned for more than {} s \
                     ({readers}); the WAL grows until that read transaction ends (end long read \
                     transactions on the replica, or raise REPL_DRAIN_TIMEOUT_MS)",
                    h.mx_frame,
                    policy.drain_timeout.as_secs_f64()
                );
                if st.stats.wal_pinned.is_none() {
                    log_event(&format!(
                        "event=wal_pinned db={:?} frames={} waited_ms={} readers={readers:?}",
                        self.db_path,
                        h.mx_frame,
                        started.elapsed().as_millis()
                    ));
                }
                st.stats.wal_pinned = Some(msg);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Which read-mark slots are in use and the frame each reader's snapshot ends at, e.g.
    /// "read-mark 1 at frame 4210" (or why that cannot be told).
    pub(super) fn pinning_readers(&self) -> String {
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
}

//! Fencing (issue 16): a primary that learns of a newer epoch of its lineage — a follower's
//! request header, a forwarded write, `repl_promote()` telling its former source, or simply
//! `<dir>/fence` written by any process — stops accepting writes at once. The shim then refuses
//! the WAL write lock with `SQLITE_READONLY` before anything is written, as on a replica
//! (`DbHooks::read_only`, answered in `roles.rs`), while capture goes on as for any primary;
//! forwarded writes are answered with a message naming the new primary.
//!
//! Cost on the write path: one atomic load (`notify::fence_seq`) compared with the value seen
//! last; the fence file is re-read only when a fence was raised in this process, and once per
//! maintenance pass (about a second) for fences raised by other processes.

use super::{lock, log_event, Primary};
use crate::txlog::{read_fence, Fence};
use crate::types::Epoch;
use std::sync::atomic::Ordering;

/// The fence state of one primary in this process.
#[derive(Default)]
pub(super) struct FenceState {
    /// The fence that deposes this primary (its epoch is newer than the log's), if any.
    pub(super) fence: std::sync::Mutex<Option<Fence>>,
    /// Fast path: `fence` is Some.
    pub(super) fenced: std::sync::atomic::AtomicBool,
    /// `notify::fence_seq()` when the fence file was last read.
    pub(super) seq_seen: std::sync::atomic::AtomicU64,
    /// The log's epoch (fixed for the life of the log: `meta.json` is written once), kept
    /// here so the write path never takes the capture mutex to learn it.
    pub(super) epoch: std::sync::atomic::AtomicU32,
}

impl Primary {
    /// The epoch of this primary's log.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.fence_state.epoch.load(Ordering::Acquire))
    }

    /// Re-reads `<dir>/fence` and records whether it deposes this primary (logged once).
    pub(super) fn reload_fence(&self) {
        let seq = crate::transport::notify::fence_seq();
        let ours = self.epoch();
        let f = read_fence(&self.dir).filter(|f| f.epoch > ours);
        self.fence_state.seq_seen.store(seq, Ordering::Release);
        let mut g = lock(&self.fence_state.fence);
        if let (Some(new), None) = (&f, g.as_ref()) {
            log_event(&format!(
                "event=primary_fenced db={:?} epoch={ours} new_epoch={} new_primary={:?}",
                self.db_path,
                new.epoch,
                new.primary.as_deref().unwrap_or("unknown")
            ));
        }
        self.fence_state
            .fenced
            .store(f.is_some(), Ordering::Release);
        *g = f;
    }

    /// True when a newer epoch is known: this primary must not accept writes.
    pub fn is_fenced(&self) -> bool {
        if crate::transport::notify::fence_seq()
            != self.fence_state.seq_seen.load(Ordering::Acquire)
        {
            self.reload_fence();
        }
        self.fence_state.fenced.load(Ordering::Acquire)
    }

    /// The fence deposing this primary, if any.
    pub fn fence(&self) -> Option<Fence> {
        if !self.is_fenced() {
            return None;
        }
        lock(&self.fence_state.fence).clone()
    }

    /// Why a write is refused on a deposed primary (`SQLITE_READONLY`), naming the new one.
    pub fn fenced_error(&self) -> Option<crate::error::Error> {
        let f = self.fence()?;
        Some(crate::error::Error::ReadOnly(format!(
            "{} is no longer the primary: epoch {} was promoted{} after this primary's epoch {}; \
             writes go to the new primary. To make this database a replica of it, run \
             repl_follow('<new primary URL>') on it",
            self.db_path,
            f.epoch,
            f.primary
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
            self.epoch()
        )))
    }
}

impl Primary {
    /// (LSN, generation, checksum) of the captured state now (loads it under WRITE first when
    /// this process has not yet): what a deposed primary compares with the new epoch's start.
    pub fn position_summary(
        &self,
    ) -> crate::error::Result<(
        crate::types::Lsn,
        crate::types::Generation,
        crate::types::Checksum,
    )> {
        let (lsn, sum) = self.checksum()?;
        let generation = lock(&self.state).pos.generation;
        Ok((lsn, generation, sum))
    }

    /// The URL of this primary's HTTP server in this process, if it serves one.
    pub fn server_url(&self) -> Option<String> {
        lock(&self.server).as_ref().map(|s| s.url())
    }
}

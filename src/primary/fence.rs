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
    /// Automatic failover (issue 16, `failover.rs`): writes are accepted only before this
    /// instant (milliseconds of `mono_ms()`; 0 = no lease governs this primary), the end of
    /// the coordinator lease as last renewed.
    pub(super) lease_until: std::sync::atomic::AtomicU64,
    /// Why writes are held (no lease yet, lease lost), for the error and `repl_status()`.
    pub(super) held: std::sync::Mutex<Option<String>>,
}

/// Milliseconds since the first call in this process, from the monotonic clock (lease
/// deadlines must not move with the wall clock).
pub fn mono_ms() -> u64 {
    static START: once_cell::sync::Lazy<std::time::Instant> =
        once_cell::sync::Lazy::new(std::time::Instant::now);
    START.elapsed().as_millis() as u64 + 1
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

    /// Failover: accept writes until `until` (a `mono_ms()` instant; `Some(0)` holds them from
    /// now), naming `why` when they are refused; `None` = no lease governs writes any more.
    pub fn set_lease(&self, until: Option<u64>, why: &str) {
        *lock(&self.fence_state.held) = Some(why.to_string());
        self.fence_state
            .lease_until
            .store(until.map_or(0, |u| u.max(1)), Ordering::Release);
        if until.is_none() {
            *lock(&self.fence_state.held) = None;
        }
    }

    /// Why writes are held by the failover lease right now, if they are.
    pub fn lease_hold(&self) -> Option<String> {
        let until = self.fence_state.lease_until.load(Ordering::Acquire);
        if until == 0 || mono_ms() < until {
            return None;
        }
        Some(lock(&self.fence_state.held).clone().unwrap_or_default())
    }

    /// True when a newer epoch is known, or the failover lease ended: this primary must not
    /// accept writes.
    pub fn is_fenced(&self) -> bool {
        let until = self.fence_state.lease_until.load(Ordering::Acquire);
        if until != 0 && mono_ms() >= until {
            return true;
        }
        self.is_deposed()
    }

    fn is_deposed(&self) -> bool {
        if crate::transport::notify::fence_seq()
            != self.fence_state.seq_seen.load(Ordering::Acquire)
        {
            self.reload_fence();
        }
        self.fence_state.fenced.load(Ordering::Acquire)
    }

    /// The fence deposing this primary, if any.
    pub fn fence(&self) -> Option<Fence> {
        if !self.is_deposed() {
            return None;
        }
        lock(&self.fence_state.fence).clone()
    }

    /// Why a write is refused on a deposed primary (`SQLITE_READONLY`), naming the new one.
    pub fn fenced_error(&self) -> Option<crate::error::Error> {
        let Some(f) = self.fence() else {
            return self.lease_hold().map(|why| {
                crate::error::Error::ReadOnly(format!(
                    "{} does not accept writes: {why}",
                    self.db_path
                ))
            });
        };
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

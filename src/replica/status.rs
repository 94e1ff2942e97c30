//! What the SQL functions ask a replica (`repl_lsn`, `repl_checksum`, `repl_status`).

use super::{lock, Replica};
use crate::error::Result;
use crate::types::{Checksum, Lsn};
use crate::util::now_ms;
use crate::wal::{shm_read_header, WalIndexHeader};

impl Replica {
    /// The LSN readers of this replica see. Never waits for a sync in progress (which may be
    /// stuck on the network): then the newest LSN a sync of this process finished, or the
    /// position file of whichever process applied last.
    pub fn lsn(&self) -> Lsn {
        let recorded = || self.pos.read().map_or(Lsn(0), |a| a.lsn);
        match self.state_for_query() {
            Some(st) if st.loaded => st.lsn,
            Some(_) => recorded(),
            None => (*lock(&self.applied))
                .max(lock(&self.published).lsn)
                .max(recorded()),
        }
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
        // minutes, a stalled primary as long as its timeouts): answer at once from what the
        // last finished sync published, with the live LSN, progress and follower on top.
        let Some(st) = self.state_for_query() else {
            let progress = lock(&self.progress).filter(|p| p.total > 0);
            let mut v = lock(&self.published)
                .status
                .clone()
                .unwrap_or_else(|| serde_json::json!({"role": "replica", "db": self.db_path}));
            v["syncing"] = serde_json::json!(true);
            let live = self.lsn().0;
            if v["lsn"].as_u64() != Some(live) {
                // The published checksum belongs to the published LSN only.
                v["lsn"] = serde_json::json!(live);
                v["checksum"] = serde_json::Value::Null;
            }
            v["progress"] = serde_json::json!(progress.map(|p| p.json()));
            v["follow"] = self.follow_json();
            return v;
        };
        self.status_from(&st)
    }

    /// `repl_status()` from the state (the caller holds it).
    pub(super) fn status_from(&self, st: &super::State) -> serde_json::Value {
        let lsn = if st.loaded {
            st.lsn.0
        } else {
            self.pos.read().map_or(0, |a| a.lsn.0)
        };
        let lag_lsn = st.stats.primary_lsn.map(|p| p.0.saturating_sub(lsn));
        // Behind: the replica's content is at most this old (the newest applied record's
        // commit time on the primary); caught up: 0.
        let lag_ms = match (lag_lsn, st.stats.last_record_ms) {
            (Some(0), _) => Some(0),
            (Some(_), Some(t)) => Some(now_ms().saturating_sub(t)),
            _ => None,
        };
        serde_json::json!({
            "role": "replica",
            "db": self.db_path,
            "source": st.source.as_ref().map(|s| s.describe()).or(st.meta.source.as_ref().map(|s| s.to_string())),
            "primary": st.meta.source.as_ref().map(|s| s.to_string()),
            "primary_first_lsn": st.stats.primary_first_lsn.map(|l| l.0),
            "last_batch": st.stats.last_batch.map(|(f, l, n, s)| serde_json::json!({
                "first_lsn": f.0, "last_lsn": l.0, "pages": n, "snapshot": s})),
            "lineage": st.meta.lineage,
            "epoch": st.meta.epoch.0,
            "orphaned": st.meta.orphaned,
            "lsn": lsn,
            // The checksum at `lsn` (as applied by this process; null before its first sync).
            "checksum": st.loaded.then(|| st.sums.total().to_string()),
            "generation": st.generation.0,
            "primary_lsn": st.stats.primary_lsn.map(|l| l.0),
            "lag_lsn": lag_lsn,
            "lag_ms": lag_ms,
            "last_sync_ms": st.stats.last_sync_ms,
            "last_record_ms": st.stats.last_record_ms,
            "wal": st.last_hdr.map(|h| serde_json::json!({"mx_frame": h.mx_frame, "pages": h.n_page})),
            "batches": st.stats.batches,
            "resnapshots": st.stats.resnapshots,
            "foreign_writes": st.stats.foreign_writes,
            "checkpoints": st.stats.checkpoints,
            "drains": st.stats.drains,
            "max_drain_ms": st.stats.max_drain_ms,
            "wal_pinned": st.stats.wal_pinned,
            "follow": self.follow_json(),
            "progress": lock(&self.progress).filter(|p| p.total > 0).map(|p| p.json()),
            "last_error": st.stats.last_error,
        })
    }
}

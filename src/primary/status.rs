//! What the SQL functions ask a primary (`repl_lsn`, `repl_checksum`, `repl_status`).

use super::{lock, maintenance, read_header, Primary};
use crate::error::{Error, Result};
use crate::txlog::Log;
use crate::types::{Checksum, Lsn};
use crate::util::hex;
use std::time::{Duration, Instant};

impl Primary {
    /// The LSN of the last committed transaction (refreshed from the shared position if
    /// another process moved it). Claimed transactions are appended first, so normally record
    /// N is in the log when this says N; while the log cannot be written (disk full) the
    /// claimed LSN is still the right read-your-writes token: a replica reaches it once the
    /// log has caught up (or through the snapshot of a gap, which includes the transaction).
    pub fn lsn(&self) -> Lsn {
        self.append_now();
        let st = lock(&self.state);
        let mine = st.pos.lsn;
        drop(st);
        let appended = self.read_position().map_or(mine, |p| p.lsn.max(mine));
        match (self.read_claim(), self.read_position()) {
            (Some(c), Some(p)) if c.generation == p.generation => appended.max(c.lsn),
            _ => appended,
        }
    }

    /// Database checksum at the current LSN.
    pub fn checksum(&self) -> Result<(Lsn, Checksum)> {
        self.append_now();
        let stale = {
            let mut st = lock(&self.state);
            let stale = !st.loaded || self.read_position().is_some_and(|p| p.lsn > st.pos.lsn);
            if stale && st.log.latest_snapshot(None)?.is_some() {
                // The log is the truth and the append lock keeps it still: no WRITE needed
                // (the caller may hold it itself, in an open write transaction).
                if let Some(h) = read_header(&self.agent) {
                    let _g = self.append_lock()?;
                    if !st.loaded {
                        self.load_state(&mut st, &h)?;
                        st.loaded = true;
                    }
                    self.sync_shared(&mut st, &h, true)?;
                }
            }
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
                    self.append_lock().and_then(|_g| {
                        self.ensure_loaded(&mut st, &self.agent, &h)
                            .and_then(|_| self.sync_shared(&mut st, &h, true))
                    })
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
        self.append_now();
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
            "epoch": st.log.meta().epoch.0,
            "fenced": self.fence().map(|f| serde_json::json!({
                "epoch": f.epoch.0, "primary": f.primary})),
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
            "server": lock(&self.server).as_ref().map(|s| s.status_json()),
            "sync": self.sync_json(),
            "backup": self.backup_json(),
            "checkpoint": self.checkpoint_json(),
            "captured_txns": st.captured_txns,
            "gaps": st.gaps,
            "last_error": st.last_error,
        })
    }
}

//! Waiting for an LSN (`repl_wait`) and read-your-writes forwarding (`repl_exec`): woken by
//! the follower's progress, or long-polling and applying itself when nobody follows here.

use super::{lock, Replica, BATCH_BYTES};
use crate::error::{Error, Result};
use crate::transport::Fetch;
use crate::types::Lsn;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Replica {
    /// The LSN this replica's files hold (the shared position: other processes' applies count).
    pub(super) fn durable_local_lsn(&self) -> Lsn {
        let mine = *lock(&self.applied);
        mine.max(self.pos.read().map_or(Lsn(0), |a| a.lsn))
    }

    /// Waits until the replica holds `target` or `timeout` passes.
    pub fn wait_for(self: &Arc<Self>, target: Lsn, timeout: Duration) -> Result<Lsn> {
        let deadline = Instant::now() + timeout;
        let now = self.durable_local_lsn();
        if now >= target {
            return Ok(now);
        }
        if self.following() {
            let mut g = lock(&self.applied);
            loop {
                let have = (*g).max(self.pos.read().map_or(Lsn(0), |a| a.lsn));
                if have >= target {
                    return Ok(have);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    drop(g);
                    return Err(self.wait_timeout(target, timeout));
                }
                // Other processes' applies do not signal us: re-check now and then.
                g = self
                    .applied_cv
                    .wait_timeout(g, left.min(Duration::from_millis(5)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // Nobody follows here: long-poll and apply ourselves until the deadline.
        let spec = self.source().ok_or_else(|| {
            Error::Misuse(format!(
                "repl_wait(): {} is not a replica yet",
                self.db_path
            ))
        })?;
        let src = self.shared_source(&spec)?;
        loop {
            let have = self.durable_local_lsn();
            if have >= target {
                return Ok(have);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.wait_timeout(target, timeout));
            }
            let fetched = src.fetch_wait(have.next(), BATCH_BYTES, left);
            if fetched.is_err() {
                self.forget_shared_source(&src);
            }
            match fetched? {
                Fetch::Records(v) if v.is_empty() => {}
                Fetch::Records(v) => {
                    let info = src.last_info().map_or_else(|| src.info(), Ok)?;
                    self.apply_fetched(info, v)?;
                }
                Fetch::Truncated { .. } => {
                    self.sync(None)?;
                }
            }
        }
    }

    /// Forwards a write to the primary (`repl_exec`), then waits until this replica holds the
    /// commit (read-your-writes) for at most `wait`. Returns the primary's answer.
    pub fn forward_exec(
        self: &Arc<Self>,
        body: &serde_json::Value,
        wait: Duration,
    ) -> Result<serde_json::Value> {
        let spec = self.source().ok_or_else(|| {
            Error::Misuse(format!("repl_exec(): {} has no primary yet", self.db_path))
        })?;
        let answer = self.shared_source(&spec)?.exec(body)?;
        if let (Some(theirs), Some(ours)) = (answer["lineage"].as_str(), self.lineage()) {
            if theirs != ours {
                return Err(Error::Misuse(format!(
                    "repl_exec(): the primary now serves lineage {theirs} but this replica follows {ours}; \
                     the write ran there, but this replica can never show it: bootstrap a new replica"
                )));
            }
        }
        let lsn = answer["lsn"]
            .as_u64()
            .ok_or_else(|| Error::Corrupt("repl_exec(): the primary's answer has no LSN".into()))?;
        self.wait_for(Lsn(lsn), wait).map_err(|e| {
            Error::Busy(format!(
                "repl_exec(): the write committed on the primary at LSN {lsn}, but this replica had not \
                 applied it within {} ms ({e}); read with repl_wait({lsn}) before relying on it",
                wait.as_millis()
            ))
        })?;
        Ok(answer)
    }

    pub(super) fn wait_timeout(&self, target: Lsn, timeout: Duration) -> Error {
        // From what the last finished sync published: a sync stuck on the network must not
        // hold up the answer.
        let status = lock(&self.published).status.clone().unwrap_or_default();
        let primary = status["primary_lsn"]
            .as_u64()
            .map_or("unknown".to_string(), |l| l.to_string());
        let why = status["last_error"]
            .as_str()
            .map_or(String::new(), |e| format!("; last error: {e}"));
        Error::Busy(format!(
            "repl_wait({target}): timed out after {} ms with the replica at LSN {} (the primary's durable LSN \
             at the last sync: {primary}){why}",
            timeout.as_millis(),
            self.durable_local_lsn()
        ))
    }
}

//! Synchronous replication (issue 16): a commit on the primary returns only once
//! `sync_replicas` followers acknowledged its LSN (`txlog::acks`: a follower acknowledges LSN n
//! by asking for n + 1, which it does only after n is applied and fsynced, so the levels
//! received, durable and applied are all met by one acknowledgement). The wait runs after
//! WRITE is released (`vfs` calls `write_released`): other writers go on, and readers on the
//! primary see the commit at once. After `sync_timeout_ms` the commit returns anyway — it is
//! durable on the primary and cannot be taken back, and SQLite gives no way to fail a COMMIT
//! that already happened — the timeout is counted (`repl_status().sync`) and logged
//! (`event=sync_timeout`). Code that must know runs `repl_wait_replicas()`, which fails then.

use super::{log_event, Primary};
use crate::error::{Error, Result};
use crate::txlog::acks;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Primary {
    /// The automatic wait of a committing connection (after WRITE was released).
    pub fn wait_for_replicas(&self, lsn: u64) {
        let n = self.sync_replicas.load(Ordering::Relaxed) as usize;
        if n == 0 {
            return;
        }
        let timeout = Duration::from_millis(self.sync_timeout_ms.load(Ordering::Relaxed));
        self.sync_waits.fetch_add(1, Ordering::Relaxed);
        if let Err(have) = self.await_acks(lsn, n, timeout) {
            self.sync_timeouts.fetch_add(1, Ordering::Relaxed);
            log_event(&format!(
                "event=sync_timeout db={:?} lsn={lsn} want={n} acked={have} timeout_ms={}",
                self.db_path,
                timeout.as_millis()
            ));
        }
    }

    /// `repl_wait_replicas()`: `Ok(followers that have lsn)` once `n` do, or an error naming
    /// how many did.
    pub fn wait_replicas(&self, lsn: u64, n: usize, timeout: Duration) -> Result<usize> {
        match self.await_acks(lsn, n.max(1), timeout) {
            Ok(have) => Ok(have),
            Err(have) => Err(Error::Busy(format!(
                "only {have} of {n} followers acknowledged LSN {lsn} within {} ms (the commit is \
                 durable on the primary; a follower acknowledges when it asks for the next LSN over \
                 HTTP: check that enough replicas follow this primary with repl_follow())",
                timeout.as_millis()
            ))),
        }
    }

    /// Polls the acknowledgements until `n` followers have `lsn` (`Ok(count)`) or the time is
    /// up (`Err(count)`).
    fn await_acks(
        &self,
        lsn: u64,
        n: usize,
        timeout: Duration,
    ) -> std::result::Result<usize, usize> {
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_micros(100);
        self.kick_appender();
        loop {
            let (count, nth) = acks::acked(&self.dir, n, lsn);
            if nth.is_some_and(|l| l >= lsn) {
                return Ok(count);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(count);
            }
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(2));
        }
    }

    /// `repl_status().sync` of a primary.
    pub(super) fn sync_json(&self) -> serde_json::Value {
        let n = self.sync_replicas.load(Ordering::Relaxed);
        let lsn = self.read_position().map_or(0, |p| p.lsn.0);
        let level = ["received", "durable", "applied"]
            [(self.sync_level.load(Ordering::Relaxed).clamp(1, 3) - 1) as usize];
        serde_json::json!({
            "replicas": n,
            "level": level,
            "timeout_ms": self.sync_timeout_ms.load(Ordering::Relaxed),
            "waits": self.sync_waits.load(Ordering::Relaxed),
            "timeouts": self.sync_timeouts.load(Ordering::Relaxed),
            "followers_at_lsn": acks::acked(&self.dir, 1, lsn).0,
        })
    }
}

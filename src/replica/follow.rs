//! Following and waiting (issue 4): `repl_follow` runs a background thread that long-polls the
//! source and applies records as soon as they are durable on the primary; `repl_wait` returns
//! once the replica reached an LSN (waking on the follower's progress, or syncing itself when
//! nobody follows in this process).
//!
//! The follower waits *outside* the applier lock and the state mutex (a long-poll holds
//! neither), asks the source's info (lineage) outside them too, then applies exactly what it
//! received through the ordinary sync path (`apply_fetched`: no request while the locks are
//! held), which re-checks lineage and verifies every batch against the primary's checksum. Errors are recorded in
//! `repl_status()` and retried with capped exponential backoff and jitter; a primary that
//! goes away leaves the replica readable at its last LSN.

use super::{lock, log_event, Replica, BATCH_BYTES};
use crate::error::{Error, Result};
use crate::transport::{Fetch, SourceSpec};
use crate::util::now_ms;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Backoff after a failed poll or apply: 50 ms doubling up to this, times a jitter in [0.5, 1).
const BACKOFF_CAP: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct FollowState {
    phase: &'static str,
    errors: u64,
    consecutive: u32,
    last_error: Option<String>,
    applied_batches: u64,
    started_ms: u64,
}

pub(super) struct Follower {
    stop: Arc<AtomicBool>,
    source: SourceSpec,
    interval: Duration,
    state: Arc<Mutex<FollowState>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn jitter() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = n ^ 0x9e37_79b9_7f4a_7c15 ^ (std::process::id() as u64) << 32;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    0.5 + (x % 1000) as f64 / 2000.0
}

fn backoff(consecutive: u32) -> Duration {
    let base = Duration::from_millis(50).saturating_mul(1 << consecutive.min(10));
    base.min(BACKOFF_CAP).mul_f64(jitter())
}

impl Replica {
    /// Starts following the remembered source (idempotent; a new interval restarts it).
    pub fn follow(self: &Arc<Self>, interval: Duration) -> Result<()> {
        let Some(spec) = self.source() else {
            return Err(Error::Misuse(format!(
                "repl_follow(): {} has no source yet; pass the primary, e.g. repl_follow('http://primary:7070')",
                self.db_path
            )));
        };
        let mut g = lock(&self.follower);
        if let Some(f) = g.as_ref() {
            if f.source == spec && f.interval == interval {
                return Ok(());
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(FollowState {
            phase: "starting",
            started_ms: now_ms(),
            ..Default::default()
        }));
        let (weak, st2, stop2, spec2) = (
            Arc::downgrade(self),
            state.clone(),
            stop.clone(),
            spec.clone(),
        );
        std::thread::Builder::new()
            .name("repl-follow".into())
            .spawn(move || run(weak, spec2, interval, stop2, st2))
            .map_err(|e| Error::io("starting the follower thread", e))?;
        log_event(&format!(
            "event=follow_start db={:?} source={:?} interval_ms={}",
            self.db_path,
            spec.to_string(),
            interval.as_millis()
        ));
        *g = Some(Follower {
            stop,
            source: spec,
            interval,
            state,
        });
        Ok(())
    }

    /// Stops the follower (it ends after its current poll; nothing half-applied).
    pub fn unfollow(&self) -> bool {
        let was = lock(&self.follower).take().is_some();
        if was {
            log_event(&format!("event=follow_stop db={:?}", self.db_path));
        }
        was
    }

    pub fn following(&self) -> bool {
        lock(&self.follower).is_some()
    }

    pub(super) fn follow_json(&self) -> serde_json::Value {
        let g = lock(&self.follower);
        let Some(f) = g.as_ref() else {
            return serde_json::Value::Null;
        };
        let s = lock(&f.state);
        serde_json::json!({
            "source": f.source.to_string(),
            "interval_ms": f.interval.as_millis() as u64,
            "state": s.phase,
            "errors": s.errors,
            "consecutive_errors": s.consecutive,
            "last_error": s.last_error,
            "batches": s.applied_batches,
            "since_ms": s.started_ms,
        })
    }
}

fn set(state: &Mutex<FollowState>, f: impl FnOnce(&mut FollowState)) {
    f(&mut lock(state));
}

fn fail(state: &Mutex<FollowState>, r: Option<&Replica>, e: &Error) -> Duration {
    if let Some(r) = r {
        r.note_error(e);
    }
    let mut s = lock(state);
    s.errors += 1;
    s.consecutive = s.consecutive.saturating_add(1);
    s.last_error = Some(e.to_string());
    s.phase = "retrying";
    if s.consecutive == 1 || s.consecutive.is_power_of_two() {
        log_event(&format!(
            "event=follow_error consecutive={} error={:?}",
            s.consecutive,
            e.to_string()
        ));
    }
    backoff(s.consecutive - 1)
}

fn sleep_unless_stopped(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Acquire) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

fn run(
    weak: Weak<Replica>,
    spec: SourceSpec,
    interval: Duration,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<FollowState>>,
) {
    while !stop.load(Ordering::Acquire) {
        let Some(r) = weak.upgrade() else { return };
        let source = match r.shared_source(&spec) {
            Ok(s) => s,
            Err(e) => {
                let d = fail(&state, Some(&r), &e);
                drop(r);
                sleep_unless_stopped(&stop, d);
                continue;
            }
        };
        let from = r.durable_local_lsn().next();
        set(&state, |s| s.phase = "waiting");
        let got = source.fetch_wait(from, BATCH_BYTES, interval);
        if stop.load(Ordering::Acquire) {
            return; // stopped during the poll: apply nothing more
        }
        let res = match got {
            Ok(Fetch::Records(v)) if v.is_empty() => Ok(false),
            Ok(Fetch::Records(v)) => {
                set(&state, |s| s.phase = "applying");
                // The source's info (lineage, durable LSN) is asked here, outside the locks;
                // the apply itself makes no request (a stalled primary must not block the
                // replica's repl_lsn()/repl_status()/repl_wait(), which take the state mutex).
                // The records' own response carried the info (HTTP headers): no extra round
                // trip; a source without it is asked here.
                source
                    .last_info()
                    .map_or_else(|| source.info(), Ok)
                    .and_then(|info| r.apply_fetched(info, v))
                    .map(|_| true)
            }
            Ok(Fetch::Truncated { .. }) => {
                set(&state, |s| s.phase = "re-snapshotting");
                r.sync(None).map(|_| true)
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(applied) => set(&state, |s| {
                s.consecutive = 0;
                s.phase = "waiting";
                if applied {
                    s.applied_batches += 1;
                }
            }),
            Err(e) => {
                // A broken connection may leave the source in a bad state: reopen it.
                r.forget_shared_source(&source);
                let d = fail(&state, Some(&r), &e);
                drop(r);
                sleep_unless_stopped(&stop, d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        for n in 0..20 {
            let d = backoff(n);
            let base = Duration::from_millis(50)
                .saturating_mul(1 << n.min(10))
                .min(BACKOFF_CAP);
            assert!(
                d >= base.mul_f64(0.5) && d <= base,
                "{n}: {d:?} vs {base:?}"
            );
        }
        assert!(backoff(30) <= BACKOFF_CAP);
    }
}

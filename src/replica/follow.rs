//! Following (issue 4; issue 18: thousands of databases per process): `repl_follow` keeps the
//! replica up to date by long-polling its source and applying records as soon as they are
//! durable on the primary; `repl_wait` (wait.rs) wakes on the follower's progress.
//!
//! A follower is a state machine, not a thread. It runs as a chain of jobs on the process's
//! HTTP engine (`transport::httpd`: one event loop thread, fixed worker pools), so a process
//! with N followers has the same threads as one with one:
//!
//! ```text
//!   poll ──(Source::fetch_async: HTTP long-poll in the event loop / park on the log directory)──► fetched
//!     ▲                                                                                    │
//!     │ next job at once                                 records: apply_fetched (fast worker)
//!     ├───────────────────────────────────────────────── none:    nothing to do
//!     │                                                  Truncated: re-snapshot (background pool)
//!     └── after a backoff (an event-loop timer) ◄──────── error:   fail() (counted in repl_status())
//! ```
//!
//! Exactly one job of a follower exists at a time: it owns the follower's `Turn`, and hands it
//! to the next (the fetch callback, the timer, the re-snapshot job). A `Turn` dropped without
//! being handed on (a panic in a step, a callback abandoned) while the follower still runs
//! starts a new poll after a backoff, so a follower never ends silently.
//!
//! Where each step runs, and why: the wait holds no thread (the engine's client connection is
//! one socket in the event loop; a directory source is parked on its log directory exactly
//! like the server's long-polls, woken by `wake_dir` or inotify). Applying a batch runs on a
//! fast worker: it is local work bounded by the batch size (32 MiB) and the drain timeout.
//! A re-snapshot (a log older than the primary retains) downloads and writes a whole database
//! and may take minutes: it runs on the engine's `Background` pool (`BACKGROUND_WORKERS`,
//! 2 threads), never on the fast pool, so that re-snapshots cannot starve the other
//! followers' applies and the server's log answers (which share the fast pool); further
//! re-snapshots queue there (their followers show `re-snapshotting` meanwhile).
//!
//! The follower waits *outside* the applier lock and the state mutex (a long-poll holds
//! neither) and holds only a `Weak<Replica>` while it waits: a replica whose role ends stops
//! its follower (`Follower`'s drop). It applies exactly what it received through the ordinary
//! sync path (`apply_fetched`: no request while the locks are held, with the source info the
//! response carried), which re-checks lineage and verifies every batch against the primary's
//! checksum. Errors are recorded in `repl_status()` and retried with capped exponential
//! backoff and jitter; a primary that goes away leaves the replica readable at its last LSN.
//! `unfollow` abandons a poll in flight (its answer is discarded, nothing half-applied; an
//! apply already running finishes).

use super::{lock, log_event, Replica, BATCH_BYTES};
use crate::error::{Error, Result};
use crate::transport::httpd::{self, Pool};
use crate::transport::{Fetch, Fetched, Source, SourceSpec};
use crate::util::now_ms;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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

/// One follower's state, shared by its jobs.
struct Core {
    weak: Weak<Replica>,
    source: SourceSpec,
    interval: Duration,
    stop: AtomicBool,
    state: Mutex<FollowState>,
    /// The source of the poll in flight (`unfollow` abandons it).
    inflight: Mutex<Option<Arc<dyn Source>>>,
}

impl Core {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn set(&self, f: impl FnOnce(&mut FollowState)) {
        f(&mut lock(&self.state));
    }

    /// Counts a failure (`repl_status()`, the event log) and returns the backoff before the
    /// next poll.
    fn fail(&self, r: Option<&Replica>, e: &Error) -> Duration {
        if let Some(r) = r {
            r.note_error(e);
        }
        let mut s = lock(&self.state);
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
}

/// The running follower of a replica (`Replica::follower`). Dropping it stops the follower.
pub(super) struct Follower {
    core: Arc<Core>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::Release);
        // A poll in flight is abandoned: its answer would be discarded anyway.
        if let Some(src) = lock(&self.core.inflight).take() {
            src.cancel_async();
        }
    }
}

/// The right to run a follower's next step (see the module comment): exactly one exists per
/// follower; dropped without `finish` while the follower runs, it schedules a new poll.
struct Turn(Option<Arc<Core>>);

impl Turn {
    fn core(&self) -> Arc<Core> {
        self.0.clone().expect("a turn is used once")
    }

    /// The follower ends here (stopped, or its replica is gone).
    fn finish(mut self) {
        self.0 = None;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(core) = self.0.take() else { return };
        // Without a running engine nothing could run the new poll (and scheduling it would
        // drop it here again): the follower ends. `follow` starts the engine first, so this
        // does not happen once a follower ran.
        if core.stopped() || httpd::threads() == 0 {
            return;
        }
        let d = core.fail(
            None,
            &Error::Other("a follower step ended without an answer; polling again".into()),
        );
        schedule(Turn(Some(core)), d, Pool::Fast);
    }
}

/// Run `turn`'s next poll on `pool` after `delay` (an event-loop timer; no thread sleeps).
fn schedule(turn: Turn, delay: Duration, pool: Pool) {
    if let Err(e) = httpd::after(delay, pool, Box::new(move || poll(turn))) {
        // The job (and its turn) is gone with the error: nothing can run it.
        log_event(&format!(
            "event=follow_error error={:?} action=stopped",
            format!("the HTTP engine cannot run the follower: {e}")
        ));
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
            if f.core.source == spec && f.core.interval == interval {
                return Ok(());
            }
        }
        // The old follower (if any) stops before the new one polls.
        *g = None;
        httpd::start().map_err(|e| Error::io("starting the follower (the HTTP engine)", e))?;
        let core = Arc::new(Core {
            weak: Arc::downgrade(self),
            source: spec.clone(),
            interval,
            stop: AtomicBool::new(false),
            state: Mutex::new(FollowState {
                phase: "starting",
                started_ms: now_ms(),
                ..Default::default()
            }),
            inflight: Mutex::new(None),
        });
        let first = Turn(Some(core.clone()));
        httpd::spawn(Pool::Fast, Box::new(move || poll(first)))
            .map_err(|e| Error::io("starting the follower (the HTTP engine)", e))?;
        log_event(&format!(
            "event=follow_start db={:?} source={:?} interval_ms={}",
            self.db_path,
            spec.to_string(),
            interval.as_millis()
        ));
        *g = Some(Follower { core });
        Ok(())
    }

    /// Stops the follower: a poll in flight is abandoned, an apply in progress finishes;
    /// nothing is half-applied.
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
        let s = lock(&f.core.state);
        serde_json::json!({
            "source": f.core.source.to_string(),
            "interval_ms": f.core.interval.as_millis() as u64,
            "state": s.phase,
            "errors": s.errors,
            "consecutive_errors": s.consecutive,
            "last_error": s.last_error,
            "batches": s.applied_batches,
            "since_ms": s.started_ms,
        })
    }
}

/// Step 1: ask the source for the records after the replica's LSN, without waiting here.
fn poll(turn: Turn) {
    let core = turn.core();
    if core.stopped() {
        return turn.finish();
    }
    let Some(r) = core.weak.upgrade() else {
        return turn.finish();
    };
    let source = match r.shared_source(&core.source) {
        Ok(s) => s,
        Err(e) => {
            let d = core.fail(Some(&r), &e);
            drop(r);
            return schedule(turn, d, Pool::Fast);
        }
    };
    let from = r.durable_local_lsn().next();
    drop(r); // only the Weak while waiting
    core.set(|s| s.phase = "waiting");
    *lock(&core.inflight) = Some(source.clone());
    if core.stopped() {
        return turn.finish();
    }
    let src = source.clone();
    source.fetch_async(
        from,
        BATCH_BYTES,
        core.interval,
        Box::new(move |got| fetched(turn, src, got)),
    );
}

/// Step 2 (on a fast worker): apply what came, or start a re-snapshot.
fn fetched(turn: Turn, source: Arc<dyn Source>, got: Fetched) {
    let core = turn.core();
    {
        let mut g = lock(&core.inflight);
        if g.as_ref().is_some_and(|s| Arc::ptr_eq(s, &source)) {
            *g = None;
        }
    }
    if core.stopped() {
        return turn.finish(); // stopped during the poll: apply nothing more
    }
    let Some(r) = core.weak.upgrade() else {
        return turn.finish();
    };
    let res = match got {
        Ok((Fetch::Records(v), _)) if v.is_empty() => Ok(false),
        Ok((Fetch::Records(v), info)) => {
            core.set(|s| s.phase = "applying");
            // The response carried the source's info (HTTP headers): no extra round trip; a
            // source without it is asked here, outside the locks. The apply itself makes no
            // request (a stalled primary must not block the replica's queries).
            info.map_or_else(|| source.info(), Ok)
                .and_then(|info| r.apply_fetched(info, v))
                .map(|_| true)
        }
        Ok((Fetch::Truncated { .. }, _)) => {
            core.set(|s| s.phase = "re-snapshotting");
            drop(r);
            let job = Box::new(move || resnapshot(turn, source));
            if let Err(e) = httpd::spawn(Pool::Background, job) {
                log_event(&format!(
                    "event=follow_error error={:?} action=stopped",
                    e.to_string()
                ));
            }
            return;
        }
        Err(e) => Err(e),
    };
    settle(turn, &r, &source, res);
}

/// Step 2' (on the background pool): re-snapshot through the ordinary sync path.
fn resnapshot(turn: Turn, source: Arc<dyn Source>) {
    let core = turn.core();
    if core.stopped() {
        return turn.finish();
    }
    let Some(r) = core.weak.upgrade() else {
        return turn.finish();
    };
    let res = r.sync(None).map(|_| true);
    settle(turn, &r, &source, res);
}

/// Step 3: count the outcome and schedule the next poll (at once, or after a backoff).
fn settle(turn: Turn, r: &Arc<Replica>, source: &Arc<dyn Source>, res: Result<bool>) {
    let core = turn.core();
    match res {
        Ok(applied) => {
            core.set(|s| {
                s.consecutive = 0;
                s.phase = "waiting";
                if applied {
                    s.applied_batches += 1;
                }
            });
            schedule(turn, Duration::ZERO, Pool::Fast);
        }
        Err(e) => {
            // A broken connection may leave the source in a bad state: reopen it.
            r.forget_shared_source(source);
            let d = core.fail(Some(r), &e);
            schedule(turn, d, Pool::Fast);
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

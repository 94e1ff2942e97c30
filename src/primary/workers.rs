//! The background work of every primary of the process, on a fixed set of threads (issue 18):
//! the number of threads does not depend on how many databases are open.
//!
//! - `ROUND_THREADS` round workers ("repl-durable") run group-fsync rounds (`Primary::round`)
//!   for the primaries whose commits asked for one (a ready queue; a primary that got more
//!   records during its round goes back in after `REPL_FSYNC_INTERVAL_US`, so a burst of
//!   commits shares one fsync), and every `T3_INTERVAL` (longer with more than `T3_SCALE_FROM`
//!   primaries open) one of them runs the T3 check of every primary (cheap: two reads of
//!   shared memory each; see `Primary::t3_check`). Two threads,
//!   so one slow fsync does not hold up every other database's watermark.
//! - One append thread ("repl-append") runs the append passes of the asynchronous capture
//!   (`append.rs`), so they keep up with commits instead of waiting behind an fsync.
//!   `REPL_BACKGROUND_NICE` (default 0) lowers its and the checkpoint thread's priority, so on
//!   a machine whose CPUs are busy the application's threads go first (at the price of
//!   replication lag; a log `capture_lag_max` behind makes the writer append itself).
//! - One checkpoint thread ("repl-checkpoint") runs the assisted PASSIVE checkpoints
//!   (`checkpoint.rs`) of the primaries whose WAL grew past `checkpoint_assist` frames.
//! - One backup thread ("repl-backup") runs the object-storage uploads (`backup.rs`) of the
//!   primaries that have a backup target, each every `backup_interval_ms`.
//! - One maintenance thread ("repl-maintain") runs a log maintenance pass of each primary
//!   every `REPL_MAINTENANCE_MS` (default 1 s). A long compaction of one database delays the
//!   passes of the others, never their commits or watermarks.
//!
//! The threads start with the first primary and live as long as the process; they hold only
//! `Weak` references while they wait. Every job on a primary runs under its `busy` mutex and
//! (`maintenance_busy` for passes, so a long compaction never delays a group fsync) and first
//! checks its `stop` flag, so `Primary::detach` (which sets the flag, then takes both) returns only when no job runs on it and none will: after that nothing of this
//! process touches the log directory, which can be deleted at once.
//!
//! Lock order: a primary's `state` (capture, T2) may be held while taking `QUEUE` (scheduling a
//! round); `QUEUE` is never held while taking any primary's lock.

use super::{lock, Primary};
use crate::error::{Error, Result};
use once_cell::sync::{Lazy, OnceCell};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Threads running group-fsync rounds and T3 checks.
pub const ROUND_THREADS: usize = 2;
/// How often every primary's T3 check runs (a foreign commit is acted on at the second
/// consecutive sighting, so within about twice this) while the process has at most
/// `T3_SCALE_FROM` primaries open; beyond, the sweep stretches in proportion, so its cost stays
/// near that of `T3_SCALE_FROM` checks per interval (about 1 µs each): 1,000 open primaries
/// are checked every 200 ms. Foreign commits are also caught by our next writer's T1.
const T3_INTERVAL: Duration = Duration::from_millis(20);
const T3_SCALE_FROM: usize = 100;

fn t3_interval(primaries: usize) -> Duration {
    T3_INTERVAL.saturating_mul(primaries.div_ceil(T3_SCALE_FROM).max(1) as u32)
}

#[derive(Default)]
struct Queue {
    primaries: Vec<Weak<Primary>>,
    ready: VecDeque<Weak<Primary>>,
    delayed: Vec<(Instant, Weak<Primary>)>,
    next_t3: Option<Instant>,
    t3_running: bool,
}

struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
}

static SHARED: Lazy<Shared> = Lazy::new(|| Shared {
    q: Mutex::new(Queue::default()),
    cv: Condvar::new(),
});
static STARTED: OnceCell<()> = OnceCell::new();

/// Registers a new primary with the workers (starting them with the first one).
pub(super) fn register(p: &Arc<Primary>) -> Result<()> {
    STARTED.get_or_try_init(|| -> Result<()> {
        for _ in 0..ROUND_THREADS {
            std::thread::Builder::new()
                .name("repl-durable".into())
                .spawn(round_worker)
                .map_err(|e| Error::io("starting the group fsync thread", e))?;
        }
        std::thread::Builder::new()
            .name("repl-append".into())
            .spawn(append_worker)
            .map_err(|e| Error::io("starting the log append thread", e))?;
        std::thread::Builder::new()
            .name("repl-checkpoint".into())
            .spawn(checkpoint_worker)
            .map_err(|e| Error::io("starting the checkpoint assist thread", e))?;
        std::thread::Builder::new()
            .name("repl-backup".into())
            .spawn(backup_worker)
            .map_err(|e| Error::io("starting the backup thread", e))?;
        std::thread::Builder::new()
            .name("repl-maintain".into())
            .spawn(maintenance_worker)
            .map_err(|e| Error::io("starting the log maintenance thread", e))?;
        Ok(())
    })?;
    let mut q = lock(&SHARED.q);
    q.primaries.retain(|w| w.strong_count() > 0);
    q.primaries.push(Arc::downgrade(p));
    Ok(())
}

/// Asks for a group-fsync round of `p` as soon as a worker is free.
pub(super) fn schedule(p: &Weak<Primary>) {
    lock(&SHARED.q).ready.push_back(p.clone());
    SHARED.cv.notify_one();
}

#[derive(Default)]
struct AppendQueue {
    ready: VecDeque<Weak<Primary>>,
    delayed: Vec<(Instant, Weak<Primary>)>,
}

/// The append passes of the asynchronous capture (`append.rs`) run on a thread of their own
/// ("repl-append"): they must keep up with the commits, so they never queue behind a group
/// fsync, which takes milliseconds.
struct Appends {
    q: Mutex<AppendQueue>,
    cv: Condvar,
}

static APPENDS: Lazy<Appends> = Lazy::new(|| Appends {
    q: Mutex::new(AppendQueue::default()),
    cv: Condvar::new(),
});

/// Asks for an append pass of `p` as soon as the append thread is free.
pub(super) fn schedule_append(p: &Weak<Primary>) {
    lock(&APPENDS.q).ready.push_back(p.clone());
    APPENDS.cv.notify_one();
}

/// The assisted checkpoints (`checkpoint.rs`), on a thread of their own ("repl-checkpoint"):
/// a run takes a few milliseconds of fsyncs, which must delay neither an append pass nor a
/// group fsync.
static CHECKPOINTS: Lazy<(Mutex<VecDeque<Weak<Primary>>>, Condvar)> =
    Lazy::new(|| (Mutex::new(VecDeque::new()), Condvar::new()));

/// Asks for an assisted checkpoint of `p` (the caller's `ckpt_scheduled` flag keeps at most one
/// queued per primary).
pub(super) fn schedule_checkpoint(p: &Weak<Primary>) {
    lock(&CHECKPOINTS.0).push_back(p.clone());
    CHECKPOINTS.1.notify_one();
}

fn checkpoint_worker() {
    crate::sys::lower_this_thread_priority();
    loop {
        let w = {
            let mut q = lock(&CHECKPOINTS.0);
            loop {
                if let Some(w) = q.pop_front() {
                    break w;
                }
                q = CHECKPOINTS.1.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        if let Some(p) = w.upgrade() {
            crate::sys::fault_delay("checkpoint-worker-holds");
            p.run_assisted_checkpoint();
        }
    }
}

/// Asks for another append pass of `p` after `delay`.
fn schedule_append_after(p: Weak<Primary>, delay: Duration) {
    lock(&APPENDS.q).delayed.push((Instant::now() + delay, p));
}

fn append_worker() {
    crate::sys::lower_this_thread_priority();
    loop {
        let w = {
            let mut q = lock(&APPENDS.q);
            loop {
                let now = Instant::now();
                let due = take_due(&mut q.delayed, now);
                q.ready.extend(due);
                if let Some(w) = q.ready.pop_front() {
                    break w;
                }
                let until = q
                    .delayed
                    .iter()
                    .map(|(t, _)| *t)
                    .min()
                    .unwrap_or(now + Duration::from_secs(1));
                let wait = until
                    .saturating_duration_since(now)
                    .max(Duration::from_micros(20));
                q = APPENDS
                    .cv
                    .wait_timeout(q, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        let again = w.upgrade().and_then(|p| {
            let again = p.run_append();
            crate::sys::fault_delay("append-worker-holds");
            again
        });
        if let Some(d) = again {
            schedule_append_after(w, d);
        }
    }
}

/// Asks for another round of `p` after `delay` (more records arrived during the last one).
fn schedule_after(p: Weak<Primary>, delay: Duration) {
    lock(&SHARED.q).delayed.push((Instant::now() + delay, p));
    SHARED.cv.notify_one();
}

/// Removes and returns the entries of `delayed` that are due at `now`.
fn take_due(delayed: &mut Vec<(Instant, Weak<Primary>)>, now: Instant) -> Vec<Weak<Primary>> {
    let mut due = Vec::new();
    let mut i = 0;
    while i < delayed.len() {
        if delayed[i].0 <= now {
            due.push(delayed.swap_remove(i).1);
        } else {
            i += 1;
        }
    }
    due
}

enum Job {
    Round(Weak<Primary>),
    T3(Vec<Weak<Primary>>),
}

fn next_job() -> Job {
    let mut q = lock(&SHARED.q);
    loop {
        let now = Instant::now();
        let due = take_due(&mut q.delayed, now);
        q.ready.extend(due);
        if let Some(w) = q.ready.pop_front() {
            return Job::Round(w);
        }
        let t3_due = *q.next_t3.get_or_insert(now);
        if !q.t3_running && t3_due <= now && !q.primaries.is_empty() {
            q.t3_running = true;
            q.next_t3 = Some(now + t3_interval(q.primaries.len()));
            q.primaries.retain(|w| w.strong_count() > 0);
            return Job::T3(q.primaries.clone());
        }
        let mut until = if q.t3_running || q.primaries.is_empty() {
            now + Duration::from_secs(1)
        } else {
            t3_due
        };
        for (t, _) in &q.delayed {
            until = until.min(*t);
        }
        let wait = until
            .saturating_duration_since(now)
            .max(Duration::from_micros(50));
        q = SHARED
            .cv
            .wait_timeout(q, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn round_worker() {
    loop {
        match next_job() {
            Job::Round(w) => {
                let again = w.upgrade().is_some_and(|p| p.run_round());
                if again {
                    schedule_after(w, crate::config::get().fsync_interval);
                }
            }
            Job::T3(list) => {
                for w in &list {
                    if let Some(p) = w.upgrade() {
                        p.run_t3();
                    }
                }
                lock(&SHARED.q).t3_running = false;
            }
        }
    }
}

/// The backup uploads of every primary with a backup target (`backup.rs`): a sweep every
/// 20 ms; each primary's pass runs when its `backup_interval_ms` has passed.
fn backup_worker() {
    loop {
        let list: Vec<Weak<Primary>> = lock(&SHARED.q).primaries.clone();
        for w in list {
            if let Some(p) = w.upgrade() {
                p.run_backup();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn maintenance_worker() {
    let interval = crate::config::get().maintenance_interval;
    loop {
        let list: Vec<Weak<Primary>> = lock(&SHARED.q).primaries.clone();
        let started = Instant::now();
        for w in list {
            if let Some(p) = w.upgrade() {
                p.run_maintenance(interval);
            }
        }
        // One sweep per interval at most, re-checking often enough for new primaries.
        let spent = started.elapsed();
        std::thread::sleep(
            interval
                .saturating_sub(spent)
                .clamp(Duration::from_millis(5), Duration::from_millis(20)),
        );
    }
}

impl Primary {
    /// A group-fsync round (on a worker). True when it should run again soon.
    fn run_round(&self) -> bool {
        let _b = lock(&self.busy);
        if self.stop.load(Ordering::Acquire) {
            return false;
        }
        self.round();
        let mut st = lock(&self.state);
        if st.pending || st.synced.is_some() {
            true
        } else {
            st.round_scheduled = false;
            false
        }
    }

    /// The T3 check (on a worker).
    fn run_t3(&self) {
        // A round in progress (an fsync: milliseconds) skips this tick rather than hold up
        // the worker, and with it the T3 checks of every other database.
        let Ok(_b) = self.busy.try_lock() else {
            return;
        };
        if !self.stop.load(Ordering::Acquire) {
            self.t3_check();
        }
    }

    /// A maintenance pass when the last one is at least `interval` old (on the maintenance
    /// thread).
    fn run_maintenance(&self, interval: Duration) {
        let _b = lock(&self.maintenance_busy);
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        let mut last = lock(&self.last_maintenance);
        if last.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        drop(last);
        self.maintain();
        last = lock(&self.last_maintenance);
        *last = Some(Instant::now());
    }

    /// Ends this primary's work in this process: stops its background jobs (waiting for one
    /// in progress), then makes everything captured durable for replicas (WAL fsync,
    /// watermark, log fsync), then closes the agent handle in this thread (its locks and
    /// wal-index mapping go with it; see `AgentHandle::close`). Called when the last
    /// connection closes, or when the role moves on; the log's fds go with the last reference.
    pub fn detach(&self) {
        self.stop.store(true, Ordering::Release);
        let _m = lock(&self.maintenance_busy);
        let _a = lock(&self.append_busy);
        let _c = lock(&self.ckpt_busy);
        let _b = lock(&self.busy);
        *lock(&self.backup) = None;
        self.flush();
        {
            let mut st = lock(&self.state);
            if st.loaded {
                if let Err(e) = st.log.sync() {
                    st.last_error = Some(e.to_string());
                }
            }
            // The WAL reader too: no file of the database stays open after the last close.
            st.wal = None;
            st.wal_hdr = None;
        }
        crate::transport::notify::forget(&self.dir);
        // The last moment this process can see a writer of another process that died between
        // writing its commit's frames and publishing them: once every connection is closed,
        // the next first opener's recovery would commit them (recover.rs).
        self.discard_unpublished_frames();
        self.agent.close();
        crate::logging::event(&format!("event=primary_closed db={:?}", self.db_path));
    }

    /// True while something started in this process (a server) needs the role after the last
    /// connection closed.
    pub fn keeps_alive(&self) -> bool {
        lock(&self.server).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t3_sweep_stretches_with_many_primaries() {
        assert_eq!(t3_interval(0), T3_INTERVAL);
        assert_eq!(t3_interval(1), T3_INTERVAL);
        assert_eq!(t3_interval(100), T3_INTERVAL);
        assert_eq!(t3_interval(101), T3_INTERVAL * 2);
        assert_eq!(t3_interval(1000), Duration::from_millis(200));
    }
}

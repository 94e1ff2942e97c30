//! In-process wake-ups: "the durable watermark of log directory D moved". The primary's
//! background thread bumps it after raising `<dir>/durable`; the HTTP server's long-polls and a
//! follower reading a directory source in the same process wait on it instead of sleeping.
//! Other processes' writes are not signalled: waiters also re-read the watermark file at a
//! short interval (`POLL`), so a missed wake-up costs at most that.

use once_cell::sync::Lazy;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Re-check interval for changes no in-process wake-up announces.
pub const POLL: Duration = Duration::from_millis(2);

#[derive(Default)]
struct Slot {
    seq: Mutex<u64>,
    cv: Condvar,
}

static SLOTS: Lazy<Mutex<HashMap<PathBuf, Arc<Slot>>>> = Lazy::new(Default::default);

fn slot(dir: &Path) -> Arc<Slot> {
    let mut m = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    m.entry(dir.to_path_buf()).or_default().clone()
}

/// Bumped whenever this process raises a log directory's fence (`fenced`): a primary compares
/// it on its write path (one atomic load) and re-reads its fence file only when it moved.
static FENCE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The fence sequence (see `FENCE_SEQ`).
pub fn fence_seq() -> u64 {
    FENCE_SEQ.load(std::sync::atomic::Ordering::Acquire)
}

/// Announce that `dir`'s fence file was raised (a primary of this process must stop writing).
pub fn fenced(dir: &Path) {
    FENCE_SEQ.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    bump(dir);
}

/// Announce that `dir`'s watermark (or log) changed.
pub fn bump(dir: &Path) {
    // Long-polls parked in this process's HTTP engine.
    super::httpd::wake_dir(dir);
    let s = slot(dir);
    *s.seq.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    s.cv.notify_all();
}

/// Forgets `dir`'s wake-up slot when nobody waits on it (its database closed in this process),
/// so the table does not grow with every database ever opened.
pub fn forget(dir: &Path) {
    let mut m = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    if m.get(dir).is_some_and(|s| Arc::strong_count(s) == 1) {
        m.remove(dir);
    }
}

/// Calls `ready` until it returns Some, waiting for a bump (or `POLL`) in between; gives up
/// at `deadline` and returns the last answer (None).
pub fn wait_until<T>(
    dir: &Path,
    deadline: Instant,
    mut ready: impl FnMut() -> Option<T>,
) -> Option<T> {
    let s = slot(dir);
    loop {
        let seen = *s.seq.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = ready() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let g = s.seq.lock().unwrap_or_else(|e| e.into_inner());
        if *g == seen {
            let _ = s.cv.wait_timeout(g, POLL.min(deadline - now));
        }
    }
}

//! Log maintenance on the primary (issue 3 item 5): periodic snapshots built from the log,
//! and retention of segments and snapshot files by size and age. Settings live in
//! `<db>-replica/config.json` (written by `repl_config()`, read by every process at each pass),
//! so all processes of one primary follow the same policy; absent keys take the defaults of
//! `txlog::Policy`.
//!
//! One pass per second per database, on the process's one maintenance thread (`workers`: a
//! compaction can take seconds and must not delay the group fsync that makes commits visible
//! to replicas, which runs on other threads). Only one process at a
//! time runs a pass: `maintenance.lock` is an flock taken without waiting. A snapshot covers
//! only durable records (the watermark), and segments are removed only when the newest
//! snapshot covers every record in them, so a new replica can always bootstrap from the newest
//! snapshot plus the log after it; a replica left behind the removed part is told to re-snapshot.

use super::{lock, log_event, Primary};
use crate::error::{Error, Result};
use crate::txlog::{self, Log, LogConfig, Policy};
use crate::types::Lsn;
use std::path::Path;
use std::time::{Duration, Instant};

/// The settings `repl_config()` knows: name, what it means (for errors and docs).
pub const SETTINGS: &[(&str, &str)] = &[
    (
        "retain_bytes",
        "keep about this many bytes of log (0 = no size limit)",
    ),
    (
        "retain_secs",
        "remove log segments older than this many seconds (0 = no age limit)",
    ),
    (
        "snapshot_bytes",
        "take a new snapshot after this many bytes of log (0 = never)",
    ),
    (
        "segment_bytes",
        "roll to a new log segment past this size (at least 65536)",
    ),
    (
        "exec",
        "accept forwarded writes (POST /v1/exec, repl_exec on replicas): 1 on, 0 off",
    ),
    (
        "exec_timeout_ms",
        "the longest one forwarded request may run, waiting for the write lock included (1..=50000: a replica waits 60 s for the answer)",
    ),
    (
        "exec_max_rows",
        "the most rows one forwarded request may produce",
    ),
    (
        "exec_max_bytes",
        "about the most bytes of values one forwarded request may produce",
    ),
    (
        "compress",
        "store new log records and snapshots compressed: 'none', 'zstd', 'lz4' or a zstd level 1..19 (config.json: 0 none, 1..19 zstd level, 100 lz4)",
    ),
    (
        "capture_lag_max",
        "the most committed transactions the log may lag behind the WAL (1..=1000000): beyond it the next writer appends them itself, or, when the log cannot be written (disk full), writes fail with SQLITE_FULL",
    ),
    (
        "sync_replicas",
        "synchronous replication: a commit returns once this many followers acknowledged it (0..=16; 0 = asynchronous)",
    ),
    (
        "sync_level",
        "what a synchronous follower acknowledges: 'received', 'durable' or 'applied' (config.json: 1, 2, 3)",
    ),
    (
        "backup",
        "back the log up to an S3-compatible bucket: 's3://bucket/prefix' ('' = off; stored in backup.target)",
    ),
    (
        "backup_interval_ms",
        "how often the backup uploader ships what became durable (100..=600000; default 1000)",
    ),
    (
        "backup_retain_secs",
        "how long the bucket keeps the history a restore can reach, e.g. '7d' (0 = everything); older objects go once a newer snapshot covers them",
    ),
    (
        "backup_snapshot_secs",
        "the bucket's snapshot cadence: a new snapshot once the newest is this old and records came after it (0 = a quarter of backup_retain_secs); retention drops objects a newer snapshot covers",
    ),
    (
        "checkpoint_assist",
        "checkpoint PASSIVE in the background once the WAL holds this many frames, and take over SQLite's automatic checkpoint of a commit while the WAL holds 1000..4000 frames, so commits rarely run a checkpoint themselves (0 = off: leave checkpoints to the application; 0..=1000000)",
    ),
    (
        "sync_timeout_ms",
        "the longest a commit waits for its synchronous followers (1..=600000); then it returns anyway and the timeout is counted",
    ),
];

const CONFIG_FILE: &str = "config.json";

fn get(p: &Policy, name: &str) -> Option<u64> {
    Some(match name {
        "retain_bytes" => p.retain_bytes,
        "retain_secs" => p.retain_secs,
        "snapshot_bytes" => p.snapshot_bytes,
        "segment_bytes" => p.segment_bytes,
        "exec" => p.exec,
        "exec_timeout_ms" => p.exec_timeout_ms,
        "exec_max_rows" => p.exec_max_rows,
        "exec_max_bytes" => p.exec_max_bytes,
        "compress" => p.compress,
        "capture_lag_max" => p.capture_lag_max,
        "sync_replicas" => p.sync_replicas,
        "sync_level" => p.sync_level,
        "sync_timeout_ms" => p.sync_timeout_ms,
        "backup_interval_ms" => p.backup_interval_ms,
        "backup_retain_secs" => p.backup_retain_secs,
        "backup_snapshot_secs" => p.backup_snapshot_secs,
        "checkpoint_assist" => p.checkpoint_assist,
        _ => return None,
    })
}

fn unknown(name: &str) -> Error {
    let names: Vec<&str> = SETTINGS.iter().map(|(n, _)| *n).collect();
    Error::Misuse(format!(
        "repl_config(): unknown setting {name:?}; the settings are {}",
        names.join(", ")
    ))
}

/// The value of one setting.
pub fn setting(p: &Policy, name: &str) -> Result<u64> {
    get(p, name).ok_or_else(|| unknown(name))
}

/// All settings as a JSON object.
pub fn policy_json(p: &Policy) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (name, _) in SETTINGS.iter().filter(|(n, _)| *n != "backup") {
        m.insert((*name).into(), get(p, name).unwrap_or(0).into());
    }
    serde_json::Value::Object(m)
}

/// The policy in `dir` (defaults for a missing file or missing keys). A file that is not a
/// JSON object of known non-negative integers is an error naming the file.
pub fn load_policy(dir: &Path) -> Result<Policy> {
    let path = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Policy::default()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let bad = |why: String| {
        Error::Corrupt(format!(
            "{}: {why}; fix or delete the file (repl_config() rewrites it)",
            path.display()
        ))
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let mut p = Policy::default();
    for (k, v) in obj {
        let n = v
            .as_u64()
            .ok_or_else(|| bad(format!("{k} is not a non-negative integer")))?;
        apply(&mut p, k, n).map_err(|e| bad(e.to_string()))?;
    }
    Ok(p)
}

fn apply(p: &mut Policy, name: &str, v: u64) -> Result<()> {
    match name {
        "retain_bytes" => p.retain_bytes = v,
        "retain_secs" => p.retain_secs = v,
        "snapshot_bytes" => p.snapshot_bytes = v,
        "segment_bytes" => {
            if !(64 << 10..=1 << 40).contains(&v) {
                return Err(Error::Misuse(format!(
                    "repl_config(): segment_bytes must be between 65536 and 2^40, not {v}"
                )));
            }
            p.segment_bytes = v
        }
        "exec" => {
            if v > 1 {
                return Err(Error::Misuse(format!(
                    "repl_config(): exec is 1 (accept forwarded writes) or 0 (refuse them), not {v}"
                )));
            }
            p.exec = v
        }
        "exec_timeout_ms" => {
            if !(1..=50_000).contains(&v) {
                return Err(Error::Misuse(format!(
                    "repl_config(): exec_timeout_ms must be between 1 and 50000 (a replica waits 60 s for the answer of a forwarded write), not {v}"
                )));
            }
            p.exec_timeout_ms = v
        }
        "sync_replicas" => {
            if v > 16 {
                return Err(Error::Misuse(format!(
                    "repl_config(): sync_replicas must be between 0 and 16, not {v}"
                )));
            }
            p.sync_replicas = v
        }
        "sync_level" => {
            if !(1..=3).contains(&v) {
                return Err(Error::Misuse(format!(
                    "repl_config(): sync_level is 'received', 'durable' or 'applied' (stored as 1, 2, 3), not {v}"
                )));
            }
            p.sync_level = v
        }
        "sync_timeout_ms" => {
            if !(1..=600_000).contains(&v) {
                return Err(Error::Misuse(format!(
                    "repl_config(): sync_timeout_ms must be between 1 and 600000, not {v}"
                )));
            }
            p.sync_timeout_ms = v
        }
        "capture_lag_max" => {
            if !(1..=1_000_000).contains(&v) {
                return Err(Error::Misuse(format!(
                    "repl_config(): capture_lag_max must be between 1 and 1000000, not {v}"
                )));
            }
            p.capture_lag_max = v
        }
        "backup_interval_ms" => {
            if !(100..=600_000).contains(&v) {
                return Err(Error::Misuse(format!(
                    "repl_config(): backup_interval_ms must be between 100 and 600000, not {v}"
                )));
            }
            p.backup_interval_ms = v
        }
        "checkpoint_assist" => {
            if v > 1_000_000 {
                return Err(Error::Misuse(format!(
                    "repl_config(): checkpoint_assist must be between 0 (off) and 1000000 frames, not {v}"
                )));
            }
            p.checkpoint_assist = v
        }
        "backup_retain_secs" => p.backup_retain_secs = v,
        "backup_snapshot_secs" => p.backup_snapshot_secs = v,
        "exec_max_rows" => p.exec_max_rows = v,
        "exec_max_bytes" => p.exec_max_bytes = v,
        "compress" => {
            if txlog::Compression::from_code(v).is_none() {
                return Err(Error::Misuse(format!(
                    "repl_config(): compress is 'none', 'zstd', 'lz4' or a zstd level 1..19 \
                     (stored as 0, 1..19, 100), not {v}"
                )));
            }
            p.compress = v
        }
        _ => return Err(unknown(name)),
    }
    Ok(())
}

/// Sets `name` to `value` in `dir`'s config file (atomically: tmp + rename) and returns the
/// new policy. Nothing is written when the name or value is invalid.
pub fn set_setting(dir: &Path, name: &str, value: i64) -> Result<Policy> {
    let v = u64::try_from(value).map_err(|_| {
        Error::Misuse(format!(
            "repl_config(): {name} must be a non-negative integer, not {value}"
        ))
    })?;
    let mut p = load_policy(dir)?;
    apply(&mut p, name, v)?;
    let path = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!("{CONFIG_FILE}.{}.tmp", std::process::id()));
    let text = serde_json::to_string_pretty(&policy_json(&p)).expect("serialisable");
    std::fs::write(&tmp, text + "\n")
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("writing {}", path.display()), e)
        })?;
    Ok(p)
}

/// What one pass did (for the log line and `repl_status()`).
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub snapshot: Option<(Lsn, u64, Duration)>,
    pub removed_segments: usize,
    pub removed_snapshots: usize,
}

/// One maintenance pass over `dir` with `policy` (the caller holds `maintenance.lock`).
pub fn pass(dir: &Path, policy: &Policy) -> Result<PassReport> {
    let mut report = PassReport::default();
    let Some((durable, _)) = Log::read_durable(dir)? else {
        return Ok(report);
    };
    let mut newest = txlog::newest_snapshot(dir)?;
    let mut segs = txlog::segment_infos(&dir.join("log"))?;
    // Retention first with the snapshot we have, so a compaction's transient files (its
    // scratch database and the new snapshot) never add to segments already removable.
    // A segment goes only once it is in the bucket too (when a backup is configured).
    let uploaded = crate::transport::s3::uploaded_lsn(dir);
    let uploaded_only = |segs: &[txlog::SegmentInfo], n: usize| match uploaded {
        None => n,
        Some(u) => (0..n)
            .take_while(|&i| segs.get(i + 1).is_some_and(|next| next.first.0 <= u.0 + 1))
            .count(),
    };
    if let Some((snap_lsn, _)) = newest {
        let n = uploaded_only(&segs, policy.removable(&segs, Some(snap_lsn)));
        if n > 0 {
            report.removed_segments += txlog::remove_segment_files(&segs[..n])?;
            segs.drain(..n);
        }
    }
    let (snap_lsn, snap_size) = newest.unwrap_or((Lsn(0), 0));
    // The bucket's own cadence (FORMAT.md §9.5): with a backup, a snapshot once the newest is
    // `backup_snapshot_every()` seconds old, so bucket retention has newer bases to keep.
    let every = policy.backup_snapshot_every();
    let bucket_due = every > 0
        && uploaded.is_some()
        && txlog::newest_snapshot_age(dir)?.is_some_and(|age| age >= Duration::from_secs(every));
    if durable > snap_lsn
        && (bucket_due
            || policy.snapshot_due(Policy::bytes_after(&segs, Some(snap_lsn)), snap_size))
    {
        let t0 = Instant::now();
        // The snapshot must never be ahead of the log on disk: a power loss that took a
        // segment tail the snapshot covers could let a later generation reuse those LSNs.
        // Records up to the watermark are fsynced already (FORMAT.md §7); this fsync only
        // matters for a watermark written by an older build, which raised it before the
        // segments' fsync.
        let after = |i: usize| segs.get(i + 1).is_none_or(|n| n.first.0 > snap_lsn.0 + 1);
        for s in (0..segs.len()).filter(|&i| after(i)).map(|i| &segs[i]) {
            std::fs::File::open(&s.path)
                .and_then(|f| f.sync_data())
                .map_err(|e| Error::io(format!("fsync of {}", s.path.display()), e))?;
        }
        let c = txlog::Compression::from_code(policy.compress).unwrap_or_default();
        let (meta, path) = txlog::compact(dir, durable, c)?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        report.snapshot = Some((meta.lsn, size, t0.elapsed()));
        newest = Some((meta.lsn, size));
    }
    let Some((snap_lsn, _)) = newest else {
        return Ok(report);
    };
    let n = uploaded_only(&segs, policy.removable(&segs, Some(snap_lsn)));
    if n > 0 {
        report.removed_segments += txlog::remove_segment_files(&segs[..n])?;
    }
    report.removed_snapshots = txlog::remove_snapshots_before(dir, snap_lsn)?;
    Ok(report)
}

impl Primary {
    /// Makes this process's log follow `policy` now (the roll size; the rest is read by each
    /// pass). `repl_config()` calls it so a change applies to the next append at once.
    pub fn apply_policy(&self, policy: &Policy) {
        use std::sync::atomic::Ordering::Relaxed;
        self.lag_max.store(policy.capture_lag_max.max(1), Relaxed);
        self.sync_replicas.store(policy.sync_replicas, Relaxed);
        self.sync_level.store(policy.sync_level, Relaxed);
        self.sync_timeout_ms.store(policy.sync_timeout_ms, Relaxed);
        self.ckpt_assist.store(policy.checkpoint_assist, Relaxed);
        let mut st = lock(&self.state);
        let cfg = LogConfig {
            segment_bytes: policy.segment_bytes,
            compression: txlog::Compression::from_code(policy.compress).unwrap_or_default(),
        };
        if *st.log.config() != cfg {
            st.log.set_config(cfg);
        }
    }

    /// One maintenance pass if no other process is running one. Errors go to `last_error`
    /// and the event log; nothing is removed after a failed snapshot.
    pub(super) fn maintain(&self) {
        // A fence raised by another process (its server, or repl_promote() elsewhere).
        self.reload_fence();
        let Ok(lock_file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("maintenance.lock"))
        else {
            return;
        };
        if lock_file.try_lock().is_err() {
            return;
        }
        let policy = match load_policy(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                log_event(&format!(
                    "event=maintenance_error db={:?} error={:?}",
                    self.db_path,
                    e.to_string()
                ));
                lock(&self.state).last_error = Some(e.to_string());
                return;
            }
        };
        self.apply_policy(&policy);
        match pass(&self.dir, &policy) {
            Ok(r) => {
                if let Some((lsn, bytes, took)) = r.snapshot {
                    log_event(&format!(
                        "event=snapshot db={:?} lsn={lsn} bytes={bytes} ms={}",
                        self.db_path,
                        took.as_millis()
                    ));
                }
                if r.removed_segments + r.removed_snapshots > 0 {
                    let first = Log::first_segment_lsn(&self.dir).ok().flatten();
                    log_event(&format!(
                        "event=retention db={:?} removed_segments={} removed_snapshots={} first_lsn={}",
                        self.db_path,
                        r.removed_segments,
                        r.removed_snapshots,
                        first.map_or(0, |l| l.0)
                    ));
                }
            }
            Err(e) => {
                log_event(&format!(
                    "event=maintenance_error db={:?} error={:?}",
                    self.db_path,
                    e.to_string()
                ));
                lock(&self.state).last_error = Some(format!("log maintenance: {e}"));
            }
        }
        let _ = lock_file.unlock();
    }
}

//! The backup uploader of a primary (issue 17): when `repl_config('backup', 's3://…')` (the
//! file `backup.target` in the log directory) names a bucket, the process's one "repl-backup"
//! thread (`workers.rs`) runs an uploader pass (`transport::s3::Uploader`) every
//! `backup_interval_ms`. Only one process of a primary uploads: `backup.lock` is an flock held
//! for as long as that process's uploader lives. Nothing here is on the commit path: a bucket
//! that is down shows as a growing backlog and `last_error` in `repl_status()` / `/metrics`,
//! and the next pass after it is back catches up; local retention keeps every segment the
//! bucket does not have yet (`maintenance.rs`).

use super::{lock, log_event, Primary};
use crate::transport::s3::{self, Uploader};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// One primary's uploader in this process.
pub(super) struct Backup {
    target: String,
    uploader: Uploader,
    /// `backup.lock`, held while this process uploads.
    _lock: File,
    last: Option<Instant>,
    /// The last lease check (`Uploader::renew`) between passes.
    last_renew: Option<Instant>,
    failing: bool,
}

/// How long the backup target and settings read from the log directory are trusted.
const SETTINGS_RECHECK: Duration = Duration::from_secs(1);

/// What `run_backup` last read: when, the target, the settings.
pub(super) type BackupSeen = Option<(Instant, Option<String>, crate::txlog::Policy)>;

impl Primary {
    /// The backup target or a backup setting was changed by this process: read them again at
    /// the next pass.
    pub fn backup_settings_changed(&self) {
        *lock(&self.backup_seen) = None;
    }

    /// A pass when one is due (on the backup thread).
    pub(super) fn run_backup(&self) {
        let mut slot = lock(&self.backup);
        if self.stop.load(Ordering::Acquire) {
            *slot = None;
            return;
        }
        // The target and settings are files another process may change: read again at most
        // once a second (this runs every 20 ms for every primary of the process), and at once
        // after a change made here (`backup_settings_changed`).
        let (target, policy) = {
            let mut seen = lock(&self.backup_seen);
            match &*seen {
                Some((at, target, policy)) if at.elapsed() < SETTINGS_RECHECK => {
                    (target.clone(), *policy)
                }
                _ => {
                    let target = s3::configured_target(&self.dir);
                    let policy = match target {
                        Some(_) => super::maintenance::load_policy(&self.dir).unwrap_or_default(),
                        None => Default::default(),
                    };
                    *seen = Some((Instant::now(), target.clone(), policy));
                    (target, policy)
                }
            }
        };
        let Some(target) = target else {
            *slot = None;
            return;
        };
        if slot.as_ref().is_some_and(|b| b.target != target) {
            *slot = None; // the target changed: a new uploader
        }
        let interval = Duration::from_millis(policy.backup_interval_ms.max(100));
        if let Some(b) = slot
            .as_mut()
            .filter(|b| b.last.is_some_and(|t| t.elapsed() < interval))
        {
            // No pass due yet; the lease may be (an interval longer than half the lease).
            if b.last_renew
                .or(b.last)
                .is_some_and(|t| t.elapsed() >= Uploader::renew_every())
            {
                b.last_renew = Some(Instant::now());
                if let Err(e) = b.uploader.renew() {
                    if b.uploader.refused().is_some() {
                        log_event(&format!(
                            "event=backup_stopped db={:?} target={:?} error={:?}",
                            self.db_path,
                            b.uploader.target(),
                            e.to_string()
                        ));
                    }
                }
            }
            return;
        }
        if slot.is_none() {
            let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join("backup.lock"))
            else {
                return;
            };
            if f.try_lock().is_err() {
                return; // another process of this primary uploads
            }
            match Uploader::new(&target, &self.dir) {
                Ok(u) => {
                    log_event(&format!(
                        "event=backup_start db={:?} target={:?}",
                        self.db_path,
                        u.target()
                    ));
                    *slot = Some(Backup {
                        target,
                        uploader: u,
                        _lock: f,
                        last: None,
                        last_renew: None,
                        failing: false,
                    });
                }
                Err(e) => {
                    let msg = format!("backup: {e}");
                    if lock(&self.state).last_error.as_deref() != Some(msg.as_str()) {
                        log_event(&format!(
                            "event=backup_error db={:?} error={:?}",
                            self.db_path,
                            e.to_string()
                        ));
                    }
                    lock(&self.state).last_error = Some(msg);
                    return;
                }
            }
        }
        let b = slot.as_mut().expect("set above");
        if b.uploader.refused().is_some() {
            return; // stopped for good: the status file says why
        }
        b.last = Some(Instant::now());
        b.last_renew = b.last;
        match b
            .uploader
            .run(policy.backup_retain_secs.saturating_mul(1000))
        {
            Ok(r) => {
                if b.failing {
                    log_event(&format!(
                        "event=backup_resumed db={:?} target={:?}",
                        self.db_path,
                        b.uploader.target()
                    ));
                    b.failing = false;
                }
                if r.objects > 0 || r.deleted > 0 {
                    log_event(&format!(
                        "event=backup_upload db={:?} objects={} bytes={} uploaded_lsn={} durable_lsn={} deleted={}",
                        self.db_path,
                        r.objects,
                        r.bytes,
                        r.uploaded_lsn.map_or(0, |l| l.0),
                        r.durable_lsn.map_or(0, |l| l.0),
                        r.deleted
                    ));
                }
            }
            Err(e) => {
                // A lost manifest race stops the uploader for good: always said, once.
                let stopped = b.uploader.refused().is_some();
                if !b.failing || stopped {
                    log_event(&format!(
                        "event={} db={:?} target={:?} error={:?}",
                        if stopped {
                            "backup_stopped"
                        } else {
                            "backup_error"
                        },
                        self.db_path,
                        b.uploader.target(),
                        e.to_string()
                    ));
                }
                b.failing = true;
            }
        }
    }

    /// The backup's status for `repl_status()` (None: no backup configured).
    pub(super) fn backup_json(&self) -> Option<serde_json::Value> {
        let target = s3::configured_target(&self.dir)?;
        let target = s3::Target::parse(&target).map_or(target, |t| t.display());
        let mut v = s3::read_status(&self.dir).unwrap_or_else(|| serde_json::json!({}));
        v["target"] = target.into();
        Some(v)
    }
}

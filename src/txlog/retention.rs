//! Retention: removing what no reader needs any more, and deciding when the primary takes a new
//! snapshot. Segments go whole and oldest first, and only when every record in them is covered
//! by the newest snapshot (a replica bootstrapping from it never needs them); the current (last)
//! segment is never removed, so the log always knows its tail. Older snapshot files go once a
//! newer one exists. Readers asking for a removed LSN get the "re-snapshot" error from
//! `read_from`.
//!
//! The decisions (`Policy::removable`, `Policy::snapshot_due`) are pure functions of the
//! directory listing, so they are unit-tested without files.

use super::segment::list_segments;
use super::snapshot::list_snapshots;
use super::Log;
use crate::error::{Error, Result};
use crate::types::Lsn;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The retention and snapshot settings of a primary (`repl_config()`; 0 = no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Keep at most about this many bytes of log: older segments covered by the newest
    /// snapshot go first.
    pub retain_bytes: u64,
    /// Remove segments covered by the newest snapshot once they are older than this.
    pub retain_secs: u64,
    /// Take a new snapshot once the log after the newest one holds at least this many bytes
    /// *and* at least as many bytes as that snapshot (so snapshots cost at most one database
    /// write per database-size of changes, and a new replica reads at most about twice the
    /// database).
    pub snapshot_bytes: u64,
    /// Roll to a new segment past this size (segments are the unit of removal).
    pub segment_bytes: u64,
    /// Forwarded writes (`POST /v1/exec`, primary/exec.rs) are accepted (1) or refused (0).
    pub exec: u64,
    /// The longest one forwarded request may run, waiting for the write lock included.
    pub exec_timeout_ms: u64,
    /// The most rows, and about the most bytes, one forwarded request may produce.
    pub exec_max_rows: u64,
    pub exec_max_bytes: u64,
    /// How new segments' records and snapshot files are stored (FORMAT.md §3.7), as a code:
    /// 0 = uncompressed, 1..=19 = zstd at that level, 100 = lz4 (`Compression::from_code`).
    pub compress: u64,
    /// The most committed transactions the log may lag behind the WAL while it cannot be
    /// written (disk full): beyond it writes fail with SQLITE_FULL (issue 14). While the log
    /// can be written, a lag this large makes the next writer append itself (back-pressure).
    pub capture_lag_max: u64,
    /// Synchronous replication (issue 16): a commit returns once this many followers
    /// acknowledged its LSN (0 = asynchronous), at level `sync_level` (1 received, 2 durable,
    /// 3 applied), waiting at most `sync_timeout_ms`.
    pub sync_replicas: u64,
    pub sync_level: u64,
    pub sync_timeout_ms: u64,
    /// Object storage backups (issue 17, FORMAT.md §9): how often the uploader ships what
    /// became durable, and how long the bucket keeps the history (0 = everything).
    pub backup_interval_ms: u64,
    pub backup_retain_secs: u64,
    /// The bucket's snapshot cadence: a new snapshot (uploaded by the next pass) once the newest
    /// is this many seconds old and records came after it; 0 = a quarter of
    /// `backup_retain_secs` (none while that is 0 too). It lets retention drop old objects.
    pub backup_snapshot_secs: u64,
    /// Checkpoint assist (primary/checkpoint.rs): once the WAL holds this many frames the
    /// primary checkpoints PASSIVE in the background (0 = off).
    pub checkpoint_assist: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retain_bytes: 1 << 30,
            retain_secs: 24 * 3600,
            snapshot_bytes: 64 << 20,
            segment_bytes: 64 << 20,
            exec: 0,
            exec_timeout_ms: 2000,
            exec_max_rows: 10_000,
            exec_max_bytes: 4 << 20,
            compress: 0,
            capture_lag_max: 1000,
            sync_replicas: 0,
            sync_level: 3,
            sync_timeout_ms: 5000,
            backup_interval_ms: 1000,
            backup_retain_secs: 0,
            backup_snapshot_secs: 0,
            checkpoint_assist: 500,
        }
    }
}

/// One segment file as the retention pass sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// LSN of its first record (from the file name).
    pub first: Lsn,
    pub bytes: u64,
    /// Seconds since it was last written.
    pub age_secs: u64,
    pub path: PathBuf,
}

impl Policy {
    /// How many of the oldest segments may be removed, given the newest snapshot's LSN.
    /// A segment qualifies only if the next segment starts at or before `snapshot + 1` (all
    /// its records are in the snapshot) and either the log is over `retain_bytes` or the
    /// segment is older than `retain_secs`. The last segment never qualifies.
    pub fn removable(&self, segs: &[SegmentInfo], snapshot: Option<Lsn>) -> usize {
        let Some(snap) = snapshot else { return 0 };
        let mut total: u64 = segs.iter().map(|s| s.bytes).sum();
        let mut n = 0;
        for w in segs.windows(2) {
            let covered = w[1].first.0 <= snap.0 + 1;
            let too_big = self.retain_bytes > 0 && total > self.retain_bytes;
            let too_old = self.retain_secs > 0 && w[0].age_secs > self.retain_secs;
            if !covered || !(too_big || too_old) {
                break;
            }
            total -= w[0].bytes;
            n += 1;
        }
        n
    }

    /// Bytes of the segments that hold records after `snapshot` (whole segments: an
    /// over-estimate by at most one segment).
    pub fn bytes_after(segs: &[SegmentInfo], snapshot: Option<Lsn>) -> u64 {
        let after = snapshot.map_or(0, |s| s.0);
        segs.iter()
            .enumerate()
            .filter(|(i, _)| segs.get(i + 1).is_none_or(|next| next.first.0 > after + 1))
            .map(|(_, s)| s.bytes)
            .sum()
    }

    /// Is a new snapshot due? `log_after` = bytes of log after the newest snapshot,
    /// `snapshot_size` = that snapshot's file size (0 when there is none).
    pub fn snapshot_due(&self, log_after: u64, snapshot_size: u64) -> bool {
        self.snapshot_bytes > 0 && log_after >= self.snapshot_bytes.max(snapshot_size)
    }

    /// The bucket's snapshot cadence in seconds (0: none): `backup_snapshot_secs`, else a
    /// quarter of `backup_retain_secs` (at least 1 s).
    pub fn backup_snapshot_every(&self) -> u64 {
        match (self.backup_snapshot_secs, self.backup_retain_secs) {
            (0, 0) => 0,
            (0, r) => (r / 4).max(1),
            (s, _) => s,
        }
    }
}

/// The segments of `<dir>/log`, oldest first, with sizes and ages.
pub fn segment_infos(log_dir: &Path) -> Result<Vec<SegmentInfo>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for (first, path) in list_segments(log_dir)? {
        let md = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let age_secs = md
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .map_or(0, |d| d.as_secs());
        out.push(SegmentInfo {
            first,
            bytes: md.len(),
            age_secs,
            path,
        });
    }
    Ok(out)
}

/// Removes the given (oldest) segments, oldest first; stops at the first failure.
pub fn remove_segment_files(segs: &[SegmentInfo]) -> Result<usize> {
    for s in segs {
        match std::fs::remove_file(&s.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!("removing segment {}", s.path.display()),
                    e,
                ))
            }
        }
    }
    Ok(segs.len())
}

/// The newest snapshot file's LSN and size, if any.
pub fn newest_snapshot(dir: &Path) -> Result<Option<(Lsn, u64)>> {
    let snaps = list_snapshots(dir)?;
    let Some((lsn, _, path)) = snaps.last() else {
        return Ok(None);
    };
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(Some((*lsn, size)))
}

/// How long ago the newest snapshot file was written (None: no snapshot).
pub fn newest_snapshot_age(dir: &Path) -> Result<Option<std::time::Duration>> {
    let snaps = list_snapshots(dir)?;
    let Some((_, _, path)) = snaps.last() else {
        return Ok(None);
    };
    Ok(std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default()))
}

impl Log {
    /// Retention: removes the oldest rolled segments whose records are all older than `lsn`
    /// (never the current segment). Returns how many were removed.
    pub fn remove_segments_before(&mut self, lsn: Lsn) -> Result<usize> {
        let segs = list_segments(&self.log_dir)?;
        let cur = self.cur.as_ref().map(|c| c.path.clone());
        let mut removed = 0;
        for w in segs.windows(2) {
            let ((_, path), (next_first, _)) = (&w[0], &w[1]);
            if *next_first > lsn || cur.as_ref() == Some(path) {
                break;
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("removing segment {}", path.display()), e))?;
            removed += 1;
        }
        if removed > 0 {
            self.mark_dir_dirty();
            if self.first_lsn.is_some() {
                self.first_lsn = Some(segs[removed].0);
            }
        }
        Ok(removed)
    }

    /// Removes snapshot files with LSN < `lsn`, always keeping the newest snapshot. Returns the count.
    pub fn remove_snapshots_before(&self, lsn: Lsn) -> Result<usize> {
        remove_snapshots_before(&self.dir, lsn)
    }
}

/// Removes snapshot files in `dir` with LSN < `lsn`, always keeping the newest one.
pub fn remove_snapshots_before(dir: &Path, lsn: Lsn) -> Result<usize> {
    let snaps = list_snapshots(dir)?;
    let keep = snaps.len().saturating_sub(1);
    let mut removed = 0;
    for (l, _, path) in snaps.iter().take(keep) {
        if *l < lsn {
            match std::fs::remove_file(path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("removing snapshot {}", path.display()),
                        e,
                    ))
                }
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(v: &[(u64, u64, u64)]) -> Vec<SegmentInfo> {
        v.iter()
            .map(|&(first, bytes, age_secs)| SegmentInfo {
                first: Lsn(first),
                bytes,
                age_secs,
                path: PathBuf::from(format!("{first}.seg")),
            })
            .collect()
    }

    fn policy(retain_bytes: u64, retain_secs: u64) -> Policy {
        Policy {
            retain_bytes,
            retain_secs,
            ..Policy::default()
        }
    }

    #[test]
    fn nothing_goes_without_a_snapshot() {
        let s = segs(&[(1, 100, 1000), (10, 100, 1000), (20, 100, 0)]);
        assert_eq!(policy(1, 1).removable(&s, None), 0);
    }

    #[test]
    fn only_segments_covered_by_the_snapshot_go() {
        let s = segs(&[(1, 100, 0), (10, 100, 0), (20, 100, 0), (30, 100, 0)]);
        // Snapshot at 19: segments 1..9 and 10..19 are covered, 20..29 is not.
        assert_eq!(policy(1, 0).removable(&s, Some(Lsn(19))), 2);
        // Snapshot at 18: only the first is covered (10..19 holds LSN 19).
        assert_eq!(policy(1, 0).removable(&s, Some(Lsn(18))), 1);
        // Snapshot past the end: never the last segment.
        assert_eq!(policy(1, 0).removable(&s, Some(Lsn(1000))), 3);
    }

    #[test]
    fn size_limit_removes_until_under_it() {
        let s = segs(&[(1, 100, 0), (10, 100, 0), (20, 100, 0), (30, 100, 0)]);
        let snap = Some(Lsn(1000));
        assert_eq!(policy(400, 0).removable(&s, snap), 0);
        assert_eq!(policy(399, 0).removable(&s, snap), 1);
        assert_eq!(policy(250, 0).removable(&s, snap), 2);
        assert_eq!(policy(0, 0).removable(&s, snap), 0, "0 = no limit");
    }

    #[test]
    fn age_limit_removes_old_segments_only() {
        let s = segs(&[(1, 100, 500), (10, 100, 300), (20, 100, 100), (30, 100, 0)]);
        let snap = Some(Lsn(1000));
        assert_eq!(policy(0, 400).removable(&s, snap), 1);
        assert_eq!(policy(0, 200).removable(&s, snap), 2);
        assert_eq!(policy(0, 50).removable(&s, snap), 3);
        // Either limit suffices.
        assert_eq!(policy(150, 400).removable(&s, snap), 3);
    }

    #[test]
    fn bytes_after_counts_segments_holding_newer_records() {
        let s = segs(&[(1, 100, 0), (10, 200, 0), (20, 400, 0)]);
        assert_eq!(Policy::bytes_after(&s, None), 700);
        assert_eq!(Policy::bytes_after(&s, Some(Lsn(9))), 600);
        assert_eq!(Policy::bytes_after(&s, Some(Lsn(12))), 600);
        assert_eq!(Policy::bytes_after(&s, Some(Lsn(19))), 400);
        assert_eq!(
            Policy::bytes_after(&s, Some(Lsn(25))),
            400,
            "the last segment always counts"
        );
        assert_eq!(Policy::bytes_after(&[], Some(Lsn(5))), 0);
    }

    #[test]
    fn backup_snapshot_cadence() {
        let p = |snap, retain| Policy {
            backup_snapshot_secs: snap,
            backup_retain_secs: retain,
            ..Policy::default()
        };
        assert_eq!(p(0, 0).backup_snapshot_every(), 0);
        assert_eq!(p(0, 7 * 86400).backup_snapshot_every(), 7 * 86400 / 4);
        assert_eq!(p(0, 2).backup_snapshot_every(), 1);
        assert_eq!(p(60, 0).backup_snapshot_every(), 60);
    }

    #[test]
    fn snapshot_due_needs_both_thresholds() {
        let p = Policy {
            snapshot_bytes: 1000,
            ..Policy::default()
        };
        assert!(!p.snapshot_due(999, 0));
        assert!(p.snapshot_due(1000, 0));
        assert!(
            !p.snapshot_due(1500, 2000),
            "a big database waits for as much log as itself"
        );
        assert!(p.snapshot_due(2000, 2000));
        let off = Policy {
            snapshot_bytes: 0,
            ..Policy::default()
        };
        assert!(!off.snapshot_due(u64::MAX, 0));
    }
}

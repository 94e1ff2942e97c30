//! Retention: removing what no reader needs any more. Segments go whole and oldest first, and
//! only when every record in them is older than the LSN asked for; the current (last) segment is
//! never removed, so the log always knows its tail. Snapshot files older than an LSN go too, but
//! the newest snapshot always stays. Readers asking for a removed LSN get the "re-snapshot" error
//! from `read_from`.

use super::segment::list_segments;
use super::snapshot::list_snapshots;
use super::Log;
use crate::error::{Error, Result};
use crate::types::Lsn;

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
        let snaps = list_snapshots(&self.dir)?;
        let keep = snaps.len().saturating_sub(1);
        let mut removed = 0;
        for (l, _, path) in snaps.iter().take(keep) {
            if *l < lsn {
                std::fs::remove_file(path)
                    .map_err(|e| Error::io(format!("removing snapshot {}", path.display()), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

//! Whole-database states from the source's snapshot: the bootstrap of an empty file (E.1)
//! and the re-snapshot of a replica whose content is no longer a state of the primary (E.10).

use super::plan::plan_batch;
use super::position::Applied;
use super::{lock, log_event, Replica, State, BATCH_BYTES};
use crate::error::{Error, Result};
use crate::transport::Fetch;
use crate::txlog::DbChecksum;
use crate::types::Lsn;
use std::time::{Duration, Instant};

impl Replica {
    /// E.1 bootstrap of an empty file: the snapshot streamed straight into the database file
    /// under an EXCLUSIVE lock, page by page as it arrives (memory: a page and the per-page
    /// checksums, whatever the database size). No reader can see it half-written: the lock is
    /// held throughout, and page 1, which makes the file a database, is written last, only
    /// once the record and database checksums held. Any failure truncates the file back to
    /// empty: nothing of an unverified snapshot stays.
    pub(super) fn bootstrap(&self, st: &mut State) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self.handle.lock_db_exclusive() {
            if Instant::now() > deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut page1: Option<Vec<u8>> = None;
        // Set once the file was found empty: only then may a failure truncate it.
        let mut ours = false;
        let r = (|| -> Result<(crate::txlog::RecordMeta, DbChecksum)> {
            if self.handle.db_size()? != 0 {
                return Err(Error::Busy(format!(
                    "{} was written by someone else while bootstrapping; retry",
                    self.db_path
                )));
            }
            // A stale WAL or wal-index next to an empty file would be recovered over the
            // snapshot: nobody can use them while we hold EXCLUSIVE.
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.db_path));
            }
            ours = true;
            let handle = &self.handle;
            self.stream_snapshot(
                st,
                "bootstrap download",
                &mut |_| Ok(()),
                &mut |pgno, data| {
                    if pgno.get() == 1 {
                        page1 = Some(data.to_vec());
                        return Ok(());
                    }
                    let ps = data.len() as u64;
                    handle.write_db((pgno.get() as u64 - 1) * ps, data)
                },
            )
        })();
        let r = r.and_then(|(meta, sums)| {
            let ps = meta.page_size;
            if let Some(p1) = &page1 {
                self.handle.write_db(0, p1)?;
            }
            self.handle
                .truncate_db(meta.commit_size as u64 * ps.get() as u64)?;
            self.handle.sync_db()?;
            Ok((meta, sums))
        });
        if r.is_err() && ours {
            // Nothing of an unverified or partial snapshot stays: back to the empty file.
            let _ = self.handle.truncate_db(0);
        }
        self.handle.unlock_db_to_shared();
        *lock(&self.progress) = None;
        let (meta, sums) = r?;
        let ps = meta.page_size;
        let a = self.pos.write(&Applied {
            lsn: meta.lsn,
            generation: meta.generation,
            checksum: sums.total(),
            ..Default::default()
        })?;
        self.pos.sync()?;
        st.seen_seq = a.seq;
        st.sums = sums;
        st.lsn = meta.lsn;
        st.generation = meta.generation;
        st.page_size = Some(ps);
        st.loaded = true;
        st.last_hdr = None;
        st.stats.last_record_ms = Some(meta.timestamp_ms);
        log_event(&format!(
            "event=bootstrap db={:?} lsn={} pages={} bytes={}",
            self.db_path,
            meta.lsn,
            meta.page_count,
            meta.page_count as usize * ps.bytes()
        ));
        Ok(())
    }

    pub(super) fn resnapshot(&self, st: &mut State, why: &str) -> Result<()> {
        let snap = self.fetch_snapshot(st, "re-snapshot download");
        *lock(&self.progress) = None;
        let snap = snap?;
        // The newest snapshot may be older than what readers already saw (st.lsn): publishing
        // it alone would take them back in time (to an empty database when it is the LSN 0
        // snapshot). So the records after it up to at least st.lsn go into the same WAL
        // transaction, and readers switch from st.lsn to a state no older than it at once.
        let (snap_lsn, snap_gen) = (snap.meta.lsn, snap.meta.generation);
        let mut batch = vec![snap];
        while batch.last().expect("non-empty").meta.lsn.0 < st.lsn.0 {
            let next = batch.last().expect("non-empty").meta.lsn.next();
            let fetched = {
                let _net = self.network_call(st);
                st.source.as_ref().expect("set").fetch(next, BATCH_BYTES)
            }
            .map_err(|e| self.damaged_source(st, e))?;
            match fetched {
                Fetch::Records(r) if !r.is_empty() => batch.extend(r),
                _ => break, // the log moved past the snapshot meanwhile, or ends: as far as it goes
            }
        }
        if let Some(r) = batch
            .iter()
            .find(|r| Some(r.meta.page_size) != st.page_size)
        {
            return Err(self.page_size_changed(st, &r.meta));
        }
        log_event(&format!(
            "event=resnapshot db={:?} reason={why:?} from_lsn={} to_lsn={} snapshot_lsn={}",
            self.db_path,
            st.lsn,
            batch.last().expect("non-empty").meta.lsn,
            snap_lsn
        ));
        let mut sums = DbChecksum::new(batch[0].meta.page_size);
        let plan = plan_batch(
            Lsn(snap_lsn.0.saturating_sub(1)),
            snap_gen,
            &mut sums,
            &batch,
        )?;
        st.sums = sums;
        st.last_hdr = None; // whatever is in the WAL now, the snapshot overrides every page
        st.stats.resnapshots += 1;
        self.write_plan(st, &plan)
    }
}

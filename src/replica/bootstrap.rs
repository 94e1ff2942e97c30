//! Whole-database states from the source's snapshot: the bootstrap of an empty file (E.1)
//! and the re-snapshot of a replica whose content is no longer a state of the primary (E.10).

use super::apply::{ApplyError, FrameAppender};
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

    /// E.10 re-snapshot, streamed: the source's snapshot goes page by page into frames of ONE
    /// new replica commit (`FrameAppender`: nothing is visible until its last frame), then the
    /// records after the snapshot up to at least the replica's LSN go into the same commit
    /// (readers switch from `st.lsn` to a state no older than it at once; the newest snapshot
    /// may be older than what they saw). The commit is published only once the snapshot's
    /// record and database checksums and every record's checksum held. Memory: a MiB of frames
    /// and the per-page checksums, plus the records after the snapshot.
    pub(super) fn resnapshot(&self, st: &mut State, why: &str) -> Result<()> {
        st.last_hdr = None; // whatever is in the WAL now, the snapshot overrides every page
        let r = self.resnapshot_streamed(st, why);
        *lock(&self.progress) = None;
        let (h, plan_last, meta_gen, sums, pages, first, ts, checksum) = r?;
        st.sums = sums;
        st.last_hdr = Some(h);
        st.lsn = plan_last;
        st.generation = meta_gen;
        st.stats.resnapshots += 1;
        st.stats.batches += 1;
        st.stats.last_batch = Some((first, plan_last, pages, true));
        st.stats.last_record_ms = Some(ts);
        let w = self.pos.write(&Applied {
            seq: 0,
            lsn: plan_last,
            generation: meta_gen,
            checksum,
            intent: None,
        })?;
        st.seen_seq = w.seq;
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn resnapshot_streamed(
        &self,
        st: &mut State,
        why: &str,
    ) -> Result<(
        crate::wal::WalIndexHeader,
        Lsn,
        crate::types::Generation,
        DbChecksum,
        usize,
        Lsn,
        u64,
        crate::types::Checksum,
    )> {
        // The frames are written under the applier's WRITE lock, taken before the download:
        // readers are not blocked by it (they read the published state meanwhile).
        let mut shm = self.write_locked(st)?;
        let st_ro: &State = st;
        let wal = st_ro.wal.as_ref().expect("opened");
        let appender = std::cell::RefCell::new(None);
        let mut pages = 0usize;
        let to_err = |e: ApplyError| match e {
            ApplyError::NeedRecovery => Error::Busy("the wal-index needs recovery; retry".into()),
            ApplyError::Foreign(m) => Error::Busy(m),
            ApplyError::Other(e) => e,
        };
        let mut shm_slot = Some(&mut shm);
        let streamed = self.stream_snapshot(
            st_ro,
            "re-snapshot download",
            &mut |m| {
                if Some(m.page_size) != st_ro.page_size && st_ro.page_size.is_some() {
                    return Err(self.page_size_changed(st_ro, m));
                }
                let shm = shm_slot
                    .take()
                    .ok_or_else(|| Error::Corrupt("the snapshot stream has two headers".into()))?;
                let a = FrameAppender::begin(shm, wal, None, m.page_size).map_err(to_err)?;
                *appender.borrow_mut() = Some(a);
                Ok(())
            },
            &mut |pgno, data| {
                pages += 1;
                appender
                    .borrow_mut()
                    .as_mut()
                    .expect("begun in on_meta")
                    .push(pgno.get(), data)
                    .map_err(to_err)
            },
        );
        let (smeta, mut sums) = streamed.map_err(|e| self.damaged_source(st_ro, e))?;
        let mut appender = appender.into_inner().expect("begun in on_meta");
        // The records after the snapshot, up to at least the replica's LSN.
        let mut records = Vec::new();
        let mut next = smeta.lsn.next();
        while next.0 <= st_ro.lsn.0 {
            let fetched = {
                let _net = self.network_call(st_ro);
                st_ro.source.as_ref().expect("set").fetch(next, BATCH_BYTES)
            }
            .map_err(|e| self.damaged_source(st_ro, e))?;
            match fetched {
                Fetch::Records(r) if !r.is_empty() => {
                    next = r.last().expect("non-empty").meta.lsn.next();
                    records.extend(r);
                }
                _ => break, // the log moved past the snapshot meanwhile, or ends: as far as it goes
            }
        }
        if let Some(r) = records.iter().find(|r| r.meta.page_size != smeta.page_size) {
            return Err(self.page_size_changed(st_ro, &r.meta));
        }
        let (last_lsn, generation, commit_size, checksum, ts) = if records.is_empty() {
            (
                smeta.lsn,
                smeta.generation,
                smeta.commit_size,
                smeta.db_checksum,
                smeta.timestamp_ms,
            )
        } else {
            let plan = plan_batch(smeta.lsn, smeta.generation, &mut sums, &records)?;
            for (pgno, data) in &plan.pages {
                appender.push(*pgno, data).map_err(to_err)?;
                pages += 1;
            }
            (
                plan.last_lsn,
                plan.generation,
                plan.commit_size,
                plan.db_checksum,
                plan.timestamp_ms,
            )
        };
        log_event(&format!(
            "event=resnapshot db={:?} reason={why:?} from_lsn={} to_lsn={last_lsn} snapshot_lsn={}",
            self.db_path, st_ro.lsn, smeta.lsn
        ));
        // E.8: the intent before the publish, so a crash in between is recognised.
        self.pos.write_intent((last_lsn, generation, checksum))?;
        let h = appender.finish(commit_size).map_err(to_err)?;
        drop(shm);
        // E.5: durable before the position says so.
        wal.sync_data()
            .map_err(|e| Error::io("syncing the replica's WAL", e))?;
        Ok((
            h, last_lsn, generation, sums, pages, smeta.lsn, ts, checksum,
        ))
    }
}

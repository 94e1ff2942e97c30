//! Whole-database states from the source's snapshot: the bootstrap of an empty file (E.1)
//! and the re-snapshot of a replica whose content is no longer a state of the primary (E.10).

use super::apply::{ApplyError, FrameAppender};
use super::download::Fresh;
use super::plan::plan_batch;
use super::position::Applied;
use super::{lock, log_event, Replica, State, BATCH_BYTES};
use crate::error::{Error, Result};
use crate::transport::Fetch;
use crate::txlog::{DbChecksum, RecordMeta};
use crate::types::Lsn;
use crate::vfs::DbFileIo;
use std::time::{Duration, Instant};

/// How often a bootstrap makes what it wrote durable and records it in `bootstrap.json`
/// (bytes of snapshot page data): an interrupted bootstrap re-fetches at most this much more.
const PROGRESS_EVERY: u64 = 16 << 20;
/// Attempts of one `repl_sync()` to continue a bootstrap whose download broke.
const BOOTSTRAP_ATTEMPTS: u32 = 4;

/// `<db>-replica/bootstrap.json` and `<db>-replica/bootstrap.page1`: the state of a bootstrap
/// in progress (WAL.md §E.1).
fn progress_paths(db_path: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = crate::txlog::log_dir(db_path);
    (d.join("bootstrap.json"), d.join("bootstrap.page1"))
}

/// A bootstrap's recorded progress: the snapshot's record header and how many of its page
/// entries are durable in the database file (page 1 in `bootstrap.page1`).
struct Saved {
    header: Vec<u8>,
    entries: u32,
}

fn read_saved(db_path: &str) -> Option<Saved> {
    let (json, _) = progress_paths(db_path);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).ok()?).ok()?;
    if v["format"].as_u64() != Some(1) {
        return None;
    }
    Some(Saved {
        header: crate::util::unhex(v["header"].as_str()?)?,
        entries: u32::try_from(v["entries"].as_u64()?).ok()?,
    })
}

fn write_saved(db_path: &str, prefix_meta: &RecordMeta, header: &[u8], entries: u32) -> Result<()> {
    let (json, _) = progress_paths(db_path);
    let entry = 4 + prefix_meta.page_size.bytes() as u64;
    let v = serde_json::json!({
        "format": 1,
        "lsn": prefix_meta.lsn.0,
        "generation": prefix_meta.generation.0,
        "db_checksum": prefix_meta.db_checksum.to_string(),
        "page_size": prefix_meta.page_size.get(),
        "page_count": prefix_meta.page_count,
        "header": crate::util::hex(header),
        "entries": entries,
        "bytes": (crate::txlog::SEGMENT_HEADER_LEN + crate::txlog::RECORD_HEADER_LEN) as u64
            + entries as u64 * entry,
    });
    let tmp = json.with_extension("json.tmp");
    let ctx = |e| {
        Error::io(
            format!("recording the bootstrap's progress in {}", json.display()),
            e,
        )
    };
    {
        let mut f = std::fs::File::create(&tmp).map_err(ctx)?;
        std::io::Write::write_all(&mut f, v.to_string().as_bytes()).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
    }
    std::fs::rename(&tmp, &json).map_err(ctx)?;
    if let Some(d) = json.parent() {
        let _ = std::fs::File::open(d).and_then(|d| d.sync_all());
    }
    Ok(())
}

fn remove_saved(db_path: &str) {
    let (json, page1) = progress_paths(db_path);
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(page1);
}

/// What became of a failed bootstrap attempt's file.
#[derive(PartialEq)]
enum Left {
    /// Not ours (it was not empty and had no progress of ours): untouched.
    Untouched,
    /// Back to empty, no progress recorded: the next bootstrap starts from zero.
    Empty,
    /// What was written and recorded stays: the next bootstrap continues from it.
    Resumable,
}

/// True when `<db>-replica/bootstrap.json` says a bootstrap was interrupted (it continues;
/// meanwhile SQLite connections see the file as empty, `DbHooks::shows_empty`).
pub fn bootstrap_pending(db_path: &str) -> bool {
    if !progress_paths(db_path).0.exists() {
        return false;
    }
    // Page 1 is written last, once every checksum held: a file that starts with SQLite's
    // header is a finished bootstrap whose record was not removed yet (a crash in between),
    // and shows as what it is.
    use std::io::Read;
    let mut magic = [0u8; 16];
    let finished = std::fs::File::open(db_path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"SQLite format 3\0");
    !finished
}

/// Where a bootstrap's pages go: page 1 aside (`bootstrap.page1`, fsynced), the others into
/// the database file; every `PROGRESS_EVERY` bytes the file is fsynced and then the progress
/// recorded (never a page that is not durable).
struct PageWriter<'a> {
    handle: &'a crate::vfs::AgentHandle,
    db: &'a str,
    page1_path: &'a std::path::Path,
    header: Option<(RecordMeta, Vec<u8>)>,
    entries: u32,
    since: u64,
    page1: Option<Vec<u8>>,
}

impl PageWriter<'_> {
    fn page(&mut self, pgno: crate::types::PageNo, data: &[u8]) -> Result<()> {
        if pgno.get() == 1 {
            let ctx = |e| Error::io(format!("writing {}", self.page1_path.display()), e);
            let mut f = std::fs::File::create(self.page1_path).map_err(ctx)?;
            std::io::Write::write_all(&mut f, data).map_err(ctx)?;
            f.sync_all().map_err(ctx)?;
            self.page1 = Some(data.to_vec());
        } else {
            let ps = data.len() as u64;
            self.handle.write_db((pgno.get() as u64 - 1) * ps, data)?;
        }
        self.entries += 1;
        self.since += 4 + data.len() as u64;
        if self.since >= PROGRESS_EVERY {
            self.since = 0;
            self.handle.sync_db()?;
            let (m, h) = self.header.as_ref().expect("the header comes first");
            write_saved(self.db, m, h, self.entries)?;
        }
        Ok(())
    }
}

impl Replica {
    /// E.1 bootstrap of an empty file: the snapshot streamed straight into the database file
    /// under an EXCLUSIVE lock, page by page as it arrives (memory: a page and the per-page
    /// checksums, whatever the database size). No reader can see it half-written: the lock is
    /// held throughout, and page 1, which makes the file a database, is written last, only
    /// once the record and database checksums held.
    ///
    /// Resumable: every `PROGRESS_EVERY` bytes the file is fsynced and `bootstrap.json`
    /// records how many page entries are durable (page 1 waits in `bootstrap.page1`). A
    /// bootstrap that finds a file without page 1 and such a record continues the same
    /// snapshot from there (the prefix is re-hashed from the file, so the record and database
    /// checksums still cover every byte); another snapshot at the source starts over. A broken
    /// download is continued up to `BOOTSTRAP_ATTEMPTS` times within the call, and left
    /// resumable after; a snapshot that fails its checksums leaves the file empty.
    pub(super) fn bootstrap(&self, st: &mut State) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self.handle.lock_db_exclusive() {
            if Instant::now() > deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut attempt = 1;
        let r = loop {
            let (r, left) = self.bootstrap_attempt(st);
            match r {
                Err(e) if left == Left::Resumable && attempt < BOOTSTRAP_ATTEMPTS => {
                    log_event(&format!(
                        "event=bootstrap_retry db={:?} attempt={attempt} error={:?}",
                        self.db_path,
                        e.to_string()
                    ));
                    std::thread::sleep(Duration::from_millis(250 << attempt));
                    attempt += 1;
                }
                r => break r,
            }
        };
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

    /// The prefix of an interrupted bootstrap of the same file, re-hashed from what is on
    /// disk; `Ok(None)` when there is nothing (usable) to continue. Refuses a file that is not
    /// ours: one without recorded progress, or whose page 1 is written (a database).
    fn saved_prefix(&self) -> Result<Option<crate::txlog::SnapshotPrefix>> {
        let not_ours = |why: &str| {
            Error::Busy(format!(
                "{} was written by someone else while bootstrapping ({why}); it is left as it is: \
                 bootstrap into an empty file, or remove this one if it holds nothing of value",
                self.db_path
            ))
        };
        let Some(saved) = read_saved(&self.db_path) else {
            return Err(not_ours(
                "it is not empty and no interrupted bootstrap was recorded",
            ));
        };
        let size = self.handle.db_size()?;
        let Ok(mut prefix) = crate::txlog::SnapshotPrefix::new(&saved.header) else {
            return Ok(None);
        };
        let ps = prefix.meta.page_size.bytes();
        let mut first = vec![0u8; ps.min(size as usize)];
        self.handle.read_db(0, &mut first)?;
        if first.iter().any(|b| *b != 0) {
            // Page 1 is written: the bootstrap finished (its record was not removed yet) or
            // someone wrote a database here. Either way not ours to overwrite.
            remove_saved(&self.db_path);
            return Err(not_ours("its page 1 is written"));
        }
        if super::download::pending(&self.db_path) {
            // A compressed snapshot, bootstrapped from its downloaded file: that download
            // continues, and the pages are written again from it (no prefix to re-hash).
            return Ok(None);
        }
        let page1 = std::fs::read(progress_paths(&self.db_path).1).unwrap_or_default();
        if saved.entries > prefix.meta.page_count || (saved.entries > 0 && page1.len() != ps) {
            return Ok(None);
        }
        let mut buf = vec![0u8; ps];
        for i in 0..saved.entries {
            let pgno = prefix.pgno_of(i).get() as u64;
            if pgno == 1 {
                prefix.push(&page1)?;
                continue;
            }
            if pgno * ps as u64 > size {
                return Ok(None); // the file is shorter than recorded: start over
            }
            self.handle.read_db((pgno - 1) * ps as u64, &mut buf)?;
            prefix.push(&buf)?;
        }
        Ok(Some(prefix))
    }

    /// One attempt of `bootstrap` (the caller holds EXCLUSIVE): continues an interrupted
    /// bootstrap or starts one in an empty file; on success page 1 is written and synced.
    fn bootstrap_attempt(&self, st: &State) -> (Result<(RecordMeta, DbChecksum)>, Left) {
        let db = self.db_path.as_str();
        let resume = match self.handle.db_size() {
            Err(e) => return (Err(e), Left::Untouched),
            Ok(0) => {
                remove_saved(db);
                None
            }
            Ok(_) => match self.saved_prefix() {
                Err(e) => return (Err(e), Left::Untouched),
                Ok(p) => {
                    if p.is_none() {
                        // Ours, but nothing usable recorded: start over.
                        remove_saved(db);
                        if let Err(e) = self.handle.truncate_db(0) {
                            return (Err(e), Left::Untouched);
                        }
                    }
                    p
                }
            },
        };
        // A stale WAL or wal-index next to the file would be recovered over the snapshot:
        // nobody can use them while we hold EXCLUSIVE.
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{db}{suffix}"));
        }
        let handle = &self.handle;
        let page1_path = progress_paths(db).1;
        let mut w = PageWriter {
            handle,
            db,
            page1_path: &page1_path,
            header: resume
                .as_ref()
                .map(|p| (p.meta.clone(), p.header().to_vec())),
            entries: resume.as_ref().map_or(0, |p| p.entries()),
            since: 0,
            page1: None,
        };
        let mut fresh = resume.is_none();
        let mut r = Err(Error::Other("no snapshot streamed".into()));
        if let Some(prefix) = resume {
            log_event(&format!(
                "event=bootstrap_resume db={db:?} lsn={} entries={} bytes={}",
                prefix.meta.lsn,
                prefix.entries(),
                prefix.offset()
            ));
            match self
                .stream_snapshot_resume(st, "bootstrap download", prefix, &mut |p, d| w.page(p, d))
            {
                Ok(Some(x)) => r = Ok(x),
                Err(e) => r = Err(e),
                Ok(None) => {
                    log_event(&format!(
                        "event=bootstrap_restart db={db:?} reason=\"the source serves another snapshot now\""
                    ));
                    remove_saved(db);
                    if let Err(e) = handle.truncate_db(0) {
                        return (Err(e), Left::Empty);
                    }
                    fresh = true;
                }
            }
        }
        if fresh {
            w.entries = 0;
            w.since = 0;
            w.header = None;
            // A compressed snapshot cannot be continued page by page from the file (its record
            // checksum covers the compressed bytes): it is downloaded as stored, resumably,
            // and written from that copy (`bootstrap_from_part`).
            let w = std::cell::RefCell::new(&mut w);
            let mut on_meta = |m: &RecordMeta| {
                let h = crate::txlog::snapshot_header(m).to_vec();
                // Recorded before any page is written: an interruption from here on is
                // ours to continue.
                write_saved(db, m, &h, 0)?;
                w.borrow_mut().header = Some((m.clone(), h));
                Ok(())
            };
            let mut on_page = |p, d: &[u8]| w.borrow_mut().page(p, d);
            r = if super::download::pending(db) {
                self.bootstrap_from_part(st, None, &mut on_meta, &mut on_page)
            } else {
                match self.bootstrap_fresh(st, &mut on_meta, &mut on_page) {
                    Ok(Fresh::Streamed(r)) => r,
                    Ok(Fresh::Compressed(got, head)) => {
                        self.bootstrap_from_part(st, Some((got, head)), &mut on_meta, &mut on_page)
                    }
                    Err(e) => Err(e),
                }
            };
        }
        let entries = w.entries;
        let page1 = w.page1.take();
        let r = r.and_then(|(meta, sums)| {
            let ps = meta.page_size;
            let p1 = match page1 {
                Some(p) => p,
                None => std::fs::read(&page1_path)
                    .map_err(|e| Error::io(format!("reading {}", page1_path.display()), e))?,
            };
            handle.write_db(0, &p1)?;
            handle.truncate_db(meta.commit_size as u64 * ps.get() as u64)?;
            handle.sync_db()?;
            remove_saved(db);
            super::download::remove_part(db);
            Ok((meta, sums))
        });
        match r {
            Ok(x) => (Ok(x), Left::Empty),
            Err(e) => {
                // A download that broke leaves what it recorded, to be continued; a snapshot
                // that arrived whole but failed its checks (or anything else) leaves nothing:
                // there is no telling which of its bytes were bad.
                let complete = read_saved(db)
                    .and_then(|s| crate::txlog::SnapshotPrefix::new(&s.header).ok())
                    .is_some_and(|p| entries >= p.meta.page_count);
                let broke = !complete && !matches!(e, Error::Busy(_)) && bootstrap_pending(db);
                if broke {
                    (Err(e), Left::Resumable)
                } else {
                    remove_saved(db);
                    let _ = handle.truncate_db(0);
                    (Err(e), Left::Empty)
                }
            }
        }
    }

    /// The bootstrap of a compressed snapshot: its file downloaded as stored into
    /// `<db>-replica/snapshot.part` (resumable, `download.rs`), then validated and written
    /// into the database file from there. A kill while writing writes again from the copy;
    /// a copy that fails a check is removed with the progress (the next try starts over).
    fn bootstrap_from_part(
        &self,
        st: &State,
        opened: Option<(crate::transport::SnapshotBytes, Vec<u8>)>,
        on_meta: &mut dyn FnMut(&RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(RecordMeta, DbChecksum)> {
        let part = self.download_snapshot(st, "bootstrap download", opened)?;
        // Queries answer from the published state meanwhile, as during the download.
        let _long = self.network_call(st);
        let r = crate::txlog::stream_snapshot_file(&part, on_meta, on_page);
        if let Err(e) = &r {
            if !matches!(e, Error::Busy(_)) {
                super::download::remove_part(&self.db_path);
                remove_saved(&self.db_path);
            }
        }
        r
    }

    /// E.10 re-snapshot, streamed: the source's snapshot goes page by page into frames of ONE
    /// new replica commit (`FrameAppender`: nothing is visible until its last frame), then the
    /// records after the snapshot up to at least the replica's LSN go into the same commit
    /// (readers switch from `st.lsn` to a state no older than it at once; the newest snapshot
    /// may be older than what they saw). The commit is published only once the snapshot's
    /// record and database checksums and every record's checksum held. Memory: a MiB of frames
    /// and the per-page checksums, plus the records after the snapshot.
    ///
    /// Resumable (issue 15): the snapshot file is downloaded first, as stored (compressed or
    /// not), into `<db>-replica/snapshot.part` (`download.rs`); an interrupted download
    /// continues from its last durable byte, and only the local file is then streamed into
    /// the commit. The part file is removed once the commit is durable, or when it fails a
    /// check (the next re-snapshot downloads again).
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
        // The snapshot file first, into `<db>-replica/snapshot.part` (resumable: an interrupted
        // download continues, `download.rs`), before any lock is taken.
        let part = self
            .download_snapshot(st, "re-snapshot download", None)
            .map_err(|e| self.damaged_source(st, e))?;
        // The frames are written under the applier's WRITE lock: readers are not blocked by it
        // (they read the published state meanwhile).
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
        // Writing a whole database takes a while: queries answer from the published state
        // meanwhile, as during the download.
        let long = self.network_call(st_ro);
        let streamed = crate::txlog::stream_snapshot_file(
            &part,
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
        drop(long);
        if let Err(e) = &streamed {
            // A lock that was busy leaves the (valid) download for the next try; anything
            // else (a damaged file, another page size, a failed write) removes it: the next
            // re-snapshot downloads the snapshot again.
            if !matches!(e, Error::Busy(_)) {
                super::download::remove_part(&self.db_path);
            }
        }
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
        super::download::remove_part(&self.db_path);
        Ok((
            h, last_lsn, generation, sums, pages, smeta.lsn, ts, checksum,
        ))
    }
}

//! `Log`: the handle on a log directory (FORMAT.md §2, §4.2). It finds the tail at `open`,
//! re-scans what other writer processes appended (`refresh_for_append`), truncates a torn tail,
//! appends records at the end it knows, rolls segments, fsyncs on `sync`, and removes old segments
//! (retention). Readers use `read_from` (iter.rs) and the snapshot functions (snapshot.rs).
//!
//! Crash reasoning: `append` is one positional write at the known end; until `sync` the tail may
//! be torn. A torn tail only ever exists at the end of the last segment: rolling seals the old
//! segment first (fdatasync + fsync of `log/`, once per segment, never per commit), so no later
//! segment can outlive a lost tail of an earlier one. A torn tail is truncated only by a writer,
//! only after checking that no record at or below the durable watermark would be lost. Before writing,
//! `append` checks that the file still ends where this handle thinks it does, so a handle that
//! skipped `refresh_for_append` cannot overwrite another process's records.

use super::compress::Compression;
use super::meta::{self, create_meta, now_ms, read_meta, sync_dir};
use super::record::validate_record;
use super::record::{encode_record_into, encode_record_with};
use super::segment::{
    encode_segment_header, list_segments, segment_file_name, ScanKind, SegmentHeader, SegmentReader,
};
use super::{check_sequence, Meta, Record, RecordMeta};
use crate::error::{Error, Result};
use crate::types::{Generation, Lsn};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Log tuning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment when the next record would take the current one beyond this size.
    pub segment_bytes: u64,
    /// How new records are stored (the per-database `compress` setting, FORMAT.md §3.7).
    pub compression: Compression,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 64 << 20,
            compression: Compression::None,
        }
    }
}

/// The last segment as this handle knows it.
pub(super) struct CurSeg {
    pub(super) path: PathBuf,
    pub(super) first_lsn: Lsn,
    /// Offset after the last valid record (for a segment with a torn header: its observed length).
    pub(super) end: u64,
    pub(super) has_records: bool,
    pub(super) header_ok: bool,
    /// Write handle, opened on the first append.
    pub(super) file: Option<File>,
    /// Bytes reserved on disk (fallocate KEEP_SIZE) from the start of the file.
    pub(super) reserved: u64,
}

/// How far ahead of the tail appends reserve disk blocks.
const PREALLOCATE_BYTES: u64 = 4 << 20;

#[derive(Default)]
struct SyncState {
    /// Segments written since the last sync that are no longer the current one.
    unsynced: Vec<File>,
    /// A segment was created or removed since the last sync.
    dir_dirty: bool,
    /// Counts `dir_dirty` settings, so a `PendingSync` clears the flag only if nothing new
    /// dirtied the directory while it ran.
    dir_epoch: u64,
    /// The current segment of the last successful batch: a batch for another one also fsyncs
    /// `log/`, since that segment may have been created by another process (whose own
    /// directory fsync may not have run yet).
    synced_segment: Option<PathBuf>,
}

/// The fsyncs that make every record appended so far durable (`Log::pending_sync`), taken as
/// their own descriptors so they can run without the lock that guards the `Log` (commits go on
/// appending meanwhile; records appended after the batch was taken are not covered).
pub struct PendingSync {
    files: Vec<(File, String)>,
    rolled: usize,
    dir: Option<(PathBuf, u64)>,
    segment: Option<PathBuf>,
}

impl PendingSync {
    /// fdatasync of each segment, then the fsync of `log/` if a segment was created or removed.
    /// On success hand it back to `Log::sync_done`; on failure drop it (the next batch retries).
    pub fn run(&self) -> Result<()> {
        for (f, name) in &self.files {
            f.sync_data()
                .map_err(|e| Error::io(format!("fdatasync of segment {name}"), e))?;
        }
        if let Some((d, _)) = &self.dir {
            sync_dir(d)?;
        }
        Ok(())
    }
}

/// A handle on a replication log directory.
pub struct Log {
    pub(super) dir: PathBuf,
    pub(super) log_dir: PathBuf,
    cfg: LogConfig,
    meta: Meta,
    pub(super) first_lsn: Option<Lsn>,
    last: Option<RecordMeta>,
    pub(super) cur: Option<CurSeg>,
    sync: Mutex<SyncState>,
    /// The caller guarantees no other handle appended since this one last refreshed (see
    /// `trust_tail`): `append` skips its `stat` of the segment.
    trusted_tail: bool,
    /// `refresh_for_append` truncates a damaged tail even at or below the durable watermark
    /// (see `repair_damaged_tail`).
    repair_below_watermark: bool,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("first_lsn", &self.first_lsn)
            .field("last_lsn", &self.last.as_ref().map(|m| m.lsn))
            .field("segment", &self.cur.as_ref().map(|c| (&c.path, c.end)))
            .finish()
    }
}

/// What a scan of the last segment found.
struct TailScan {
    cur: CurSeg,
    last: Option<RecordMeta>,
}

impl Log {
    /// Creates the directory layout and `meta.json` (error if it exists) and opens the log.
    pub fn create(dir: &Path, meta: &Meta, cfg: LogConfig) -> Result<Log> {
        for sub in ["log", "snap"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p)
                .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
        }
        create_meta(dir, meta)?;
        Log::open(dir, cfg)
    }

    /// Opens an existing log: reads `meta.json` and scans the last segment for the tail. A torn
    /// tail is left in place (this may be a reader); `refresh_for_append` truncates it.
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<Log> {
        let meta = read_meta(dir)?;
        let log_dir = dir.join("log");
        let segs = list_segments(&log_dir)?;
        let mut cur = None;
        let mut last = None;
        for (i, (lsn, path)) in segs.iter().enumerate().rev() {
            let is_last = i + 1 == segs.len();
            let scan = scan_segment(path, *lsn, is_last)?;
            let found = scan.last.is_some();
            if is_last {
                cur = Some(scan.cur);
            } else if !found {
                return Err(Error::Corrupt(format!(
                    "segment {} holds no records but is not the last segment",
                    path.display()
                )));
            }
            if found {
                last = scan.last;
                break;
            }
        }
        let first_lsn = last.as_ref().and(segs.first().map(|s| s.0));
        Ok(Log {
            dir: dir.to_path_buf(),
            log_dir,
            cfg,
            meta,
            first_lsn,
            last,
            cur,
            sync: Mutex::default(),
            trusted_tail: false,
            repair_below_watermark: false,
        })
    }

    /// `true`: the caller itself detects appends by other handles (and calls
    /// `refresh_for_append` before appending after one), so `append` need not `stat` the
    /// segment to find out. (A `stat` per append is not free: besides the syscall, a queried
    /// timestamp makes the kernel update the inode times on the next write.)
    pub fn trust_tail(&mut self, on: bool) {
        self.trusted_tail = on;
    }

    /// `true`: `refresh_for_append` truncates a damaged tail also at or below the durable
    /// watermark (logged with `below_watermark=true`) instead of refusing. Only for a writer
    /// that restores what it drops — a primary re-captures those records from its WAL, or else
    /// starts a new generation past the watermark (FORMAT.md §7) — so capture does not fail
    /// for good on a damaged tail.
    pub fn repair_damaged_tail(&mut self, on: bool) {
        self.repair_below_watermark = on;
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }
    /// Changes the roll size (takes effect at the next append).
    pub fn set_config(&mut self, cfg: LogConfig) {
        self.cfg = cfg;
    }
    /// The tail record as known by this handle.
    pub fn last(&self) -> Option<&RecordMeta> {
        self.last.as_ref()
    }
    /// The oldest LSN still in the log (as known by this handle).
    pub fn first_lsn(&self) -> Option<Lsn> {
        self.first_lsn
    }

    /// Writer side (the caller excludes other writers): reads the records other processes
    /// appended since this handle's known end, truncates a torn/corrupt tail of the last segment
    /// (refusing if that would lose records at or below the durable watermark), and returns the
    /// new records in LSN order.
    pub fn refresh_for_append(&mut self) -> Result<Vec<Record>> {
        let segs = list_segments(&self.log_dir)?;
        let durable = meta::read_durable(&self.dir)?.map(|d| d.0);
        let mut prev = self.last.clone();
        let mut out = Vec::new();
        let mut removed_any = false;
        if let Some(c) = &self.cur {
            if !segs.iter().any(|s| s.1 == c.path) {
                if c.has_records {
                    return Err(Error::Other(format!(
                        "segment {} disappeared (removed by another process's retention?): reopen the log",
                        c.path.display()
                    )));
                }
                self.cur = None; // an empty segment another writer replaced
            }
        }
        // Scan the current segment (from its known end) and everything after it.
        let wanted = |l: Lsn| match (&self.cur, &self.last) {
            (Some(c), _) => l >= c.first_lsn,
            (None, Some(last)) => l > last.lsn,
            (None, None) => true,
        };
        let todo: Vec<_> = segs
            .iter()
            .enumerate()
            .filter(|(_, s)| wanted(s.0))
            .collect();
        for (i, (lsn, path)) in todo {
            let is_last = i + 1 == segs.len();
            let resume = match &self.cur {
                Some(c) if c.path == *path && c.has_records => Some(c.end),
                _ => None,
            };
            let mut rd = match SegmentReader::open(path) {
                Ok(rd) => rd,
                Err(e) if is_last && e.kind != ScanKind::Io => {
                    self.guard_truncation(durable, prev.as_ref(), &e.error)?;
                    log_truncation(path, 0, &e.error);
                    std::fs::remove_file(path).map_err(|e| {
                        Error::io(format!("removing torn segment {}", path.display()), e)
                    })?;
                    removed_any = true;
                    self.retire_cur();
                    break;
                }
                Err(e) => return Err(e.error),
            };
            if let Some(end) = resume {
                rd.resume_at(end, prev.clone()).map_err(|e| e.error)?;
            }
            let mut stop = None;
            loop {
                let meta = match rd.next_header() {
                    Ok(None) => break,
                    Ok(Some(m)) => m,
                    Err(e) => {
                        stop = Some(e);
                        break;
                    }
                };
                if let (Some(p), None) = (&prev, rd.last_meta()) {
                    if let Err(m) = check_sequence(p, &meta) {
                        let offset = rd.position();
                        let error = Error::Corrupt(format!(
                            "segment {} at offset {offset}: {m}",
                            path.display()
                        ));
                        stop = Some(super::segment::ScanError {
                            kind: ScanKind::Corrupt,
                            offset,
                            error,
                        });
                        break;
                    }
                }
                match read_full_body(&mut rd, meta) {
                    Ok(r) => {
                        prev = Some(r.meta.clone());
                        out.push(r);
                    }
                    Err(e) => {
                        stop = Some(e);
                        break;
                    }
                }
            }
            let mut end = rd.position();
            if let Some(e) = stop {
                if e.kind == ScanKind::Io || !is_last {
                    return Err(e.error);
                }
                self.guard_truncation(durable, prev.as_ref(), &e.error)?;
                log_truncation(path, e.offset, &e.error);
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|x| Error::io(format!("opening {}", path.display()), x))?;
                f.set_len(e.offset)
                    .map_err(|x| Error::io(format!("truncating {}", path.display()), x))?;
                end = e.offset;
            }
            if is_last {
                let has_records = rd.last_meta().is_some();
                if self.cur.as_ref().is_some_and(|c| c.path != *path) {
                    self.retire_cur();
                }
                let c = self.cur.get_or_insert_with(|| CurSeg {
                    path: path.clone(),
                    first_lsn: *lsn,
                    end,
                    has_records,
                    header_ok: true,
                    file: None,
                    reserved: 0,
                });
                c.end = end;
                c.has_records = has_records;
                c.header_ok = true;
            }
        }
        self.last = prev;
        if removed_any {
            self.mark_dir_dirty();
        }
        let segs = if removed_any {
            list_segments(&self.log_dir)?
        } else {
            segs
        };
        self.first_lsn = self.last.as_ref().and(segs.first().map(|s| s.0));
        Ok(out)
    }

    /// Refuses to truncate when the durable watermark is above the last valid record.
    fn guard_truncation(
        &self,
        durable: Option<Lsn>,
        prev: Option<&RecordMeta>,
        why: &Error,
    ) -> Result<()> {
        let kept = prev.map_or(Lsn(0), |p| p.lsn);
        match durable {
            Some(d) if d > kept && self.repair_below_watermark => {
                crate::logging::event(&format!(
                    "event=log_tail_damaged dir={} durable_lsn={d} valid_up_to={kept} below_watermark=true \
                     reason={:?} (truncated: the writer restores the records from its WAL or starts a new \
                     generation past the watermark)",
                    self.dir.display(),
                    why.to_string()
                ));
                Ok(())
            }
            Some(d) if d > kept => Err(Error::Corrupt(format!(
                "{why}; the durable watermark says LSN {d} was fsynced but the log is valid only up to \
                 LSN {kept}: acknowledged records are damaged, refusing to truncate"
            ))),
            _ => Ok(()),
        }
    }

    /// Removes every segment and forgets the tail: the next append may take any LSN and
    /// starts a new segment. Readers asking for an older LSN then get "older than the log's
    /// first retained LSN" and re-snapshot. Only for a writer that must start the log over
    /// past LSNs it lost (a new generation after records at or below the durable watermark
    /// were lost: `Primary::new_generation`), so that the log never has a hole.
    pub fn drop_all_segments(&mut self) -> Result<()> {
        for (_, path) in list_segments(&self.log_dir)? {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing segment {}", path.display()), e)),
            }
        }
        self.cur = None;
        self.last = None;
        self.first_lsn = None;
        self.mark_dir_dirty();
        Ok(())
    }

    /// Forgets the current segment, keeping its write handle for the next `sync`.
    fn retire_cur(&mut self) {
        if let Some(f) = self.cur.take().and_then(|c| c.file) {
            self.sync
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .unsynced
                .push(f);
        }
    }

    /// Records that `log/` changed (a segment created or removed) for the next `sync`.
    pub(super) fn mark_dir_dirty(&mut self) {
        let st = self.sync.get_mut().unwrap_or_else(|e| e.into_inner());
        st.dir_dirty = true;
        st.dir_epoch += 1;
    }

    /// Appends `r` at the known end (no fsync). Requires `r.meta.lsn == last + 1` and the sequence
    /// rules of FORMAT.md §3.5 (any LSN when the log is empty); rolls first when the record would
    /// take the current segment beyond `segment_bytes`. Returns the bytes written.
    pub fn append(&mut self, r: &Record) -> Result<u64> {
        validate_record(r)?;
        let bytes = encode_record_with(r, self.cfg.compression);
        self.append_with(&r.meta, &r.meta, bytes.len() as u64, &mut |f, at| {
            f.write_all_at(&bytes, at)
        })
    }

    /// Appends consecutive records with one write (the asynchronous capture's batches: one
    /// `pwrite` and one file-size change instead of one per record). All go into one segment:
    /// the current one, or a new one if they do not fit. A torn batch is a torn tail like any
    /// other (FORMAT.md §4.2): readers stop at the first record that fails its checksum.
    pub fn append_batch(&mut self, rs: &[Record]) -> Result<u64> {
        let (Some(first), Some(last)) = (rs.first(), rs.last()) else {
            return Ok(0);
        };
        for w in rs.windows(2) {
            check_sequence(&w[0].meta, &w[1].meta).map_err(|m| {
                Error::OutOfSequence(format!("append to log {}: {m}", self.dir.display()))
            })?;
        }
        for r in rs {
            validate_record(r)?;
        }
        let mut bytes = crate::util::take_scratch(crate::util::Scratch::LogBatch);
        for r in rs {
            encode_record_into(r, self.cfg.compression, &mut bytes);
        }
        let done = self.append_with(&first.meta, &last.meta, bytes.len() as u64, &mut |f, at| {
            f.write_all_at(&bytes, at)
        });
        crate::util::put_scratch(crate::util::Scratch::LogBatch, bytes);
        done
    }

    /// Appends the encoded record `meta` found at `offset`, `len` bytes, in the file `src` (a
    /// snapshot file: its record after the segment header), copied in 1 MiB pieces, so a
    /// whole-database record never sits in memory. The bytes are the ones already validated
    /// when that file was written (the caller wrote it); readers validate them again.
    pub fn append_copy_of(
        &mut self,
        meta: &RecordMeta,
        src: &Path,
        offset: u64,
        len: u64,
    ) -> Result<u64> {
        let from = std::fs::File::open(src)
            .map_err(|e| Error::io(format!("opening {}", src.display()), e))?;
        self.append_with(meta, meta, len, &mut |f, at| {
            let mut buf = vec![0u8; (1 << 20).min(len as usize)];
            let mut done = 0u64;
            while done < len {
                let n = buf.len().min((len - done) as usize);
                from.read_exact_at(&mut buf[..n], offset + done)?;
                f.write_all_at(&buf[..n], at + done)?;
                done += n as u64;
            }
            Ok(())
        })
    }

    fn append_with(
        &mut self,
        meta: &RecordMeta,
        last_meta: &RecordMeta,
        len: u64,
        write: &mut dyn FnMut(&File, u64) -> std::io::Result<()>,
    ) -> Result<u64> {
        // A log holds the records of one primary: its epoch (meta.json). Epochs never
        // decrease inside a batch (check_sequence), so first and last cover it.
        if let Some(m) = [meta, last_meta]
            .into_iter()
            .find(|m| m.epoch != self.meta.epoch)
        {
            return Err(Error::Misuse(format!(
                "append to log {}: record LSN {} has epoch {} but this log is epoch {}",
                self.dir.display(),
                m.lsn,
                m.epoch,
                self.meta.epoch
            )));
        }
        if let Some(last) = &self.last {
            check_sequence(last, meta).map_err(|m| {
                Error::OutOfSequence(format!("append to log {}: {m}", self.dir.display()))
            })?;
        }
        let need_new = match &self.cur {
            None => true,
            Some(c) if !c.has_records => !(c.header_ok && c.first_lsn == meta.lsn),
            Some(c) => c.end + len > self.cfg.segment_bytes,
        };
        if need_new {
            self.roll(meta.lsn)?;
        }
        let c = self.cur.as_mut().expect("roll() sets the current segment");
        let ctx = |what: &str| format!("{what} segment {}", c.path.display());
        if c.file.is_none() {
            let f = OpenOptions::new()
                .write(true)
                .open(&c.path)
                .map_err(|e| Error::io(ctx("opening"), e))?;
            c.file = Some(f);
        }
        let f = c.file.as_ref().expect("just opened");
        if !self.trusted_tail {
            check_unchanged(f, c)?;
        }
        if c.end + len > c.reserved {
            // Reserve blocks ahead of the tail (size unchanged, so readers see no zeros):
            // an append into reserved space is a plain overwrite, much cheaper than one that
            // allocates. Best effort.
            let want = (c.end + len).max(c.reserved) + PREALLOCATE_BYTES;
            if crate::sys::preallocate_keep_size(f, c.end, want - c.end).is_ok() {
                c.reserved = want;
            }
        }
        if let Err(e) = write(f, c.end) {
            let _ = f.set_len(c.end);
            return Err(Error::io(ctx("appending to"), e));
        }
        c.end += len;
        c.has_records = true;
        self.first_lsn.get_or_insert(meta.lsn);
        self.last = Some(last_meta.clone());
        Ok(len)
    }

    /// Closes the current segment and creates `<first_lsn>.seg` (via a tmp file and rename).
    fn roll(&mut self, first_lsn: Lsn) -> Result<()> {
        if let Some(c) = &self.cur {
            if !c.header_ok {
                // Only refresh_for_append may remove it: it checks the durable watermark first.
                return Err(Error::StaleHandle(format!(
                    "segment {} has a torn header: call refresh_for_append first",
                    c.path.display()
                )));
            }
            if !c.has_records {
                // An empty (or torn-header) segment that will not hold this record: replace it,
                // unless someone wrote to it behind our back.
                if let Ok(m) = std::fs::metadata(&c.path) {
                    if m.len() != c.end {
                        return Err(stale_handle(&c.path, m.len(), c.end));
                    }
                }
                let _ = std::fs::remove_file(&c.path);
                self.cur = None;
            }
        }
        if let Some(c) = &self.cur {
            // Seal the segment being rolled: its data and its directory entry become durable
            // before the next segment exists, so only the last segment can ever be torn.
            let sealed = match &c.file {
                Some(f) => f.sync_data(),
                None => File::open(&c.path).and_then(|f| f.sync_data()),
            };
            sealed
                .map_err(|e| Error::io(format!("fdatasync of segment {}", c.path.display()), e))?;
            sync_dir(&self.log_dir)?;
        }
        self.retire_cur();
        let path = self.log_dir.join(segment_file_name(first_lsn));
        let tmp = self.log_dir.join(format!(
            "{}.{}.tmp",
            segment_file_name(first_lsn),
            std::process::id()
        ));
        let header = encode_segment_header(&SegmentHeader {
            first_lsn,
            created_ms: now_ms(),
        });
        std::fs::write(&tmp, header)
            .map_err(|e| Error::io(format!("creating segment {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("creating segment {}", path.display()), e))?;
        self.mark_dir_dirty();
        self.cur = Some(CurSeg {
            path,
            first_lsn,
            end: header.len() as u64,
            has_records: false,
            header_ok: true,
            file: None,
            reserved: 0,
        });
        Ok(())
    }

    /// fdatasync of every segment written since the last sync, then an fsync of `log/` if a
    /// segment was created or removed.
    pub fn sync(&self) -> Result<()> {
        let batch = self.pending_sync()?;
        batch.run()?;
        self.sync_done(batch);
        Ok(())
    }

    /// What `sync` does, as a batch to run without holding the `Log` (FORMAT.md §7: the
    /// durable watermark may name a record only after this ran for it). It holds new
    /// descriptors of the segments (the current one is opened if this handle never wrote it,
    /// e.g. when only other processes appended to it: an fdatasync of any descriptor flushes
    /// the file). Cost: one `dup` per segment, no I/O.
    pub fn pending_sync(&self) -> Result<PendingSync> {
        let st = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let mut files = Vec::with_capacity(st.unsynced.len() + 1);
        for f in &st.unsynced {
            let f = f
                .try_clone()
                .map_err(|e| Error::io("duplicating a segment descriptor", e))?;
            files.push((f, "(rolled)".to_string()));
        }
        let rolled = files.len();
        if let Some(c) = self.cur.as_ref().filter(|c| c.has_records) {
            let name = c.path.display().to_string();
            let f = match &c.file {
                Some(f) => f.try_clone(),
                None => File::open(&c.path),
            }
            .map_err(|e| Error::io(format!("opening segment {name} to fsync it"), e))?;
            files.push((f, name));
        }
        let segment = self.cur.as_ref().map(|c| c.path.clone());
        let new_segment = segment.is_some() && segment != st.synced_segment;
        let dir = (st.dir_dirty || new_segment).then(|| (self.log_dir.clone(), st.dir_epoch));
        Ok(PendingSync {
            files,
            rolled,
            dir,
            segment,
        })
    }

    /// A batch from `pending_sync` ran successfully: forget what it made durable.
    pub fn sync_done(&self, batch: PendingSync) {
        let mut st = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let n = batch.rolled.min(st.unsynced.len());
        st.unsynced.drain(..n);
        if let Some((_, epoch)) = batch.dir {
            if st.dir_epoch == epoch {
                st.dir_dirty = false;
            }
        }
        if batch.segment.is_some() {
            st.synced_segment = batch.segment;
        }
    }

    /// Reader side, without scanning any segment: `meta.json` as it is on disk now.
    pub fn read_meta(dir: &Path) -> Result<Meta> {
        read_meta(dir)
    }

    /// Reader side, without scanning any segment: the first LSN of the oldest segment still
    /// on disk (None: no segment). `read_from` refuses an LSN below it.
    pub fn first_segment_lsn(dir: &Path) -> Result<Option<Lsn>> {
        Ok(list_segments(&dir.join("log"))?.first().map(|s| s.0))
    }

    /// Reads `<dir>/durable` (None when absent or empty).
    pub fn read_durable(dir: &Path) -> Result<Option<(Lsn, Generation)>> {
        meta::read_durable(dir)
    }

    /// Raises `<dir>/durable` to (lsn, gen); never lowers it. One pwrite, no fsync.
    pub fn write_durable(dir: &Path, lsn: Lsn, gen: Generation) -> Result<()> {
        meta::write_durable(dir, lsn, gen)
    }
}

/// The segment file must still end where this handle thinks (else another writer appended).
fn check_unchanged(f: &File, c: &CurSeg) -> Result<()> {
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat of segment {}", c.path.display()), e))?
        .len();
    if len != c.end {
        return Err(stale_handle(&c.path, len, c.end));
    }
    Ok(())
}

fn stale_handle(path: &Path, len: u64, end: u64) -> Error {
    if len > end {
        Error::StaleHandle(format!(
            "segment {} has {} bytes beyond this handle's end {end} (another writer appended, or a torn \
             tail is pending): call refresh_for_append first",
            path.display(),
            len - end
        ))
    } else {
        Error::Corrupt(format!(
            "segment {} shrank to {len} bytes below this handle's end {end}",
            path.display()
        ))
    }
}

fn read_full_body(
    rd: &mut SegmentReader<std::io::BufReader<File>>,
    meta: RecordMeta,
) -> std::result::Result<Record, super::segment::ScanError> {
    let mut pages = Vec::with_capacity(meta.page_count as usize);
    rd.read_body(&mut |pgno, data| {
        pages.push(super::Page {
            pgno,
            data: data.to_vec(),
        });
        Ok(())
    })?;
    Ok(Record { meta, pages })
}

/// The one stderr line a writer logs when it truncates (or removes) a torn tail.
fn log_truncation(path: &Path, offset: u64, why: &Error) {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(offset);
    crate::logging::event(&format!(
        "event=log_tail_truncated segment={} offset={offset} dropped_bytes={} reason={:?}",
        path.display(),
        len.saturating_sub(offset),
        why.to_string()
    ));
}

/// Scans one segment fully (validating every record). For the last segment a torn or corrupt
/// tail ends the scan (`cur.end` = where it starts); anywhere else it is an error.
fn scan_segment(path: &Path, first_lsn: Lsn, is_last: bool) -> Result<TailScan> {
    let cur = |end, has_records, header_ok| CurSeg {
        path: path.to_path_buf(),
        first_lsn,
        end,
        has_records,
        header_ok,
        file: None,
        reserved: 0,
    };
    let mut rd = match SegmentReader::open(path) {
        Ok(rd) => rd,
        Err(e) if is_last && e.kind != ScanKind::Io => {
            let len = std::fs::metadata(path)
                .map_err(|x| Error::io(format!("stat of {}", path.display()), x))?
                .len();
            return Ok(TailScan {
                cur: cur(len, false, false),
                last: None,
            });
        }
        Err(e) => return Err(e.error),
    };
    loop {
        let step = match rd.next_header() {
            Ok(None) => break,
            Ok(Some(_)) => rd.read_body(&mut |_, _| Ok(())),
            Err(e) => Err(e),
        };
        if let Err(e) = step {
            if e.kind == ScanKind::Io || !is_last {
                return Err(e.error);
            }
            break;
        }
    }
    let last = rd.last_meta().cloned();
    Ok(TailScan {
        cur: cur(rd.position(), last.is_some(), true),
        last,
    })
}

//! The directory source: a primary's `<db>-replica/` read directly (the embedded default for
//! one machine and for shared storage). Reads only; never truncates or repairs the log (that
//! is the primary's job). Serves records only up to the durable watermark.
//!
//! The log is opened (its last segment scanned) once, in `open`; every later call reads only
//! small files and directory listings (`meta.json`, `durable`, the segment names) plus the
//! records it returns, so a sync costs what it fetches, not the size of the log.

use super::{Fetch, Source, SourceInfo};
use crate::error::{Error, Result};
use crate::txlog::{Log, ReadHint, Record};
use crate::types::{Lsn, PageSize};
use std::path::{Path, PathBuf};

pub struct DirSource {
    db: String,
    dir: PathBuf,
    /// Opened once: only its directory paths are used by the readers below.
    log: Log,
    /// Where the last fetch stopped, so the next one starts there instead of scanning the
    /// segment from its beginning (a sync then costs what it fetches).
    hint: std::sync::Mutex<Option<ReadHint>>,
    /// The newest epoch the replica has seen and where (`Source::set_epoch`): a directory
    /// follower has no request header, so `info` raises the primary's fence itself.
    seen: std::sync::Mutex<(crate::types::Epoch, Option<String>)>,
}

impl DirSource {
    /// `db` is the primary's database path; its log lives in `<db>-replica/`.
    pub fn open(db: &str) -> Result<DirSource> {
        let abs = std::path::absolute(Path::new(db))
            .map_err(|e| Error::io(format!("resolving {db}"), e))?;
        let db = abs.display().to_string();
        let dir = crate::txlog::log_dir(&db);
        if !dir.join("meta.json").exists() {
            let why = if Path::new(&db).exists() {
                format!(
                    "{db} exists but has no replication log ({} is missing): make it a primary first with SELECT repl_primary() on it",
                    dir.join("meta.json").display()
                )
            } else {
                format!("{db} does not exist: pass the path of the primary's database file")
            };
            return Err(Error::Misuse(format!("repl_sync(): {why}")));
        }
        let log = Log::open(&dir, Default::default())?;
        if log.meta().role != "primary" {
            return Err(Error::Misuse(format!(
                "repl_sync(): {db} is a {} log, not a primary's",
                log.meta().role
            )));
        }
        Ok(DirSource {
            db,
            dir,
            log,
            hint: std::sync::Mutex::new(None),
            seen: std::sync::Mutex::new((crate::types::Epoch::FIRST, None)),
        })
    }
}

impl DirSource {
    /// The follower has seen a newer epoch than this log's: this primary was deposed. Raise
    /// its fence (FORMAT.md §6.1) as the HTTP server does for `X-Repl-Epoch`; best effort (the
    /// follower may not be allowed to write the primary's directory).
    fn tell_deposed(&self, ours: crate::types::Epoch) {
        let (theirs, primary) = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if theirs <= ours {
            return;
        }
        let fence = crate::txlog::Fence {
            epoch: theirs,
            primary,
            seen_ms: crate::util::now_ms(),
        };
        if let Ok(true) = crate::txlog::raise_fence(&self.dir, &fence) {
            crate::logging::event(&format!(
                "event=primary_deposed db={:?} epoch={ours} new_epoch={theirs} new_primary={:?} reason=\"a directory follower\"",
                self.db,
                fence.primary.as_deref().unwrap_or("unknown")
            ));
            super::notify::fenced(&self.dir);
        }
    }
}

impl Source for DirSource {
    fn set_epoch(&self, epoch: crate::types::Epoch, primary: Option<&str>) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (epoch, primary.map(str::to_string));
    }

    fn describe(&self) -> String {
        self.db.clone()
    }

    fn log_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn info(&self) -> Result<SourceInfo> {
        // Read fresh: a primary re-created at the same path has a new lineage.
        let meta = Log::read_meta(&self.dir)?;
        self.tell_deposed(meta.epoch);
        Ok(SourceInfo {
            lineage: meta.lineage.clone(),
            first_lsn: Log::first_segment_lsn(&self.dir)?,
            durable_lsn: Log::read_durable(&self.dir)?.map(|d| d.0),
            epoch: meta.epoch,
            epoch_start: meta.epoch_start,
        })
    }

    fn snapshot(&self) -> Result<Record> {
        let durable = Log::read_durable(&self.dir)?.map(|d| d.0);
        let Some((_, path)) = self.log.latest_snapshot(durable)? else {
            return Err(Error::Other(format!(
                "the primary {} has no durable snapshot yet; retry in a moment",
                self.db
            )));
        };
        Log::read_snapshot(&path)
    }

    fn snapshot_stream(
        &self,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&crate::txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(crate::txlog::RecordMeta, crate::txlog::DbChecksum)> {
        self.snapshot_stream_at(None, progress, on_meta, on_page)
    }

    fn knows_times(&self) -> bool {
        true
    }

    fn lsn_at_time(&self, ms: u64) -> Result<Option<Lsn>> {
        let Some((durable, _)) = Log::read_durable(&self.dir)? else {
            return Ok(None);
        };
        let mut found = None;
        if let Some(first) = Log::first_segment_lsn(&self.dir)? {
            for m in self.log.read_meta_from(first, Some(durable))? {
                let m = m?;
                if m.timestamp_ms > ms {
                    break;
                }
                found = Some(m.lsn);
            }
        }
        if found.is_none() {
            // Older than the log: the newest snapshot file committed by then.
            let mut at = Some(durable);
            while let Some((m, _)) = self.log.latest_snapshot(at)? {
                if m.timestamp_ms <= ms {
                    return Ok(Some(m.lsn));
                }
                let Some(before) = m.lsn.0.checked_sub(1) else {
                    break;
                };
                at = Some(Lsn(before));
            }
        }
        Ok(found)
    }

    fn snapshot_stream_at(
        &self,
        at: Option<Lsn>,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&crate::txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(crate::txlog::RecordMeta, crate::txlog::DbChecksum)> {
        let durable = Log::read_durable(&self.dir)?.map(|d| d.0);
        let upto = match (durable, at) {
            (Some(d), Some(a)) => Some(d.min(a)),
            (d, _) => d,
        };
        let Some((_, path)) = self.log.latest_snapshot(upto)? else {
            return Err(Error::Other(match at {
                Some(a) => format!(
                    "the primary {} has no snapshot at or before LSN {a} any more",
                    self.db
                ),
                None => format!(
                    "the primary {} has no durable snapshot yet; retry in a moment",
                    self.db
                ),
            }));
        };
        let total = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut done = 0u64;
        let entry = std::cell::Cell::new(0u64);
        crate::txlog::stream_snapshot_file(
            &path,
            &mut |m| {
                entry.set(4 + m.page_size.bytes() as u64);
                on_meta(m)
            },
            &mut |pgno, data| {
                let entry = entry.get();
                done += entry;
                if done % (256 * entry) < entry {
                    progress(done.min(total), total);
                }
                on_page(pgno, data)
            },
        )
        .inspect(|_| progress(total, total))
    }

    fn snapshot_resume(
        &self,
        prefix: crate::txlog::SnapshotPrefix,
        progress: &mut dyn FnMut(u64, u64),
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<Option<(crate::txlog::RecordMeta, crate::txlog::DbChecksum)>> {
        use std::io::{Read, Seek, SeekFrom};
        let durable = Log::read_durable(&self.dir)?.map(|d| d.0);
        let Some((_, path)) = self.log.latest_snapshot(durable)? else {
            return Ok(None);
        };
        let ctx = |e| Error::io(format!("reading {}", path.display()), e);
        let mut f = std::fs::File::open(&path).map_err(ctx)?;
        let len = f.metadata().map_err(ctx)?.len();
        let mut hdr = [0u8; crate::txlog::SEGMENT_HEADER_LEN + crate::txlog::RECORD_HEADER_LEN];
        f.read_exact(&mut hdr).map_err(ctx)?;
        if hdr[crate::txlog::SEGMENT_HEADER_LEN..] != prefix.header()[..]
            || len != prefix.file_len()
        {
            return Ok(None); // another snapshot now: start over
        }
        let start = prefix.offset();
        f.seek(SeekFrom::Start(start)).map_err(ctx)?;
        let entry = 4 + prefix.meta.page_size.bytes() as u64;
        let mut done = start;
        let r = std::io::BufReader::with_capacity(1 << 20, f).take(len - start);
        crate::txlog::stream_snapshot_rest(
            r,
            &path.display().to_string(),
            prefix,
            &mut |pgno, data| {
                done += entry;
                if done % (256 * entry) < entry {
                    progress(done.min(len), len);
                }
                on_page(pgno, data)
            },
        )
        .inspect(|_| progress(len, len))
        .map(Some)
    }

    fn snapshot_bytes(&self, resume: Option<(&str, u64)>) -> Result<super::SnapshotBytes> {
        use std::io::{Read, Seek, SeekFrom};
        let durable = Log::read_durable(&self.dir)?.map(|d| d.0);
        let Some((meta, path)) = self.log.latest_snapshot(durable)? else {
            return Err(Error::Other(format!(
                "the primary {} has no durable snapshot yet; retry in a moment",
                self.db
            )));
        };
        let ctx = |e| Error::io(format!("reading {}", path.display()), e);
        // The open descriptor keeps the file readable even if retention removes it meanwhile.
        let mut f = std::fs::File::open(&path).map_err(ctx)?;
        let len = f.metadata().map_err(ctx)?.len();
        let mut hdr = [0u8; crate::txlog::SEGMENT_HEADER_LEN + crate::txlog::RECORD_HEADER_LEN];
        f.read_exact(&mut hdr).map_err(ctx)?;
        let etag = crate::txlog::snapshot_etag(&hdr[crate::txlog::SEGMENT_HEADER_LEN..]);
        // A byte offset into the same snapshot continues; anything else starts over.
        let start = match resume {
            Some((e, off)) if e == etag && off < len => off,
            _ => 0,
        };
        f.seek(SeekFrom::Start(start)).map_err(ctx)?;
        Ok(super::SnapshotBytes {
            etag,
            lsn: meta.lsn,
            generation: meta.generation,
            len,
            start,
            body: Box::new(f.take(len - start)),
        })
    }

    fn page_size(&self) -> Result<Option<PageSize>> {
        let durable = Log::read_durable(&self.dir)?.map(|d| d.0);
        Ok(self.log.latest_snapshot(durable)?.map(|(m, _)| m.page_size))
    }

    fn fetch_wait(&self, from: Lsn, max_bytes: usize, wait: std::time::Duration) -> Result<Fetch> {
        // Wait on the watermark alone (woken at once by a primary in this process, else a
        // re-read every notify::POLL), then fetch.
        let deadline = std::time::Instant::now() + wait;
        let durable_at = || Log::read_durable(&self.dir).ok().flatten().map(|d| d.0);
        let _ =
            super::notify::wait_until(&self.dir, deadline, || durable_at().filter(|d| *d >= from));
        self.fetch(from, max_bytes)
    }

    fn fetch(&self, from: Lsn, max_bytes: usize) -> Result<Fetch> {
        let Some((durable, _)) = Log::read_durable(&self.dir)? else {
            return Ok(Fetch::Records(Vec::new()));
        };
        if from > durable {
            return Ok(Fetch::Records(Vec::new()));
        }
        // No segment: everything up to the durable end is only in a snapshot (see routes.rs).
        let first = Log::first_segment_lsn(&self.dir)?.unwrap_or(Lsn(durable.0 + 1));
        if from < first {
            return Ok(Fetch::Truncated { first_lsn: first });
        }
        let read = |hinted: bool| -> Result<Vec<_>> {
            let mut out = Vec::new();
            let mut bytes = 0usize;
            let mut hint = self.hint.lock().unwrap_or_else(|e| e.into_inner());
            if !hinted {
                *hint = None;
            }
            let mut it = self
                .log
                .read_from_hinted(from, Some(durable), hint.as_ref())?;
            for r in it.by_ref() {
                let r = r?;
                bytes += r.pages.iter().map(|p| p.data.len()).sum::<usize>();
                out.push(r);
                if bytes >= max_bytes {
                    break;
                }
            }
            *hint = it.hint();
            Ok(out)
        };
        // A hint is an offset into a segment as it was; a log whose tail was re-written since
        // (a primary that lost records and reused their LSNs, FORMAT.md §7) makes it point
        // into the middle of a record: read again from the segment's start before calling
        // the log damaged.
        let had_hint = self
            .hint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let r = match read(true) {
            Err(_) if had_hint => read(false),
            r => r,
        };
        match r {
            Ok(out) => Ok(Fetch::Records(out)),
            // Retention on the primary may remove the segment being read: if `from` is no
            // longer retained, that is the answer, not the read error.
            Err(e) => match Log::first_segment_lsn(&self.dir)? {
                Some(first) if from < first => Ok(Fetch::Truncated { first_lsn: first }),
                _ => Err(e),
            },
        }
    }
}

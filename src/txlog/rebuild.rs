//! Offline rebuild (FORMAT.md §3.6, §5): a plain database file at a chosen LSN from the newest
//! base (a snapshot file, or a SNAPSHOT record in the log, or an empty database when the log
//! starts at LSN 1) plus the records after it. Streams page by page (memory O(pages) for the
//! checksum map, not O(database)), checks every record's `db_checksum` against the incrementally
//! maintained `DbChecksum`, writes to `<out>.<pid>.tmp` and renames it over `out` only on success.

use super::checksum::DbChecksum;
use super::iter::Cursor;
use super::meta::read_meta;
use super::segment::{list_segments, ScanKind, SegmentReader};
use super::snapshot::{latest_snapshot_in, stream_snapshot};
use super::RecordMeta;
use crate::error::{Error, Result};
use crate::types::{Checksum, Generation, Lsn, PageSize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where `rebuild` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildInfo {
    pub lsn: Lsn,
    pub generation: Generation,
    pub checksum: Checksum,
    /// Database size in pages.
    pub pages: u32,
}

/// What a header-only pass over the log found.
#[derive(Default)]
struct LogSummary {
    first: Option<Lsn>,
    last: Option<Lsn>,
    /// The last SNAPSHOT record with LSN <= upto.
    snapshot_record: Option<Lsn>,
}

fn summarize(log_dir: &Path, upto: Option<Lsn>) -> Result<LogSummary> {
    let segs = list_segments(log_dir)?;
    let mut s = LogSummary::default();
    for (i, (_, path)) in segs.iter().enumerate() {
        let is_last = i + 1 == segs.len();
        let mut rd = match SegmentReader::open(path) {
            Ok(rd) => rd,
            Err(e) if is_last && e.kind == ScanKind::Torn => break,
            Err(e) => return Err(e.error),
        };
        loop {
            match rd.next_header() {
                Ok(Some(m)) => {
                    s.first.get_or_insert(m.lsn);
                    s.last = Some(m.lsn);
                    if m.snapshot && upto.is_none_or(|u| m.lsn <= u) {
                        s.snapshot_record = Some(m.lsn);
                    }
                }
                Ok(None) => break,
                Err(e) if is_last && e.kind == ScanKind::Torn => break,
                Err(e) => return Err(e.error),
            }
        }
    }
    Ok(s)
}

/// Rebuilds the database at `upto` (None = the end of the log) into `out`.
pub fn rebuild(dir: &Path, upto: Option<Lsn>, out: &Path) -> Result<RebuildInfo> {
    rebuild_to(dir, upto, out).map(|(info, _)| info)
}

/// `rebuild`, also returning the metadata of the last record applied.
pub(crate) fn rebuild_to(
    dir: &Path,
    upto: Option<Lsn>,
    out: &Path,
) -> Result<(RebuildInfo, RecordMeta)> {
    read_meta(dir)?;
    let log = summarize(&dir.join("log"), upto)?;
    let snap = latest_snapshot_in(dir, upto)?;
    let available = log.last.max(snap.as_ref().map(|s| s.0.lsn));
    let Some(available) = available else {
        return Err(Error::Misuse(format!(
            "{}: the log and the snapshots are empty: nothing to rebuild",
            dir.display()
        )));
    };
    if let Some(u) = upto {
        if u > available {
            return Err(Error::Misuse(format!(
                "cannot rebuild at LSN {u}: the log ends at LSN {available}"
            )));
        }
    }
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("rebuild");
    let tmp = out.with_file_name(format!("{name}.{}.tmp", std::process::id()));
    let file =
        File::create(&tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let res = rebuild_into(dir, &log, snap, upto, &file, &tmp).and_then(|info| {
        file.sync_all()
            .map_err(|e| Error::io(format!("fsync of {}", tmp.display()), e))?;
        std::fs::rename(&tmp, out).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", tmp.display(), out.display()),
                e,
            )
        })?;
        Ok(info)
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn rebuild_into(
    dir: &Path,
    log: &LogSummary,
    snap: Option<(RecordMeta, std::path::PathBuf)>,
    upto: Option<Lsn>,
    file: &File,
    tmp: &Path,
) -> Result<(RebuildInfo, RecordMeta)> {
    let io = |e| Error::io(format!("writing {}", tmp.display()), e);
    let write_page = |ps: PageSize, pgno: crate::types::PageNo, data: &[u8]| {
        file.write_all_at(data, u64::from(pgno.get() - 1) * u64::from(ps.get()))
            .map_err(io)
    };
    let mut sum: Option<DbChecksum> = None;
    let mut state: Option<RecordMeta> = None;
    let file_lsn = snap.as_ref().map(|s| s.0.lsn);
    let start = match (file_lsn, log.snapshot_record) {
        (Some(f), l) if l.is_none_or(|l| f >= l) => {
            let (header, path) = snap.expect("file_lsn is Some");
            let ps = header.page_size;
            let (meta, s) = stream_snapshot(&path, &mut |pgno, data| write_page(ps, pgno, data))?;
            file.set_len(u64::from(meta.commit_size) * u64::from(meta.page_size.get()))
                .map_err(io)?;
            sum = Some(s);
            state = Some(meta);
            f.next()
        }
        (_, Some(l)) => l,
        (_, None) if log.first == Some(Lsn(1)) => Lsn(1),
        _ => {
            return Err(Error::Misuse(format!(
                "cannot rebuild {}: no snapshot at or before LSN {} and the log starts at LSN {}",
                dir.display(),
                upto.map_or("end".to_string(), |u| u.to_string()),
                log.first.map_or("(none)".to_string(), |f| f.to_string())
            )))
        }
    };
    if upto.is_none_or(|u| start <= u) && log.last.is_some_and(|l| start <= l) {
        let mut cursor = Cursor::new(&dir.join("log"), start, upto).map_err(|e| {
            Error::Misuse(format!(
                "cannot rebuild {}: the base snapshot is at LSN {} ({e})",
                dir.display(),
                start.0 - 1
            ))
        })?;
        while let Some(m) = cursor.advance() {
            let m = m?;
            let s = match sum.as_mut() {
                Some(s) if !m.snapshot && s.page_size() == m.page_size => s,
                Some(s) if !m.snapshot => {
                    return Err(Error::Corrupt(format!(
                        "record LSN {}: page size {} differs from {} without a snapshot",
                        m.lsn,
                        m.page_size,
                        s.page_size()
                    )))
                }
                _ => {
                    file.set_len(0).map_err(io)?;
                    sum.insert(DbChecksum::new(m.page_size))
                }
            };
            let ps = m.page_size;
            cursor.body(&mut |pgno, data| {
                s.set_page(pgno, data);
                write_page(ps, pgno, data)
            })?;
            s.truncate(m.commit_size);
            file.set_len(u64::from(m.commit_size) * u64::from(ps.get()))
                .map_err(io)?;
            if s.total() != m.db_checksum {
                return Err(Error::Corrupt(format!(
                    "record LSN {} (generation {}): database checksum mismatch after apply: the record \
                     says {}, the rebuilt state has {}",
                    m.lsn,
                    m.generation,
                    m.db_checksum,
                    s.total()
                )));
            }
            state = Some(m);
        }
    }
    let (Some(state), Some(sum)) = (state, sum) else {
        return Err(Error::Misuse(format!(
            "cannot rebuild {}: no record to start from",
            dir.display()
        )));
    };
    if let Some(u) = upto {
        if state.lsn != u {
            return Err(Error::Corrupt(format!(
                "cannot rebuild at LSN {u}: the readable log ends at LSN {}",
                state.lsn
            )));
        }
    }
    let info = RebuildInfo {
        lsn: state.lsn,
        generation: state.generation,
        checksum: sum.total(),
        pages: state.commit_size,
    };
    Ok((info, state))
}

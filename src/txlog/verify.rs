//! `Log::verify`: an offline, read-only check of a whole log directory. It decodes every snapshot
//! file and every segment, checks every header and record checksum, the sequence rules across
//! segments, segment names against headers, each snapshot's database checksum, and, wherever the
//! state is known (from a snapshot file just before the log, or from a SNAPSHOT record in it),
//! replays per-page checksums to check every record's `db_checksum` and every snapshot file that
//! falls inside the log. Only an incomplete record at the very end of the last segment is
//! tolerated (reported as `torn_tail`); a durable watermark above the readable log is an error.

use super::checksum::DbChecksum;
use super::meta::{read_durable, read_meta};
use super::segment::{list_segments, ScanKind, SegmentReader};
use super::snapshot::{list_snapshots, stream_snapshot};
use super::{check_sequence, Log, Meta, RecordMeta};
use crate::error::{Error, Result};
use crate::types::{Checksum, Generation, Lsn};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// LSN range of one generation inside the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationRange {
    pub generation: Generation,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub records: u64,
}

/// One verified snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub lsn: Lsn,
    pub generation: Generation,
    pub path: PathBuf,
    pub commit_size: u32,
    pub db_checksum: Checksum,
}

/// What `Log::verify` checked.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub meta: Meta,
    pub segments: usize,
    pub segment_bytes: u64,
    pub records: u64,
    pub snapshot_records: u64,
    pub first_lsn: Option<Lsn>,
    pub last_lsn: Option<Lsn>,
    pub generations: Vec<GenerationRange>,
    pub snapshots: Vec<SnapshotInfo>,
    pub durable: Option<(Lsn, Generation)>,
    /// Records whose `db_checksum` was checked against replayed page checksums.
    pub checksums_verified: u64,
    /// Set when the last segment ends inside a record (not yet truncated by a writer).
    pub torn_tail: Option<String>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |l: Option<Lsn>| l.map_or("-".to_string(), |l| l.to_string());
        writeln!(
            f,
            "lineage {} role {} page_size {}",
            self.meta.lineage, self.meta.role, self.meta.page_size
        )?;
        writeln!(
            f,
            "segments {} ({} bytes), records {} ({} snapshot records), LSN {}..{}",
            self.segments,
            self.segment_bytes,
            self.records,
            self.snapshot_records,
            opt(self.first_lsn),
            opt(self.last_lsn)
        )?;
        for g in &self.generations {
            writeln!(
                f,
                "generation {}: LSN {}..{} ({} records)",
                g.generation, g.first_lsn, g.last_lsn, g.records
            )?;
        }
        for s in &self.snapshots {
            writeln!(
                f,
                "snapshot LSN {} generation {}: {} pages, checksum {} ({})",
                s.lsn,
                s.generation,
                s.commit_size,
                s.db_checksum,
                s.path.display()
            )?;
        }
        match self.durable {
            Some((l, g)) => writeln!(f, "durable watermark LSN {l} generation {g}")?,
            None => writeln!(f, "durable watermark: none")?,
        }
        writeln!(
            f,
            "database checksums verified: {} records",
            self.checksums_verified
        )?;
        if let Some(t) = &self.torn_tail {
            writeln!(f, "warning: torn tail (a writer will truncate it): {t}")?;
        }
        write!(f, "OK")
    }
}

impl Log {
    /// Verifies the whole log directory (read-only). See the module documentation.
    pub fn verify(dir: &Path) -> Result<VerifyReport> {
        verify(dir)
    }
}

fn verify(dir: &Path) -> Result<VerifyReport> {
    let meta = read_meta(dir)?;
    let segs = list_segments(&dir.join("log"))?;
    let log_first = segs.first().map(|s| s.0);
    let mut r = VerifyReport {
        meta,
        segments: segs.len(),
        segment_bytes: 0,
        records: 0,
        snapshot_records: 0,
        first_lsn: None,
        last_lsn: None,
        generations: Vec::new(),
        snapshots: Vec::new(),
        durable: read_durable(dir)?,
        checksums_verified: 0,
        torn_tail: None,
    };
    // Snapshot files: each fully validated; remember their checksums for cross-checks and the
    // state of the one right before the log (the base of the replay).
    let mut state: Option<DbChecksum> = None;
    let mut snap_sums: HashMap<(Lsn, Generation), Checksum> = HashMap::new();
    for (_, _, path) in list_snapshots(dir)? {
        let (m, sum) = stream_snapshot(&path, &mut |_, _| Ok(()))?;
        if log_first == Some(m.lsn.next()) {
            state = Some(sum);
        }
        snap_sums.insert((m.lsn, m.generation), m.db_checksum);
        r.snapshots.push(SnapshotInfo {
            lsn: m.lsn,
            generation: m.generation,
            path,
            commit_size: m.commit_size,
            db_checksum: m.db_checksum,
        });
    }
    let mut prev: Option<RecordMeta> = None;
    for (i, (_, path)) in segs.iter().enumerate() {
        let is_last = i + 1 == segs.len();
        r.segment_bytes += std::fs::metadata(path)
            .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?
            .len();
        let mut rd = match SegmentReader::open(path) {
            Ok(rd) => rd,
            Err(e) if is_last && e.kind == ScanKind::Torn => {
                r.torn_tail = Some(e.error.to_string());
                break;
            }
            Err(e) => return Err(e.error),
        };
        if let Some(p) = &prev {
            if rd.header().first_lsn != p.lsn.next() {
                return Err(Error::Corrupt(format!(
                    "segment {} starts at LSN {} but the previous segment ends at LSN {}",
                    path.display(),
                    rd.header().first_lsn,
                    p.lsn
                )));
            }
        }
        let mut in_segment = 0u64;
        loop {
            let m = match rd.next_header() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if is_last && e.kind == ScanKind::Torn => {
                    r.torn_tail = Some(e.error.to_string());
                    break;
                }
                Err(e) => return Err(e.error),
            };
            let offset = rd.position();
            let at = |msg: String| {
                Error::Corrupt(format!(
                    "segment {} at offset {offset}: {msg}",
                    path.display()
                ))
            };
            if let Some(p) = &prev {
                check_sequence(p, &m).map_err(at)?;
            }
            if m.snapshot {
                state = Some(DbChecksum::new(m.page_size));
            }
            if let Some(s) = &state {
                if s.page_size() != m.page_size {
                    return Err(at(format!(
                        "record LSN {}: page size {} differs from {} without a snapshot",
                        m.lsn,
                        m.page_size,
                        s.page_size()
                    )));
                }
            }
            let st = &mut state;
            rd.read_body(&mut |pgno, data| {
                if let Some(s) = st.as_mut() {
                    s.set_page(pgno, data);
                }
                Ok(())
            })
            .map_err(|e| e.error)?;
            if let Some(s) = state.as_mut() {
                s.truncate(m.commit_size);
                if s.total() != m.db_checksum {
                    return Err(at(format!(
                        "record LSN {}: database checksum mismatch after replay: the record says {}, \
                         the replayed state has {}",
                        m.lsn,
                        m.db_checksum,
                        s.total()
                    )));
                }
                r.checksums_verified += 1;
                if let Some(c) = snap_sums.get(&(m.lsn, m.generation)) {
                    if *c != s.total() {
                        return Err(at(format!(
                            "snapshot file at LSN {} disagrees with the log's state ({c} vs {})",
                            m.lsn,
                            s.total()
                        )));
                    }
                }
            }
            count(&mut r, &m);
            in_segment += 1;
            prev = Some(m);
        }
        if in_segment == 0 && !is_last {
            return Err(Error::Corrupt(format!(
                "segment {} holds no records but is not the last segment",
                path.display()
            )));
        }
    }
    if let Some((d, _)) = r.durable {
        let last = r.last_lsn.unwrap_or(Lsn(0));
        if d > last {
            return Err(Error::Corrupt(format!(
                "durable watermark says LSN {d} was fsynced but the readable log ends at LSN {last}: \
                 acknowledged records are missing"
            )));
        }
    }
    Ok(r)
}

fn count(r: &mut VerifyReport, m: &RecordMeta) {
    r.records += 1;
    r.snapshot_records += u64::from(m.snapshot);
    r.first_lsn.get_or_insert(m.lsn);
    r.last_lsn = Some(m.lsn);
    match r.generations.last_mut() {
        Some(g) if g.generation == m.generation => {
            g.last_lsn = m.lsn;
            g.records += 1;
        }
        _ => r.generations.push(GenerationRange {
            generation: m.generation,
            first_lsn: m.lsn,
            last_lsn: m.lsn,
            records: 1,
        }),
    }
}

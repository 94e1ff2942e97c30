//! Readers of the log: `Log::read_from` (records with pages), `Log::read_meta_from` (validated
//! headers only) and `Log::read_durable_from` (capped at the durable watermark, for serving
//! replicas). All go through `Cursor`, which lists the segments when created, skips records below
//! `from` by their headers, validates every returned record (checksums and the sequence rules),
//! stops quietly at an incomplete record at the end of the last segment (a write in progress), and
//! reports anything else invalid as an error naming the segment and offset.

use super::segment::{list_segments, ScanKind, SegmentReader};
use super::{check_sequence, Log, Page, Record, RecordMeta};
use crate::error::{Error, Result};
use crate::types::{Lsn, PageNo};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

impl Log {
    /// Records with `from <= lsn (<= upto)`, in LSN order. LSN 0 is read as 1 (it never carries a
    /// record). Errors if `from` is older than the first retained LSN.
    pub fn read_from(&self, from: Lsn, upto: Option<Lsn>) -> Result<LogIter> {
        Ok(LogIter {
            c: Cursor::new(&self.log_dir, from, upto)?,
        })
    }

    /// Like `read_from` but yields only the (fully validated) record metadata.
    pub fn read_meta_from(&self, from: Lsn, upto: Option<Lsn>) -> Result<LogMetaIter> {
        Ok(LogMetaIter {
            c: Cursor::new(&self.log_dir, from, upto)?,
        })
    }

    /// `read_from`, starting directly where an earlier read stopped when `hint` describes
    /// exactly the record before `from` (else a normal read that skips from the segment start).
    /// Costs what it returns instead of the size of the segment before `from`.
    pub fn read_from_hinted(
        &self,
        from: Lsn,
        upto: Option<Lsn>,
        hint: Option<&ReadHint>,
    ) -> Result<LogIter> {
        let mut c = Cursor::new(&self.log_dir, from, upto)?;
        if let Some(h) = hint.filter(|h| h.after.lsn.next() == from.max(Lsn(1))) {
            c.resume(h);
        }
        Ok(LogIter { c })
    }

    /// `read_from` capped at the durable watermark: what may be served to replicas.
    pub fn read_durable_from(&self, from: Lsn) -> Result<LogIter> {
        match Log::read_durable(&self.dir)? {
            Some((upto, _)) => self.read_from(from, Some(upto)),
            None => Ok(LogIter { c: Cursor::empty() }),
        }
    }
}

/// Where a read stopped: the record `after` ends at `offset` in the segment whose first LSN
/// is `segment`. Rolled segments never change and the last one only grows above the durable
/// watermark, so the next record (if any) starts there.
#[derive(Clone, Debug)]
pub struct ReadHint {
    segment: Lsn,
    offset: u64,
    after: RecordMeta,
}

/// A run of whole, consecutive records inside one segment file: what a server streams as raw
/// bytes (the client validates every record; headers and the sequence were checked here).
#[derive(Clone, Debug)]
pub struct RecordRange {
    pub path: PathBuf,
    /// Byte offset of the first record in `path`, and the length of the run.
    pub start: u64,
    pub len: u64,
    pub first: Lsn,
    pub last: Lsn,
    pub count: u32,
    /// The codec of the run's compressed records (§3.7; a run never mixes two codecs), `None`
    /// when every record is plain (a client that does not take that codec gets the run
    /// re-encoded uncompressed).
    pub codec: Option<u8>,
    /// Where the read after this one starts.
    pub next: ReadHint,
}

impl Log {
    /// The records `from..=upto` that lie in one segment, at most about `max_bytes` (at least
    /// one record). None when there is no record at `from` yet.
    pub fn locate(
        &self,
        from: Lsn,
        upto: Lsn,
        max_bytes: u64,
        hint: Option<&ReadHint>,
    ) -> Result<Option<RecordRange>> {
        let from = from.max(Lsn(1));
        if from > upto {
            return Ok(None);
        }
        let mut c = Cursor::new(&self.log_dir, from, Some(upto))?;
        if let Some(h) = hint.filter(|h| h.after.lsn.next() == from) {
            c.resume(h);
        }
        let mut run: Option<(usize, u64, u64, Lsn, RecordMeta, u32)> = None;
        let mut codec = None;
        while let Some(m) = c.advance() {
            let m = m?;
            // The body is not read here (the client validates it): the sequence check of the
            // next header runs against this one.
            c.prev = Some(m.clone());
            let pos = c.rd.as_ref().map_or(0, |rd| rd.position());
            let len =
                c.rd.as_ref()
                    .and_then(|rd| rd.pending_len())
                    .unwrap_or_else(|| super::record_len(m.page_size, m.page_count));
            let this_codec = c.rd.as_ref().and_then(|rd| rd.pending_codec());
            match &mut run {
                None => {
                    codec = this_codec;
                    run = Some((c.idx, pos, len, m.lsn, m, 1))
                }
                Some((idx, start, total, _, last, n)) => {
                    if *idx != c.idx || pos != *start + *total {
                        break; // the next segment: a later request
                    }
                    if this_codec.is_some() && codec.is_some() && this_codec != codec {
                        break; // one codec per run: a client may read only one
                    }
                    *total += len;
                    codec = codec.or(this_codec);
                    *last = m;
                    *n += 1;
                }
            }
            if run.as_ref().is_some_and(|r| r.2 >= max_bytes) {
                break;
            }
        }
        let Some((idx, start, len, first, last, count)) = run else {
            return Ok(None);
        };
        let segment = c.segs[idx].0;
        Ok(Some(RecordRange {
            path: c.segs[idx].1.clone(),
            start,
            len,
            first,
            last: last.lsn,
            count,
            codec,
            next: ReadHint {
                segment,
                offset: start + len,
                after: last,
            },
        }))
    }
}

/// Iterator of `Result<Record>`; ends after the first error.
pub struct LogIter {
    c: Cursor,
}

impl LogIter {
    /// Where the next read after this one may start (None before any record was read).
    pub fn hint(&self) -> Option<ReadHint> {
        self.c.hint()
    }
}

impl Iterator for LogIter {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        let meta = match self.c.advance()? {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        let mut pages = Vec::with_capacity(meta.page_count as usize);
        let body = self.c.body(&mut |pgno, data| {
            pages.push(Page {
                pgno,
                data: data.to_vec(),
            });
            Ok(())
        });
        Some(body.map(|()| Record { meta, pages }))
    }
}

/// Iterator of `Result<RecordMeta>` (bodies validated, pages not kept); ends after the first error.
pub struct LogMetaIter {
    c: Cursor,
}

impl Iterator for LogMetaIter {
    type Item = Result<RecordMeta>;
    fn next(&mut self) -> Option<Result<RecordMeta>> {
        let meta = match self.c.advance()? {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        Some(self.c.body(&mut |_, _| Ok(())).map(|()| meta))
    }
}

/// Two-phase reader over the segments: `advance` to the next record's header, then `body`.
pub(crate) struct Cursor {
    segs: Vec<(Lsn, PathBuf)>,
    idx: usize,
    rd: Option<SegmentReader<BufReader<File>>>,
    from: Lsn,
    upto: Option<Lsn>,
    prev: Option<RecordMeta>,
    done: bool,
}

impl Cursor {
    pub(crate) fn new(log_dir: &Path, from: Lsn, upto: Option<Lsn>) -> Result<Cursor> {
        let from = from.max(Lsn(1));
        let segs = list_segments(log_dir)?;
        if let Some((first, _)) = segs.first() {
            if from < *first {
                return Err(Error::Misuse(format!(
                    "LSN {from} is older than the log's first retained LSN {first}: re-snapshot"
                )));
            }
        }
        let idx = segs.iter().rposition(|(l, _)| *l <= from).unwrap_or(0);
        Ok(Cursor {
            segs,
            idx,
            rd: None,
            from,
            upto,
            prev: None,
            done: false,
        })
    }

    /// Starts at the hinted offset if the hinted segment is still listed (it may have been
    /// removed by retention: then the normal path reports it).
    fn resume(&mut self, h: &ReadHint) {
        let Some(idx) = self.segs.iter().position(|(l, _)| *l == h.segment) else {
            return;
        };
        let Ok(mut rd) = SegmentReader::open(&self.segs[idx].1) else {
            return;
        };
        if rd.resume_at(h.offset, Some(h.after.clone())).is_ok() {
            self.idx = idx;
            self.rd = Some(rd);
            self.prev = Some(h.after.clone());
        }
    }

    fn hint(&self) -> Option<ReadHint> {
        let rd = self.rd.as_ref()?;
        Some(ReadHint {
            segment: self.segs.get(self.idx)?.0,
            offset: rd.position(),
            after: self.prev.clone()?,
        })
    }

    fn empty() -> Cursor {
        Cursor {
            segs: Vec::new(),
            idx: 0,
            rd: None,
            from: Lsn(1),
            upto: None,
            prev: None,
            done: true,
        }
    }

    fn fail(&mut self, e: Error) -> Option<Result<RecordMeta>> {
        self.done = true;
        Some(Err(e))
    }

    /// Positions on the next record to return and yields its header; its body is pending.
    pub(crate) fn advance(&mut self) -> Option<Result<RecordMeta>> {
        loop {
            if self.done {
                return None;
            }
            let is_last = self.idx + 1 >= self.segs.len();
            if self.rd.is_none() {
                let Some((_, path)) = self.segs.get(self.idx) else {
                    self.done = true;
                    return None;
                };
                match SegmentReader::open(path) {
                    Ok(rd) => self.rd = Some(rd),
                    Err(e) if is_last && e.kind == ScanKind::Torn => {
                        self.done = true;
                        return None;
                    }
                    Err(e) => return self.fail(e.error),
                }
            }
            let rd = self.rd.as_mut().expect("opened above");
            let meta = match rd.next_header() {
                Ok(Some(m)) => m,
                Ok(None) if is_last => {
                    // The end of the log: keep the reader, its position is the resume hint.
                    self.done = true;
                    return None;
                }
                Ok(None) => {
                    self.rd = None;
                    self.idx += 1;
                    continue;
                }
                Err(e) if is_last && e.kind == ScanKind::Torn => {
                    self.done = true;
                    return None;
                }
                Err(e) => return self.fail(e.error),
            };
            if meta.lsn < self.from {
                continue; // next_header skips the pending body
            }
            if self.upto.is_some_and(|u| meta.lsn > u) {
                self.done = true;
                return None;
            }
            let where_ = format!(
                "segment {} at offset {}",
                self.segs[self.idx].1.display(),
                rd.position()
            );
            let seq = match &self.prev {
                None if meta.lsn != self.from => Err(format!(
                    "LSN gap: asked for LSN {} but the log continues with LSN {}",
                    self.from, meta.lsn
                )),
                None => Ok(()),
                Some(p) => check_sequence(p, &meta),
            };
            if let Err(m) = seq {
                return self.fail(Error::Corrupt(format!("{where_}: {m}")));
            }
            return Some(Ok(meta));
        }
    }

    /// Reads and validates the pending record's body, handing each page to `on_page`.
    pub(crate) fn body(
        &mut self,
        on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let rd = self.rd.as_mut().expect("body() after advance()");
        match rd.read_body(on_page) {
            Ok(()) => {
                self.prev = rd.last_meta().cloned();
                Ok(())
            }
            Err(e) => {
                self.done = true;
                Err(e.error)
            }
        }
    }
}

//! Segment files (FORMAT.md §4): the 32-byte segment header, file naming, directory listing and
//! `SegmentReader`, the streaming scanner every reader of the log goes through. The scanner reads
//! one header at a time (so records can be skipped by seeking) and validates bodies page by page
//! (memory O(page size), whatever the record size), classifying every failure as *torn* (the data
//! ends inside a header or record), *corrupt* (bytes present but invalid) or *I/O*; only the
//! writer decides what to do with a torn or corrupt tail. Every message names the file and offset.

use super::record::{
    be_u16, be_u64, check_stored_len, page_data, parse_header, PageOrder,
    COMPRESSED_ENTRY_OVERHEAD, RECORD_HEADER_LEN, RECORD_TRAILER_LEN,
};
use super::{check_sequence, RecordMeta};
use crate::error::{Error, Result};
use crate::types::{Lsn, PageNo};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// ASCII `RPLS`.
pub const SEGMENT_MAGIC: [u8; 4] = *b"RPLS";
/// Segment format version written and accepted by this build.
pub const SEGMENT_VERSION: u16 = 1;
/// Size of the segment header (§4.1).
pub const SEGMENT_HEADER_LEN: usize = 32;

/// The segment header (§4.1), also the header of a snapshot file (§5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_lsn: Lsn,
    pub created_ms: u64,
}

pub fn encode_segment_header(h: &SegmentHeader) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..4].copy_from_slice(&SEGMENT_MAGIC);
    b[4..6].copy_from_slice(&SEGMENT_VERSION.to_be_bytes());
    // 6..8 flags = 0
    b[8..16].copy_from_slice(&h.first_lsn.0.to_be_bytes());
    b[16..24].copy_from_slice(&h.created_ms.to_be_bytes());
    let sum = xxh3_64(&b[..24]);
    b[24..32].copy_from_slice(&sum.to_be_bytes());
    b
}

pub fn decode_segment_header(b: &[u8]) -> Result<SegmentHeader> {
    let c = |m: String| Error::Corrupt(format!("segment header: {m}"));
    if b.len() < SEGMENT_HEADER_LEN {
        return Err(c(format!(
            "truncated: {} of {SEGMENT_HEADER_LEN} bytes",
            b.len()
        )));
    }
    if b[0..4] != SEGMENT_MAGIC {
        return Err(c(format!(
            "bad magic {:02x?} (expected \"RPLS\")",
            &b[0..4]
        )));
    }
    let version = be_u16(b, 4);
    if version != SEGMENT_VERSION {
        return Err(c(format!(
            "unsupported segment format version {version} (this build reads version {SEGMENT_VERSION})"
        )));
    }
    let (stored, actual) = (be_u64(b, 24), xxh3_64(&b[..24]));
    if stored != actual {
        return Err(c(format!(
            "checksum mismatch (stored {stored:016x}, computed {actual:016x})"
        )));
    }
    let flags = be_u16(b, 6);
    if flags != 0 {
        return Err(c(format!("unknown flags 0x{flags:04x}")));
    }
    Ok(SegmentHeader {
        first_lsn: Lsn(be_u64(b, 8)),
        created_ms: be_u64(b, 16),
    })
}

/// `<first_lsn as 20 zero-padded digits>.seg`
pub fn segment_file_name(first_lsn: Lsn) -> String {
    format!("{:020}.seg", first_lsn.0)
}

/// Inverse of `segment_file_name`; `None` for any other name (tmp files included).
pub fn parse_segment_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Lsn)
}

/// The segments in `log_dir`, sorted by first LSN. A missing directory is an empty log.
pub(crate) fn list_segments(log_dir: &Path) -> Result<Vec<(Lsn, PathBuf)>> {
    let rd = match std::fs::read_dir(log_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", log_dir.display()), e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("listing {}", log_dir.display()), e))?;
        if let Some(lsn) = ent.file_name().to_str().and_then(parse_segment_file_name) {
            out.push((lsn, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// How a scan stopped short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanKind {
    /// The data ends inside a header or a record (a write in progress, or a crash).
    Torn,
    /// Bytes are present but fail validation.
    Corrupt,
    /// Reading (or the caller's page callback) failed.
    Io,
}

#[derive(Debug)]
pub(crate) struct ScanError {
    pub kind: ScanKind,
    /// Offset of the header or record that could not be read.
    pub offset: u64,
    /// Carries the full message (file, offset, what failed, LSN when known).
    pub error: Error,
}

struct Pending {
    meta: RecordMeta,
    start: u64,
    total: u64,
    header: [u8; RECORD_HEADER_LEN],
    codec: Option<u8>,
}

/// Sequential reader of one segment (or snapshot) file. Usage: `next_header`, then exactly one of
/// `read_body` / `skip_body` (calling `next_header` again skips implicitly).
pub(crate) struct SegmentReader<R> {
    r: R,
    name: String,
    len: u64,
    pos: u64,
    header: SegmentHeader,
    prev: Option<RecordMeta>,
    pending: Option<Pending>,
    page_buf: Vec<u8>,
}

impl SegmentReader<BufReader<File>> {
    /// Opens `path`; its length is fixed now (bytes appended later are not seen by this reader).
    pub(crate) fn open(path: &Path) -> std::result::Result<Self, ScanError> {
        let io = |e| ScanError {
            kind: ScanKind::Io,
            offset: 0,
            error: Error::io(format!("opening segment {}", path.display()), e),
        };
        let f = File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let expected = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_segment_file_name);
        SegmentReader::new(
            BufReader::with_capacity(1 << 16, f),
            path.display().to_string(),
            len,
            expected,
        )
    }
}

impl<R: Read + Seek> SegmentReader<R> {
    /// Reads and validates the segment header; `expected_first` is the LSN the file name claims.
    pub(crate) fn new(
        mut r: R,
        name: String,
        len: u64,
        expected_first: Option<Lsn>,
    ) -> std::result::Result<Self, ScanError> {
        let this_err = |kind, msg: String| ScanError {
            kind,
            offset: 0,
            error: Error::Corrupt(format!("segment {name} at offset 0: {msg}")),
        };
        if len < SEGMENT_HEADER_LEN as u64 {
            return Err(this_err(
                ScanKind::Torn,
                format!("segment header truncated ({len} of 32 bytes)"),
            ));
        }
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        if let Err(e) = r.read_exact(&mut b) {
            let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ScanKind::Torn
            } else {
                ScanKind::Io
            };
            return Err(ScanError {
                kind,
                offset: 0,
                error: Error::io(format!("reading segment {name}"), e),
            });
        }
        let header =
            decode_segment_header(&b).map_err(|e| this_err(ScanKind::Corrupt, e.to_string()))?;
        if let Some(exp) = expected_first {
            if exp != header.first_lsn {
                return Err(this_err(
                    ScanKind::Corrupt,
                    format!(
                        "header says first LSN {} but the file name says {exp}",
                        header.first_lsn
                    ),
                ));
            }
        }
        Ok(SegmentReader {
            r,
            name,
            len,
            pos: SEGMENT_HEADER_LEN as u64,
            header,
            prev: None,
            pending: None,
            page_buf: Vec::new(),
        })
    }

    pub(crate) fn header(&self) -> &SegmentHeader {
        &self.header
    }
    /// Offset just after the last record fully read or skipped.
    pub(crate) fn position(&self) -> u64 {
        self.pending.as_ref().map_or(self.pos, |p| p.start)
    }
    /// The last record header returned, if its body was read or skipped.
    pub(crate) fn last_meta(&self) -> Option<&RecordMeta> {
        self.prev.as_ref()
    }

    fn err(&self, kind: ScanKind, offset: u64, msg: impl std::fmt::Display) -> ScanError {
        ScanError {
            kind,
            offset,
            error: Error::Corrupt(format!("segment {} at offset {offset}: {msg}", self.name)),
        }
    }
    fn read_err(&self, offset: u64, e: std::io::Error) -> ScanError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            self.err(ScanKind::Torn, offset, "file shrank while reading")
        } else {
            ScanError {
                kind: ScanKind::Io,
                offset,
                error: Error::io(
                    format!("reading segment {} at offset {offset}", self.name),
                    e,
                ),
            }
        }
    }

    /// Continues after the record at `offset` (which ended a previous scan with `prev`).
    pub(crate) fn resume_at(
        &mut self,
        offset: u64,
        prev: Option<RecordMeta>,
    ) -> std::result::Result<(), ScanError> {
        self.r
            .seek(SeekFrom::Start(offset))
            .map_err(|e| self.read_err(offset, e))?;
        self.pos = offset;
        self.prev = prev;
        self.pending = None;
        Ok(())
    }

    /// Reads and validates the next record header. `Ok(None)` at a clean end of file.
    pub(crate) fn next_header(&mut self) -> std::result::Result<Option<RecordMeta>, ScanError> {
        if self.pending.is_some() {
            self.skip_body()?;
        }
        let start = self.pos;
        if start == self.len {
            return Ok(None);
        }
        let avail = self.len.saturating_sub(start);
        if avail < RECORD_HEADER_LEN as u64 {
            return Err(self.err(
                ScanKind::Torn,
                start,
                format!("record header truncated ({avail} of {RECORD_HEADER_LEN} bytes)"),
            ));
        }
        let mut header = [0u8; RECORD_HEADER_LEN];
        self.r
            .read_exact(&mut header)
            .map_err(|e| self.read_err(start, e))?;
        let (meta, total, codec) =
            parse_header(&header).map_err(|e| self.err(ScanKind::Corrupt, start, e))?;
        if total > avail {
            return Err(self.err(
                ScanKind::Torn,
                start,
                format!(
                    "record LSN {} truncated: {total} bytes needed, {avail} remain",
                    meta.lsn
                ),
            ));
        }
        let seq = match &self.prev {
            None if meta.lsn != self.header.first_lsn => Err(format!(
                "first record has LSN {} but the segment header says {}",
                meta.lsn, self.header.first_lsn
            )),
            None => Ok(()),
            Some(prev) => check_sequence(prev, &meta),
        };
        if let Err(m) = seq {
            return Err(self.err(ScanKind::Corrupt, start, m));
        }
        self.pending = Some(Pending {
            meta: meta.clone(),
            start,
            total,
            header,
            codec,
        });
        Ok(Some(meta))
    }

    /// Stored length of the pending record (its header's `total_len`).
    pub(crate) fn pending_len(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.total)
    }

    /// Codec of the pending record when it is compressed (§3.7).
    pub(crate) fn pending_codec(&self) -> Option<u8> {
        self.pending.as_ref().and_then(|p| p.codec)
    }

    /// Skips the body of the pending record without validating it.
    pub(crate) fn skip_body(&mut self) -> std::result::Result<(), ScanError> {
        let p = self
            .pending
            .take()
            .expect("skip_body without a pending header");
        let end = p.start + p.total;
        self.r
            .seek(SeekFrom::Start(end))
            .map_err(|e| self.read_err(p.start, e))?;
        self.pos = end;
        self.prev = Some(p.meta);
        Ok(())
    }

    /// Reads and validates the body of the pending record, handing each page to `on_page`
    /// (before the record checksum is known: a caller must discard its work on error).
    pub(crate) fn read_body(
        &mut self,
        on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
    ) -> std::result::Result<(), ScanError> {
        let p = self
            .pending
            .take()
            .expect("read_body without a pending header");
        let mut hasher = Xxh3::new();
        hasher.update(&p.header);
        if let Some(codec) = p.codec {
            return self.read_compressed_body(p, codec, hasher, on_page);
        }
        let entry = 4 + p.meta.page_size.bytes();
        self.page_buf.resize(entry, 0);
        let mut order = PageOrder::new(&p.meta);
        let mut at = p.start + RECORD_HEADER_LEN as u64;
        for _ in 0..p.meta.page_count {
            if let Err(e) = self.r.read_exact(&mut self.page_buf) {
                return Err(self.read_err(p.start, e));
            }
            hasher.update(&self.page_buf);
            let raw = u32::from_be_bytes(self.page_buf[0..4].try_into().expect("4 bytes"));
            let pgno = order.check(raw).map_err(|e| {
                self.err(
                    ScanKind::Corrupt,
                    p.start,
                    format!("{e} (entry at offset {at})"),
                )
            })?;
            on_page(pgno, &self.page_buf[4..]).map_err(|error| ScanError {
                kind: ScanKind::Io,
                offset: p.start,
                error,
            })?;
            at += entry as u64;
        }
        self.finish_body(p, hasher)
    }

    /// `read_body` of a compressed record (§3.7): each entry's stored length is checked against
    /// the page size and what is left of the record before it is read, and each page is
    /// decompressed (bounded by the page size) before `on_page` sees it.
    fn read_compressed_body(
        &mut self,
        p: Pending,
        codec: u8,
        mut hasher: Xxh3,
        on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
    ) -> std::result::Result<(), ScanError> {
        let ps = p.meta.page_size.bytes();
        let lsn = Some(p.meta.lsn);
        let body_end = p.start + p.total - RECORD_TRAILER_LEN as u64;
        let mut order = PageOrder::new(&p.meta);
        let mut at = p.start + RECORD_HEADER_LEN as u64;
        let mut head = [0u8; COMPRESSED_ENTRY_OVERHEAD];
        for _ in 0..p.meta.page_count {
            let past = |this: &Self| {
                this.err(
                    ScanKind::Corrupt,
                    p.start,
                    format!(
                        "record LSN {}: page entry at offset {at} runs past the record",
                        p.meta.lsn
                    ),
                )
            };
            if at + COMPRESSED_ENTRY_OVERHEAD as u64 > body_end {
                return Err(past(self));
            }
            if let Err(e) = self.r.read_exact(&mut head) {
                return Err(self.read_err(p.start, e));
            }
            hasher.update(&head);
            let raw = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
            let corrupt = |this: &Self, e: Error| {
                this.err(
                    ScanKind::Corrupt,
                    p.start,
                    format!("{e} (entry at offset {at})"),
                )
            };
            let pgno = order.check(raw).map_err(|e| corrupt(self, e))?;
            let len = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
            let len = check_stored_len(lsn, len, ps, at as usize).map_err(|e| corrupt(self, e))?;
            if at + (COMPRESSED_ENTRY_OVERHEAD + len) as u64 > body_end {
                return Err(past(self));
            }
            self.page_buf.resize(len, 0);
            if let Err(e) = self.r.read_exact(&mut self.page_buf) {
                return Err(self.read_err(p.start, e));
            }
            hasher.update(&self.page_buf);
            let page =
                page_data(lsn, codec, &self.page_buf, ps, pgno).map_err(|e| corrupt(self, e))?;
            on_page(pgno, &page).map_err(|error| ScanError {
                kind: ScanKind::Io,
                offset: p.start,
                error,
            })?;
            at += (COMPRESSED_ENTRY_OVERHEAD + len) as u64;
        }
        if at != body_end {
            return Err(self.err(
                ScanKind::Corrupt,
                p.start,
                format!(
                    "record LSN {}: {} bytes after the last page entry",
                    p.meta.lsn,
                    body_end - at
                ),
            ));
        }
        self.finish_body(p, hasher)
    }

    /// Reads the trailer of the pending record `p` and checks it against `hasher`.
    fn finish_body(&mut self, p: Pending, hasher: Xxh3) -> std::result::Result<(), ScanError> {
        let mut trailer = [0u8; RECORD_TRAILER_LEN];
        self.r
            .read_exact(&mut trailer)
            .map_err(|e| self.read_err(p.start, e))?;
        let (stored, actual) = (u64::from_be_bytes(trailer), hasher.digest());
        if stored != actual {
            return Err(self.err(
                ScanKind::Corrupt,
                p.start,
                format!("record LSN {}: record checksum mismatch (stored {stored:016x}, computed {actual:016x})", p.meta.lsn),
            ));
        }
        self.pos = p.start + p.total;
        self.prev = Some(p.meta);
        Ok(())
    }
}

/// Result of `scan_segment_bytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// Every complete, valid record, in order.
    pub records: Vec<RecordMeta>,
    /// Offset just after the last valid record.
    pub end: u64,
    /// Set when the bytes end inside a header or record (a torn tail), saying where and why.
    pub torn_tail: Option<String>,
}

/// Scans a whole segment held in memory (the fuzz target's entry into the scanner): validates the
/// header and every record. A torn tail is reported in `torn_tail`; invalid bytes are an error.
pub fn scan_segment_bytes(b: &[u8]) -> Result<SegmentScan> {
    let mut rd = SegmentReader::new(
        std::io::Cursor::new(b),
        "<memory>".into(),
        b.len() as u64,
        None,
    )
    .map_err(|e| e.error)?;
    let mut records = Vec::new();
    let mut torn_tail = None;
    loop {
        match rd.next_header() {
            Ok(None) => break,
            Ok(Some(_)) => {}
            Err(e) if e.kind == ScanKind::Torn => {
                torn_tail = Some(e.error.to_string());
                break;
            }
            Err(e) => return Err(e.error),
        }
        rd.read_body(&mut |_, _| Ok(())).map_err(|e| e.error)?;
        records.push(rd.last_meta().expect("just read").clone());
    }
    Ok(SegmentScan {
        header: *rd.header(),
        records,
        end: rd.position(),
        torn_tail,
    })
}

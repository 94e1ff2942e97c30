//! Snapshot files (FORMAT.md §5): `snap/<lsn:020>-<generation:010>.snap` = a segment header plus
//! exactly one SNAPSHOT record. Written atomically (tmp + fsync + rename + dir fsync), so a
//! snapshot file either is complete or does not exist. Reading validates everything a segment
//! reader does plus: the SNAPSHOT flag, the name matching the record, nothing after the record,
//! and the record's `db_checksum` against the pages (computed while streaming).

use super::checksum::DbChecksum;
use super::meta::{now_ms, sync_dir, write_and_sync};
use super::record::{
    decode_record_meta, encode_header, encode_record_with, record_len, validate_record,
};
use super::segment::{encode_segment_header, SegmentHeader, SegmentReader};
use super::{Log, Page, Record, RecordMeta};
use super::{RECORD_HEADER_LEN, RECORD_TRAILER_LEN, SEGMENT_HEADER_LEN};
use crate::error::{Error, Result};
use crate::types::{Generation, Lsn, PageNo};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// `<lsn as 20 digits>-<generation as 10 digits>.snap`
pub fn snapshot_file_name(lsn: Lsn, generation: Generation) -> String {
    format!("{:020}-{:010}.snap", lsn.0, generation.0)
}

/// Inverse of `snapshot_file_name`; `None` for any other name (tmp files included).
pub fn parse_snapshot_file_name(name: &str) -> Option<(Lsn, Generation)> {
    let stem = name.strip_suffix(".snap")?;
    let (l, g) = stem.split_once('-')?;
    let digits = |s: &str, n| s.len() == n && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(l, 20) || !digits(g, 10) {
        return None;
    }
    Some((Lsn(l.parse().ok()?), Generation(g.parse().ok()?)))
}

/// Snapshot files in `<dir>/snap`, sorted by (LSN, generation). A missing directory = none.
pub(crate) fn list_snapshots(dir: &Path) -> Result<Vec<(Lsn, Generation, PathBuf)>> {
    let snap_dir = dir.join("snap");
    let rd = match std::fs::read_dir(&snap_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", snap_dir.display()), e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("listing {}", snap_dir.display()), e))?;
        if let Some((l, g)) = ent.file_name().to_str().and_then(parse_snapshot_file_name) {
            out.push((l, g, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest snapshot with LSN <= `at_or_before` (None = any), with its validated header.
pub(crate) fn latest_snapshot_in(
    dir: &Path,
    at_or_before: Option<Lsn>,
) -> Result<Option<(RecordMeta, PathBuf)>> {
    let snaps = list_snapshots(dir)?;
    let Some((_, _, path)) = snaps
        .into_iter()
        .rev()
        .find(|(l, _, _)| at_or_before.is_none_or(|u| *l <= u))
    else {
        return Ok(None);
    };
    let (_, meta) = open_snapshot(&path)?;
    check_snapshot_meta(&path, &meta)?;
    Ok(Some((meta, path)))
}

/// Opens a snapshot file and decodes its (only) record header.
fn open_snapshot(
    path: &Path,
) -> Result<(SegmentReader<std::io::BufReader<std::fs::File>>, RecordMeta)> {
    let mut rd = SegmentReader::open(path).map_err(|e| e.error)?;
    match rd.next_header() {
        Ok(Some(m)) => Ok((rd, m)),
        Ok(None) => Err(Error::Corrupt(format!(
            "snapshot {} holds no record",
            path.display()
        ))),
        Err(e) => Err(e.error),
    }
}

fn check_snapshot_meta(path: &Path, meta: &RecordMeta) -> Result<()> {
    if !meta.snapshot {
        return Err(Error::Corrupt(format!(
            "snapshot {}: record LSN {} is not a SNAPSHOT record",
            path.display(),
            meta.lsn
        )));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_snapshot_file_name);
    if let Some((l, g)) = name {
        if (l, g) != (meta.lsn, meta.generation) {
            return Err(Error::Corrupt(format!(
                "snapshot {}: holds LSN {} generation {}, the file name says LSN {l} generation {g}",
                path.display(),
                meta.lsn,
                meta.generation
            )));
        }
    }
    Ok(())
}

/// Streams and fully validates a snapshot file, handing each page to `on_page`; returns its
/// metadata and the database checksum of its pages (already compared with `db_checksum`).
pub(crate) fn stream_snapshot(
    path: &Path,
    on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
) -> Result<(RecordMeta, DbChecksum)> {
    let (rd, meta) = open_snapshot(path)?;
    check_snapshot_meta(path, &meta)?;
    stream_body(rd, meta, &path.display().to_string(), on_page)
}

/// `stream_snapshot` with the validated record header handed to `on_meta` before any page.
pub fn stream_snapshot_file(
    path: &Path,
    on_meta: &mut dyn FnMut(&RecordMeta) -> Result<()>,
    on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
) -> Result<(RecordMeta, DbChecksum)> {
    let (rd, meta) = open_snapshot(path)?;
    check_snapshot_meta(path, &meta)?;
    on_meta(&meta)?;
    stream_body(rd, meta, &path.display().to_string(), on_page)
}

/// Copies the snapshot file at `path` (either record version) into `out` as an uncompressed
/// (version 1) snapshot file — segment header, SNAPSHOT record — page by page, for a client that
/// does not read compressed records (FORMAT.md §8.9). Every check of the source is made,
/// decompression included; on an error what was written to `out` must be discarded. Returns the
/// bytes written. Memory: one page plus the per-page checksums.
pub fn copy_snapshot_plain(path: &Path, out: &mut dyn std::io::Write) -> Result<u64> {
    struct Sink<'a> {
        out: &'a mut dyn std::io::Write,
        hasher: xxhash_rust::xxh3::Xxh3,
        written: u64,
    }
    impl Sink<'_> {
        fn put(&mut self, b: &[u8], hashed: bool) -> Result<()> {
            if hashed {
                self.hasher.update(b);
            }
            self.written += b.len() as u64;
            self.out
                .write_all(b)
                .map_err(|e| Error::io("writing the uncompressed snapshot copy", e))
        }
    }
    let mut seg = [0u8; super::SEGMENT_HEADER_LEN];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut seg))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let sink = std::cell::RefCell::new(Sink {
        out,
        hasher: xxhash_rust::xxh3::Xxh3::new(),
        written: 0,
    });
    sink.borrow_mut().put(&seg, false)?;
    stream_snapshot_file(
        path,
        &mut |m| {
            let total = record_len(m.page_size, m.page_count);
            sink.borrow_mut()
                .put(&encode_header(m, m.page_count, total), true)
        },
        &mut |pgno, data| {
            let mut s = sink.borrow_mut();
            s.put(&pgno.get().to_be_bytes(), true)?;
            s.put(data, true)
        },
    )?;
    let mut s = sink.into_inner();
    let trailer = s.hasher.digest().to_be_bytes();
    s.put(&trailer, false)?;
    Ok(s.written)
}

/// A reader that cannot seek: the snapshot stream is read front to back, and the segment
/// reader only seeks to skip records, which a snapshot stream never does.
struct NoSeek<R>(R);

impl<R: Read> Read for NoSeek<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R> Seek for NoSeek<R> {
    fn seek(&mut self, _: SeekFrom) -> std::io::Result<u64> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "a snapshot stream cannot seek",
        ))
    }
}

/// Streams a snapshot (segment header + one SNAPSHOT record, `len` bytes in all, as a primary
/// serves it) from `r`: `on_meta` gets the validated record header before any page, `on_page`
/// each page in order. Memory: one page plus the per-page checksums, whatever the size.
///
/// The pages are NOT trustworthy until this returns `Ok`: the record checksum and the
/// database checksum can only be checked at the end, so a consumer writes them where no
/// reader can see them and undoes everything on an error.
pub fn stream_snapshot_from<R: Read>(
    r: R,
    name: &str,
    len: u64,
    on_meta: &mut dyn FnMut(&RecordMeta) -> Result<()>,
    on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
) -> Result<(RecordMeta, DbChecksum)> {
    let mut rd = SegmentReader::new(NoSeek(r), name.to_string(), len, None).map_err(|e| e.error)?;
    let meta = match rd.next_header() {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(Error::Corrupt(format!("snapshot {name} holds no record")));
        }
        Err(e) => return Err(e.error),
    };
    if !meta.snapshot {
        return Err(Error::Corrupt(format!(
            "snapshot {name}: record LSN {} is not a SNAPSHOT record",
            meta.lsn
        )));
    }
    on_meta(&meta)?;
    stream_body(rd, meta, name, on_page)
}

fn stream_body<R: Read + Seek>(
    mut rd: SegmentReader<R>,
    meta: RecordMeta,
    name: &str,
    on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
) -> Result<(RecordMeta, DbChecksum)> {
    let mut sum = DbChecksum::new(meta.page_size);
    rd.read_body(&mut |pgno, data| {
        sum.set_page(pgno, data);
        on_page(pgno, data)
    })
    .map_err(|e| e.error)?;
    sum.truncate(meta.commit_size);
    match rd.next_header() {
        Ok(None) => {}
        Ok(Some(_)) | Err(_) => {
            return Err(Error::Corrupt(format!(
                "snapshot {name}: unexpected bytes after the snapshot record at offset {}",
                rd.position()
            )))
        }
    }
    if sum.total() != meta.db_checksum {
        return Err(Error::Corrupt(format!(
            "snapshot {name}: record LSN {}: database checksum mismatch (record says {}, pages give {})",
            meta.lsn,
            meta.db_checksum,
            sum.total()
        )));
    }
    Ok((meta, sum))
}

impl Log {
    /// Writes `r` (a SNAPSHOT record) as `snap/<lsn>-<generation>.snap`, atomically.
    pub fn write_snapshot(&self, r: &Record) -> Result<PathBuf> {
        if !r.meta.snapshot {
            return Err(Error::Misuse(format!(
                "write_snapshot: record LSN {} is not a SNAPSHOT record",
                r.meta.lsn
            )));
        }
        validate_record(r)?;
        let snap_dir = self.dir.join("snap");
        std::fs::create_dir_all(&snap_dir)
            .map_err(|e| Error::io(format!("creating {}", snap_dir.display()), e))?;
        let name = snapshot_file_name(r.meta.lsn, r.meta.generation);
        let path = snap_dir.join(&name);
        let tmp = snap_dir.join(format!("{name}.{}.tmp", std::process::id()));
        let mut bytes = encode_segment_header(&SegmentHeader {
            first_lsn: r.meta.lsn,
            created_ms: now_ms(),
        })
        .to_vec();
        bytes.extend_from_slice(&encode_record_with(r, self.config().compression));
        let res = write_and_sync(&tmp, &bytes).and_then(|()| {
            std::fs::rename(&tmp, &path)
                .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
        });
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&snap_dir)?;
        Ok(path)
    }

    /// The newest snapshot at or before `at_or_before` (None = the newest), header validated.
    pub fn latest_snapshot(
        &self,
        at_or_before: Option<Lsn>,
    ) -> Result<Option<(RecordMeta, PathBuf)>> {
        latest_snapshot_in(&self.dir, at_or_before)
    }

    /// Reads and fully validates a snapshot file (including its database checksum).
    pub fn read_snapshot(path: &Path) -> Result<Record> {
        let mut pages = Vec::new();
        let (meta, _) = stream_snapshot(path, &mut |pgno, data| {
            pages.push(Page {
                pgno,
                data: data.to_vec(),
            });
            Ok(())
        })?;
        Ok(Record { meta, pages })
    }
}

/// A snapshot partly received (a bootstrap resumed, WAL.md §E.1): the validated record header
/// and the first `entries` page entries, hashed as the record checksum and the database
/// checksum need them. `stream_snapshot_rest` continues from `offset()` in the snapshot file.
pub struct SnapshotPrefix {
    pub meta: RecordMeta,
    header: [u8; RECORD_HEADER_LEN],
    hasher: Xxh3,
    sums: DbChecksum,
    entries: u32,
}

impl SnapshotPrefix {
    /// From the 88 header bytes of a SNAPSHOT record (validated again: header checksum, fields).
    pub fn new(header: &[u8]) -> Result<SnapshotPrefix> {
        let (meta, _) = decode_record_meta(header)?;
        if !meta.snapshot || header.len() != RECORD_HEADER_LEN {
            return Err(Error::Corrupt(format!(
                "record LSN {}: not the header of a SNAPSHOT record",
                meta.lsn
            )));
        }
        // The record checksum covers the bytes as stored: a compressed snapshot's prefix cannot
        // be re-hashed from the decompressed pages on disk, so it is not resumed this way (a
        // replica downloads a compressed snapshot file as stored and resumes that copy).
        let flags = u16::from_be_bytes([header[6], header[7]]);
        if flags & super::FLAG_COMPRESSED != 0 {
            return Err(Error::Unsupported(format!(
                "record LSN {}: a compressed snapshot cannot be resumed; it starts over",
                meta.lsn
            )));
        }
        let mut hasher = Xxh3::new();
        hasher.update(header);
        Ok(SnapshotPrefix {
            sums: DbChecksum::new(meta.page_size),
            meta,
            header: header.try_into().expect("checked length"),
            hasher,
            entries: 0,
        })
    }

    /// The 88 header bytes.
    pub fn header(&self) -> &[u8; RECORD_HEADER_LEN] {
        &self.header
    }

    /// Page entries hashed so far.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The page number of entry `i` (0-based) of this snapshot: every page but the lock-byte one.
    pub fn pgno_of(&self, i: u32) -> PageNo {
        snapshot_entry_pgno(self.meta.page_size.lock_byte_page(), i)
    }

    /// Adds the next page entry (its page number is implied: `pgno_of(entries())`).
    pub fn push(&mut self, data: &[u8]) -> Result<()> {
        if self.entries >= self.meta.page_count || data.len() != self.meta.page_size.bytes() {
            return Err(Error::Corrupt(format!(
                "snapshot LSN {}: page entry {} does not fit the header ({} entries of {} bytes)",
                self.meta.lsn, self.entries, self.meta.page_count, self.meta.page_size
            )));
        }
        let pgno = self.pgno_of(self.entries);
        self.hasher.update(&pgno.get().to_be_bytes());
        self.hasher.update(data);
        self.sums.set_page(pgno, data);
        self.entries += 1;
        Ok(())
    }

    /// Byte offset in the snapshot file (segment header included) where entry `entries()` starts.
    pub fn offset(&self) -> u64 {
        (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64
            + self.entries as u64 * (4 + self.meta.page_size.bytes() as u64)
    }

    /// Length of the whole snapshot file (segment header + the record).
    pub fn file_len(&self) -> u64 {
        SEGMENT_HEADER_LEN as u64
            + super::record::record_len(self.meta.page_size, self.meta.page_count)
    }

    /// Identity of the snapshot for HTTP (`ETag`, `If-Range`): LSN, generation and the header
    /// checksum, which covers the database checksum, the length and the capture time.
    pub fn etag(&self) -> String {
        snapshot_etag(&self.header)
    }
}

/// `"<lsn>-<generation>-<header checksum as 16 hex digits>"` of a snapshot's record header
/// (FORMAT.md §8.4): changes whenever the snapshot served changes.
pub fn snapshot_etag(header: &[u8]) -> String {
    let be = |a: usize, n: usize| {
        header[a..a + n]
            .iter()
            .fold(0u64, |v, b| v << 8 | *b as u64)
    };
    format!(
        "\"{}-{}-{:016x}\"",
        be(16, 8),
        be(24, 4),
        be(RECORD_HEADER_LEN - 8, 8)
    )
}

/// The 88-byte record header of a SNAPSHOT record with `meta` (as it was encoded: every field
/// of the header is in `RecordMeta`).
pub fn snapshot_header(meta: &RecordMeta) -> [u8; RECORD_HEADER_LEN] {
    super::record::encode_header(
        meta,
        meta.page_count,
        super::record::record_len(meta.page_size, meta.page_count),
    )
}

/// Page number of entry `i` (0-based) of a SNAPSHOT record: pages in order, lock-byte page skipped.
pub fn snapshot_entry_pgno(lock_byte: PageNo, i: u32) -> PageNo {
    let p = i + 1;
    let p = if p >= lock_byte.get() { p + 1 } else { p };
    PageNo::new(p).expect("p >= 1")
}

/// Continues a snapshot from `prefix.offset()`: `r` yields the rest of the snapshot file (the
/// remaining page entries and the trailer, nothing more). Every entry's page number is checked,
/// the record checksum over header + all entries (the prefix's included) and the database
/// checksum at the end: as with `stream_snapshot_from`, the pages are only trustworthy once
/// this returns `Ok`.
pub fn stream_snapshot_rest<R: Read>(
    mut r: R,
    name: &str,
    mut prefix: SnapshotPrefix,
    on_page: &mut dyn FnMut(PageNo, &[u8]) -> Result<()>,
) -> Result<(RecordMeta, DbChecksum)> {
    let meta = prefix.meta.clone();
    let ps = meta.page_size.bytes();
    let mut buf = vec![0u8; 4 + ps];
    let io = |e: std::io::Error, at: u64| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Corrupt(format!(
                "snapshot {name}: cut short at offset {at} (the resumed part ends early)"
            ))
        } else {
            Error::io(format!("reading snapshot {name} at offset {at}"), e)
        }
    };
    while prefix.entries < meta.page_count {
        let at = prefix.offset();
        r.read_exact(&mut buf).map_err(|e| io(e, at))?;
        let want = prefix.pgno_of(prefix.entries);
        let raw = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
        if raw != want.get() {
            return Err(Error::Corrupt(format!(
                "snapshot {name}: record LSN {}: entry at offset {at} holds page {raw}, expected page {want}",
                meta.lsn
            )));
        }
        prefix.push(&buf[4..])?;
        on_page(want, &buf[4..])?;
    }
    let mut trailer = [0u8; RECORD_TRAILER_LEN];
    let at = prefix.offset();
    r.read_exact(&mut trailer).map_err(|e| io(e, at))?;
    let (stored, actual) = (u64::from_be_bytes(trailer), prefix.hasher.digest());
    if stored != actual {
        return Err(Error::Corrupt(format!(
            "snapshot {name}: record LSN {}: record checksum mismatch (stored {stored:016x}, computed {actual:016x})",
            meta.lsn
        )));
    }
    let mut sums = prefix.sums;
    sums.truncate(meta.commit_size);
    if sums.total() != meta.db_checksum {
        return Err(Error::Corrupt(format!(
            "snapshot {name}: record LSN {}: database checksum mismatch (record says {}, pages give {})",
            meta.lsn,
            meta.db_checksum,
            sums.total()
        )));
    }
    Ok((meta, sums))
}

#[cfg(test)]
mod resume_tests {
    use super::*;
    use crate::types::{Checksum, PageSize};

    fn snap(pages: u32) -> Vec<u8> {
        let ps = PageSize::new(512).unwrap();
        let pages: Vec<Page> = (1..=pages)
            .map(|p| Page {
                pgno: PageNo::new(p).unwrap(),
                data: vec![p as u8; 512],
            })
            .collect();
        let sums = DbChecksum::from_pages(ps, pages.len() as u32, &pages);
        let meta = RecordMeta {
            lsn: Lsn(7),
            generation: Generation(1),
            snapshot: true,
            page_size: ps,
            commit_size: pages.len() as u32,
            timestamp_ms: 1,
            wal_salts: [0; 8],
            wal_frame: 0,
            wal_cksum: (0, 0),
            db_checksum: Checksum(sums.total().0),
            page_count: pages.len() as u32,
            epoch: crate::types::Epoch::FIRST,
        };
        let mut b = encode_segment_header(&SegmentHeader {
            first_lsn: Lsn(7),
            created_ms: 1,
        })
        .to_vec();
        b.extend_from_slice(&crate::txlog::encode_record(&Record { meta, pages }));
        b
    }

    #[test]
    fn resumes_at_any_entry_and_catches_a_bad_byte() {
        let b = snap(10);
        let hdr = &b[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + RECORD_HEADER_LEN];
        for k in 0..=10u32 {
            let mut p = SnapshotPrefix::new(hdr).unwrap();
            for i in 0..k {
                p.push(&[i as u8 + 1; 512]).unwrap();
            }
            let off = p.offset() as usize;
            assert_eq!(p.file_len() as usize, b.len());
            let mut got = Vec::new();
            let (m, s) = stream_snapshot_rest(&b[off..], "t", p, &mut |pg, _| {
                got.push(pg.get());
                Ok(())
            })
            .unwrap();
            assert_eq!(s.total(), m.db_checksum);
            assert_eq!(got, (k + 1..=10).collect::<Vec<_>>());
        }
        // A flipped byte in the resumed part, and one in the prefix taken from disk.
        let mut bad = b.clone();
        let at = bad.len() - 100;
        bad[at] ^= 0xff;
        let mut p = SnapshotPrefix::new(hdr).unwrap();
        p.push(&[1; 512]).unwrap();
        let off = p.offset() as usize;
        assert!(matches!(
            stream_snapshot_rest(&bad[off..], "t", p, &mut |_, _| Ok(())),
            Err(Error::Corrupt(_))
        ));
        let mut p = SnapshotPrefix::new(hdr).unwrap();
        p.push(&[9; 512]).unwrap();
        let off = p.offset() as usize;
        assert!(stream_snapshot_rest(&b[off..], "t", p, &mut |_, _| Ok(())).is_err());
        // Cut short.
        let p = SnapshotPrefix::new(hdr).unwrap();
        let off = p.offset() as usize;
        assert!(stream_snapshot_rest(&b[off..b.len() - 3], "t", p, &mut |_, _| Ok(())).is_err());
    }

    #[test]
    fn entry_numbers_skip_the_lock_byte_page() {
        let lb = PageNo::new(5).unwrap();
        let got: Vec<u32> = (0..6).map(|i| snapshot_entry_pgno(lb, i).get()).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 6, 7]);
    }
}

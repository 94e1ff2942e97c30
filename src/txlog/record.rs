//! The record codec (FORMAT.md §3): the 88-byte header, page entries and the checksum trailer.
//! `encode_record` writes exactly the layout of §3.1–§3.3; `decode_record_meta` validates the
//! header alone (enough to skip a record), `decode_record` validates everything in the order of
//! §3.4. `PageOrder` and `parse_header` are shared with the streaming scanner in `segment.rs`
//! so both paths reject exactly the same bytes.

use super::compress::{compress_page, decompress_page, Compression, CODEC_LZ4, CODEC_ZSTD};
use super::{Page, Record, RecordMeta};
use crate::error::{Error, Result};
use crate::types::{Checksum, Epoch, Generation, Lsn, PageNo, PageSize};
use xxhash_rust::xxh3::xxh3_64;

/// ASCII `RPLR`.
pub const RECORD_MAGIC: [u8; 4] = *b"RPLR";
/// Record format version of uncompressed records (written whenever compression is off, so
/// older readers keep reading such logs).
pub const RECORD_VERSION: u16 = 1;
/// Record format version of compressed records (§3.7): FLAG_COMPRESSED set, a codec id in
/// byte 68, and each page entry carries its stored length. This build reads both versions.
pub const RECORD_VERSION_COMPRESSED: u16 = 2;
/// Record format version of records written by a primary of epoch 2 or later (a promoted
/// replica, `repl_promote()`): the layout of version 1 (or, with FLAG_COMPRESSED, of version 2
/// with the codec in the flags' high byte), and bytes 68..72 hold the epoch. Records of epoch 1
/// keep versions 1 and 2, byte for byte, so an epoch-1 log stays readable by older builds.
pub const RECORD_VERSION_EPOCH: u16 = 3;
/// Size of the record header (§3.1).
pub const RECORD_HEADER_LEN: usize = 88;
/// Size of the record trailer (§3.3).
pub const RECORD_TRAILER_LEN: usize = 8;
/// Flag bit 0: the record holds the complete database.
pub const FLAG_SNAPSHOT: u16 = 1;
/// Flag bit 1: the page entries are compressed (§3.7); set exactly in version-2 records.
pub const FLAG_COMPRESSED: u16 = 2;

/// Offset of `header_checksum` (§3.1): the header checksum covers bytes 0..80.
const HEADER_CHECKSUM_AT: usize = 80;
/// Per-page overhead of a page entry (the `pgno` field, §3.2).
const PAGE_ENTRY_OVERHEAD: u64 = 4;
/// Per-page overhead of a compressed page entry (`pgno` and `stored_len`, §3.7).
pub(crate) const COMPRESSED_ENTRY_OVERHEAD: usize = 8;

/// The smallest and largest total length a compressed record of `page_count` pages can have.
pub(crate) fn compressed_len_bounds(page_size: PageSize, page_count: u32) -> (u64, u64) {
    let n = u64::from(page_count);
    let fixed = (RECORD_HEADER_LEN + RECORD_TRAILER_LEN) as u64;
    let entry = COMPRESSED_ENTRY_OVERHEAD as u64;
    (
        fixed + n * (entry + 1),
        fixed + n * (entry + u64::from(page_size.get())),
    )
}

/// Total encoded length of a record with `page_count` pages: `88 + n × (4 + page_size) + 8`.
pub fn record_len(page_size: PageSize, page_count: u32) -> u64 {
    RECORD_HEADER_LEN as u64
        + u64::from(page_count) * (PAGE_ENTRY_OVERHEAD + u64::from(page_size.get()))
        + RECORD_TRAILER_LEN as u64
}

/// Number of pages a complete database of `commit_size` pages holds (the lock-byte page excluded).
pub(crate) fn full_page_count(page_size: PageSize, commit_size: u32) -> u32 {
    if page_size.lock_byte_page().get() <= commit_size {
        commit_size - 1
    } else {
        commit_size
    }
}

fn label(lsn: Option<Lsn>) -> String {
    match lsn {
        Some(l) => format!("record LSN {l}"),
        None => "record".to_string(),
    }
}

/// An `Error::Corrupt` naming the record (and its LSN once known).
pub(crate) fn corrupt(lsn: Option<Lsn>, msg: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{}: {msg}", label(lsn)))
}

/// Checks the invariants `encode_record` relies on (always cheap: no page data is hashed).
/// `Log::append` and `Log::write_snapshot` call it in every build; `encode_record` in debug.
pub fn validate_record(r: &Record) -> Result<()> {
    let m = &r.meta;
    let bad = |msg: String| Error::Misuse(format!("invalid record LSN {}: {msg}", m.lsn));
    if m.commit_size == 0 {
        return Err(bad("commit size is 0".into()));
    }
    if m.page_count as usize != r.pages.len() {
        return Err(bad(format!(
            "page_count {} but {} pages",
            m.page_count,
            r.pages.len()
        )));
    }
    let full = full_page_count(m.page_size, m.commit_size);
    if m.snapshot && m.page_count != full {
        return Err(bad(format!(
            "SNAPSHOT holds {} pages but a database of {} pages has {full}",
            m.page_count, m.commit_size
        )));
    }
    let mut order = PageOrder::new(m);
    for p in &r.pages {
        if p.data.len() != m.page_size.bytes() {
            return Err(bad(format!(
                "page {} has {} bytes, page size is {}",
                p.pgno,
                p.data.len(),
                m.page_size
            )));
        }
        order.check(p.pgno.get()).map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

/// Encodes `r` uncompressed (FORMAT.md §3, version 1); see `encode_record_with`.
pub fn encode_record(r: &Record) -> Vec<u8> {
    encode_record_with(r, Compression::None)
}

/// Encodes `r` (FORMAT.md §3): version 1 when `c` is `None`, else a compressed version-2 record
/// (§3.7). Validates the invariants with `validate_record` in debug builds (panicking on
/// violation); release builds trust the caller (`Log::append` validates).
pub fn encode_record_with(r: &Record, c: Compression) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record_into(r, c, &mut out);
    out
}

/// `encode_record_with`, appending the record's bytes to `out` (a batch of records encoded
/// into one buffer, with no per-record allocation or copy).
pub fn encode_record_into(r: &Record, c: Compression, out: &mut Vec<u8>) {
    if cfg!(debug_assertions) {
        if let Err(e) = validate_record(r) {
            panic!("encode_record: {e}");
        }
    }
    let start = out.len();
    let m = &r.meta;
    let page_count = r.pages.len() as u32;
    let codec = c.codec();
    match codec {
        None => {
            let total = record_len(m.page_size, page_count);
            out.reserve(total as usize);
            out.extend_from_slice(&encode_header(m, page_count, total));
            for p in &r.pages {
                out.extend_from_slice(&p.pgno.get().to_be_bytes());
                out.extend_from_slice(&p.data);
            }
        }
        Some(_) => {
            out.reserve(RECORD_HEADER_LEN + r.pages.len() * 1024);
            out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
            for p in &r.pages {
                out.extend_from_slice(&p.pgno.get().to_be_bytes());
                match compress_page(c, &p.data) {
                    Some(z) => {
                        out.extend_from_slice(&(z.len() as u32).to_be_bytes());
                        out.extend_from_slice(&z);
                    }
                    None => {
                        out.extend_from_slice(&(p.data.len() as u32).to_be_bytes());
                        out.extend_from_slice(&p.data);
                    }
                }
            }
            let total = (out.len() - start + RECORD_TRAILER_LEN) as u64;
            out[start..start + RECORD_HEADER_LEN]
                .copy_from_slice(&encode_header_codec(m, page_count, total, codec));
        }
    }
    let sum = xxh3_64(&out[start..]);
    out.extend_from_slice(&sum.to_be_bytes());
}

/// The 88-byte header of §3.1, `header_checksum` included.
pub(crate) fn encode_header(
    m: &RecordMeta,
    page_count: u32,
    total: u64,
) -> [u8; RECORD_HEADER_LEN] {
    encode_header_codec(m, page_count, total, None)
}

/// `encode_header` of a version-2 record when `codec` is set (§3.7).
pub(crate) fn encode_header_codec(
    m: &RecordMeta,
    page_count: u32,
    total: u64,
    codec: Option<u8>,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    let with_epoch = m.epoch != Epoch::FIRST;
    let version = match codec {
        _ if with_epoch => RECORD_VERSION_EPOCH,
        Some(_) => RECORD_VERSION_COMPRESSED,
        None => RECORD_VERSION,
    };
    h[4..6].copy_from_slice(&version.to_be_bytes());
    let mut flags = if m.snapshot { FLAG_SNAPSHOT } else { 0 };
    if let Some(c) = codec {
        flags |= FLAG_COMPRESSED;
        if with_epoch {
            flags |= u16::from(c) << 8;
        }
    }
    h[6..8].copy_from_slice(&flags.to_be_bytes());
    h[8..16].copy_from_slice(&total.to_be_bytes());
    h[16..24].copy_from_slice(&m.lsn.0.to_be_bytes());
    h[24..28].copy_from_slice(&m.generation.0.to_be_bytes());
    h[28..32].copy_from_slice(&m.page_size.get().to_be_bytes());
    h[32..36].copy_from_slice(&m.commit_size.to_be_bytes());
    h[36..40].copy_from_slice(&page_count.to_be_bytes());
    h[40..48].copy_from_slice(&m.timestamp_ms.to_be_bytes());
    h[48..56].copy_from_slice(&m.wal_salts);
    h[56..60].copy_from_slice(&m.wal_frame.to_be_bytes());
    h[60..64].copy_from_slice(&m.wal_cksum.0.to_be_bytes());
    h[64..68].copy_from_slice(&m.wal_cksum.1.to_be_bytes());
    if with_epoch {
        // 68..72: the epoch (version 3)
        h[68..72].copy_from_slice(&m.epoch.0.to_be_bytes());
    } else {
        // 68: codec (version 2), 69..72 reserved = 0
        h[68] = codec.unwrap_or(0);
    }
    h[72..80].copy_from_slice(&m.db_checksum.0.to_be_bytes());
    let sum = xxh3_64(&h[..HEADER_CHECKSUM_AT]);
    h[HEADER_CHECKSUM_AT..].copy_from_slice(&sum.to_be_bytes());
    h
}

pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Validates a complete 88-byte header (rules 2–5 of §3.4, §3.7) and returns the metadata, the
/// total record length and the codec of a compressed record. `h` must hold at least
/// `RECORD_HEADER_LEN` bytes.
pub(crate) fn parse_header(h: &[u8]) -> Result<(RecordMeta, u64, Option<u8>)> {
    if h[0..4] != RECORD_MAGIC {
        return Err(corrupt(
            None,
            format!(
                "bad magic {:02x?} (expected {:02x?} \"RPLR\")",
                &h[0..4],
                RECORD_MAGIC
            ),
        ));
    }
    let version = be_u16(h, 4);
    if version != RECORD_VERSION
        && version != RECORD_VERSION_COMPRESSED
        && version != RECORD_VERSION_EPOCH
    {
        return Err(corrupt(
            None,
            format!(
                "unsupported record format version {version} (this build reads versions \
                 {RECORD_VERSION} to {RECORD_VERSION_EPOCH}); upgrade sqlite-replica"
            ),
        ));
    }
    let claimed = Lsn(be_u64(h, 16));
    let stored = be_u64(h, HEADER_CHECKSUM_AT);
    let actual = xxh3_64(&h[..HEADER_CHECKSUM_AT]);
    if stored != actual {
        return Err(corrupt(
            None,
            format!(
                "header checksum mismatch (stored {stored:016x}, computed {actual:016x}; \
                 claimed LSN {claimed})"
            ),
        ));
    }
    let lsn = Some(claimed);
    let flags = be_u16(h, 6);
    let with_epoch = version == RECORD_VERSION_EPOCH;
    let compressed =
        version == RECORD_VERSION_COMPRESSED || (with_epoch && flags & FLAG_COMPRESSED != 0);
    if flags & FLAG_COMPRESSED != 0 && !compressed {
        return Err(corrupt(
            lsn,
            "COMPRESSED flag set: compression is not supported in format version 1",
        ));
    }
    if compressed && flags & FLAG_COMPRESSED == 0 {
        return Err(corrupt(lsn, "format version 2 without the COMPRESSED flag"));
    }
    // Version 3 keeps the codec of a compressed record in the flags' high byte.
    let codec_flags = if with_epoch && compressed { 0xff00 } else { 0 };
    if flags & !(FLAG_SNAPSHOT | FLAG_COMPRESSED | codec_flags) != 0 {
        return Err(corrupt(lsn, format!("unknown flags 0x{flags:04x}")));
    }
    let raw_codec = if with_epoch {
        (flags >> 8) as u8
    } else {
        h[68]
    };
    let codec = if compressed {
        match raw_codec {
            c @ (CODEC_ZSTD | CODEC_LZ4) => Some(c),
            c => {
                return Err(corrupt(
                    lsn,
                    format!("unknown compression codec {c} (this build knows 1 = zstd, 2 = lz4)"),
                ))
            }
        }
    } else {
        None
    };
    let epoch = if with_epoch {
        let e = be_u32(h, 68);
        if e < 2 {
            return Err(corrupt(
                lsn,
                format!("epoch {e} in a version-3 record (epoch 1 is written as version 1 or 2)"),
            ));
        }
        Epoch(e)
    } else {
        let reserved = if compressed {
            be_u32(h, 68) & 0x00ff_ffff
        } else {
            be_u32(h, 68)
        };
        if reserved != 0 {
            return Err(corrupt(
                lsn,
                format!("reserved field is 0x{reserved:08x}, must be 0"),
            ));
        }
        Epoch::FIRST
    };
    let raw_page_size = be_u32(h, 28);
    let page_size = PageSize::new(raw_page_size).ok_or_else(|| {
        corrupt(
            lsn,
            format!("invalid page size {raw_page_size} (must be a power of two in 512..=65536)"),
        )
    })?;
    let commit_size = be_u32(h, 32);
    if commit_size == 0 {
        return Err(corrupt(lsn, "commit size is 0"));
    }
    let page_count = be_u32(h, 36);
    let snapshot = flags & FLAG_SNAPSHOT != 0;
    let full = full_page_count(page_size, commit_size);
    if page_count > full {
        return Err(corrupt(
            lsn,
            format!(
                "page count {page_count} exceeds the {full} pages of a {commit_size}-page database"
            ),
        ));
    }
    if snapshot && page_count != full {
        return Err(corrupt(
            lsn,
            format!(
                "SNAPSHOT holds {page_count} pages but a {commit_size}-page database has {full}"
            ),
        ));
    }
    let total = be_u64(h, 8);
    if compressed {
        let (lo, hi) = compressed_len_bounds(page_size, page_count);
        if total < lo || total > hi {
            return Err(corrupt(
                lsn,
                format!(
                    "compressed record length {total} outside {lo}..={hi} for {page_count} pages \
                     of {page_size} bytes"
                ),
            ));
        }
    }
    let expected = record_len(page_size, page_count);
    if !compressed && total != expected {
        return Err(corrupt(
            lsn,
            format!(
                "record length {total} inconsistent with {page_count} pages of {page_size} bytes \
                 (expected {expected})"
            ),
        ));
    }
    let meta = RecordMeta {
        lsn: claimed,
        generation: Generation(be_u32(h, 24)),
        snapshot,
        page_size,
        commit_size,
        timestamp_ms: be_u64(h, 40),
        wal_salts: h[48..56].try_into().expect("8 bytes"),
        wal_frame: be_u32(h, 56),
        wal_cksum: (be_u32(h, 60), be_u32(h, 64)),
        db_checksum: Checksum(be_u64(h, 72)),
        page_count,
        epoch,
    };
    Ok((meta, total, codec))
}

/// The codec of the record whose header starts `h` (None: uncompressed), the header validated.
pub fn record_codec(h: &[u8]) -> Result<Option<u8>> {
    if h.len() < RECORD_HEADER_LEN {
        return Err(corrupt(None, "truncated header"));
    }
    Ok(parse_header(&h[..RECORD_HEADER_LEN])?.2)
}

/// Validates only the header of the record at the start of `b` (which may hold just the header)
/// and returns its metadata and total record length, so a reader can skip or stream it.
pub fn decode_record_meta(b: &[u8]) -> Result<(RecordMeta, usize)> {
    if b.len() < RECORD_HEADER_LEN {
        return Err(corrupt(
            None,
            format!(
                "truncated header: {} of {RECORD_HEADER_LEN} bytes available",
                b.len()
            ),
        ));
    }
    let (meta, total, _) = parse_header(&b[..RECORD_HEADER_LEN])?;
    let total = usize::try_from(total)
        .map_err(|_| corrupt(Some(meta.lsn), format!("record length {total} too large")))?;
    Ok((meta, total))
}

/// Decodes and fully validates the record at the start of `b`; returns it and the bytes consumed.
pub fn decode_record(b: &[u8]) -> Result<(Record, usize)> {
    let (meta, total) = decode_record_meta(b)?;
    let codec = parse_header(&b[..RECORD_HEADER_LEN])?.2;
    let lsn = Some(meta.lsn);
    if b.len() < total {
        return Err(corrupt(
            lsn,
            format!("truncated: {total} bytes needed, {} available", b.len()),
        ));
    }
    let body_end = total - RECORD_TRAILER_LEN;
    let stored = be_u64(b, body_end);
    let actual = xxh3_64(&b[..body_end]);
    if stored != actual {
        return Err(corrupt(
            lsn,
            format!("record checksum mismatch (stored {stored:016x}, computed {actual:016x})"),
        ));
    }
    let ps = meta.page_size.bytes();
    let mut order = PageOrder::new(&meta);
    let mut pages = Vec::with_capacity(meta.page_count as usize);
    let mut at = RECORD_HEADER_LEN;
    if let Some(codec) = codec {
        for _ in 0..meta.page_count {
            if at + COMPRESSED_ENTRY_OVERHEAD > body_end {
                return Err(corrupt(
                    lsn,
                    format!("page entry at offset {at} runs past the record"),
                ));
            }
            let pgno = order.check(be_u32(b, at))?;
            let stored = check_stored_len(lsn, be_u32(b, at + 4), ps, at)?;
            let start = at + COMPRESSED_ENTRY_OVERHEAD;
            if start + stored > body_end {
                return Err(corrupt(
                    lsn,
                    format!("page entry at offset {at} runs past the record"),
                ));
            }
            let data = page_data(lsn, codec, &b[start..start + stored], ps, pgno)?;
            pages.push(Page { pgno, data });
            at = start + stored;
        }
        if at != body_end {
            return Err(corrupt(
                lsn,
                format!("{} bytes after the last page entry", body_end - at),
            ));
        }
        return Ok((Record { meta, pages }, total));
    }
    for _ in 0..meta.page_count {
        let pgno = order.check(be_u32(b, at))?;
        pages.push(Page {
            pgno,
            data: b[at + 4..at + 4 + ps].to_vec(),
        });
        at += 4 + ps;
    }
    debug_assert_eq!(at, body_end);
    Ok((Record { meta, pages }, total))
}

/// Checks a compressed entry's `stored_len` (§3.7): 1..=page size (equal: stored raw). A
/// larger claim is refused before anything is read or allocated for it.
pub(crate) fn check_stored_len(lsn: Option<Lsn>, len: u32, ps: usize, at: usize) -> Result<usize> {
    let len = len as usize;
    if len == 0 || len > ps {
        return Err(corrupt(
            lsn,
            format!(
                "page entry at offset {at} claims {len} stored bytes (must be 1..={ps}, the page size)"
            ),
        ));
    }
    Ok(len)
}

/// The page image of a compressed entry: the bytes themselves when stored raw, else decompressed
/// to exactly the page size.
pub(crate) fn page_data(
    lsn: Option<Lsn>,
    codec: u8,
    stored: &[u8],
    ps: usize,
    pgno: PageNo,
) -> Result<Vec<u8>> {
    if stored.len() == ps {
        return Ok(stored.to_vec());
    }
    decompress_page(codec, stored, ps).map_err(|e| corrupt(lsn, format!("page {pgno}: {e}")))
}

/// Checks page numbers one entry at a time (rule 7 of §3.4).
pub(crate) struct PageOrder {
    lsn: Lsn,
    commit_size: u32,
    lock_byte: u32,
    prev: u32,
}

impl PageOrder {
    pub(crate) fn new(meta: &RecordMeta) -> PageOrder {
        PageOrder {
            lsn: meta.lsn,
            commit_size: meta.commit_size,
            lock_byte: meta.page_size.lock_byte_page().get(),
            prev: 0,
        }
    }

    pub(crate) fn check(&mut self, raw: u32) -> Result<PageNo> {
        let lsn = Some(self.lsn);
        let pgno = PageNo::new(raw).ok_or_else(|| corrupt(lsn, "page number 0"))?;
        if raw <= self.prev {
            let what = if raw == self.prev {
                "duplicate"
            } else {
                "unsorted"
            };
            return Err(corrupt(
                lsn,
                format!("pages {what}: page {raw} follows page {}", self.prev),
            ));
        }
        if raw > self.commit_size {
            return Err(corrupt(
                lsn,
                format!("page {raw} is beyond the commit size {}", self.commit_size),
            ));
        }
        if raw == self.lock_byte {
            return Err(corrupt(lsn, format!("page {raw} is the lock-byte page")));
        }
        self.prev = raw;
        Ok(pgno)
    }
}

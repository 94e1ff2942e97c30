//! The WAL file format (WAL.md §A.1–§A.3): the 32-byte WAL header, 24-byte frame headers and
//! the cumulative frame checksum chain, as pure byte encoders/decoders.
//!
//! Owns: `WalHeader`, `FrameHeader`, `frame_offset`, `frame_cksum`, `encode_frame` and the
//! WAL constants. Reading frames from a file lives in `reader`.
//!
//! Invariants:
//! - Every on-disk integer is big-endian; the checksum *word order* comes from the magic
//!   (`WAL_MAGIC_BE` = BE words, `WAL_MAGIC_LE` = LE words), never from the host.
//! - Salts are raw bytes (header bytes 16..24), compared byte-for-byte with frame bytes 8..16.
//! - A frame is valid iff salts equal the header's, its page number is non-zero and its stored
//!   checksum equals the running checksum extended over header bytes 0..8 and the page.
//! - Header validation follows SQLite's order: magic, page size, checksum, then version; only
//!   a bad version under a good checksum makes SQLite refuse to open (everything else makes it
//!   treat the WAL as empty).

use super::checksum::{cksum_extend, CksumPair};
use crate::error::{Error, Result};
use crate::types::PageSize;

/// Size of the WAL file header.
pub const WAL_HEADER_SIZE: usize = 32;
/// Size of each frame header.
pub const FRAME_HEADER_SIZE: usize = 24;
/// Magic selecting little-endian checksum words.
pub const WAL_MAGIC_LE: u32 = 0x377f_0682;
/// Magic selecting big-endian checksum words.
pub const WAL_MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version SQLite accepts.
pub const WAL_VERSION: u32 = 3_007_000;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The decoded 32-byte WAL header (WAL.md §A.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// True when the magic is `WAL_MAGIC_BE` (checksum words decoded big-endian).
    pub big_endian_cksum: bool,
    pub page_size: PageSize,
    pub ckpt_seq: u32,
    /// Raw header bytes 16..24 (salt-1, salt-2).
    pub salts: [u8; 8],
    /// The header checksum; also the running checksum state before frame 1.
    pub cksum: CksumPair,
}

/// Why a header was rejected: `Ignored` = SQLite treats the WAL as empty; `Refused` = SQLite
/// would fail to open the database (good checksum, unknown version).
enum HeaderProblem {
    Ignored(String),
    Refused(String),
}

impl HeaderProblem {
    fn into_error(self) -> Error {
        match self {
            HeaderProblem::Ignored(m) | HeaderProblem::Refused(m) => Error::Corrupt(m),
        }
    }
}

impl WalHeader {
    /// Validates magic, page size, header checksum and version (in SQLite's order). Every
    /// failure is `Error::Corrupt`; a wrong version with a good checksum says SQLite would
    /// refuse to open the database (see `parse_for_recovery` to tell the cases apart).
    pub fn parse(b: &[u8]) -> Result<WalHeader> {
        Self::parse_inner(b).map_err(HeaderProblem::into_error)
    }

    /// Header check as recovery does it (WAL.md §A.6 step 1): `Ok(None)` when SQLite would treat
    /// the WAL as empty (short, bad magic, bad page size, bad checksum); `Err` when it would refuse
    /// to open (valid checksum, unknown version).
    pub fn parse_for_recovery(b: &[u8]) -> Result<Option<WalHeader>> {
        match Self::parse_inner(b) {
            Ok(h) => Ok(Some(h)),
            Err(HeaderProblem::Ignored(_)) => Ok(None),
            Err(p @ HeaderProblem::Refused(_)) => Err(p.into_error()),
        }
    }

    fn parse_inner(b: &[u8]) -> std::result::Result<WalHeader, HeaderProblem> {
        if b.len() < WAL_HEADER_SIZE {
            return Err(HeaderProblem::Ignored(format!(
                "WAL header too short: {} bytes, need {WAL_HEADER_SIZE}",
                b.len()
            )));
        }
        let magic = be32(b, 0);
        let big_endian_cksum = match magic {
            WAL_MAGIC_LE => false,
            WAL_MAGIC_BE => true,
            other => {
                return Err(HeaderProblem::Ignored(format!(
                    "WAL header magic {other:#010x} is not {WAL_MAGIC_LE:#010x}/{WAL_MAGIC_BE:#010x}: not a WAL file"
                )))
            }
        };
        let raw_page_size = be32(b, 8);
        let page_size = PageSize::new(raw_page_size).ok_or_else(|| {
            HeaderProblem::Ignored(format!(
                "WAL header page size {raw_page_size} is not a power of two in 512..=65536"
            ))
        })?;
        let cksum = cksum_extend((0, 0), &b[0..24], big_endian_cksum);
        let stored = (be32(b, 24), be32(b, 28));
        if cksum != stored {
            return Err(HeaderProblem::Ignored(format!(
                "WAL header checksum mismatch: stored {:08x}/{:08x}, computed {:08x}/{:08x}; SQLite treats this WAL as empty",
                stored.0, stored.1, cksum.0, cksum.1
            )));
        }
        let version = be32(b, 4);
        if version != WAL_VERSION {
            return Err(HeaderProblem::Refused(format!(
                "WAL format version {version} (expected {WAL_VERSION}) with a valid checksum: SQLite would refuse to open this database (SQLITE_CANTOPEN)"
            )));
        }
        let mut salts = [0u8; 8];
        salts.copy_from_slice(&b[16..24]);
        Ok(WalHeader {
            big_endian_cksum,
            page_size,
            ckpt_seq: be32(b, 12),
            salts,
            cksum,
        })
    }

    /// Builds header bytes with the checksum computed; returns them with the decoded header.
    pub fn encode(
        big_endian_cksum: bool,
        page_size: PageSize,
        ckpt_seq: u32,
        salts: [u8; 8],
    ) -> ([u8; WAL_HEADER_SIZE], WalHeader) {
        let mut b = [0u8; WAL_HEADER_SIZE];
        let magic = if big_endian_cksum {
            WAL_MAGIC_BE
        } else {
            WAL_MAGIC_LE
        };
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..8].copy_from_slice(&WAL_VERSION.to_be_bytes());
        b[8..12].copy_from_slice(&page_size.get().to_be_bytes());
        b[12..16].copy_from_slice(&ckpt_seq.to_be_bytes());
        b[16..24].copy_from_slice(&salts);
        let cksum = cksum_extend((0, 0), &b[0..24], big_endian_cksum);
        b[24..28].copy_from_slice(&cksum.0.to_be_bytes());
        b[28..32].copy_from_slice(&cksum.1.to_be_bytes());
        (
            b,
            WalHeader {
                big_endian_cksum,
                page_size,
                ckpt_seq,
                salts,
                cksum,
            },
        )
    }

    /// The header's bytes (re-encoded; identical to what `encode` produced).
    pub fn to_bytes(&self) -> [u8; WAL_HEADER_SIZE] {
        Self::encode(
            self.big_endian_cksum,
            self.page_size,
            self.ckpt_seq,
            self.salts,
        )
        .0
    }

    /// Size of one frame (header + page) in the file.
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE as u64 + self.page_size.get() as u64
    }
}

/// The decoded 24-byte frame header (WAL.md §A.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub pgno: u32,
    /// Non-zero for a commit frame: database size in pages after the transaction.
    pub commit_size: u32,
    /// Raw frame bytes 8..16.
    pub salts: [u8; 8],
    pub cksum: CksumPair,
}

impl FrameHeader {
    /// Decodes the first 24 bytes of `b` (no validation). Panics if `b` is shorter than 24.
    pub fn parse(b: &[u8]) -> FrameHeader {
        let mut salts = [0u8; 8];
        salts.copy_from_slice(&b[8..16]);
        FrameHeader {
            pgno: be32(b, 0),
            commit_size: be32(b, 4),
            salts,
            cksum: (be32(b, 16), be32(b, 20)),
        }
    }

    /// Encodes the 24 header bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_SIZE] {
        let mut b = [0u8; FRAME_HEADER_SIZE];
        b[0..4].copy_from_slice(&self.pgno.to_be_bytes());
        b[4..8].copy_from_slice(&self.commit_size.to_be_bytes());
        b[8..16].copy_from_slice(&self.salts);
        b[16..20].copy_from_slice(&self.cksum.0.to_be_bytes());
        b[20..24].copy_from_slice(&self.cksum.1.to_be_bytes());
        b
    }

    /// True for a commit frame.
    pub fn is_commit(&self) -> bool {
        self.commit_size != 0
    }
}

/// Byte offset of frame `frame` (1-based) in the WAL file: `32 + (frame-1) * (pageSize + 24)`.
/// `frame_offset(ps, n + 1)` is the end of frame n (frame 0 is treated as frame 1).
pub fn frame_offset(page_size: PageSize, frame: u32) -> u64 {
    let frame_size = FRAME_HEADER_SIZE as u64 + page_size.get() as u64;
    WAL_HEADER_SIZE as u64 + (frame.max(1) as u64 - 1) * frame_size
}

/// A frame's cumulative checksum from the previous running state: extend over the frame
/// header's first 8 bytes (pgno, commit size; BE) then over the page.
pub fn frame_cksum(
    prev: CksumPair,
    pgno: u32,
    commit_size: u32,
    page: &[u8],
    big_endian: bool,
) -> CksumPair {
    let mut head = [0u8; 8];
    head[0..4].copy_from_slice(&pgno.to_be_bytes());
    head[4..8].copy_from_slice(&commit_size.to_be_bytes());
    let s = cksum_extend(prev, &head, big_endian);
    cksum_extend(s, page, big_endian)
}

/// Encodes a whole frame (24-byte header + page) given the previous running state; returns the
/// bytes and the new running state (= the frame's stored checksum).
pub fn encode_frame(
    prev: CksumPair,
    pgno: u32,
    commit_size: u32,
    salts: [u8; 8],
    page: &[u8],
    big_endian: bool,
) -> (Vec<u8>, CksumPair) {
    let cksum = frame_cksum(prev, pgno, commit_size, page, big_endian);
    let mut out = Vec::with_capacity(FRAME_HEADER_SIZE + page.len());
    out.extend_from_slice(
        &FrameHeader {
            pgno,
            commit_size,
            salts,
            cksum,
        }
        .encode(),
    );
    out.extend_from_slice(page);
    (out, cksum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        crate::util::unhex(&s.split_whitespace().collect::<String>()).expect("hex digits")
    }

    fn vector_page() -> Vec<u8> {
        (0..4096).map(|i| (i % 256) as u8).collect()
    }

    #[test]
    fn spec_a3_vectors_le() {
        let h = hex("377f0682 002de218 00001000 00000000 01020304 05060708");
        let c = cksum_extend((0, 0), &h, false);
        assert_eq!(c, (0xd8ea0514, 0x98d8e2be));
        assert_eq!(
            frame_cksum(c, 1, 1, &vector_page(), false),
            (0x4e0886f0, 0xce9cd782)
        );
        let ps = PageSize::new(4096).unwrap();
        let (bytes, hdr) = WalHeader::encode(false, ps, 0, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[..24], &h[..]);
        assert_eq!(hdr.cksum, c);
        assert_eq!(WalHeader::parse(&bytes).unwrap(), hdr);
    }

    #[test]
    fn spec_a3_vectors_be() {
        let h = hex("377f0683 002de218 00001000 00000000 01020304 05060708");
        let c = cksum_extend((0, 0), &h, true);
        assert_eq!(c, (0x1706e9db, 0xc2e5d89c));
        assert_eq!(
            frame_cksum(c, 1, 1, &vector_page(), true),
            (0x3f866177, 0xf2bca4da)
        );
        let ps = PageSize::new(4096).unwrap();
        let (bytes, hdr) = WalHeader::encode(true, ps, 0, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[..24], &h[..]);
        assert_eq!(WalHeader::parse(&bytes).unwrap(), hdr);
        assert_eq!(hdr.to_bytes(), bytes);
    }

    #[test]
    fn header_rejections() {
        let ps = PageSize::new(1024).unwrap();
        let (good, _) = WalHeader::encode(false, ps, 3, [9; 8]);
        assert!(WalHeader::parse(&good[..31]).is_err());
        let mut bad_magic = good;
        bad_magic[3] = 0x84;
        assert!(WalHeader::parse(&bad_magic).is_err());
        let mut bad_ck = good;
        bad_ck[31] ^= 1;
        assert!(WalHeader::parse(&bad_ck).is_err());
        // Wrong version with a recomputed (valid) checksum: refused.
        let mut v = good;
        v[4..8].copy_from_slice(&3_007_001u32.to_be_bytes());
        let c = cksum_extend((0, 0), &v[..24], false);
        v[24..28].copy_from_slice(&c.0.to_be_bytes());
        v[28..32].copy_from_slice(&c.1.to_be_bytes());
        let msg = WalHeader::parse(&v).unwrap_err().to_string();
        assert!(msg.contains("refuse"), "{msg}");
        assert!(WalHeader::parse_for_recovery(&v).is_err());
        // Wrong version with a bad checksum: ignored (empty WAL).
        v[31] ^= 1;
        assert_eq!(WalHeader::parse_for_recovery(&v).unwrap(), None);
        assert_eq!(WalHeader::parse_for_recovery(&bad_magic).unwrap(), None);
        assert_eq!(WalHeader::parse_for_recovery(&good[..20]).unwrap(), None);
        assert!(WalHeader::parse_for_recovery(&good).unwrap().is_some());
    }

    #[test]
    fn frame_offsets() {
        let ps = PageSize::new(1024).unwrap();
        assert_eq!(frame_offset(ps, 1), 32);
        assert_eq!(frame_offset(ps, 2), 32 + 1048);
        let big = PageSize::new(65536).unwrap();
        assert_eq!(frame_offset(big, 100_000), 32 + 99_999 * 65560);
    }
}

//! The wal-index (`<db>-shm`) header and checkpoint information of block 0 (WAL.md §B.1–§B.4),
//! as pure byte formats.
//!
//! Owns: `WalIndexHeader` (one 48-byte copy: parse, encode, the reader validity rule),
//! `CkptInfo`, the szPage encoding and the block-0 offsets.
//!
//! Invariants:
//! - Everything is in the host's *native* byte order, including the header checksum words
//!   (`aCksum` over bytes 0..40, initial state (0,0)), even when the WAL uses BE checksums.
//! - `salts` is a raw copy of WAL header bytes 16..24, never a decoded integer.
//! - `encode` always writes 0 into the unused word (bytes 4..8) and recomputes `aCksum`.
//! - Lock bytes 120..127 are never read or written as data by anything here.
//! - Validity (`read_valid`) does *not* check `version`: a valid header with another version
//!   means "SQLite refuses to open" and the caller must report that separately.

use super::checksum::{cksum_extend, native_is_big_endian, CksumPair};

/// Size of one wal-index block.
pub const SHM_BLOCK_SIZE: usize = 32768;
/// Bytes of block 0 taken by the two header copies, checkpoint info and lock bytes.
pub const SHM_HEADER_SIZE: usize = 136;
/// Size of one header copy.
pub const SHM_HEADER_COPY_SIZE: usize = 48;
/// Value of `iVersion` (and the only one readers accept).
pub const SHM_VERSION: u32 = 3_007_000;
/// A read-mark that is not in use.
pub const READMARK_UNUSED: u32 = 0xffff_ffff;
/// Number of read-marks (READ0..READ4).
pub const N_READ_MARKS: usize = 5;
/// Offset of nBackfill in block 0.
pub const OFF_N_BACKFILL: usize = 96;
/// Offset of read-mark[0] in block 0 (read-mark[i] is at `OFF_READ_MARKS + 4 * i`).
pub const OFF_READ_MARKS: usize = 100;
/// Offset of the first lock byte (slot i is byte `OFF_LOCKS + i`; never data).
pub const OFF_LOCKS: usize = 120;
/// Offset of nBackfillAttempted in block 0.
pub const OFF_N_BACKFILL_ATTEMPTED: usize = 128;

/// Byte offset of read-mark `i` (0..5) in block 0.
pub fn read_mark_offset(i: usize) -> usize {
    assert!(i < N_READ_MARKS, "read-mark index {i} out of range");
    OFF_READ_MARKS + 4 * i
}

/// Encodes a page size for the u16 szPage field: 65536 becomes 1.
pub fn encode_page_size(p: u32) -> u16 {
    ((p & 0xff00) | (p >> 16)) as u16
}

/// Decodes the u16 szPage field: 1 means 65536; 0 stays 0 (recovered empty WAL).
pub fn decode_page_size(v: u16) -> u32 {
    let v = v as u32;
    (v & 0xfe00) + ((v & 1) << 16)
}

fn ne32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// One copy of the wal-index header (B.2), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WalIndexHeader {
    pub version: u32,
    pub change: u32,
    pub is_init: u8,
    pub big_end_cksum: bool,
    /// Decoded page size (65536 for the stored 1); 0 is possible after recovering an empty WAL.
    pub page_size: u32,
    pub mx_frame: u32,
    pub n_page: u32,
    pub frame_cksum: CksumPair,
    /// Raw copy of WAL header bytes 16..24.
    pub salts: [u8; 8],
    pub cksum: CksumPair,
}

impl WalIndexHeader {
    /// Parses one 48-byte copy (native byte order) without validation. Panics if `b` is shorter.
    pub fn parse_copy(b: &[u8]) -> WalIndexHeader {
        let mut salts = [0u8; 8];
        salts.copy_from_slice(&b[32..40]);
        WalIndexHeader {
            version: ne32(b, 0),
            change: ne32(b, 8),
            is_init: b[12],
            big_end_cksum: b[13] != 0,
            page_size: decode_page_size(u16::from_ne_bytes([b[14], b[15]])),
            mx_frame: ne32(b, 16),
            n_page: ne32(b, 20),
            frame_cksum: (ne32(b, 24), ne32(b, 28)),
            salts,
            cksum: (ne32(b, 40), ne32(b, 44)),
        }
    }

    /// Encodes one 48-byte copy with `aCksum` computed (native word order) over bytes 0..40;
    /// `self.cksum` is ignored. The unused word 4..8 is written as 0.
    pub fn encode(&self) -> [u8; SHM_HEADER_COPY_SIZE] {
        let mut b = [0u8; SHM_HEADER_COPY_SIZE];
        b[0..4].copy_from_slice(&self.version.to_ne_bytes());
        b[8..12].copy_from_slice(&self.change.to_ne_bytes());
        b[12] = self.is_init;
        b[13] = u8::from(self.big_end_cksum);
        b[14..16].copy_from_slice(&encode_page_size(self.page_size).to_ne_bytes());
        b[16..20].copy_from_slice(&self.mx_frame.to_ne_bytes());
        b[20..24].copy_from_slice(&self.n_page.to_ne_bytes());
        b[24..28].copy_from_slice(&self.frame_cksum.0.to_ne_bytes());
        b[28..32].copy_from_slice(&self.frame_cksum.1.to_ne_bytes());
        b[32..40].copy_from_slice(&self.salts);
        let c = Self::compute_cksum(&b);
        b[40..44].copy_from_slice(&c.0.to_ne_bytes());
        b[44..48].copy_from_slice(&c.1.to_ne_bytes());
        b
    }

    /// This header with `cksum` set to the value `encode` writes.
    pub fn with_cksum(&self) -> WalIndexHeader {
        Self::parse_copy(&self.encode())
    }

    /// The checksum of a copy: bytes 0..40, native word order, initial (0,0).
    pub fn compute_cksum(copy: &[u8]) -> CksumPair {
        cksum_extend((0, 0), &copy[0..40], native_is_big_endian())
    }

    /// Reader validity rule on the first 96 bytes of block 0: both copies byte-identical,
    /// isInit != 0 and the checksum valid. `None` means "invalid: recovery needed".
    /// (The version is not checked here; see the module doc.) Panics if shorter than 96 bytes.
    pub fn read_valid(first96: &[u8]) -> Option<WalIndexHeader> {
        let (c1, c2) = (&first96[0..48], &first96[48..96]);
        if c1 != c2 {
            return None;
        }
        let h = Self::parse_copy(c1);
        if h.is_init == 0 || Self::compute_cksum(c1) != h.cksum {
            return None;
        }
        Some(h)
    }
}

/// Checkpoint information (B.4, bytes 96..136 of block 0), native byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CkptInfo {
    pub n_backfill: u32,
    pub read_marks: [u32; 5],
    pub n_backfill_attempted: u32,
}

impl CkptInfo {
    /// Parses bytes 96..136 of block 0 (`block0` must be at least 136 bytes).
    pub fn parse(block0: &[u8]) -> CkptInfo {
        let mut read_marks = [0u32; N_READ_MARKS];
        for (i, m) in read_marks.iter_mut().enumerate() {
            *m = ne32(block0, read_mark_offset(i));
        }
        CkptInfo {
            n_backfill: ne32(block0, OFF_N_BACKFILL),
            read_marks,
            n_backfill_attempted: ne32(block0, OFF_N_BACKFILL_ATTEMPTED),
        }
    }

    /// The state recovery leaves (A.6 step 6) for a recovered `mx_frame`.
    pub fn after_recovery(mx_frame: u32) -> CkptInfo {
        let mark1 = if mx_frame > 0 {
            mx_frame
        } else {
            READMARK_UNUSED
        };
        CkptInfo {
            n_backfill: 0,
            read_marks: [0, mark1, READMARK_UNUSED, READMARK_UNUSED, READMARK_UNUSED],
            n_backfill_attempted: mx_frame,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        crate::util::unhex(&s.split_whitespace().collect::<String>()).expect("hex digits")
    }

    fn vector_header() -> WalIndexHeader {
        WalIndexHeader {
            version: SHM_VERSION,
            change: 7,
            is_init: 1,
            big_end_cksum: false,
            page_size: 4096,
            mx_frame: 2,
            n_page: 3,
            frame_cksum: (0x1111_1111, 0x2222_2222),
            salts: [1, 2, 3, 4, 5, 6, 7, 8],
            cksum: (0, 0),
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn spec_b2_vector_le_host() {
        let want = hex(
            "18e22d00 00000000 07000000 01 00 0010 02000000 03000000 11111111 22222222 0102030405060708",
        );
        let b = vector_header().encode();
        assert_eq!(&b[..40], &want[..]);
        let h = WalIndexHeader::parse_copy(&b);
        assert_eq!(h.cksum, (0xce5f4deb, 0x5d5d1364));
        assert_eq!(
            WalIndexHeader::compute_cksum(&want),
            (0xce5f4deb, 0x5d5d1364)
        );
        assert_eq!(
            h,
            WalIndexHeader {
                cksum: h.cksum,
                ..vector_header()
            }
        );
        assert_eq!(vector_header().with_cksum(), h);
    }

    #[test]
    fn validity_rule() {
        let c = vector_header().encode();
        let mut both = [0u8; 96];
        both[..48].copy_from_slice(&c);
        both[48..].copy_from_slice(&c);
        let h = WalIndexHeader::read_valid(&both).unwrap();
        assert_eq!(h.mx_frame, 2);
        // Copies differ.
        let mut torn = both;
        torn[48 + 16] ^= 1;
        assert!(WalIndexHeader::read_valid(&torn).is_none());
        // Bad checksum in both copies.
        let mut bad = both;
        bad[44] ^= 1;
        bad[92] ^= 1;
        assert!(WalIndexHeader::read_valid(&bad).is_none());
        // Not initialised (checksum recomputed so only isInit is wrong).
        let z = WalIndexHeader {
            is_init: 0,
            ..vector_header()
        }
        .encode();
        let mut zz = [0u8; 96];
        zz[..48].copy_from_slice(&z);
        zz[48..].copy_from_slice(&z);
        assert!(WalIndexHeader::read_valid(&zz).is_none());
        // All zero (fresh shm).
        assert!(WalIndexHeader::read_valid(&[0u8; 96]).is_none());
        // Non-zero unused word is covered by the checksum.
        let mut u = both;
        u[4] = 1;
        u[52] = 1;
        assert!(WalIndexHeader::read_valid(&u).is_none());
    }

    #[test]
    fn page_size_round_trip_all_powers() {
        let mut p = 512u32;
        while p <= 65536 {
            let e = encode_page_size(p);
            assert_eq!(decode_page_size(e), p, "page size {p}");
            if p == 65536 {
                assert_eq!(e, 1);
            } else {
                assert_eq!(e as u32, p);
            }
            let h = WalIndexHeader {
                page_size: p,
                ..vector_header()
            }
            .encode();
            assert_eq!(WalIndexHeader::parse_copy(&h).page_size, p);
            p *= 2;
        }
        assert_eq!(decode_page_size(0), 0);
        assert_eq!(encode_page_size(0), 0);
    }

    #[test]
    fn ckpt_info_parse() {
        let mut b = vec![0u8; 136];
        let put =
            |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        put(&mut b, 96, 10);
        put(&mut b, 100, 0);
        put(&mut b, 104, 12);
        put(&mut b, 108, READMARK_UNUSED);
        put(&mut b, 112, 5);
        put(&mut b, 116, READMARK_UNUSED);
        put(&mut b, 128, 11);
        b[120..128].copy_from_slice(&[0xaa; 8]);
        let c = CkptInfo::parse(&b);
        assert_eq!(c.n_backfill, 10);
        assert_eq!(c.read_marks, [0, 12, READMARK_UNUSED, 5, READMARK_UNUSED]);
        assert_eq!(c.n_backfill_attempted, 11);
        assert_eq!(CkptInfo::after_recovery(0).read_marks[1], READMARK_UNUSED);
        assert_eq!(CkptInfo::after_recovery(9).read_marks[1], 9);
    }
}

//! Abstract access to the wal-index blocks (`ShmAccess`), its in-memory implementation
//! (`VecShm`) and the header/checkpoint-info operations written against it (WAL.md §B.2–§B.4).
//!
//! Owns: `ShmAccess`, `VecShm`, `shm_read_header`, `shm_publish_header`, `shm_ckpt_info`,
//! `shm_write_ckpt_info`.
//!
//! Invariants:
//! - All accesses are naturally aligned u32/u16 words of one 32 KiB block, so a live
//!   implementation can use atomics (the live mmap one lives outside this pure module).
//! - Header read order: copy 1, barrier, copy 2 (then the §B.2 validity rule). Publish order is
//!   the opposite: copy 2, barrier, copy 1 — with nothing else in between.
//! - Nothing here touches the lock bytes 120..127.
//! - Locking is the caller's business: publishing needs WRITE, read-marks need their READ_i
//!   exclusively, nBackfill needs CKPT (or WRITE for a restart), as in WAL.md §C.

use std::sync::atomic::{fence, Ordering};

use super::index::{
    read_mark_offset, CkptInfo, WalIndexHeader, N_READ_MARKS, OFF_N_BACKFILL,
    OFF_N_BACKFILL_ATTEMPTED, READMARK_UNUSED, SHM_BLOCK_SIZE, SHM_HEADER_COPY_SIZE,
};
use crate::error::Result;

/// Access to wal-index blocks. Offsets are byte offsets within one 32 KiB block and are
/// aligned to the access size. Reading a block that does not exist is a caller bug (callers
/// check `block_count` first).
pub trait ShmAccess {
    /// Number of blocks currently mapped.
    fn block_count(&self) -> u32;
    /// Ensure block `k` exists (may grow the wal-index); Err if it cannot.
    fn ensure_block(&mut self, k: u32) -> Result<()>;
    fn read_u32(&self, block: u32, off: usize) -> u32;
    fn write_u32(&mut self, block: u32, off: usize, v: u32);
    fn read_u16(&self, block: u32, off: usize) -> u16;
    fn write_u16(&mut self, block: u32, off: usize, v: u16);
    /// Full memory barrier (a SeqCst fence in memory implementations).
    fn barrier(&self);
    /// Called by `shm_publish_header` between the two copies (copy 2 written, copy 1 not):
    /// the fault-injection point of the crash tests (WAL.md §G15 (c)). No-op by default.
    fn between_header_copies(&self) {}
}

/// In-memory wal-index (tests, offline analysis of a copied `-shm` file). Native byte order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VecShm {
    /// Each block is exactly `SHM_BLOCK_SIZE` bytes.
    pub blocks: Vec<Vec<u8>>,
}

impl VecShm {
    /// An empty wal-index (no blocks).
    pub fn new() -> VecShm {
        VecShm::default()
    }

    /// Loads the bytes of a real `-shm` file; a partial last block is zero-padded.
    pub fn from_bytes(b: &[u8]) -> VecShm {
        let blocks = b
            .chunks(SHM_BLOCK_SIZE)
            .map(|c| {
                let mut v = c.to_vec();
                v.resize(SHM_BLOCK_SIZE, 0);
                v
            })
            .collect();
        VecShm { blocks }
    }

    /// All blocks concatenated (the bytes a `-shm` file would hold).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.blocks.concat()
    }
}

impl ShmAccess for VecShm {
    fn block_count(&self) -> u32 {
        self.blocks.len() as u32
    }

    fn ensure_block(&mut self, k: u32) -> Result<()> {
        while self.blocks.len() <= k as usize {
            self.blocks.push(vec![0u8; SHM_BLOCK_SIZE]);
        }
        Ok(())
    }

    fn read_u32(&self, block: u32, off: usize) -> u32 {
        let b = &self.blocks[block as usize][off..off + 4];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    fn write_u32(&mut self, block: u32, off: usize, v: u32) {
        self.blocks[block as usize][off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn read_u16(&self, block: u32, off: usize) -> u16 {
        let b = &self.blocks[block as usize][off..off + 2];
        u16::from_ne_bytes([b[0], b[1]])
    }

    fn write_u16(&mut self, block: u32, off: usize, v: u16) {
        self.blocks[block as usize][off..off + 2].copy_from_slice(&v.to_ne_bytes());
    }

    fn barrier(&self) {
        fence(Ordering::SeqCst);
    }
}

const COPY_WORDS: usize = SHM_HEADER_COPY_SIZE / 4;

fn read_copy<S: ShmAccess>(shm: &S, base: usize) -> [u8; SHM_HEADER_COPY_SIZE] {
    let mut out = [0u8; SHM_HEADER_COPY_SIZE];
    for i in 0..COPY_WORDS {
        out[i * 4..i * 4 + 4].copy_from_slice(&shm.read_u32(0, base + i * 4).to_ne_bytes());
    }
    out
}

fn write_copy<S: ShmAccess>(shm: &mut S, base: usize, bytes: &[u8; SHM_HEADER_COPY_SIZE]) {
    for i in 0..COPY_WORDS {
        let w = &bytes[i * 4..i * 4 + 4];
        shm.write_u32(
            0,
            base + i * 4,
            u32::from_ne_bytes([w[0], w[1], w[2], w[3]]),
        );
    }
}

/// Reads both header copies (copy 1, barrier, copy 2) and applies the validity rule.
/// `None` if block 0 does not exist or the header is invalid (torn, uninitialised, bad
/// checksum). The version is not checked (see `WalIndexHeader::read_valid`).
pub fn shm_read_header<S: ShmAccess>(shm: &S) -> Option<WalIndexHeader> {
    if shm.block_count() == 0 {
        return None;
    }
    let mut both = [0u8; 2 * SHM_HEADER_COPY_SIZE];
    both[..SHM_HEADER_COPY_SIZE].copy_from_slice(&read_copy(shm, 0));
    shm.barrier();
    both[SHM_HEADER_COPY_SIZE..].copy_from_slice(&read_copy(shm, SHM_HEADER_COPY_SIZE));
    WalIndexHeader::read_valid(&both)
}

/// Publishes `h` (checksum recomputed): write copy 2, barrier, write copy 1. Block 0 must
/// exist (`ensure_block(0)` first). The caller holds WRITE.
pub fn shm_publish_header<S: ShmAccess>(shm: &mut S, h: &WalIndexHeader) {
    let bytes = h.encode();
    write_copy(shm, SHM_HEADER_COPY_SIZE, &bytes);
    shm.barrier();
    shm.between_header_copies();
    write_copy(shm, 0, &bytes);
}

/// Reads the checkpoint information of block 0. If block 0 does not exist, returns the
/// state of an empty wal-index (nBackfill 0, read-mark[0] 0, other marks unused).
pub fn shm_ckpt_info<S: ShmAccess>(shm: &S) -> CkptInfo {
    if shm.block_count() == 0 {
        return CkptInfo::after_recovery(0);
    }
    let mut read_marks = [READMARK_UNUSED; N_READ_MARKS];
    for (i, m) in read_marks.iter_mut().enumerate() {
        *m = shm.read_u32(0, read_mark_offset(i));
    }
    CkptInfo {
        n_backfill: shm.read_u32(0, OFF_N_BACKFILL),
        read_marks,
        n_backfill_attempted: shm.read_u32(0, OFF_N_BACKFILL_ATTEMPTED),
    }
}

/// Writes all checkpoint-information words (nBackfill, the five read-marks,
/// nBackfillAttempted). Only for callers holding every lock those fields require (recovery,
/// a restart holding WRITE + READ1..4); block 0 must exist.
pub fn shm_write_ckpt_info<S: ShmAccess>(shm: &mut S, c: &CkptInfo) {
    shm.write_u32(0, OFF_N_BACKFILL, c.n_backfill);
    for (i, m) in c.read_marks.iter().enumerate() {
        shm.write_u32(0, read_mark_offset(i), *m);
    }
    shm.write_u32(0, OFF_N_BACKFILL_ATTEMPTED, c.n_backfill_attempted);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::index::SHM_VERSION;

    fn hdr(mx: u32) -> WalIndexHeader {
        WalIndexHeader {
            version: SHM_VERSION,
            change: 3,
            is_init: 1,
            big_end_cksum: false,
            page_size: 65536,
            mx_frame: mx,
            n_page: 9,
            frame_cksum: (1, 2),
            salts: [8, 7, 6, 5, 4, 3, 2, 1],
            cksum: (0, 0),
        }
    }

    #[test]
    fn publish_then_read() {
        let mut shm = VecShm::new();
        assert!(shm_read_header(&shm).is_none());
        shm.ensure_block(0).unwrap();
        assert!(shm_read_header(&shm).is_none());
        shm_publish_header(&mut shm, &hdr(5));
        let h = shm_read_header(&shm).unwrap();
        assert_eq!(h, hdr(5).with_cksum());
        // szPage 65536 stored as 1 at byte 14 (native u16).
        assert_eq!(shm.read_u16(0, 14), 1);
        assert_eq!(shm.read_u16(0, 62), 1);
        // A torn publish (copy 2 only) is invalid.
        let b = hdr(6).encode();
        write_copy(&mut shm, SHM_HEADER_COPY_SIZE, &b);
        assert!(shm_read_header(&shm).is_none());
        // Round trip through bytes.
        let again = VecShm::from_bytes(&shm.to_bytes());
        assert_eq!(again, shm);
    }

    #[test]
    fn ckpt_info_round_trip() {
        let mut shm = VecShm::new();
        assert_eq!(shm_ckpt_info(&shm), CkptInfo::after_recovery(0));
        shm.ensure_block(0).unwrap();
        let c = CkptInfo {
            n_backfill: 4,
            read_marks: [0, 7, READMARK_UNUSED, 3, 2],
            n_backfill_attempted: 5,
        };
        shm_write_ckpt_info(&mut shm, &c);
        assert_eq!(shm_ckpt_info(&shm), c);
        assert_eq!(CkptInfo::parse(&shm.blocks[0]), c);
        assert!(
            shm.blocks[0][120..128].iter().all(|&b| b == 0),
            "lock bytes untouched"
        );
    }

    #[test]
    fn from_bytes_pads() {
        let shm = VecShm::from_bytes(&[1u8; SHM_BLOCK_SIZE + 3]);
        assert_eq!(shm.block_count(), 2);
        assert_eq!(shm.blocks[1].len(), SHM_BLOCK_SIZE);
        assert_eq!(shm.read_u16(1, 2), 1);
    }
}

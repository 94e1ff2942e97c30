//! The wal-index hash blocks (WAL.md §B.1, §B.5): frame → block geometry, the page hash, and
//! the insert / lookup / truncate-to algorithms, written against `ShmAccess`.
//!
//! Owns: `NPAGE`, `NPAGE_ONE`, `NSLOT`, `HASH_MULT`, `block_of`, `izero`, `hash_of`,
//! `apgno_offset`, `hash_insert`, `hash_lookup`, `hash_lookup_checked`, `hash_truncate`.
//!
//! Invariants:
//! - Block k holds `aPgno[]` (u32, from byte 136 in block 0, byte 0 otherwise, up to 16384)
//!   and `aHash[]` (8192 u16 slots at 16384..32768). A slot value v (1-based) means frame
//!   `izero(k) + v`, whose page number is `aPgno[v - 1]` of the same block.
//! - Inserts happen in strictly increasing frame order. For one insert, the aPgno store comes
//!   first and the 16-bit slot store second; that order is what makes concurrent lookups safe
//!   (an entry for a frame beyond a reader's snapshot is simply a non-match).
//! - The first frame of a block zeroes the block's aPgno and aHash (never the block-0 header).
//! - Stale entries (rolled-back or recovered-uncommitted frames) beyond the insertion point
//!   are removed by `hash_truncate` before they could be mistaken for live entries.

use super::index::{SHM_BLOCK_SIZE, SHM_HEADER_SIZE};
use super::shm::ShmAccess;
use crate::error::{Error, Result};

/// aPgno entries in blocks k ≥ 1.
pub const NPAGE: u32 = 4096;
/// aPgno entries in block 0 (the header takes the first 136 bytes).
pub const NPAGE_ONE: u32 = 4062;
/// Hash slots per block.
pub const NSLOT: u32 = 8192;
/// Multiplier of the page hash.
pub const HASH_MULT: u32 = 383;
/// Byte offset of `aHash[]` within every block (= end of `aPgno[]`).
pub const HASH_OFFSET: usize = 16384;

/// The block holding frame `frame` (frames are 1-based).
pub fn block_of(frame: u32) -> u32 {
    (frame + (NPAGE - NPAGE_ONE - 1)) / NPAGE
}

/// Frame number just before the first frame of block `block` (slot value v ↔ `izero + v`).
pub fn izero(block: u32) -> u32 {
    if block == 0 {
        0
    } else {
        NPAGE_ONE + (block - 1) * NPAGE
    }
}

/// The hash of a page number: `(pgno * 383) mod 8192` (wrapping product).
pub fn hash_of(pgno: u32) -> u32 {
    pgno.wrapping_mul(HASH_MULT) & (NSLOT - 1)
}

/// Byte offset of `aPgno[]` within block `block`.
fn apgno_base(block: u32) -> usize {
    if block == 0 {
        SHM_HEADER_SIZE
    } else {
        0
    }
}

/// Number of `aPgno[]` entries of block `block`.
fn apgno_capacity(block: u32) -> u32 {
    if block == 0 {
        NPAGE_ONE
    } else {
        NPAGE
    }
}

/// Offset within its block of `aPgno[i]` (0-based i).
fn apgno_off(block: u32, i: u32) -> usize {
    apgno_base(block) + 4 * i as usize
}

/// Offset within a block of hash slot `slot`.
fn slot_off(slot: u32) -> usize {
    HASH_OFFSET + 2 * slot as usize
}

/// Byte offset (within the shm file) of the aPgno entry for frame `frame` (1-based).
pub fn apgno_offset(frame: u32) -> u64 {
    let k = block_of(frame);
    let idx = frame - izero(k);
    k as u64 * SHM_BLOCK_SIZE as u64 + apgno_off(k, idx - 1) as u64
}

/// Zeroes a block's aPgno and aHash arrays (block 0: bytes 136..32768, never the header).
fn zero_block<S: ShmAccess>(shm: &mut S, k: u32) {
    let mut off = apgno_base(k);
    while off < SHM_BLOCK_SIZE {
        shm.write_u32(k, off, 0);
        off += 4;
    }
}

/// WAL.md §B.5 insert: append frame `frame` holding page `pgno`. Frames must be appended in
/// strictly increasing order. Zeroes a block on its first frame; if stale entries are found at the
/// insertion point (an aborted writer, a recovery's uncommitted tail), they are removed with
/// truncate-to(frame - 1) first. Then the aPgno store, then the u16 slot store.
pub fn hash_insert<S: ShmAccess>(shm: &mut S, frame: u32, pgno: u32) -> Result<()> {
    if frame == 0 || pgno == 0 {
        return Err(Error::Misuse(format!(
            "hash_insert: frame {frame} / page {pgno}: both must be non-zero"
        )));
    }
    let k = block_of(frame);
    shm.ensure_block(k)?;
    let idx = frame - izero(k);
    if idx == 1 {
        zero_block(shm, k);
    }
    if shm.read_u32(k, apgno_off(k, idx - 1)) != 0 {
        hash_truncate(shm, frame - 1);
    }
    let mut slot = hash_of(pgno);
    let mut collisions = idx;
    while shm.read_u16(k, slot_off(slot)) != 0 {
        if collisions == 0 {
            return Err(Error::Corrupt(format!(
                "wal-index hash block {k} is full or corrupt while inserting frame {frame}; rebuild the wal-index (recovery)"
            )));
        }
        collisions -= 1;
        slot = (slot + 1) & (NSLOT - 1);
    }
    shm.write_u32(k, apgno_off(k, idx - 1), pgno);
    shm.write_u16(k, slot_off(slot), idx as u16);
    Ok(())
}

/// WAL.md §B.5 lookup with corruption reported: the latest frame in `[min_frame, max_frame]`
/// holding `pgno`, `Ok(None)` if there is none (read the page from the database file).
/// `min_frame` 0 is treated as 1.
pub fn hash_lookup_checked<S: ShmAccess>(
    shm: &S,
    pgno: u32,
    min_frame: u32,
    max_frame: u32,
) -> Result<Option<u32>> {
    let min_frame = min_frame.max(1);
    if max_frame < min_frame {
        return Ok(None);
    }
    for k in (block_of(min_frame)..=block_of(max_frame)).rev() {
        if k >= shm.block_count() {
            return Err(Error::Corrupt(format!(
                "wal-index block {k} is missing although frame {max_frame} is in use; rebuild the wal-index (recovery)"
            )));
        }
        let iz = izero(k);
        let cap = apgno_capacity(k);
        let mut best: Option<u32> = None;
        let mut slot = hash_of(pgno);
        let mut budget = NSLOT;
        loop {
            let v = shm.read_u16(k, slot_off(slot)) as u32;
            if v == 0 {
                break;
            }
            if v > cap {
                return Err(Error::Corrupt(format!(
                    "wal-index block {k}: hash slot {slot} holds {v}, beyond the block's {cap} entries"
                )));
            }
            let f = iz + v;
            if f <= max_frame && f >= min_frame && shm.read_u32(k, apgno_off(k, v - 1)) == pgno {
                best = best.max(Some(f));
            }
            if budget == 0 {
                return Err(Error::Corrupt(format!(
                    "wal-index block {k}: hash table has no empty slot; rebuild the wal-index (recovery)"
                )));
            }
            budget -= 1;
            slot = (slot + 1) & (NSLOT - 1);
        }
        if best.is_some() {
            return Ok(best);
        }
    }
    Ok(None)
}

/// WAL.md §B.5 lookup: the latest frame in `[min_frame, max_frame]` holding `pgno`, or `None`.
/// A corrupt index also yields `None`; use `hash_lookup_checked` to tell the two apart.
pub fn hash_lookup<S: ShmAccess>(
    shm: &S,
    pgno: u32,
    min_frame: u32,
    max_frame: u32,
) -> Option<u32> {
    hash_lookup_checked(shm, pgno, min_frame, max_frame)
        .ok()
        .flatten()
}

/// WAL.md §B.5 truncate-to(X): forget every entry for frames > X in X's block (the slots whose
/// value exceeds L, and `aPgno[L..]`, L = X − izero). Later blocks are left alone (zeroed
/// lazily by the insert of their first frame). X = 0 does nothing; a missing block does nothing.
pub fn hash_truncate<S: ShmAccess>(shm: &mut S, mx_frame: u32) {
    if mx_frame == 0 {
        return;
    }
    let k = block_of(mx_frame);
    if k >= shm.block_count() {
        return;
    }
    let limit = mx_frame - izero(k);
    for slot in 0..NSLOT {
        if shm.read_u16(k, slot_off(slot)) as u32 > limit {
            shm.write_u16(k, slot_off(slot), 0);
        }
    }
    for i in limit..apgno_capacity(k) {
        shm.write_u32(k, apgno_off(k, i), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::shm::VecShm;

    #[test]
    fn hash_examples() {
        assert_eq!(hash_of(1), 383);
        assert_eq!(hash_of(2), 766);
        assert_eq!(hash_of(22), 234);
        assert_eq!(hash_of(8192), 0);
        assert_eq!(hash_of(100_000), 2400);
        assert_eq!(hash_of(1_073_741_823), 7809);
    }

    #[test]
    fn frame_geometry_examples() {
        assert_eq!(block_of(1), 0);
        assert_eq!(apgno_offset(1), 136);
        assert_eq!(block_of(4062), 0);
        assert_eq!(apgno_offset(4062), 16380);
        assert_eq!(block_of(4063), 1);
        assert_eq!(4063 - izero(1), 1);
        assert_eq!(apgno_offset(4063), 32768);
        assert_eq!(block_of(8158), 1);
        assert_eq!(8158 - izero(1), 4096);
        assert_eq!(apgno_offset(8158), 49148);
        assert_eq!(block_of(8159), 2);
        assert_eq!(apgno_offset(8159), 65536);
        assert_eq!(izero(0), 0);
        assert_eq!(izero(1), 4062);
        assert_eq!(izero(2), 8158);
    }

    #[test]
    fn insert_lookup_small() {
        let mut shm = VecShm::new();
        for (f, p) in [(1, 5), (2, 7), (3, 5), (4, 5 + 8192)] {
            hash_insert(&mut shm, f, p).unwrap();
        }
        assert_eq!(hash_lookup(&shm, 5, 1, 4), Some(3));
        assert_eq!(hash_lookup(&shm, 5, 1, 2), Some(1));
        assert_eq!(hash_lookup(&shm, 5, 2, 2), None);
        assert_eq!(hash_lookup(&shm, 5 + 8192, 1, 4), Some(4));
        assert_eq!(hash_lookup(&shm, 5 + 8192, 1, 3), None);
        assert_eq!(hash_lookup(&shm, 9, 1, 4), None);
        assert_eq!(hash_lookup(&shm, 5, 0, 0), None);
        // Colliding pages occupy consecutive slots.
        assert_eq!(shm.read_u16(0, slot_off(hash_of(5))), 1);
        assert_eq!(shm.read_u16(0, slot_off(hash_of(5) + 1)), 3);
        assert_eq!(shm.read_u16(0, slot_off(hash_of(5) + 2)), 4);
        hash_truncate(&mut shm, 2);
        assert_eq!(hash_lookup(&shm, 5, 1, 4), Some(1));
        assert_eq!(shm.read_u32(0, apgno_off(0, 2)), 0);
        // The header is never touched by inserts.
        assert!(shm.blocks[0][..SHM_HEADER_SIZE].iter().all(|&b| b == 0));
        assert!(hash_insert(&mut shm, 0, 1).is_err());
        assert!(hash_insert(&mut shm, 1, 0).is_err());
    }

    #[test]
    fn insert_zeroes_block_on_first_frame_and_cleans_stale() {
        let mut shm = VecShm::new();
        shm.ensure_block(0).unwrap();
        shm.blocks[0][200] = 0xff; // garbage in aPgno
        shm.blocks[0][20000] = 0xff; // garbage in aHash
        shm.blocks[0][0] = 0xee; // header byte must survive
        hash_insert(&mut shm, 1, 3).unwrap();
        assert_eq!(shm.blocks[0][200], 0);
        assert_eq!(shm.blocks[0][20000], 0);
        assert_eq!(shm.blocks[0][0], 0xee);
        // Stale frames 2..4 from a rolled-back writer, then re-append from frame 2.
        for f in 2..=4 {
            hash_insert(&mut shm, f, 100 + f).unwrap();
        }
        hash_insert(&mut shm, 2, 50).unwrap();
        assert_eq!(hash_lookup(&shm, 102, 1, 10), None);
        assert_eq!(hash_lookup(&shm, 104, 1, 10), None);
        assert_eq!(hash_lookup(&shm, 50, 1, 10), Some(2));
    }

    #[test]
    fn corrupt_index_is_reported() {
        let mut shm = VecShm::new();
        hash_insert(&mut shm, 1, 1).unwrap();
        // A slot value beyond block 0's capacity.
        shm.write_u16(0, slot_off(hash_of(1) + 1), 4090);
        assert!(hash_lookup_checked(&shm, 1, 1, 1).is_err());
        assert_eq!(hash_lookup(&shm, 1, 1, 1), None);
        // A window reaching a block that does not exist.
        let shm = VecShm::new();
        assert!(hash_lookup_checked(&shm, 1, 1, 5000).is_err());
        // Completely full table: no empty slot.
        let mut full = VecShm::new();
        full.ensure_block(0).unwrap();
        for s in 0..NSLOT {
            full.write_u16(0, slot_off(s), 1);
        }
        assert!(hash_lookup_checked(&full, 1, 1, 1).is_err());
        assert!(hash_insert(&mut full, 2, 1).is_err());
    }
}

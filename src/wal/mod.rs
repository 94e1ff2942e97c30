//! The SQLite WAL file and wal-index (`-shm`) formats and algorithms (docs/WAL.md §A, §B),
//! as pure code: safe Rust only (enforced below), no locks, no SQLite calls.
//!
//! Owns:
//! - `checksum`: the §A.3 checksum (`cksum_extend`).
//! - `file`: WAL header and frame encode/decode, the frame checksum chain.
//! - `reader`: the validating `FrameReader` and the §A.6 `recover_scan`.
//! - `index`: wal-index header copies, checkpoint info, szPage encoding (byte formats).
//! - `shm`: `ShmAccess` (abstract block access; the live mmap implementation lives with the
//!   VFS), `VecShm`, header read/publish and checkpoint-info access.
//! - `hash`: frame → block geometry and hash insert / lookup / truncate-to.
//! - `locks`: the wal-index lock slots and the `WalLocks` trait (live implementation in the VFS).
//!
//! Invariants kept across the module: WAL integers are big-endian with the checksum word order
//! taken from the magic; the wal-index is native-endian; salts are raw bytes everywhere; the
//! same algorithms run on `VecShm` in tests and on the live shared memory.

#![forbid(unsafe_code)]

mod checksum;
mod file;
mod fuzzing;
mod hash;
#[cfg(test)]
mod hash_tests;
mod index;
mod locks;
mod reader;
mod shm;

pub use checksum::{cksum_extend, native_is_big_endian, CksumPair};
pub use file::{
    encode_frame, frame_cksum, frame_offset, FrameHeader, WalHeader, FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE, WAL_MAGIC_BE, WAL_MAGIC_LE, WAL_VERSION,
};
pub use fuzzing::exercise_wal;
pub use hash::{
    apgno_offset, block_of, hash_insert, hash_lookup, hash_lookup_checked, hash_of, hash_truncate,
    izero, HASH_MULT, HASH_OFFSET, NPAGE, NPAGE_ONE, NSLOT,
};
pub use index::{
    decode_page_size, encode_page_size, read_mark_offset, CkptInfo, WalIndexHeader, N_READ_MARKS,
    OFF_LOCKS, OFF_N_BACKFILL, OFF_N_BACKFILL_ATTEMPTED, OFF_READ_MARKS, READMARK_UNUSED,
    SHM_BLOCK_SIZE, SHM_HEADER_COPY_SIZE, SHM_HEADER_SIZE, SHM_VERSION,
};
pub use locks::{WalLocks, SLOT_READ1, SLOT_WRITE};
pub use reader::{recover_scan, Frame, FrameReader, RecoveryResult};
pub use shm::{
    shm_ckpt_info, shm_publish_header, shm_read_header, shm_write_ckpt_info, ShmAccess, VecShm,
};

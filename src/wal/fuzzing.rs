//! The one entry point shared by the WAL fuzz target (`fuzz/fuzz_targets/wal_parse.rs`) and
//! its seed-corpus test (`tests/fuzz_corpus.rs`): arbitrary bytes as a WAL file and as a
//! wal-index, through every parser and the recovery scan. A panic is a bug: parsers must
//! return errors (or "empty") on any input.

use super::{
    decode_page_size, hash_lookup_checked, recover_scan, CkptInfo, FrameHeader, ShmAccess, VecShm,
    WalHeader, WalIndexHeader, FRAME_HEADER_SIZE, SHM_HEADER_SIZE, WAL_HEADER_SIZE,
};
use std::os::unix::fs::FileExt;

/// `data` seen as a file (reads past the end are short, as from a real file).
struct MemFile<'a>(&'a [u8]);

impl FileExt for MemFile<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = (offset as usize).min(self.0.len());
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<usize> {
        Err(std::io::Error::other("read-only"))
    }
}

/// Properties: a recovered WAL never claims frames beyond the bytes; the recovered pgnos are
/// one per valid frame; a valid wal-index header round-trips through its encoder; lookups in
/// an arbitrary wal-index answer (or say corrupt) without panicking.
pub fn exercise_wal(data: &[u8]) {
    let _ = WalHeader::parse(data);
    if let Ok(Some(h)) = WalHeader::parse_for_recovery(data) {
        assert_eq!(
            WalHeader::parse(&h.to_bytes()).map(|x| x.to_bytes()).ok(),
            Some(h.to_bytes())
        );
    }
    if data.len() >= FRAME_HEADER_SIZE {
        let f = FrameHeader::parse(&data[..FRAME_HEADER_SIZE]);
        assert_eq!(FrameHeader::parse(&f.encode()), f);
    }
    if let Ok(r) = recover_scan(&MemFile(data)) {
        assert!(r.mx_frame <= r.valid_frames);
        assert_eq!(r.pgnos.len(), r.valid_frames as usize);
        if let Some(h) = &r.header {
            let end = WAL_HEADER_SIZE as u64 + r.valid_frames as u64 * h.frame_size();
            assert!(
                end <= data.len() as u64,
                "recovery claims bytes past the end"
            );
        } else {
            assert_eq!(r.valid_frames, 0);
        }
    }
    if data.len() >= SHM_HEADER_SIZE {
        if let Some(h) = WalIndexHeader::read_valid(&data[..96]) {
            let again = h.encode();
            let mut both = [0u8; 96];
            both[..48].copy_from_slice(&again);
            both[48..].copy_from_slice(&again);
            assert_eq!(WalIndexHeader::read_valid(&both), Some(h));
        }
        let _ = CkptInfo::parse(&data[..SHM_HEADER_SIZE]);
        let shm = VecShm::from_bytes(data);
        let max = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) % 20_000;
        for pgno in [1u32, 2, 3, u32::from(data[4]) + 1] {
            let _ = hash_lookup_checked(&shm, pgno, 1, max);
        }
        let _ = shm.block_count();
    }
    if data.len() >= 2 {
        let _ = decode_page_size(u16::from_le_bytes([data[0], data[1]]));
    }
}

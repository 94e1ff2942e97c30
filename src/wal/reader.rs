//! Reading a WAL file (WAL.md §A.3–§A.6): the validating streaming `FrameReader` and the
//! recovery scan `recover_scan`.
//!
//! Owns: `Frame`, `FrameReader`, `RecoveryResult`, `recover_scan`.
//!
//! Invariants:
//! - The reader never returns an unvalidated frame: salts equal the header's, page number
//!   non-zero, stored checksum equal to the running checksum. A short read (EOF) ends the
//!   stream; a bad frame is an `Error::Corrupt` naming it and the reader does not advance.
//! - Reads go through `FileExt::read_exact_at` only: no seek position, no locks (SQLite holds
//!   no locks on the WAL file, so a private read-only handle is safe).
//! - `recover_scan` decides exactly as SQLite's recovery: mxFrame = last valid commit frame.

use std::io::ErrorKind;
use std::os::unix::fs::FileExt;

use super::checksum::CksumPair;
use super::file::{
    frame_cksum, frame_offset, FrameHeader, WalHeader, FRAME_HEADER_SIZE, WAL_HEADER_SIZE,
};
use crate::error::{Error, Result};
use crate::types::PageSize;

/// One validated frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub frame_no: u32,
    pub header: FrameHeader,
    /// The page image (`page_size` bytes).
    pub data: Vec<u8>,
}

/// Validated, streaming reader of consecutive frames from any `FileExt` source.
pub struct FrameReader<'a, F: FileExt> {
    file: &'a F,
    page_size: PageSize,
    salts: [u8; 8],
    big_endian: bool,
    next: u32,
    running: CksumPair,
    buf: Vec<u8>,
}

impl<'a, F: FileExt> FrameReader<'a, F> {
    /// `start_frame` is the first frame to read (1-based; 0 is treated as 1); `running` is the
    /// checksum state after frame `start_frame - 1` (the WAL header checksum if it is 1).
    pub fn new(file: &'a F, header: &WalHeader, start_frame: u32, running: CksumPair) -> Self {
        FrameReader {
            file,
            page_size: header.page_size,
            salts: header.salts,
            big_endian: header.big_endian_cksum,
            next: start_frame.max(1),
            running,
            buf: vec![0u8; FRAME_HEADER_SIZE + header.page_size.bytes()],
        }
    }

    /// Reads and validates frame `next_frame_no()`. `Ok(None)` when the frame does not fit in
    /// the file (EOF); `Err(Error::Corrupt)` naming the frame when its salts, page number or
    /// checksum are wrong (the reader does not advance then); `Err(Error::Io)` on I/O errors.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        let frame_no = self.next;
        let off = frame_offset(self.page_size, frame_no);
        match self.file.read_exact_at(&mut self.buf, off) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    format!("reading WAL frame {frame_no} at offset {off}"),
                    e,
                ))
            }
        }
        let header = FrameHeader::parse(&self.buf);
        if header.salts != self.salts {
            return Err(Error::Corrupt(format!(
                "WAL frame {frame_no}: salts {:02x?} differ from the WAL header's {:02x?} (frame of an older generation or garbage)",
                header.salts, self.salts
            )));
        }
        if header.pgno == 0 {
            return Err(Error::Corrupt(format!(
                "WAL frame {frame_no}: page number is 0"
            )));
        }
        let page = &self.buf[FRAME_HEADER_SIZE..];
        let cksum = frame_cksum(
            self.running,
            header.pgno,
            header.commit_size,
            page,
            self.big_endian,
        );
        if cksum != header.cksum {
            return Err(Error::Corrupt(format!(
                "WAL frame {frame_no}: checksum mismatch: stored {:08x}/{:08x}, computed {:08x}/{:08x} (torn write or broken chain)",
                header.cksum.0, header.cksum.1, cksum.0, cksum.1
            )));
        }
        self.running = cksum;
        self.next = frame_no + 1;
        Ok(Some(Frame {
            frame_no,
            header,
            data: page.to_vec(),
        }))
    }

    /// Checksum state after the last frame returned (or the initial state).
    pub fn running(&self) -> CksumPair {
        self.running
    }

    /// The frame number `next_frame` will read.
    pub fn next_frame_no(&self) -> u32 {
        self.next
    }
}

/// Outcome of a recovery scan (WAL.md §A.6). `mx_frame == 0` means the WAL is empty for SQLite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryResult {
    /// The valid WAL header, or `None` when the file is too short or the header is invalid.
    pub header: Option<WalHeader>,
    /// Last valid commit frame (0 if none).
    pub mx_frame: u32,
    /// Commit size of frame `mx_frame` (0 if none).
    pub n_page: u32,
    /// Running checksum at `mx_frame`; (0, 0) when `mx_frame == 0` (as SQLite's recovery leaves it).
    pub frame_cksum: CksumPair,
    /// Number of consecutive valid frames, including any uncommitted tail after `mx_frame`
    /// (SQLite's recovery indexes those too).
    pub valid_frames: u32,
    /// Page number of every valid frame: `pgnos[i]` belongs to frame `i + 1`.
    pub pgnos: Vec<u32>,
}

impl RecoveryResult {
    fn empty(header: Option<WalHeader>) -> RecoveryResult {
        RecoveryResult {
            header,
            mx_frame: 0,
            n_page: 0,
            frame_cksum: (0, 0),
            valid_frames: 0,
            pgnos: Vec::new(),
        }
    }
}

/// Recovery scan (WAL.md §A.6) over a whole WAL file. An invalid or short header yields
/// `mx_frame == 0`; a good checksum with an unknown version is an error (SQLite refuses to
/// open). The scan stops at the first frame that is incomplete or invalid.
pub fn recover_scan<F: FileExt>(file: &F) -> Result<RecoveryResult> {
    let mut hb = [0u8; WAL_HEADER_SIZE];
    match file.read_exact_at(&mut hb, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(RecoveryResult::empty(None)),
        Err(e) => return Err(Error::io("reading the WAL header", e)),
    }
    let header = match WalHeader::parse_for_recovery(&hb)? {
        Some(h) => h,
        None => return Ok(RecoveryResult::empty(None)),
    };
    let mut out = RecoveryResult::empty(Some(header));
    let mut reader = FrameReader::new(file, &header, 1, header.cksum);
    loop {
        let frame = match reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) | Err(Error::Corrupt(_)) => break,
            Err(e) => return Err(e),
        };
        out.valid_frames = frame.frame_no;
        out.pgnos.push(frame.header.pgno);
        if frame.header.is_commit() {
            out.mx_frame = frame.frame_no;
            out.n_page = frame.header.commit_size;
            out.frame_cksum = frame.header.cksum;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::checksum::cksum_extend;
    use crate::wal::file::encode_frame;
    use std::io;

    /// In-memory `FileExt` for tests.
    struct MemFile(Vec<u8>);

    impl FileExt for MemFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let off = offset as usize;
            if off >= self.0.len() {
                return Ok(0);
            }
            let n = buf.len().min(self.0.len() - off);
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            Ok(n)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::Unsupported, "read-only"))
        }
    }

    /// Builds a WAL: `frames` = (pgno, commit_size) with page data derived from the index.
    fn build_wal(be: bool, ps: u32, frames: &[(u32, u32)]) -> (Vec<u8>, WalHeader, Vec<CksumPair>) {
        let ps = PageSize::new(ps).unwrap();
        let (hb, hdr) = WalHeader::encode(be, ps, 1, [0xa1, 0xa2, 0xa3, 0xa4, 5, 6, 7, 8]);
        let mut wal = hb.to_vec();
        let mut run = hdr.cksum;
        let mut cks = Vec::new();
        for (i, &(pgno, commit)) in frames.iter().enumerate() {
            let page = vec![(i * 7 + 1) as u8; ps.bytes()];
            let (fb, c) = encode_frame(run, pgno, commit, hdr.salts, &page, be);
            assert_eq!(fb.len() as u64, hdr.frame_size());
            assert_eq!(wal.len() as u64, frame_offset(ps, i as u32 + 1));
            wal.extend_from_slice(&fb);
            run = c;
            cks.push(c);
        }
        (wal, hdr, cks)
    }

    #[test]
    fn reader_and_recovery() {
        for be in [false, true] {
            let frames = [(1, 0), (2, 0), (3, 3), (2, 3), (5, 0), (6, 0)];
            let (wal, hdr, cks) = build_wal(be, 512, &frames);
            let f = MemFile(wal.clone());
            let mut r = FrameReader::new(&f, &hdr, 1, hdr.cksum);
            for (i, &(pgno, commit)) in frames.iter().enumerate() {
                let fr = r.next_frame().unwrap().unwrap();
                assert_eq!(fr.frame_no, i as u32 + 1);
                assert_eq!((fr.header.pgno, fr.header.commit_size), (pgno, commit));
                assert_eq!(r.running(), cks[i]);
            }
            assert!(r.next_frame().unwrap().is_none());
            assert_eq!(r.next_frame_no(), 7);
            // Resume from the middle.
            let mut r = FrameReader::new(&f, &hdr, 4, cks[2]);
            assert_eq!(r.next_frame().unwrap().unwrap().header.pgno, 2);
            let rec = recover_scan(&f).unwrap();
            assert_eq!(rec.header, Some(hdr));
            assert_eq!((rec.mx_frame, rec.n_page, rec.frame_cksum), (4, 3, cks[3]));
            assert_eq!(rec.valid_frames, 6);
            assert_eq!(rec.pgnos, vec![1, 2, 3, 2, 5, 6]);
            // Partial last frame: EOF, not an error.
            let f = MemFile(wal[..wal.len() - 1].to_vec());
            assert_eq!(recover_scan(&f).unwrap().valid_frames, 5);
        }
    }

    #[test]
    fn reader_rejects_bad_frames() {
        let frames = [(1, 0), (2, 2), (3, 3)];
        let (wal, hdr, _) = build_wal(false, 512, &frames);
        let fs = hdr.frame_size() as usize;
        let f2 = 32 + fs; // frame 2 offset
                          // Flip a page byte of frame 2.
        let mut w = wal.clone();
        w[f2 + 24 + 100] ^= 0x40;
        let f = MemFile(w);
        let mut r = FrameReader::new(&f, &hdr, 1, hdr.cksum);
        r.next_frame().unwrap().unwrap();
        let e = r.next_frame().unwrap_err();
        assert!(
            matches!(e, Error::Corrupt(ref m) if m.contains("frame 2") && m.contains("checksum")),
            "{e}"
        );
        assert_eq!(r.next_frame_no(), 2);
        let rec = recover_scan(&f).unwrap();
        assert_eq!((rec.mx_frame, rec.valid_frames), (0, 1));
        assert_eq!(rec.frame_cksum, (0, 0));
        // Wrong salt in frame 3.
        let mut w = wal.clone();
        w[f2 + fs + 9] ^= 1;
        let f = MemFile(w);
        let mut r = FrameReader::new(&f, &hdr, 1, hdr.cksum);
        r.next_frame().unwrap();
        r.next_frame().unwrap();
        assert!(
            matches!(r.next_frame(), Err(Error::Corrupt(m)) if m.contains("frame 3") && m.contains("salt"))
        );
        assert_eq!(recover_scan(&f).unwrap().mx_frame, 2);
        // pgno 0 in frame 1.
        let mut w = wal;
        w[32..36].copy_from_slice(&[0; 4]);
        let f = MemFile(w);
        let mut r = FrameReader::new(&f, &hdr, 1, hdr.cksum);
        assert!(matches!(r.next_frame(), Err(Error::Corrupt(m)) if m.contains("frame 1")));
    }

    #[test]
    fn short_and_invalid_files_are_empty() {
        assert_eq!(recover_scan(&MemFile(Vec::new())).unwrap().header, None);
        assert_eq!(recover_scan(&MemFile(vec![0; 31])).unwrap().mx_frame, 0);
        assert_eq!(recover_scan(&MemFile(vec![0; 4096])).unwrap().header, None);
        let (hb, hdr) = WalHeader::encode(false, PageSize::new(65536).unwrap(), 0, [0; 8]);
        let rec = recover_scan(&MemFile(hb.to_vec())).unwrap();
        assert_eq!((rec.header, rec.mx_frame), (Some(hdr), 0));
    }

    #[test]
    fn recovery_refuses_unknown_version() {
        let (mut v, _) = WalHeader::encode(false, PageSize::new(1024).unwrap(), 3, [9; 8]);
        v[4..8].copy_from_slice(&3_007_001u32.to_be_bytes());
        let c = cksum_extend((0, 0), &v[..24], false);
        v[24..28].copy_from_slice(&c.0.to_be_bytes());
        v[28..32].copy_from_slice(&c.1.to_be_bytes());
        assert!(recover_scan(&MemFile(v.to_vec())).is_err());
        // Wrong version with a bad checksum: ignored (empty WAL).
        v[31] ^= 1;
        assert_eq!(recover_scan(&MemFile(v.to_vec())).unwrap().mx_frame, 0);
    }
}

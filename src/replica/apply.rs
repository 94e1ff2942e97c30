//! The applier's WAL writer (WAL.md §E.2 steps 3–10, §C.4, §C.6), written against the pure
//! `wal` algorithms so it runs on the live wal-index (`LiveShm`) and on `VecShm` in tests.
//! The caller holds the WAL WRITE lock for the whole call.
//!
//! Invariants (WAL.md §E.3): frames ≤ the published mxFrame are never touched; mxFrame only
//! goes down through a §C.6 restart taken with READ1..4 exclusive; hash entries are appended in
//! frame order, aPgno before the slot; the header is published copy 2, barrier, copy 1 with
//! nothing in between; read-marks and nBackfill are only written by the restart, holding
//! every lock they need. A new WAL header is fdatasync'ed before the first frame of its
//! generation; the frames themselves are fdatasync'ed by the caller right after the publish and
//! before the position records them (§E.5), so readers do not wait for the disk.

use crate::error::Error;
#[cfg(test)]
use crate::error::Result;
use crate::types::PageSize;
use crate::util::hex;
use crate::wal::{
    self, hash_insert, hash_truncate, native_is_big_endian, shm_ckpt_info, shm_publish_header,
    shm_read_header, shm_write_ckpt_info, CkptInfo, ShmAccess, WalHeader, WalIndexHeader, WalLocks,
    READMARK_UNUSED, SHM_VERSION, SLOT_READ1,
};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Why the applier did not write.
#[derive(Debug)]
pub enum ApplyError {
    /// The wal-index header is invalid: run stock recovery (a read on a normal connection) and retry.
    NeedRecovery,
    /// The live header is not the one we published last: someone else wrote to the replica.
    Foreign(String),
    Other(Error),
}

impl From<Error> for ApplyError {
    fn from(e: Error) -> ApplyError {
        ApplyError::Other(e)
    }
}

/// The ownership rule of WAL.md §E.2 step 4: may we append after `live`, given that `last` is
/// the header we published last (None: no expectation, e.g. right after bootstrap or a re-scan)?
pub fn owned(
    live: &WalIndexHeader,
    last: Option<&WalIndexHeader>,
) -> std::result::Result<(), String> {
    let Some(last) = last else { return Ok(()) };
    if live.mx_frame == last.mx_frame
        && live.salts == last.salts
        && live.frame_cksum == last.frame_cksum
    {
        return Ok(()); // identical, or rebuilt by recovery (iChange differs)
    }
    if live.mx_frame == 0 {
        // A stock TRUNCATE/RESTART checkpoint, or the WAL deleted by a last closer: both only
        // happen after every frame was copied into the database file.
        return Ok(());
    }
    Err(format!(
        "the replica's WAL changed behind the applier: mxFrame {} salts {} (expected mxFrame {} salts {}): \
         a process wrote to the replica without the extension",
        live.mx_frame,
        hex(&live.salts),
        last.mx_frame,
        hex(&last.salts)
    ))
}

/// Append one replica commit holding `pages` (ascending page numbers, final images) with
/// database size `commit_size`, and publish it. WRITE must be held by the caller. Returns the
/// header now published.
pub fn append_commit<S: ShmAccess + WalLocks>(
    shm: &mut S,
    wal: &File,
    last: Option<&WalIndexHeader>,
    page_size: PageSize,
    pages: &[(u32, &[u8])],
    commit_size: u32,
) -> std::result::Result<WalIndexHeader, ApplyError> {
    if pages.is_empty() {
        return Err(Error::Misuse("append_commit: no pages (include page 1)".into()).into());
    }
    let mut a = FrameAppender::begin(shm, wal, last, page_size)?;
    for (pgno, data) in pages {
        a.push(*pgno, data)?;
    }
    a.finish(commit_size)
}

/// Bytes of frames buffered before they are written to the WAL.
const APPEND_BUFFER: usize = 1 << 20;

/// One replica commit written frame by frame (memory: about a MiB of frames and one page,
/// whatever the commit's size): `begin` (ownership check, §C.6 restart, WAL header), `push`
/// every page (a page may come more than once: the last frame of a page wins, as for SQLite),
/// `finish` with the database size: the last page becomes the commit frame and the header is
/// published. Until `finish`, nothing is visible: frames past the published mxFrame and their
/// hash entries are ignored by readers and cleared by the next writer (§B.5). Dropping an
/// unfinished appender leaves exactly that. WRITE must be held by the caller throughout.
pub struct FrameAppender<'a, S: ShmAccess + WalLocks> {
    shm: &'a mut S,
    wal: &'a File,
    h: WalIndexHeader,
    page_size: PageSize,
    big_endian: bool,
    salts: [u8; 8],
    running: (u32, u32),
    /// The first frame of this commit.
    start: u32,
    /// Frames encoded so far (the held-back page not included).
    encoded: u32,
    /// Encoded frames not yet written, starting at frame `start + written`.
    buf: Vec<u8>,
    written: u32,
    /// The last page pushed, held back: it becomes the commit frame, or a plain one when
    /// another page follows.
    held: Option<(u32, Vec<u8>)>,
}

impl<'a, S: ShmAccess + WalLocks> FrameAppender<'a, S> {
    pub fn begin(
        shm: &'a mut S,
        wal: &'a File,
        last: Option<&WalIndexHeader>,
        page_size: PageSize,
    ) -> std::result::Result<Self, ApplyError> {
        let mut h = shm_read_header(shm).ok_or(ApplyError::NeedRecovery)?;
        if h.version != SHM_VERSION {
            return Err(Error::Corrupt(format!(
                "wal-index version {} is not {SHM_VERSION}",
                h.version
            ))
            .into());
        }
        owned(&h, last).map_err(ApplyError::Foreign)?;
        if h.page_size != 0 && h.page_size != page_size.get() {
            return Err(Error::Corrupt(format!(
                "the replica's page size is {} but the records' is {}; bootstrap into a new file",
                h.page_size, page_size
            ))
            .into());
        }
        // WAL.md §C.6: restart when everything was checkpointed and no reader uses the WAL.
        let ck = shm_ckpt_info(shm);
        if h.mx_frame > 0 && ck.n_backfill == h.mx_frame && shm.try_lock_exclusive(SLOT_READ1, 4) {
            h = restart(shm, &h);
            shm.unlock_exclusive(SLOT_READ1, 4);
        }
        let big_endian;
        let salts;
        let running;
        let start;
        if h.mx_frame == 0 {
            salts = if h.salts == [0u8; 8] {
                random_salts()
            } else {
                h.salts
            };
            let seq = read_wal_header(wal).map_or(0, |w| w.ckpt_seq.wrapping_add(1));
            big_endian = native_is_big_endian();
            let (bytes, whdr) = WalHeader::encode(big_endian, page_size, seq, salts);
            wal.write_all_at(&bytes, 0)
                .map_err(|e| Error::io("writing the replica's WAL header", e))?;
            // WAL.md §E.5: the new header must be durable before frames of the generation follow it.
            wal.sync_data()
                .map_err(|e| Error::io("syncing the replica's WAL header", e))?;
            running = whdr.cksum;
            start = 1;
        } else {
            let whdr = read_wal_header(wal).ok_or_else(|| {
                Error::Corrupt(
                    "the replica's WAL header is unreadable although frames are published".into(),
                )
            })?;
            if whdr.salts != h.salts {
                return Err(Error::Corrupt(
                    "the replica's WAL header salts differ from the wal-index header".into(),
                )
                .into());
            }
            big_endian = whdr.big_endian_cksum;
            salts = h.salts;
            running = h.frame_cksum;
            start = h.mx_frame + 1;
            // Stale entries of an aborted writer or a recovery scan (WAL.md §B.5 step 3).
            hash_truncate(shm, h.mx_frame);
        }
        Ok(FrameAppender {
            shm,
            wal,
            h,
            page_size,
            big_endian,
            salts,
            running,
            start,
            encoded: 0,
            buf: Vec::new(),
            written: 0,
            held: None,
        })
    }

    /// Adds page `pgno` (its final image so far) to the commit.
    pub fn push(&mut self, pgno: u32, data: &[u8]) -> std::result::Result<(), ApplyError> {
        if data.len() != self.page_size.bytes() {
            return Err(Error::Corrupt(format!(
                "page {pgno}: {} bytes, expected {}",
                data.len(),
                self.page_size
            ))
            .into());
        }
        if let Some((p, d)) = self.held.take() {
            self.encode(p, &d, 0)?;
            self.held = Some((p, d));
            let held = self.held.as_mut().expect("just set");
            held.0 = pgno;
            held.1.copy_from_slice(data);
        } else {
            self.held = Some((pgno, data.to_vec()));
        }
        if self.buf.len() >= APPEND_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    fn encode(
        &mut self,
        pgno: u32,
        data: &[u8],
        commit: u32,
    ) -> std::result::Result<(), ApplyError> {
        let frame_no = self
            .start
            .checked_add(self.encoded)
            .filter(|f| *f < u32::MAX - 1)
            .ok_or_else(|| {
                Error::Unsupported("the replica's WAL would exceed 2^32 frames".into())
            })?;
        let (frame, c) = wal::encode_frame(
            self.running,
            pgno,
            commit,
            self.salts,
            data,
            self.big_endian,
        );
        self.running = c;
        self.buf.extend_from_slice(&frame);
        self.encoded += 1;
        let _ = frame_no;
        Ok(())
    }

    /// Writes the buffered frames and enters them in the hash tables (not yet visible).
    fn flush(&mut self) -> std::result::Result<(), ApplyError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let first = self.start + self.written;
        self.wal
            .write_all_at(&self.buf, wal::frame_offset(self.page_size, first))
            .map_err(|e| Error::io("writing frames to the replica's WAL", e))?;
        let frame_len = self.page_size.bytes() + wal::FRAME_HEADER_SIZE;
        for (i, frame) in self.buf.chunks(frame_len).enumerate() {
            let pgno = u32::from_be_bytes(frame[0..4].try_into().expect("4 bytes"));
            hash_insert(self.shm, first + i as u32, pgno)?;
        }
        self.written = self.encoded;
        self.buf.clear();
        Ok(())
    }

    /// The last page pushed becomes the commit frame (database size `commit_size`); the frames
    /// are written and the new header published. Returns it.
    pub fn finish(mut self, commit_size: u32) -> std::result::Result<WalIndexHeader, ApplyError> {
        let Some((p, d)) = self.held.take() else {
            return Err(Error::Misuse("append_commit: no pages (include page 1)".into()).into());
        };
        self.encode(p, &d, commit_size)?;
        self.flush()?;
        // No fsync before the publish (WAL.md §E.5: visibility needs none; readers share the
        // page cache): the caller syncs after publishing and before recording the position, so
        // the recorded position never exceeds what is durable.
        let new = WalIndexHeader {
            version: SHM_VERSION,
            change: self.h.change.wrapping_add(1),
            is_init: 1,
            big_end_cksum: self.big_endian,
            page_size: self.page_size.get(),
            mx_frame: self.start + self.encoded - 1,
            n_page: commit_size,
            frame_cksum: self.running,
            salts: self.salts,
            cksum: (0, 0),
        };
        shm_publish_header(self.shm, &new);
        Ok(new.with_cksum())
    }
}

/// WAL.md §C.6 restart writes (WRITE and READ1..4 held): mxFrame 0, salt-1 + 1, new salt-2,
/// the checkpoint information reset; published at once. Returns the new header.
fn restart<S: ShmAccess>(shm: &mut S, h: &WalIndexHeader) -> WalIndexHeader {
    let mut salts = h.salts;
    let s1 = u32::from_be_bytes([salts[0], salts[1], salts[2], salts[3]]).wrapping_add(1);
    salts[0..4].copy_from_slice(&s1.to_be_bytes());
    salts[4..8].copy_from_slice(&random_salts()[4..8]);
    let new = WalIndexHeader {
        mx_frame: 0,
        salts,
        ..*h
    };
    shm_publish_header(shm, &new);
    let mut marks = [READMARK_UNUSED; wal::N_READ_MARKS];
    marks[0] = 0;
    marks[1] = 0;
    shm_write_ckpt_info(
        shm,
        &CkptInfo {
            n_backfill: 0,
            read_marks: marks,
            n_backfill_attempted: 0,
        },
    );
    new.with_cksum()
}

fn read_wal_header(wal: &File) -> Option<WalHeader> {
    let mut b = [0u8; wal::WAL_HEADER_SIZE];
    wal.read_exact_at(&mut b, 0).ok()?;
    WalHeader::parse(&b).ok()
}

fn random_salts() -> [u8; 8] {
    let mut b = [0u8; 8];
    let _ = crate::util::urandom(&mut b);
    if b == [0u8; 8] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        b = (t | 1).to_le_bytes();
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{hash_lookup, recover_scan, VecShm};

    struct Locks {
        shm: VecShm,
        readers: bool,
    }
    impl ShmAccess for Locks {
        fn block_count(&self) -> u32 {
            self.shm.block_count()
        }
        fn ensure_block(&mut self, k: u32) -> Result<()> {
            self.shm.ensure_block(k)
        }
        fn read_u32(&self, b: u32, o: usize) -> u32 {
            self.shm.read_u32(b, o)
        }
        fn write_u32(&mut self, b: u32, o: usize, v: u32) {
            self.shm.write_u32(b, o, v)
        }
        fn read_u16(&self, b: u32, o: usize) -> u16 {
            self.shm.read_u16(b, o)
        }
        fn write_u16(&mut self, b: u32, o: usize, v: u16) {
            self.shm.write_u16(b, o, v)
        }
        fn barrier(&self) {}
    }
    impl WalLocks for Locks {
        fn try_lock_exclusive(&mut self, _o: u32, _n: u32) -> bool {
            !self.readers
        }
        fn unlock_exclusive(&mut self, _o: u32, _n: u32) {}
    }

    fn fresh() -> Locks {
        let mut shm = VecShm::new();
        shm.ensure_block(0).unwrap();
        let h = WalIndexHeader {
            version: SHM_VERSION,
            is_init: 1,
            ..Default::default()
        };
        shm_publish_header(&mut shm, &h);
        let mut marks = [READMARK_UNUSED; wal::N_READ_MARKS];
        marks[0] = 0;
        shm_write_ckpt_info(
            &mut shm,
            &CkptInfo {
                n_backfill: 0,
                read_marks: marks,
                n_backfill_attempted: 0,
            },
        );
        Locks {
            shm,
            readers: false,
        }
    }

    fn page(b: u8) -> Vec<u8> {
        vec![b; 1024]
    }

    /// An empty WAL file in a temporary directory (kept alive by the returned guard).
    fn temp_wal() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let wal = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("x-wal"))
            .unwrap();
        (dir, wal)
    }

    #[test]
    fn appended_commits_recover_and_look_up() {
        let ps = PageSize::new(1024).unwrap();
        let (_dir, wal) = temp_wal();
        let mut s = fresh();
        let p1 = page(1);
        let p2 = page(2);
        let h1 = append_commit(&mut s, &wal, None, ps, &[(1, &p1), (2, &p2)], 2).unwrap();
        assert_eq!((h1.mx_frame, h1.n_page, h1.change), (2, 2, 1));
        let p3 = page(3);
        // Many frames across a block boundary.
        let mut last = h1;
        for i in 0..5000u32 {
            last = append_commit(&mut s, &wal, Some(&last), ps, &[((i % 7) + 1, &p3)], 7).unwrap();
        }
        assert_eq!(last.mx_frame, 5002);
        // Stock recovery over our WAL finds the same commit point and checksum.
        let r = recover_scan(&wal).unwrap();
        assert_eq!(r.mx_frame, last.mx_frame);
        assert_eq!(r.frame_cksum, last.frame_cksum);
        // The hash index finds the newest frame of each page.
        let newest =
            |pg: u32, below: u32| (0..below).rev().find(|i| i % 7 + 1 == pg).map(|i| i + 3);
        assert_eq!(hash_lookup(&s, 2, 1, last.mx_frame), newest(2, 5000));
        assert_eq!(hash_lookup(&s, 7, 1, last.mx_frame), newest(7, 5000));
        assert_eq!(hash_lookup(&s, 7, 1, 4000), newest(7, 3998));
        assert_eq!(hash_lookup(&s, 1, 1, 2), Some(1));
        // A header changed behind our back is refused.
        let e = append_commit(&mut s, &wal, Some(&h1), ps, &[(1, &p1)], 7).unwrap_err();
        assert!(matches!(e, ApplyError::Foreign(_)), "{e:?}");
    }

    #[test]
    fn restart_only_when_checkpointed_and_no_reader() {
        let ps = PageSize::new(1024).unwrap();
        let (_dir, wal) = temp_wal();
        let mut s = fresh();
        let p = page(9);
        let h = append_commit(&mut s, &wal, None, ps, &[(1, &p), (2, &p)], 2).unwrap();
        // Not checkpointed: append.
        let h = append_commit(&mut s, &wal, Some(&h), ps, &[(1, &p)], 2).unwrap();
        assert_eq!(h.mx_frame, 3);
        // Checkpointed but a reader holds READ_i: append.
        let mut ck = shm_ckpt_info(&s);
        ck.n_backfill = 3;
        shm_write_ckpt_info(&mut s, &ck);
        s.readers = true;
        let h = append_commit(&mut s, &wal, Some(&h), ps, &[(2, &p)], 2).unwrap();
        assert_eq!(h.mx_frame, 4);
        // Checkpointed, no reader: restart with salt-1 + 1, frame 1 again.
        let mut ck = shm_ckpt_info(&s);
        ck.n_backfill = 4;
        shm_write_ckpt_info(&mut s, &ck);
        s.readers = false;
        let old = h.salts;
        let h2 = append_commit(&mut s, &wal, Some(&h), ps, &[(2, &p)], 2).unwrap();
        assert_eq!(h2.mx_frame, 1);
        let s1 = |b: [u8; 8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(s1(h2.salts), s1(old).wrapping_add(1));
        assert_eq!(shm_ckpt_info(&s).n_backfill, 0);
        assert_eq!(h2.change, h.change + 1);
        let r = recover_scan(&wal).unwrap();
        assert_eq!(r.mx_frame, 1);
    }
}

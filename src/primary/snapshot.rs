//! Whole-database snapshots on the primary: the SNAPSHOT record of the published state (the
//! first one of a lineage, and the one that starts a new generation after a gap) and the
//! check that the database file alone is the captured state (an empty WAL after a crash).
//! WRITE is held by every caller, so the state cannot move while it is read.

use super::Position;
use super::{log_event, Capture, DbFileIo, Primary};
use crate::error::{Error, Result};
use crate::txlog::{DbChecksum, Page, Record, RecordMeta};
use crate::types::{Generation, Lsn, PageNo, PageSize};
use crate::util::now_ms;
use crate::wal::{self, FrameReader, WalIndexHeader};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

impl Primary {
    /// With the WAL empty (mxFrame 0, WRITE held): is the database file the captured state?
    /// Reads the whole file; only used on the rare crash + recovery path.
    pub(super) fn db_file_matches(&self, st: &Capture, io: &dyn DbFileIo) -> Result<bool> {
        let mut head = [0u8; 100];
        io.read_db(0, &mut head)?;
        let ps = st.sums.page_size();
        let n_pages = u32::from_be_bytes(head[28..32].try_into().expect("4 bytes"));
        if PageSize::from_db_header(&head) != Some(ps) || n_pages != st.sums.size() {
            return Ok(false);
        }
        let mut sums = DbChecksum::new(ps);
        let mut buf = vec![0u8; ps.bytes()];
        for pgno in 1..=n_pages {
            io.read_db((pgno as u64 - 1) * ps.get() as u64, &mut buf)?;
            sums.set_page(PageNo::new(pgno).expect("pgno >= 1"), &buf);
        }
        sums.truncate(n_pages);
        Ok(sums.total() == st.sums.total())
    }

    /// A gap: log it and start generation + 1 with a full snapshot as the next LSN.
    pub(super) fn new_generation(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        reason: &str,
    ) -> Result<()> {
        let lsn = st.pos.lsn.next();
        let generation = Generation(st.pos.generation.0 + 1);
        log_event(&format!(
            "event=gap db={:?} reason={:?} new_generation={} lsn={}",
            self.db_path, reason, generation, lsn
        ));
        let rec = self.snapshot_record(st, io, h, lsn, generation)?;
        st.log.append(&rec)?;
        st.log.write_snapshot(&rec)?;
        st.pos = Position::from_meta(&rec.meta);
        st.gaps += 1;
        st.last_error = Some(format!(
            "gap detected ({reason}); generation {generation} started with a snapshot at LSN {lsn}"
        ));
        self.save_position(st)
    }

    /// The snapshot file of the state published in `h`, streamed (WRITE held: the state
    /// cannot move): the pages are read twice, once for the checksums the record header
    /// carries and once into the file, so memory is a page plus the per-page checksums
    /// (and the WAL's page → frame map), never the database. Sets the capture checksums.
    pub(super) fn write_snapshot_streamed(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        lsn: Lsn,
        generation: Generation,
    ) -> Result<RecordMeta> {
        let mut wal_pages: BTreeMap<u32, u32> = BTreeMap::new();
        let mut frame_cksum = (0, 0);
        let mut ps = None;
        let mut f_opt = None;
        if h.mx_frame > 0 {
            let f = self.wal_file(st)?;
            let hdr = self.wal_header(st, h.salts)?;
            let mut reader = FrameReader::new(&*f, &hdr, 1, hdr.cksum);
            while reader.next_frame_no() <= h.mx_frame {
                let fr = reader.next_frame()?.ok_or_else(|| {
                    Error::Corrupt(format!("WAL ends before published frame {}", h.mx_frame))
                })?;
                wal_pages.insert(fr.header.pgno, fr.frame_no);
            }
            frame_cksum = reader.running();
            ps = Some(hdr.page_size);
            f_opt = Some(f);
        }
        let mut head = [0u8; 100];
        io.read_db(0, &mut head)?;
        let ps = match ps {
            Some(p) => p,
            None => PageSize::from_db_header(&head).unwrap_or(PageSize::new(4096).expect("valid")),
        };
        let n_pages = if h.mx_frame > 0 {
            h.n_page
        } else {
            u32::from_be_bytes(head[28..32].try_into().expect("4 bytes"))
        };
        let mut read_page = |pgno: u32, buf: &mut [u8]| -> Result<()> {
            match (wal_pages.get(&pgno), &f_opt) {
                (Some(&fno), Some(f)) => {
                    let off = wal::frame_offset(ps, fno) + wal::FRAME_HEADER_SIZE as u64;
                    f.read_exact_at(buf, off)
                        .map_err(|e| Error::io("reading a WAL frame", e))
                }
                _ => io.read_db((pgno as u64 - 1) * ps.get() as u64, buf),
            }
        };
        let lock_page = ps.lock_byte_page().get();
        let mut sums = DbChecksum::new(ps);
        let mut buf = vec![0u8; ps.bytes()];
        let mut count = 0u32;
        for pgno in (1..=n_pages).filter(|&p| p != lock_page) {
            read_page(pgno, &mut buf)?;
            sums.set_page(PageNo::new(pgno).expect("pgno >= 1"), &buf);
            count += 1;
        }
        sums.truncate(n_pages);
        let meta = RecordMeta {
            lsn,
            generation,
            snapshot: true,
            page_size: ps,
            commit_size: n_pages,
            timestamp_ms: now_ms(),
            wal_salts: h.salts,
            wal_frame: h.mx_frame,
            wal_cksum: if h.mx_frame > 0 { frame_cksum } else { (0, 0) },
            db_checksum: sums.total(),
            page_count: count,
        };
        crate::txlog::write_streamed(
            &self.dir.join("snap"),
            &meta,
            st.log.config().compression,
            &mut read_page,
        )?;
        st.sums = sums;
        st.page_size = Some(ps);
        Ok(meta)
    }

    /// A SNAPSHOT record of the state published in `h` (WRITE held: the state cannot move).
    pub(super) fn snapshot_record(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        lsn: Lsn,
        generation: Generation,
    ) -> Result<Record> {
        let mut wal_pages: BTreeMap<u32, u32> = BTreeMap::new();
        let mut frame_cksum = (0, 0);
        let mut ps = None;
        let mut f_opt = None;
        let mut hdr_opt = None;
        if h.mx_frame > 0 {
            let f = self.wal_file(st)?;
            let hdr = self.wal_header(st, h.salts)?;
            let mut reader = FrameReader::new(&*f, &hdr, 1, hdr.cksum);
            while reader.next_frame_no() <= h.mx_frame {
                let fr = reader.next_frame()?.ok_or_else(|| {
                    Error::Corrupt(format!("WAL ends before published frame {}", h.mx_frame))
                })?;
                wal_pages.insert(fr.header.pgno, fr.frame_no);
            }
            frame_cksum = reader.running();
            ps = Some(hdr.page_size);
            f_opt = Some(f);
            hdr_opt = Some(hdr);
        }
        let mut head = [0u8; 100];
        io.read_db(0, &mut head)?;
        let ps = match ps {
            Some(p) => p,
            None => PageSize::from_db_header(&head).unwrap_or(PageSize::new(4096).expect("valid")),
        };
        let n_pages = if h.mx_frame > 0 {
            h.n_page
        } else {
            u32::from_be_bytes(head[28..32].try_into().unwrap())
        };
        let lock_page = ps.lock_byte_page().get();
        let mut sums = DbChecksum::new(ps);
        let mut pages = Vec::with_capacity(n_pages as usize);
        let mut buf = vec![0u8; ps.bytes()];
        for pgno in 1..=n_pages {
            if pgno == lock_page {
                continue;
            }
            match (wal_pages.get(&pgno), &f_opt) {
                (Some(&fno), Some(f)) => {
                    let off = wal::frame_offset(ps, fno) + wal::FRAME_HEADER_SIZE as u64;
                    f.read_exact_at(&mut buf, off)
                        .map_err(|e| Error::io("reading a WAL frame", e))?;
                }
                _ => io.read_db((pgno as u64 - 1) * ps.get() as u64, &mut buf)?,
            }
            let p = PageNo::new(pgno).expect("pgno >= 1");
            sums.set_page(p, &buf);
            pages.push(Page {
                pgno: p,
                data: buf.clone(),
            });
        }
        let _ = hdr_opt;
        st.sums = sums;
        st.page_size = Some(ps);
        Ok(Record {
            meta: RecordMeta {
                lsn,
                generation,
                snapshot: true,
                page_size: ps,
                commit_size: n_pages,
                timestamp_ms: now_ms(),
                wal_salts: h.salts,
                wal_frame: h.mx_frame,
                wal_cksum: if h.mx_frame > 0 { frame_cksum } else { (0, 0) },
                db_checksum: st.sums.total(),
                page_count: pages.len() as u32,
            },
            pages,
        })
    }
}

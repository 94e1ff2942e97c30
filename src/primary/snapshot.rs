//! Whole-database snapshots on the primary: the SNAPSHOT record of the published state (the
//! first one of a lineage, and the one that starts a new generation after a gap) and the
//! check that the database file alone is the captured state (an empty WAL after a crash).
//! WRITE is held by every caller, so the state cannot move while it is read.

use super::Position;
use super::{log_event, Capture, DbFileIo, Primary};
use crate::error::{Error, Result};
use crate::txlog::{DbChecksum, Log, RecordMeta};
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

    /// With the WAL empty (WRITE held): is page 1 of the database file the captured page 1?
    /// One read. Every transaction in a rollback journal mode rewrites page 1 (its change
    /// counter), and so does a switch of the journal mode, so this catches writes made while
    /// the database left WAL mode (WAL.md §D.7).
    pub(super) fn db_page1_matches(&self, st: &Capture, io: &dyn DbFileIo) -> Result<bool> {
        let ps = st.sums.page_size();
        let mut buf = vec![0u8; ps.bytes()];
        io.read_db(0, &mut buf)?;
        let p1 = PageNo::new(1).expect("1 >= 1");
        Ok(st.sums.page(p1) == Some(crate::types::page_checksum(p1, &buf)))
    }

    /// A gap: log it and start generation + 1 with a full snapshot as the next LSN.
    pub(super) fn new_generation(
        &self,
        st: &mut Capture,
        io: &dyn DbFileIo,
        h: &WalIndexHeader,
        reason: &str,
    ) -> Result<()> {
        // Never reuse an LSN a replica may hold: the watermark is the highest LSN ever served,
        // and it is above the log's tail only if served records were lost (FORMAT.md §7 says
        // that cannot happen short of losing fsynced data). Then the new generation starts
        // past it, in a log that restarts there: replicas behind it re-snapshot (their LSN is
        // older than the log's first), replicas at it take the snapshot as the next LSN.
        // (A damaged watermark file must not stop capture: this process's own view counts too.)
        let served = Log::read_durable(&self.dir)
            .ok()
            .flatten()
            .map_or(Lsn(0), |d| d.0)
            .max(st.durable);
        let lsn = st.pos.lsn.max(served).next();
        let generation = Generation(st.pos.generation.0.max(served_generation(&self.dir)) + 1);
        log_event(&format!(
            "event=gap db={:?} reason={:?} new_generation={} lsn={}",
            self.db_path, reason, generation, lsn
        ));
        if let Some(t) = st.snapshot_retry_after {
            let now = std::time::Instant::now();
            if now < t {
                return Err(Error::io(
                    format!(
                        "the last gap snapshot could not be written; retrying in {} ms",
                        (t - now).as_millis()
                    ),
                    std::io::Error::other("backing off"),
                ));
            }
        }
        // Streamed: the snapshot file first, then the same record copied into the log (a
        // page at a time and a MiB at a time: never the database in memory).
        let (meta, path) = match self.write_snapshot_streamed(st, io, h, lsn, generation) {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, Error::Io { .. }) {
                    // 50 ms doubling to 5 s.
                    let wait = std::time::Duration::from_millis(50)
                        .saturating_mul(1 << st.log_failures.min(7))
                        .min(std::time::Duration::from_secs(5));
                    st.snapshot_retry_after = Some(std::time::Instant::now() + wait);
                }
                return Err(e);
            }
        };
        if lsn != st.pos.lsn.next() {
            log_event(&format!(
                "event=log_restarted db={:?} lost_lsns={}..={} first_lsn={lsn} reason=\"records at or \
                 below the durable watermark were lost; replicas re-snapshot\"",
                self.db_path,
                st.pos.lsn.next(),
                served
            ));
            if let Err(e) = st.log.drop_all_segments() {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        }
        // The record as written (compressed or not): the file after its segment header.
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .len()
            .saturating_sub(crate::txlog::SEGMENT_HEADER_LEN as u64);
        if let Err(e) =
            st.log
                .append_copy_of(&meta, &path, crate::txlog::SEGMENT_HEADER_LEN as u64, len)
        {
            // Not in the log: the snapshot file must not stand for this LSN either.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        st.pos = Position::from_meta(&meta);
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
    ) -> Result<(RecordMeta, std::path::PathBuf)> {
        let mut wal_pages: BTreeMap<u32, u32> = BTreeMap::new();
        let mut frame_cksum = (0, 0);
        let mut ps = None;
        let mut f_opt = None;
        if h.mx_frame > 0 {
            let f = self.wal_file(st)?;
            let hdr = self.wal_header(st, h.salts)?;
            (wal_pages, frame_cksum) = newest_frames(&f, &hdr, 1, hdr.cksum, h.mx_frame)?;
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
            epoch: st.log.meta().epoch,
        };
        let path = crate::txlog::write_streamed(
            &self.dir.join("snap"),
            &meta,
            st.log.config().compression,
            &mut read_page,
        )?;
        st.sums = sums;
        st.page_size = Some(ps);
        Ok((meta, path))
    }
}

/// The newest frame of every page among frames `start..=upto` of the WAL `f` (`hdr` its header,
/// `running` the checksum chain before `start`), every frame's checksum verified, and the
/// running checksum after `upto`.
fn newest_frames(
    f: &std::fs::File,
    hdr: &wal::WalHeader,
    start: u32,
    running: (u32, u32),
    upto: u32,
) -> Result<(BTreeMap<u32, u32>, (u32, u32))> {
    let mut newest = BTreeMap::new();
    let mut reader = FrameReader::new(f, hdr, start, running);
    while reader.next_frame_no() <= upto {
        let fr = reader
            .next_frame()?
            .ok_or_else(|| Error::Corrupt(format!("WAL ends before published frame {upto}")))?;
        newest.insert(fr.header.pgno, fr.frame_no);
    }
    Ok((newest, reader.running()))
}

/// The generation of the durable watermark (0 when there is none).
fn served_generation(dir: &std::path::Path) -> u32 {
    Log::read_durable(dir).ok().flatten().map_or(0, |d| d.1 .0)
}

impl Primary {
    /// The first snapshot of a new lineage without blocking writers (issue 15): WRITE is held
    /// only to fix the state P and to install the result, not while the database is read.
    ///
    /// 1. Under WRITE: read the header P and start a read transaction on an internal connection
    ///    (the host's underlying VFS). Nobody can commit while we hold WRITE, so it sees exactly
    ///    P, and while it stays open no checkpoint copies frames past P into the database file
    ///    (its read mark) and no writer restarts the WAL over them unless P was checkpointed
    ///    whole (then the WAL after P starts again at frame 1).
    /// 2. WRITE released: the snapshot of P is written, streamed; writers go on meanwhile.
    /// 3. Under WRITE again, at Q: LSN 0 is the snapshot of P. If anything was committed since,
    ///    LSN 1 is one record with the last image of every page changed in (P, Q] (before the
    ///    role existed, one record for all of them is as good a history as any) and the
    ///    database checksum of Q. The position is then Q; the read transaction ends.
    pub(super) fn first_snapshot(&self) -> Result<()> {
        self.lock_write_polling()?;
        let setup = (|| -> Result<(WalIndexHeader, crate::ffi::conn::OwnedDb)> {
            let p = super::read_header(&self.agent).ok_or_else(|| {
                Error::Other(
                    "the wal-index is not initialised; is the database in WAL mode?".into(),
                )
            })?;
            let pin = crate::ffi::conn::OwnedDb::open(
                &self.db_path,
                crate::ffi::SQLITE_OPEN_READONLY,
                Some(crate::vfs::base_name_cstr()),
            )?;
            pin.busy_timeout(5000);
            pin.db().exec("BEGIN")?;
            pin.db().query_value("SELECT count(*) FROM sqlite_schema")?;
            Ok((p, pin))
        })();
        self.agent.unlock_write();
        let (p, pin) = setup?;
        let t0 = std::time::Instant::now();
        let (meta, path) = {
            let mut st = super::lock(&self.state);
            self.write_snapshot_streamed(&mut st, &self.agent, &p, Lsn(0), Generation(1))?
        };
        let read_ms = t0.elapsed().as_millis();
        if let Err(e) = self.lock_write_polling() {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let r = (|| -> Result<usize> {
            let q = super::read_header(&self.agent).ok_or_else(|| {
                Error::Other("the wal-index header became invalid during the first snapshot".into())
            })?;
            let mut st = super::lock(&self.state);
            let _append = self.append_lock()?;
            st.pos = Position::from_meta(&meta);
            let mut delta = 0;
            if (q.salts, q.mx_frame) != (p.salts, p.mx_frame) {
                let rec = self.changes_since(&mut st, &p, &q)?;
                delta = rec.pages.len();
                st.log.append(&rec)?;
                super::apply_to_sums(&mut st.sums, &rec);
                st.pos = Position::from_meta(&rec.meta);
            }
            self.save_position(&st)?;
            Log::write_durable(&self.dir, Lsn(0), Generation(1))?;
            st.loaded = true;
            self.publish_claim(&mut st);
            Ok(delta)
        })();
        drop(pin);
        let delta = match r {
            Ok(d) => {
                // WRITE stays held until the registry installed the role (release_init_write).
                self.init_write_held
                    .store(true, std::sync::atomic::Ordering::Release);
                d
            }
            Err(e) => {
                self.agent.unlock_write();
                // Start clean next time: no snapshot that nothing continues.
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        log_event(&format!(
            "event=lineage_created db={:?} pages={} read_ms={read_ms} changed_meanwhile_pages={delta}",
            self.db_path, meta.page_count
        ));
        Ok(())
    }

    /// One record (LSN 1 of generation 1) holding the last image of every page committed in
    /// the WAL between headers `p` and `q` (WRITE held), with the database checksum of `q`.
    fn changes_since(
        &self,
        st: &mut Capture,
        p: &WalIndexHeader,
        q: &WalIndexHeader,
    ) -> Result<crate::txlog::Record> {
        let f = self.wal_file(st)?;
        let hdr = self.wal_header(st, q.salts)?;
        let (start, running) = if q.salts == p.salts && p.mx_frame > 0 {
            (p.mx_frame + 1, p.frame_cksum)
        } else {
            (1, hdr.cksum)
        };
        let (latest, running) =
            newest_frames(&f, &hdr, start, running, q.mx_frame).map_err(|e| {
                Error::Corrupt(format!(
                    "{e}, while following the first snapshot; retry repl_primary()"
                ))
            })?;
        if running != q.frame_cksum {
            return Err(Error::Corrupt(
                "the WAL after the first snapshot does not chain to the current header; retry repl_primary()"
                    .into(),
            ));
        }
        let ps = hdr.page_size;
        let mut sums = st.sums.clone();
        let mut pages = Vec::new();
        let read = |fno: u32| -> Result<Vec<u8>> {
            let mut b = vec![0u8; ps.bytes()];
            let off = wal::frame_offset(ps, fno) + wal::FRAME_HEADER_SIZE as u64;
            f.read_exact_at(&mut b, off)
                .map_err(|e| Error::io("reading a WAL frame", e))?;
            Ok(b)
        };
        for (&pgno, &fno) in latest.range(..=q.n_page) {
            let data = read(fno)?;
            let p = PageNo::new(pgno).ok_or_else(|| Error::Corrupt("page 0 in the WAL".into()))?;
            sums.set_page(p, &data);
            pages.push(crate::txlog::Page { pgno: p, data });
        }
        if pages.is_empty() {
            // Only a truncation: a record carries at least one page, page 1's current image.
            let mut b = vec![0u8; ps.bytes()];
            match latest.get(&1) {
                Some(&fno) => b = read(fno)?,
                None => self.agent.read_db(0, &mut b)?,
            }
            let one = PageNo::new(1).expect("1");
            sums.set_page(one, &b);
            pages.push(crate::txlog::Page { pgno: one, data: b });
        }
        sums.truncate(q.n_page);
        Ok(crate::txlog::Record {
            meta: RecordMeta {
                lsn: Lsn(1),
                generation: Generation(1),
                snapshot: false,
                page_size: ps,
                commit_size: q.n_page,
                timestamp_ms: now_ms(),
                wal_salts: q.salts,
                wal_frame: q.mx_frame,
                wal_cksum: q.frame_cksum,
                db_checksum: sums.total(),
                page_count: pages.len() as u32,
                epoch: st.log.meta().epoch,
            },
            pages,
        })
    }
}

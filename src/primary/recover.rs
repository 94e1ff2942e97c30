//! Lost log tails (issue 14): the position file says records up to LSN p were captured, but
//! the log ends before p — its tail was lost in an OS crash before the group fsync reached it
//! (FORMAT.md §7: such records were never served), or a torn tail was truncated on open
//! (FORMAT.md §4.2). The records are re-captured from the WAL under the *same* LSNs when the
//! WAL still holds their frames; that is provable, not hoped for: the frames after the log's
//! last record must chain (WAL checksums) exactly to the position file's frame and running
//! checksum and hold exactly the missing number of transactions, so they are the frames those
//! LSNs were captured from, and the records are the same pages with the same database
//! checksums. Otherwise the log is left at its tail and the next capture sees frames nobody
//! captured: a gap, whose new generation continues past the durable watermark
//! (`new_generation`), so no LSN a replica may hold is ever reused.

use super::position::Position;
use super::{log_event, Capture, Primary};
use crate::error::Result;
use crate::txlog::Record;
use crate::wal::{self, FrameReader, WalIndexHeader};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

/// Page bytes of one batch of the asynchronous capture's append (plus one transaction): a
/// pass that is behind appends in several batches of this size, each one read, encoded and
/// written with its WAL bytes, pages and encoded records still in the CPU's cache. With
/// 16 MiB batches a pass that fell behind by a few hundred records ran at 9–12 µs a record
/// against 3–4 µs, fell further behind, and the WAL restart then appended the backlog in the
/// committing thread (per-pass traces, 2026-12-06: 0.45–7.8 ms a restart; none in 8 traced
/// runs after).
const BATCH_BYTES: usize = 256 << 10;
/// WAL bytes read with one `pread` when the frames to re-capture fit.
const PREFETCH_BYTES: u64 = 4 << 20;

/// A byte range of the WAL read at once, serving reads inside it from memory and the rest
/// from the file. Its buffer is this thread's scratch buffer (`into_buffer` gives it back).
struct Prefetched<'a> {
    file: &'a std::fs::File,
    base: u64,
    /// `bytes[..len]` holds the WAL bytes from `base`; the rest is stale scratch.
    bytes: Vec<u8>,
    len: usize,
}

impl<'a> Prefetched<'a> {
    fn none(file: &'a std::fs::File, bytes: Vec<u8>) -> Self {
        Prefetched {
            file,
            base: 0,
            bytes,
            len: 0,
        }
    }

    /// `len` bytes from `base`, or fewer at the end of the file (the frame reader then sees
    /// the end where the file ends); nothing on an error (then every read goes to the file).
    /// Reads into `bytes` (only its new part, if it must grow, is zeroed first).
    fn read(file: &'a std::fs::File, base: u64, len: usize, mut bytes: Vec<u8>) -> Self {
        if bytes.len() < len {
            bytes.resize(len, 0);
        }
        let mut got = 0;
        while got < len {
            match file.read_at(&mut bytes[got..len], base + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Self::none(file, bytes),
            }
        }
        Prefetched {
            file,
            base,
            bytes,
            len: got,
        }
    }

    fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }
}

impl FileExt for Prefetched<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let end = self.base + self.len as u64;
        if offset >= self.base && offset + buf.len() as u64 <= end {
            let at = (offset - self.base) as usize;
            buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
            return Ok(buf.len());
        }
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<usize> {
        Err(std::io::Error::other("the prefetched WAL is read-only"))
    }
}

impl Primary {
    /// With the append lock held, after the log was re-read into `st` (`st.pos` = its last
    /// record): if the position file `fp` is ahead of it, re-capture the missing records from
    /// the WAL (event `log_tail_repaired`), or log `log_tail_lost` and leave `st.pos` at the
    /// log's tail (then the gap rule applies). Errors are I/O errors on the log only.
    /// `claimed`: `fp` is the claim (transactions committed, not appended yet: the
    /// asynchronous append, no repair event); the same proof applies.
    pub(super) fn recover_lost_tail(
        &self,
        st: &mut Capture,
        fp: Position,
        h: &WalIndexHeader,
        claimed: bool,
    ) -> Result<()> {
        if fp.lsn <= st.pos.lsn {
            return Ok(());
        }
        let tail = st.pos;
        let limit = if claimed { BATCH_BYTES } else { usize::MAX };
        match self.recapture(st, fp, h, limit) {
            Ok((records, reached)) => {
                let fp = reached;
                let mut appended = 0;
                if claimed {
                    // The asynchronous capture's batch: one write.
                    if let Err(e) = super::capture::injected_append_failure()
                        .and_then(|_| st.log.append_batch(&records))
                    {
                        st.loaded = false;
                        return Err(e);
                    }
                    crate::sys::fault_point("append-after-record");
                    st.pos = fp;
                    return Ok(());
                }
                for r in &records {
                    if let Err(e) =
                        super::capture::injected_append_failure().and_then(|_| st.log.append(r))
                    {
                        // Some records are in the log: adopt exactly those (the log is the
                        // truth), and rebuild the checksums from it at the next capture.
                        st.loaded = false;
                        return Err(e);
                    }
                    appended += 1;
                    crate::sys::fault_point("append-after-record");
                }
                st.pos = fp;
                if claimed {
                    // The ordinary asynchronous append of claimed transactions.
                    return Ok(());
                }
                st.captured_txns += appended;
                if let Some((served, _)) = self.durable_file.read().filter(|d| d.0 > tail.lsn) {
                    // Not a crash artefact: records that were fsynced (and may have been
                    // served) were damaged or lost. Repaired, but a person should know.
                    st.last_error = Some(format!(
                        "the log lost or had damaged records {}..={served} at or below the durable \
                         watermark (fsynced data was lost: check the disk); they were re-captured \
                         from the WAL with the same LSNs and content",
                        tail.lsn.next()
                    ));
                }
                log_event(&format!(
                    "event=log_tail_repaired db={:?} lsns={}..={} generation={} frames={}..={}",
                    self.db_path,
                    tail.lsn.next(),
                    fp.lsn,
                    fp.generation,
                    records.first().map_or(0, |r| r.meta.wal_frame),
                    fp.frame
                ));
                Ok(())
            }
            Err(why) => {
                st.pos = tail;
                log_event(&format!(
                    "event=log_tail_lost db={:?} lsns={}..={} reason={why:?} (the next capture \
                     starts a new generation past the durable watermark)",
                    self.db_path,
                    tail.lsn.next(),
                    fp.lsn
                ));
                Ok(())
            }
        }
    }

    /// After the log was re-read: if it ends below the durable watermark (records that were
    /// fsynced, maybe served, are lost and were not re-captured), the next capture must start a
    /// new generation past the watermark even if the WAL looks caught up, or the next commit
    /// would reuse a served LSN.
    pub(super) fn check_served_tail(&self, st: &mut Capture) {
        let Some((served, _)) = self.durable_file.read() else {
            return;
        };
        if st.pos.lsn < served {
            let why = format!(
                "the log ends at LSN {} but LSN {served} was durable (and may have been served): \
                 fsynced records were lost and the WAL no longer holds them",
                st.pos.lsn
            );
            st.force_gap = Some(why);
        }
    }

    /// The records tail+1..=fp rebuilt from the WAL, checked as the module doc says; `Err`
    /// names why they cannot be. `st.sums` is advanced only on success.
    /// With `limit`, stops after the first transaction that brings the records' page bytes
    /// past it and returns what it has (every frame read is checksum-chained to the tail, so a
    /// prefix of whole transactions is as proven as the whole), with the position reached.
    fn recapture(
        &self,
        st: &mut Capture,
        fp: Position,
        h: &WalIndexHeader,
        limit: usize,
    ) -> std::result::Result<(Vec<Record>, Position), String> {
        let tail = st.pos;
        let lost = fp.lsn.0 - tail.lsn.0;
        if fp.generation != tail.generation {
            return Err(format!(
                "the lost records include the start of generation {} (a snapshot), which the WAL \
                 cannot reproduce",
                fp.generation
            ));
        }
        if h.salts != fp.salts || h.mx_frame < fp.frame || fp.frame == 0 {
            return Err(format!(
                "the WAL no longer holds their frames (it was restarted or is shorter: mxFrame {}, \
                 position frame {})",
                h.mx_frame, fp.frame
            ));
        }
        let f = self.wal_file(st).map_err(|e| e.to_string())?;
        let hdr = self.wal_header(st, h.salts).map_err(|e| e.to_string())?;
        let ps = hdr.page_size;
        if st.page_size.is_some_and(|p| p != ps) {
            return Err(format!("the WAL's page size {ps} differs from the log's"));
        }
        // Same WAL generation as the log's last record: continue the chain after its frame,
        // and recognise the padding copies of its commit frame (WAL.md §A.5) that follow it.
        // Otherwise the WAL was restarted since: read it from frame 1 (the count check below
        // proves no lost record was in the old generation).
        let (start, running, mut last_commit) = if tail.salts == fp.salts && tail.frame > 0 {
            let mut fr = vec![0u8; wal::FRAME_HEADER_SIZE + ps.bytes()];
            f.read_exact_at(&mut fr, wal::frame_offset(ps, tail.frame))
                .map_err(|e| format!("reading WAL frame {}: {e}", tail.frame))?;
            let pgno = u32::from_be_bytes(fr[0..4].try_into().expect("4 bytes"));
            let commit = u32::from_be_bytes(fr[4..8].try_into().expect("4 bytes"));
            let data = fr[wal::FRAME_HEADER_SIZE..].to_vec();
            (tail.frame + 1, tail.cksum, Some((pgno, commit, data)))
        } else {
            (1, hdr.cksum, None)
        };
        st.sums.begin();
        // One read for the whole range when it is small (an append pass: tens of frames), not
        // one per frame.
        let first = wal::frame_offset(ps, start);
        let end = wal::frame_offset(ps, fp.frame + 1);
        let scratch = crate::util::take_scratch(crate::util::Scratch::WalRead);
        // At most one batch's worth (frames past it, the rest of a big transaction, are read
        // one by one): what a batch does not use would be read again by the next one.
        let frame_bytes = (wal::FRAME_HEADER_SIZE + ps.bytes()) as u64;
        let want = (end - first).min((limit as u64).saturating_add(2 * frame_bytes));
        let wal_bytes = if fp.frame >= start && want <= PREFETCH_BYTES {
            Prefetched::read(&f, first, want as usize, scratch)
        } else {
            Prefetched::none(&f, scratch)
        };
        let mut reader = FrameReader::new(&wal_bytes, &hdr, start, running);
        let mut txn: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut txn_frames = 0u32;
        let mut out = Vec::new();
        let mut pos = tail;
        pos.salts = fp.salts;
        let mut bytes = 0usize;
        let result = (|| {
            while reader.next_frame_no() <= fp.frame {
                let fr = reader
                    .next_frame()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("the WAL ends before frame {}", fp.frame))?;
                txn_frames += 1;
                let commit = fr.header.commit_size;
                if commit == 0 {
                    txn.insert(fr.header.pgno, fr.data);
                    continue;
                }
                let is_padding = txn_frames == 1
                    && last_commit.as_ref().is_some_and(|(p, c, d)| {
                        *p == fr.header.pgno && *c == commit && *d == fr.data
                    });
                pos.frame = fr.frame_no;
                pos.cksum = reader.running();
                txn_frames = 0;
                if is_padding {
                    txn.clear();
                    continue;
                }
                last_commit = Some((fr.header.pgno, commit, fr.data.clone()));
                txn.insert(fr.header.pgno, fr.data);
                pos.lsn = pos.lsn.next();
                if pos.lsn > fp.lsn {
                    return Err(format!(
                        "frames {start}..{} hold more than the {lost} lost transactions",
                        fp.frame
                    ));
                }
                out.push(self.txn_record(st, ps, &mut txn, commit, pos));
                bytes += out.last().map_or(0, |r| r.pages.len() * ps.bytes());
                if bytes > limit && pos.lsn < fp.lsn {
                    return Ok(true); // a proven prefix; the caller continues from `pos`
                }
            }
            Ok(false)
        })();
        drop(reader);
        crate::util::put_scratch(crate::util::Scratch::WalRead, wal_bytes.into_buffer());
        let result = result.and_then(|partial| {
            if partial {
                return Ok(());
            }
            if txn_frames != 0 || pos.frame != fp.frame || pos.cksum != fp.cksum {
                return Err(format!(
                    "the WAL frames up to {} do not end where the position file says (frame {}, \
                     checksum {:?} vs {:?})",
                    fp.frame, pos.frame, pos.cksum, fp.cksum
                ));
            }
            if pos.lsn != fp.lsn {
                return Err(format!(
                    "frames {start}..{} hold {} transactions, {lost} were lost",
                    fp.frame,
                    out.len()
                ));
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                st.sums.commit();
                Ok((out, pos))
            }
            Err(why) => {
                st.sums.rollback();
                Err(why)
            }
        }
    }
}

/// A primary whose database a process without the extension switched to a rollback journal
/// (`journal_mode=DELETE`, `TRUNCATE`, `PERSIST`: header bytes 18–19 are 1) cannot be
/// captured, and the agent's SHARED lock would block that mode's writers for good (they need
/// EXCLUSIVE on the database file; ours too: "database is locked"). So the primary is not
/// attached: the caller drops the agent handle (and its lock) and reports this error. Checked
/// with the agent's SHARED lock held, which keeps the mode from changing under the check.
/// `repl_primary()` switches the database back to WAL first and then attaches; capture finds
/// a WAL it did not witness and compares the database file with the captured state (a gap
/// and a new generation if the rollback-mode writers changed anything).
pub(super) fn refuse_rollback_mode(agent: &crate::vfs::AgentHandle, db_path: &str) -> Result<()> {
    use crate::vfs::DbFileIo;
    let mut head = [0u8; 100];
    let _ = agent.read_db(0, &mut head);
    if head[..16] != *b"SQLite format 3\0" || (head[18], head[19]) != (1, 1) {
        return Ok(());
    }
    crate::logging::event(&format!(
        "event=primary_not_in_wal_mode db={db_path:?} action=\"capture suspended, lock released\""
    ));
    Err(crate::error::Error::Unsupported(format!(
        "{db_path} is a primary but is in a rollback journal mode (a process without sqlite-replica \
         ran PRAGMA journal_mode=DELETE or similar): capture is suspended and this process holds no \
         lock on it, so writers in that mode are not blocked. Run SELECT repl_primary() on it to \
         switch it back to WAL and resume capture (changes made meanwhile are captured as a new \
         generation starting with a snapshot)"
    )))
}

impl Primary {
    /// At resume and at the last close: a writer killed after writing a commit's frames to
    /// the WAL but before publishing them in the wal-index header leaves a complete
    /// transaction no connection sees and no capture claimed. The next writer would overwrite
    /// it, but if every connection closes first, the next first opener's stock recovery
    /// commits it after all, an unwitnessed change (a gap). Under WRITE (no writer can be
    /// half-way then) a valid frame right after the header's last one is made invalid for
    /// recovery (its salt-1 inverted), which is what the next writer's overwrite would do.
    /// Best effort: skipped when WRITE is busy (a live writer will overwrite the frames) or
    /// anything cannot be read.
    pub(super) fn discard_unpublished_frames(&self) {
        if !self.agent.try_lock_write() {
            return;
        }
        let r = self.discard_unpublished_frames_locked();
        self.agent.unlock_write();
        match r {
            Ok(Some(frame)) => log_event(&format!(
                "event=unpublished_frames_discarded db={:?} frame={frame} \
                 reason=\"a writer died after writing them, before publishing its commit\"",
                self.db_path
            )),
            Ok(None) => {}
            Err(e) => log_event(&format!(
                "event=unpublished_frames_check_failed db={:?} error={:?}",
                self.db_path,
                e.to_string()
            )),
        }
    }

    fn discard_unpublished_frames_locked(&self) -> Result<Option<u32>> {
        let Some(h) = super::read_header(&self.agent) else {
            return Ok(None);
        };
        let path = format!("{}-wal", self.db_path);
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::error::Error::io(format!("opening {path}"), e)),
        };
        let mut b = [0u8; 32];
        if f.read_exact_at(&mut b, 0).is_err() {
            return Ok(None); // shorter than a header: nothing recovery could commit
        }
        let Ok(wh) = wal::WalHeader::parse(&b) else {
            return Ok(None);
        };
        if wh.salts != h.salts {
            return Ok(None); // recovery would reject every frame after a different header
        }
        // The chain after the header's last frame (the WAL header's own checksum before frame 1).
        let running = if h.mx_frame == 0 {
            wh.cksum
        } else {
            h.frame_cksum
        };
        let mut reader = FrameReader::new(&f, &wh, h.mx_frame + 1, running);
        let Ok(Some(frame)) = reader.next_frame() else {
            return Ok(None);
        };
        let off = wal::frame_offset(wh.page_size, frame.frame_no) + 8;
        let mut salt1 = [0u8; 4];
        salt1.copy_from_slice(&h.salts[..4]);
        let inverted = u32::from_ne_bytes(salt1) ^ u32::MAX;
        f.write_all_at(&inverted.to_ne_bytes(), off)
            .and_then(|()| f.sync_data())
            .map_err(|e| crate::error::Error::io(format!("writing {path}"), e))?;
        Ok(Some(frame.frame_no))
    }
}

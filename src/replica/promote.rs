//! Promotion (issue 16, `repl_promote()`): this replica becomes the primary of epoch old + 1,
//! continuing the lineage's LSNs. Its `<db>-replica/` becomes a primary's log directory whose
//! history starts at the applied LSN L: a snapshot of the live state at L (marked with the new
//! epoch, its checksum verified against the applied one), the durable watermark at L, and a
//! `meta.json` (format 2) naming the epoch and where it starts (L, checksum). The first record
//! of the new epoch is L + 1. The snapshot's WAL position is the replica's live wal-index
//! header, so capture resumes on the WAL exactly where the applier left it (no gap, no new
//! generation). Followers at L with the same checksum continue without a re-snapshot.
//!
//! Order on disk (a crash leaves a replica, or a primary, never something in between):
//! snapshot, watermark, `meta.json`, then `replica.json` renamed away — the switch, since a
//! directory with `replica.json` is a replica's — then `applied` removed. Leftovers of a
//! promotion that crashed before the switch are removed by the next attempt.

use super::live::read_page_into;
use super::{lock, log_event, Replica};
use crate::error::{Error, Result};
use crate::transport::SourceSpec;
use crate::txlog::{Log, LogConfig, Meta, RecordMeta};
use crate::types::{Checksum, Epoch, Generation, Lsn};
use crate::wal::shm_read_header;

/// What a promotion did, for `repl_promote()`'s answer and for telling the former source.
#[derive(Clone, Debug)]
pub struct Promoted {
    pub epoch: Epoch,
    pub lsn: Lsn,
    pub generation: Generation,
    pub checksum: Checksum,
    pub lineage: String,
    /// The source this replica followed (the former primary), if any.
    pub former: Option<SourceSpec>,
}

/// Files a promotion writes into `<db>-replica/` (removed when an attempt is left unfinished).
const PRIMARY_FILES: [&str; 5] = ["meta.json", "durable", "position", "log", "snap"];

impl Replica {
    /// Turns this replica's directory into the log directory of a primary of the next epoch
    /// (see the module comment). Refuses, changing nothing, when the source answers as a
    /// primary of this lineage with an epoch at least this replica's (it is alive: two
    /// primaries would accept writes), unless `force`. The new epoch is the newest seen + 1,
    /// or `epoch` when a coordinator decided it (automatic failover: it must be newer than
    /// every epoch this replica saw). The caller swaps the roles.
    pub fn promote(&self, force: bool, epoch: Option<Epoch>) -> Result<Promoted> {
        self.unfollow();
        let _applier = self.applier_lock()?;
        let mut st = lock(&self.state);
        let st = &mut *st;
        if self.pos.read().is_none() {
            return Err(Error::Misuse(format!(
                "repl_promote(): {} has not been bootstrapped yet (no applied LSN): sync it first",
                self.db_path
            )));
        }
        let lineage = st.meta.lineage.clone().ok_or_else(|| {
            Error::Misuse(format!(
                "repl_promote(): {} has no lineage yet: sync it first",
                self.db_path
            ))
        })?;
        if !force {
            self.refuse_if_source_alive(st, &lineage)?;
        }
        self.ensure_open(st)?;
        if !st.loaded || self.pos.read().map(|a| a.seq) != Some(st.seen_seq) {
            self.load(st)?;
        }
        if let Some(why) = &st.diverged {
            return Err(Error::Corrupt(format!(
                "repl_promote(): {} does not hold a state of the primary ({why}); run repl_sync() to \
                 re-snapshot it before promoting",
                self.db_path
            )));
        }
        let epoch = match epoch {
            None => st.meta.epoch.next(),
            Some(e) if e > st.meta.epoch => e,
            Some(e) => {
                return Err(Error::Misuse(format!(
                    "promoting {} to epoch {e}: it has seen epoch {} already; nothing was changed",
                    self.db_path, st.meta.epoch
                )))
            }
        };
        let (lsn, generation, checksum) = (st.lsn, st.generation, st.sums.total());
        let ps = st
            .page_size
            .ok_or_else(|| Error::Other("repl_promote(): page size unknown".into()))?;
        for f in PRIMARY_FILES {
            remove_any(&self.dir.join(f))?;
        }
        // The snapshot at L, read from the live state under WRITE (no apply can run: the
        // applier lock is held; WRITE keeps a checkpoint from restarting the WAL meanwhile).
        let shm = self.write_locked(st)?;
        let h =
            shm_read_header(&shm).ok_or_else(|| Error::Other("wal-index header invalid".into()))?;
        let n_page = if h.mx_frame > 0 {
            h.n_page
        } else {
            (self.handle.db_size()? / ps.get() as u64) as u32
        };
        let meta = RecordMeta {
            lsn,
            generation,
            snapshot: true,
            page_size: ps,
            commit_size: n_page,
            timestamp_ms: crate::util::now_ms(),
            wal_salts: h.salts,
            wal_frame: h.mx_frame,
            wal_cksum: if h.mx_frame > 0 {
                h.frame_cksum
            } else {
                (0, 0)
            },
            db_checksum: checksum,
            page_count: if ps.lock_byte_page().get() <= n_page {
                n_page - 1
            } else {
                n_page
            },
            epoch,
        };
        let wal = st.wal.as_ref().expect("opened");
        let written = crate::txlog::write_streamed(
            &self.dir.join("snap"),
            &meta,
            crate::txlog::Compression::None,
            &mut |pgno, buf| {
                let p = crate::types::PageNo::new(pgno).expect("pgno >= 1");
                read_page_into(&self.handle, &shm, wal, &h, p, Some(ps), buf)
            },
        );
        drop(shm);
        let undo = |e: Error| {
            for f in PRIMARY_FILES {
                let _ = remove_any(&self.dir.join(f));
            }
            e
        };
        written.map_err(undo)?;
        Log::write_durable(&self.dir, lsn, generation).map_err(undo)?;
        let dir_meta = Meta {
            format: crate::txlog::DIR_FORMAT_EPOCH,
            lineage: lineage.clone(),
            role: "primary".into(),
            page_size: ps.get(),
            created_ms: crate::util::now_ms(),
            epoch,
            epoch_start: Some((lsn, checksum)),
        };
        Log::create(&self.dir, &dir_meta, LogConfig::default()).map_err(undo)?;
        // The switch: without replica.json the directory is a primary's.
        let kept = self.dir.join(format!("replica.json.promoted-{epoch}"));
        std::fs::rename(self.dir.join("replica.json"), &kept)
            .map_err(|e| undo(Error::io("renaming replica.json", e)))?;
        let _ = std::fs::remove_file(self.dir.join("applied"));
        crate::txlog::sync_dir(&self.dir)?;
        log_event(&format!(
            "event=promoted db={:?} epoch={epoch} lsn={lsn} generation={generation} checksum={checksum} former={:?}",
            self.db_path,
            st.meta.source.as_ref().map_or("none".into(), |s| s.to_string())
        ));
        st.loaded = false;
        Ok(Promoted {
            epoch,
            lsn,
            generation,
            checksum,
            lineage,
            former: st.meta.source.clone(),
        })
    }

    /// "Alive" = the source answers as a primary of this lineage with an epoch at least this
    /// replica's (keep it simple: one `/v1/info`, or the directory's `meta.json`). A source
    /// that does not answer is taken for dead.
    fn refuse_if_source_alive(&self, st: &mut super::State, lineage: &str) -> Result<()> {
        let Some(spec) = st.meta.source.clone() else {
            return Ok(());
        };
        let info = {
            let _net = self.network_call(st);
            spec.open().and_then(|s| s.info())
        };
        match info {
            Ok(i) if i.lineage == lineage && i.epoch >= st.meta.epoch => {
                Err(Error::Misuse(format!(
                    "repl_promote(): the primary {spec} of this lineage answers (epoch {}, durable LSN {}): \
                     promoting {} now would make two primaries. Stop it first, or promote anyway with \
                     repl_promote(listen, token, 'force') (it is then told it was deposed, when reachable)",
                    i.epoch,
                    i.durable_lsn.map_or("none".into(), |l| l.to_string()),
                    self.db_path
                )))
            }
            _ => Ok(()),
        }
    }
}

fn remove_any(p: &std::path::Path) -> Result<()> {
    let r = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", p.display()), e))
        }
        _ => Ok(()),
    }
}

impl Replica {
    /// A deposed primary rejoined as this replica and kept its unreplicated tail aside:
    /// remembered in `replica.json` and shown by `repl_status()` (`orphaned`).
    pub fn note_orphaned(&self, report: serde_json::Value) -> Result<()> {
        let mut st = lock(&self.state);
        st.meta.orphaned = Some(report);
        super::source::write_meta(&self.dir, &st.meta)
    }

    /// A deposed primary that becomes a replica (`roles::rejoin_as_replica`) and whose content
    /// is exactly the new epoch's start: record that position, so the first sync continues
    /// from it instead of re-snapshotting.
    pub fn start_from(&self, lsn: Lsn, generation: Generation, checksum: Checksum) -> Result<()> {
        self.pos.write(&super::position::Applied {
            seq: 0,
            lsn,
            generation,
            checksum,
            intent: None,
        })?;
        Ok(())
    }
}

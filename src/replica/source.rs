//! The replica's source: which primary it follows (`replica.json`: role, source, lineage),
//! opening it, holding it to this replica's lineage and page size, fetching its snapshot with
//! progress, and saying what a damaged source means for the replica.

use super::{lock, log_event, Replica, State};
use crate::error::{Error, Result};
use crate::transport::{self, Source, SourceSpec};
use crate::types::PageSize;
use std::path::Path;

/// A source named by `repl_sync(spec)`: as the user typed it (parsed under the applier lock,
/// so a bad one is recorded like any failed sync), or parsed and opened by the caller.
pub(super) enum Given<'a> {
    Text(&'a str),
    Opened(SourceSpec, Box<dyn Source>),
}

impl Replica {
    /// `repl_sync(spec)`: open `spec` (or take it opened) unless it is the source already
    /// open; a new one must serve this replica's lineage (remembered in `replica.json`).
    /// Without `spec`, open the remembered source if none is open yet.
    pub(super) fn open_source(&self, st: &mut State, given: Option<Given<'_>>) -> Result<()> {
        if let Some(given) = given {
            let (spec, opened) = match given {
                Given::Text(t) => (SourceSpec::parse(t)?, None),
                Given::Opened(s, o) => (s, Some(o)),
            };
            if st.meta.source.as_ref() != Some(&spec) || st.source.is_none() {
                let _net = self.network_call(st);
                let src = match opened {
                    Some(src) => src,
                    None => spec.open()?,
                };
                // The first request already says which epoch this replica has seen: a deposed
                // primary learns it from it (and answers 409).
                src.set_epoch(st.meta.epoch, st.meta.epoch_primary.as_deref());
                let info = src.info()?;
                if let Some(l) = &st.meta.lineage {
                    if *l != info.lineage {
                        // Say so when the page sizes differ too: that alone rules the file out.
                        let sizes = match (src.page_size().ok().flatten(), self.file_page_size()) {
                            (Some(theirs), Some(ours)) if theirs != ours => {
                                format!(" and its page size is {theirs}, this replica's {ours}")
                            }
                            _ => String::new(),
                        };
                        return Err(Error::Misuse(format!(
                            "repl_sync('{}'): that primary serves lineage {}{sizes} but {} replicates lineage {l} \
                             (from {}); a replica follows one primary: use a new database file for another one",
                            spec,
                            info.lineage,
                            self.db_path,
                            st.meta.source.as_ref().map_or("?".into(), |s| s.to_string())
                        )));
                    }
                }
                // A deposed primary is refused before it becomes this replica's source.
                self.refuse_older_epoch(st, &info, &spec)?;
                st.meta.source = Some(spec);
                st.meta.lineage = Some(info.lineage);
                write_meta(&self.dir, &st.meta)?;
                st.source = Some(src);
            }
        }
        if st.source.is_none() {
            let Some(spec) = st.meta.source.clone() else {
                return Err(Error::Misuse(format!(
                    "repl_sync(): {} has no source yet; pass the primary, e.g. repl_sync('/path/to/primary.db')",
                    self.db_path
                )));
            };
            let src = spec.open()?;
            src.set_epoch(st.meta.epoch, st.meta.epoch_primary.as_deref());
            st.source = Some(src);
        }
        Ok(())
    }

    /// The source's info (`known`: what a follower got with its records) must be this
    /// replica's lineage; remembered for `repl_status()`.
    pub(super) fn check_source(
        &self,
        st: &mut State,
        known: Option<transport::SourceInfo>,
    ) -> Result<()> {
        let info = match known {
            Some(i) => i,
            None => {
                let _net = self.network_call(st);
                st.source.as_ref().expect("set").info()?
            }
        };
        if st.meta.lineage.as_deref() != Some(info.lineage.as_str()) {
            return Err(Error::Misuse(format!(
                "the source now serves lineage {} but this replica follows {}: the primary was re-created; \
                 bootstrap a new replica file",
                info.lineage,
                st.meta.lineage.as_deref().unwrap_or("?")
            )));
        }
        st.stats.primary_lsn = info.durable_lsn;
        st.stats.primary_first_lsn = info.first_lsn;
        self.check_epoch(st, &info)
    }

    /// The source's snapshot continued after `prefix` (a resumed bootstrap, WAL.md §E.1); `None`
    /// when the source serves another snapshot now.
    pub(super) fn stream_snapshot_resume(
        &self,
        st: &State,
        what: &'static str,
        prefix: crate::txlog::SnapshotPrefix,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<Option<(crate::txlog::RecordMeta, crate::txlog::DbChecksum)>> {
        let _net = self.network_call(st);
        self.start_progress(what, prefix.offset());
        let mut progress = self.progress_reporter(what);
        let r = st
            .source
            .as_ref()
            .expect("set")
            .snapshot_resume(prefix, &mut progress, on_page);
        if !matches!(r, Ok(Some(_))) {
            *lock(&self.progress) = None;
        }
        r
    }

    pub(super) fn start_progress(&self, what: &'static str, base: u64) {
        *lock(&self.progress) = Some(super::Progress {
            phase: what,
            done: base,
            total: 0,
            base,
            started: std::time::Instant::now(),
        });
    }

    /// The progress callback of a snapshot download: `repl_status().progress` (with rate and
    /// ETA) and, past 8 MiB, an `event=progress` line per 10 %.
    pub(super) fn progress_reporter(&self, what: &'static str) -> impl FnMut(u64, u64) + '_ {
        let mut logged = None::<u64>;
        move |done, total| {
            let p = {
                let mut g = lock(&self.progress);
                let p = match *g {
                    Some(p) if p.phase == what => super::Progress { done, total, ..p },
                    _ => super::Progress {
                        phase: what,
                        done,
                        total,
                        base: done,
                        started: std::time::Instant::now(),
                    },
                };
                *g = Some(p);
                p
            };
            let step = (total / 10).max(8 << 20);
            let last = *logged.get_or_insert(p.base);
            if total >= 8 << 20 && (done >= last + step || done == total) {
                logged = Some(done);
                let (rate, eta) = p.rate_eta();
                log_event(&format!(
                    "event=progress db={:?} phase={what:?} bytes={done} total={total} rate_bytes_s={rate} eta_ms={}",
                    self.db_path,
                    eta.map_or_else(|| "unknown".to_string(), |e| e.to_string())
                ));
            }
        }
    }

    /// The source now serves pages of another size than the replica's (the primary was
    /// VACUUMed with a new page_size and started a new generation). A WAL cannot change its
    /// page size, so nothing is written: the caller returns this before touching any file.
    pub(super) fn page_size_changed(&self, st: &State, m: &crate::txlog::RecordMeta) -> Error {
        let src = st
            .meta
            .source
            .as_ref()
            .map_or("the primary".into(), |s| s.to_string());
        Error::Unsupported(format!(
            "repl_sync(): the primary {src} now has a page size of {} (generation {} from LSN {}) \
             but this replica's page size is {}, and a replica cannot change its page size; \
             bootstrap a new replica into a new, empty file with repl_sync('{src}') and move readers to it. \
             {} was not changed: it still holds LSN {} and stays readable",
            m.page_size,
            m.generation,
            m.lsn,
            st.page_size.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
            self.db_path,
            st.lsn
        ))
    }

    /// A record the source cannot read back intact (the txlog decoder checks every record's
    /// checksum before it leaves the source): say which replica state is kept and what to do.
    pub(super) fn damaged_source(&self, st: &State, e: Error) -> Error {
        // A source without a log directory on this machine is remote (HTTP).
        let local_log = st.source.as_ref().map(|s| s.log_dir());
        let remote = matches!(local_log, Some(None));
        match e {
            // Over HTTP the bytes may have been damaged on the way (a retry fetches them
            // again) or be damaged in the primary's log: there is no local log path to check.
            Error::Corrupt(m) if remote => Error::Corrupt(format!(
                "repl_sync(): {m}. {} still holds LSN {} and stays readable. A transfer damaged on the \
                 way is fetched again by the next repl_sync(); if the error persists, the primary's log \
                 itself may be damaged: run sqlite-replica verify on the primary's <db>-replica directory",
                self.db_path, st.lsn
            )),
            Error::Corrupt(m) => Error::Corrupt(format!(
                "repl_sync(): the primary's log is damaged after LSN {lsn}: {m}. Nothing was applied: {} \
                 still holds LSN {lsn} and stays readable. Check the primary's storage \
                 (sqlite-replica verify {}); repl_sync() continues once the log reads back intact",
                self.db_path,
                local_log.flatten().map_or_else(
                    || "<primary>-replica".to_string(),
                    |d| d.display().to_string()
                ),
                lsn = st.lsn
            )),
            e => e,
        }
    }

    /// This replica's page size as its database file's header says (None: empty file).
    pub(super) fn file_page_size(&self) -> Option<PageSize> {
        let mut head = [0u8; 100];
        crate::vfs::DbFileIo::read_db(&self.handle, 0, &mut head).ok()?;
        PageSize::from_db_header(&head)
    }

    /// The lineage this replica follows (never waits for a sync in progress).
    pub fn lineage(&self) -> Option<String> {
        match self.state_for_query() {
            Some(st) => st.meta.lineage.clone(),
            None => lock(&self.published).lineage.clone(),
        }
    }

    /// The source this replica follows (never waits for a sync in progress).
    pub fn source(&self) -> Option<SourceSpec> {
        match self.state_for_query() {
            Some(st) => st.meta.source.clone(),
            None => lock(&self.published).source.clone(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct ReplicaMeta {
    pub(super) format: u32,
    pub(super) role: String,
    pub(super) source: Option<SourceSpec>,
    pub(super) lineage: Option<String>,
    pub(super) created_ms: u64,
    /// The newest epoch of the lineage this replica has seen (1 in files without it).
    pub(super) epoch: crate::types::Epoch,
    /// The primary it saw that epoch at, as a person reads it (no token).
    pub(super) epoch_primary: Option<String>,
    /// A deposed primary that rejoined as this replica: what it kept aside (its unreplicated
    /// tail: `orphaned.json`'s content plus `dir`), shown by `repl_status()`.
    pub(super) orphaned: Option<serde_json::Value>,
}

impl ReplicaMeta {
    pub(super) fn to_json(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "format": self.format,
            "role": self.role,
            "source": self.source.as_ref().map(SourceSpec::persisted),
            "lineage": self.lineage,
            "created_ms": self.created_ms,
            "epoch": self.epoch.0,
            "epoch_primary": self.epoch_primary,
            "orphaned": self.orphaned,
        }))
        .unwrap_or_default()
    }

    pub(super) fn from_json(text: &str) -> Option<ReplicaMeta> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        Some(ReplicaMeta {
            format: v.get("format")?.as_u64()? as u32,
            role: s("role").filter(|r| r == "replica")?,
            // Unparsable only if edited by hand: then the next repl_sync() asks for a source.
            source: s("source").and_then(|t| SourceSpec::parse(&t).ok()),
            lineage: s("lineage"),
            created_ms: v.get("created_ms").and_then(|x| x.as_u64()).unwrap_or(0),
            epoch: v
                .get("epoch")
                .and_then(|x| x.as_u64())
                .and_then(|e| u32::try_from(e).ok())
                .map_or(crate::types::Epoch::FIRST, crate::types::Epoch),
            epoch_primary: s("epoch_primary"),
            orphaned: v.get("orphaned").filter(|o| !o.is_null()).cloned(),
        })
    }
}

pub(super) fn write_meta(dir: &Path, m: &ReplicaMeta) -> Result<()> {
    let p = dir.join("replica.json");
    let tmp = dir.join(format!("replica.json.{}.tmp", std::process::id()));
    let text = m.to_json();
    // Owner-only: the source URL may carry the primary's token (?token=).
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        // fsync before the rename, the directory after it: otherwise a crash can leave an
        // empty replica.json (the rename reached the disk before the data) or the old one.
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io(format!("renaming to {}", p.display()), e))?;
    crate::txlog::sync_dir(dir)
}

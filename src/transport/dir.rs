//! The directory source: a primary's `<db>-replica/` read directly (the embedded default for
//! one machine and for shared storage). Reads only; never truncates or repairs the log (that
//! is the primary's job). Serves records only up to the durable watermark.

use super::{Fetch, Source, SourceInfo};
use crate::error::{Error, Result};
use crate::txlog::{Log, Record};
use crate::types::Lsn;
use std::path::{Path, PathBuf};

pub struct DirSource {
    db: String,
    dir: PathBuf,
}

impl DirSource {
    /// `db` is the primary's database path; its log lives in `<db>-replica/`.
    pub fn open(db: &str) -> Result<DirSource> {
        let abs = std::path::absolute(Path::new(db))
            .map_err(|e| Error::io(format!("resolving {db}"), e))?;
        let db = abs.display().to_string();
        let dir = crate::registry::log_dir(&db);
        if !dir.join("meta.json").exists() {
            let why = if Path::new(&db).exists() {
                format!(
                    "{db} exists but has no replication log ({} is missing): make it a primary first with SELECT repl_primary() on it",
                    dir.join("meta.json").display()
                )
            } else {
                format!("{db} does not exist: pass the path of the primary's database file")
            };
            return Err(Error::Misuse(format!("repl_sync(): {why}")));
        }
        let s = DirSource { db, dir };
        let meta = s.log()?.meta().clone();
        if meta.role != "primary" {
            return Err(Error::Misuse(format!(
                "repl_sync(): {} is a {} log, not a primary's",
                s.db, meta.role
            )));
        }
        Ok(s)
    }

    fn log(&self) -> Result<Log> {
        Log::open(&self.dir, Default::default())
    }
}

impl Source for DirSource {
    fn describe(&self) -> String {
        self.db.clone()
    }

    fn info(&self) -> Result<SourceInfo> {
        let log = self.log()?;
        Ok(SourceInfo {
            lineage: log.meta().lineage.clone(),
            page_size: log.meta().page_size,
            first_lsn: log.first_lsn(),
            durable_lsn: Log::read_durable(&self.dir)?.map(|d| d.0),
        })
    }

    fn snapshot(&self) -> Result<Record> {
        let log = self.log()?;
        let durable = Log::read_durable(&self.dir)?.map(|d| d.0);
        let Some((_, path)) = log.latest_snapshot(durable)? else {
            return Err(Error::Other(format!(
                "the primary {} has no durable snapshot yet; retry in a moment",
                self.db
            )));
        };
        Log::read_snapshot(&path)
    }

    fn fetch(&self, from: Lsn, max_bytes: usize) -> Result<Fetch> {
        let log = self.log()?;
        let Some((durable, _)) = Log::read_durable(&self.dir)? else {
            return Ok(Fetch::Records(Vec::new()));
        };
        if from > durable {
            return Ok(Fetch::Records(Vec::new()));
        }
        if let Some(first) = log.first_lsn() {
            if from < first {
                return Ok(Fetch::Truncated { first_lsn: first });
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in log.read_from(from, Some(durable))? {
            let r = r?;
            bytes += r.pages.iter().map(|p| p.data.len()).sum::<usize>();
            out.push(r);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(Fetch::Records(out))
    }
}

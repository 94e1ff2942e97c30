//! The uploader: one pass ships what a primary's log directory made durable since the last pass
//! to the bucket (FORMAT.md §9): the newest snapshot when the bucket needs a base, then the
//! records after the manifest's last LSN as immutable chunks, then the manifest with a
//! conditional PUT (`If-None-Match: *` to create it, `If-Match: <etag>` to replace the version
//! this uploader last wrote), so two uploaders can never interleave: the one that loses the
//! race stops and says who holds the prefix. Works on a log directory (like the HTTP server),
//! so a primary's background thread (`primary/backup.rs`) and `sqlite-replica serve --backup`
//! run the same code. The pass's outcome goes to `<db>-replica/backup.json` (status for
//! `repl_status()`, `/metrics`, and local retention, which keeps every segment not uploaded yet).

use super::client::{Client, Cond, Target};
use super::crypt::Key;
use super::manifest::{chunk_key, snapshot_key, Manifest, Object, MANIFEST};
use crate::error::{Error, Result};
use crate::txlog::{self, Log};
use crate::types::Lsn;
use std::path::{Path, PathBuf};

/// The most record bytes one chunk holds (a larger backlog goes up as several chunks).
pub const CHUNK_MAX: usize = 8 << 20;
/// An uploader rewrites the manifest at least every `lease_ms() / 2`, and a new uploader does
/// not take over a manifest another one wrote less than `lease_ms()` ago (FORMAT.md §9.3):
/// 10 s, or `REPL_BACKUP_LEASE_MS` (tests shorten it).
pub fn lease_ms() -> u64 {
    crate::config::get().backup_lease_ms
}
/// Chunk compaction (FORMAT.md §9.7): runs of small chunks are merged into objects of at most
/// this many bytes (the merge is built in memory: this bounds it).
pub const COMPACT_TARGET: u64 = 16 << 20;
/// The newest chunks, which followers are reading, are never merged.
pub const COMPACT_KEEP_NEWEST: usize = 4;

/// The status file in the log directory.
pub const STATUS_FILE: &str = "backup.json";
/// The file holding the backup target (`repl_config('backup', …)`).
pub const TARGET_FILE: &str = "backup.target";

/// What a pass did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub objects: usize,
    pub bytes: u64,
    pub uploaded_lsn: Option<Lsn>,
    pub durable_lsn: Option<Lsn>,
    pub deleted: usize,
}

pub struct Uploader {
    client: Client,
    dir: PathBuf,
    log: Option<Log>,
    key: Option<Key>,
    writer: String,
    host: String,
    /// This log directory's identity (`dir_identity`), written into the manifest.
    dir_id: String,
    /// The manifest as this uploader last wrote or read it, and its ETag (None: not created).
    manifest: Option<(Manifest, Option<String>)>,
    /// Set when another uploader holds the prefix: this one never writes again.
    refused: Option<String>,
    errors: u64,
    uploads: u64,
    /// Chunks replaced by a merged one, deleted once readers that still hold the manifest
    /// naming them had time to re-read it: (due time in Unix ms, key).
    pending_deletes: Vec<(u64, String)>,
    /// The bucket's last LSN was found in this log with the same database checksum.
    history_checked: bool,
    /// No compaction before this time (Unix ms) after one failed.
    compact_after: u64,
    pub compactions: u64,
}

/// Whether `log` (durable up to `durable`) continues the history the manifest `m` ends with:
/// the bucket must not be ahead of the log, and where the log still holds the bucket's last
/// LSN, its database checksum there must be the bucket's. A copy of a database that went its own
/// way (same lineage, other transactions) fails here before it uploads anything.
fn same_history(
    m: &Manifest,
    log: &Log,
    durable: Lsn,
    what: &str,
) -> std::result::Result<(), String> {
    let last = m
        .chunks
        .last()
        .into_iter()
        .chain(m.snapshots.last())
        .max_by_key(|o| o.last_lsn);
    let Some(last) = last else {
        return Ok(());
    };
    if last.last_lsn > durable {
        return Err(format!(
            "{what} ends at LSN {} but this log at LSN {durable}: the bucket holds transactions this \
             database never had (another copy of it, or a database restored from it, wrote them); \
             this uploader stops. Give this database its own prefix",
            last.last_lsn
        ));
    }
    let held = log
        .read_from(last.last_lsn, Some(last.last_lsn))
        .ok()
        .and_then(|mut it| it.next())
        .and_then(|r| r.ok());
    match held {
        Some(r) if r.meta.lsn == last.last_lsn && r.meta.db_checksum != last.db_checksum => Err(format!(
            "{what}: at LSN {} the bucket's database checksum is {}, this log's {}: another copy of \
             this database with other transactions wrote the bucket; this uploader stops. Give \
             this database its own prefix",
            last.last_lsn, last.db_checksum, r.meta.db_checksum
        )),
        _ => Ok(()),
    }
}

/// The backup target configured for the log directory `dir` (None: no backup).
pub fn configured_target(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(TARGET_FILE))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Sets (or with `""` clears) the backup target of `dir`, checked first.
pub fn set_target(dir: &Path, target: &str) -> Result<()> {
    let path = dir.join(TARGET_FILE);
    if target.trim().is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        };
    }
    Target::parse(target)?;
    let tmp = dir.join(format!("{TARGET_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", target.trim()))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("writing {}", path.display()), e)
        })
}

/// The LSN up to which `dir`'s log is in the bucket: None when no backup is configured, Some(0)
/// while nothing is. Local retention keeps every segment above it.
pub fn uploaded_lsn(dir: &Path) -> Option<Lsn> {
    configured_target(dir)?;
    let s = read_status(dir);
    Some(Lsn(s
        .and_then(|v| v.get("uploaded_lsn").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)))
}

/// `(backup_interval_ms, backup_retain_secs × 1000)` from the primary's `config.json` (the
/// `repl_config()` settings; defaults 1000 and 0), for uploaders outside the primary
/// (`sqlite-replica serve --backup`).
pub fn settings(dir: &Path) -> (u64, u64) {
    let v: serde_json::Value = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    (
        n("backup_interval_ms").unwrap_or(1000).max(100),
        n("backup_retain_secs").unwrap_or(0).saturating_mul(1000),
    )
}

/// The status file's content (None: none yet).
pub fn read_status(dir: &Path) -> Option<serde_json::Value> {
    let t = std::fs::read(dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&t).ok()
}

impl Uploader {
    /// An uploader of the log directory `dir` to `target` (the key from the environment).
    pub fn new(target: &str, dir: &Path) -> Result<Uploader> {
        let client = Client::new(Target::parse(target)?)?;
        let mut w = [0u8; 8];
        crate::util::urandom(&mut w).map_err(|e| Error::io("reading /dev/urandom", e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Ok(Uploader {
            client,
            dir: dir.to_path_buf(),
            log: None,
            key: Key::from_env()?,
            writer: crate::util::hex(&w),
            host: format!("{host} pid {}", std::process::id()),
            dir_id: dir_identity(dir),
            manifest: None,
            refused: None,
            errors: 0,
            uploads: 0,
            pending_deletes: Vec::new(),
            history_checked: false,
            compact_after: 0,
            compactions: 0,
        })
    }

    pub fn target(&self) -> String {
        self.client.target().display()
    }

    /// Set when another uploader holds the prefix (permanent).
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// One pass, then the status file: `retain_ms` is the bucket's retention window (0: keep
    /// everything).
    pub fn run(&mut self, retain_ms: u64) -> Result<PassReport> {
        let r = match &self.refused {
            Some(why) => Err(Error::Busy(why.clone())),
            None => self.pass(retain_ms),
        };
        if r.is_err() {
            self.errors += 1;
        }
        self.write_status(r.as_ref().err().map(|e| e.to_string()));
        r
    }

    /// How often an uploader must at least look at its lease: a quarter of it, so the manifest
    /// is rewritten (`renew`) before half the lease has gone by even when the upload interval
    /// is longer than the lease.
    pub fn renew_every() -> std::time::Duration {
        std::time::Duration::from_millis((lease_ms() / 4).max(50))
    }

    /// Keeps this uploader's hold on the prefix between passes (FORMAT.md §9.3): when this
    /// uploader wrote the manifest it holds and half the lease has gone by since, rewrites it
    /// unchanged but for its time (a conditional write: a lost race stops this uploader, as in
    /// a pass). Without it, an upload interval longer than half the lease would let another
    /// uploader take the prefix over from a live one.
    pub fn renew(&mut self) -> Result<()> {
        if self.refused.is_some() {
            return Ok(());
        }
        let Some((m, etag @ Some(_))) = self.manifest.clone() else {
            return Ok(()); // nothing held yet: the next pass writes the manifest
        };
        if m.writer != self.writer
            || crate::util::now_ms().saturating_sub(m.updated_ms) < lease_ms() / 2
        {
            return Ok(());
        }
        let r = self.write_manifest(m, etag);
        if r.is_err() {
            self.errors += 1;
            self.write_status(r.as_ref().err().map(|e| e.to_string()));
        }
        r
    }

    fn write_status(&self, error: Option<String>) {
        let durable = Log::read_durable(&self.dir).ok().flatten().map(|d| d.0);
        let uploaded = self.manifest.as_ref().and_then(|(m, _)| m.last_lsn());
        let prev = read_status(&self.dir);
        let keep = |k: &str| prev.as_ref().and_then(|p| p.get(k).cloned());
        let now = crate::util::now_ms();
        let v = serde_json::json!({
            "target": self.target(),
            "writer": self.writer,
            "uploaded_lsn": uploaded.map(|l| l.0).or_else(|| keep("uploaded_lsn").and_then(|v| v.as_u64())),
            "durable_lsn": durable.map(|l| l.0),
            "backlog": durable.map_or(0, |d| d.0.saturating_sub(uploaded.map_or(0, |u| u.0))),
            "objects": self.manifest.as_ref().map_or(0, |(m, _)| m.chunks.len() + m.snapshots.len()),
            "uploads": self.uploads,
            "errors": self.errors,
            "encrypted": self.key.is_some(),
            "last_error": error.clone().map(serde_json::Value::from).or_else(|| keep("last_error")).filter(|_| error.is_some()),
            "last_ok_ms": if error.is_none() { Some(now) } else { keep("last_ok_ms").and_then(|v| v.as_u64()) },
            "updated_ms": now,
            "refused": self.refused.is_some(),
            "compactions": self.compactions,
        });
        let path = self.dir.join(STATUS_FILE);
        let tmp = self
            .dir
            .join(format!("{STATUS_FILE}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, v.to_string())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    fn seal(&self, key: &str, plain: Vec<u8>) -> Result<Vec<u8>> {
        match &self.key {
            Some(k) => k.seal(key, &plain),
            None => Ok(plain),
        }
    }

    /// Reads the manifest (or prepares a new one) and checks that this log may write it.
    fn load_manifest(&mut self, meta: &txlog::Meta) -> Result<()> {
        if self.manifest.is_some() {
            return Ok(());
        }
        let what = self.client.describe(MANIFEST);
        let (mut m, etag) = match self.client.get(MANIFEST)? {
            Some((b, etag)) => (Manifest::from_json(&b, &what)?, Some(etag)),
            None => {
                let mut m = Manifest::new(
                    &meta.lineage,
                    meta.epoch,
                    meta.page_size,
                    &self.writer,
                    &self.host,
                );
                m.key_check = self.key.as_ref().map(Key::check).transpose()?;
                (m, None)
            }
        };
        if m.lineage != meta.lineage {
            return Err(Error::Misuse(format!(
                "{what} holds the backup of another database (lineage {}); this primary is lineage {}: choose another prefix",
                m.lineage, meta.lineage
            )));
        }
        match (&m.key_check, &self.key) {
            (Some(c), Some(k)) if !k.matches(c) => {
                return Err(Error::Misuse(format!(
                    "the backup key (REPL_BACKUP_KEY / REPL_BACKUP_KEY_FILE) is not the key the objects of {} were sealed with; nothing was uploaded",
                    self.target()
                )))
            }
            (Some(_), None) => {
                return Err(Error::Misuse(format!(
                    "{} is encrypted: set REPL_BACKUP_KEY or REPL_BACKUP_KEY_FILE to its key; nothing was uploaded",
                    self.target()
                )))
            }
            (None, Some(_)) if etag.is_some() => {
                return Err(Error::Misuse(format!(
                    "{} holds an unencrypted backup: encryption cannot start on it; choose another prefix, or unset REPL_BACKUP_KEY",
                    self.target()
                )))
            }
            _ => {}
        }
        let age = crate::util::now_ms().saturating_sub(m.updated_ms);
        let lease = lease_ms();
        // The manifest's writer served this very directory: it held `backup.lock`, which this
        // uploader holds now (it is only created under it), so that writer is gone (a
        // restarted primary resumes its backup at once instead of waiting out its own lease).
        let predecessor_gone = !self.dir_id.is_empty() && m.writer_dir == self.dir_id;
        if etag.is_some() && m.writer != self.writer && age < lease && !predecessor_gone {
            return Err(Error::Busy(format!(
                "{what} is held by uploader {} ({}), which wrote it {age} ms ago: two uploaders on one prefix; \
                 this one waits (it takes over {lease} ms after the other stops). Give each primary its own prefix",
                m.writer,
                m.writer_host,
            )));
        }
        if m.epoch < meta.epoch {
            m.epoch = meta.epoch;
        }
        // Taken over by this uploader at its next manifest write (conditional on `etag`).
        m.writer = self.writer.clone();
        m.writer_host = self.host.clone();
        m.writer_dir = self.dir_id.clone();
        self.manifest = Some((m, etag));
        Ok(())
    }

    fn pass(&mut self, retain_ms: u64) -> Result<PassReport> {
        let mut report = PassReport::default();
        let meta = Log::read_meta(&self.dir)?;
        let Some((durable, _)) = Log::read_durable(&self.dir)? else {
            return Ok(report);
        };
        report.durable_lsn = Some(durable);
        self.load_manifest(&meta)?;
        if self.log.is_none() {
            self.log = Some(Log::open(&self.dir, Default::default())?);
        }
        let (mut m, etag) = self.manifest.clone().expect("loaded");
        let log = self.log.as_ref().expect("opened");
        if !self.history_checked {
            if let Err(why) = same_history(&m, log, durable, &self.client.describe(MANIFEST)) {
                // Another copy of this database (same lineage, other history) wrote the bucket:
                // appending this log's records would break every checksum after them.
                self.refused = Some(why.clone());
                return Err(Error::Busy(why));
            }
            self.history_checked = true;
        }
        let mut changed = etag.is_none();
        // A base: the bucket's first snapshot, a newer local one (the primary's snapshot
        // cadence), or one that bridges a part of the log that is gone locally.
        let mut next = m.last_lsn().map(Lsn::next);
        let first_local = Log::first_segment_lsn(&self.dir)?;
        let local_gone = |n: Lsn| first_local.is_none_or(|f| n < f) && n <= durable;
        let newest_local = log.latest_snapshot(Some(durable))?;
        let bucket_newest = m.snapshots.last().map(|s| s.first_lsn);
        let need_base = next.is_none_or(local_gone);
        let newer = newest_local
            .as_ref()
            .is_some_and(|(s, _)| bucket_newest.is_none_or(|b| s.lsn > b));
        if need_base || newer {
            let Some((smeta, path)) = newest_local else {
                return Err(Error::Other(format!(
                    "{}: no durable snapshot to start the backup from yet; it starts with the next pass",
                    self.dir.display()
                )));
            };
            let key = snapshot_key(smeta.lsn, smeta.generation);
            if !m.snapshots.iter().any(|s| s.key == key) {
                let reading = |e| Error::io(format!("reading {}", path.display()), e);
                // Streamed from the file (multipart above one part): memory stays one part
                // however large the database. Sealing needs the whole object in memory.
                let (bytes, xxh3) = match &self.key {
                    None => {
                        let mut f = std::fs::File::open(&path).map_err(reading)?;
                        let len = f.metadata().map_err(reading)?.len();
                        self.client.put_stream(&key, len, &mut f)?
                    }
                    Some(_) => {
                        let body = self.seal(&key, std::fs::read(&path).map_err(reading)?)?;
                        self.client
                            .put_stream(&key, body.len() as u64, &mut body.as_slice())?
                    }
                };
                self.uploads += 1;
                report.objects += 1;
                report.bytes += bytes;
                m.snapshots
                    .push(Object::of_records(key, &smeta, &smeta, bytes, xxh3));
                m.snapshots.sort_by_key(|s| s.first_lsn);
                changed = true;
            }
            // The chain goes on after the snapshot when the log before it is gone locally (or
            // the bucket had nothing yet).
            if need_base {
                next = Some(smeta.lsn.next());
            }
        }
        let mut next = next.unwrap_or(Lsn(1));
        while next <= durable {
            let mut body = txlog::encode_segment_header(&txlog::SegmentHeader {
                first_lsn: next,
                created_ms: crate::util::now_ms(),
            })
            .to_vec();
            let mut first: Option<txlog::RecordMeta> = None;
            let mut last: Option<txlog::RecordMeta> = None;
            for r in log.read_from(next, Some(durable))? {
                let r = r?;
                body.extend_from_slice(&txlog::encode_record(&r));
                first.get_or_insert_with(|| r.meta.clone());
                last = Some(r.meta);
                if body.len() >= CHUNK_MAX {
                    break;
                }
            }
            let (Some(first), Some(last)) = (first, last) else {
                break;
            };
            let key = chunk_key(first.lsn, last.lsn);
            let body = self.seal(&key, body)?;
            self.client.put(&key, &body, Cond::None)?;
            self.uploads += 1;
            report.objects += 1;
            report.bytes += body.len() as u64;
            let xxh3 = xxhash_rust::xxh3::xxh3_64(&body);
            m.chunks.push(Object::of_records(
                key,
                &first,
                &last,
                body.len() as u64,
                xxh3,
            ));
            changed = true;
            next = last.lsn.next();
        }
        m.check_chain().map_err(|e| {
            Error::Corrupt(format!(
                "the manifest this pass would write is wrong ({e}); nothing was changed"
            ))
        })?;
        let replaced = self.compact(&mut m);
        changed |= !replaced.is_empty();
        let deleted = m.plan_retention(crate::util::now_ms(), retain_ms);
        changed |= !deleted.is_empty();
        let lease_due = crate::util::now_ms().saturating_sub(m.updated_ms) >= lease_ms() / 2;
        if changed || lease_due {
            self.write_manifest(m, etag)?;
        }
        // Merged chunks go after a grace period: a follower may still read the manifest that
        // names them (and one that misses an object re-reads the manifest anyway).
        let now = crate::util::now_ms();
        let grace = 3 * lease_ms();
        self.pending_deletes
            .extend(replaced.into_iter().map(|k| (now + grace, k)));
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_deletes)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.pending_deletes = later;
        let deleted: Vec<String> = deleted
            .into_iter()
            .chain(due.into_iter().map(|(_, k)| k))
            .collect();
        for key in &deleted {
            // The manifest no longer names them; a failed delete leaves an orphan only.
            if let Err(e) = self.client.delete(key) {
                crate::logging::event(&format!(
                    "event=backup_error target={:?} error={:?}",
                    self.target(),
                    e.to_string()
                ));
            }
        }
        report.deleted = deleted.len();
        report.uploaded_lsn = self.manifest.as_ref().and_then(|(m, _)| m.last_lsn());
        Ok(report)
    }

    /// Chunk compaction (FORMAT.md §9.7): merges one run of small contiguous chunks into one
    /// object and replaces them with it in `m` (written by the caller's conditional manifest
    /// write). Returns the replaced keys. A failure only postpones compaction (a minute): the
    /// pass goes on without it.
    fn compact(&mut self, m: &mut Manifest) -> Vec<String> {
        let now = crate::util::now_ms();
        if now < self.compact_after {
            return Vec::new();
        }
        let min = crate::config::get().backup_compact_chunks as usize;
        let Some(run) = m.plan_compaction(min, COMPACT_TARGET, COMPACT_KEEP_NEWEST) else {
            return Vec::new();
        };
        let parts = m.chunks[run.clone()].to_vec();
        match self.merge(&parts) {
            Ok(obj) => {
                self.compactions += 1;
                m.chunks.splice(run, [obj]);
                parts.into_iter().map(|o| o.key).collect()
            }
            Err(e) => {
                self.compact_after = now + 60_000;
                crate::logging::event(&format!(
                    "event=backup_error target={:?} error={:?}",
                    self.target(),
                    format!("chunk compaction postponed: {e}")
                ));
                Vec::new()
            }
        }
    }

    /// Downloads `parts` (checked against their manifest entries), concatenates their records
    /// under one segment header and uploads the result as one chunk.
    fn merge(&mut self, parts: &[Object]) -> Result<Object> {
        let (first, last) = (&parts[0], &parts[parts.len() - 1]);
        let mut body = txlog::encode_segment_header(&txlog::SegmentHeader {
            first_lsn: first.first_lsn,
            created_ms: crate::util::now_ms(),
        })
        .to_vec();
        for o in parts {
            let what = self.client.describe(&o.key);
            let Some((b, _)) = self.client.get(&o.key)? else {
                return Err(Error::Corrupt(format!("{what} is missing")));
            };
            if b.len() as u64 != o.bytes || xxhash_rust::xxh3::xxh3_64(&b) != o.xxh3 {
                return Err(Error::Corrupt(format!(
                    "{what} differs from its manifest entry (size or xxh3)"
                )));
            }
            let plain = match &self.key {
                Some(k) => k.open(&o.key, &b, &what)?,
                None => b,
            };
            let h = txlog::decode_segment_header(&plain)
                .map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
            if h.first_lsn != o.first_lsn {
                return Err(Error::Corrupt(format!(
                    "{what}: starts at LSN {}, the manifest says {}",
                    h.first_lsn, o.first_lsn
                )));
            }
            body.extend_from_slice(&plain[txlog::SEGMENT_HEADER_LEN..]);
        }
        let key = chunk_key(first.first_lsn, last.last_lsn);
        let body = self.seal(&key, body)?;
        self.client.put(&key, &body, Cond::None)?;
        self.uploads += 1;
        Ok(Object {
            key,
            first_lsn: first.first_lsn,
            last_lsn: last.last_lsn,
            generation: last.generation,
            epoch: last.epoch,
            first_ms: first.first_ms,
            last_ms: last.last_ms,
            bytes: body.len() as u64,
            xxh3: xxhash_rust::xxh3::xxh3_64(&body),
            db_checksum: last.db_checksum,
        })
    }

    /// The conditional manifest write; on a lost race, whoever wrote it is named and this
    /// uploader stops for good.
    fn write_manifest(&mut self, mut m: Manifest, etag: Option<String>) -> Result<()> {
        m.updated_ms = crate::util::now_ms();
        let cond = match &etag {
            Some(e) => Cond::Etag(e),
            None => Cond::Absent,
        };
        match self.client.put(MANIFEST, m.to_json().as_bytes(), cond)? {
            Some(new) => {
                self.uploads += 1;
                self.manifest = Some((m, Some(new)));
                Ok(())
            }
            None => {
                let what = self.client.describe(MANIFEST);
                let other = self
                    .client
                    .get(MANIFEST)?
                    .and_then(|(b, _)| Manifest::from_json(&b, &what).ok())
                    .map_or_else(
                        || "another uploader".to_string(),
                        |o| format!("uploader {} ({})", o.writer, o.writer_host),
                    );
                let why = format!(
                    "{what} was changed by {other} since this uploader last read it: two uploaders on one prefix; \
                     this one stops (nothing it wrote is in the manifest). Give each primary its own prefix"
                );
                self.refused = Some(why.clone());
                Err(Error::Busy(why))
            }
        }
    }
}

/// `boot id:device:inode` of the log directory: the same string means the same directory on the
/// same running kernel (a copy of it has another inode; another machine, or this one after a
/// reboot, another boot id). Empty when any part is unknown.
fn dir_identity(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default();
    match std::fs::metadata(dir) {
        Ok(md) if !boot.is_empty() => format!("{boot}:{}:{}", md.dev(), md.ino()),
        _ => String::new(),
    }
}

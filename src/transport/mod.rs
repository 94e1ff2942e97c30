//! Where a replica gets records from, and how a primary serves them. A `Source` answers three
//! questions: which lineage it serves, the newest snapshot, and the records after an LSN (only
//! what the primary made durable). `dir` reads a primary's log directory directly (one machine
//! or shared storage); `http` is the client of a primary's HTTP endpoints and implements the same
//! trait. `server` is that HTTP server (in the primary's process or `sqlite-replica serve`),
//! `notify` wakes its long-polls when the durable watermark moves, and `fuzzing` is the entry
//! point of the HTTP fuzz target.
//!
//! Invariant: a source never returns a record it could not validate (record checksums are
//! checked by the txlog decoder before a record leaves here).

pub mod dir;
pub mod etcd;
pub mod exec;
pub mod fuzzing;
pub mod http;
pub mod httpd;
mod metrics;
pub mod notify;
mod request;
mod routes;
pub mod s3;
pub mod server;
mod spec;

pub use spec::{Scheme, SourceSpec};

use crate::error::{Error, Result};
use crate::txlog::Record;
use crate::types::{Checksum, Epoch, Lsn, PageSize};

/// What a source says about itself.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub lineage: String,
    /// Oldest LSN still retained (None: the log is empty).
    pub first_lsn: Option<Lsn>,
    /// Newest durable LSN (what may be served).
    pub durable_lsn: Option<Lsn>,
    /// The epoch of the primary serving (1 for servers that do not say).
    pub epoch: Epoch,
    /// Where that epoch's history starts: (LSN, database checksum at it); None for epoch 1.
    pub epoch_start: Option<(Lsn, Checksum)>,
}

/// `X-Repl-Epoch-Start` (FORMAT.md §8.3): `<lsn> <checksum as 16 hex digits>`.
pub fn format_epoch_start(start: (Lsn, Checksum)) -> String {
    format!("{} {:016x}", start.0 .0, start.1 .0)
}

/// Parses `format_epoch_start`'s text.
pub fn parse_epoch_start(v: &str) -> Option<(Lsn, Checksum)> {
    let (l, c) = v.trim().split_once(' ')?;
    Some((
        Lsn(l.parse().ok()?),
        Checksum(u64::from_str_radix(c.trim(), 16).ok()?),
    ))
}

/// A snapshot file's stored bytes (compressed records stay compressed), from `start` to its
/// end: what a resumable download (WAL.md §E.10) copies into its part file.
pub struct SnapshotBytes {
    /// The snapshot's identity (FORMAT.md §8.4 `ETag`: LSN, generation, header checksum; the
    /// header checksum covers the record's version, flags and codec, so the encoding too).
    pub etag: String,
    pub lsn: Lsn,
    pub generation: crate::types::Generation,
    /// Length of the whole snapshot file.
    pub len: u64,
    /// Where `body` starts: the offset asked for when the source still serves the snapshot
    /// named by the request's ETag, else 0 (another snapshot now: start over).
    pub start: u64,
    /// Exactly `len - start` bytes (a shorter read is a broken transfer).
    pub body: Box<dyn std::io::Read + Send>,
}

/// Whether the first bytes of a snapshot file (segment header + record header) announce a
/// compressed record.
pub fn head_compressed(head: &[u8]) -> bool {
    let at = crate::txlog::SEGMENT_HEADER_LEN + 6;
    head.len() >= at + 2
        && u16::from_be_bytes([head[at], head[at + 1]]) & crate::txlog::FLAG_COMPRESSED != 0
}

/// Records after an LSN.
pub enum Fetch {
    /// Consecutive records starting at the requested LSN (possibly none: up to date).
    Records(Vec<Record>),
    /// The requested LSN is older than what the source retains: re-snapshot.
    Truncated { first_lsn: Lsn },
}

/// What `Source::fetch_async` hands its callback: the records (or `Truncated`) and what the
/// source said about itself with them (`last_info`).
pub type Fetched = Result<(Fetch, Option<SourceInfo>)>;

/// The callback of `Source::fetch_async` (runs on a worker of the HTTP engine).
pub type FetchDone = Box<dyn FnOnce(Fetched) + Send>;

pub trait Source: Send + Sync + 'static {
    /// A human-readable name (the path or URL the user gave).
    fn describe(&self) -> String;
    fn info(&self) -> Result<SourceInfo>;
    /// The newest snapshot record (every page of the database at its LSN).
    fn snapshot(&self) -> Result<Record>;
    /// Up to `max_bytes` of page data in records with LSN >= `from`, never past the durable LSN.
    fn fetch(&self, from: Lsn, max_bytes: usize) -> Result<Fetch>;
    /// `snapshot`, reporting (bytes received, total bytes) as it goes (for `repl_status()`).
    fn snapshot_progress(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Record> {
        let r = self.snapshot()?;
        let n = r.pages.iter().map(|p| p.data.len() as u64).sum();
        progress(n, n);
        Ok(r)
    }
    /// The newest snapshot streamed page by page (memory: a page and the per-page checksums,
    /// whatever the database size): `on_meta` gets the record header first, then `on_page`
    /// every page in order, while `progress` gets (bytes received, total). The pages are only
    /// trustworthy once this returns `Ok` (record and database checksums are checked at the
    /// end): write them where no reader sees them and undo on an error. The default buffers
    /// the whole snapshot (`snapshot_progress`); the directory and HTTP sources stream.
    fn snapshot_stream(
        &self,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&crate::txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(crate::txlog::RecordMeta, crate::txlog::DbChecksum)> {
        let r = self.snapshot_progress(progress)?;
        on_meta(&r.meta)?;
        let mut sums = crate::txlog::DbChecksum::new(r.meta.page_size);
        for p in &r.pages {
            sums.set_page(p.pgno, &p.data);
            on_page(p.pgno, &p.data)?;
        }
        sums.truncate(r.meta.commit_size);
        Ok((r.meta, sums))
    }
    /// `snapshot_stream`, but of the newest snapshot at or before `at` (None: the newest), for
    /// a point-in-time restore. The default streams the newest snapshot and refuses it (in
    /// `on_meta`, before any page) when it is after `at`: a server serves only its newest
    /// snapshot. The directory and bucket sources pick an older one.
    fn snapshot_stream_at(
        &self,
        at: Option<Lsn>,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&crate::txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(crate::txlog::RecordMeta, crate::txlog::DbChecksum)> {
        let describe = self.describe();
        self.snapshot_stream(
            progress,
            &mut |m| match at {
                Some(a) if m.lsn > a => Err(Error::Unsupported(format!(
                    "{describe} serves only its newest snapshot, at LSN {}, which is after the target LSN {a}; \
                     restore from the primary's log directory or from its bucket backup instead",
                    m.lsn
                ))),
                _ => on_meta(m),
            },
            on_page,
        )
    }
    /// The LSN of the last transaction committed at or before `ms` (Unix milliseconds), when
    /// the source can tell without streaming (directory, bucket); `Ok(None)` when it cannot
    /// (HTTP: the restore then stops at the first record committed later), or when nothing
    /// that early is held.
    fn lsn_at_time(&self, _ms: u64) -> Result<Option<Lsn>> {
        Ok(None)
    }
    /// Whether `lsn_at_time` answers.
    fn knows_times(&self) -> bool {
        false
    }
    /// Continues the newest snapshot after `prefix` (a bootstrap resumed, WAL.md §E.1), if the
    /// source still serves the snapshot the prefix was taken from (same record header: LSN,
    /// generation, checksums, length); `Ok(None)` when it serves another one now, or cannot
    /// continue: then start over with `snapshot_stream`. `progress` counts the prefix as done
    /// (bytes of the snapshot file). Trustworthy only once this returns `Ok(Some(_))`: the
    /// record and database checksums cover the prefix too.
    fn snapshot_resume(
        &self,
        _prefix: crate::txlog::SnapshotPrefix,
        _progress: &mut dyn FnMut(u64, u64),
        _on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<Option<(crate::txlog::RecordMeta, crate::txlog::DbChecksum)>> {
        Ok(None)
    }
    /// The newest snapshot file's stored bytes from `resume = (etag, offset)` on, if the
    /// source still serves that snapshot (`start` = offset), else the newest one whole
    /// (`start` = 0). The bytes are not validated here: the caller keeps them and validates the
    /// whole file (record and database checksums) before using any page.
    fn snapshot_bytes(&self, _resume: Option<(&str, u64)>) -> Result<SnapshotBytes> {
        Err(Error::Unsupported(format!(
            "{} cannot serve a snapshot file's bytes (resumable download)",
            self.describe()
        )))
    }
    /// Forwards a write (`repl_exec`) to the primary: the JSON body of `POST /v1/exec`, the
    /// answer's JSON. Only an HTTP primary can run writes.
    fn exec(&self, _body: &serde_json::Value) -> Result<serde_json::Value> {
        Err(Error::Unsupported(format!(
            "repl_exec(): {} is a directory source, which cannot run writes; serve the primary over HTTP \
             (repl_primary('host:port')) and replicate from http://host:port, or write on the primary itself",
            self.describe()
        )))
    }
    /// What the source said about itself with the records of the last fetch (HTTP response
    /// headers), if it says anything: saves a round trip to `info()` right after a fetch.
    fn last_info(&self) -> Option<SourceInfo> {
        None
    }
    /// `fetch`, but when nothing is durable at `from` yet, wait up to `wait` for it (a
    /// long-poll for HTTP; a watch of the durable watermark for a directory).
    fn fetch_wait(&self, from: Lsn, max_bytes: usize, wait: std::time::Duration) -> Result<Fetch> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let f = self.fetch(from, max_bytes)?;
            match &f {
                Fetch::Records(v) if v.is_empty() && std::time::Instant::now() < deadline => {}
                _ => return Ok(f),
            }
            std::thread::sleep(notify::POLL);
        }
    }
    /// `fetch_wait` without holding a thread while it waits: `done` runs on a worker of the
    /// process's HTTP engine (`httpd`) with the answer. The HTTP source sends the long-poll
    /// through the engine's event-driven client (one kept-alive connection per source); a
    /// source with a log directory parks on it in the engine (woken by `wake_dir`/inotify like
    /// the server's long-polls) and fetches on a worker; any other source runs `fetch_wait` on
    /// a worker. `done` runs exactly once, unless `cancel_async` abandons the request.
    fn fetch_async(
        self: std::sync::Arc<Self>,
        from: Lsn,
        max_bytes: usize,
        wait: std::time::Duration,
        done: FetchDone,
    ) {
        let deadline = std::time::Instant::now() + wait;
        if self.log_dir().is_some() {
            return park_and_fetch(self, from, max_bytes, deadline, done);
        }
        let job = Box::new(move || {
            let got = self.fetch_wait(from, max_bytes, wait);
            done(got.map(|f| (f, self.last_info())))
        });
        if let Err(e) = httpd::spawn(httpd::Pool::Fast, job) {
            crate::logging::event(&format!("event=follow_error error={:?}", e.to_string()));
        }
    }
    /// Abandon a `fetch_async` in flight (its `done` is dropped without running); a no-op
    /// where there is nothing to abandon.
    fn cancel_async(&self) {}
    /// The page size of the newest durable snapshot (None: none yet). Only asked on error
    /// paths (a replica naming why a source does not fit it), so it may cost a file read.
    fn page_size(&self) -> Result<Option<PageSize>>;
    /// The newest epoch the replica has seen and where (a primary as a person reads it): sent
    /// with every later request (`X-Repl-Epoch`, `X-Repl-Primary`) so that a deposed primary
    /// learns it is deposed (FORMAT.md §8.1). A no-op for sources that send nothing.
    fn set_epoch(&self, _epoch: Epoch, _primary: Option<&str>) {}
    /// The primary's log directory when it is on this machine (a directory source); None for
    /// a remote source.
    fn log_dir(&self) -> Option<&std::path::Path> {
        None
    }
}

/// `fetch_async` of a source with a log directory: fetch now; when nothing is durable at
/// `from` yet, park in the engine until the directory changes or the deadline, then again.
fn park_and_fetch<S: Source + ?Sized>(
    src: std::sync::Arc<S>,
    from: Lsn,
    max_bytes: usize,
    deadline: std::time::Instant,
    done: FetchDone,
) {
    // Read before looking: a wake-up after this point makes the park return at once.
    let seen = httpd::wake_seq();
    match src.fetch(from, max_bytes) {
        Ok(Fetch::Records(v)) if v.is_empty() && std::time::Instant::now() < deadline => {
            let Some(dir) = src.log_dir().map(std::path::Path::to_path_buf) else {
                return done(Ok((Fetch::Records(v), None)));
            };
            let job = Box::new(move || park_and_fetch(src, from, max_bytes, deadline, done));
            if let Err(e) = httpd::park_dir(&dir, deadline, seen, job) {
                crate::logging::event(&format!("event=follow_error error={:?}", e.to_string()));
            }
        }
        other => {
            let info = src.last_info();
            done(other.map(|f| (f, info)))
        }
    }
}

/// Parse what the user passed to `repl_sync()` (`SourceSpec::parse`) and open it.
pub fn open_source(spec: &str) -> Result<Box<dyn Source>> {
    SourceSpec::parse(spec)?.open()
}

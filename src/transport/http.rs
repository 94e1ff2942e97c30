//! The HTTP source: a primary's `/v1/*` endpoints (docs/FORMAT.md §8) read with `ureq`
//! (`repl_sync`, `repl_wait`, snapshots, `repl_exec`) or, for a follower's long-polls
//! (`fetch_async`), with the process's HTTP engine's event-driven client (`httpd::client`: no
//! thread waits), behaving exactly like the directory source. Both clients' `/v1/log` answers
//! go through the same decoding (`log_answer`). Every record is decoded and validated (header
//! and record checksums, dense LSNs from the one asked for, the count the server announced)
//! before it leaves here; the replica then checks database checksums before writing. A
//! dropped connection, a truncated body or a flipped byte is an error for this fetch and
//! nothing is applied; the next sync retries.
//!
//! Token: `token=` in the URL's query, else `REPL_TOKEN`. It is sent as a bearer token and
//! never shown (`describe()` and errors print the URL without it).
//!
//! URLs (parsed by `SourceSpec`): `http(s)://host:port` (the listener's default database) or
//! `http(s)://host:port/v1/db/<name>` (one of several databases on one listener). For https the
//! server certificate is checked against `ca=<PEM file>` in the URL, else `REPL_CA_FILE`, else
//! the system's CA bundle.

use super::httpd::client::{Client, ClientResponse, GetRequest, Target};
use super::{Fetch, FetchDone, Source, SourceInfo, SourceSpec};
use crate::error::{Error, Result};
use crate::txlog::{decode_record, DbChecksum, Record, SEGMENT_HEADER_LEN};
use crate::types::{Epoch, Lsn};
use std::io::Read;
use std::time::Duration;

/// Largest snapshot accepted in one response (the snapshot is held in memory).
const MAX_SNAPSHOT_BYTES: u64 = 64 << 30;
/// Largest `/v1/log` body accepted (a batch asks for at most 256 MiB of pages).
const MAX_LOG_BYTES: u64 = 512 << 20;
/// A long-poll may take this much longer than its `wait_ms` before it is given up.
const LOG_GRACE: Duration = Duration::from_secs(30);

pub struct HttpSource {
    /// `http(s)://host:port` (no trailing slash, no query).
    base: String,
    /// The database name when the URL names one (`/v1/db/<name>`).
    db: Option<String>,
    token: Option<String>,
    /// The token sent with `/v1/exec` (`exec_token=`, else `REPL_EXEC_TOKEN`, else `token`).
    exec_token: Option<String>,
    agent: ureq::Agent,
    follower: String,
    /// From the headers of the last /v1/log response.
    last: std::sync::Mutex<Option<SourceInfo>>,
    /// Where the engine's client connects (`fetch_async`); None when the URL does not parse
    /// as one (then `fetch_async` runs the blocking client on a worker).
    target: Option<Target>,
    /// The engine's client of `fetch_async`: one kept-alive connection, made on first use.
    client: std::sync::Mutex<Option<std::sync::Arc<Client>>>,
    /// The newest epoch the replica has seen and where (`Source::set_epoch`), sent with every
    /// request as `X-Repl-Epoch` / `X-Repl-Primary`.
    seen: std::sync::Mutex<(Epoch, Option<String>)>,
}

impl HttpSource {
    /// Parse `spec` as an `http(s)://` URL and prepare the client (tests and tools; a replica
    /// parses its source once, `SourceSpec`, and calls `connect`).
    pub fn open(spec: &str) -> Result<HttpSource> {
        let s = spec.trim();
        if !s.starts_with("http://") && !s.starts_with("https://") {
            return Err(Error::Misuse(format!(
                "not an http:// or https:// URL: {}",
                SourceSpec::parse(s)?
            )));
        }
        let spec = SourceSpec::parse(s)?;
        HttpSource::connect(
            spec.address(),
            spec.db().map(str::to_string),
            spec.token().map(str::to_string),
            spec.exec_token().map(str::to_string),
            spec.ca(),
        )
    }

    /// The client of database `db` (None: the listener's default) of the primary at `base`
    /// (`http(s)://host:port`); without `token`, `REPL_TOKEN`; for https, the CA file `ca`,
    /// else `REPL_CA_FILE`, else the system bundle.
    pub fn connect(
        base: &str,
        db: Option<String>,
        token: Option<String>,
        exec_token: Option<String>,
        ca: Option<&str>,
    ) -> Result<HttpSource> {
        let token = token.or_else(|| crate::config::get().token.clone());
        let exec_token = exec_token.or_else(|| crate::config::get().exec_token.clone());
        let mut builder = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(3));
        let mut tls = None;
        if base.starts_with("https://") {
            let ca = ca.or(crate::config::get().ca_file.as_deref());
            let cfg = client_tls(ca)?;
            builder = builder.tls_config(cfg.clone());
            tls = Some(cfg);
        }
        let agent = builder.build();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        Ok(HttpSource {
            base: base.to_string(),
            db,
            token,
            exec_token,
            agent,
            follower: format!("{host}:{}", std::process::id()),
            last: std::sync::Mutex::new(None),
            target: Target::parse(base, tls),
            client: std::sync::Mutex::new(None),
            seen: std::sync::Mutex::new((Epoch::FIRST, None)),
        })
    }

    /// `X-Repl-Epoch` (and `X-Repl-Primary` when known) for every request: FORMAT.md §8.1.
    fn epoch_headers(&self) -> Vec<(String, String)> {
        let g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = vec![("X-Repl-Epoch".to_string(), g.0.to_string())];
        if let Some(p) = &g.1 {
            h.push(("X-Repl-Primary".to_string(), p.clone()));
        }
        h
    }

    /// `req` with the epoch headers.
    fn with_epoch(&self, mut req: ureq::Request) -> ureq::Request {
        for (k, v) in self.epoch_headers() {
            req = req.set(&k, &v);
        }
        req
    }

    /// The URL of endpoint `path` (`/v1/log?…`) of this source's database.
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, self.target(path))
    }

    /// The request target of endpoint `path` of this source's database (`/v1/db/<name>/…`
    /// when the URL names one).
    fn target(&self, path: &str) -> String {
        match &self.db {
            None => path.to_string(),
            Some(name) => format!("/v1/db/{name}{}", path.strip_prefix("/v1").unwrap_or(path)),
        }
    }

    /// The source as a person reads it (no token).
    fn shown(&self) -> String {
        match &self.db {
            None => self.base.clone(),
            Some(name) => format!("{}/v1/db/{name}", self.base),
        }
    }

    /// Names this follower in the primary's metrics (e.g. the replica's path).
    pub fn set_follower(&mut self, name: &str) {
        let host = self
            .follower
            .split(':')
            .next()
            .unwrap_or("host")
            .to_string();
        self.follower = format!("{host}:{name}");
    }

    fn get(&self, path: &str, timeout: Duration) -> Result<ureq::Response> {
        let url = self.url(path);
        let mut req = self
            .with_epoch(self.agent.get(&url))
            .timeout(timeout)
            .set("X-Repl-Follower", &self.follower)
            .set("X-Repl-Accept-Encoding", ACCEPT_ENCODING);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                Err(status_error(code, &self.shown(), &error_message(&body)))
            }
            Err(ureq::Error::Transport(t)) => Err(transport_error(&self.shown(), &t.to_string())),
        }
    }

    /// The request target of `/v1/log` for this source's database.
    fn log_path(&self, from: Lsn, max_bytes: usize, wait: Duration) -> String {
        self.target(&format!(
            "/v1/log?from={}&max_bytes={}&wait_ms={}",
            from.0,
            max_bytes.clamp(1, 256 << 20),
            wait.as_millis()
        ))
    }

    /// The engine's client, made on first use.
    fn client(&self, target: &Target) -> std::sync::Arc<Client> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| std::sync::Arc::new(Client::new(target.clone())))
            .clone()
    }

    /// What a `/v1/log` answer means, from either client (ureq's or the engine's): `status`,
    /// the headers (`header`), and the whole body as announced by its Content-Length. The
    /// source info in the headers is remembered (`last_info`) and returned; every record is
    /// decoded and validated (dense from `from`, the count the server announced); 410 is
    /// `Truncated`, any other error status the error it names.
    fn log_answer(
        &self,
        from: Lsn,
        status: u16,
        header: &dyn Fn(&str) -> Option<String>,
        body: &[u8],
    ) -> Result<(Fetch, Option<SourceInfo>)> {
        if status != 200 {
            let msg = error_message(&String::from_utf8_lossy(body));
            return match status_error(status, &self.shown(), &msg) {
                Error::LogTruncated { first_lsn, .. } => Ok((
                    Fetch::Truncated {
                        first_lsn: first_lsn.unwrap_or(Lsn(from.0 + 1)),
                    },
                    None,
                )),
                e => Err(e),
            };
        }
        let num = |h: &str| header(h).and_then(|v| v.parse::<u64>().ok());
        let info = header("X-Repl-Lineage").map(|l| SourceInfo {
            lineage: l,
            first_lsn: num("X-Repl-First-Lsn").map(Lsn),
            durable_lsn: num("X-Repl-Durable-Lsn").map(Lsn),
            epoch: num("X-Repl-Epoch")
                .and_then(|e| u32::try_from(e).ok())
                .map_or(Epoch::FIRST, Epoch),
            epoch_start: header("X-Repl-Epoch-Start").and_then(|v| super::parse_epoch_start(&v)),
        });
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = info.clone();
        let announced: Option<u32> = header("X-Repl-Records").and_then(|v| v.parse().ok());
        let records = decode_all(body, from).map_err(|e| {
            Error::Corrupt(format!(
                "{}: a record received for LSN {from} is invalid ({e}); nothing was applied, the next repl_sync() \
                 retries",
                self.shown()
            ))
        })?;
        if let Some(n) = announced {
            if n as usize != records.len() {
                return Err(Error::Corrupt(format!(
                    "{}: the server announced {n} records for LSN {from} but sent {}; nothing was applied",
                    self.shown(),
                    records.len()
                )));
            }
        }
        Ok((Fetch::Records(records), info))
    }

    /// The records after `from`, waiting up to `wait` at the durable end (server long-poll),
    /// with the blocking client (`fetch_async` is the same request through the engine).
    fn log(&self, from: Lsn, max_bytes: usize, wait: Duration) -> Result<Fetch> {
        let mut req = self
            .with_epoch(self.agent.get(&format!(
                "{}{}",
                self.base,
                self.log_path(from, max_bytes, wait)
            )))
            .timeout(wait + LOG_GRACE)
            .set("X-Repl-Follower", &self.follower)
            .set("X-Repl-Accept-Encoding", ACCEPT_ENCODING);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                return self
                    .log_answer(from, code, &|_| None, body.as_bytes())
                    .map(|(f, _)| f);
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(transport_error(&self.shown(), &t.to_string()))
            }
        };
        let headers: Vec<(String, String)> = resp
            .headers_names()
            .into_iter()
            .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string())))
            .collect();
        let header = |h: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(h))
                .map(|(_, v)| v.clone())
        };
        let len: Option<u64> = header("Content-Length").and_then(|v| v.parse().ok());
        let mut body = Vec::with_capacity(len.unwrap_or(0).min(64 << 20) as usize);
        resp.into_reader()
            .take(len.unwrap_or(u64::MAX).min(MAX_LOG_BYTES))
            .read_to_end(&mut body)
            .map_err(|e| {
                Error::Other(format!(
                    "the connection to {} broke while reading records at LSN {from}: {e}; nothing was applied, \
                     the next repl_sync() retries",
                    self.shown()
                ))
            })?;
        if let Some(l) = len {
            if body.len() as u64 != l {
                return Err(Error::Corrupt(format!(
                    "{}: the response for LSN {from} was cut short ({} of {l} bytes); nothing was applied",
                    self.shown(),
                    body.len()
                )));
            }
        }
        self.log_answer(from, 200, &header, &body).map(|(f, _)| f)
    }
}

/// A reader that reports (bytes so far, total) to `progress` about every MiB (snapshot
/// downloads: here and in `replica::download`).
pub struct Counted<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    last: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl<'a, R> Counted<'a, R> {
    /// `done` bytes were there before `inner` (a resumed download).
    pub fn new(inner: R, done: u64, total: u64, progress: &'a mut dyn FnMut(u64, u64)) -> Self {
        Counted {
            inner,
            done,
            total,
            last: done,
            progress,
        }
    }
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done >= self.last + (1 << 20) || self.done == self.total {
            self.last = self.done;
            (self.progress)(self.done, self.total);
        }
        Ok(n)
    }
}

/// The codecs this build reads compressed records in (FORMAT.md §8.9): sent with every request,
/// so a primary storing compressed records serves them as they are.
const ACCEPT_ENCODING: &str = "zstd, lz4";

/// The message of an error answer: its JSON `error`, else the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.to_string())
}

/// A connection-level failure, with the fix for a certificate the client did not accept.
fn transport_error(shown: &str, t: &str) -> Error {
    if t.contains("certificate") || t.contains("UnknownIssuer") || t.contains("InvalidCertificate")
    {
        return Error::Other(format!(
            "the TLS certificate of the primary at {shown} was not accepted ({t}): give the CA that signed it \
             with ca=/path/to/ca.pem in the URL or REPL_CA_FILE, and check that the certificate names the host \
             in the URL"
        ));
    }
    Error::Other(format!(
        "cannot reach the primary at {shown}: {t}; the replica stays readable at its current LSN and the next \
         repl_sync() retries"
    ))
}

/// The TLS client configuration: roots from `ca_file` (PEM), else the system bundle.
fn client_tls(ca_file: Option<&str>) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let system = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ];
    let files: Vec<&str> = match ca_file {
        Some(f) => vec![f],
        None => system
            .iter()
            .copied()
            .filter(|p| std::path::Path::new(p).exists())
            .take(1)
            .collect(),
    };
    for f in &files {
        let pem = std::fs::read(f).map_err(|e| {
            Error::io(
                format!("reading the CA file {f} (ca= in the URL or REPL_CA_FILE)"),
                e,
            )
        })?;
        let mut n = 0;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c = c.map_err(|e| Error::Misuse(format!("{f}: not a PEM certificate: {e}")))?;
            if roots.add(c).is_ok() {
                n += 1;
            }
        }
        if n == 0 && ca_file.is_some() {
            return Err(Error::Misuse(format!(
                "{f}: no usable CA certificate in the file (PEM expected)"
            )));
        }
    }
    if files.is_empty() {
        return Err(Error::Misuse(
            "https: this machine has no CA bundle (/etc/ssl/certs/ca-certificates.crt): install \
             ca-certificates, or give the CA with ca=/path/to/ca.pem in the URL or REPL_CA_FILE"
                .into(),
        ));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(super::httpd::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Other(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

fn status_error(code: u16, base: &str, msg: &str) -> Error {
    match code {
        401 => Error::Misuse(format!(
            "the primary at {base} refused the request (401): {msg}; give the token as ?token= in the URL or in REPL_TOKEN"
        )),
        410 => {
            // The first retained LSN, for `log` (the message itself is the server's).
            let first = msg
                .split("starts at LSN ")
                .nth(1)
                .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
                .unwrap_or("");
            Error::LogTruncated {
                first_lsn: first.parse().ok().map(Lsn),
                message: format!("HTTP 410 first_lsn={first}: {msg}"),
            }
        }
        _ => Error::Other(format!("the primary at {base} answered HTTP {code}: {msg}")),
    }
}

/// Decodes a body of concatenated records, which must start at `from` and be dense.
pub fn decode_all(mut b: &[u8], from: Lsn) -> Result<Vec<Record>> {
    let mut out: Vec<Record> = Vec::new();
    let mut want = from;
    while !b.is_empty() {
        let (r, used) = decode_record(b)?;
        if r.meta.lsn != want {
            return Err(Error::Corrupt(format!(
                "expected LSN {want}, got LSN {}",
                r.meta.lsn
            )));
        }
        want = want.next();
        out.push(r);
        b = &b[used..];
    }
    Ok(out)
}

impl Source for HttpSource {
    fn describe(&self) -> String {
        self.shown()
    }

    fn info(&self) -> Result<SourceInfo> {
        let body = self
            .get("/v1/info", Duration::from_secs(10))?
            .into_string()
            .map_err(|e| Error::Other(format!("{}: reading /v1/info: {e}", self.shown())))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| Error::Corrupt(format!("{}: /v1/info is not JSON: {e}", self.shown())))?;
        let lineage = v["lineage"]
            .as_str()
            .ok_or_else(|| Error::Corrupt(format!("{}: /v1/info has no lineage", self.shown())))?
            .to_string();
        let start = &v["epoch_start"];
        Ok(SourceInfo {
            lineage,
            first_lsn: v["first_lsn"].as_u64().map(Lsn),
            durable_lsn: v["durable_lsn"].as_u64().map(Lsn),
            epoch: v["epoch"]
                .as_u64()
                .and_then(|e| u32::try_from(e).ok())
                .map_or(Epoch::FIRST, Epoch),
            epoch_start: match (start["lsn"].as_u64(), start["checksum"].as_str()) {
                (Some(l), Some(c)) => super::parse_epoch_start(&format!("{l} {c}")),
                _ => None,
            },
        })
    }

    fn page_size(&self) -> Result<Option<crate::types::PageSize>> {
        let body = self
            .get("/v1/info", Duration::from_secs(10))?
            .into_string()
            .map_err(|e| Error::Other(format!("{}: reading /v1/info: {e}", self.shown())))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| Error::Corrupt(format!("{}: /v1/info is not JSON: {e}", self.shown())))?;
        Ok(v["snapshot"]["page_size"]
            .as_u64()
            .and_then(|n| crate::types::PageSize::new(n as u32)))
    }

    fn snapshot(&self) -> Result<Record> {
        self.snapshot_progress(&mut |_, _| {})
    }

    fn snapshot_progress(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Record> {
        let resp = self.get("/v1/snapshot", Duration::from_secs(3600))?;
        let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
        let mut body = Vec::with_capacity(len.unwrap_or(0).min(1 << 30) as usize);
        let mut rd = resp
            .into_reader()
            .take(len.unwrap_or(MAX_SNAPSHOT_BYTES).min(MAX_SNAPSHOT_BYTES));
        let broke = |e: std::io::Error| {
            Error::Other(format!(
                "the snapshot download from {} broke: {e}; nothing was written, retry repl_sync()",
                self.shown()
            ))
        };
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = rd.read(&mut chunk).map_err(broke)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
            progress(body.len() as u64, len.unwrap_or(0));
        }
        if len.is_some_and(|l| l != body.len() as u64) || body.len() < SEGMENT_HEADER_LEN {
            return Err(Error::Corrupt(format!(
                "{}: the snapshot was cut short ({} bytes); nothing was written, retry repl_sync()",
                self.shown(),
                body.len()
            )));
        }
        let bad = |e: String| {
            Error::Corrupt(format!(
                "{}: the snapshot is invalid ({e}); nothing was written",
                self.shown()
            ))
        };
        crate::txlog::decode_segment_header(&body[..SEGMENT_HEADER_LEN])
            .map_err(|e| bad(e.to_string()))?;
        let (rec, used) =
            decode_record(&body[SEGMENT_HEADER_LEN..]).map_err(|e| bad(e.to_string()))?;
        if !rec.meta.snapshot || SEGMENT_HEADER_LEN + used != body.len() {
            return Err(bad("not exactly one SNAPSHOT record".into()));
        }
        let mut sums = DbChecksum::new(rec.meta.page_size);
        for p in &rec.pages {
            sums.set_page(p.pgno, &p.data);
        }
        sums.truncate(rec.meta.commit_size);
        if sums.total() != rec.meta.db_checksum {
            return Err(bad(format!(
                "database checksum {} but the pages give {}",
                rec.meta.db_checksum,
                sums.total()
            )));
        }
        Ok(rec)
    }

    fn snapshot_stream(
        &self,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&crate::txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(crate::txlog::RecordMeta, DbChecksum)> {
        let resp = self.get("/v1/snapshot", Duration::from_secs(3600))?;
        let Some(len) = resp
            .header("Content-Length")
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return Err(Error::Corrupt(format!(
                "{}: the snapshot response has no Content-Length; nothing was written",
                self.shown()
            )));
        };
        let shown = self.shown();
        let mut counted = Counted::new(resp.into_reader().take(len), 0, len, progress);
        crate::txlog::stream_snapshot_from(&mut counted, &shown, len, on_meta, on_page).map_err(
            |e| match e {
                Error::Io { .. } => Error::Other(format!(
                    "the snapshot download from {shown} broke: {e}; nothing was applied, retry repl_sync()"
                )),
                Error::Corrupt(m) => Error::Corrupt(format!(
                    "{shown}: the snapshot is invalid or was cut short ({m}); nothing was applied"
                )),
                other => other,
            },
        )
    }

    fn snapshot_resume(
        &self,
        prefix: crate::txlog::SnapshotPrefix,
        progress: &mut dyn FnMut(u64, u64),
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<Option<(crate::txlog::RecordMeta, DbChecksum)>> {
        let (start, len, etag) = (prefix.offset(), prefix.file_len(), prefix.etag());
        let url = self.url("/v1/snapshot");
        let mut req = self
            .with_epoch(self.agent.get(&url))
            .timeout(Duration::from_secs(3600))
            .set("X-Repl-Follower", &self.follower)
            .set("Range", &format!("bytes={start}-"))
            .set("If-Range", &etag);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            // The range is past the end: not the snapshot we started.
            Err(ureq::Error::Status(416, _)) => return Ok(None),
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                return Err(status_error(code, &self.shown(), &error_message(&body)));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(transport_error(&self.shown(), &t.to_string()))
            }
        };
        // Only a 206 for exactly our snapshot and our range continues; a 200 (another
        // snapshot, or a server without ranges) means starting over.
        let lsn = prefix.meta.lsn.0.to_string();
        let same = resp.status() == 206
            && resp.header("ETag") == Some(etag.as_str())
            && resp.header("X-Repl-Snapshot-Lsn") == Some(lsn.as_str())
            && resp.header("Content-Range") == Some(&format!("bytes {start}-{}/{len}", len - 1))
            && resp
                .header("Content-Length")
                .and_then(|v| v.parse::<u64>().ok())
                == Some(len - start);
        if !same {
            return Ok(None);
        }
        let shown = self.shown();
        let mut counted = Counted::new(resp.into_reader().take(len - start), start, len, progress);
        crate::txlog::stream_snapshot_rest(&mut counted, &shown, prefix, on_page)
            .map(Some)
            .map_err(|e| match e {
                Error::Io { .. } => Error::Other(format!(
                    "the snapshot download from {shown} broke: {e}; what arrived so far is kept, retry repl_sync() to continue"
                )),
                Error::Corrupt(m) if m.contains("cut short") => Error::Other(format!(
                    "the snapshot download from {shown} broke ({m}); what arrived so far is kept, retry repl_sync() to continue"
                )),
                Error::Corrupt(m) => Error::Corrupt(format!(
                    "{shown}: the snapshot is invalid ({m}); nothing was applied"
                )),
                other => other,
            })
    }

    fn snapshot_bytes(&self, resume: Option<(&str, u64)>) -> Result<super::SnapshotBytes> {
        // A snapshot served without an ETag (an older primary) cannot be named: never resumed.
        let resume = resume.filter(|(etag, _)| !etag.is_empty());
        let url = self.url("/v1/snapshot");
        let mut req = self
            .agent
            .get(&url)
            .timeout(Duration::from_secs(3600))
            .set("X-Repl-Follower", &self.follower)
            // Compressed snapshots as stored: the bytes a range counts are immutable once
            // written, and the ETag (the header checksum) names their encoding.
            .set("X-Repl-Accept-Encoding", ACCEPT_ENCODING);
        if let Some((etag, off)) = resume {
            req = req
                .set("Range", &format!("bytes={off}-"))
                .set("If-Range", etag);
        }
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            // The range is past the end: not the snapshot we started; ask for it whole.
            Err(ureq::Error::Status(416, _)) if resume.is_some() => {
                return self.snapshot_bytes(None)
            }
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                return Err(status_error(code, &self.shown(), &error_message(&body)));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(transport_error(&self.shown(), &t.to_string()))
            }
        };
        let etag = resp.header("ETag").unwrap_or("").to_string();
        let num = |h: &str| resp.header(h).and_then(|v| v.trim().parse::<u64>().ok());
        let Some(n) = num("Content-Length") else {
            return Err(Error::Corrupt(format!(
                "{}: the snapshot response has no Content-Length; nothing was written",
                self.shown()
            )));
        };
        let (start, len) = match (resp.status(), resume) {
            (200, _) => (0, n),
            (206, Some((want, off))) => {
                // Only exactly our snapshot and our range continues; anything else (a server
                // that answers ranges differently) is asked for whole.
                let total = resp
                    .header("Content-Range")
                    .and_then(|v| v.strip_prefix(&format!("bytes {off}-")))
                    .and_then(|v| v.split_once('/'))
                    .and_then(|(last, len)| Some((last.parse::<u64>().ok()?, len.parse().ok()?)))
                    .filter(|(last, len)| last + 1 == *len && len - off == n);
                match total {
                    Some((_, len)) if etag == want => (off, len),
                    _ => return self.snapshot_bytes(None),
                }
            }
            (code, _) => {
                return Err(Error::Other(format!(
                    "{}: unexpected status {code} for /v1/snapshot; nothing was written, retry repl_sync()",
                    self.shown()
                )))
            }
        };
        Ok(super::SnapshotBytes {
            etag,
            lsn: Lsn(num("X-Repl-Snapshot-Lsn").unwrap_or(0)),
            generation: crate::types::Generation(
                num("X-Repl-Generation").map_or(0, |g| g.min(u32::MAX as u64) as u32),
            ),
            len,
            start,
            body: Box::new(resp.into_reader().take(len - start)),
        })
    }

    fn fetch(&self, from: Lsn, max_bytes: usize) -> Result<Fetch> {
        self.log(from, max_bytes, Duration::ZERO)
    }

    fn exec(&self, body: &serde_json::Value) -> Result<serde_json::Value> {
        let url = self.url("/v1/exec");
        let text = body.to_string();
        // A request id makes the retry safe: the primary answers a duplicate from its record.
        let attempts = if body["request_id"].is_string() { 2 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            let mut req = self
                .with_epoch(self.agent.post(&url))
                .timeout(Duration::from_secs(60))
                .set("Content-Type", "application/json")
                .set("X-Repl-Follower", &self.follower)
                .set("X-Repl-Accept-Encoding", ACCEPT_ENCODING);
            if let Some(t) = self.exec_token.as_ref().or(self.token.as_ref()) {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            match req.send_string(&text) {
                Ok(r) => {
                    let s = r.into_string().map_err(|e| {
                        Error::Other(format!(
                            "{}: reading the answer of /v1/exec: {e}",
                            self.shown()
                        ))
                    })?;
                    return serde_json::from_str(&s).map_err(|e| {
                        Error::Corrupt(format!("{}: /v1/exec answered non-JSON: {e}", self.shown()))
                    });
                }
                Err(ureq::Error::Status(code, r)) => {
                    let body = r.into_string().unwrap_or_default();
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let msg = v["error"].as_str().map_or(body.clone(), str::to_string);
                    return Err(match code {
                        422 => Error::Sql {
                            code: v["code"].as_i64().unwrap_or(1) as i32,
                            message: format!("the primary refused the write: {msg}"),
                        },
                        // A deposed primary (FORMAT.md §8.1): nothing ran.
                        409 if v["code"].as_i64() == Some(8) => Error::ReadOnly(format!(
                            "repl_exec(): {} refused the write: {msg}",
                            self.shown()
                        )),
                        _ => status_error(code, &self.shown(), &msg),
                    });
                }
                Err(ureq::Error::Transport(t)) => last = Some(t.to_string()),
            }
        }
        Err(Error::Other(format!(
            "repl_exec(): cannot reach the primary at {}: {}; the write may or may not have been applied: \
             retry with the same request id to find out (it runs at most once)",
            self.shown(),
            last.unwrap_or_default()
        )))
    }

    fn last_info(&self) -> Option<SourceInfo> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_epoch(&self, epoch: Epoch, primary: Option<&str>) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (epoch, primary.map(str::to_string));
    }

    fn fetch_wait(&self, from: Lsn, max_bytes: usize, wait: Duration) -> Result<Fetch> {
        self.log(from, max_bytes, wait)
    }

    fn fetch_async(
        self: std::sync::Arc<Self>,
        from: Lsn,
        max_bytes: usize,
        wait: Duration,
        done: FetchDone,
    ) {
        let Some(target) = self.target.clone() else {
            // Not a URL the engine's client takes: the blocking client, on a worker.
            let job = Box::new(move || {
                let got = self.log(from, max_bytes, wait);
                done(got.map(|f| (f, self.last_info())))
            });
            let _ = super::httpd::spawn(super::httpd::Pool::Fast, job);
            return;
        };
        let mut headers = vec![
            ("X-Repl-Follower".to_string(), self.follower.clone()),
            ("X-Repl-Accept-Encoding".into(), ACCEPT_ENCODING.into()),
        ];
        headers.extend(self.epoch_headers());
        if let Some(t) = &self.token {
            headers.push(("Authorization".into(), format!("Bearer {t}")));
        }
        let req = GetRequest {
            path: self.log_path(from, max_bytes, wait),
            headers,
            deadline: std::time::Instant::now() + wait + LOG_GRACE,
            max_body: MAX_LOG_BYTES,
        };
        let client = self.client(&target);
        client.get(
            req,
            Box::new(move |r: std::result::Result<ClientResponse, String>| {
                let out = match r {
                    Ok(resp) => {
                        let header = |h: &str| resp.header(h).map(str::to_string);
                        self.log_answer(from, resp.status, &header, &resp.body)
                    }
                    Err(msg) => Err(transport_error(&self.shown(), &msg)),
                };
                done(out)
            }),
        );
    }

    fn cancel_async(&self) {
        if let Some(c) = self
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_tokens_never_show() {
        let s = HttpSource::open("http://127.0.0.1:7070/?token=s3cret").unwrap();
        assert_eq!(s.describe(), "http://127.0.0.1:7070");
        assert_eq!(s.token.as_deref(), Some("s3cret"));
        assert!(HttpSource::open("http://h:1/v1/log").is_err());
        assert!(HttpSource::open("http://h:1?tok=1").is_err());
        for spec in [
            "http://h:1?tokn=s3cret",
            "http://h:1?Token=s3cret",
            "http://h:1?token=",
        ] {
            let e = HttpSource::open(spec).err().expect("refused").to_string();
            assert!(!e.contains("s3cret") && e.contains("token"), "{e}");
        }
        // https (with the system CA bundle, or ca=) and one database of several by name.
        let s = HttpSource::open("https://h:1").unwrap();
        assert_eq!(s.describe(), "https://h:1");
        let s = HttpSource::open("http://h:1/v1/db/app.db?token=s3cret").unwrap();
        assert_eq!(s.describe(), "http://h:1/v1/db/app.db");
        assert_eq!(
            s.url("/v1/log?from=1"),
            "http://h:1/v1/db/app.db/log?from=1"
        );
        assert_eq!(
            s.log_path(Lsn(7), 10, Duration::from_millis(5)),
            "/v1/db/app.db/log?from=7&max_bytes=10&wait_ms=5"
        );
        assert!(HttpSource::open("http://h:1/v1/db/a%2Fb").is_err());
        assert!(
            HttpSource::open("http://h:1?ca=/x.pem").is_err(),
            "ca= is for https"
        );
        let e = HttpSource::open("https://h:1?ca=/no/such/ca.pem")
            .err()
            .expect("missing CA file")
            .to_string();
        assert!(e.contains("/no/such/ca.pem"), "{e}");
        assert!(HttpSource::open("http://").is_err());
    }

    #[test]
    fn bodies_must_be_dense_records_from_the_lsn_asked() {
        assert!(decode_all(&[], Lsn(5)).unwrap().is_empty());
        assert!(decode_all(&[1, 2, 3], Lsn(5)).is_err());
    }
}

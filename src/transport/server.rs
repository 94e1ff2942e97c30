//! The HTTP server of a primary's log (issue 4; protocol in docs/FORMAT.md §8). Blocking and
//! thread-based (`tiny_http`, a thread per request, at most `MAX_REQUESTS` at once): no async
//! runtime inside the extension. It only reads the log directory, exactly like the directory
//! source, so it runs inside the primary's process (`repl_primary('addr')`) or standalone
//! (`sqlite-replica serve <db>`).
//!
//! Endpoints: `GET /v1/info`, `GET /v1/log?from=&wait_ms=&max_bytes=&generation=` (raw records
//! streamed from one segment file; long-polls at the durable end), `GET /v1/snapshot` (the
//! newest durable snapshot file), `GET /metrics` (Prometheus text). Memory per request is
//! bounded (file ranges are copied to the socket, never buffered). Every response to a
//! request with a bad or missing bearer token is 401; bad parameters 400; unknown paths 404.

use super::notify;
use crate::error::{Error, Result};
use crate::txlog::{self, Log, ReadHint};
use crate::types::Lsn;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response, StatusCode};

/// Requests served at once (long-polls included); more get 503.
const MAX_REQUESTS: usize = 256;
/// Longest long-poll a client may ask for.
const MAX_WAIT_MS: u64 = 60_000;
/// Default and largest `max_bytes` of one /v1/log response.
const DEFAULT_MAX_BYTES: u64 = 16 << 20;
const MAX_MAX_BYTES: u64 = 256 << 20;
/// Largest /v1/exec request body.
const MAX_EXEC_BODY: u64 = 16 << 20;
/// Runs a `/v1/exec` body; answers (HTTP status, JSON body).
pub type ExecHandler = Arc<dyn Fn(&serde_json::Value) -> (u16, serde_json::Value) + Send + Sync>;
/// A follower not seen for this long is no longer "connected".
const FOLLOWER_TTL: Duration = Duration::from_secs(30);
pub const RECORDS_TYPE: &str = "application/vnd.sqlite-replica.records";
pub const SNAPSHOT_TYPE: &str = "application/vnd.sqlite-replica.snapshot";

struct Follower {
    last_lsn: u64,
    seen: Instant,
    waiting: usize,
}

struct Shared {
    db: String,
    dir: PathBuf,
    log: Log,
    token: Option<String>,
    /// The token `/v1/exec` takes instead of `token`, if set.
    exec_token: Option<String>,
    addr: SocketAddr,
    exec: Option<ExecHandler>,
    /// Where recent responses ended, keyed by the next LSN: a follower's next request then
    /// starts there instead of scanning the segment.
    hints: Mutex<HashMap<u64, ReadHint>>,
    followers: Mutex<HashMap<String, Follower>>,
    /// (time, durable LSN) samples for records/s.
    rate: Mutex<Vec<(Instant, u64)>>,
    active: AtomicUsize,
    stop: AtomicBool,
    served_records: std::sync::atomic::AtomicU64,
    served_bytes: std::sync::atomic::AtomicU64,
}

/// A listening socket that passed `Server::bind`'s checks, not yet serving.
pub struct Bound {
    listener: std::net::TcpListener,
    token: Option<String>,
    exec_token: Option<String>,
}

impl Bound {
    /// `/v1/exec` then takes this token (and not the read token): the write permission can be
    /// given to fewer hosts than the read one. Empty = none.
    pub fn with_exec_token(mut self, t: Option<String>) -> Bound {
        self.exec_token = t.filter(|t| !t.is_empty());
        self
    }

    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// A running server; dropping it (or `stop`) stops accepting and ends the accept thread.
pub struct Server {
    shared: Arc<Shared>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Check `addr` (host:port; port 0 picks one) and the token, and bind the listening socket.
    /// Nothing else happens: a caller binds first, so a bad address, a port in use or a missing
    /// token fails before any file is created or changed.
    /// Refuses a non-loopback address without a token.
    pub fn bind(addr: &str, token: Option<String>) -> Result<Bound> {
        let token = token.filter(|t| !t.is_empty());
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| {
                Error::Misuse(format!(
                    "cannot listen on {addr:?}: {e} (use host:port, e.g. 127.0.0.1:7070)"
                ))
            })?
            .next()
            .ok_or_else(|| {
                Error::Misuse(format!(
                    "cannot listen on {addr:?}: the name resolves to no address"
                ))
            })?;
        if !sock.ip().is_loopback() && token.is_none() {
            return Err(Error::Misuse(format!(
                "refusing to listen on {sock} without a token: anyone who can reach it could read the whole \
                 database; pass a token (repl_primary('{addr}', 'secret') or REPL_TOKEN) or listen on 127.0.0.1"
            )));
        }
        let listener = std::net::TcpListener::bind(sock)
            .map_err(|e| Error::io(format!("cannot listen on {sock}"), e))?;
        Ok(Bound {
            listener,
            token,
            exec_token: None,
        })
    }

    /// Listen on `addr` and serve the log of database `db` (`bind`, then `start_bound`).
    pub fn start(
        db: &str,
        addr: &str,
        token: Option<String>,
        exec: Option<ExecHandler>,
    ) -> Result<Server> {
        Server::start_bound(db, Server::bind(addr, token)?, exec)
    }

    /// Serve the log of database `db` on a socket from `bind`.
    pub fn start_bound(db: &str, bound: Bound, exec: Option<ExecHandler>) -> Result<Server> {
        let Bound {
            listener,
            token,
            exec_token,
        } = bound;
        let sock = listener
            .local_addr()
            .map_err(|e| Error::io("the listening socket has no address", e))?;
        let dir = crate::registry::log_dir(db);
        let log = Log::open(&dir, Default::default())?;
        let _ = crate::ffi::os::set_tcp_nodelay(&listener);
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| Error::Other(format!("cannot listen on {sock}: {e}")))?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Other("the server has no IP address".into()))?;
        let shared = Arc::new(Shared {
            db: db.to_string(),
            dir,
            log,
            token,
            exec_token,
            addr: bound,
            exec,
            hints: Mutex::new(HashMap::new()),
            followers: Mutex::new(HashMap::new()),
            rate: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            served_records: Default::default(),
            served_bytes: Default::default(),
        });
        let server = Arc::new(server);
        let (sh, sv) = (shared.clone(), server.clone());
        let thread = std::thread::Builder::new()
            .name("repl-http".into())
            .spawn(move || accept_loop(sh, sv))
            .map_err(|e| Error::io("starting the HTTP server thread", e))?;
        log_event(&format!(
            "event=listening db={:?} addr={bound} auth={}",
            shared.db,
            if shared.token.is_some() {
                "token"
            } else {
                "none"
            }
        ));
        Ok(Server {
            shared,
            server,
            thread: Some(thread),
        })
    }

    /// The address actually bound (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn has_token(&self) -> bool {
        self.shared.token.is_some()
    }

    /// `/v1/exec` takes its own token.
    pub fn has_exec_token(&self) -> bool {
        self.shared.exec_token.is_some()
    }

    /// Stop accepting; running requests finish on their own threads.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Connected followers and their positions (for repl_status()).
    pub fn followers_json(&self) -> serde_json::Value {
        followers_json(&self.shared)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_event(line: &str) {
    crate::logging::event(line);
}

fn accept_loop(sh: Arc<Shared>, server: Arc<tiny_http::Server>) {
    while !sh.stop.load(Ordering::Acquire) {
        let req = match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(_) => continue,
        };
        if sh.active.fetch_add(1, Ordering::AcqRel) >= MAX_REQUESTS {
            sh.active.fetch_sub(1, Ordering::AcqRel);
            let _ = req.respond(error_response(503, "too many requests in flight; retry"));
            continue;
        }
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name("repl-http-req".into())
            .spawn(move || {
                let sh3 = sh2.clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    handle(&sh3, req)
                }));
                if r.is_err() {
                    log_event("event=http_panic");
                }
                sh2.active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            sh.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn header(name: &str, value: impl std::fmt::Display) -> Header {
    Header::from_bytes(name.as_bytes(), value.to_string().as_bytes()).expect("valid header")
}

type Resp = Response<Box<dyn Read + Send>>;

/// A response of `len` bytes when known. tiny_http switches bodies of 32 KiB or more to
/// `Transfer-Encoding: chunked` (no Content-Length) by default; the protocol promises
/// Content-Length framing so that a client can check it received the whole body before it
/// decodes anything: raise the threshold so a known length is always sent as Content-Length.
fn boxed<R: Read + Send + 'static>(
    status: u16,
    r: R,
    len: Option<usize>,
    headers: Vec<Header>,
) -> Resp {
    let resp = Response::new(
        StatusCode(status),
        headers,
        Box::new(r) as Box<dyn Read + Send>,
        len,
        None,
    );
    if len.is_some() {
        resp.with_chunked_threshold(usize::MAX)
    } else {
        resp
    }
}

fn json_response(status: u16, v: &serde_json::Value) -> Resp {
    let body = v.to_string().into_bytes();
    let len = body.len();
    boxed(
        status,
        std::io::Cursor::new(body),
        Some(len),
        vec![header("Content-Type", "application/json")],
    )
}

fn error_response(status: u16, msg: &str) -> Resp {
    json_response(status, &serde_json::json!({ "error": msg }))
}

/// Constant-time comparison (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(token: Option<&String>, req: &Request) -> bool {
    let Some(token) = token else { return true };
    req.headers()
        .iter()
        .filter(|h| h.field.equiv("Authorization"))
        .any(|h| {
            // The scheme is case-insensitive (RFC 7235 §2.1).
            let v = h.value.as_str();
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .is_some_and(|_| ct_eq(v[7..].trim().as_bytes(), token.as_bytes()))
        })
}

fn header_value(req: &Request, name: &'static str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().to_string())
}

/// `?a=1&b=2` → pairs (no percent-decoding: every parameter is a number).
fn query(url: &str) -> (&str, Vec<(&str, &str)>) {
    match url.split_once('?') {
        None => (url, Vec::new()),
        Some((path, q)) => (
            path,
            q.split('&')
                .filter(|s| !s.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect(),
        ),
    }
}

/// A parameter as an integer in `range`, or a 400 message naming it.
fn num(
    params: &[(&str, &str)],
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> std::result::Result<Option<u64>, String> {
    let Some((_, v)) = params.iter().rev().find(|(k, _)| *k == name) else {
        return Ok(None);
    };
    let bad = || {
        format!(
            "{name} must be a decimal integer between {} and {}, got {v:?}",
            range.start(),
            range.end()
        )
    };
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match v.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(bad()),
    }
}

fn handle(sh: &Shared, mut req: Request) {
    let url = req.url().to_string();
    let (path, params) = query(&url);
    let exec_token = sh.exec_token.as_ref().filter(|_| path == "/v1/exec");
    let resp = if exec_token.is_some() && !authorized(exec_token, &req) {
        error_response(
            401,
            "missing or wrong exec token: /v1/exec takes 'Authorization: Bearer <exec token>' (replicas: \
             the exec_token= URL parameter or REPL_EXEC_TOKEN)",
        )
        .with_header(header("WWW-Authenticate", "Bearer realm=\"sqlite-replica\""))
    } else if exec_token.is_none() && !authorized(sh.token.as_ref(), &req) {
        // A 401 must name the scheme (RFC 7235 §3.1).
        error_response(
            401,
            "missing or wrong bearer token: send 'Authorization: Bearer <token>' (replicas: the token= URL \
             parameter or REPL_TOKEN)",
        )
        .with_header(header("WWW-Authenticate", "Bearer realm=\"sqlite-replica\""))
    } else if path == "/v1/exec" {
        if *req.method() != Method::Post {
            error_response(405, "/v1/exec takes POST").with_header(header("Allow", "POST"))
        } else {
            serve_exec(sh, &mut req)
        }
    } else if *req.method() != Method::Get && *req.method() != Method::Head {
        // A 405 must list the methods allowed (RFC 9110 §15.5.6).
        error_response(405, "only GET is supported").with_header(header("Allow", "GET, HEAD"))
    } else {
        let r = match path {
            "/v1/info" => info(sh).map(|v| json_response(200, &v)),
            "/v1/log" => serve_log(sh, &req, &params),
            "/v1/snapshot" => serve_snapshot(sh),
            "/metrics" => Ok(metrics(sh)),
            _ => Ok(error_response(
                404,
                &format!("no such endpoint {path:?}; the endpoints are /v1/info, /v1/log, /v1/snapshot, /v1/exec, /metrics"),
            )),
        };
        r.unwrap_or_else(|e| error_response(500, &e.to_string()))
    };
    let _ = req.respond(resp);
}

/// Runs a forwarded write: the JSON body goes to the primary's exec handler (only a server
/// inside the primary's process has one).
fn serve_exec(sh: &Shared, req: &mut Request) -> Resp {
    let Some(exec) = &sh.exec else {
        return error_response(
            501,
            "this server cannot run writes (sqlite-replica serve only reads the log): serve from the \
             primary's process with repl_primary('host:port') to accept repl_exec",
        );
    };
    let mut body = Vec::new();
    if let Err(e) = req
        .as_reader()
        .take(MAX_EXEC_BODY + 1)
        .read_to_end(&mut body)
    {
        return error_response(400, &format!("reading the request body: {e}"));
    }
    if body.len() as u64 > MAX_EXEC_BODY {
        return error_response(413, "the request body is over 16 MiB");
    }
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_response(400, &format!("the body is not JSON: {e}")),
    };
    let (status, answer) = exec(&v);
    json_response(status, &answer)
}

fn info(sh: &Shared) -> Result<serde_json::Value> {
    let meta = Log::read_meta(&sh.dir)?;
    let durable = Log::read_durable(&sh.dir)?;
    // The snapshot /v1/snapshot serves: the newest one at or below the durable LSN.
    let snap = sh
        .log
        .latest_snapshot(durable.map(|d| d.0))?
        .map(|(m, path)| {
            let bytes = std::fs::metadata(&path).map_or(0, |md| md.len());
            serde_json::json!({"lsn": m.lsn.0, "bytes": bytes, "page_size": m.page_size.get()})
        });
    Ok(serde_json::json!({
        "format": 1,
        "db": sh.db,
        "lineage": meta.lineage,
        "page_size": meta.page_size,
        "generation": durable.map(|d| d.1 .0),
        "durable_lsn": durable.map(|d| d.0 .0),
        "first_lsn": Log::first_segment_lsn(&sh.dir)?.map(|l| l.0),
        "snapshot": snap,
    }))
}

fn common_headers(
    sh: &Shared,
    lineage: &str,
    durable: (Lsn, u32),
    first: Option<Lsn>,
) -> Vec<Header> {
    let _ = sh;
    let mut h = vec![
        header("X-Repl-Lineage", lineage),
        header("X-Repl-Durable-Lsn", durable.0 .0),
        header("X-Repl-Generation", durable.1),
    ];
    if let Some(f) = first {
        h.push(header("X-Repl-First-Lsn", f.0));
    }
    h
}

fn serve_log(sh: &Shared, req: &Request, params: &[(&str, &str)]) -> Result<Resp> {
    let (from, wait, max, generation) = match log_params(params) {
        Ok(p) => p,
        Err(msg) => return Ok(error_response(400, &msg)),
    };
    let lineage = Log::read_meta(&sh.dir)?.lineage;
    let follower = header_value(req, "X-Repl-Follower")
        .unwrap_or_else(|| req.remote_addr().map_or("?".into(), |a| a.to_string()));
    let durable_now = || {
        Log::read_durable(&sh.dir)
            .ok()
            .flatten()
            .map(|(l, g)| (l, g.0))
    };
    let Some(mut durable) = durable_now() else {
        return Ok(error_response(
            503,
            "the primary has no durable records yet; retry in a moment",
        ));
    };
    if let Some(g) = generation {
        if g as u32 > durable.1 {
            return Ok(error_response(
                409,
                &format!(
                    "generation {g} is unknown here (this primary is at generation {}): the replica follows \
                     another history; bootstrap it again",
                    durable.1
                ),
            ));
        }
    }
    if from.0 > durable.0 .0 + 1 {
        return Ok(error_response(
            409,
            &format!(
                "LSN {from} is ahead of this primary (its durable LSN is {}): the replica follows another history; \
                 bootstrap it again",
                durable.0
            ),
        ));
    }
    // Only a request that can be served registers its follower (a refused one would list a
    // position the follower never had).
    touch_follower(sh, &follower, from.0.saturating_sub(1), 1);
    if from.0 == durable.0 .0 + 1 && wait > 0 {
        let deadline = Instant::now() + Duration::from_millis(wait);
        if let Some(d) =
            notify::wait_until(&sh.dir, deadline, || durable_now().filter(|d| d.0 >= from))
        {
            durable = d;
        }
    }
    touch_follower(sh, &follower, from.0.saturating_sub(1), -1);
    let first = Log::first_segment_lsn(&sh.dir)?;
    // `from` older than the first retained LSN: 410 with `first_lsn` (also when retention
    // removes the segment while this request reads it).
    let gone = |f: Lsn| {
        let mut r = json_response(
            410,
            &serde_json::json!({
                "error": format!(
                    "LSN {from} is no longer retained (the log starts at LSN {f}): re-snapshot from /v1/snapshot"
                ),
                "first_lsn": f.0,
            }),
        );
        for h in common_headers(sh, &lineage, durable, Some(f)) {
            r.add_header(h);
        }
        r
    };
    if let Some(f) = first.filter(|f| from < *f) {
        return Ok(gone(f));
    }
    let mut headers = common_headers(sh, &lineage, durable, first);
    headers.push(header("Content-Type", RECORDS_TYPE));
    if from > durable.0 {
        headers.push(header("X-Repl-Records", 0));
        return Ok(boxed(200, std::io::empty(), Some(0), headers));
    }
    let hint = sh
        .hints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&from.0)
        .cloned();
    let range = match sh.log.locate(from, durable.0, max, hint.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            // Retention may have removed the segment meanwhile.
            if let Some(f) = Log::first_segment_lsn(&sh.dir)?.filter(|f| from < *f) {
                return Ok(gone(f));
            }
            return Err(e);
        }
    };
    let Some(range) = range else {
        headers.push(header("X-Repl-Records", 0));
        return Ok(boxed(200, std::io::empty(), Some(0), headers));
    };
    {
        let mut h = sh.hints.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() > 1024 {
            h.clear();
        }
        h.remove(&from.0);
        h.insert(range.last.0 + 1, range.next.clone());
    }
    let mut f = std::fs::File::open(&range.path)
        .map_err(|e| Error::io(format!("opening {}", range.path.display()), e))?;
    f.seek(SeekFrom::Start(range.start))
        .map_err(|e| Error::io("seeking in a segment", e))?;
    headers.push(header("X-Repl-Records", range.count));
    headers.push(header("X-Repl-Last-Lsn", range.last.0));
    sh.served_records
        .fetch_add(range.count as u64, Ordering::Relaxed);
    sh.served_bytes.fetch_add(range.len, Ordering::Relaxed);
    touch_follower(sh, &follower, range.last.0, 0);
    Ok(boxed(
        200,
        f.take(range.len),
        Some(range.len as usize),
        headers,
    ))
}

/// The `/v1/log` parameters: (from, wait_ms, max_bytes, generation), or the 400 message.
fn log_params(
    params: &[(&str, &str)],
) -> std::result::Result<(Lsn, u64, u64, Option<u64>), String> {
    let from = num(params, "from", 0..=(i64::MAX as u64))?
        .ok_or_else(|| "from is required: GET /v1/log?from=<first LSN wanted>".to_string())?;
    let wait = num(params, "wait_ms", 0..=MAX_WAIT_MS)?.unwrap_or(0);
    let max = num(params, "max_bytes", 1..=MAX_MAX_BYTES)?.unwrap_or(DEFAULT_MAX_BYTES);
    let generation = num(params, "generation", 0..=(u32::MAX as u64))?;
    Ok((Lsn(from.max(1)), wait, max, generation))
}

/// Fuzzing entry (transport::fuzzing): a request URL through the path/query split and the
/// `/v1/log` parameter rules. Properties: accepted values are inside their ranges.
pub(crate) fn fuzz_url(url: &str) {
    let (_, params) = query(url);
    if let Ok((from, wait, max, generation)) = log_params(&params) {
        assert!(from.0 >= 1 && from.0 <= i64::MAX as u64);
        assert!(wait <= MAX_WAIT_MS && (1..=MAX_MAX_BYTES).contains(&max));
        assert!(generation.is_none_or(|g| g <= u32::MAX as u64));
    }
}

fn serve_snapshot(sh: &Shared) -> Result<Resp> {
    let durable = Log::read_durable(&sh.dir)?;
    let Some((_, path)) = sh.log.latest_snapshot(durable.map(|d| d.0))? else {
        return Ok(error_response(
            503,
            "the primary has no durable snapshot yet; retry in a moment",
        ));
    };
    let f = std::fs::File::open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (lsn, generation) = txlog::parse_snapshot_file_name(name).unwrap_or_default();
    let lineage = Log::read_meta(&sh.dir)?.lineage;
    let headers = vec![
        header("Content-Type", SNAPSHOT_TYPE),
        header("X-Repl-Lineage", lineage),
        header("X-Repl-Snapshot-Lsn", lsn.0),
        header("X-Repl-Generation", generation.0),
    ];
    Ok(boxed(200, f, Some(len as usize), headers))
}

/// `waiting`: +1 entering a long-poll, -1 leaving it, 0 to record a position only.
fn touch_follower(sh: &Shared, id: &str, last_lsn: u64, waiting: i32) {
    let mut m = sh.followers.lock().unwrap_or_else(|e| e.into_inner());
    let f = m.entry(id.to_string()).or_insert(Follower {
        last_lsn,
        seen: Instant::now(),
        waiting: 0,
    });
    f.last_lsn = f.last_lsn.max(last_lsn);
    f.seen = Instant::now();
    f.waiting = (f.waiting as i64 + waiting as i64).max(0) as usize;
    m.retain(|_, f| f.waiting > 0 || f.seen.elapsed() < FOLLOWER_TTL);
}

fn followers_json(sh: &Shared) -> serde_json::Value {
    let durable = Log::read_durable(&sh.dir)
        .ok()
        .flatten()
        .map_or(0, |d| d.0 .0);
    let m = sh.followers.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = m
        .iter()
        .filter(|(_, f)| f.waiting > 0 || f.seen.elapsed() < FOLLOWER_TTL)
        .map(|(id, f)| {
            serde_json::json!({
                "id": id,
                "last_lsn": f.last_lsn,
                "lag_lsn": durable.saturating_sub(f.last_lsn),
                "seen_ms_ago": f.seen.elapsed().as_millis() as u64,
            })
        })
        .collect();
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    serde_json::Value::Array(v)
}

fn records_per_sec(sh: &Shared, lsn: u64) -> f64 {
    let now = Instant::now();
    let mut r = sh.rate.lock().unwrap_or_else(|e| e.into_inner());
    r.push((now, lsn));
    r.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(10));
    match (r.first(), r.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
        }
        _ => 0.0,
    }
}

fn metrics(sh: &Shared) -> Resp {
    let durable = Log::read_durable(&sh.dir).ok().flatten();
    let lsn = durable.map_or(0, |d| d.0 .0);
    let generation = durable.map_or(0, |d| d.1 .0);
    let log_bytes: u64 = txlog::segment_infos(&sh.dir.join("log"))
        .map(|v| v.iter().map(|s| s.bytes).sum())
        .unwrap_or(0);
    let followers = followers_json(sh);
    let list = followers.as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, lines: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "sqlite_replica_lsn",
        "Durable LSN of the primary.",
        "gauge",
        vec![(String::new(), lsn.to_string())],
    );
    metric(
        "sqlite_replica_generation",
        "Generation of the log.",
        "gauge",
        vec![(String::new(), generation.to_string())],
    );
    metric(
        "sqlite_replica_log_bytes",
        "Bytes of log segments retained.",
        "gauge",
        vec![(String::new(), log_bytes.to_string())],
    );
    metric(
        "sqlite_replica_records_per_second",
        "Records made durable per second (10 s window).",
        "gauge",
        vec![(String::new(), format!("{:.3}", records_per_sec(sh, lsn)))],
    );
    metric(
        "sqlite_replica_served_records_total",
        "Records sent to followers.",
        "counter",
        vec![(
            String::new(),
            sh.served_records.load(Ordering::Relaxed).to_string(),
        )],
    );
    metric(
        "sqlite_replica_served_bytes_total",
        "Record bytes sent to followers.",
        "counter",
        vec![(
            String::new(),
            sh.served_bytes.load(Ordering::Relaxed).to_string(),
        )],
    );
    metric(
        "sqlite_replica_followers",
        "Followers seen in the last 30 s.",
        "gauge",
        vec![(String::new(), list.len().to_string())],
    );
    let label = |f: &serde_json::Value| {
        let id = f["id"]
            .as_str()
            .unwrap_or("")
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        format!("{{follower=\"{id}\"}}")
    };
    metric(
        "sqlite_replica_follower_lsn",
        "Last LSN a follower has received.",
        "gauge",
        list.iter()
            .map(|f| (label(f), f["last_lsn"].to_string()))
            .collect(),
    );
    metric(
        "sqlite_replica_follower_lag_lsn",
        "How many LSNs a follower is behind the durable LSN.",
        "gauge",
        list.iter()
            .map(|f| (label(f), f["lag_lsn"].to_string()))
            .collect(),
    );
    let len = out.len();
    boxed(
        200,
        std::io::Cursor::new(out.into_bytes()),
        Some(len),
        vec![header("Content-Type", "text/plain; version=0.0.4")],
    )
}

/// For the CLI: serve until the process is killed.
pub fn serve_forever(db: &str, addr: &str, token: Option<String>) -> Result<()> {
    let s = Server::start(db, addr, token, None)?;
    println!("serving {db} on http://{}", s.addr());
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_strict_decimal_integers() {
        let p = [
            ("from", "12"),
            ("wait_ms", "-1"),
            ("max_bytes", "1e3"),
            ("x", "99999999999999999999999"),
        ];
        assert_eq!(num(&p, "from", 0..=100), Ok(Some(12)));
        assert!(num(&p, "wait_ms", 0..=100)
            .unwrap_err()
            .contains("wait_ms must be a decimal integer"));
        assert!(num(&p, "max_bytes", 1..=100).is_err());
        assert!(num(&p, "x", 0..=u64::MAX).is_err(), "more than 20 digits");
        assert_eq!(num(&p, "missing", 0..=1), Ok(None));
        assert!(num(&[("from", "")], "from", 0..=1).is_err());
        assert!(num(&[("from", "101")], "from", 0..=100).is_err());
    }

    #[test]
    fn query_strings_split() {
        assert_eq!(
            query("/v1/log?from=1&wait_ms=5"),
            ("/v1/log", vec![("from", "1"), ("wait_ms", "5")])
        );
        assert_eq!(query("/v1/info"), ("/v1/info", vec![]));
        assert_eq!(query("/x?a&&b="), ("/x", vec![("a", ""), ("b", "")]));
    }

    #[test]
    fn tokens_compare_in_constant_time() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret1"));
        assert!(ct_eq(b"", b""));
    }
}

//! The HTTP server of a primary's log (protocol in docs/FORMAT.md §8): the routes of one
//! database (`/v1/info`, `/v1/log`, `/v1/snapshot`, `/v1/exec`, `/metrics`) as an
//! `httpd::Service`. Connections, limits, TLS and long-poll parking are the engine's
//! (`transport::httpd`): one event loop and fixed worker pools per process, shared by every
//! database served; a second database on the same address joins the listener and is reached
//! under `/v1/db/<name>/…` (the first one also at the plain paths).
//!
//! Endpoints: `GET /v1/info`, `GET /v1/log?from=&wait_ms=&max_bytes=&generation=` (raw records
//! streamed from one segment file; long-polls at the durable end), `GET /v1/snapshot` (the
//! newest durable snapshot file), `GET /metrics` (Prometheus text). Memory per request is
//! bounded (file ranges are streamed, never buffered whole). A request with a bad, missing or
//! repeated bearer token is refused (401, or 400 for several Authorization headers); bad
//! parameters 400; unknown paths 404.

use super::httpd::{self, Ctx, Outcome, Reply, Request, Site};
use super::metrics::{followers_json, metrics, Follower};
use super::request::{ct_eq, query_pairs};
use super::routes::{info, serve_log, serve_snapshot};
use crate::error::{Error, Result};
use crate::txlog::{Log, ReadHint};

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Longest long-poll a client may ask for.
pub(super) const MAX_WAIT_MS: u64 = 60_000;
/// Default and largest `max_bytes` of one /v1/log response.
pub(super) const DEFAULT_MAX_BYTES: u64 = 16 << 20;
pub(super) const MAX_MAX_BYTES: u64 = 256 << 20;
/// Largest /v1/exec request body.
const MAX_EXEC_BODY: u64 = 16 << 20;
/// Runs parsed `/v1/exec` requests (`exec::respond` maps the outcome to HTTP).
pub type ExecHandler = Arc<dyn super::exec::Handler>;
pub const RECORDS_TYPE: &str = "application/vnd.sqlite-replica.records";
pub const SNAPSHOT_TYPE: &str = "application/vnd.sqlite-replica.snapshot";

pub(super) struct Shared {
    pub(super) db: String,
    pub(super) dir: PathBuf,
    pub(super) log: Log,
    pub(super) token: Option<String>,
    /// The token `/v1/exec` takes instead of `token`, if set.
    pub(super) exec_token: Option<String>,
    pub(super) exec: Option<ExecHandler>,
    /// Where recent responses ended, keyed by the next LSN: a follower's next request then
    /// starts there instead of scanning the segment.
    pub(super) hints: Mutex<HashMap<u64, ReadHint>>,
    /// The last `/v1/log` answer with records (see `routes::serve_log`).
    pub(super) answer: Mutex<Option<super::routes::Answer>>,
    pub(super) followers: Mutex<HashMap<String, Follower>>,
    /// Each follower's last recorded acknowledgement and when it was written to `acks`.
    pub(super) acked: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// (time, durable LSN) samples for records/s.
    pub(super) rate: Mutex<Vec<(Instant, u64)>>,
    pub(super) served_records: std::sync::atomic::AtomicU64,
    pub(super) served_bytes: std::sync::atomic::AtomicU64,
    /// The listener's counters, for /metrics.
    pub(super) stats: Mutex<Option<Arc<httpd::Stats>>>,
}

/// TLS certificate and key files for a listener.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// From `REPL_TLS_CERT` and `REPL_TLS_KEY` (both or neither).
    pub fn from_env() -> Result<Option<TlsFiles>> {
        let c = crate::config::get();
        TlsFiles::pair(
            c.tls_cert.clone(),
            c.tls_key.clone(),
            "REPL_TLS_CERT and REPL_TLS_KEY",
        )
    }

    /// A certificate and a key given together, or neither; `names` says where they came from
    /// (for the error when only one is given).
    pub fn pair(
        cert: Option<String>,
        key: Option<String>,
        names: &str,
    ) -> Result<Option<TlsFiles>> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) => Ok(Some(TlsFiles {
                cert: c.into(),
                key: k.into(),
            })),
            _ => Err(Error::Misuse(format!(
                "{names} go together: give both (PEM files: certificate chain, private key) or neither"
            ))),
        }
    }
}

/// A listening socket that passed `Server::bind`'s checks, not yet serving: a new one, or this
/// process's existing listener on the same address (joined by a second database).
pub enum Bound {
    New {
        listener: std::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        token: Option<String>,
        exec_token: Option<String>,
    },
    Join {
        site: Arc<Site>,
        token: Option<String>,
        exec_token: Option<String>,
    },
}

impl Bound {
    /// `/v1/exec` then takes this token (and not the read token): the write permission can be
    /// given to fewer hosts than the read one. Empty = none.
    pub fn with_exec_token(mut self, t: Option<String>) -> Bound {
        let t = t.filter(|t| !t.is_empty());
        match &mut self {
            Bound::New { exec_token, .. } | Bound::Join { exec_token, .. } => *exec_token = t,
        }
        self
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::New { listener, .. } => listener.local_addr().ok(),
            Bound::Join { site, .. } => Some(site.addr),
        }
    }
}

/// One database served on a listener; dropping it (or `stop`) stops serving the database, and
/// the listener closes with its last database.
pub struct Server {
    shared: Arc<Shared>,
    site: Arc<Site>,
    name: String,
    stopped: bool,
}

impl Server {
    /// Check `addr` (host:port; port 0 picks one), the token and the TLS files, and bind the
    /// listening socket (or find this process's listener on that address, to join it).
    /// Nothing else happens: a caller binds first, so a bad address, a port in use or a
    /// missing token fails before any file is created or changed.
    /// Refuses a non-loopback address without a token.
    pub fn bind(addr: &str, token: Option<String>, tls: Option<&TlsFiles>) -> Result<Bound> {
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
        let tls = match tls {
            None => None,
            Some(f) => Some(httpd::tls_config(&f.cert, &f.key).map_err(Error::Misuse)?),
        };
        if sock.port() != 0 {
            if let Some(site) = httpd::find_site(sock) {
                if site.tls != tls.is_some() {
                    return Err(Error::Misuse(format!(
                        "{sock} is already served by this process {} TLS; every database on one \
                         listener uses the same setting",
                        if site.tls { "with" } else { "without" }
                    )));
                }
                return Ok(Bound::Join {
                    site,
                    token,
                    exec_token: None,
                });
            }
        }
        let listener = std::net::TcpListener::bind(sock)
            .map_err(|e| Error::io(format!("cannot listen on {sock}"), e))?;
        Ok(Bound::New {
            listener,
            tls,
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
        Server::start_bound(db, Server::bind(addr, token, None)?, exec)
    }

    /// Serve the log of database `db` on a socket from `bind`.
    pub fn start_bound(db: &str, bound: Bound, exec: Option<ExecHandler>) -> Result<Server> {
        let dir = crate::txlog::log_dir(db);
        let log = Log::open(&dir, Default::default())?;
        let name = std::path::Path::new(db)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("db")
            .to_string();
        let (site, token, exec_token) = match bound {
            Bound::New {
                listener,
                tls,
                token,
                exec_token,
            } => {
                let site = httpd::listen(listener, tls, httpd::Limits::from_config())
                    .map_err(|e| Error::io("starting the HTTP server", e))?;
                (site, token, exec_token)
            }
            Bound::Join {
                site,
                token,
                exec_token,
            } => (site, token, exec_token),
        };
        let shared = Arc::new(Shared {
            db: db.to_string(),
            dir,
            log,
            token,
            exec_token,
            exec,
            hints: Mutex::new(HashMap::new()),
            answer: Mutex::new(None),
            followers: Mutex::new(HashMap::new()),
            acked: Mutex::new(HashMap::new()),
            rate: Mutex::new(Vec::new()),
            served_records: Default::default(),
            served_bytes: Default::default(),
            stats: Mutex::new(Some(site.stats.clone())),
        });
        site.attach(&name, Arc::new(Service(shared.clone())))
            .map_err(Error::Misuse)?;
        let s = Server {
            shared,
            site,
            name,
            stopped: false,
        };
        log_event(&format!(
            "event=listening db={:?} addr={} url={} auth={} tls={}",
            s.shared.db,
            s.addr(),
            s.url(),
            if s.shared.token.is_some() {
                "token"
            } else {
                "none"
            },
            s.site.tls
        ));
        Ok(s)
    }

    /// The address actually bound (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.site.addr
    }

    /// The URL followers use for this database: the listener's, plus `/v1/db/<name>` unless
    /// this database is the listener's default (the first one attached).
    pub fn url(&self) -> String {
        let scheme = if self.site.tls { "https" } else { "http" };
        let first = self.site.names().first().cloned();
        if first.as_deref() == Some(self.name.as_str()) {
            format!("{scheme}://{}", self.addr())
        } else {
            format!("{scheme}://{}/v1/db/{}", self.addr(), self.name)
        }
    }

    pub fn has_token(&self) -> bool {
        self.shared.token.is_some()
    }

    /// Stop serving this database (the listener closes with its last database).
    pub fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            self.site.detach(&self.name);
        }
    }

    /// Connected followers and their positions (for repl_status()).
    pub fn followers_json(&self) -> serde_json::Value {
        followers_json(&self.shared)
    }

    /// The server part of repl_status(): address, URL, auth, TLS, the listener's state and
    /// counters, the databases it serves, and the followers.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::json!({
            "addr": self.addr().to_string(),
            "url": self.url(),
            "name": self.name,
            "auth": self.has_token(),
            "exec_auth": self.shared.exec_token.is_some(),
            "tls": self.site.tls,
            "listener": self.site.stats.json(),
            "databases": self.site.names(),
            "followers": followers_json(&self.shared),
        })
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

/// The routes of one database.
struct Service(Arc<Shared>);

impl httpd::Service for Service {
    fn body_limit(&self, method: &str, path: &str) -> u64 {
        if method == "POST" && path == "/v1/exec" {
            MAX_EXEC_BODY
        } else {
            0
        }
    }

    fn slow(&self, _method: &str, path: &str) -> bool {
        path == "/v1/exec"
    }

    fn handle(&self, req: &Request, ctx: Ctx) -> Outcome {
        handle(&self.0, req, ctx)
    }
}

/// Exactly one `Authorization: Bearer <token>` header carrying the token (one guess per
/// request: several headers are refused, not tried in turn). `/v1/exec` takes the exec token
/// when the server has one (then the read token does not write, and the exec token does not read).
fn authorize(sh: &Shared, req: &Request) -> std::result::Result<(), Reply> {
    let exec_only = sh.exec_token.as_ref().filter(|_| req.path == "/v1/exec");
    let Some(token) = exec_only.or(sh.token.as_ref()) else {
        return Ok(());
    };
    let values: Vec<&str> = req.headers_named("authorization").collect();
    if values.len() > 1 {
        return Err(Reply::error(
            400,
            "send exactly one Authorization header (this request has several)",
        ));
    }
    let ok = values.first().is_some_and(|v| {
        // The scheme is case-insensitive (RFC 7235 §2.1).
        v.get(..7)
            .filter(|s| s.eq_ignore_ascii_case("bearer "))
            .is_some_and(|_| ct_eq(v[7..].trim().as_bytes(), token.as_bytes()))
    });
    if ok {
        return Ok(());
    }
    let msg = if exec_only.is_some() {
        "missing or wrong exec token: /v1/exec takes 'Authorization: Bearer <exec token>' (replicas: \
         the exec_token= URL parameter or REPL_EXEC_TOKEN)"
    } else {
        "missing or wrong bearer token: send 'Authorization: Bearer <token>' (replicas: the token= URL \
         parameter or REPL_TOKEN)"
    };
    // A 401 must name the scheme (RFC 7235 §3.1).
    Err(Reply::error(401, msg).with_header("WWW-Authenticate", "Bearer realm=\"sqlite-replica\""))
}

fn handle(sh: &Shared, req: &Request, ctx: Ctx) -> Outcome {
    let params = query_pairs(&req.query);
    let path = req.path.as_str();
    let method = req.method.as_str();
    let reply = if let Err(r) = authorize(sh, req) {
        r
    } else if let Some(r) = newer_epoch(sh, req) {
        r
    } else if path == "/v1/exec" {
        if method != "POST" {
            Reply::error(405, "/v1/exec takes POST").with_header("Allow", "POST")
        } else {
            serve_exec(sh, req)
        }
    } else if method != "GET" && method != "HEAD" {
        // A 405 must list the methods allowed (RFC 9110 §15.5.6).
        Reply::error(405, "only GET is supported").with_header("Allow", "GET, HEAD")
    } else {
        let r = match path {
            "/v1/info" => info(sh).map(|v| Outcome::Reply(Reply::json(200, &v))),
            "/v1/log" => serve_log(sh, req, &params, ctx),
            "/v1/snapshot" => serve_snapshot(sh, req).map(Outcome::Reply),
            "/metrics" | "/v1/metrics" => Ok(Outcome::Reply(metrics(sh))),
            _ => Ok(Outcome::Reply(Reply::error(
                404,
                &format!("no such endpoint {path:?}; the endpoints are /v1/info, /v1/log, /v1/snapshot, /v1/exec, /metrics"),
            ))),
        };
        return r.unwrap_or_else(|e| Outcome::Reply(Reply::error(500, &e.to_string())));
    };
    Outcome::Reply(reply)
}

/// A request whose `X-Repl-Epoch` is newer than this log's epoch: the client has seen a primary
/// promoted after this one, so this one is deposed. The fence file is raised (the primary's
/// processes stop accepting writes: at once in this process, within a maintenance pass in
/// others) and the request is answered 409 (FORMAT.md §8.1), a write included.
fn newer_epoch(sh: &Shared, req: &Request) -> Option<Reply> {
    let theirs: u32 = req.header("X-Repl-Epoch")?.trim().parse().ok()?;
    let ours = sh.log.meta().epoch;
    if theirs <= ours.0 {
        return None;
    }
    // Client-controlled text: kept short and printable before it is stored and logged.
    let primary = req
        .header("X-Repl-Primary")
        .map(|p| {
            p.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        })
        .filter(|p| !p.is_empty());
    let fence = crate::txlog::Fence {
        epoch: crate::types::Epoch(theirs),
        primary: primary.clone(),
        seen_ms: crate::util::now_ms(),
    };
    match crate::txlog::raise_fence(&sh.dir, &fence) {
        Ok(true) => {
            log_event(&format!(
                "event=primary_deposed db={:?} epoch={ours} new_epoch={theirs} new_primary={:?} reason=\"a follower's request\"",
                sh.db,
                primary.as_deref().unwrap_or("unknown")
            ));
            super::notify::fenced(&sh.dir);
        }
        Ok(false) => {}
        Err(e) => log_event(&format!(
            "event=fence_error db={:?} error={:?}",
            sh.db,
            e.to_string()
        )),
    }
    let mut r = Reply::json(
        409,
        &serde_json::json!({
            "error": format!(
                "this primary ({}, epoch {ours}) was deposed: epoch {theirs} exists{}; it accepts no writes: \
                 follow the new primary",
                sh.db,
                primary.map(|p| format!(" (primary {p})")).unwrap_or_default()
            ),
            "code": 8,
            "epoch": ours.0,
        }),
    );
    r.headers.push(super::request::header("X-Repl-Epoch", ours));
    Some(r)
}

/// Runs a forwarded write: the JSON body goes to the primary's exec handler (only a server
/// inside the primary's process has one).
fn serve_exec(sh: &Shared, req: &Request) -> Reply {
    let Some(exec) = &sh.exec else {
        return Reply::error(
            501,
            "this server cannot run writes (sqlite-replica serve only reads the log): serve from the \
             primary's process with repl_primary('host:port') to accept repl_exec",
        );
    };
    let v: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return Reply::error(400, &format!("the body is not JSON: {e}")),
    };
    let (status, answer) = super::exec::respond(&**exec, &v);
    Reply::json(status, &answer)
}

/// The primaries directly in `dir` (each `<name>` with a `<name>-replica/meta.json` of role
/// primary), sorted by name.
pub fn primaries_in(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(db) = name.strip_suffix("-replica") else {
            continue;
        };
        let db_path = dir.join(db);
        let is_primary = Log::read_meta(&e.path()).is_ok_and(|m| m.role == "primary");
        if is_primary && db_path.is_file() {
            out.push(db_path.display().to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// For the CLI: serve `dbs` on one listener until the process is killed.
pub fn serve_forever(
    dbs: &[String],
    addr: &str,
    token: Option<String>,
    tls: Option<&TlsFiles>,
) -> Result<()> {
    let first = dbs
        .first()
        .ok_or_else(|| Error::Misuse("no database to serve".into()))?;
    let bound = Server::bind(addr, token.clone(), tls)?;
    let site = match &bound {
        Bound::New { .. } => None,
        Bound::Join { site, .. } => Some(site.clone()),
    };
    let mut servers = vec![Server::start_bound(first, bound, None)?];
    let site = site.unwrap_or_else(|| servers[0].site.clone());
    for db in &dbs[1..] {
        let joined = Bound::Join {
            site: site.clone(),
            token: token.clone(),
            exec_token: None,
        };
        servers.push(Server::start_bound(db, joined, None)?);
    }
    for s in &servers {
        println!("serving {} on {}", s.shared.db, s.url());
    }
    loop {
        std::thread::park();
    }
}

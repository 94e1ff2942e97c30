//! The process's HTTP/1.1 engine: ONE event loop thread (mio over epoll) for every listener,
//! connection and long-poll of the process, plus fixed worker pools that run request
//! handlers (`FAST_WORKERS` for log/info/snapshot/metrics, `SLOW_WORKERS` for `/v1/exec`) and
//! background jobs (`BACKGROUND_WORKERS`). The same loop serves the process's followers
//! (issue 18): an event-driven HTTP/1.1 client (`client.rs`), timers (`after`) and parks on a
//! log directory (`park_dir`) whose jobs run on the pools. Threads do not grow with
//! connections, long-polls, followers or databases.
//!
//! What a stranger can do to it is bounded (docs/FORMAT.md §8.7 lists the limits and settings):
//! - connections: at most `max_connections`; one more gets a canned 503 at accept and is closed;
//!   the accept loop never exits: on EMFILE/ENFILE it backs off (up to 1 s), logs once, reports
//!   `degraded`, and resumes by itself;
//! - request heads: at most `max_head_bytes` (16 KiB) and `max_headers` (100) → 431; a head must
//!   arrive whole within `head_timeout` (slowloris), an idle keep-alive connection is closed
//!   after `idle_timeout`, a client that stops reading a response for `write_stall_timeout` is
//!   dropped;
//! - bodies: only with Content-Length, at most what the route allows (`Service::body_limit`).
//!
//! A long-poll that has nothing to send yet is *parked*: it holds no thread and costs nothing
//! until the log directory it waits on changes (an in-process `wake_dir` from the primary's
//! commit path, or an inotify event on the directory for commits by other processes) or its
//! deadline passes; then its handler runs again on a worker.
//!
//! TLS (rustls) is per listener; everything above applies to TLS connections too.

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use once_cell::sync::OnceCell;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Worker threads for quick handlers (log ranges, info, snapshot headers, metrics).
pub const FAST_WORKERS: usize = 4;
/// Worker threads for `/v1/exec` (bounded by its own deadline).
pub const SLOW_WORKERS: usize = 2;
/// Worker threads for long background jobs that must not hold the fast pool (a follower's
/// re-snapshot, which downloads and writes a whole database); started by the first such job.
pub const BACKGROUND_WORKERS: usize = 2;
const WAKER: Token = Token(0);
const INOTIFY: Token = Token(1);
const FIRST_TOKEN: usize = 2;
/// Bytes read from a file per refill of a response body.
const CHUNK: usize = 64 * 1024;

/// The limits of one listener; `Limits::from_config` takes the documented settings.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            write_stall_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// Defaults, overridden by `REPL_HTTP_MAX_CONNECTIONS`, `REPL_HTTP_HEAD_TIMEOUT_MS`,
    /// `REPL_HTTP_IDLE_TIMEOUT_MS` and `REPL_HTTP_WRITE_TIMEOUT_MS` (`config`; bad values are
    /// ignored).
    pub fn from_config() -> Limits {
        let c = crate::config::get();
        let d = Limits::default();
        Limits {
            max_connections: c
                .http_max_connections
                .map_or(d.max_connections, |v| v as usize),
            head_timeout: c.http_head_timeout.unwrap_or(d.head_timeout),
            idle_timeout: c.http_idle_timeout.unwrap_or(d.idle_timeout),
            write_stall_timeout: c.http_write_timeout.unwrap_or(d.write_stall_timeout),
            ..d
        }
    }
}

/// One parsed request, as a handler sees it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path with any `/v1/db/<name>` prefix turned into `/v1` (routes see one shape).
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: Option<SocketAddr>,
}

impl Request {
    /// Every value of header `name` (case-insensitive).
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response body: bytes, or a byte range of a file (streamed, never loaded whole).
pub enum Body {
    Bytes(Vec<u8>),
    File {
        /// Shared: many answers may stream the same range (followers woken together).
        file: Arc<std::fs::File>,
        offset: u64,
        len: u64,
    },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// End the connection after this reply (a refused request does not keep its slot).
    pub close: bool,
}

impl Reply {
    pub fn new(status: u16, headers: Vec<(String, String)>, body: Body) -> Reply {
        Reply {
            status,
            headers,
            body,
            // Refusals (bad request, bad token, too large…) end the connection: only a client
            // that is served keeps a connection open.
            close: (400..500).contains(&status) && status != 404 && status != 409 && status != 410,
        }
    }

    pub fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply::new(
            status,
            vec![("Content-Type".into(), "application/json".into())],
            Body::Bytes(v.to_string().into_bytes()),
        )
    }

    pub fn error(status: u16, msg: &str) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": msg }))
    }

    pub fn with_header(mut self, k: &str, v: impl std::fmt::Display) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// What a handler decided.
pub enum Outcome {
    Reply(Reply),
    /// Nothing to send yet: run the handler again when `dir` changes or at `deadline`.
    Park {
        dir: PathBuf,
        deadline: Instant,
    },
}

/// What a handler knows of earlier runs of the same request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    /// The request was parked and its deadline passed: the handler must reply now.
    pub expired: bool,
    /// The deadline of the park, when it was parked before (a re-park keeps it).
    pub parked_until: Option<Instant>,
}

/// One database's routes on a listener.
pub trait Service: Send + Sync {
    /// The largest body accepted for `method path` (0: none).
    fn body_limit(&self, method: &str, path: &str) -> u64;
    /// Runs on the slow pool (may take seconds).
    fn slow(&self, method: &str, path: &str) -> bool;
    fn handle(&self, req: &Request, ctx: Ctx) -> Outcome;
}

/// Counters and state of one listener (for `repl_status()` and `/metrics`).
#[derive(Default)]
pub struct Stats {
    pub open: AtomicUsize,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub evicted: AtomicU64,
    pub timeouts: AtomicU64,
    pub too_large: AtomicU64,
    pub bad_requests: AtomicU64,
    pub requests: AtomicU64,
    pub parked: AtomicUsize,
    /// The listener's connection-limit setting (`effective_max` caps it by the fd limit).
    max_connections: AtomicUsize,
    state: Mutex<(&'static str, Option<String>)>,
}

impl Stats {
    /// `listening`, `degraded` (accepting is paused by an error; it resumes by itself) or
    /// `failed`, with the reason.
    pub fn state(&self) -> (&'static str, Option<String>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_state(&self, s: &'static str, why: Option<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (s, why);
    }

    pub fn json(&self) -> serde_json::Value {
        let (state, reason) = self.state();
        serde_json::json!({
            "state": state,
            "reason": reason,
            "open_connections": self.open.load(Ordering::Relaxed),
            "parked_long_polls": self.parked.load(Ordering::Relaxed),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "evicted": self.evicted.load(Ordering::Relaxed),
            "max_connections": effective_max(self.max_connections.load(Ordering::Relaxed)),
            "timeouts": self.timeouts.load(Ordering::Relaxed),
            "too_large": self.too_large.load(Ordering::Relaxed),
            "bad_requests": self.bad_requests.load(Ordering::Relaxed),
            "requests": self.requests.load(Ordering::Relaxed),
        })
    }
}

/// A listener and the databases it serves (the first attached is the default, reached by the
/// paths without `/v1/db/<name>`).
pub struct Site {
    pub addr: SocketAddr,
    pub tls: bool,
    pub stats: Arc<Stats>,
    limits: Limits,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    dbs: RwLock<Vec<(String, Arc<dyn Service>)>>,
    id: usize,
}

impl Site {
    /// Serve `svc` as database `name` here. Names are unique per listener.
    pub fn attach(&self, name: &str, svc: Arc<dyn Service>) -> Result<(), String> {
        if !valid_name(name) {
            return Err(format!(
                "{name:?} cannot name a database in a URL: use letters, digits, '.', '_' and '-'"
            ));
        }
        let mut d = self.dbs.write().unwrap_or_else(|e| e.into_inner());
        if d.iter().any(|(n, _)| n == name) {
            return Err(format!(
                "a database named {name:?} is already served on {}; databases on one listener need \
                 different file names",
                self.addr
            ));
        }
        d.push((name.to_string(), svc));
        Ok(())
    }

    /// Stop serving `name`; the listener closes with its last database.
    pub fn detach(self: &Arc<Self>, name: &str) {
        let empty = {
            let mut d = self.dbs.write().unwrap_or_else(|e| e.into_inner());
            d.retain(|(n, _)| n != name);
            d.is_empty()
        };
        if empty {
            if let Some(e) = ENGINE.get() {
                e.post(Cmd::Close(self.id));
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.dbs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn route(&self, path: &str) -> Result<(Arc<dyn Service>, String), Reply> {
        let d = self.dbs.read().unwrap_or_else(|e| e.into_inner());
        if let Some(rest) = path.strip_prefix("/v1/db/") {
            let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
            return match d.iter().find(|(n, _)| n == name) {
                Some((_, s)) => Ok((s.clone(), format!("/v1/{tail}"))),
                None => Err(Reply::error(
                    404,
                    &format!("no database named {name:?} is served here"),
                )),
            };
        }
        match d.first() {
            Some((_, s)) => Ok((s.clone(), path.to_string())),
            None => Err(Reply::error(503, "this listener serves no database now")),
        }
    }
}

/// A database name usable as one URL path segment.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

// ------------------------------------------------------------------ the engine

enum Cmd {
    Listen(usize, Box<TcpListener>, Arc<Site>),
    Close(usize),
    WakeDir(PathBuf),
    Done(Token, u64, Outcome),
    ClientGet(u64, Box<client::Submit>),
    ClientClose(u64),
    /// Run the job on the pool at the instant.
    Timer(Instant, Pool, Job),
    /// Run the job on the fast pool when `dir` changes (wake_dir, inotify) or at the deadline;
    /// at once when a `wake_dir` came after the caller read `WAKE_SEQ` (the u64).
    ParkJob(PathBuf, Instant, u64, Job),
}

/// The engine's worker pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// `FAST_WORKERS`: log answers, client callbacks, followers' applies.
    Fast,
    /// `SLOW_WORKERS`: `/v1/exec`.
    Slow,
    /// `BACKGROUND_WORKERS`: long jobs (followers' re-snapshots).
    Background,
}

struct Engine {
    waker: Waker,
    cmds: Mutex<Vec<Cmd>>,
    fast: Mutex<mpsc::Sender<Job>>,
    slow: Mutex<mpsc::Sender<Job>>,
    /// Started by its first job (a process that never re-snapshots a follower has none).
    background: OnceCell<Mutex<mpsc::Sender<Job>>>,
    sites: Mutex<HashMap<usize, Arc<Site>>>,
    next_site: AtomicUsize,
    /// Directories with parked long-polls (so `wake_dir` posts only when someone waits).
    watched: Mutex<HashMap<PathBuf, usize>>,
}

/// Work for a pool.
pub type Job = Box<dyn FnOnce() + Send>;

static ENGINE: OnceCell<Arc<Engine>> = OnceCell::new();

/// Every `wake_dir` call so far (any directory).
static WAKE_SEQ: AtomicU64 = AtomicU64::new(0);

impl Engine {
    fn post(&self, c: Cmd) {
        self.cmds.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        let _ = self.waker.wake();
    }

    fn run(&self, pool: Pool, job: Job) {
        let tx = match pool {
            Pool::Fast => &self.fast,
            Pool::Slow => &self.slow,
            Pool::Background => {
                let bg = self.background.get_or_try_init(|| {
                    let (tx, rx) = mpsc::channel::<Job>();
                    spawn_pool("repl-http-bg", BACKGROUND_WORKERS, rx)?;
                    Ok::<_, std::io::Error>(Mutex::new(tx))
                });
                match bg {
                    Ok(tx) => tx,
                    Err(e) => {
                        // No thread for it (resource limits): the fast pool runs it rather
                        // than nobody.
                        crate::logging::event(&format!(
                            "event=server_error what=background_pool error={:?}",
                            e.to_string()
                        ));
                        &self.fast
                    }
                }
            }
        };
        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    }
}

fn engine() -> std::io::Result<&'static Arc<Engine>> {
    ENGINE.get_or_try_init(|| {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (fast_tx, fast_rx) = mpsc::channel::<Job>();
        let (slow_tx, slow_rx) = mpsc::channel::<Job>();
        let e = Arc::new(Engine {
            waker,
            cmds: Mutex::new(Vec::new()),
            fast: Mutex::new(fast_tx),
            slow: Mutex::new(slow_tx),
            background: OnceCell::new(),
            sites: Mutex::new(HashMap::new()),
            next_site: AtomicUsize::new(1),
            watched: Mutex::new(HashMap::new()),
        });
        spawn_pool("repl-http-work", FAST_WORKERS, fast_rx)?;
        spawn_pool("repl-http-exec", SLOW_WORKERS, slow_rx)?;
        let e2 = e.clone();
        std::thread::Builder::new()
            .name("repl-http".into())
            .spawn(move || {
                let mut l = Loop::new(poll, e2);
                l.run();
            })?;
        Ok(e)
    })
}

fn spawn_pool(name: &str, n: usize, rx: mpsc::Receiver<Job>) -> std::io::Result<()> {
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..n {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                    Ok(j) => j,
                    Err(_) => return,
                };
                // A job that panics must not take its worker with it (the pools never grow
                // back).
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    crate::logging::event("event=http_panic what=job");
                }
            })?;
    }
    Ok(())
}

/// Start serving on an already bound listener (see `server::Server::bind`).
pub fn listen(
    sock: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) -> std::io::Result<Arc<Site>> {
    let e = engine()?;
    sock.set_nonblocking(true)?;
    let addr = sock.local_addr()?;
    let id = e.next_site.fetch_add(1, Ordering::Relaxed);
    let stats = Arc::new(Stats::default());
    stats.set_state("listening", None);
    stats
        .max_connections
        .store(limits.max_connections, Ordering::Relaxed);
    let site = Arc::new(Site {
        addr,
        tls: tls.is_some(),
        stats,
        limits,
        tls_config: tls,
        dbs: RwLock::new(Vec::new()),
        id,
    });
    e.sites
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, site.clone());
    e.post(Cmd::Listen(
        id,
        Box::new(TcpListener::from_std(sock)),
        site.clone(),
    ));
    Ok(site)
}

/// The listener of this process on exactly `addr`, if one is open (to join it).
pub fn find_site(addr: SocketAddr) -> Option<Arc<Site>> {
    let e = ENGINE.get()?;
    let sites = e.sites.lock().unwrap_or_else(|e| e.into_inner());
    sites
        .values()
        .find(|s| s.addr == addr && !s.names().is_empty())
        .cloned()
}

/// Wake the long-polls parked on `dir` (the primary calls this when its durable watermark
/// moves). Cheap when nobody waits there.
pub fn wake_dir(dir: &Path) {
    // Counted before anything else: a handler that found nothing to send and is about to be
    // parked compares this with the value from before it ran (see `Loop::done`), so a wake-up
    // that comes before its park is registered is not lost.
    WAKE_SEQ.fetch_add(1, Ordering::AcqRel);
    let Some(e) = ENGINE.get() else { return };
    let waiting = e
        .watched
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(dir)
        .is_some_and(|n| *n > 0);
    if waiting {
        e.post(Cmd::WakeDir(dir.to_path_buf()));
    }
}

/// Threads the engine runs (0 before its first use; the background pool once a job needed
/// it): for tests and `make bench`.
pub fn threads() -> usize {
    match ENGINE.get() {
        Some(e) => {
            let bg = e.background.get().map_or(0, |_| BACKGROUND_WORKERS);
            1 + FAST_WORKERS + SLOW_WORKERS + bg
        }
        None => 0,
    }
}

/// Start the engine (its loop and pools) if it is not running yet. Once it runs, `spawn`,
/// `after` and `park_dir` cannot fail.
pub fn start() -> std::io::Result<()> {
    engine().map(|_| ())
}

/// Run `job` on `pool` (starting the engine if it is not running yet).
pub fn spawn(pool: Pool, job: Job) -> std::io::Result<()> {
    engine()?.run(pool, job);
    Ok(())
}

/// Run `job` on `pool` once `delay` has passed (a timer of the event loop: no thread sleeps).
pub fn after(delay: Duration, pool: Pool, job: Job) -> std::io::Result<()> {
    let e = engine()?;
    if delay.is_zero() {
        e.run(pool, job);
    } else {
        e.post(Cmd::Timer(Instant::now() + delay, pool, job));
    }
    Ok(())
}

/// The count of `wake_dir` calls so far: read it *before* checking whether there is anything
/// to do, and pass it to `park_dir`, so that a wake-up in between is not slept through.
pub fn wake_seq() -> u64 {
    WAKE_SEQ.load(Ordering::Acquire)
}

/// Run `job` on the fast pool when log directory `dir` changes (an in-process `wake_dir`, or
/// inotify for other processes' commits) or at `deadline`, whichever comes first: the
/// server's parking of long-polls, for in-process waiters (a follower of a directory source).
/// Runs it at once when a `wake_dir` happened since `seen` (`wake_seq`).
pub fn park_dir(dir: &Path, deadline: Instant, seen: u64, job: Job) -> std::io::Result<()> {
    let e = engine()?;
    // Counted here, not in the loop: a `wake_dir` from now on posts a wake-up for `dir`.
    *e.watched
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(dir.to_path_buf())
        .or_default() += 1;
    e.post(Cmd::ParkJob(dir.to_path_buf(), deadline, seen, job));
    Ok(())
}

pub mod client;
mod conn;
mod event_loop;
mod tls;

use crate::sys::Inotify;
pub use event_loop::effective_max;
use event_loop::Loop;
pub use tls::{crypto_provider, tls_config};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_url_segment() {
        assert!(valid_name("app.db"));
        assert!(valid_name("tenant-42_x.sqlite"));
        for bad in ["", ".", "..", "a/b", "a b", "ä.db", "a?b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn reasons_cover_our_statuses() {
        for s in [200, 400, 401, 404, 405, 409, 410, 413, 431, 500, 501, 503] {
            assert!(!conn::reason(s).is_empty(), "{s}");
        }
    }
}

//! The process's HTTP/1.1 engine: ONE event loop thread (mio over epoll) for every listener,
//! connection and long-poll of the process, plus two fixed worker pools that run request
//! handlers (`FAST_WORKERS` for log/info/snapshot/metrics, `SLOW_WORKERS` for `/v1/exec`).
//! Threads do not grow with connections, long-polls or databases.
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

use crate::ffi::os::Inotify;
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
const WAKER: Token = Token(0);
const INOTIFY: Token = Token(1);
const FIRST_TOKEN: usize = 2;
/// Bytes read from a file per refill of a response body.
const CHUNK: usize = 64 * 1024;

/// The limits of one listener; `Limits::from_env` reads the documented settings.
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
    /// `REPL_HTTP_IDLE_TIMEOUT_MS` and `REPL_HTTP_WRITE_TIMEOUT_MS` (bad values are ignored).
    pub fn from_env() -> Limits {
        let mut l = Limits::default();
        let env = |n: &str| {
            std::env::var(n)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(v) = env("REPL_HTTP_MAX_CONNECTIONS").filter(|v| *v >= 1) {
            l.max_connections = v as usize;
        }
        if let Some(v) = env("REPL_HTTP_HEAD_TIMEOUT_MS").filter(|v| *v >= 10) {
            l.head_timeout = Duration::from_millis(v);
        }
        if let Some(v) = env("REPL_HTTP_IDLE_TIMEOUT_MS").filter(|v| *v >= 10) {
            l.idle_timeout = Duration::from_millis(v);
        }
        if let Some(v) = env("REPL_HTTP_WRITE_TIMEOUT_MS").filter(|v| *v >= 10) {
            l.write_stall_timeout = Duration::from_millis(v);
        }
        l
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
        file: std::fs::File,
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
            "max_connections": effective_max(&Limits::from_env()),
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
}

struct Engine {
    waker: Waker,
    cmds: Mutex<Vec<Cmd>>,
    fast: Mutex<mpsc::Sender<Job>>,
    slow: Mutex<mpsc::Sender<Job>>,
    sites: Mutex<HashMap<usize, Arc<Site>>>,
    next_site: AtomicUsize,
    /// Directories with parked long-polls (so `wake_dir` posts only when someone waits).
    watched: Mutex<HashMap<PathBuf, usize>>,
}

type Job = Box<dyn FnOnce() + Send>;

static ENGINE: OnceCell<Arc<Engine>> = OnceCell::new();

impl Engine {
    fn post(&self, c: Cmd) {
        self.cmds.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        let _ = self.waker.wake();
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
                job();
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

/// Threads the engine runs (0 before the first listener): for tests and `make bench`.
pub fn threads() -> usize {
    if ENGINE.get().is_some() {
        1 + FAST_WORKERS + SLOW_WORKERS
    } else {
        0
    }
}

// ------------------------------------------------------------------ the loop

#[derive(PartialEq, Eq, Debug, Clone, Copy)]
enum State {
    Head,
    Body { need: usize },
    Busy,
    Parked,
    Writing,
}

struct Conn {
    sock: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    site: Arc<Site>,
    peer: Option<SocketAddr>,
    state: State,
    inbuf: Vec<u8>,
    /// Bytes of the current request head (when reading the body).
    head_len: usize,
    pending: Option<Pending>,
    out: Vec<u8>,
    out_pos: usize,
    body: Option<Body>,
    body_pos: u64,
    keep_alive: bool,
    deadline: Option<Instant>,
    /// Bumped for every dispatch, so a late worker answer for an old request is dropped.
    gen: u64,
    job: Option<(Arc<dyn Service>, Arc<Request>)>,
    park: Option<(PathBuf, Instant)>,
    /// The request counted as one of the site's open connections.
    counted: bool,
    /// Requests answered on this connection (0: a candidate for eviction when full).
    served: u64,
    opened: Instant,
}

struct Pending {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    version: u8,
    keep_alive: bool,
}

struct ListenerState {
    sock: Box<TcpListener>,
    site: Arc<Site>,
    paused_until: Option<Instant>,
    backoff: Duration,
}

struct Loop {
    poll: Poll,
    engine: Arc<Engine>,
    listeners: HashMap<Token, ListenerState>,
    site_token: HashMap<usize, Token>,
    conns: HashMap<Token, Conn>,
    next: usize,
    inotify: Option<Inotify>,
    wd_dir: HashMap<i32, PathBuf>,
    dir_wd: HashMap<PathBuf, i32>,
    parked: HashMap<PathBuf, Vec<Token>>,
}

impl Loop {
    fn new(poll: Poll, engine: Arc<Engine>) -> Loop {
        let inotify = Inotify::new().ok();
        if let Some(i) = &inotify {
            use std::os::fd::AsRawFd;
            let fd = i.as_raw_fd();
            let _ = poll
                .registry()
                .register(&mut SourceFd(&fd), INOTIFY, Interest::READABLE);
        }
        Loop {
            poll,
            engine,
            listeners: HashMap::new(),
            site_token: HashMap::new(),
            conns: HashMap::new(),
            next: FIRST_TOKEN,
            inotify,
            wd_dir: HashMap::new(),
            dir_wd: HashMap::new(),
            parked: HashMap::new(),
        }
    }

    fn token(&mut self) -> Token {
        self.next += 1;
        Token(self.next)
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    crate::logging::event(&format!(
                        "event=server_error what=poll error={:?}",
                        e.to_string()
                    ));
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    INOTIFY => self.on_inotify(),
                    t if self.listeners.contains_key(&t) => self.accept(t),
                    t => self.on_conn_event(t, ev.is_read_closed() || ev.is_error()),
                }
            }
            self.run_cmds();
            self.on_timers();
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let conn_deadlines = self
            .conns
            .values()
            .filter_map(|c| c.deadline.or(c.park.as_ref().map(|p| p.1)));
        let listener_deadlines = self.listeners.values().filter_map(|l| l.paused_until);
        conn_deadlines
            .chain(listener_deadlines)
            .min()
            .map(|d| d.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn run_cmds(&mut self) {
        let cmds = std::mem::take(&mut *self.engine.cmds.lock().unwrap_or_else(|e| e.into_inner()));
        for c in cmds {
            match c {
                Cmd::Listen(id, mut sock, site) => {
                    let t = self.token();
                    if let Err(e) = self
                        .poll
                        .registry()
                        .register(&mut *sock, t, Interest::READABLE)
                    {
                        site.stats.set_state("failed", Some(e.to_string()));
                        continue;
                    }
                    self.site_token.insert(id, t);
                    self.listeners.insert(
                        t,
                        ListenerState {
                            sock,
                            site,
                            paused_until: None,
                            backoff: Duration::from_millis(10),
                        },
                    );
                    self.accept(t);
                }
                Cmd::Close(id) => {
                    if let Some(t) = self.site_token.remove(&id) {
                        if let Some(mut l) = self.listeners.remove(&t) {
                            let _ = self.poll.registry().deregister(&mut *l.sock);
                            l.site.stats.set_state("closed", None);
                        }
                    }
                    self.engine
                        .sites
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    // Connections of a closed listener end after their current request.
                    for c in self.conns.values_mut() {
                        if c.site.id == id {
                            c.keep_alive = false;
                        }
                    }
                }
                Cmd::WakeDir(dir) => self.wake(&dir),
                Cmd::Done(t, gen, outcome) => self.done(t, gen, outcome),
            }
        }
    }

    fn accept(&mut self, t: Token) {
        loop {
            let Some(l) = self.listeners.get_mut(&t) else {
                return;
            };
            if l.paused_until.is_some_and(|p| Instant::now() < p) {
                return;
            }
            match l.sock.accept() {
                Ok((sock, peer)) => {
                    let site = l.site.clone();
                    if l.backoff > Duration::from_millis(10) {
                        l.backoff = Duration::from_millis(10);
                        site.stats.set_state("listening", None);
                        crate::logging::event(&format!(
                            "event=accept_recovered addr={}",
                            site.addr
                        ));
                    }
                    site.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let open = site.stats.open.load(Ordering::Relaxed);
                    if open >= effective_max(&site.limits) && !self.evict_one(site.id) {
                        site.stats.refused.fetch_add(1, Ordering::Relaxed);
                        refuse_full(sock);
                        continue;
                    }
                    let _ = sock.set_nodelay(true);
                    self.add_conn(sock, peer, site);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let code = e.raw_os_error().unwrap_or(0);
                    let resource = matches!(
                        code,
                        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
                    );
                    if !resource {
                        // ECONNABORTED and friends: that one connection is gone; go on.
                        continue;
                    }
                    let first = l.backoff <= Duration::from_millis(10);
                    l.paused_until = Some(Instant::now() + l.backoff);
                    l.backoff = (l.backoff * 2).min(Duration::from_secs(1));
                    let site = l.site.clone();
                    site.stats.set_state(
                        "degraded",
                        Some(format!(
                            "accepting paused: {e}; retrying by itself (raise the open-file limit or lower REPL_HTTP_MAX_CONNECTIONS)"
                        )),
                    );
                    if first {
                        crate::logging::event(&format!(
                            "event=accept_error addr={} error={:?} action=\"backing off, up to 1 s\"",
                            site.addr,
                            e.to_string()
                        ));
                    }
                    return;
                }
            }
        }
    }

    /// At the connection limit, make room for a new connection by closing the oldest one of
    /// this listener that has not had a single request answered yet (an idle or trickling
    /// stranger): clients being served keep their connections. False when there is none.
    fn evict_one(&mut self, site_id: usize) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.site.id == site_id
                    && c.served == 0
                    && matches!(c.state, State::Head | State::Body { .. })
            })
            .min_by_key(|(_, c)| c.opened)
            .map(|(t, _)| *t);
        match victim {
            Some(t) => {
                if let Some(c) = self.conns.get(&t) {
                    c.site.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                self.close(t);
                true
            }
            None => false,
        }
    }

    fn add_conn(&mut self, mut sock: TcpStream, peer: SocketAddr, site: Arc<Site>) {
        let t = self.token();
        if self
            .poll
            .registry()
            .register(&mut sock, t, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            return;
        }
        let tls = match &site.tls_config {
            Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
                Ok(mut c) => {
                    c.set_buffer_limit(Some(CHUNK * 2));
                    Some(Box::new(c))
                }
                Err(_) => return,
            },
            None => None,
        };
        site.stats.open.fetch_add(1, Ordering::Relaxed);
        let deadline = Some(Instant::now() + site.limits.head_timeout);
        self.conns.insert(
            t,
            Conn {
                sock,
                tls,
                site,
                peer: Some(peer),
                state: State::Head,
                inbuf: Vec::new(),
                head_len: 0,
                pending: None,
                out: Vec::new(),
                out_pos: 0,
                body: None,
                body_pos: 0,
                keep_alive: false,
                deadline,
                gen: 0,
                job: None,
                park: None,
                counted: true,
                served: 0,
                opened: Instant::now(),
            },
        );
        self.drive(t);
    }

    fn on_conn_event(&mut self, t: Token, closed: bool) {
        let Some(c) = self.conns.get(&t) else { return };
        if closed && matches!(c.state, State::Parked | State::Busy) && c.tls.is_none() {
            // The client went away while its long-poll waited: forget it now.
            let mut probe = [0u8; 1];
            if matches!(c.sock.peek(&mut probe), Ok(0) | Err(_)) {
                self.close(t);
                return;
            }
        }
        self.drive(t);
    }

    /// Move a connection forward as far as its socket allows.
    fn drive(&mut self, t: Token) {
        for _ in 0..64 {
            let Some(c) = self.conns.get_mut(&t) else {
                return;
            };
            let step = match c.state {
                State::Head | State::Body { .. } => c.read_request(),
                State::Writing => c.write_reply(),
                State::Busy | State::Parked => {
                    // Keep TLS alerts/handshake flowing; nothing else to do until the worker
                    // answers or the park ends.
                    if c.tls.is_some() {
                        let _ = c.flush_tls();
                    }
                    Step::Wait
                }
            };
            match step {
                Step::Wait => return,
                Step::Again => continue,
                Step::Close => {
                    self.close(t);
                    return;
                }
                Step::Dispatch(svc, req) => {
                    self.dispatch(t, svc, req, Ctx::default());
                    return;
                }
            }
        }
    }

    fn dispatch(&mut self, t: Token, svc: Arc<dyn Service>, req: Arc<Request>, ctx: Ctx) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        c.gen += 1;
        c.state = State::Busy;
        c.deadline = None;
        c.job = Some((svc.clone(), req.clone()));
        c.site.stats.requests.fetch_add(1, Ordering::Relaxed);
        let gen = c.gen;
        let slow = svc.slow(&req.method, &req.path);
        let e = self.engine.clone();
        let job: Job = Box::new(move || {
            let out =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| svc.handle(&req, ctx)))
                    .unwrap_or_else(|_| {
                        crate::logging::event("event=http_panic");
                        Outcome::Reply(Reply::error(500, "internal error in sqlite-replica"))
                    });
            e.post(Cmd::Done(t, gen, out));
        });
        let pool = if slow {
            &self.engine.slow
        } else {
            &self.engine.fast
        };
        let _ = pool.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    }

    fn done(&mut self, t: Token, gen: u64, outcome: Outcome) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        if c.gen != gen || c.state != State::Busy {
            return;
        }
        match outcome {
            Outcome::Reply(r) => {
                c.start_reply(r);
                self.drive(t);
            }
            Outcome::Park { dir, deadline } => {
                c.state = State::Parked;
                c.park = Some((dir.clone(), deadline));
                c.site.stats.parked.fetch_add(1, Ordering::Relaxed);
                self.parked.entry(dir.clone()).or_default().push(t);
                *self
                    .engine
                    .watched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(dir.clone())
                    .or_default() += 1;
                if !self.dir_wd.contains_key(&dir) {
                    if let Some(wd) = self.inotify.as_ref().and_then(|i| i.watch_dir(&dir).ok()) {
                        self.dir_wd.insert(dir.clone(), wd);
                        self.wd_dir.insert(wd, dir);
                    }
                }
            }
        }
    }

    fn unpark(&mut self, t: Token) -> Option<(Arc<dyn Service>, Arc<Request>, Instant)> {
        let c = self.conns.get_mut(&t)?;
        let (dir, deadline) = c.park.take()?;
        c.site.stats.parked.fetch_sub(1, Ordering::Relaxed);
        if let Some(v) = self.parked.get_mut(&dir) {
            v.retain(|x| *x != t);
            if v.is_empty() {
                self.parked.remove(&dir);
            }
        }
        let mut w = self
            .engine
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&dir) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(&dir);
                drop(w);
                if let Some(wd) = self.dir_wd.remove(&dir) {
                    self.wd_dir.remove(&wd);
                    if let Some(i) = &self.inotify {
                        i.unwatch(wd);
                    }
                }
            }
        }
        let (svc, req) = c.job.clone()?;
        Some((svc, req, deadline))
    }

    fn wake(&mut self, dir: &Path) {
        let tokens = self.parked.get(dir).cloned().unwrap_or_default();
        for t in tokens {
            if let Some((svc, req, deadline)) = self.unpark(t) {
                let ctx = Ctx {
                    expired: false,
                    parked_until: Some(deadline),
                };
                self.dispatch(t, svc, req, ctx);
            }
        }
    }

    fn on_inotify(&mut self) {
        let Some(i) = &self.inotify else { return };
        let dirs: Vec<PathBuf> = i
            .drain()
            .into_iter()
            .filter_map(|wd| self.wd_dir.get(&wd).cloned())
            .collect();
        for d in dirs {
            self.wake(&d);
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let expired_parks: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.park.as_ref().is_some_and(|p| p.1 <= now))
            .map(|(t, _)| *t)
            .collect();
        for t in expired_parks {
            if let Some((svc, req, deadline)) = self.unpark(t) {
                let ctx = Ctx {
                    expired: true,
                    parked_until: Some(deadline),
                };
                self.dispatch(t, svc, req, ctx);
            }
        }
        let timed_out: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        for t in timed_out {
            if let Some(c) = self.conns.get(&t) {
                // An idle keep-alive connection closing is routine; a head, body or write that
                // did not finish in time is counted.
                if !(c.state == State::Head && c.inbuf.is_empty()) {
                    c.site.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.close(t);
        }
        let paused: Vec<Token> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.paused_until.is_some_and(|p| p <= now))
            .map(|(t, _)| *t)
            .collect();
        for t in paused {
            if let Some(l) = self.listeners.get_mut(&t) {
                // Try again; accept() pauses once more if the error persists, and reports
                // `listening` again once a connection is accepted.
                l.paused_until = None;
            }
            self.accept(t);
        }
    }

    fn close(&mut self, t: Token) {
        let _ = self.unpark(t);
        if let Some(mut c) = self.conns.remove(&t) {
            let _ = self.poll.registry().deregister(&mut c.sock);
            if c.counted {
                c.site.stats.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// The connection limit in force: the setting, but never more than half the process's open-file
/// limit, so that a flood of connections meets our limit (a 503) before the process runs out
/// of file descriptors (which would also break the host application's own files).
pub fn effective_max(l: &Limits) -> usize {
    let soft = crate::ffi::os::open_file_limit().unwrap_or(u64::MAX);
    l.max_connections.min((soft / 2).max(8) as usize)
}

/// The answer to a connection over the limit: written once, without waiting, then closed.
fn refuse_full(mut sock: TcpStream) {
    let body = br#"{"error":"too many connections to this server; retry later"}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut all = head.into_bytes();
    all.extend_from_slice(body);
    let _ = sock.write(&all);
}

enum Step {
    Wait,
    Again,
    Close,
    Dispatch(Arc<dyn Service>, Arc<Request>),
}

impl Conn {
    /// Read what the socket has (plaintext after TLS) into `inbuf`, at most `room` bytes more.
    /// Ok(false) at end of stream.
    fn fill(&mut self, room: usize) -> std::io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        let mut left = room;
        loop {
            if left == 0 {
                return Ok(true);
            }
            let want = left.min(buf.len());
            match self.read_some(&mut buf[..want]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.inbuf.extend_from_slice(&buf[..n]);
                    left -= n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One read of plaintext: from the socket, or through TLS (feeding it socket bytes and
    /// answering handshake messages as needed).
    fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.sock.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            let state = tls.process_new_packets();
            while tls.wants_write() {
                match tls.write_tls(&mut self.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if let Err(e) = state {
                return Err(std::io::Error::new(ErrorKind::InvalidData, e));
            }
        }
    }

    fn flush_tls(&mut self) -> std::io::Result<()> {
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_request(&mut self) -> Step {
        let lim = self.site.limits.clone();
        match self.state {
            State::Head => {
                let room = (lim.max_head_bytes + 1).saturating_sub(self.inbuf.len());
                let before = self.inbuf.len();
                let open = match self.fill(room) {
                    Ok(open) => open,
                    Err(_) => return Step::Close,
                };
                if before == 0 && !self.inbuf.is_empty() {
                    // The first byte of a head starts its clock (an idle keep-alive one ran
                    // on the idle timeout until now).
                    self.deadline = Some(Instant::now() + lim.head_timeout);
                }
                match self.parse_head() {
                    HeadParse::Partial => {
                        if self.inbuf.len() > lim.max_head_bytes {
                            self.site.stats.too_large.fetch_add(1, Ordering::Relaxed);
                            return self.fail(
                                431,
                                &format!("the request head is over {} bytes", lim.max_head_bytes),
                            );
                        }
                        if !open {
                            return Step::Close;
                        }
                        Step::Wait
                    }
                    HeadParse::TooManyHeaders => {
                        self.site.stats.too_large.fetch_add(1, Ordering::Relaxed);
                        self.fail(
                            431,
                            &format!("more than {} request headers", lim.max_headers),
                        )
                    }
                    HeadParse::Bad(msg) => {
                        self.site.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        self.fail(400, &msg)
                    }
                    HeadParse::Done {
                        head_len,
                        pending,
                        body_len,
                    } => {
                        self.head_len = head_len;
                        let path = pending.target.split('?').next().unwrap_or("").to_string();
                        let limit = match self.site.route(&path) {
                            Ok((svc, p)) => svc.body_limit(&pending.method, &p),
                            Err(_) => 0,
                        };
                        if body_len > limit {
                            self.site.stats.too_large.fetch_add(1, Ordering::Relaxed);
                            self.pending = Some(pending);
                            return self.fail(
                                413,
                                &format!(
                                    "the request body is {body_len} bytes; this endpoint takes at most {limit}"
                                ),
                            );
                        }
                        let expect_continue = pending.headers.iter().any(|(k, v)| {
                            k.eq_ignore_ascii_case("expect")
                                && v.eq_ignore_ascii_case("100-continue")
                        });
                        self.pending = Some(pending);
                        if body_len > 0 && expect_continue {
                            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                            let _ = self.write_out();
                        }
                        self.state = State::Body {
                            need: body_len as usize,
                        };
                        self.deadline = Some(Instant::now() + lim.body_timeout);
                        Step::Again
                    }
                }
            }
            State::Body { need } => {
                let have = self.inbuf.len() - self.head_len;
                if have < need {
                    let open = match self.fill(need - have) {
                        Ok(o) => o,
                        Err(_) => return Step::Close,
                    };
                    if self.inbuf.len() - self.head_len < need {
                        return if open { Step::Wait } else { Step::Close };
                    }
                }
                let p = self.pending.take().expect("pending head");
                let body = self.inbuf[self.head_len..self.head_len + need].to_vec();
                self.inbuf.drain(..self.head_len + need);
                self.keep_alive = p.keep_alive;
                let (path, query) = match p.target.split_once('?') {
                    Some((a, b)) => (a.to_string(), b.to_string()),
                    None => (p.target.clone(), String::new()),
                };
                let (svc, path) = match self.site.route(&path) {
                    Ok(x) => x,
                    Err(r) => {
                        self.start_reply_for(r, &p.method);
                        return Step::Again;
                    }
                };
                let _ = p.version;
                let req = Request {
                    method: p.method,
                    path,
                    query,
                    headers: p.headers,
                    body,
                    peer: self.peer,
                };
                Step::Dispatch(svc, Arc::new(req))
            }
            _ => Step::Wait,
        }
    }

    fn parse_head(&self) -> HeadParse {
        let max = self.site.limits.max_headers;
        let mut headers = vec![httparse::EMPTY_HEADER; max];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&self.inbuf) {
            Ok(httparse::Status::Partial) => HeadParse::Partial,
            Err(httparse::Error::TooManyHeaders) => HeadParse::TooManyHeaders,
            Err(e) => HeadParse::Bad(format!("malformed request: {e}")),
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let target = req.path.unwrap_or("").to_string();
                let version = req.version.unwrap_or(1);
                let mut hs = Vec::with_capacity(req.headers.len());
                for h in req.headers.iter() {
                    let Ok(v) = std::str::from_utf8(h.value) else {
                        return HeadParse::Bad(format!("header {} is not UTF-8", h.name));
                    };
                    hs.push((h.name.to_string(), v.trim().to_string()));
                }
                let get = |n: &str| {
                    hs.iter()
                        .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                        .map(|(_, v)| v.as_str())
                        .collect::<Vec<_>>()
                };
                if !get("transfer-encoding").is_empty() {
                    return HeadParse::Bad(
                        "chunked request bodies are not supported: send Content-Length".into(),
                    );
                }
                let cl = get("content-length");
                let body_len = match cl.as_slice() {
                    [] => 0,
                    [one]
                        if !one.is_empty()
                            && one.len() <= 18
                            && one.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        one.parse::<u64>().unwrap_or(u64::MAX)
                    }
                    _ => return HeadParse::Bad("Content-Length must be one decimal number".into()),
                };
                let conn = get("connection").join(",").to_ascii_lowercase();
                let keep_alive = if version == 0 {
                    conn.contains("keep-alive")
                } else {
                    !conn.contains("close")
                };
                HeadParse::Done {
                    head_len,
                    body_len,
                    pending: Pending {
                        method,
                        target,
                        headers: hs,
                        version,
                        keep_alive,
                    },
                }
            }
        }
    }

    /// Answer an error and close (the request stream may be out of step).
    fn fail(&mut self, status: u16, msg: &str) -> Step {
        self.keep_alive = false;
        self.inbuf.clear();
        let method = self
            .pending
            .as_ref()
            .map_or("GET".to_string(), |p| p.method.clone());
        self.pending = None;
        self.start_reply_for(Reply::error(status, msg), &method);
        Step::Again
    }

    fn start_reply(&mut self, r: Reply) {
        let method = self
            .job
            .as_ref()
            .map_or("GET".to_string(), |(_, q)| q.method.clone());
        self.start_reply_for(r, &method);
    }

    fn start_reply_for(&mut self, r: Reply, method: &str) {
        if r.close {
            self.keep_alive = false;
        }
        self.served += 1;
        let len = r.body.len();
        let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
        for (k, v) in &r.headers {
            // Header values come from our own code; still never let one break the framing.
            if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
                continue;
            }
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {len}\r\n"));
        head.push_str(if self.keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        self.out.extend_from_slice(head.as_bytes());
        self.body = match r.body {
            _ if method.eq_ignore_ascii_case("HEAD") => None,
            // A small body goes out with the head in one write.
            Body::Bytes(b) if b.len() <= CHUNK => {
                self.out.extend_from_slice(&b);
                None
            }
            body => Some(body),
        };
        self.body_pos = 0;
        self.state = State::Writing;
        self.deadline = Some(Instant::now() + self.site.limits.write_stall_timeout);
    }

    /// Write pending bytes; Ok(true) when `out` is empty.
    fn write_out(&mut self) -> std::io::Result<bool> {
        while self.out_pos < self.out.len() {
            let n = match &mut self.tls {
                None => self.sock.write(&self.out[self.out_pos..]),
                Some(tls) => {
                    let n = tls.writer().write(&self.out[self.out_pos..]);
                    let _ = self.flush_tls();
                    match n {
                        Ok(0) => Err(std::io::Error::from(ErrorKind::WouldBlock)),
                        other => other,
                    }
                }
            };
            match n {
                Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    self.out_pos += n;
                    self.deadline = Some(Instant::now() + self.site.limits.write_stall_timeout);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        self.flush_tls()?;
        Ok(self.tls.as_ref().is_none_or(|t| !t.wants_write()))
    }

    fn write_reply(&mut self) -> Step {
        loop {
            match self.write_out() {
                Ok(true) => {}
                Ok(false) => return Step::Wait,
                Err(_) => return Step::Close,
            }
            // Refill from the body.
            match &mut self.body {
                None => break,
                Some(Body::Bytes(b)) => {
                    if b.is_empty() {
                        self.body = None;
                        continue;
                    }
                    self.out = std::mem::take(b);
                    self.out_pos = 0;
                }
                Some(Body::File { file, offset, len }) => {
                    let left = *len - self.body_pos;
                    if left == 0 {
                        self.body = None;
                        continue;
                    }
                    let n = (left as usize).min(CHUNK);
                    let mut buf = vec![0u8; n];
                    match file.read_exact_at(&mut buf, *offset + self.body_pos) {
                        Ok(()) => {}
                        // The file shrank under us (retention): the Content-Length cannot be
                        // honoured, so end the connection (the client sees a short body).
                        Err(_) => return Step::Close,
                    }
                    self.body_pos += n as u64;
                    self.out = buf;
                    self.out_pos = 0;
                }
            }
        }
        // Response complete.
        self.job = None;
        if !self.keep_alive {
            if let Some(tls) = &mut self.tls {
                tls.send_close_notify();
                let _ = self.flush_tls();
            }
            return Step::Close;
        }
        self.state = State::Head;
        self.deadline = Some(Instant::now() + self.site.limits.idle_timeout);
        if !self.inbuf.is_empty() {
            self.deadline = Some(Instant::now() + self.site.limits.head_timeout);
        }
        Step::Again
    }
}

enum HeadParse {
    Partial,
    TooManyHeaders,
    Bad(String),
    Done {
        head_len: usize,
        body_len: u64,
        pending: Pending,
    },
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// A TLS server configuration from PEM files: a certificate chain and its private key.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p).map_err(|e| format!("cannot read the TLS {what} {}: {e}", p.display()))
    };
    let cert_pem = read(cert, "certificate")?;
    let key_pem = read(key, "key")?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key in the file", key.display()))?;
    // ring is the provider ureq's TLS (the client side) also uses; its default provider is
    // deprecated only for lacking post-quantum key exchange, which no peer of ours needs.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit together: {e}"))?;
    Ok(Arc::new(cfg))
}

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
            assert!(!reason(s).is_empty(), "{s}");
        }
    }
}

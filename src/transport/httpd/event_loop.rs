//! The engine's event loop: accepting (with the connection limit and the EMFILE back-off),
//! driving connections, dispatching requests to the worker pools, parking long-polls and waking
//! them (in-process wake-ups, inotify, deadlines), and the timeouts.

use super::conn::{Conn, State, Step};
use super::*;

pub(super) struct ListenerState {
    sock: Box<TcpListener>,
    site: Arc<Site>,
    paused_until: Option<Instant>,
    backoff: Duration,
}

pub(super) struct Loop {
    pub(super) poll: Poll,
    pub(super) engine: Arc<Engine>,
    listeners: HashMap<Token, ListenerState>,
    site_token: HashMap<usize, Token>,
    conns: HashMap<Token, Conn>,
    pub(super) next: usize,
    inotify: Option<Inotify>,
    wd_dir: HashMap<i32, PathBuf>,
    dir_wd: HashMap<PathBuf, i32>,
    parked: HashMap<PathBuf, Vec<Token>>,
    /// The engine's HTTP client connections (`client.rs`), by client id, and their tokens.
    pub(super) clients: HashMap<u64, super::client::ClientConn>,
    pub(super) client_tokens: HashMap<Token, u64>,
    /// When the loop next looks for client requests past their deadline (`client::SWEEP`).
    pub(super) client_sweep: Option<Instant>,
    /// `after`: (due, id) in a min-heap, and the jobs by id.
    timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    timer_jobs: HashMap<u64, (Pool, Job)>,
    /// `park_dir`: the jobs by id (directory, deadline, job) and the ids by directory.
    park_jobs: HashMap<u64, (PathBuf, Instant, Job)>,
    dir_jobs: HashMap<PathBuf, Vec<u64>>,
    next_job: u64,
}

impl Loop {
    pub(super) fn new(poll: Poll, engine: Arc<Engine>) -> Loop {
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
            clients: HashMap::new(),
            client_tokens: HashMap::new(),
            client_sweep: None,
            timers: std::collections::BinaryHeap::new(),
            timer_jobs: HashMap::new(),
            park_jobs: HashMap::new(),
            dir_jobs: HashMap::new(),
            next_job: 0,
        }
    }

    fn token(&mut self) -> Token {
        self.next += 1;
        Token(self.next)
    }

    pub(super) fn run(&mut self) {
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
                    t if self.client_tokens.contains_key(&t) => {
                        self.client_event(t, ev.is_read_closed() || ev.is_error())
                    }
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
        let timer = self.timers.peek().map(|t| t.0 .0);
        let parks = self.park_jobs.values().map(|p| p.1);
        conn_deadlines
            .chain(listener_deadlines)
            .chain(self.client_sweep)
            .chain(timer)
            .chain(parks)
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
                Cmd::ClientGet(id, submit) => self.client_get(id, *submit),
                Cmd::ClientClose(id) => self.client_close(id),
                Cmd::Timer(at, pool, job) => {
                    self.next_job += 1;
                    self.timers.push(std::cmp::Reverse((at, self.next_job)));
                    self.timer_jobs.insert(self.next_job, (pool, job));
                }
                Cmd::ParkJob(dir, deadline, seen, job) => self.park_job(dir, deadline, seen, job),
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
                    if open >= effective_max(site.limits.max_connections)
                        && !self.evict_one(site.id)
                    {
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
                wake_seq: 0,
                job: None,
                park: None,
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
        // Read before the handler runs: a wake-up after this point is noticed when it parks.
        c.wake_seq = WAKE_SEQ.load(Ordering::Acquire);
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
                // A wake-up since the handler started (an in-process commit), or a directory
                // not watched yet (a commit by another process before the watch existed): run
                // the handler again rather than sleep through a commit.
                let woken = WAKE_SEQ.load(Ordering::Acquire) != c.wake_seq;
                let unwatched = self.inotify.is_some() && !self.dir_wd.contains_key(&dir);
                if woken || unwatched {
                    if unwatched {
                        if let Some(wd) = self.inotify.as_ref().and_then(|i| i.watch_dir(&dir).ok())
                        {
                            self.dir_wd.insert(dir.clone(), wd);
                            self.wd_dir.insert(wd, dir.clone());
                        }
                    }
                    if let Some((svc, req)) = c.job.clone() {
                        let ctx = Ctx {
                            expired: false,
                            parked_until: Some(deadline),
                        };
                        self.dispatch(t, svc, req, ctx);
                        return;
                    }
                }
                let c = self.conns.get_mut(&t).expect("checked above");
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

    /// Watch `dir` with inotify if it is not watched yet; true when the watch is new.
    fn watch(&mut self, dir: &Path) -> bool {
        if self.inotify.is_none() || self.dir_wd.contains_key(dir) {
            return false;
        }
        if let Some(wd) = self.inotify.as_ref().and_then(|i| i.watch_dir(dir).ok()) {
            self.dir_wd.insert(dir.to_path_buf(), wd);
            self.wd_dir.insert(wd, dir.to_path_buf());
        }
        true
    }

    /// One waiter fewer on `dir` (see `Engine::watched`).
    fn unwatch(&self, dir: &Path) {
        let mut w = self
            .engine
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(dir) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(dir);
            }
        }
    }

    /// `park_dir`: run the job now if `dir` may have changed since the caller looked (a
    /// wake-up since `seen`, or a directory not watched until now), else when it changes or
    /// at the deadline. Without inotify the deadline is `notify::POLL` away at most, so a
    /// commit of another process is seen that late at worst.
    fn park_job(&mut self, dir: PathBuf, deadline: Instant, seen: u64, job: Job) {
        let new_watch = self.watch(&dir);
        let now = Instant::now();
        if new_watch || WAKE_SEQ.load(Ordering::Acquire) != seen || deadline <= now {
            self.unwatch(&dir);
            self.engine.run(Pool::Fast, job);
            return;
        }
        let deadline = if self.inotify.is_none() {
            deadline.min(now + crate::transport::notify::POLL)
        } else {
            deadline
        };
        self.next_job += 1;
        self.dir_jobs
            .entry(dir.clone())
            .or_default()
            .push(self.next_job);
        self.park_jobs.insert(self.next_job, (dir, deadline, job));
    }

    /// Run the parked job `id` now.
    fn release_job(&mut self, id: u64) {
        let Some((dir, _, job)) = self.park_jobs.remove(&id) else {
            return;
        };
        if let Some(v) = self.dir_jobs.get_mut(&dir) {
            v.retain(|x| *x != id);
            if v.is_empty() {
                self.dir_jobs.remove(&dir);
            }
        }
        self.unwatch(&dir);
        self.engine.run(Pool::Fast, job);
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
        // The inotify watch stays: the follower's next long-poll parks on the same directory
        // (a new watch would cost a re-check of that request; see `done`).
        let job = c.job.clone();
        self.unwatch(&dir);
        let (svc, req) = job?;
        Some((svc, req, deadline))
    }

    fn wake(&mut self, dir: &Path) {
        for id in self.dir_jobs.get(dir).cloned().unwrap_or_default() {
            self.release_job(id);
        }
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
        while self.timers.peek().is_some_and(|t| t.0 .0 <= now) {
            let Some(std::cmp::Reverse((_, id))) = self.timers.pop() else {
                break;
            };
            if let Some((pool, job)) = self.timer_jobs.remove(&id) {
                self.engine.run(pool, job);
            }
        }
        let due_jobs: Vec<u64> = self
            .park_jobs
            .iter()
            .filter(|(_, p)| p.1 <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due_jobs {
            self.release_job(id);
        }
        self.client_timers(now);
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
            c.site.stats.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The connection limit in force: the setting, but never more than half the process's open-file
/// limit, so that a flood of connections meets our limit (a 503) before the process runs out
/// of file descriptors (which would also break the host application's own files).
pub fn effective_max(setting: usize) -> usize {
    let soft = crate::sys::open_file_limit().unwrap_or(u64::MAX);
    setting.min((soft / 2).max(8) as usize)
}

/// The answer to a connection over the limit: written once, without waiting, then closed.
pub(super) fn refuse_full(mut sock: TcpStream) {
    let body = br#"{"error":"too many connections to this server; retry later"}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut all = head.into_bytes();
    all.extend_from_slice(body);
    let _ = sock.write(&all);
}

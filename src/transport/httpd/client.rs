//! The engine's HTTP/1.1 client (issue 18: thousands of followers per process). A `Client` is
//! one keep-alive connection to one `host:port` (plain or TLS), made on first use and remade
//! after a close or an error, carrying one request at a time. The event loop connects
//! without blocking, writes the request, reads the response head (at most `MAX_HEAD_BYTES`,
//! `MAX_HEADERS`) and a Content-Length body (at most the request's `max_body`), then runs the
//! request's callback on a fast worker. Nothing here holds a thread while it waits: 200
//! followers are 200 sockets in the one loop.
//!
//! Bounds: connecting takes at most `CONNECT_TIMEOUT` (per address tried); the whole request
//! at most its `deadline`. A request sent on a reused connection that the server closed
//! before answering a single byte (its idle timeout raced our request) is sent once more on a
//! new connection, as ureq does for idempotent requests; every other failure is the callback's
//! `Err`. A new request on a client whose previous one is still in flight abandons the old one
//! (its callback is dropped, never run) and starts on a fresh connection; so does `cancel`.

use super::*;

/// Connect timeout per address (like the blocking client's).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest response head accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most response headers accepted.
pub const MAX_HEADERS: usize = 64;
/// How often the loop looks for requests past their deadline (or connections past the connect
/// timeout). The limits are seconds, so a sweep every 100 ms instead of a look at every client
/// at every turn of the loop keeps the loop's cost per event independent of the number of
/// followers; a timeout fires up to this much late.
pub const SWEEP: Duration = Duration::from_millis(100);

/// Where a client connects.
#[derive(Clone)]
pub struct Target {
    /// Host name or IP address (sent as `Host` and as the TLS server name).
    pub host: String,
    pub port: u16,
    /// TLS configuration for `https`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// The target of `http(s)://host[:port]` (no path, no query); None when it is not one.
    pub fn parse(base: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Option<Target> {
        let (https, rest) = if let Some(r) = base.strip_prefix("https://") {
            (true, r)
        } else {
            (false, base.strip_prefix("http://")?)
        };
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, tail) = r.split_once(']')?;
            let port = match tail.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if tail.is_empty() => default_port,
                None => return None,
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() || (https && tls.is_none()) {
            return None;
        }
        Some(Target {
            host,
            port,
            tls: if https { tls } else { None },
        })
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{h}:{}", self.port)
    }
}

/// One GET.
pub struct GetRequest {
    /// The request target (`/v1/log?from=…`).
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The whole request (connect, send, answer) must be done by then.
    pub deadline: Instant,
    /// Larger bodies are refused (the connection is closed without reading them).
    pub max_body: u64,
}

/// A complete response.
#[derive(Debug)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What runs (on a fast worker) when a request ends: the response, or why there is none.
pub type Callback = Box<dyn FnOnce(Result<ClientResponse, String>) + Send>;

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// One keep-alive connection to a target, for one request at a time.
pub struct Client {
    id: u64,
    target: Target,
    /// Resolved on the first request's thread; forgotten after a failed request (the name
    /// may point elsewhere now).
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
}

pub(super) struct Submit {
    target: Target,
    addrs: Vec<SocketAddr>,
    req: GetRequest,
    done: Callback,
}

impl Client {
    pub fn new(target: Target) -> Client {
        Client {
            id: NEXT_CLIENT.fetch_add(1, Ordering::Relaxed),
            target,
            addrs: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Send `req`; `done` runs on a fast worker with the answer (or the error). A request
    /// of this client still in flight is abandoned: its callback is dropped without running.
    pub fn get(&self, req: GetRequest, done: Callback) {
        let e = match engine() {
            Ok(e) => e,
            Err(err) => return done(Err(format!("the HTTP engine did not start: {err}"))),
        };
        let addrs = {
            let mut a = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
            if a.is_empty() {
                use std::net::ToSocketAddrs;
                // getaddrinfo blocks: it runs here, on the caller's thread, not in the loop.
                match (self.target.host.as_str(), self.target.port).to_socket_addrs() {
                    Ok(v) => *a = v.collect(),
                    Err(err) => {
                        return done(Err(format!("cannot resolve {}: {err}", self.target.host)))
                    }
                }
            }
            a.clone()
        };
        if addrs.is_empty() {
            return done(Err(format!("{} has no address", self.target.host)));
        }
        let cache = self.addrs.clone();
        let done: Callback = Box::new(move |r| {
            if r.is_err() {
                cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            done(r)
        });
        e.post(Cmd::ClientGet(
            self.id,
            Box::new(Submit {
                target: self.target.clone(),
                addrs,
                req,
                done,
            }),
        ));
    }

    /// Abandon the request in flight, if any (its callback is dropped without running), and
    /// close the connection.
    pub fn cancel(&self) {
        if let Some(e) = ENGINE.get() {
            e.post(Cmd::ClientClose(self.id));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.cancel();
    }
}

// ------------------------------------------------------------------ the loop's side

/// A request being carried out.
struct InFlight {
    req: GetRequest,
    done: Callback,
    /// Sent once more after a reused connection closed before answering.
    retried: bool,
    /// Response bytes received for this request.
    got: usize,
    /// The response head, once parsed.
    head: Option<Head>,
}

/// A parsed response head.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    len: usize,
    body_len: usize,
    /// The server ends the connection after this answer.
    close: bool,
}

/// The loop's state of one `Client`.
pub(super) struct ClientConn {
    target: Target,
    addrs: Vec<SocketAddr>,
    addr_i: usize,
    sock: Option<TcpStream>,
    token: Option<Token>,
    tls: Option<Box<rustls::ClientConnection>>,
    connected: bool,
    connect_deadline: Option<Instant>,
    /// The connection answered a request before (a close before any answer may be a race
    /// with the server's idle timeout).
    reused: bool,
    req: Option<InFlight>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
}

impl ClientConn {
    pub(super) fn deadline(&self) -> Option<Instant> {
        let req = self.req.as_ref().map(|r| r.req.deadline);
        match (req, self.connect_deadline.filter(|_| !self.connected)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

enum Progress {
    Wait,
    Done(ClientResponse, bool),
    Failed(String),
    /// The server closed a reused connection before answering: send again on a new one.
    Retry,
}

impl Loop {
    pub(super) fn client_get(&mut self, id: u64, s: Submit) {
        let Submit {
            target,
            addrs,
            req,
            done,
        } = s;
        let c = self.clients.entry(id).or_insert_with(|| ClientConn {
            target,
            addrs: Vec::new(),
            addr_i: 0,
            sock: None,
            token: None,
            tls: None,
            connected: false,
            connect_deadline: None,
            reused: false,
            req: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
        });
        c.addrs = addrs;
        let abandoned = c.req.is_some();
        c.req = Some(InFlight {
            req,
            done,
            retried: false,
            got: 0,
            head: None,
        });
        if abandoned || !c.inbuf.is_empty() {
            // The stream is out of step with our requests: start over.
            self.client_disconnect(id);
        }
        if self.client_sweep.is_none() {
            self.client_sweep = Some(Instant::now() + SWEEP);
        }
        self.client_start(id);
    }

    /// Queue the request bytes and connect if needed.
    fn client_start(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(r) = &c.req else { return };
        let mut head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sqlite-replica/{}\r\nAccept: */*\r\n",
            r.req.path,
            c.target.host_header(),
            env!("CARGO_PKG_VERSION")
        );
        for (k, v) in &r.req.headers {
            if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
                continue;
            }
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        c.out = head.into_bytes();
        c.out_pos = 0;
        c.inbuf.clear();
        if c.sock.is_none() {
            c.addr_i = 0;
            self.client_connect(id);
        } else {
            self.client_drive(id, false);
        }
    }

    fn client_connect(&mut self, id: u64) {
        loop {
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            let Some(addr) = c.addrs.get(c.addr_i).copied() else {
                let msg = format!("cannot connect to {}", c.target.host_header());
                return self.client_fail(id, msg);
            };
            let tls = match &c.target.tls {
                Some(cfg) => {
                    let name = match rustls::pki_types::ServerName::try_from(c.target.host.clone())
                    {
                        Ok(n) => n,
                        Err(e) => {
                            let msg = format!("{}: not a TLS server name: {e}", c.target.host);
                            return self.client_fail(id, msg);
                        }
                    };
                    match rustls::ClientConnection::new(cfg.clone(), name) {
                        Ok(t) => Some(Box::new(t)),
                        Err(e) => return self.client_fail(id, format!("TLS setup: {e}")),
                    }
                }
                None => None,
            };
            match TcpStream::connect(addr) {
                Ok(mut sock) => {
                    self.next += 1;
                    let t = Token(self.next);
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        t,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        return self.client_fail(id, format!("cannot watch a socket: {e}"));
                    }
                    let c = self.clients.get_mut(&id).expect("checked above");
                    c.sock = Some(sock);
                    c.token = Some(t);
                    c.tls = tls;
                    c.connected = false;
                    c.reused = false;
                    c.connect_deadline = Some(Instant::now() + CONNECT_TIMEOUT);
                    self.client_tokens.insert(t, id);
                    return;
                }
                Err(e) => {
                    let c = self.clients.get_mut(&id).expect("checked above");
                    c.addr_i += 1;
                    if c.addr_i >= c.addrs.len() {
                        let msg = format!("connecting to {addr}: {e}");
                        return self.client_fail(id, msg);
                    }
                }
            }
        }
    }

    /// Close the connection (the request in flight, if any, stays).
    fn client_disconnect(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        if let Some(t) = c.token.take() {
            self.client_tokens.remove(&t);
        }
        c.tls = None;
        c.connected = false;
        c.connect_deadline = None;
        c.reused = false;
        c.inbuf.clear();
    }

    /// End the request in flight with an error and close the connection.
    fn client_fail(&mut self, id: u64, msg: String) {
        self.client_disconnect(id);
        if let Some(r) = self.clients.get_mut(&id).and_then(|c| c.req.take()) {
            let done = r.done;
            self.engine
                .run(Pool::Fast, Box::new(move || done(Err(msg))));
        }
    }

    /// `Client` dropped or cancelled: forget the connection and the request in flight.
    pub(super) fn client_close(&mut self, id: u64) {
        self.client_disconnect(id);
        self.clients.remove(&id);
    }

    pub(super) fn client_event(&mut self, t: Token, closed: bool) {
        let Some(id) = self.client_tokens.get(&t).copied() else {
            return;
        };
        self.client_drive(id, closed);
    }

    pub(super) fn client_drive(&mut self, id: u64, _closed: bool) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.sock.is_none() {
            return;
        }
        if !c.connected {
            let sock = c.sock.as_ref().expect("checked");
            let err = match sock.take_error() {
                Ok(Some(e)) | Err(e) => Some(e),
                Ok(None) => None,
            };
            let failed = match err {
                Some(e) => Some(e.to_string()),
                None => match sock.peer_addr() {
                    Ok(_) => None,
                    Err(e)
                        if e.kind() == ErrorKind::NotConnected
                            || e.raw_os_error() == Some(libc::EINPROGRESS) =>
                    {
                        return; // still connecting
                    }
                    Err(e) => Some(e.to_string()),
                },
            };
            if let Some(why) = failed {
                let addr = c.addrs.get(c.addr_i).copied();
                self.client_disconnect(id);
                let c = self.clients.get_mut(&id).expect("checked");
                c.addr_i += 1;
                if c.addr_i < c.addrs.len() {
                    return self.client_connect(id);
                }
                let msg = match addr {
                    Some(a) => format!("connecting to {a}: {why}"),
                    None => why,
                };
                return self.client_fail(id, msg);
            }
            c.connected = true;
            c.connect_deadline = None;
            let _ = c.sock.as_ref().expect("checked").set_nodelay(true);
        }
        let progress = c.step();
        match progress {
            Progress::Wait => {}
            Progress::Failed(msg) => self.client_fail(id, msg),
            Progress::Retry => {
                self.client_disconnect(id);
                if let Some(r) = self.clients.get_mut(&id).and_then(|c| c.req.as_mut()) {
                    r.retried = true;
                    r.got = 0;
                    r.head = None;
                }
                self.client_start(id);
            }
            Progress::Done(resp, close) => {
                let c = self.clients.get_mut(&id).expect("checked");
                let r = c.req.take().expect("a request was in flight");
                c.reused = true;
                if close {
                    self.client_disconnect(id);
                }
                let done = r.done;
                self.engine
                    .run(Pool::Fast, Box::new(move || done(Ok(resp))));
            }
        }
    }

    /// Requests past their deadline (or connections past the connect timeout) fail; runs
    /// every `SWEEP` while any request is in flight.
    pub(super) fn client_timers(&mut self, now: Instant) {
        if self.client_sweep.is_none_or(|t| t > now) {
            return;
        }
        self.client_sweep_once(now);
        self.client_sweep = self
            .clients
            .values()
            .any(|c| c.deadline().is_some())
            .then_some(now + SWEEP);
    }

    fn client_sweep_once(&mut self, now: Instant) {
        let late: Vec<(u64, bool)> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(id, c)| (*id, c.req.is_some()))
            .collect();
        for (id, busy) in late {
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            if !c.connected && c.connect_deadline.is_some_and(|d| d <= now) {
                // Try the next address, if any.
                let addr = c.addrs.get(c.addr_i).copied();
                self.client_disconnect(id);
                let c = self.clients.get_mut(&id).expect("checked");
                c.addr_i += 1;
                if c.addr_i < c.addrs.len() && busy {
                    self.client_connect(id);
                    continue;
                }
                let msg = format!(
                    "connecting to {} timed out after {} s",
                    addr.map_or_else(|| c.target.host_header(), |a| a.to_string()),
                    CONNECT_TIMEOUT.as_secs()
                );
                self.client_fail(id, msg);
            } else {
                self.client_fail(id, "the request timed out".into());
            }
        }
    }
}

impl ClientConn {
    /// Write what is pending, read what arrived, and say where the request stands.
    fn step(&mut self) -> Progress {
        if let Err(e) = self.write_pending() {
            return self.broke(e);
        }
        let mut buf = [0u8; 16 * 1024];
        let mut eof = false;
        loop {
            // Never read past what the request may hold (head + its body limit).
            match self.read_some(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    if self.req.is_none() {
                        // Bytes nobody asked for: the stream is out of step.
                        return Progress::Failed("the server sent an unexpected answer".into());
                    }
                    self.inbuf.extend_from_slice(&buf[..n]);
                    if let Some(r) = &mut self.req {
                        r.got += n;
                    }
                    match self.parse() {
                        Progress::Wait => {}
                        other => return other,
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.broke(e),
            }
        }
        if eof {
            return self.closed();
        }
        Progress::Wait
    }

    fn broke(&mut self, e: std::io::Error) -> Progress {
        match &self.req {
            Some(r) if r.got == 0 && self.reused && !r.retried => Progress::Retry,
            Some(_) => Progress::Failed(format!("the connection broke: {e}")),
            None => Progress::Failed(String::new()),
        }
    }

    fn closed(&mut self) -> Progress {
        match &self.req {
            Some(r) if r.got == 0 && self.reused && !r.retried => Progress::Retry,
            Some(_) => Progress::Failed(
                "the server closed the connection before the answer was complete".into(),
            ),
            // An idle keep-alive connection the server closed: forget it quietly.
            None => Progress::Failed(String::new()),
        }
    }

    fn parse(&mut self) -> Progress {
        let Some(r) = &mut self.req else {
            return Progress::Wait;
        };
        if r.head.is_none() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.inbuf) {
                Ok(httparse::Status::Partial) => {
                    if self.inbuf.len() > MAX_HEAD_BYTES {
                        return Progress::Failed(format!(
                            "the response head is over {MAX_HEAD_BYTES} bytes"
                        ));
                    }
                    return Progress::Wait;
                }
                Err(e) => return Progress::Failed(format!("malformed response: {e}")),
                Ok(httparse::Status::Complete(head_len)) => {
                    if head_len > MAX_HEAD_BYTES {
                        return Progress::Failed(format!(
                            "the response head is over {MAX_HEAD_BYTES} bytes"
                        ));
                    }
                    let status = resp.code.unwrap_or(0);
                    let version = resp.version.unwrap_or(1);
                    let mut hs = Vec::with_capacity(resp.headers.len());
                    for h in resp.headers.iter() {
                        let v = String::from_utf8_lossy(h.value).trim().to_string();
                        hs.push((h.name.to_string(), v));
                    }
                    if (100..200).contains(&status) {
                        // An interim answer (100 Continue): skip it.
                        self.inbuf.drain(..head_len);
                        return self.parse();
                    }
                    let all = |n: &str| {
                        hs.iter()
                            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                            .map(|(_, v)| v.as_str())
                            .collect::<Vec<_>>()
                    };
                    if !all("transfer-encoding").is_empty() {
                        return Progress::Failed(
                            "chunked responses are not supported (the server sends Content-Length)"
                                .into(),
                        );
                    }
                    let body_len = match all("content-length").as_slice() {
                        [one] => match one.parse::<u64>() {
                            Ok(n) => n,
                            Err(_) => return Progress::Failed("bad Content-Length".into()),
                        },
                        [] if status == 204 || status == 304 => 0,
                        _ => {
                            return Progress::Failed(
                                "the response has no single Content-Length".into(),
                            )
                        }
                    };
                    if body_len > r.req.max_body {
                        return Progress::Failed(format!(
                            "the response body of {body_len} bytes is over the limit of {} bytes",
                            r.req.max_body
                        ));
                    }
                    let conn = all("connection").join(",").to_ascii_lowercase();
                    let close = if version == 0 {
                        !conn.contains("keep-alive")
                    } else {
                        conn.contains("close")
                    };
                    self.inbuf.reserve((body_len as usize).min(64 << 20));
                    r.head = Some(Head {
                        status,
                        headers: hs,
                        len: head_len,
                        body_len: body_len as usize,
                        close,
                    });
                }
            }
        }
        let h = r.head.as_ref().expect("parsed above");
        let (head_len, body_len) = (h.len, h.body_len);
        if self.inbuf.len() < head_len + body_len {
            return Progress::Wait;
        }
        if self.inbuf.len() > head_len + body_len {
            return Progress::Failed("the server sent more than its Content-Length".into());
        }
        let Head {
            status,
            headers,
            close,
            ..
        } = r.head.take().expect("parsed above");
        let body = self.inbuf.split_off(head_len);
        self.inbuf.clear();
        Progress::Done(
            ClientResponse {
                status,
                headers,
                body,
            },
            close,
        )
    }

    /// One read of response bytes (plaintext after TLS).
    fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let sock = self.sock.as_mut().expect("connected");
        let Some(tls) = &mut self.tls else {
            return sock.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match tls.read_tls(sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            let state = tls.process_new_packets();
            while tls.wants_write() {
                match tls.write_tls(sock) {
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

    /// Write the request (through TLS when it is one), as far as the socket takes it.
    fn write_pending(&mut self) -> std::io::Result<()> {
        let sock = self.sock.as_mut().expect("connected");
        match &mut self.tls {
            None => {
                while self.out_pos < self.out.len() {
                    match sock.write(&self.out[self.out_pos..]) {
                        Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
                        Ok(n) => self.out_pos += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Some(tls) => {
                if self.out_pos < self.out.len() {
                    // rustls keeps the plaintext until the handshake is done.
                    tls.writer().write_all(&self.out[self.out_pos..])?;
                    self.out_pos = self.out.len();
                }
                while tls.wants_write() {
                    match tls.write_tls(sock) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("http://127.0.0.1:7070", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 7070));
        assert_eq!(t.host_header(), "127.0.0.1:7070");
        let t = Target::parse("http://h", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("h", 80));
        let t = Target::parse("http://[::1]:9", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert_eq!(t.host_header(), "[::1]:9");
        assert!(
            Target::parse("https://h:1", None).is_none(),
            "https needs TLS"
        );
        assert!(Target::parse("ftp://h:1", None).is_none());
        assert!(Target::parse("http://h:x", None).is_none());
    }

    /// A scripted HTTP server on a blocking socket: for each accepted connection, answers each
    /// request head with the next canned response; `None` closes the connection instead.
    fn server(script: Vec<Vec<Option<Vec<u8>>>>) -> (u16, std::thread::JoinHandle<usize>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let mut accepted = 0;
            for conn in script {
                let (mut s, _) = l.accept().unwrap();
                accepted += 1;
                for answer in conn {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).unwrap_or(0) == 0 {
                            break;
                        }
                        head.push(b[0]);
                    }
                    match answer {
                        Some(a) => s.write_all(&a).unwrap(),
                        None => break,
                    }
                }
            }
            accepted
        });
        (port, h)
    }

    fn ok(body: &str) -> Option<Vec<u8>> {
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Test: yes\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }

    fn get(c: &Client, max_body: u64) -> Result<ClientResponse, String> {
        let (tx, rx) = mpsc::channel();
        c.get(
            GetRequest {
                path: "/x".into(),
                headers: vec![("X-Repl-Follower".into(), "t".into())],
                deadline: Instant::now() + Duration::from_secs(10),
                max_body,
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the callback ran")
    }

    #[test]
    fn keeps_the_connection_and_retries_once_after_a_close_race() {
        // Connection 1: two answers, then closed by the server before the third request is
        // answered (an idle timeout racing the request); connection 2 answers it.
        let (port, h) = server(vec![vec![ok("one"), ok("two"), None], vec![ok("three")]]);
        let c = Client::new(Target::parse(&format!("http://127.0.0.1:{port}"), None).unwrap());
        let r = get(&c, 100).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"one".as_slice()));
        assert_eq!(r.header("x-test"), Some("yes"));
        assert_eq!(get(&c, 100).unwrap().body, b"two");
        assert_eq!(get(&c, 100).unwrap().body, b"three");
        drop(c);
        assert_eq!(
            h.join().unwrap(),
            2,
            "one reused connection, one after the close"
        );
    }

    #[test]
    fn a_request_past_its_deadline_fails() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        // Accepts, never answers, until told to stop.
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let _ = stop_rx.recv();
            drop(s);
        });
        let c = Client::new(Target::parse(&format!("http://127.0.0.1:{port}"), None).unwrap());
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        c.get(
            GetRequest {
                path: "/x".into(),
                headers: Vec::new(),
                deadline: Instant::now() + Duration::from_millis(300),
                max_body: 10,
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let e = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the callback ran")
            .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        let _ = stop_tx.send(());
        h.join().unwrap();
    }

    #[test]
    fn refuses_large_bodies_and_reports_refused_connections() {
        let (port, h) = server(vec![vec![ok("0123456789")]]);
        let c = Client::new(Target::parse(&format!("http://127.0.0.1:{port}"), None).unwrap());
        let e = get(&c, 5).unwrap_err();
        assert!(e.contains("over the limit"), "{e}");
        h.join().unwrap();
        // Nobody listens there any more.
        let e = get(&c, 5).unwrap_err();
        assert!(e.contains("connecting to 127.0.0.1"), "{e}");
    }
}

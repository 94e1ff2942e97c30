//! One HTTP connection of the engine: reading a request head and body within the limits,
//! writing a reply (head, then the body streamed from memory or a file range), plain or TLS.

use super::*;

#[derive(PartialEq, Eq, Debug, Clone, Copy)]
pub(super) enum State {
    Head,
    Body { need: usize },
    Busy,
    Parked,
    Writing,
}

pub(super) struct Conn {
    pub(super) sock: TcpStream,
    pub(super) tls: Option<Box<rustls::ServerConnection>>,
    pub(super) site: Arc<Site>,
    pub(super) peer: Option<SocketAddr>,
    pub(super) state: State,
    pub(super) inbuf: Vec<u8>,
    /// Bytes of the current request head (when reading the body).
    pub(super) head_len: usize,
    pub(super) pending: Option<Pending>,
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    pub(super) body: Option<Body>,
    pub(super) body_pos: u64,
    pub(super) keep_alive: bool,
    pub(super) deadline: Option<Instant>,
    /// Bumped for every dispatch, so a late worker answer for an old request is dropped.
    pub(super) gen: u64,
    /// `WAKE_SEQ` when the current request was dispatched.
    pub(super) wake_seq: u64,
    pub(super) job: Option<(Arc<dyn Service>, Arc<Request>)>,
    pub(super) park: Option<(PathBuf, Instant)>,
    /// Requests answered on this connection (0: a candidate for eviction when full).
    pub(super) served: u64,
    pub(super) opened: Instant,
}

pub(super) struct Pending {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) keep_alive: bool,
}

pub(super) enum Step {
    Wait,
    Again,
    Close,
    Dispatch(Arc<dyn Service>, Arc<Request>),
}

impl Conn {
    /// Read what the socket has (plaintext after TLS) into `inbuf`, at most `room` bytes more.
    /// Ok(false) at end of stream.
    pub(super) fn fill(&mut self, room: usize) -> std::io::Result<bool> {
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
    pub(super) fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
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

    pub(super) fn flush_tls(&mut self) -> std::io::Result<()> {
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

    pub(super) fn read_request(&mut self) -> Step {
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

    pub(super) fn parse_head(&self) -> HeadParse {
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
                        keep_alive,
                    },
                }
            }
        }
    }

    /// Answer an error and close (the request stream may be out of step).
    pub(super) fn fail(&mut self, status: u16, msg: &str) -> Step {
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

    pub(super) fn start_reply(&mut self, r: Reply) {
        let method = self
            .job
            .as_ref()
            .map_or("GET".to_string(), |(_, q)| q.method.clone());
        self.start_reply_for(r, &method);
    }

    pub(super) fn start_reply_for(&mut self, r: Reply, method: &str) {
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
    pub(super) fn write_out(&mut self) -> std::io::Result<bool> {
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

    pub(super) fn write_reply(&mut self) -> Step {
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

pub(super) enum HeadParse {
    Partial,
    TooManyHeaders,
    Bad(String),
    Done {
        head_len: usize,
        body_len: u64,
        pending: Pending,
    },
}

pub(super) fn reason(status: u16) -> &'static str {
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

"""A small fault-injecting TCP proxy for the HTTP transport tests (test_http_faults.py).

``FaultProxy(port)`` listens on 127.0.0.1:<ephemeral> and forwards every connection to
127.0.0.1:``port`` (the primary's log server). Requests go upstream as they are; responses are
parsed as they stream back (status line, headers, a ``Content-Length`` body — HTTP/1.1
keep-alive included, ureq reuses connections), so a fault can be aimed at one kind of response
and at a precise byte of its body. The behaviour is switched at runtime from the test:

* ``pass_()``          forward everything (the default)
* ``drop_after(n)``    after ``n`` body bytes of a matching response, reset both sides (RST,
                       like a peer that died: the client sees a reset, not a clean close)
* ``truncate(keep)``   forward the headers (with the original Content-Length) and ``keep``
                       body bytes (default: half the body), then close cleanly (FIN): a body
                       that ends early
* ``flip(offset)``     XOR one byte of a matching body with 0xFF at ``offset`` (taken modulo
                       the body length), forward everything else: a connection that stays up
                       and delivers bad bytes
* ``stall(seconds)``   hold every response byte (of any response) for ``seconds`` from now,
                       then forward again; connections are still accepted
* ``refuse()``         close new connections at once and the open ones at their next response
* ``throttle(bps)``    forward every response body at about ``bps`` bytes per second (a slow
                       link, so a test can act in the middle of a transfer); ``throttle(None)``
                       lifts it. Independent of the modes above

Matching responses (drop/truncate/flip): ``GET /v1/log`` answered 200 with ``X-Repl-Records``
> 0 and a non-empty body, i.e. responses that carry records; with ``snapshots = True`` also
``GET /v1/snapshot`` answered 200 or 206 (a range) with a body. ``count`` limits a fault to the
next N matching responses (then the proxy goes back to pass by itself); ``None`` faults every
matching response until the mode is switched.

``faults`` counts what was actually injected, per kind (a response cut, a byte flipped, a
response held — counted when the hold starts —, a connection refused), so a test can assert a
fault really happened. ``responses`` counts responses forwarded intact, by path; ``unframed``
counts responses without Content-Length (chunked ones are forwarded as they are, never
faulted: the log server promises Content-Length framing, so a test asserts it stays 0).
``body_bytes`` counts the body bytes sent to clients, by path (cut responses included), so a
test can tell how much a resumed download transferred. ``log`` keeps the last events for
failure messages.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time

MATCH_KINDS = ("drop", "truncate", "flip")


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.snapshots = False
        self._lock = threading.Lock()
        self._mode = "pass"
        self._arg: float | int | None = None
        self._remaining: int | None = None
        self._stall_until = 0.0
        self._stall_path = "/"
        self.faults: collections.Counter[str] = collections.Counter()
        self.responses: collections.Counter[str] = collections.Counter()  # forwarded, by path
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.unframed = 0  # responses without Content-Length (chunked): forwarded as they are
        self.body_bytes: collections.Counter[str] = collections.Counter()  # sent, by path
        self.rate: float | None = None  # throttle: body bytes per second
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ switching modes

    def _set(self, mode: str, arg: float | int | None = None, count: int | None = None) -> None:
        with self._lock:
            self._mode, self._arg, self._remaining = mode, arg, count
            self.log.append(f"mode {mode} arg={arg} count={count}")

    def pass_(self) -> None:
        with self._lock:
            self._stall_until = 0.0
        self._set("pass")

    def drop_after(self, n: int, count: int | None = None) -> None:
        self._set("drop", n, count)

    def truncate(self, keep: int | None = None, count: int | None = None) -> None:
        self._set("truncate", keep, count)

    def flip(self, offset: int, count: int | None = None) -> None:
        self._set("flip", offset, count)

    def stall(self, seconds: float, path: str = "/") -> None:
        """Hold responses to requests whose path starts with ``path`` (default: all)."""
        with self._lock:
            self._stall_until = time.monotonic() + seconds
            self._stall_path = path
        self._set("stall", seconds)

    def throttle(self, bps: float | None) -> None:
        self.rate = bps

    def _send_body(self, client: socket.socket, path: str, body: bytes) -> None:
        """Sends a body (counted in ``body_bytes``), at ``rate`` bytes/s when throttled."""
        step = 256 * 1024
        for i in range(0, len(body), step):
            part = body[i : i + step]
            client.sendall(part)
            with self._lock:
                self.body_bytes[path.split("?")[0]] += len(part)
            if self.rate:
                time.sleep(len(part) / self.rate)  # rate limiting, not synchronisation

    def refuse(self) -> None:
        self._set("refuse")

    @property
    def mode(self) -> str:
        with self._lock:
            if self._mode == "stall" and time.monotonic() >= self._stall_until:
                return "pass"
            return self._mode

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)
        for s in conns:
            _kill(s)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _count(self, kind: str, what: str) -> None:
        with self._lock:
            self.faults[kind] += 1
            self.log.append(f"fault {kind}: {what}")

    def _claim(self, path: str, status: int, records: int, length: int) -> tuple[str, float | int | None]:
        """The fault to apply to this response (and consume one of ``count``)."""
        with self._lock:
            mode = self._mode
            if mode not in MATCH_KINDS:
                return "pass", None
            log = path.startswith("/v1/log") and records > 0
            snap = self.snapshots and path.startswith("/v1/snapshot")
            if not ((log or snap) and status in (200, 206 if snap else 200) and length > 0):
                return "pass", None
            arg = self._arg
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._mode, self._arg, self._remaining = "pass", None, None
            return mode, arg

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.mode == "refuse":
                self._count("refuse", "new connection reset")
                _reset(client)
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError as e:
                with self._lock:
                    self.log.append(f"upstream connect failed: {e}")
                _kill(client)  # like the primary itself refusing
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    _kill(client)
                    _kill(up)
                    return
                self._conns.update((client, up))
            paths: collections.deque[str] = collections.deque()
            ready = threading.Condition()
            threading.Thread(target=self._requests, args=(client, up, paths, ready), daemon=True).start()
            threading.Thread(target=self._responses, args=(client, up, paths, ready), daemon=True).start()

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)
        for s in socks:
            _kill(s)

    def _requests(self, client: socket.socket, up: socket.socket, paths: collections.deque, ready: threading.Condition) -> None:
        """client -> upstream, as is; notes each request's path (GETs: no bodies) for the
        response pump. A path is queued before its bytes go upstream, so it is always known
        when the response starts."""
        buf = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    up.shutdown(socket.SHUT_WR)
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    parts = head.split(b"\r\n", 1)[0].split(b" ")
                    path = parts[1].decode("latin-1") if len(parts) > 1 else "?"
                    with ready:
                        paths.append(path)
                        ready.notify_all()
                up.sendall(data)
        except OSError:
            self._forget(client, up)

    @staticmethod
    def _forward_chunked(up: socket.socket, client: socket.socket, buf: bytes) -> bytes:
        """Forward one chunked body (chunks, the last chunk, trailers) as it is; returns the
        bytes read past it."""

        def fill(enough) -> None:
            nonlocal buf
            while not enough():
                data = up.recv(65536)
                if not data:
                    raise OSError("upstream closed inside a chunked body")
                buf += data

        while True:
            fill(lambda: b"\r\n" in buf)
            i = buf.index(b"\r\n") + 2
            size = int(buf[: i - 2].split(b";")[0].strip() or b"0", 16)
            if size == 0:  # the last chunk, then trailer lines up to an empty one
                client.sendall(buf[:i])
                buf = buf[i:]
                while True:
                    fill(lambda: b"\r\n" in buf)
                    j = buf.index(b"\r\n") + 2
                    client.sendall(buf[:j])
                    buf = buf[j:]
                    if j == 2:
                        return buf
            n = i + size + 2
            fill(lambda: len(buf) >= n)
            client.sendall(buf[:n])
            buf = buf[n:]

    def _hold(self, path: str) -> None:
        """Wait out a stall (counted when the hold starts, so a test sees it while it lasts)."""
        held = False
        while True:
            with self._lock:
                stalled = self._mode == "stall" and path.startswith(self._stall_path)
                left = self._stall_until - time.monotonic() if stalled else 0
            if left <= 0:
                return
            if not held:
                held = True
                self._count("stall", f"holding the response to {path} for {left:.2f} s")
            time.sleep(min(left, 0.02))

    def _responses(self, client: socket.socket, up: socket.socket, paths: collections.deque, ready: threading.Condition) -> None:
        """upstream -> client, one parsed response at a time, faults applied."""
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = up.recv(65536)
                    if not data:
                        if buf:
                            client.sendall(buf)
                        client.shutdown(socket.SHUT_WR)
                        self._forget(client, up)
                        return
                    buf += data
                raw_head, buf = buf.split(b"\r\n\r\n", 1)
                head = raw_head + b"\r\n\r\n"
                lines = raw_head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ")[1]) if len(lines[0].split(" ")) > 1 else 0
                hdrs = {}
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    hdrs[k.strip().lower()] = v.strip()
                with ready:
                    ready.wait_for(lambda: paths, timeout=5)
                    path = paths.popleft() if paths else "?"
                if "content-length" not in hdrs:
                    # A chunked (or unframed) response: forwarded untouched, no fault aimed at
                    # it, but counted: the log server promises Content-Length framing.
                    with self._lock:
                        self.unframed += 1
                        self.log.append(f"unframed response to {path}: {hdrs.get('transfer-encoding')}")
                    client.sendall(head)
                    if hdrs.get("transfer-encoding", "").lower() != "chunked":
                        while data := up.recv(65536):  # framed by the close
                            client.sendall(data)
                        client.shutdown(socket.SHUT_WR)
                        self._forget(client, up)
                        return
                    buf = self._forward_chunked(up, client, buf)
                    continue
                length = int(hdrs["content-length"])
                records = int(hdrs.get("x-repl-records", "0") or 0)
                if self.mode == "refuse":
                    self._count("refuse", f"open connection closed at a response to {path}")
                    self._forget(client, up)
                    return
                self._hold(path)
                kind, arg = self._claim(path, status, records, length)
                chunks, have = [buf], len(buf)  # joined once: large bodies stay linear
                while have < length:
                    data = up.recv(1 << 20)
                    if not data:
                        break  # the server cut it short itself: pass that on
                    chunks.append(data)
                    have += len(data)
                buf = b"".join(chunks)
                body, buf = buf[:length], buf[length:]
                if kind == "drop":
                    n = min(int(arg), length - 1)
                    client.sendall(head)
                    self._send_body(client, path, body[:n])
                    self._count("drop", f"reset after {n} of {length} body bytes of {path}")
                    _reset(client)
                    self._forget(client, up)
                    return
                if kind == "truncate":
                    n = length // 2 if arg is None else min(int(arg), length - 1)
                    client.sendall(head)
                    self._send_body(client, path, body[:n])
                    self._count("truncate", f"closed after {n} of {length} body bytes of {path}")
                    client.shutdown(socket.SHUT_WR)
                    self._forget(client, up)
                    return
                if kind == "flip":
                    k = int(arg) % length
                    body = body[:k] + bytes([body[k] ^ 0xFF]) + body[k + 1 :]
                    self._count("flip", f"flipped body byte {k} of {length} of {path}")
                with self._lock:
                    self.responses[path.split("?")[0]] += 1
                client.sendall(head)
                self._send_body(client, path, body)
        except OSError:
            self._forget(client, up)


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): an abortive close, like a peer that vanished."""

    def abort() -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)  # wakes the other pump's recv() without sending a FIN

    _quietly(abort, s.close)


def _kill(s: socket.socket) -> None:
    _quietly(lambda: s.shutdown(socket.SHUT_RDWR), s.close)


def _quietly(*steps) -> None:
    """Run each step, ignoring OSError (the socket may already be gone)."""
    for step in steps:
        try:
            step()
        except OSError:
            pass

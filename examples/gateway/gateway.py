#!/usr/bin/env python3
"""An edge gateway next to a sqlite-replica database: read local, write to the primary, never
read stale after your own write.

One process, standard library only (http.server) plus apsw. A tiny REST resource:

    GET    /notes            the 100 newest notes       GET /notes/<id>   one note
    POST   /notes {"text"}   create                     PUT /notes/<id>   {"text"}: replace
    DELETE /notes/<id>

Two roles:

* ``--primary p.db --serve-log 127.0.0.1:0``: the gateway of the PRIMARY. It owns the primary
  database, serves its replication log over HTTP (``repl_primary(listen)``) and answers reads
  locally: the primary is never stale. Replica gateways send it the reads they promote.
* ``--replica r.db --source http://primary:port``: a gateway next to a REPLICA, which it keeps
  live with ``repl_follow()`` (or, with ``--no-follow``, only when a write or ``repl_wait`` pulls).
  Writes go through ``repl_exec_json()`` (forwarded to the primary, applied here before it
  returns); reads are local unless the session cookie says the replica is behind.

The session: every write answers with ``Set-Cookie: x-db-session-lsn=<LSN of the commit>``. A
GET carrying that cookie is served locally only once the replica holds that LSN; otherwise
``--strategy wait`` waits up to ``--wait-ms`` (``repl_wait``) and ``--strategy promote`` asks
the primary's gateway (``--primary-gateway``). A wait that times out falls back to the primary
when ``--primary-gateway`` is given, else answers 503 with Retry-After.

Every answer says how it was served: JSON ``route`` and ``latency_ms`` (also the headers
``x-route`` and ``x-latency-ms``). Routes: ``local`` (this database), ``local-after-wait``,
``primary`` (a write, or a promoted read), ``primary-after-wait`` (the wait timed out),
``none`` (rejected before touching a database). One key=value line per request on stderr.

When ready, prints one JSON line on stdout: {"ready": true, "url": ..., "role": ..., ...}.
SIGTERM or SIGINT stops it cleanly.
"""

from __future__ import annotations

import argparse
import http.client
import http.cookies
import json
import os
import queue
import re
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import apsw

COOKIE = "x-db-session-lsn"
MAX_BODY = 64 * 1024
MAX_TEXT = 10_000
NOTE_PATH = re.compile(r"^/notes/([0-9]{1,18})$")


def extension_path() -> str:
    """build/libreplica of this repository, or $REPLICA_EXT (SQLite appends the .so)."""
    return os.environ.get("REPLICA_EXT") or str(Path(__file__).resolve().parents[2] / "build" / "libreplica")


def load_extension() -> None:
    """Load once, through a throw-away connection, BEFORE opening the database: from then on
    every connection of this process goes through the extension's VFS and has repl_*."""
    boot = apsw.Connection(":memory:")
    boot.enable_load_extension(True)
    boot.load_extension(extension_path())
    boot.close()


def one(conn: apsw.Connection, sql: str, bindings: tuple = ()):
    for row in conn.execute(sql, bindings):
        return row[0]
    return None


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Pool:
    """Idle objects (database connections, HTTP connections to the primary's gateway) shared
    by the request threads: ThreadingHTTPServer starts one thread per client connection."""

    def __init__(self, make):
        self.make, self.idle = make, queue.SimpleQueue()

    def get(self):
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            return self.make()

    def put(self, item) -> None:
        self.idle.put(item)


class Gateway:
    def __init__(self, args: argparse.Namespace):
        self.role = "primary" if args.primary else "replica"
        self.db = args.primary or args.replica
        self.strategy, self.wait_ms = args.strategy, args.wait_ms
        self.upstream = urllib.parse.urlsplit(args.primary_gateway) if args.primary_gateway else None
        self.dbs = Pool(self._connect)
        self.upstreams = Pool(lambda: http.client.HTTPConnection(self.upstream.netloc, timeout=10))

    def _connect(self) -> apsw.Connection:
        conn = apsw.Connection(self.db)
        conn.setbusytimeout(5000)
        return conn

    # ------------------------------------------------------------------ reads

    def read(self, session_lsn: int | None, path: str, query):
        """Serve a GET: ``query(conn)`` returns (status, body). Returns (status, body, route)."""
        conn = self.dbs.get()
        try:
            lsn = one(conn, "SELECT repl_lsn()")
            # The primary is never behind; a replica that holds the session's LSN is fresh enough.
            if self.role == "primary" or session_lsn is None or session_lsn <= lsn:
                return (*query(conn), "local")
            if self.strategy == "wait":
                try:
                    one(conn, "SELECT repl_wait(?, ?)", (session_lsn, self.wait_ms))
                    return (*query(conn), "local-after-wait")
                except apsw.BusyError:  # timed out: the replica is still behind
                    if self.upstream is None:
                        raise HttpError(503, f"the replica did not reach LSN {session_lsn} within "
                                             f"{self.wait_ms} ms; retry", {"Retry-After": "1"})
                    route = "primary-after-wait"
            else:
                route = "primary"
        finally:
            self.dbs.put(conn)
        return (*self.from_primary(path), route)

    def from_primary(self, path: str) -> tuple[int, dict]:
        """The same GET, answered by the primary's gateway (which reads the primary locally)."""
        if self.upstream is None:
            raise HttpError(503, "this gateway has no --primary-gateway to promote reads to")
        for attempt in (1, 2):  # a pooled keep-alive connection may have been closed: retry once
            conn = self.upstreams.get()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = json.loads(resp.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                conn.close()
                if attempt == 2:
                    raise HttpError(503, f"the primary's gateway cannot be reached: {e}") from e
                continue
            self.upstreams.put(conn)
            body["primary_latency_ms"] = body.pop("latency_ms", None)
            body.pop("route", None)
            return resp.status, body
        raise AssertionError("unreachable")

    def list_notes(self, conn) -> tuple[int, dict]:
        rows = conn.execute("SELECT id, text FROM notes ORDER BY id DESC LIMIT 100").fetchall()
        return 200, {"notes": [{"id": i, "text": t} for i, t in rows]}

    def get_note(self, note_id: int):
        def query(conn) -> tuple[int, dict]:
            row = conn.execute("SELECT id, text FROM notes WHERE id = ?", (note_id,)).fetchone()
            if row is None:
                return 404, {"error": f"no note {note_id}"}
            return 200, {"note": {"id": row[0], "text": row[1]}}
        return query

    # ------------------------------------------------------------------ writes

    def write(self, sql: str, params: list, request_id: str | None) -> dict:
        """Run one write on the primary: repl_exec_json forwards it from a replica (and returns
        once this replica applied it), or runs it here on the primary. The answer has ``lsn``
        (the session token) and ``rows`` (what RETURNING produced)."""
        conn = self.dbs.get()
        try:
            return json.loads(one(conn, "SELECT repl_exec_json(?, ?, ?)", (sql, json.dumps(params), request_id)))
        except apsw.ConstraintError as e:
            raise HttpError(409, str(e)) from e
        except apsw.Error as e:
            # The primary unreachable, or the commit not applied here in time: the error says
            # which; a retry with the same Idempotency-Key runs the write at most once.
            raise HttpError(502 if self.role == "replica" else 500, f"{type(e).__name__}: {e}") from e
        finally:
            self.dbs.put(conn)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm holds the
    # body until the client's delayed ACK (~40 ms per request on Linux).
    disable_nagle_algorithm = True
    gw: Gateway  # set by main()

    def do_GET(self) -> None:
        self.serve("GET")

    def do_POST(self) -> None:
        self.serve("POST")

    def do_PUT(self) -> None:
        self.serve("PUT")

    def do_DELETE(self) -> None:
        self.serve("DELETE")

    def serve(self, method: str) -> None:
        t0 = time.perf_counter()
        self.session_lsn: int | None = None
        self.log_fields: dict = {}
        status, body, route, headers = 500, {}, "none", {}
        try:
            raw = self.read_body()
            status, body, route, headers = self.dispatch(method, urllib.parse.urlsplit(self.path).path, raw)
        except HttpError as e:
            status, body, headers = e.status, {"error": e.message}, e.headers
        except Exception as e:  # a bug: answer, log, keep serving
            status, body = 500, {"error": f"{type(e).__name__}: {e}"}
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        body.update(route=route, latency_ms=latency_ms)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-route", route)
        self.send_header("x-latency-ms", str(latency_ms))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        fields = dict(method=method, path=self.path, status=status, route=route, latency_ms=latency_ms,
                      session_lsn=self.session_lsn, **self.log_fields)
        sys.stderr.write("event=request " + " ".join(f"{k}={v}" for k, v in fields.items()) + "\n")

    def read_body(self) -> bytes:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise HttpError(400, "bad Content-Length") from None
        if n > MAX_BODY:
            if n <= 16 * MAX_BODY:
                self.rfile.read(n)  # drain it, so the answer is not lost in a connection reset
            else:
                self.close_connection = True  # an unread body would be parsed as the next request
            raise HttpError(413, f"the body is limited to {MAX_BODY} bytes")
        return self.rfile.read(n) if n else b""

    def cookie_lsn(self) -> int | None:
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie") or "")
        except http.cookies.CookieError as e:
            raise HttpError(400, f"unreadable Cookie header: {e}") from e
        if COOKIE not in jar:
            return None
        value = jar[COOKIE].value
        if not value.isdigit() or len(value) > 18:
            raise HttpError(400, f"cookie {COOKIE} must be an LSN (a non-negative integer), got {value!r}")
        return int(value)

    def text_of(self, raw: bytes) -> str:
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise HttpError(400, f"the body must be JSON: {e}") from e
        text = doc.get("text") if isinstance(doc, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise HttpError(400, f'the body must be {{"text": "..."}} with 1 to {MAX_TEXT} characters')
        return text

    def dispatch(self, method: str, path: str, raw: bytes):
        gw = self.gw
        self.session_lsn = self.cookie_lsn()
        m = NOTE_PATH.match(path)
        note_id = int(m.group(1)) if m else None
        if method == "GET" and (path in ("/notes", "/notes/") or m):
            query = gw.list_notes if note_id is None else gw.get_note(note_id)
            status, body, route = gw.read(self.session_lsn, self.path, query)
            return status, body, route, {}
        if method == "POST" and path in ("/notes", "/notes/"):
            sql, params, ok = "INSERT INTO notes(text) VALUES (?) RETURNING id, text", [self.text_of(raw)], 201
        elif method == "PUT" and m:
            sql, params, ok = "UPDATE notes SET text = ? WHERE id = ? RETURNING id, text", [self.text_of(raw), note_id], 200
        elif method == "DELETE" and m:
            sql, params, ok = "DELETE FROM notes WHERE id = ? RETURNING id, text", [note_id], 200
        elif path.startswith("/_gateway/"):
            return self.admin(method, path)
        elif path in ("/notes", "/notes/") or m:
            raise HttpError(405, f"{method} is not allowed on {path}")
        else:
            raise HttpError(404, f"no route {method} {path}")
        answer = gw.write(sql, params, self.headers.get("Idempotency-Key"))
        lsn = max(answer["lsn"], self.session_lsn or 0)  # a session's LSN never goes back
        self.log_fields["commit_lsn"] = answer["lsn"]
        cookie = {"Set-Cookie": f"{COOKIE}={lsn}; Path=/; HttpOnly; SameSite=Lax"}
        body = {"lsn": lsn}
        if not answer["rows"]:  # PUT/DELETE of an id that does not exist (the LSN is still valid)
            return 404, {**body, "error": f"no note {note_id}"}, "primary", cookie
        note_id, text = answer["rows"][0]
        body.update({"deleted": {"id": note_id}} if method == "DELETE" else {"note": {"id": note_id, "text": text}})
        return ok, body, "primary", cookie

    def admin(self, method: str, path: str):
        """Operations endpoints (bind the gateway to a private address in production)."""
        conn = self.gw.dbs.get()
        try:
            if method == "GET" and path == "/_gateway/status":
                return 200, {"role": self.gw.role, "strategy": self.gw.strategy, "lsn": one(conn, "SELECT repl_lsn()"),
                             "status": json.loads(one(conn, "SELECT repl_status()"))}, "local", {}
            if method == "POST" and path == "/_gateway/sync" and self.gw.role == "replica":
                return 200, {"lsn": one(conn, "SELECT repl_sync()")}, "local", {}  # catch up now (--no-follow)
            raise HttpError(404, f"no route {method} {path}")
        finally:
            self.gw.dbs.put(conn)

    def log_request(self, code="-", size="-") -> None:  # serve() logs every request itself
        pass

    def log_message(self, format: str, *args) -> None:  # http.server's own messages (bad requests)
        sys.stderr.write("event=http " + (format % args).replace("\n", " ") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    role = ap.add_mutually_exclusive_group(required=True)
    role.add_argument("--primary", metavar="DB", help="run next to the primary database DB")
    role.add_argument("--replica", metavar="DB", help="run next to the replica database DB (created if new)")
    ap.add_argument("--serve-log", metavar="HOST:PORT", default="127.0.0.1:0",
                    help="--primary: where to serve the replication log (default 127.0.0.1:0, a free port)")
    ap.add_argument("--source", metavar="URL", help="--replica: the primary's replication URL (http://host:port)")
    ap.add_argument("--primary-gateway", metavar="URL", help="--replica: the primary's gateway, for promoted reads")
    ap.add_argument("--strategy", choices=("wait", "promote"), default="wait",
                    help="a GET whose session is ahead of the replica: wait for it, or read on the primary")
    ap.add_argument("--wait-ms", type=int, default=200, help="longest wait of --strategy wait (default 200)")
    ap.add_argument("--no-follow", action="store_true",
                    help="--replica: do not follow in the background; catch up only on writes, waits, POST /_gateway/sync")
    ap.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:0", help="the gateway's address (default 127.0.0.1:0)")
    args = ap.parse_args()
    if args.replica and not args.source:
        ap.error("--replica needs --source (the primary's replication URL)")
    if args.replica and args.strategy == "promote" and not args.primary_gateway:
        ap.error("--strategy promote needs --primary-gateway")

    load_extension()
    gw = Gateway(args)
    admin = gw._connect()  # keeps the role (and the follower) for the life of the process
    ready = {"ready": True, "role": gw.role, "db": gw.db, "pid": os.getpid()}
    if gw.role == "primary":
        one(admin, "SELECT repl_primary(?)", (args.serve_log,))
        # Replicas forward their writes here (repl_exec): accept them (off by default).
        one(admin, "SELECT repl_config('exec', 1)")
        admin.execute("CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
        ready["repl_url"] = json.loads(one(admin, "SELECT repl_status()"))["server"]["url"]
    else:
        ready["strategy"], ready["follow"] = args.strategy, not args.no_follow
        one(admin, "SELECT repl_sync(?)" if args.no_follow else "SELECT repl_follow(?)", (args.source,))
    ready["lsn"] = one(admin, "SELECT repl_lsn()")

    host, port = args.listen.rsplit(":", 1)
    Handler.gw = gw
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731 - not from this thread
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready["url"] = f"http://{host}:{server.server_address[1]}"
    print(json.dumps(ready), flush=True)
    sys.stderr.write("event=ready " + " ".join(f"{k}={v}" for k, v in ready.items()) + "\n")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if gw.role == "replica" and not args.no_follow:
            one(admin, "SELECT repl_follow(NULL)")
        sys.stderr.write("event=stopped\n")


if __name__ == "__main__":
    main()

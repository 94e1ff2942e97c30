"""HTTP transport security and protocol edges (issue 4, "Security tests"): no token → 401;
wrong token → 401; a non-loopback listen without a token is refused; ``from`` values that are
negative, huge or not numbers → 400; unknown paths → 404. Also what a user of a replication
tool expects around that: every endpoint is protected, a replica with the token works and one
without it fails clearly without creating files, the token never shows (status, errors, event
lines), strict parameters, 405/409/410, and the long-poll (empty after the wait, early on a
commit). The protocol itself is docs/FORMAT.md §8.

Requests are made from this process with http.client (custom methods, raw paths, headers);
the primary and replicas are worker processes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from helpers import (
    Worker, WorkerError, durable, lsn_checksum, start_serving_primary, stock_tables, wait_for, worker_status,
    worker_tables,
)
from test_replica_bad_input import replica_side
from test_replica_retention import FAST, churn, small_log

TOKEN = "s3cret"
RECORDS_TYPE = "application/vnd.sqlite-replica.records"
SNAPSHOT_TYPE = "application/vnd.sqlite-replica.snapshot"
ENDPOINTS = ["/v1/info", "/v1/log?from=1", "/v1/snapshot", "/metrics"]


class Resp:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def __repr__(self) -> str:
        return f"<HTTP {self.status} {self.headers} {self.body[:200]!r}>"


def request(url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 15) -> Resp:
    """One request with http.client: ``path`` is sent exactly as given (no normalisation)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def serving(path, token: str | None = None, env: dict[str, str] | None = None) -> Iterator[tuple[Worker, str]]:
    """A serving primary worker (``start_serving_primary``) and its URL; closed on exit."""
    p, url = start_serving_primary(path, token, env=env)
    with p:
        yield p, url


def records(body: bytes) -> list[tuple[int, int]]:
    """(lsn, record_len) of each record of a /v1/log body (docs/FORMAT.md §3.1); the body
    must be whole records back to back."""
    out, off = [], 0
    while off < len(body):
        assert len(body) - off >= 88, f"a truncated record header at offset {off}"
        assert body[off:off + 4] == b"RPLR", body[off:off + 4]
        (length,) = struct.unpack(">Q", body[off + 8:off + 16])
        (lsn,) = struct.unpack(">Q", body[off + 16:off + 24])
        assert off + length <= len(body), f"record LSN {lsn} is cut short"
        out.append((lsn, length))
        off += length
    return out


def no_token_in(text: str, *tokens: str) -> None:
    for t in tokens:
        assert t not in text, f"the token {t!r} shows in: {text}"


@pytest.fixture
def plain(tmp):
    """A serving primary without a token holding a few transactions."""
    with serving(tmp / "p.db") as (p, url):
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(5):
            p.q("INSERT INTO t(v) VALUES (?)", [f"v{i}"])
        durable(p)
        yield p, url


# ------------------------------------------------------------------ tokens


@pytest.mark.parametrize("how", ["argument", "REPL_TOKEN"])
def test_a_token_protects_every_endpoint(tmp, how):
    kw = {"token": TOKEN} if how == "argument" else {"env": {"REPL_TOKEN": TOKEN}}
    with serving(tmp / "p.db", **kw) as (p, url):
        p.q("CREATE TABLE t(x)")
        durable(p)
        st = worker_status(p)
        assert st["server"]["auth"] is True, st
        no_token_in(json.dumps(st), TOKEN)
        wait_for(lambda: worker_status(p)["snapshot"], timeout=10, what="a durable snapshot")
        for path in ENDPOINTS:
            for headers in [
                {},
                bearer("wrong"),
                bearer(TOKEN + "x"),
                bearer(TOKEN[:-1]),
                {"Authorization": TOKEN},  # no scheme
                {"Authorization": f"Basic {TOKEN}"},
                {"X-Token": TOKEN},
            ]:
                r = request(url, path, headers=headers)
                assert r.status == 401, (path, headers, r)
                err = r.json()["error"]
                assert "Authorization: Bearer <token>" in err and "REPL_TOKEN" in err, err
                assert (r.header("www-authenticate") or "").startswith("Bearer"), r
                no_token_in(r.body.decode(), TOKEN)
            r = request(url, path, headers=bearer(TOKEN))
            assert r.status == 200, (path, r)
            # The scheme is case-insensitive (RFC 7235 §2.1).
            assert request(url, path, headers={"Authorization": f"bearer {TOKEN}"}).status == 200
        # Authentication comes first: a stranger cannot even probe which paths exist.
        for path in ["/", "/nope", "/v1/log?from=abc"]:
            assert request(url, path).status == 401, path
        assert request(url, "/v1/log", method="POST").status == 401
        no_token_in(p.stderr(), TOKEN)
        assert "auth=token" in p.stderr()


def test_replicas_need_the_token_and_never_show_it(tmp):
    with serving(tmp / "p.db", token=TOKEN) as (p, url):
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        p.q("INSERT INTO t(v) VALUES ('one'), ('two')")
        durable(p)
        # Without a token, or with a wrong one: a clear error and no file changed.
        refusal = ("401", "token", "REPL_TOKEN", url)
        for i, (spec, env, words) in enumerate([
            (url, None, refusal),
            (url + "?token=wrong-one", None, refusal),
            (url, {"REPL_TOKEN": "wrong-env"}, refusal),
            (url + "/?token=", None, ("token= is empty", "REPL_TOKEN", url)),
        ]):
            db = tmp / f"refused{i}.db"
            with Worker(db, env=env) as r:
                before = replica_side(db)
                with pytest.raises(WorkerError) as e:
                    r.q("SELECT repl_sync(?)", [spec])
                msg = e.value.msg
                for w in words:
                    assert w in msg, (spec, msg)
                no_token_in(msg, TOKEN, "wrong-one", "wrong-env")
                assert replica_side(db) == before, f"a refused repl_sync({spec!r}) changed files"
                assert not Path(f"{db}-replica").exists()
                assert r.one("SELECT repl_role()") is None
                no_token_in(r.stderr(), TOKEN, "wrong-one", "wrong-env")
        # With the token in the URL.
        rdb = tmp / "r.db"
        with Worker(rdb) as r:
            want = lsn_checksum(p)
            assert r.one("SELECT repl_sync(?)", [url + "?token=" + TOKEN]) == want[0]
            assert lsn_checksum(r) == want
            st = worker_status(r)
            assert st["source"] == url and st["primary"] == url, st
            no_token_in(json.dumps(st), TOKEN)
            # Following keeps the token and still never shows it.
            r.q("SELECT repl_follow(?, 200)", [url + "?token=" + TOKEN])
            p.q("INSERT INTO t(v) VALUES ('three')")
            lsn = p.one("SELECT repl_lsn()")
            assert r.one("SELECT repl_wait(?, 10000)", [lsn]) == lsn
            st = worker_status(r)
            assert st["follow"]["source"] == url and st["follow"]["errors"] == 0, st
            no_token_in(json.dumps(st), TOKEN)
            no_token_in(json.dumps(worker_status(p)), TOKEN)
            no_token_in(r.stderr(), TOKEN)
        # Reopened, it resumes with the remembered token.
        p.q("INSERT INTO t(v) VALUES ('four')")
        lsn = durable(p)
        with Worker(rdb) as r:
            assert r.one("SELECT repl_sync()") == lsn
            no_token_in(json.dumps(worker_status(r)), TOKEN)
        assert stock_tables(rdb) == worker_tables(p)
        # With the token in REPL_TOKEN.
        with Worker(tmp / "env.db", env={"REPL_TOKEN": TOKEN}) as r:
            assert r.one("SELECT repl_sync(?)", [url]) == lsn
            assert lsn_checksum(r) == lsn_checksum(p)
            no_token_in(json.dumps(worker_status(r)), TOKEN)


def test_the_token_never_shows_in_error_messages(tmp):
    with serving(tmp / "p.db", token=TOKEN) as (p, url), serving(tmp / "q.db", token="other-secret") as (q, qurl):
        for w in (p, q):
            w.q("CREATE TABLE t(x)")
            durable(w)
        with Worker(tmp / "r.db") as r:
            r.q("SELECT repl_sync(?)", [url + "?token=" + TOKEN])
            # Another primary (another lineage): refused, naming both URLs without tokens.
            with pytest.raises(WorkerError) as e:
                r.q("SELECT repl_sync(?)", [qurl + "?token=other-secret"])
            assert "lineage" in e.value.msg and qurl in e.value.msg and url in e.value.msg, e.value.msg
            no_token_in(e.value.msg, TOKEN, "other-secret")
            # A replica cannot become a primary; the message names its source.
            with pytest.raises(WorkerError) as e:
                r.q("SELECT repl_primary()")
            assert "is a replica of" in e.value.msg and url in e.value.msg, e.value.msg
            no_token_in(e.value.msg, TOKEN)
            no_token_in(json.dumps(worker_status(r)), TOKEN, "other-secret")
            no_token_in(r.stderr(), TOKEN, "other-secret")
        # A misspelt parameter is named by its key, never echoed with its value.
        with Worker(tmp / "typo.db") as r:
            for spec in [url + "?tokn=" + TOKEN, url + "?Token=" + TOKEN, url + "?x=1&token=" + TOKEN]:
                with pytest.raises(WorkerError) as e:
                    r.q("SELECT repl_sync(?)", [spec])
                assert "unknown URL parameter" in e.value.msg, e.value.msg
                no_token_in(e.value.msg, TOKEN)
            assert not Path(f"{tmp / 'typo.db'}-replica").exists()


# ------------------------------------------------------------------ listening


@pytest.mark.parametrize("addr", ["0.0.0.0:0", "[::]:0"])
def test_non_loopback_needs_a_token(tmp, addr):
    if addr.startswith("[") and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with Worker(tmp / "p.db") as p:
        for args in [[addr], [addr, ""], [addr, None]]:
            with pytest.raises(WorkerError) as e:
                p.q("SELECT repl_primary(" + ", ".join("?" * len(args)) + ")", args)
            msg = e.value.msg
            assert "refusing to listen" in msg and "without a token" in msg, msg
            assert "repl_primary(" in msg and "REPL_TOKEN" in msg and "127.0.0.1" in msg, msg
            # Refused before anything changed: no server, and not even a primary yet.
            st = worker_status(p)
            assert st.get("server") is None and st["role"] is None, st
        try:
            p.one("SELECT repl_primary(?, ?)", [addr, TOKEN])
        except WorkerError as e:
            if "cannot listen" in e.msg and addr.startswith("["):
                pytest.skip(f"cannot bind {addr}: {e.msg}")
            raise
        server = worker_status(p)["server"]
        assert server["auth"] is True, server
        port = int(server["addr"].rsplit(":", 1)[1])
        local = f"http://127.0.0.1:{port}" if addr.startswith("0") else f"http://[::1]:{port}"
        assert request(local, "/v1/info").status == 401
        assert request(local, "/v1/info", headers=bearer(TOKEN)).status == 200
    # The worker is gone: so is the listener.
    with pytest.raises(OSError):
        request(local, "/v1/info", timeout=5)


def test_non_loopback_with_repl_token_in_the_environment(tmp):
    with Worker(tmp / "p.db", env={"REPL_TOKEN": TOKEN}) as p:
        p.one("SELECT repl_primary('0.0.0.0:0')")
        server = worker_status(p)["server"]
        assert server["auth"] is True and server["addr"].startswith("0.0.0.0:"), server
        local = "http://127.0.0.1:" + server["addr"].rsplit(":", 1)[1]
        assert request(local, "/metrics").status == 401
        assert request(local, "/metrics", headers=bearer(TOKEN)).status == 200


# ------------------------------------------------------------------ parameters, paths, methods


@pytest.mark.parametrize(
    "query, name",
    [
        ("from=-1", "from"),
        ("from=abc", "from"),
        ("from=1e3", "from"),
        ("from=0x10", "from"),
        ("from=+1", "from"),
        ("from=1.0", "from"),
        ("from=%31", "from"),
        ("from=", "from"),
        ("from", "from"),
        ("from=99999999999999999999999", "from"),
        ("from=18446744073709551616", "from"),  # u64::MAX + 1, 20 digits
        ("from=9223372036854775808", "from"),  # i64::MAX + 1
        ("", "from"),  # missing
        ("wait_ms=100", "from"),  # missing
        ("from=1&wait_ms=-5", "wait_ms"),
        ("from=1&wait_ms=999999999", "wait_ms"),
        ("from=1&wait_ms=60001", "wait_ms"),
        ("from=1&wait_ms=abc", "wait_ms"),
        ("from=1&max_bytes=0", "max_bytes"),
        ("from=1&max_bytes=-1", "max_bytes"),
        ("from=1&max_bytes=268435457", "max_bytes"),
        ("from=1&generation=-1", "generation"),
        ("from=1&generation=4294967296", "generation"),
        ("from=1&generation=x", "generation"),
    ],
)
def test_bad_log_parameters_are_400(plain, query, name):
    p, url = plain
    r = request(url, "/v1/log" + ("?" + query if query else ""))
    assert r.status == 400, (query, r)
    err = r.json()["error"]
    assert err.startswith(name + " "), (query, err)
    # And the server still serves.
    assert request(url, "/v1/log?from=1").status == 200


def test_good_parameters_at_their_limits(plain):
    p, url = plain
    lsn = durable(p)
    for query in [
        "from=0",  # LSN 0 carries no record: served from 1
        "from=1&wait_ms=0&max_bytes=1&generation=0",
        "from=1&max_bytes=268435456",
        "from=1&generation=1",
        f"from={lsn + 1}&wait_ms=0",
        "from=00000000000000000001",
        "from=5&from=1",  # the last one wins
        "from=1&unknown=whatever",  # unknown parameters are ignored
    ]:
        r = request(url, "/v1/log?" + query)
        assert r.status == 200, (query, r)
        got = records(r.body)
        assert len(got) == int(r.header("X-Repl-Records")), (query, r)
    r = request(url, "/v1/log?from=0")
    assert records(r.body)[0][0] == 1


@pytest.mark.parametrize(
    "path",
    ["/", "/v2/log", "/v1/../etc/passwd", "/v1/log/extra", "/v1/info/", "/v1", "/v1/LOG", "/metrics/x",
     "/v1/nope?from=1", "//v1/info", "/v1/snapshot.snap", "*"],
)
def test_unknown_paths_are_404(plain, path):
    p, url = plain
    r = request(url, path)
    assert r.status == 404, (path, r)
    err = r.json()["error"]
    assert "no such endpoint" in err and "/v1/log" in err and "/metrics" in err, err


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head(plain, method):
    p, url = plain
    lsn = p.one("SELECT repl_lsn()")
    for path in ["/v1/log", "/v1/info"]:
        r = request(url, path, method=method)
        assert r.status == 405, (method, path, r)
        assert "only GET" in r.json()["error"]
        assert r.header("allow") == "GET, HEAD", r
    assert p.one("SELECT repl_lsn()") == lsn
    r = request(url, "/v1/info", method="HEAD")
    assert r.status == 200 and r.body == b"", r


def test_ahead_of_the_primary_or_another_generation_is_409(plain):
    p, url = plain
    lsn = durable(p)
    info = json.loads(request(url, "/v1/info").body)
    gen = info["generation"]
    assert info["durable_lsn"] == lsn and gen >= 1, info
    for query, words in [
        (f"from={lsn + 2}", ("ahead", f"durable LSN is {lsn}", "bootstrap")),
        (f"from={lsn + 1000}&wait_ms=5000", ("ahead",)),  # no long-poll for an impossible LSN
        ("from=9223372036854775807", ("ahead",)),
        (f"from=1&generation={gen + 1}", ("generation", f"at generation {gen}")),
        ("from=1&generation=4294967295", ("generation",)),
    ]:
        start = time.monotonic()
        r = request(url, "/v1/log?" + query, headers={"X-Repl-Follower": "bogus"})
        assert r.status == 409, (query, r)
        assert time.monotonic() - start < 4, "a 409 must not wait"
        err = r.json()["error"]
        for w in words:
            assert w in err, (query, err)
    # A refused request does not register a follower (nor a bogus position for it).
    followers = worker_status(p)["server"]["followers"]
    assert all(f["id"] != "bogus" for f in followers), followers
    assert "bogus" not in request(url, "/metrics").body.decode()
    # The current generation and the next LSN are fine.
    assert request(url, f"/v1/log?from=1&generation={gen}").status == 200
    r = request(url, f"/v1/log?from={lsn + 1}")
    assert r.status == 200 and r.header("X-Repl-Records") == "0" and r.body == b"", r


# ------------------------------------------------------------------ bodies and long-polls


def test_log_bodies_are_dense_whole_records(plain):
    p, url = plain
    lsn = durable(p)
    info = json.loads(request(url, "/v1/info").body)
    r = request(url, "/v1/log?from=2")
    assert r.status == 200, r
    assert r.header("content-type") == RECORDS_TYPE
    got = records(r.body)
    assert [l for l, _ in got] == list(range(2, lsn + 1)), got
    assert int(r.header("X-Repl-Records")) == len(got)
    assert int(r.header("X-Repl-Last-Lsn")) == lsn
    assert int(r.header("content-length")) == len(r.body) == sum(n for _, n in got)
    assert r.header("X-Repl-Lineage") == info["lineage"]
    assert int(r.header("X-Repl-Durable-Lsn")) == lsn
    assert int(r.header("X-Repl-Generation")) == info["generation"]
    assert int(r.header("X-Repl-First-Lsn")) == info["first_lsn"] == 1
    # max_bytes=1: still at least one whole record.
    r = request(url, "/v1/log?from=3&max_bytes=1")
    got = records(r.body)
    assert r.status == 200 and got and got[0][0] == 3 and len(got) == int(r.header("X-Repl-Records")), r
    # The snapshot is a snapshot file: a segment header then one record at its LSN.
    wait_for(lambda: worker_status(p)["snapshot"], timeout=10, what="a durable snapshot")
    r = request(url, "/v1/snapshot")
    assert r.status == 200 and r.header("content-type") == SNAPSHOT_TYPE, r
    assert r.body[:4] == b"RPLS" and int(r.header("content-length")) == len(r.body)
    snap = records(r.body[32:])
    assert len(snap) == 1 and snap[0][0] == int(r.header("X-Repl-Snapshot-Lsn")), snap
    assert r.header("X-Repl-Lineage") == info["lineage"] and int(r.header("X-Repl-Generation")) >= 1
    # /v1/info describes the snapshot /v1/snapshot serves.
    snap_info = json.loads(request(url, "/v1/info").body)["snapshot"]
    assert snap_info == {"lsn": snap[0][0], "bytes": len(r.body), "page_size": 4096}, snap_info


def test_long_poll_at_the_end_returns_empty_after_the_wait(plain):
    p, url = plain
    lsn = durable(p)
    start = time.monotonic()
    r = request(url, f"/v1/log?from={lsn + 1}&wait_ms=200")
    took = time.monotonic() - start
    assert r.status == 200, r
    assert r.header("X-Repl-Records") == "0" and r.body == b"", r
    assert int(r.header("X-Repl-Durable-Lsn")) == lsn
    assert 0.1 <= took < 10, took


def test_long_poll_returns_early_when_the_primary_commits(plain):
    p, url = plain
    lsn = durable(p)
    out: dict = {}

    def poll():
        try:
            start = time.monotonic()
            out["resp"] = request(url, f"/v1/log?from={lsn + 1}&wait_ms=5000", headers={"X-Repl-Follower": "poller"})
            out["took"] = time.monotonic() - start
        except BaseException as e:  # reported by the main thread
            out["error"] = e

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        # The server lists the follower once its request is in (just before it waits).
        wait_for(
            lambda: "error" in out or any(f["id"] == "poller" for f in worker_status(p)["server"]["followers"]),
            timeout=10,
            what="the long-poll to reach the server",
        )
        p.q("INSERT INTO t(v) VALUES ('wake up')")
    finally:
        t.join(10)
    assert not t.is_alive(), "the long-poll did not return"
    assert "error" not in out, out
    r = out["resp"]
    assert r.status == 200, r
    got = records(r.body)
    assert [l for l, _ in got] == [lsn + 1], got
    assert r.header("X-Repl-Records") == "1" and int(r.header("X-Repl-Last-Lsn")) == lsn + 1
    assert out["took"] < 4.5, f"the long-poll waited {out['took']:.2f}s instead of returning on the commit"


def test_a_retired_lsn_is_410_with_the_first_lsn(tmp):
    with serving(tmp / "p.db", env=FAST) as (p, url):
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        small_log(p)
        first = 1

        def retired():
            nonlocal first
            churn(p, 10)
            first = worker_status(p)["log"]["first_lsn"] or 1
            return first > 2

        wait_for(retired, timeout=60, what="retention to remove the first segments")
        r = request(url, "/v1/log?from=1")
        assert r.status == 410, r
        body = r.json()
        assert body["first_lsn"] >= first, body
        assert "no longer retained" in body["error"] and "snapshot" in body["error"], body
        assert int(r.header("X-Repl-First-Lsn")) == body["first_lsn"]
        # From the first retained LSN on it serves again.
        r = request(url, f"/v1/log?from={body['first_lsn']}")
        assert r.status == 200 and records(r.body)[0][0] == body["first_lsn"], r
        # A replica starting over HTTP bootstraps from the snapshot.
        with Worker(tmp / "r.db") as rep:
            lsn = durable(p)
            assert rep.one("SELECT repl_sync(?)", [url]) == lsn
            assert lsn_checksum(rep) == lsn_checksum(p)

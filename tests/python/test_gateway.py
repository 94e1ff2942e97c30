"""The edge-gateway example (examples/gateway/), driven over HTTP like its users would.

One primary gateway and three replica gateways, each its own process with its own replica:

* ``wait``    --strategy wait, following (the usual deployment), --wait-ms 300;
* ``promote`` --strategy promote, --no-follow: its replica moves only when it writes or is told
  to sync, so "the cookie is ahead of the replica" is deterministic after a write elsewhere;
* ``lazy``    --strategy wait, --no-follow, no --primary-gateway: a wait has to pull the
  commit itself (local-after-wait), and a wait that times out answers 503.

Checked: the x-db-session-lsn cookie of a write is the primary's LSN; a read with it on another
gateway is never stale (local / local-after-wait / primary, never the old row); reads without
a cookie are local; PUT and DELETE move the cookie forward; at most once per Idempotency-Key;
bad input is refused before anything is written; demo.py runs and prints its table.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.parse

import pytest

from helpers import REPO, _py_env, wait_for

GATEWAY = REPO / "examples" / "gateway" / "gateway.py"
DEMO = REPO / "examples" / "gateway" / "demo.py"
COOKIE = "x-db-session-lsn"


class Gw:
    """A gateway.py process (stdout/stderr in files; the ready line is its first stdout line)."""

    def __init__(self, name: str, args: list[str], logdir):
        self.name = name
        self.out, self.err = logdir / f"{name}.out", logdir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(GATEWAY), *args], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=_py_env(None), cwd=REPO)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway {name} exited ({self.proc.returncode}):\n{self.err.read_text()}")
            line = self.out.read_text().partition("\n")[0]
            return json.loads(line) if line else None

        self.info = wait_for(ready, timeout=30, what=f"gateway {name} to be ready")
        self.url = self.info["url"]

    def call(self, method: str, path: str, body=None, cookie=None, raw: bytes | None = None, headers=None):
        """(status, headers as a dict with lower-case names, JSON body)."""
        h = {"Content-Type": "application/json", **(headers or {})}
        if cookie is not None:
            h["Cookie"] = f"{COOKIE}={cookie}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = http.client.HTTPConnection(urllib.parse.urlsplit(self.url).netloc, timeout=30)
        try:
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc
        finally:
            conn.close()

    def lsn(self) -> int:
        return self.call("GET", "/_gateway/status")[2]["lsn"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def session_cookie(headers: dict) -> int:
    """The LSN in Set-Cookie (and its attributes)."""
    value, *attrs = [part.strip() for part in headers["set-cookie"].split(";")]
    name, _, lsn = value.partition("=")
    assert name == COOKIE and lsn.isdigit(), headers["set-cookie"]
    assert "Path=/" in attrs and "HttpOnly" in attrs, attrs
    return int(lsn)


def served(headers: dict, doc: dict) -> str:
    """The route, after checking it is reported in the body and the headers alike."""
    assert doc["route"] == headers["x-route"], (doc, headers)
    assert float(headers["x-latency-ms"]) == doc["latency_ms"] >= 0, (doc, headers)
    return doc["route"]


@pytest.fixture(scope="module")
def gws(tmp_path_factory):
    d = tmp_path_factory.mktemp("gateway")
    started: dict[str, Gw] = {}
    try:
        p = started["primary"] = Gw("primary", ["--primary", str(d / "p.db")], d)
        src = ["--source", p.info["repl_url"]]
        up = ["--primary-gateway", p.url]
        started["wait"] = Gw("wait", ["--replica", str(d / "w.db"), *src, *up, "--strategy", "wait", "--wait-ms", "300"], d)
        started["promote"] = Gw("promote", ["--replica", str(d / "a.db"), *src, *up, "--strategy", "promote", "--no-follow"], d)
        started["lazy"] = Gw("lazy", ["--replica", str(d / "c.db"), *src, "--strategy", "wait", "--wait-ms", "2000", "--no-follow"], d)
        yield started
    finally:
        for g in started.values():
            g.stop()
    for g in started.values():
        log = g.err.read_text()
        assert g.proc.returncode == 0 and "event=stopped" in log, f"{g.name} did not stop cleanly:\n{log[-3000:]}"


def test_write_sets_the_session_cookie_and_another_gateway_never_reads_stale(gws):
    p, wait, promote = gws["primary"], gws["wait"], gws["promote"]
    status, h, doc = promote.call("POST", "/notes", {"text": "first"})
    assert status == 201 and served(h, doc) == "primary", doc
    lsn = session_cookie(h)
    assert lsn == doc["lsn"] == p.lsn(), (lsn, doc)  # the commit's LSN, as the primary counts it
    note = doc["note"]
    assert note["text"] == "first"
    # The writing gateway applied its own write before answering: its own read is local.
    status, h, doc = promote.call("GET", f"/notes/{note['id']}", cookie=lsn)
    assert (status, served(h, doc), doc["note"]) == (200, "local", note)
    # The other gateway, with the cookie: fresh, whether its follower was already there or not.
    status, h, doc = wait.call("GET", f"/notes/{note['id']}", cookie=lsn)
    assert status == 200 and doc["note"] == note, doc
    assert served(h, doc) in ("local", "local-after-wait"), doc
    # No cookie: local, no questions asked.
    status, h, doc = wait.call("GET", "/notes")
    assert status == 200 and served(h, doc) == "local" and note in doc["notes"], doc
    assert "set-cookie" not in h  # reads never touch the session
    # One key=value line per request on stderr.
    lines = [ln for ln in promote.err.read_text().splitlines() if ln.startswith("event=request method=POST")]
    assert lines and "route=primary" in lines[-1] and "status=201" in lines[-1], lines
    assert f"commit_lsn={lsn}" in lines[-1], lines[-1]


def test_promote_reads_the_primary_while_the_replica_is_behind(gws):
    wait, promote = gws["wait"], gws["promote"]
    status, h, doc = wait.call("POST", "/notes", {"text": "written elsewhere"})
    assert status == 201
    lsn, note = session_cookie(h), doc["note"]
    assert promote.lsn() < lsn  # --no-follow: nothing moved its replica
    # Without the cookie the read is local, and (as designed) does not see the new note yet.
    status, h, doc = promote.call("GET", f"/notes/{note['id']}")
    assert (status, served(h, doc)) == (404, "local"), doc
    # With it, the read goes to the primary and is fresh.
    status, h, doc = promote.call("GET", f"/notes/{note['id']}", cookie=lsn)
    assert (status, served(h, doc), doc["note"]) == (200, "primary", note), doc
    assert doc["primary_latency_ms"] >= 0
    status, h, doc = promote.call("GET", "/notes", cookie=lsn)
    assert (status, served(h, doc)) == (200, "primary") and note in doc["notes"], doc
    # Once the replica caught up, the same cookie reads locally.
    status, _, doc = promote.call("POST", "/_gateway/sync")
    assert status == 200 and doc["lsn"] >= lsn, doc
    status, h, doc = promote.call("GET", f"/notes/{note['id']}", cookie=lsn)
    assert (status, served(h, doc), doc["note"]) == (200, "local", note), doc


def test_wait_pulls_the_commit_or_times_out(gws):
    wait, lazy = gws["wait"], gws["lazy"]
    status, h, doc = wait.call("POST", "/notes", {"text": "wait for me"})
    lsn, note = session_cookie(h), doc["note"]
    assert lazy.lsn() < lsn  # --no-follow
    status, h, doc = lazy.call("GET", f"/notes/{note['id']}", cookie=lsn)
    assert (status, served(h, doc), doc["note"]) == (200, "local-after-wait", note), doc
    assert lazy.lsn() >= lsn
    # A cookie no replica can reach yet (ahead of the primary): the wait times out. With a
    # --primary-gateway the read falls back to the primary; without one, 503 + Retry-After.
    future = lsn + 1000
    status, h, doc = wait.call("GET", f"/notes/{note['id']}", cookie=future)
    assert (status, served(h, doc), doc["note"]) == (200, "primary-after-wait", note), doc
    assert doc["latency_ms"] >= 300, doc
    status, h, doc = lazy.call("GET", f"/notes/{note['id']}", cookie=future)
    assert (status, served(h, doc), h.get("retry-after")) == (503, "none", "1"), (doc, h)
    assert "did not reach LSN" in doc["error"], doc


def test_put_and_delete_move_the_cookie_forward(gws):
    p, wait, promote = gws["primary"], gws["wait"], gws["promote"]
    status, h, doc = wait.call("POST", "/notes", {"text": "v1"})
    lsn1, nid = session_cookie(h), doc["note"]["id"]
    status, h, doc = wait.call("PUT", f"/notes/{nid}", {"text": "v2"}, cookie=lsn1)
    assert (status, served(h, doc), doc["note"]) == (200, "primary", {"id": nid, "text": "v2"}), doc
    lsn2 = session_cookie(h)
    assert lsn2 > lsn1 and lsn2 == p.lsn()
    # The promote gateway's replica still holds v1 (or nothing): the cookie sends it to the primary.
    status, h, doc = promote.call("GET", f"/notes/{nid}", cookie=lsn2)
    assert (status, served(h, doc), doc["note"]["text"]) == (200, "primary", "v2"), doc
    status, h, doc = promote.call("DELETE", f"/notes/{nid}", cookie=lsn2)
    assert (status, served(h, doc), doc["deleted"]) == (200, "primary", {"id": nid}), doc
    lsn3 = session_cookie(h)
    assert lsn3 > lsn2
    status, h, doc = wait.call("GET", f"/notes/{nid}", cookie=lsn3)
    assert status == 404 and served(h, doc) in ("local", "local-after-wait"), doc
    # Unknown ids: 404, still with a (valid) cookie since the request reached the primary.
    for method, body in (("PUT", {"text": "x"}), ("DELETE", None)):
        status, h, doc = wait.call(method, "/notes/999999", body, cookie=lsn3)
        assert status == 404 and "no note 999999" in doc["error"], doc
        assert session_cookie(h) >= lsn3
    # An older cookie never lowers the session: the answer carries max(cookie, commit).
    status, h, doc = wait.call("POST", "/notes", {"text": "later"}, cookie=10**15)
    assert session_cookie(h) == 10**15, h


def test_idempotency_key_runs_the_write_once(gws):
    wait, promote = gws["wait"], gws["promote"]
    key = {"Idempotency-Key": "gw-test-once"}
    _, h1, a = wait.call("POST", "/notes", {"text": "once"}, headers=key)
    _, h2, b = promote.call("POST", "/notes", {"text": "once"}, headers=key)  # a retry, via another edge
    assert a["note"] == b["note"], (a, b)
    status, h, doc = wait.call("GET", "/notes", cookie=session_cookie(h2))
    assert [n for n in doc["notes"] if n["text"] == "once"] == [a["note"]], doc


def test_bad_input_is_refused_before_anything_is_written(gws):
    p, wait = gws["primary"], gws["wait"]
    before = p.lsn()
    cases = [
        ("POST", "/notes", b'{"text": ', {}, 400, "must be JSON"),
        ("POST", "/notes", b'["text"]', {}, 400, '"text"'),
        ("POST", "/notes", b'{"text": ""}', {}, 400, '"text"'),
        ("POST", "/notes", b'{"text": 5}', {}, 400, '"text"'),
        ("PUT", "/notes/1", b"not json", {}, 400, "must be JSON"),
        ("GET", "/notes/1", None, {"Cookie": f"{COOKIE}=12abc"}, 400, "must be an LSN"),
        ("GET", "/notes/1", None, {"Cookie": f"{COOKIE}=-3"}, 400, "must be an LSN"),
        ("GET", "/notes/999999", None, {}, 404, "no note 999999"),
        ("GET", "/notes/abc", None, {}, 404, "no route"),
        ("GET", "/nothing", None, {}, 404, "no route"),
        ("POST", "/notes/1", b'{"text": "x"}', {}, 405, "not allowed"),
        ("DELETE", "/notes", None, {}, 405, "not allowed"),
        ("POST", "/notes", b"x" * (64 * 1024 + 1), {}, 413, "limited"),
    ]
    for method, path, raw, headers, want, words in cases:
        status, h, doc = wait.call(method, path, raw=raw, headers=headers)
        assert status == want and words in doc["error"], (method, path, raw and raw[:40], status, doc)
        assert "set-cookie" not in h, (method, path, h)
        assert "route" in doc and "latency_ms" in doc
    assert p.lsn() == before, "a refused request wrote something"


def test_demo_prints_the_latency_table():
    proc = subprocess.run([sys.executable, str(DEMO), "--n", "10"], capture_output=True, text=True,
                          timeout=120, env=_py_env(None), cwd=REPO)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout}"
    out = proc.stdout
    for op in ("local read", "write (POST", "read-after-write, wait", "read-after-write, promote", "p50", "p99"):
        assert op in out, out
    assert "stale reads after a write: 0" in out, out

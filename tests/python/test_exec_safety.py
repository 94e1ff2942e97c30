"""``/v1/exec`` made safe (issue 13 items 4-7 and the exec permission). Each test reproduces one
finding of the adversarial review and checks that it now fails safely: nothing committed,
nothing recorded in ``_repl_requests``, a clear error, later requests unaffected, and the
application's own write (busy_timeout 2 s) not blocked beyond the exec deadline.

What exec allows is in docs/SQL.md (repl_exec) and docs/FORMAT.md §8.8.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import Worker, WorkerError, lsn_checksum, start_serving_primary, wait_for, worker_status


def post(url: str, body: dict, token: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    """POST /v1/exec; (status, JSON answer) for success and HTTP errors alike."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + "/v1/exec", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def recorded(p: Worker) -> int:
    """Rows in _repl_requests (0 when the table does not exist yet)."""
    if not p.one("SELECT count(*) FROM sqlite_schema WHERE name = '_repl_requests'"):
        return 0
    return p.one("SELECT count(*) FROM _repl_requests")


def app_writes_within(app: Worker, seconds: float) -> float:
    """The application's own INSERT (its own connection, busy_timeout 2 s) succeeds, within
    ``seconds``; returns how long it took."""
    t0 = time.monotonic()
    app.q("INSERT INTO app(v) VALUES ('mine')")
    took = time.monotonic() - t0
    assert took < seconds, f"the application's write waited {took:.2f} s"
    return took


@pytest.fixture
def primary(tmp):
    p, url = start_serving_primary(tmp / "p.db", exec_on=True)
    p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", "CREATE TABLE app(v TEXT)"])
    app = Worker(tmp / "p.db", busy=2000)
    yield p, url, app
    app.close()
    p.close()


def refused(url: str, sql: str, *words: str, request_id: str | None = None) -> dict:
    body = {"sql": sql}
    if request_id:
        body["request_id"] = request_id
    status, a = post(url, body)
    assert status == 422 and a.get("refused") is True and a["code"] == 23, (sql, status, a)
    for w in words:
        assert w.lower() in a["error"].lower(), (sql, a)
    return a


def unchanged(p: Worker, before, rows: int = 0) -> None:
    assert lsn_checksum(p) == before, "a refused request changed the primary"
    assert p.one("SELECT count(*) FROM t") == rows
    assert recorded(p) == 0


def later_requests_work(url: str, p: Worker, v: str = "later") -> None:
    status, a = post(url, {"sql": "INSERT INTO t(v) VALUES (?) RETURNING v", "params": [v], "request_id": f"ok-{v}"})
    assert status == 200 and a["rows"] == [[v]], a
    assert p.one("SELECT v FROM t WHERE v = ?", [v]) == v


def test_commit_inside_script_commits_nothing_and_retry_is_safe(tmp, primary):
    p, url, app = primary
    before = lsn_checksum(p)
    for _ in range(2):  # the retry with the same id: refused again, still nothing
        refused(url, "INSERT INTO t(v) VALUES ('x'); COMMIT", "COMMIT", "one transaction", request_id="r1")
        unchanged(p, before)
    refused(url, "INSERT INTO t(v) VALUES ('x'); SAVEPOINT s; RELEASE s", "SAVEPOINT", request_id="r2")
    refused(url, "INSERT INTO t(v) VALUES ('x'); ROLLBACK", "ROLLBACK", request_id="r3")
    unchanged(p, before)
    later_requests_work(url, p)
    app_writes_within(app, 1.0)


def test_commit_then_begin_is_refused_before_running(tmp, primary):
    p, url, app = primary
    before = lsn_checksum(p)
    out = tmp / "x.db"
    refused(url, "COMMIT; INSERT INTO t(v) VALUES ('x'); BEGIN", "COMMIT", request_id="c1")
    refused(url, f"COMMIT; VACUUM INTO '{out}'; BEGIN", "COMMIT", request_id="c2")
    assert not out.exists()
    unchanged(p, before)
    later_requests_work(url, p)
    app_writes_within(app, 1.0)


def test_vacuum_into_is_refused_and_creates_no_file(tmp, primary):
    p, url, app = primary
    before = lsn_checksum(p)
    out = tmp / "x.db"
    refused(url, f"VACUUM INTO '{out}'", "VACUUM")
    refused(url, f"INSERT INTO t(v) VALUES ('x'); /* c */ vacuum into '{out}'", "VACUUM", request_id="v1")
    refused(url, "VACUUM", "VACUUM")
    assert not out.exists()
    unchanged(p, before)
    later_requests_work(url, p)
    app_writes_within(app, 1.0)


def test_temp_trigger_does_not_survive_to_the_next_request(tmp, primary):
    p, url, app = primary
    before = lsn_checksum(p)
    refused(url, "CREATE TEMP TRIGGER tr AFTER INSERT ON main.t BEGIN UPDATE t SET v = 'hacked' "
                 "WHERE id = new.id; END", "TEMP")
    refused(url, "CREATE TEMP TABLE x(a)", "TEMP")
    refused(url, "CREATE TEMP VIEW w AS SELECT 1", "TEMP")
    # A refusal after a write of the same script rolls the write back (the temp trigger is
    # judged once t2 exists, inside the transaction).
    refused(url, "CREATE TABLE t2(a); CREATE TEMP TRIGGER tr2 AFTER INSERT ON t2 BEGIN SELECT 1; END",
            "TEMP", request_id="t1")
    assert p.one("SELECT count(*) FROM sqlite_schema WHERE name = 't2'") == 0
    unchanged(p, before)
    later_requests_work(url, p, "clean")
    assert p.one("SELECT v FROM t") == "clean"
    app_writes_within(app, 1.0)


def test_query_only_does_not_survive(tmp, primary):
    p, url, app = primary
    before = lsn_checksum(p)
    a = refused(url, "PRAGMA query_only = 1", "PRAGMA query_only", "read")
    refused(url, "PRAGMA main.journal_mode = DELETE", "journal_mode")
    refused(url, "PRAGMA busy_timeout = 0", "busy_timeout")
    unchanged(p, before)
    # Reading pragmas are allowed.
    status, a = post(url, {"sql": "PRAGMA table_info(t)"})
    assert status == 200 and [r[1] for r in a["rows"]] == ["id", "v"], a
    status, a = post(url, {"sql": "PRAGMA foreign_keys"})
    assert status == 200 and a["rows"] == [[0]], a
    later_requests_work(url, p)
    # Each request has a fresh connection: nothing of the previous one is seen.
    status, a = post(url, {"sql": "SELECT last_insert_rowid(), total_changes()"})
    assert status == 200 and a["rows"] == [[0, 0]], a
    app_writes_within(app, 1.0)


def test_attach_is_refused(tmp, primary):
    p, url, app = primary
    other = tmp / "other.db"
    with sqlite3.connect(other) as c:  # the stdlib module: its own SQLite, no extension
        c.execute("CREATE TABLE x(a)")
    size = other.stat().st_size
    before = lsn_checksum(p)
    refused(url, f"ATTACH '{other}' AS o; INSERT INTO o.x VALUES (1)", "ATTACH", request_id="a1")
    refused(url, f"ATTACH '{tmp / 'new.db'}' AS n", "ATTACH")
    refused(url, "DETACH o", "DETACH")
    assert not (tmp / "new.db").exists() and other.stat().st_size == size
    with sqlite3.connect(other) as c:
        assert c.execute("SELECT count(*) FROM x").fetchone()[0] == 0
    unchanged(p, before)
    later_requests_work(url, p)
    app_writes_within(app, 1.0)


def test_code_loading_files_and_the_extension_functions_are_refused(tmp, primary):
    p, url, app = primary
    before = lsn_checksum(p)
    refused(url, "SELECT load_extension('/tmp/evil')", "load_extension")
    refused(url, f"SELECT repl_config('log_file', '{tmp / 'log.txt'}')", "repl_config")
    refused(url, "SELECT repl_primary('0.0.0.0:0')", "repl_primary")
    refused(url, "INSERT INTO t(v) VALUES (repl_lsn())", "repl_lsn", request_id="f1")
    assert not (tmp / "log.txt").exists()
    unchanged(p, before)
    later_requests_work(url, p)
    # The request record cannot be rewritten through exec (at most once depends on it).
    refused(url, "DELETE FROM _repl_requests", "_repl_requests")
    refused(url, "UPDATE _repl_requests SET id = 'x'", "_repl_requests")
    refused(url, "DROP TABLE _repl_requests", "_repl_requests")
    assert recorded(p) == 1
    app_writes_within(app, 1.0)


def test_long_read_hits_the_deadline_and_does_not_block_the_application_writer(tmp, primary):
    p, url, app = primary
    assert p.one("SELECT repl_config('exec_timeout_ms', 1000)") == 1000
    before = lsn_checksum(p)
    slow = ("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 2000000000) "
            "SELECT count(*) FROM c")
    result = {}

    def run(sql, rid):
        t0 = time.monotonic()
        result[rid] = post(url, {"sql": sql, "request_id": rid}), time.monotonic() - t0

    # A read: no write lock at all, so the application writes at once while it runs.
    p.one("SELECT repl_config('exec_timeout_ms', 3000)")
    th = threading.Thread(target=run, args=(slow, "slow-read"))
    th.start()
    took = app_writes_within(app, 0.5)
    assert th.is_alive(), f"the read ended before the application's write ({took:.2f} s)"
    th.join(30)
    (status, a), took = result["slow-read"]
    assert status == 422 and a["limit"] == "exec_timeout_ms" and "exec_timeout_ms (3000 ms)" in a["error"], a
    assert 2.9 < took < 8, took
    p.one("SELECT repl_config('exec_timeout_ms', 1000)")
    # A write with a slow part holds the write lock for at most the deadline: the application
    # (busy_timeout 2 s) waits for it, then writes.
    th = threading.Thread(target=run, args=(f"INSERT INTO t(v) {slow}", "slow-write"))
    th.start()
    with Worker(tmp / "p.db", busy=0) as probe:
        def locked():
            try:
                probe.q("BEGIN IMMEDIATE")
            except WorkerError:
                return True
            probe.q("ROLLBACK")
            return False
        wait_for(locked, timeout=10, interval=0.01, what="the slow write to take the write lock")
    app_writes_within(app, 1.9)
    th.join(30)
    (status, a), took = result["slow-write"]
    assert status == 422 and a["limit"] == "exec_timeout_ms", a
    assert p.one("SELECT count(*) FROM t") == 0 and recorded(p) == 0
    assert p.one("SELECT count(*) FROM app") == 2
    assert lsn_checksum(p)[0] == before[0] + 2, "only the application's two writes committed"
    later_requests_work(url, p)


def test_result_size_cap(tmp, primary):
    p, url, app = primary
    p.one("SELECT repl_config('exec_max_rows', 100)")
    before = lsn_checksum(p)
    rows = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000) "
    status, a = post(url, {"sql": rows + "SELECT n FROM c"})
    assert status == 422 and a["limit"] == "exec_max_rows" and "exec_max_rows (100)" in a["error"], a
    status, a = post(url, {"sql": f"INSERT INTO t(v) {rows} SELECT n FROM c RETURNING id", "request_id": "big"})
    assert status == 422 and a["limit"] == "exec_max_rows", a
    unchanged(p, before)
    p.one("SELECT repl_config('exec_max_bytes', 1000)")
    status, a = post(url, {"sql": "SELECT zeroblob(2000)"})
    assert status == 422 and a["limit"] == "exec_max_bytes" and "exec_max_bytes (1000)" in a["error"], a
    status, a = post(url, {"sql": "SELECT n FROM (" + rows + "SELECT n FROM c) LIMIT 100"})
    assert status == 200 and len(a["rows"]) == 100, a
    unchanged(p, before)
    later_requests_work(url, p)
    app_writes_within(app, 1.0)


def test_exec_is_off_unless_enabled(tmp):
    p, url = start_serving_primary(tmp / "p.db", exec_on=False)
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        assert p.one("SELECT repl_config('exec')") == 0
        for name, bad, words in [("exec", 2, "1 (accept forwarded writes) or 0"),
                                 ("exec_timeout_ms", 0, "between 1 and 50000"),
                                 ("exec_timeout_ms", 50001, "a replica waits 60 s")]:
            with pytest.raises(WorkerError) as e:
                p.q("SELECT repl_config(?, ?)", [name, bad])
            assert words in e.value.msg, e.value.msg
        assert p.one("SELECT repl_config('exec')") == 0
        before = lsn_checksum(p)
        status, a = post(url, {"sql": "INSERT INTO t(v) VALUES ('x')", "request_id": "off"})
        assert status == 403 and "repl_config('exec', 1)" in a["error"], (status, a)
        with Worker(tmp / "r.db") as r:
            r.q("SELECT repl_follow(?)", [url])
            with pytest.raises(WorkerError) as e:
                r.q("SELECT repl_exec('INSERT INTO t(v) VALUES (1)')")
            assert "403" in e.value.msg and "repl_config('exec', 1)" in e.value.msg, e.value.msg
            unchanged(p, before)
            p.one("SELECT repl_config('exec', 1)")
            assert r.one("SELECT repl_exec('INSERT INTO t(v) VALUES (1)')") == before[0] + 1
            p.one("SELECT repl_config('exec', 0)")
            status, a = post(url, {"sql": "INSERT INTO t(v) VALUES ('x')"})
            assert status == 403, a
        assert p.one("SELECT count(*) FROM t") == 1
        assert json.loads(p.one("SELECT repl_config()"))["exec"] == 0
    finally:
        p.close()


def test_exec_token_distinct_from_read_token(tmp):
    p, url = start_serving_primary(tmp / "p.db", token="readtok", exec_token="exectok", exec_on=True)
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        assert worker_status(p)["server"]["exec_auth"] is True
        before = lsn_checksum(p)
        for tok in (None, "readtok", "wrong"):
            status, a = post(url, {"sql": "INSERT INTO t(v) VALUES ('x')"}, token=tok)
            assert status == 401 and "exec token" in a["error"], (tok, status, a)
        unchanged(p, before)
        # The exec token does not read the log.
        req = urllib.request.Request(url + "/v1/info", headers={"Authorization": "Bearer exectok"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401
        status, a = post(url, {"sql": "INSERT INTO t(v) VALUES ('direct')"}, token="exectok")
        assert status == 200 and a["changes"] == 1, a
        # A replica that holds only the read token follows but cannot write.
        with Worker(tmp / "r1.db") as r:
            r.q("SELECT repl_follow(?)", [f"{url}?token=readtok"])
            with pytest.raises(WorkerError) as e:
                r.q("SELECT repl_exec('INSERT INTO t(v) VALUES (1)')")
            assert "401" in e.value.msg and "exec" in e.value.msg, e.value.msg
        # With exec_token= in its URL (or REPL_EXEC_TOKEN) it writes.
        with Worker(tmp / "r2.db") as r:
            r.q("SELECT repl_follow(?)", [f"{url}?token=readtok&exec_token=exectok"])
            lsn = r.one("SELECT repl_exec('INSERT INTO t(v) VALUES (?)', '[\"fwd\"]')")
            assert r.one("SELECT v FROM t WHERE id = 2") == "fwd"
        with Worker(tmp / "r3.db", env={"REPL_EXEC_TOKEN": "exectok"}) as r:
            r.q("SELECT repl_follow(?)", [f"{url}?token=readtok"])
            assert r.one("SELECT repl_exec('INSERT INTO t(v) VALUES (3)')") > lsn
        assert p.one("SELECT count(*) FROM t") == 3
    finally:
        p.close()


def test_a_script_that_creates_then_uses_a_table_runs_as_one_transaction(tmp, primary):
    p, url, app = primary
    status, a = post(url, {"sql": "CREATE TABLE n(x); INSERT INTO n VALUES (?); SELECT x FROM n",
                           "params": [5], "request_id": "mig"})
    assert status == 200 and a["rows"] == [[5]] and a["duplicate"] is False, a
    status, b = post(url, {"sql": "CREATE TABLE n(x); INSERT INTO n VALUES (?); SELECT x FROM n",
                           "params": [5], "request_id": "mig"})
    assert status == 200 and b["duplicate"] is True, b
    assert p.one("SELECT count(*) FROM n") == 1 and recorded(p) == 1
    # A read-only script records nothing and creates no LSN.
    lsn = p.one("SELECT repl_lsn()")
    status, c = post(url, {"sql": "SELECT count(*) FROM n; SELECT x FROM n", "request_id": "read"})
    assert status == 200 and c["rows"] == [[5]] and c["lsn"] == lsn and recorded(p) == 1, c

"""Write forwarding and read-your-writes sessions (issue 5): ``repl_exec`` on a replica sends
the write to the primary (``POST /v1/exec``), which runs it as one transaction and answers with
the commit's LSN; the replica then holds that LSN before ``repl_exec`` returns. The LSN is the
session token: ``repl_wait(token)`` on any other replica is the read barrier.

* session consistency: three following replicas, 1000 iterations of "write through a random
  replica, read through another random one after repl_wait(token)": 0 stale reads;
* duplicate suppression: the same request id twice executes once, also when the connection is
  cut after the primary committed and the request is retried;
* errors: constraint violation, syntax error, the primary down (nothing applied), a wrong token,
  params that are not a JSON array, a binding count mismatch — each with the primary's SQLite
  error code where it has one.
"""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from helpers import (
    Worker, WorkerError, lsn_checksum, py_ok, serving_primary_and_follower, start_primary, start_serving_primary,
    stock_tables, wait_for, worker_tables,
)


SESSION = """
import random
urls, n = json.loads(os.environ["DBS"]), int(os.environ["N"])
conns = [connect(d) for d in urls]
for c in conns:
    c.setbusytimeout(5000)
rng = random.Random(7)
stale, writes = [], 0
for i in range(n):
    w, rd = rng.sample(range(len(conns)), 2)
    token = one(conns[w], "SELECT repl_exec('INSERT INTO log(i, v) VALUES (?, ?)', ?)", (json.dumps([i, f"v{i}"]),))
    writes += 1
    one(conns[rd], "SELECT repl_wait(?, 5000)", (token,))
    got = one(conns[rd], "SELECT v FROM log WHERE i = ?", (i,))
    if got != f"v{i}":
        stale.append([i, w, rd, token, got])
print(json.dumps({"writes": writes, "stale": stale[:10], "n_stale": len(stale)}))
"""


def test_session_consistency_across_three_following_replicas(tmp):
    p, url = start_serving_primary(tmp / "p.db", exec_on=True)
    replicas = []
    try:
        p.q("CREATE TABLE log(i INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        dbs = [tmp / f"r{i}.db" for i in range(3)]
        for d in dbs:
            # Each replica follows in its own process (the session client below is another).
            w = Worker(d)
            w.one("SELECT repl_follow(?, 500)", [url])
            replicas.append(w)
        # The client process opens the same replicas; the followers in the other processes
        # apply, repl_wait in the client waits on the shared position.
        out = py_ok(SESSION, env={"DBS": json.dumps([str(d) for d in dbs]), "N": "1000"}, timeout=300)
        res = json.loads(out.strip().splitlines()[-1])
        assert res["writes"] == 1000 and res["n_stale"] == 0, res
        want = lsn_checksum(p)
        for r in replicas:
            assert r.one("SELECT repl_wait(?, 10000)", [want[0]]) == want[0]
            assert lsn_checksum(r) == want
        assert p.one("SELECT count(*) FROM log") == 1000
    finally:
        for r in replicas:
            r.close()
        p.close()
    for d in dbs:
        assert stock_tables(d) == stock_tables(tmp / "p.db")


def test_same_request_id_executes_once_even_after_a_cut_connection(tmp):
    with serving_primary_and_follower(tmp, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)") as (p, url, r):
        sql = "INSERT INTO t(v) VALUES (?) RETURNING id"
        a = json.loads(r.one("SELECT repl_exec_json(?, ?, ?)", [sql, '["once"]', "req-42"]))
        b = json.loads(r.one("SELECT repl_exec_json(?, ?, ?)", [sql, '["once"]', "req-42"]))
        assert a["duplicate"] is False and b["duplicate"] is True, (a, b)
        assert a["rows"] == b["rows"] == [[1]] and b["lsn"] >= a["lsn"], (a, b)
        assert r.one("SELECT count(*) FROM t WHERE v = 'once'") == 1
        # A client whose connection is cut after the primary committed, but before the
        # answer arrived: send the request and hang up without reading the answer.
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"sql": "INSERT INTO t(v) VALUES ('cut')", "request_id": "req-cut"}).encode()
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v1/exec HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            s.shutdown(socket.SHUT_WR)
        wait_for(lambda: p.one("SELECT count(*) FROM t WHERE v = 'cut'") == 1, timeout=10,
                 what="the cut request to commit on the primary")
        # The retry (same id) is answered from the record, not run again.
        again = json.loads(r.one("SELECT repl_exec_json('INSERT INTO t(v) VALUES (''cut'')', NULL, 'req-cut')"))
        assert again["duplicate"] is True, again
        assert r.one("SELECT count(*) FROM t WHERE v = 'cut'") == 1
        assert p.one("SELECT count(*) FROM t WHERE v = 'cut'") == 1
        # Different ids run twice, as asked.
        r.q("SELECT repl_exec('INSERT INTO t(v) VALUES (''twice'')', NULL, 'x1')")
        r.q("SELECT repl_exec('INSERT INTO t(v) VALUES (''twice'')', NULL, 'x2')")
        assert r.one("SELECT count(*) FROM t WHERE v = 'twice'") == 2
        assert lsn_checksum(r) == lsn_checksum(p)


def refused(w: Worker, sql: str, args, *words: str) -> WorkerError:
    with pytest.raises(WorkerError) as e:
        w.q(sql, args)
    for word in words:
        assert word.lower() in e.value.msg.lower(), (sql, args, e.value.msg)
    return e.value


def test_errors_are_clear_and_apply_nothing(tmp):
    p, url = start_serving_primary(tmp / "p.db", token="s3cret", exec_on=True)
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE NOT NULL)")
        p.q("INSERT INTO t(v) VALUES ('taken')")
        with Worker(tmp / "r.db") as r:
            r.q("SELECT repl_sync(?)", [f"{url}?token=s3cret"])
            before = lsn_checksum(p)
            e = refused(r, "SELECT repl_exec('INSERT INTO t(v) VALUES (?)', '[\"taken\"]')", [], "UNIQUE constraint failed")
            assert e.name == "ConstraintError", e.name  # SQLITE_CONSTRAINT_UNIQUE from the primary
            e = refused(r, "SELECT repl_exec('INSRT INTO t VALUES (1)')", [], "syntax error")
            assert e.name == "SQLError"
            refused(r, "SELECT repl_exec('INSERT INTO t(v) VALUES (?)', '{\"v\": 1}')", [], "JSON array")
            refused(r, "SELECT repl_exec('INSERT INTO t(v) VALUES (?)', 'not json')", [], "JSON array")
            refused(r, "SELECT repl_exec('INSERT INTO t(v) VALUES (?)', '[1, 2]')", [], "1 parameters but 2 values")
            refused(r, "SELECT repl_exec('INSERT INTO t(v) VALUES (?, ?)', '[1]')", [], "refused")
            # A script is atomic: the failing second statement undoes the first.
            refused(r, "SELECT repl_exec('INSERT INTO t(v) VALUES (''new''); INSERT INTO t(v) VALUES (''taken'')')", [], "UNIQUE")
            refused(r, "SELECT repl_exec('BEGIN; INSERT INTO t(v) VALUES (''x''); COMMIT')", [], "transaction")
            assert lsn_checksum(p) == before, "a refused write changed the primary"
            assert p.one("SELECT count(*) FROM t") == 1
            # A plain write on the replica is still refused locally.
            refused(r, "INSERT INTO t(v) VALUES ('local')", [], "readonly")
        # A wrong token: refused by the primary, nothing applied.
        with Worker(tmp / "r2.db", env={"REPL_TOKEN": "s3cret"}) as r2:
            r2.q("SELECT repl_sync(?)", [url])
        with Worker(tmp / "r2.db", env={"REPL_TOKEN": "wrong"}) as r2:
            refused(r2, "SELECT repl_exec('INSERT INTO t(v) VALUES (''w'')')", [], "401", "token")
        assert lsn_checksum(p) == before
        # The primary down: a clear error; the replica stays readable.
        p.close()
        with Worker(tmp / "r.db") as r:
            refused(r, "SELECT repl_exec('INSERT INTO t(v) VALUES (''down'')')", [], "cannot reach the primary", "same request id")
            assert r.one("SELECT count(*) FROM t") == 1
    finally:
        p.close()
    with start_primary(tmp / "p.db") as p2:
        assert p2.one("SELECT count(*) FROM t WHERE v = 'down'") == 0


def test_repl_exec_on_a_primary_runs_locally_and_on_a_directory_replica_is_refused(tmp):
    with start_primary(tmp / "p.db") as p:
        p.q("CREATE TABLE t(x)")
        lsn = p.one("SELECT repl_exec('INSERT INTO t VALUES (?)', '[5]')")
        assert lsn == p.one("SELECT repl_lsn()") and p.one("SELECT x FROM t") == 5
        with Worker(tmp / "r.db") as r:
            r.q("SELECT repl_sync(?)", [str(tmp / "p.db")])
            refused(r, "SELECT repl_exec('INSERT INTO t VALUES (1)')", [], "directory source", "http")
        with Worker(tmp / "plain.db") as w:
            refused(w, "SELECT repl_exec('INSERT INTO t VALUES (1)')", [], "neither a primary nor a replica")
        assert worker_tables(p)["t"] == [[5]]


def test_exec_endpoint_over_plain_http(tmp):
    p, url = start_serving_primary(tmp / "p.db", exec_on=True)
    try:
        p.q("CREATE TABLE t(x)")
        req = urllib.request.Request(url + "/v1/exec", data=json.dumps({"sql": "INSERT INTO t VALUES (?) RETURNING x", "params": [7]}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        a = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert a["rows"] == [[7]] and a["changes"] == 1 and a["lsn"] == p.one("SELECT repl_lsn()"), a
        for body, status in [(b"not json", 400), (json.dumps({"params": []}).encode(), 400),
                             (json.dumps({"sql": "SELECT 1", "params": "x"}).encode(), 400),
                             (json.dumps({"sql": "INSERT INTO nope VALUES (1)"}).encode(), 422)]:
            req = urllib.request.Request(url + "/v1/exec", data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == status, (body, e.value.code)
            assert json.loads(e.value.read())["error"]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/v1/exec", timeout=10)
        assert e.value.code == 405
    finally:
        p.close()


def test_a_forwarded_read_commits_nothing_and_reports_its_own_counts(tmp):
    with serving_primary_and_follower(tmp, "CREATE TABLE t(x)") as (p, url, r):
        a = json.loads(r.one("SELECT repl_exec_json('INSERT INTO t VALUES (1)', NULL, 'w1')"))
        assert a["changes"] == 1 and a["last_insert_rowid"] == 1
        for i in range(3):
            b = json.loads(r.one("SELECT repl_exec_json('SELECT count(*) FROM t', NULL, ?)", [f"read{i}"]))
            assert b["rows"] == [[1]] and b["changes"] == 0 and b["last_insert_rowid"] == 0, b
            assert b["lsn"] == a["lsn"], "a read created a commit"
        assert p.one("SELECT count(*) FROM _repl_requests") == 1

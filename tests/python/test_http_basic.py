"""HTTP transport basics (issue 4): a primary process serving its log with
``repl_primary('127.0.0.1:0')``; replica processes using ``repl_sync('http://…')`` exactly like
the directory source, following with ``repl_follow()`` and waiting with ``repl_wait()``; three
replicas following one primary; the endpoints' JSON and metrics as a user would read them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
import urllib.request

import pytest

from helpers import (
    start_serving_primary,
    py_ok,
    Worker,
    WorkerError,
    lsn_checksum,
    start_primary,
    stock_one,
    stock_tables,
    wait_for,
    worker_status,
    worker_tables,
)


def test_replica_over_http_equals_the_primary_and_follows(tmp):
    p, url = start_serving_primary(tmp / "p.db")
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
        p.q("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 200) INSERT INTO t(v, b) SELECT 'row' || n, randomblob(5000) FROM c")
        with Worker(tmp / "r.db") as r:
            want = lsn_checksum(p)
            assert r.one("SELECT repl_sync(?)", [url]) == want[0]
            assert lsn_checksum(r) == want
            assert stock_tables(tmp / "r.db") == worker_tables(p)
            st = worker_status(r)
            assert st["role"] == "replica" and st["source"] == url and st["lag_lsn"] == 0, st
            # Following: every commit arrives without calling repl_sync().
            assert r.one("SELECT repl_follow()") == want[0]
            for i in range(20):
                p.q("UPDATE t SET v = ? WHERE id = ?", [f"new{i}", i + 1])
                lsn = p.one("SELECT repl_lsn()")
                assert r.one("SELECT repl_wait(?, 5000)", [lsn]) >= lsn
                assert r.one("SELECT v FROM t WHERE id = ?", [i + 1]) == f"new{i}"
            st = worker_status(r)
            assert st["follow"]["state"] in ("waiting", "applying") and st["follow"]["errors"] == 0, st
            assert lsn_checksum(r) == lsn_checksum(p)
            # The primary lists the follower.
            followers = worker_status(p)["server"]["followers"]
            assert len(followers) == 1 and followers[0]["last_lsn"] == p.one("SELECT repl_lsn()"), followers
            # Stop following: commits no longer arrive by themselves; repl_wait still works
            # (it syncs by itself when nobody follows).
            r.q("SELECT repl_follow(NULL)")
            assert worker_status(r)["follow"] is None
            p.q("INSERT INTO t(v) VALUES ('after unfollow')")
            lsn = p.one("SELECT repl_lsn()")
            assert r.one("SELECT repl_wait(?, 5000)", [lsn]) == lsn
            assert r.one("SELECT count(*) FROM t WHERE v = 'after unfollow'") == 1
        # Reopening resumes the role and the HTTP source.
        p.q("INSERT INTO t(v) VALUES ('while closed')")
        with Worker(tmp / "r.db") as r:
            assert r.one("SELECT repl_role()") == "replica"
            assert r.one("SELECT repl_sync()") == p.one("SELECT repl_lsn()")
            assert lsn_checksum(r) == lsn_checksum(p)
    finally:
        p.close()
    assert stock_one(tmp / "r.db", "PRAGMA integrity_check;") == "ok"


def test_three_replicas_follow_one_primary(tmp):
    p, url = start_serving_primary(tmp / "p.db")
    replicas = []
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER)")
        for i in range(3):
            r = Worker(tmp / f"r{i}.db")
            replicas.append(r)
            r.one("SELECT repl_follow(?, 500)", [url])
        for v in range(100):
            p.q("INSERT INTO t(v) VALUES (?)", [v])
        want = lsn_checksum(p)
        for r in replicas:
            assert r.one("SELECT repl_wait(?, 10000)", [want[0]]) == want[0]
            assert lsn_checksum(r) == want
        wait_for(lambda: len(worker_status(p)["server"]["followers"]) == 3, timeout=10, what="3 followers listed")
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert f"sqlite_replica_lsn {want[0]}" in metrics
        assert "sqlite_replica_followers 3" in metrics
        assert metrics.count("sqlite_replica_follower_lag_lsn{") == 3
    finally:
        for r in replicas:
            r.close()
        p.close()
    for i in range(3):
        assert stock_tables(tmp / f"r{i}.db") == stock_tables(tmp / "p.db")


def test_info_endpoint_and_wait_errors(tmp):
    p, url = start_serving_primary(tmp / "p.db")
    try:
        p.q("CREATE TABLE t(x)")
        lsn = p.one("SELECT repl_lsn()")
        # The durable watermark follows the commit within a group-fsync round: poll.
        info = wait_for(lambda: (i := json.loads(urllib.request.urlopen(url + "/v1/info", timeout=5).read()))
                        ["durable_lsn"] == lsn and i, timeout=10, what="the commit to be durable")
        assert info["format"] == 1
        assert info["lineage"] == worker_status(p)["lineage"] and info["page_size"] == 4096
        with Worker(tmp / "r.db") as r:
            r.q("SELECT repl_sync(?)", [url])
            lsn = r.one("SELECT repl_lsn()")
            lineage = worker_status(r)["lineage"]
            assert r.one("SELECT repl_wait(?)", [f"{lineage}:{lsn}"]) == lsn
            for args, words in [
                ([lsn + 100, 300], ("timed out after 300 ms", f"LSN {lsn}")),
                ([f"{'0' * 32}:{lsn}"], ("lineage", "another primary")),
                (["soon"], ("got the text 'soon'",)),
                ([-1], ("non-negative",)),
                ([lsn, -5], ("timeout_ms",)),
            ]:
                with pytest.raises(WorkerError) as e:
                    r.q("SELECT repl_wait(" + ", ".join("?" * len(args)) + ")", args)
                for w in words:
                    assert w in e.value.msg, (args, e.value.msg)
            with pytest.raises(WorkerError) as e:
                r.q("SELECT repl_follow(?, 0)", [url])
            assert "interval_ms" in e.value.msg
        # On a primary, repl_wait waits for its own LSN; repl_follow is refused.
        assert p.one("SELECT repl_wait(?)", [p.one("SELECT repl_lsn()")]) == p.one("SELECT repl_lsn()")
        with pytest.raises(WorkerError) as e:
            p.q("SELECT repl_follow(?)", [url])
        assert "is a primary" in e.value.msg
    finally:
        p.close()


def test_directory_source_follow(tmp):
    with start_primary(tmp / "p.db") as p, Worker(tmp / "r.db") as r:
        p.q("CREATE TABLE t(x)")
        r.one("SELECT repl_follow(?)", [str(tmp / "p.db")])
        for i in range(10):
            p.q("INSERT INTO t VALUES (?)", [i])
        lsn = p.one("SELECT repl_lsn()")
        assert r.one("SELECT repl_wait(?, 5000)", [lsn]) == lsn
        assert lsn_checksum(r) == lsn_checksum(p)


def test_uri_parameters_serve_and_follow(tmp):
    """``file:p.db?repl_listen=127.0.0.1:0`` serves like ``repl_primary('127.0.0.1:0')``;
    ``file:r.db?repl_follow=1`` follows the remembered source from the moment it is opened;
    bad values make the open fail with a message naming the parameter."""
    p = Worker(f"file:{tmp / 'p.db'}?repl_listen=127.0.0.1:0")
    try:
        assert p.one("SELECT repl_role()") == "primary"
        url = worker_status(p)["server"]["url"]
        p.q("CREATE TABLE t(x)")
        with Worker(tmp / "r.db") as r:
            r.q("SELECT repl_sync(?)", [url])
        with Worker(f"file:{tmp / 'r.db'}?repl_follow=1") as r:
            assert worker_status(r)["follow"]["source"] == url
            p.q("INSERT INTO t VALUES (42)")
            lsn = p.one("SELECT repl_lsn()")
            wait_for(lambda: r.one("SELECT repl_lsn()") == lsn, timeout=10, what="the follower to apply")
            assert r.one("SELECT x FROM t") == 42
        for uri, words in [
            (f"file:{tmp / 'fresh.db'}?repl_follow=1", ("repl_follow URI parameter", "not a replica")),
            (f"file:{tmp / 'r.db'}?repl_follow=maybe", ("must be 1 or 0",)),
            (f"file:{tmp / 'x.db'}?repl_token=abc", ("repl_token URI parameter needs repl_listen",)),
            (f"file:{tmp / 'y.db'}?repl_listen=0.0.0.0:0", ("refusing to listen",)),
        ]:
            with pytest.raises(AssertionError) as e:
                Worker(uri).close()
            for w in words:
                assert w in str(e.value), (uri, str(e.value)[-2000:])
    finally:
        p.close()


PROGRESS = """
import threading
c = apsw.Connection(os.environ["P_DB"], vfs="unix")
c.execute("PRAGMA journal_mode=WAL").fetchall()
c.execute("CREATE TABLE t(v)")
c.execute("BEGIN")
for i in range(32):
    c.execute("INSERT INTO t VALUES (randomblob(1000000))")
c.execute("COMMIT")
c.close()
p = connect(os.environ["P_DB"])
p.execute("SELECT repl_primary('127.0.0.1:0')").fetchall()
url = json.loads(one(p, "SELECT repl_status()"))["server"]["url"]
r1, r2 = connect(os.environ["R_DB"]), connect(os.environ["R_DB"])
t = threading.Thread(target=lambda: r1.execute("SELECT repl_sync(?)", (url,)).fetchall())
t.start()
seen = []
while t.is_alive():
    st = json.loads(one(r2, "SELECT repl_status()"))  # another connection of the same process
    if st.get("progress"):
        seen.append([st["progress"]["phase"], st["progress"]["bytes"], st["progress"]["total"]])
    time.sleep(0.002)  # sampling pace
t.join()
after = json.loads(one(r2, "SELECT repl_status()"))
print(json.dumps({"seen": seen, "after": after.get("progress"), "lsn": after["lsn"],
                  "same": one(r2, "SELECT repl_checksum()") == one(p, "SELECT repl_checksum()")}))
"""


def test_bootstrap_progress_is_visible_in_repl_status(tmp):
    out = py_ok(PROGRESS, env={"P_DB": str(tmp / "p.db"), "R_DB": str(tmp / "r.db")}, timeout=120)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["same"] and res["after"] is None, res
    phases = {s[0] for s in res["seen"]}
    assert phases & {"bootstrap download", "bootstrap write"}, res["seen"][:5]
    for phase, done, total in res["seen"]:
        assert 0 <= done <= total and total > 30_000_000, (phase, done, total)


CLI = str(Path(__file__).resolve().parents[2] / "build" / "sqlite-replica")


@pytest.mark.parametrize("kind", ["http", "dir"])
def test_cli_restore_with_progress(tmp, kind):
    """``sqlite-replica restore <source> <out.db>``: a plain database at the primary's LSN
    (snapshot + log), progress on stderr, equal content; refuses to overwrite a file."""
    p, url = start_serving_primary(tmp / "p.db")
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
        p.q("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 300) INSERT INTO t(b) SELECT randomblob(4000) FROM c")
        for i in range(20):
            p.q("UPDATE t SET b = randomblob(100) WHERE id = ?", [i + 1])
        want_lsn, want_ck = lsn_checksum(p)
        # Records are served once durable (the group fsync comes a moment after the commit).
        wait_for(lambda: (worker_status(p)["log"]["durable_lsn"] or 0) >= want_lsn, what="the last commit durable")
        source = url if kind == "http" else str(tmp / "p.db")
        out = tmp / "restored.db"
        proc = subprocess.run([CLI, "restore", source, str(out)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"at LSN {want_lsn}, checksum {want_ck}" in proc.stdout, proc.stdout
        assert "100%" in proc.stderr and "snapshot" in proc.stderr, proc.stderr
        assert stock_one(out, "PRAGMA integrity_check;") == "ok"
        assert stock_tables(out) == worker_tables(p)
        again = subprocess.run([CLI, "restore", source, str(out)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "exists" in again.stderr, again.stderr
    finally:
        p.close()

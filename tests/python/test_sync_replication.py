"""Synchronous replication (issue 16, part 1): with ``repl_config('sync_replicas', N)`` a commit
on the primary returns only once N followers acknowledged its LSN. A follower acknowledges LSN n
by asking for n + 1, which it does only after n is applied (visible to its readers) and its WAL
fsynced, so "applied" holds when COMMIT returns: read-your-writes on the replica without
``repl_wait``. Too few followers: the commit returns after ``sync_timeout_ms`` (it is durable on
the primary and cannot be taken back), the timeout is counted and logged, and
``repl_wait_replicas()`` fails with a message saying how many followers have it.
"""

from __future__ import annotations

import json
import time

from helpers import Worker, serving_primary_and_follower, sync_to, wait_for


def status(w: Worker) -> dict:
    return json.loads(w.one("SELECT repl_status()"))


def test_commit_returns_once_the_follower_applied_it(tmp):
    with serving_primary_and_follower(tmp, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)") as (p, url, r):
        sync_to(r, p.one("SELECT repl_lsn()"))
        assert p.one("SELECT repl_config('sync_replicas', 1)") == 1
        assert p.one("SELECT repl_config('sync_level', 'applied')") == "applied"
        assert p.one("SELECT repl_config('sync_timeout_ms', 20000)") == 20000
        stale = 0
        for i in range(1, 1001):
            p.q("INSERT INTO t(id, v) VALUES (?, 'x')", [i])
            # No repl_wait: the commit returned, so the follower has applied it already.
            stale += r.one("SELECT count(*) FROM t") != i
        assert stale == 0, f"{stale} of 1000 reads right after the commit did not see it"
        st = status(p)["sync"]
        assert st["replicas"] == 1 and st["level"] == "applied", st
        assert st["waits"] >= 1000 and st["timeouts"] == 0, st
        assert p.one("SELECT repl_wait_replicas()") >= 1
        followers = status(p)["server"]["followers"]
        assert [f["acked_lsn"] for f in followers] == [p.one("SELECT repl_lsn()")], followers


def test_too_few_followers_time_out_visibly(tmp):
    with serving_primary_and_follower(tmp, "CREATE TABLE t(id INTEGER PRIMARY KEY)") as (p, url, r):
        sync_to(r, p.one("SELECT repl_lsn()"))
        p.one("SELECT repl_config('sync_timeout_ms', 300)")
        p.one("SELECT repl_config('sync_replicas', 2)")  # only one follows
        t0 = time.monotonic()
        p.q("INSERT INTO t VALUES (1)")
        took = time.monotonic() - t0
        assert took >= 0.29, took  # waited for the second follower, the full timeout
        assert p.one("SELECT count(*) FROM t") == 1  # committed all the same
        st = status(p)["sync"]
        assert st["timeouts"] == 1, st
        lsn = p.one("SELECT repl_lsn()")
        try:
            p.one("SELECT repl_wait_replicas(?, 2, 200)", [lsn])
            raise AssertionError("repl_wait_replicas() did not fail")
        except Exception as e:  # noqa: BLE001 - the worker re-raises the SQLite error text
            assert "only 1 of 2 followers acknowledged LSN" in str(e), e
        assert p.one("SELECT repl_wait_replicas(?, 1, 5000)", [lsn]) >= 1
        # Asynchronous again: no wait at all.
        p.one("SELECT repl_config('sync_replicas', 0)")
        t0 = time.monotonic()
        p.q("INSERT INTO t VALUES (2)")
        assert time.monotonic() - t0 < 0.25
        wait_for(lambda: r.one("SELECT count(*) FROM t") == 2, timeout=10, what="the replica catching up")


def test_settings_refuse_bad_values(tmp):
    with serving_primary_and_follower(tmp) as (p, url, r):
        for sql in ["SELECT repl_config('sync_replicas', 17)", "SELECT repl_config('sync_level', 'fast')",
                    "SELECT repl_config('sync_timeout_ms', 0)"]:
            try:
                p.one(sql)
                raise AssertionError(f"{sql} was accepted")
            except Exception as e:  # noqa: BLE001
                assert "repl_config()" in str(e) and "sync_" in str(e), e
        assert p.one("SELECT repl_config('sync_replicas')") == 0
        try:
            r.one("SELECT repl_wait_replicas()")
            raise AssertionError("accepted on a replica")
        except Exception as e:  # noqa: BLE001
            assert "not a primary" in str(e), e


# A primary process: serves on PORT, synchronous with one follower at level durable, then
# commits one row per transaction and prints its id once COMMIT returned.
SYNC_WRITER = r"""
import random, time
db, port, seed = sys.argv_db, sys.argv_port, int(sys.argv_seed)
c = connect(db)
c.setbusytimeout(10000)
deadline = time.monotonic() + 15
while True:
    try:
        one(c, "SELECT repl_primary(?)", ("127.0.0.1:" + port,))
        break
    except apsw.Error as e:
        if "cannot listen" not in str(e) or time.monotonic() > deadline:
            raise
        time.sleep(0.05)
one(c, "SELECT repl_config('sync_replicas', 1)")
one(c, "SELECT repl_config('sync_level', 'durable')")
one(c, "SELECT repl_config('sync_timeout_ms', 60000)")
print("ready", flush=True)  # (the first commit below waits for the follower the test starts)
c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, pad BLOB)")
rng = random.Random(seed)
n = one(c, "SELECT coalesce(max(id), 0) FROM t")
while True:
    n += 1
    c.execute("INSERT INTO t(id, pad) VALUES (?, randomblob(?))", (n, rng.randint(10, 3000)))
    print(n, flush=True)
"""


def test_kill_the_primary_every_acknowledged_commit_is_on_the_replica(tmp):
    """sync_replicas=1, level durable: the primary process is killed (-9) at random moments under
    a write load, >= 50 times; right after each kill, every id whose COMMIT had returned is on the
    replica already (no waiting: it acknowledged them). After the last kill the replica is
    promoted: it holds every acknowledged commit and takes writes."""
    import os
    import random
    import signal
    import socket
    import threading

    from helpers import spawn_py

    kills = int(os.environ.get("REPL_SYNC_KILLS", "50"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pdb = tmp / "p.db"
    rng = random.Random(99)
    printed: list[int] = []
    r = None
    try:
        for k in range(kills):
            code = (SYNC_WRITER.replace("sys.argv_db", repr(str(pdb))).replace("sys.argv_port", repr(str(port)))
                    .replace("sys.argv_seed", repr(str(k))))
            w = spawn_py(code)
            lines: list[str] = []

            def read(w=w, lines=lines) -> None:
                for line in w.stdout:
                    if not line.endswith("\n"):
                        break
                    lines.append(line.strip())

            t = threading.Thread(target=read, daemon=True)
            t.start()
            wait_for(lambda: "ready" in lines or w.poll() is not None, timeout=30, what="the primary to start")
            assert w.poll() is None, w.stderr.read()
            if r is None:
                r = Worker(tmp / "r.db")
                r.q("SELECT repl_follow(?)", [f"http://127.0.0.1:{port}"])
            # Let it commit for a while (each commit waits for the follower), then kill it.
            time.sleep(rng.choice([0.02, 0.1, rng.uniform(0, 0.4)]))
            os.kill(w.pid, signal.SIGKILL)
            w.wait(timeout=30)
            t.join(timeout=10)
            ids = [int(x) for x in lines if x.isdigit()]
            printed.extend(ids)
            if printed:
                have = r.one("SELECT count(*) FROM t WHERE id <= ?", [max(printed)])
                missing = r.one("SELECT ? - count(*) FROM t WHERE id IN (SELECT value FROM json_each(?))",
                                [len(printed), json.dumps(printed)])
                assert missing == 0, f"after kill {k}: {missing} acknowledged commits missing on the replica ({have} there)"
        assert len(printed) > kills, printed[-5:]
        # The primary stays dead: promote the replica. Every acknowledged commit is there, it
        # takes writes of the next epoch, and no id was ever acknowledged twice.
        assert len(set(printed)) == len(printed), "an id was acknowledged by two commits"
        done = json.loads(r.one("SELECT repl_promote('127.0.0.1:0')"))
        assert done["epoch"] >= 2, done
        missing = r.one("SELECT ? - count(*) FROM t WHERE id IN (SELECT value FROM json_each(?))",
                        [len(printed), json.dumps(printed)])
        assert missing == 0, f"after promotion: {missing} acknowledged commits missing"
        r.q("INSERT INTO t(id, pad) VALUES (?, x'00')", [max(printed) + 10**6])
        assert status(r)["role"] == "primary", status(r)
    finally:
        if r is not None:
            r.close()

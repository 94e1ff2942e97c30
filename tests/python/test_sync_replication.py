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

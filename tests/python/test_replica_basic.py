"""Replica basics (WAL.md §G5, §E.1, §E.8): a primary process, an applier process, readers in
other processes that never load the extension.

- G5: three primary transactions, one ``repl_sync()`` each; after each a FRESH stock reader
  (``/usr/bin/sqlite3`` 3.40.1 without ``.load``, and apsw 3.54 without the extension) sees
  exactly the primary's content, ``integrity_check`` is ok, and ``repl_checksum()`` of the
  replica equals the primary's at the same LSN.
- bootstrap of a non-trivial database (several MB, overflow pages, indexes) taken as the
  primary's first snapshot, plus later transactions.
- resume: every process closed (the replica's WAL is checkpointed away by the last close), the
  primary writes more, a new replica process calls ``repl_sync()`` without arguments and
  continues from the remembered source and position.
"""

from __future__ import annotations

import json
import os

import apsw
import pytest

from helpers import (
    Worker, durable, lsn_checksum, primary_and_replica, sqlite3_cli, start_primary, start_replica, stock_one, stock_tables,
    sync_to, worker_status, worker_tables,
)


def test_three_transactions_each_seen_by_fresh_stock_readers(tmp):
    setup = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)", "CREATE INDEX t_v ON t(v)"]
    with primary_and_replica(tmp, *setup) as (pdb, rdb, p, r):
        assert r.one("SELECT repl_role()") == "replica"
        assert lsn_checksum(r) == lsn_checksum(p)
        txns = [
            ["INSERT INTO t(v, b) VALUES ('a', randomblob(100))", "INSERT INTO t(v) VALUES ('b')"],
            ["UPDATE t SET v = v || '!' WHERE id = 1", "INSERT INTO t(v, b) VALUES ('c', zeroblob(3000))"],
            ["DELETE FROM t WHERE id = 2", "CREATE TABLE u(x)", "INSERT INTO u VALUES (42)"],
        ]
        for i, stmts in enumerate(txns):
            p.script(["BEGIN", *stmts, "COMMIT"])
            p_lsn, p_ck = lsn_checksum(p)
            got = sync_to(r, p_lsn)
            assert got == p_lsn, f"txn {i}: repl_sync() returned {got}, the primary is at {p_lsn}"
            assert lsn_checksum(r) == (p_lsn, p_ck), f"txn {i}: replica (lsn, checksum) differ from the primary's"
            primary_rows = worker_tables(p)
            # A fresh stock reader of each kind, in its own process, sees exactly that state.
            assert stock_tables(rdb) == primary_rows, f"txn {i}: apsw without the extension sees other content"
            assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
            cli_rows = stock_one(rdb, "SELECT id, v, length(b) FROM t ORDER BY id;")
            want = "\n".join(
                "|".join("" if c is None else str(c) for c in row)
                for row in p.q("SELECT id, v, length(b) FROM t ORDER BY id")
            )
            assert cli_rows == want, f"txn {i}: sqlite3 3.40 sees {cli_rows!r}, primary has {want!r}"
            assert r.one("SELECT count(*) FROM t") == p.one("SELECT count(*) FROM t")
        st = worker_status(r)
        assert st["role"] == "replica"
        assert st["source"] == str(pdb) and st["lsn"] == p_lsn, st
        assert st["primary_lsn"] == p_lsn and st["lag_lsn"] == 0 and st["lag_ms"] == 0, st
        assert st["last_error"] is None and st["resnapshots"] == 0 and st["foreign_writes"] == 0, st
        assert isinstance(st["last_sync_ms"], int)
        # An up-to-date sync is a no-op that returns the same LSN.
        assert r.one("SELECT repl_sync()") == p_lsn
        assert worker_status(r)["batches"] == st["batches"]


def test_bootstrap_of_a_multi_megabyte_database_with_overflow_pages(tmp):
    pdb, rdb = tmp / "big.db", tmp / "r.db"
    # Build the content before the database becomes a primary: the first snapshot holds it all.
    conn = apsw.Connection(str(pdb), vfs="unix")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, name TEXT UNIQUE, data BLOB)")
    conn.execute("CREATE TABLE nums(n INTEGER PRIMARY KEY, sq INTEGER, txt TEXT)")
    with conn:
        for i in range(150):  # ~20 KB each: overflow chains of ~5 pages
            conn.execute("INSERT INTO blobs(name, data) VALUES (?, randomblob(20000 + ?))", (f"b{i}", i * 7))
        conn.execute(
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 20000) "
            "INSERT INTO nums SELECT n, n * n, printf('row %d %s', n, hex(randomblob(8))) FROM c"
        )
    conn.execute("CREATE INDEX nums_txt ON nums(txt)")
    conn.close()
    size = os.path.getsize(pdb)  # the close checkpointed everything into the file
    assert size > 3_000_000, size

    with start_primary(pdb) as p:
        p.q("UPDATE blobs SET data = randomblob(50000) WHERE id % 10 = 0")  # a big txn after the snapshot
        p_lsn, p_ck = lsn_checksum(p)
        p_pages = p.one("PRAGMA page_count")
        with start_replica(rdb, pdb) as r:
            assert sync_to(r, p_lsn) == p_lsn
            assert lsn_checksum(r) == (p_lsn, p_ck)
            assert "event=bootstrap" in r.stderr(), r.stderr()
            assert r.one("PRAGMA page_count") == p_pages
            assert worker_tables(r) == worker_tables(p)
        # The applier process is gone: a stock reader alone.
        assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
        assert stock_one(rdb, "SELECT count(*), sum(length(data)) FROM blobs;") == "|".join(
            str(v) for v in p.q("SELECT count(*), sum(length(data)) FROM blobs")[0]
        )
        assert stock_tables(rdb) == worker_tables(p)


def test_resume_after_every_process_closed(tmp):
    with primary_and_replica(tmp, "CREATE TABLE t(x)", "INSERT INTO t VALUES (1)") as (pdb, rdb, p, r):
        first = lsn_checksum(r)
        assert first == lsn_checksum(p)
    meta = json.loads((tmp / "r.db-replica" / "replica.json").read_text())
    assert meta["role"] == "replica" and meta["source"] == str(pdb), meta
    # The last close checkpointed the replica's WAL into the file: still the same content.
    assert stock_one(rdb, "SELECT group_concat(x) FROM t;") == "1"

    with start_primary(pdb) as p:  # the primary process restarts and writes more
        assert p.one("SELECT repl_role()") == "primary"
        p.q("INSERT INTO t VALUES (2)")
        p.script(["BEGIN", "INSERT INTO t VALUES (3)", "CREATE TABLE later(y)", "COMMIT"])
        p_lsn, p_ck = lsn_checksum(p)
        assert p_lsn > first[0]
        with Worker(rdb) as r:
            # The role is resumed on open, before any sync, at the old position.
            assert r.one("SELECT repl_role()") == "replica"
            assert r.one("SELECT repl_lsn()") == first[0]
            assert lsn_checksum(r) == first
            assert sync_to(r, p_lsn) == p_lsn  # no argument: the remembered source
            assert lsn_checksum(r) == (p_lsn, p_ck)
            st = worker_status(r)
            assert st["resnapshots"] == 0, f"resuming needed a re-snapshot: {st}"
            assert worker_tables(r) == worker_tables(p)
        # And once more with the CLI as the applier process (.load, then .open, then sync).
        p.q("INSERT INTO t VALUES (4)")
        p_lsn, p_ck = lsn_checksum(p)
        durable(p)  # one sync below: the primary serves a record once it is fsynced in its log
        proc = sqlite3_cli(rdb, "SELECT repl_sync();\nSELECT repl_lsn(), repl_checksum();")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [str(p_lsn), f"{p_lsn}|{p_ck}"], proc.stdout
        assert stock_tables(rdb) == worker_tables(p)


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_source_forms(tmp, form):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(x)")
        p.q("INSERT INTO t VALUES ('hello')")
        src = str(pdb) if form == "path" else f"file:{pdb}"
        with start_replica(rdb, src) as r:
            assert lsn_checksum(r) == lsn_checksum(p)
            assert r.one("SELECT x FROM t") == "hello"

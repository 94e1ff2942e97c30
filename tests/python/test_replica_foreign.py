"""A foreign writer on the replica (WAL.md §G18, §E.9): the stock ``/usr/bin/sqlite3`` WITHOUT the
extension writes into the replica's file (it does not go through the VFS, so nothing stops
it). The next ``repl_sync()`` must notice and re-snapshot (§E.10) instead of applying the
primary's pages on top of a state that is not the primary's; afterwards the replica equals the
primary again (the foreign row is gone), ``repl_status()`` counts it, and applying continues.

Variants: the foreign commit left in the WAL (mxFrame past ours), followed by a stock PASSIVE
checkpoint, followed by a stock TRUNCATE checkpoint (the WAL is empty again, so only the content
tells), and done while no applier process was alive (found when the next process loads).
"""

from __future__ import annotations

import pytest

from helpers import (
    Worker, lsn_checksum, primary_and_replica, start_primary, start_replica, stock_one, stock_tables, sync_to,
    worker_status, worker_tables,
)

FOREIGN_SQL = {
    "wal": "INSERT INTO t VALUES (1000, 'foreign');",
    "passive": "INSERT INTO t VALUES (1000, 'foreign');\nPRAGMA wal_checkpoint(PASSIVE);",
    "truncate": "INSERT INTO t VALUES (1000, 'foreign');\nPRAGMA wal_checkpoint(TRUNCATE);",
    # Changes a page the next primary transaction does not touch, then hides in the db file.
    "truncate_other_table": "UPDATE side SET s = 'tampered';\nPRAGMA wal_checkpoint(TRUNCATE);",
}


@pytest.mark.parametrize("variant", list(FOREIGN_SQL))
@pytest.mark.parametrize("applier_alive", [True, False], ids=["applier_alive", "applier_restarted"])
def test_foreign_write_on_the_replica_is_answered_with_a_resnapshot(tmp, variant, applier_alive):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        p.q("CREATE TABLE side(s TEXT)")
        p.q("INSERT INTO side VALUES ('primary')")
        p.q("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        r = start_replica(rdb, pdb)
        try:
            assert lsn_checksum(r) == lsn_checksum(p)
            if not applier_alive:
                r.close()
            stock_one(rdb, FOREIGN_SQL[variant])
            # The foreign write is really there for stock readers.
            tampered = stock_tables(rdb)
            assert tampered != worker_tables(p)
            if not applier_alive:
                r = Worker(rdb)
            p.q("INSERT INTO t VALUES (3, 'c')")
            want = lsn_checksum(p)
            sync_to(r, want[0])
            st = worker_status(r)
            assert st["resnapshots"] >= 1, f"the foreign write was not answered with a re-snapshot: {st}"
            if applier_alive and variant in ("wal", "passive"):
                assert st["foreign_writes"] >= 1, st
            assert lsn_checksum(r) == want, "after the re-snapshot the replica is not the primary's state"
            assert stock_tables(rdb) == worker_tables(p), "the foreign change survived the re-snapshot"
            assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
            assert "event=resnapshot" in r.stderr() or "event=foreign_write" in r.stderr(), r.stderr()
            # Applying goes on normally afterwards.
            resnaps = st["resnapshots"]
            for i in range(3):
                p.q("INSERT INTO t VALUES (?, 'after')", [10 + i])
            want = lsn_checksum(p)
            sync_to(r, want[0])
            assert lsn_checksum(r) == want
            assert worker_status(r)["resnapshots"] == resnaps
            assert stock_tables(rdb) == worker_tables(p)
        finally:
            r.close()


@pytest.mark.parametrize("variant", ["wal", "truncate"])
def test_repl_checksum_reflects_a_foreign_write_before_the_next_sync(tmp, variant):
    """``repl_checksum()`` is the checksum of the replica's content: after a foreign write it
    must not keep reporting the primary's value (a user comparing the two would be misled),
    in the applier process as in a fresh one."""
    setup = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", "INSERT INTO t VALUES (1, 'a')"]
    with primary_and_replica(tmp, *setup) as (pdb, rdb, p, r):
        want = lsn_checksum(p)
        assert lsn_checksum(r) == want
        stock_one(rdb, FOREIGN_SQL[variant])
        with Worker(rdb) as fresh:
            assert lsn_checksum(fresh)[1] != want[1], "a fresh process reports the primary's checksum"
        assert lsn_checksum(r)[1] != want[1], "the applier process reports a stale checksum"
        # The next sync repairs it.
        sync_to(r, want[0])
        assert lsn_checksum(r) == want
        assert worker_status(r)["resnapshots"] >= 1
        assert stock_tables(rdb) == worker_tables(p)

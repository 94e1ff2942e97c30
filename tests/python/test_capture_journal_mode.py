"""A primary switched to a rollback journal by a process WITHOUT the extension (issue 14;
WAL.md §D.7 "journal_mode away from WAL"), checked as a user would.

While a primary process lives, its agent's SHARED lock makes such a switch fail. With none
alive, a stock ``sqlite3`` can run ``PRAGMA journal_mode=DELETE`` and write. Then:

- a process WITH the extension opening the database does not resume capture (an
  ``event=primary_not_in_wal_mode`` line says why and what to do) and holds no lock on it, so
  neither its own writes nor a stock rollback-mode writer get "database is locked";
- ``SELECT repl_primary()`` switches it back to WAL and resumes capture: the rollback-mode
  writes are answered with a gap (generation + 1, a snapshot), nothing is lost, the database
  passes ``integrity_check``, and a replica that followed before ends equal to the primary.
"""

from __future__ import annotations

import pytest

from helpers import (
    Worker, lsn_checksum, start_primary, start_replica, stock_one, sync_to, wait_for, worker_status,
)


@pytest.mark.parametrize("truncated", [False, True], ids=["wal-with-frames", "wal-truncated"])
def test_stock_switch_to_delete_mode_then_repl_primary(tmp, truncated):
    """``wal-truncated``: the last primary process ran a TRUNCATE checkpoint before closing, so
    nothing is captured in the WAL the stock switch deletes; only the database file (page 1)
    shows the rollback-mode writes."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = start_primary(pdb)
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, who TEXT)")
    for i in range(5):
        p.q("INSERT INTO t(who) VALUES (?)", [f"wal{i}"])
    lsn = p.one("SELECT repl_lsn()")
    r = start_replica(rdb, pdb)
    sync_to(r, lsn)
    if truncated:
        assert p.q("PRAGMA wal_checkpoint(TRUNCATE)")[0][0] == 0
        assert p.one("SELECT repl_lsn()") == lsn
    p.close()

    # No primary process: a stock sqlite3 leaves WAL mode and writes in DELETE mode.
    assert stock_one(pdb, "PRAGMA journal_mode=DELETE;") == "delete"
    stock_one(pdb, "INSERT INTO t(who) VALUES ('stock1');")

    w = Worker(pdb)  # the extension is loaded: the database has a remembered primary role
    try:
        # Its own writes in DELETE mode work, and so do the stock writer's: nobody holds the
        # SHARED lock that would block a rollback-mode writer for good.
        w.q("INSERT INTO t(who) VALUES ('ext1')")
        stock_one(pdb, "INSERT INTO t(who) VALUES ('stock2');")
        assert stock_one(pdb, "PRAGMA journal_mode;") == "delete"
        ev = [ln for ln in w.stderr().splitlines() if "event=primary_not_in_wal_mode" in ln]
        assert ev, w.stderr()
        assert worker_status(w)["role"] != "primary"

        # repl_primary(): back to WAL, capture resumes, the rollback-mode writes are a gap.
        got = w.one("SELECT repl_primary()")
        assert isinstance(got, int) and got >= lsn
        assert w.one("PRAGMA journal_mode") == "wal"
        w.q("INSERT INTO t(who) VALUES ('ext2')")
        st = worker_status(w)
        assert st["role"] == "primary" and st["generation"] == 2 and st["gaps"] == 1, st
        gap = [ln for ln in w.stderr().splitlines() if "event=gap" in ln]
        want = "page 1 of the database file differs" if truncated else "by a writer we did not witness"
        assert len(gap) == 1 and want in gap[0], gap
        assert w.one("SELECT repl_lsn()") > lsn + 1, "the gap's snapshot and the write after it"
        rows = [x[0] for x in w.q("SELECT who FROM t ORDER BY id")]
        assert rows == [f"wal{i}" for i in range(5)] + ["stock1", "ext1", "stock2", "ext2"]
        assert w.one("PRAGMA integrity_check") == "ok"

        want = lsn_checksum(w)
        sync_to(r, want[0])
        assert lsn_checksum(r) == want
        assert [x[0] for x in r.q("SELECT who FROM t ORDER BY id")] == rows
    finally:
        w.close()
        r.close()


def test_open_in_rollback_mode_then_repl_primary_before_any_write(tmp):
    """The same switch with nothing written in DELETE mode: repl_primary() resumes capture; the
    stock switch checkpointed and deleted a WAL capture did not see go, so the new generation's
    snapshot is the next LSN (one gap), and every row is there."""
    pdb = tmp / "p.db"
    p = start_primary(pdb)
    p.q("CREATE TABLE t(x)")
    p.q("INSERT INTO t VALUES (1)")
    lsn = p.one("SELECT repl_lsn()")
    p.close()
    assert stock_one(pdb, "PRAGMA journal_mode=DELETE;") == "delete"
    w = Worker(pdb)
    try:
        assert w.one("SELECT repl_primary()") >= lsn
        w.q("INSERT INTO t VALUES (2)")
        st = worker_status(w)
        assert st["generation"] <= 2 and st["gaps"] <= 1, st
        got = w.one("SELECT repl_lsn()")
        assert got in (lsn + 1, lsn + 2), (got, lsn)
        assert [x[0] for x in w.q("SELECT x FROM t ORDER BY x")] == [1, 2]
        assert w.one("PRAGMA integrity_check") == "ok"
    finally:
        w.close()


def test_restart_after_truncate_checkpoint_is_not_a_gap(tmp):
    """The common case the rollback-mode check must not turn into a gap: a TRUNCATE checkpoint,
    every process gone, a new process writes (recovery of the empty WAL gives new salts)."""
    pdb = tmp / "p.db"
    p = start_primary(pdb)
    p.q("CREATE TABLE t(x)")
    p.q("INSERT INTO t VALUES (1)")
    assert p.q("PRAGMA wal_checkpoint(TRUNCATE)")[0][0] == 0
    lsn = p.one("SELECT repl_lsn()")
    p.close()
    w = Worker(pdb)
    try:
        w.q("INSERT INTO t VALUES (2)")
        st = worker_status(w)
        assert st["generation"] == 1 and st["gaps"] == 0, st
        assert w.one("SELECT repl_lsn()") == lsn + 1
    finally:
        w.close()

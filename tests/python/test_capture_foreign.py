"""Writers and lockers WITHOUT the extension against a live primary (WAL.md §D.5, §D.7, §G13,
§G19).

The primary is an apsw connection of this (pytest) process, which keeps the capture agent alive
(and its SHARED lock on the database); the foreign party is Debian's ``/usr/bin/sqlite3`` run
WITHOUT ``.load``, in a separate process.

- G13 (foreign side): a foreign commit followed by a foreign ``wal_checkpoint(TRUNCATE)``
  destroys frames capture never saw: a gap, answered with generation + 1 starting with a
  SNAPSHOT record; the rebuild still equals the primary, foreign row included.
- gap: a foreign plain write (no checkpoint) is detected (docs/ARCHITECTURE.md, Guarantees, 3:
  "a write by a process without the extension is detected (a gap) and answered with a new
  generation that starts with a full snapshot; it is never ignored");
  the rebuild includes the foreign row; later writes continue with LSN + 1 each.
- G19: ``locking_mode=EXCLUSIVE`` is refused on a primary connection; another process cannot
  use exclusive locking mode while a primary process lives (the agent holds SHARED).
"""

from __future__ import annotations

import os

import apsw
import pytest

from capture_check import assert_dense, assert_rebuild_equals, inspect, log_dir, status, verify_ok
from helpers import lsn_of, make_primary, one, sqlite3_cli, wait_for


def primary_with_one_row(db) -> tuple[apsw.Connection, int]:
    """An in-process primary on ``db`` whose ``t(x)`` holds one row (two transactions after
    ``repl_primary()``); returns the connection and the LSN it expects now."""
    conn, lsn = make_primary(db, busy=5000)
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (1)")
    return conn, lsn + 2


def foreign(db, sql: str) -> str:
    """Run ``sql`` in the stock sqlite3 shell WITHOUT the extension; must succeed."""
    proc = sqlite3_cli(db, sql, load=False, args=["-cmd", ".timeout 5000"])
    assert proc.returncode == 0, f"foreign sqlite3 failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


# ------------------------------------------------------------------------- G13 foreign side


def test_foreign_truncate_checkpoint_is_a_gap_answered_with_a_snapshot(tmp):
    db = tmp / "g.db"
    conn, lsn = make_primary(db, busy=5000)
    conn.execute("CREATE TABLE t(x)")
    for i in range(5):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    lsn += 6
    assert lsn_of(conn) == lsn
    st = status(conn)
    assert st["generation"] == 1 and st["gaps"] == 0
    snaps_before = set(os.listdir(log_dir(db) / "snap"))

    out = foreign(db, "INSERT INTO t VALUES ('foreign');\nPRAGMA wal_checkpoint(TRUNCATE);")
    assert out.strip().startswith("0|"), f"the foreign TRUNCATE checkpoint was busy: {out!r}"
    assert os.path.getsize(f"{db}-wal") == 0

    st = wait_for(
        lambda: (s := status(conn))["generation"] >= 2 and s,
        timeout=10,
        what="a new generation after the foreign TRUNCATE",
    )
    assert st["generation"] == 2, st
    assert st["gaps"] >= 1, st
    assert st["last_error"] and "gap" in st["last_error"], st
    assert st["lsn"] == lsn + 1, "the gap must be answered by exactly one SNAPSHOT record (LSN + 1)"
    lsn += 1
    records = inspect(db)
    assert_dense(records)
    assert records[-1].lsn == lsn and records[-1].kind == "snapshot" and records[-1].generation == 2, records[-1]
    assert all(r.kind == "txn" and r.generation == 1 for r in records[:-1])
    new_snaps = set(os.listdir(log_dir(db) / "snap")) - snaps_before
    assert new_snaps == {f"{lsn:020d}-{2:010d}.snap"}, new_snaps
    verify_ok(db)
    assert_rebuild_equals(db, tmp / "out.db", conn)
    assert one(conn, "SELECT count(*) FROM t WHERE x = 'foreign'") == 1

    # Capture goes on in generation 2, one txn record per commit, also across WAL restarts and
    # TRUNCATE checkpoints done by us (witnessed). Note: the first commit after the foreign
    # TRUNCATE writes a WAL header with fresh random salts (SQLite does so when the writing
    # connection's own checkpoint counter is 0); this is our writer's restart, not a gap.
    conn.execute("INSERT INTO t VALUES ('after0')")
    conn.execute("INSERT INTO t VALUES ('after1')")
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0] == 0
    conn.execute("INSERT INTO t VALUES ('after2')")
    assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][0] == 0
    conn.execute("INSERT INTO t VALUES ('after3')")
    records = inspect(db)
    assert_dense(records)
    after = [(r.lsn, r.generation, r.kind) for r in records if r.lsn > lsn]
    assert after == [(lsn + i, 2, "txn") for i in (1, 2, 3, 4)], (
        f"our 4 commits (and our own WAL restarts) after the gap were not captured as 4 "
        f"generation-2 transactions: {after}; status {status(conn)}"
    )
    lsn += 4
    assert lsn_of(conn) == lsn
    verify_ok(db)
    assert_rebuild_equals(db, tmp / "out2.db", conn)


# ------------------------------------------------------------------------------------- gap


def test_foreign_write_is_a_gap_and_the_rebuild_includes_it(tmp):
    db = tmp / "f.db"
    conn, lsn = primary_with_one_row(db)
    assert lsn_of(conn) == lsn

    foreign(db, "INSERT INTO t VALUES ('foreign');")
    assert one(conn, "SELECT count(*) FROM t WHERE x = 'foreign'") == 1

    # Without any further commit of ours, capture notices the foreign commit (T3 poll) and
    # answers it with a new generation that starts with a SNAPSHOT record.
    st = wait_for(
        lambda: (s := status(conn))["generation"] >= 2 and s,
        timeout=10,
        what="a gap (generation 2) after a commit by a writer without the extension",
    )
    assert st["generation"] == 2 and st["gaps"] >= 1, st
    assert st["lsn"] == lsn + 1, f"the gap must take exactly one LSN (the snapshot): {st}"
    lsn += 1
    records = inspect(db)
    assert_dense(records)
    assert (records[-1].lsn, records[-1].generation, records[-1].kind) == (lsn, 2, "snapshot")
    assert all(r.kind == "txn" and r.generation == 1 for r in records[:-1])
    verify_ok(db)
    assert_rebuild_equals(db, tmp / "out.db", conn)  # includes the foreign row

    # Later normal writes: one LSN each, in generation 2.
    for i in range(3):
        conn.execute("INSERT INTO t VALUES (?)", (f"after{i}",))
        lsn += 1
        assert lsn_of(conn) == lsn
    records = inspect(db)
    assert_dense(records)
    assert [(r.generation, r.kind) for r in records[-3:]] == [(2, "txn")] * 3
    assert_rebuild_equals(db, tmp / "out2.db", conn)

    # A foreign commit immediately followed by one of ours (before the poll can notice): our
    # write lock catches the foreign frames up first (T1) -> snapshot, then our transaction.
    foreign(db, "INSERT INTO t VALUES ('foreign2');")
    conn.execute("INSERT INTO t VALUES ('ours')")
    st = status(conn)
    assert st["generation"] == 3, st
    records = inspect(db)
    assert_dense(records)
    assert [(r.lsn, r.generation, r.kind) for r in records[-2:]] == [(lsn + 1, 3, "snapshot"), (lsn + 2, 3, "txn")]
    lsn += 2
    assert lsn_of(conn) == lsn
    verify_ok(db)
    info = assert_rebuild_equals(db, tmp / "out3.db", conn)
    assert info["generation"] == 3


# ------------------------------------------------------------------------------------- G19


def test_exclusive_locking_mode_is_refused_on_the_primary(tmp):
    db = tmp / "x.db"
    conn, lsn = make_primary(db, busy=5000)
    conn.execute("CREATE TABLE t(x)")
    lsn += 1
    for sql in ("PRAGMA locking_mode=EXCLUSIVE", "PRAGMA main.locking_mode = 'exclusive'"):
        with pytest.raises(apsw.Error) as err:
            conn.execute(sql).fetchall()
        msg = str(err.value)
        assert "locking_mode" in msg.lower() and "exclusive" in msg.lower(), f"unclear message: {msg}"
    assert one(conn, "PRAGMA locking_mode") == "normal"
    # Same from the CLI with the extension loaded.
    proc = sqlite3_cli(db, "PRAGMA locking_mode=EXCLUSIVE;")
    assert proc.returncode != 0 and "locking_mode" in proc.stderr.lower(), proc
    # Still a working primary.
    conn.execute("INSERT INTO t VALUES (1)")
    assert lsn_of(conn) == lsn + 1


def test_other_process_cannot_use_exclusive_mode_while_a_primary_lives(tmp):
    db = tmp / "xp.db"
    conn, lsn = primary_with_one_row(db)
    for sql in (
        "PRAGMA locking_mode=EXCLUSIVE;\nBEGIN EXCLUSIVE;\nINSERT INTO t VALUES ('x');\nCOMMIT;",
        "PRAGMA locking_mode=EXCLUSIVE;\nINSERT INTO t VALUES ('x');",
        "PRAGMA locking_mode=EXCLUSIVE;\nSELECT count(*) FROM t;",
    ):
        proc = sqlite3_cli(db, sql, load=False)
        assert proc.returncode != 0, f"exclusive mode worked in another process: {sql!r} -> {proc.stdout!r}"
        assert "database is locked" in proc.stderr, proc.stderr
    # Nothing changed, nothing was missed.
    assert one(conn, "SELECT count(*) FROM t") == 1
    conn.execute("INSERT INTO t VALUES (2)")
    lsn += 1
    assert lsn_of(conn) == lsn
    st = status(conn)
    assert st["gaps"] == 0 and st["generation"] == 1, st
    assert_dense(inspect(db))
    assert_rebuild_equals(db, tmp / "out.db", conn)

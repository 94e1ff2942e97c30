"""Readers and checkpoints on a live replica (WAL.md §G6, §G7, §G8, §G9, §G10), every party in
its own process: a primary writer, the applier (the replica worker that calls ``repl_sync()``),
readers that never load the extension (the stock ``/usr/bin/sqlite3`` 3.40.1 shell and apsw
3.54 with the plain unix VFS) and stock checkpointers.

The wal-index facts (mxFrame, salts, nBackfill) are read from ``-shm`` by this pytest process,
which holds no SQLite connection on the replica (so reading the file drops no lock of ours).
"""

from __future__ import annotations

import os

import pytest

from helpers import (
    CliWorker, Worker, assert_replica_equals_primary, cli_snap, commit_and_sync, lsn_checksum, new_pair, primary_snap,
    shm_state, start_primary, start_replica, stock_checkpoint, stock_one, stock_snap, stock_tables, sync_to,
    worker_status, worker_tables,
)


def wal_size(db) -> int:
    try:
        return os.path.getsize(f"{db}-wal")
    except FileNotFoundError:
        return -1


class Reader:
    """One reader process of either kind; ``snap()`` is the query every assertion compares."""

    def __init__(self, kind: str, db):
        self.kind = kind
        if kind == "sqlite3-3.40":
            self.w = CliWorker(db)
        else:
            self.w = Worker(db, ext=False)

    def exec(self, sql: str) -> None:
        if self.kind == "sqlite3-3.40":
            self.w.q(sql + ";")
        else:
            self.w.q(sql)

    def snap(self) -> tuple:
        return cli_snap(self.w) if self.kind == "sqlite3-3.40" else primary_snap(self.w)

    def close(self) -> None:
        self.w.close()


# ------------------------------------------------------------------------------------ G6


@pytest.mark.parametrize("kind", ["sqlite3-3.40", "apsw-3.54"])
def test_reader_keeps_its_snapshot_while_three_txns_are_published(tmp, kind):
    with new_pair(tmp, rows=10, pad=200) as (pdb, rdb, p, r):
        reader = Reader(kind, rdb)
        try:
            reader.exec("BEGIN")
            before = reader.snap()
            assert before == primary_snap(p)
            schema_before = stock_one(rdb, "SELECT count(*) FROM sqlite_schema;")
            frames_before = shm_state(rdb)["mx_frame"]
            for i in range(3):
                commit_and_sync(
                    p,
                    r,
                    [
                        f"INSERT INTO t(v, pad) VALUES ({1000 + i}, randomblob(3000))",
                        "UPDATE t SET v = v + 0.5 WHERE id % 3 = 0",
                        f"CREATE TABLE extra{i}(x)" if i == 1 else "DELETE FROM t WHERE id = 2",
                    ],
                )
                # Inside its transaction the reader sees exactly what it saw before...
                assert reader.snap() == before, f"after publish {i + 1} the open read transaction changed"
                # ...while a fresh reader (its own process, no extension) sees the new state.
                assert stock_snap(rdb) == primary_snap(p)
            assert shm_state(rdb)["mx_frame"] > frames_before, "the applier did not append while the reader was open"
            assert stock_one(rdb, "SELECT count(*) FROM sqlite_schema;") != schema_before
            reader.exec("COMMIT")
            assert reader.snap() == primary_snap(p) != before
            assert_replica_equals_primary(rdb, p)
        finally:
            reader.close()


# ------------------------------------------------------------------------------------ G9


def test_stock_checkpoints_between_syncs_then_applying_continues(tmp):
    with new_pair(tmp, rows=10, pad=200) as (pdb, rdb, p, r):
        salts = {shm_state(rdb)["salts"]}
        for n, mode in enumerate(["PASSIVE", "FULL", "RESTART", "TRUNCATE", "PASSIVE", "TRUNCATE"]):
            commit_and_sync(p, r, [f"INSERT INTO t(v, pad) VALUES ({n}, randomblob(5000))", "UPDATE t SET v = -v WHERE id = 1"])
            st = shm_state(rdb)
            busy, log, ckpt = stock_checkpoint(rdb, mode)
            assert busy == 0, f"stock {mode} checkpoint was busy on an idle replica"
            if mode == "TRUNCATE":
                assert (log, ckpt) == (0, 0) and wal_size(rdb) == 0, (log, ckpt, wal_size(rdb))
                assert shm_state(rdb)["mx_frame"] == 0
            else:
                assert log == ckpt == st["mx_frame"], f"{mode}: checkpointed {ckpt} of {log}, wal-index says {st}"
                # The checkpointer copied every frame using OUR hash index: the db file alone
                # (read after the backfill) must already be the primary's state.
                assert shm_state(rdb)["n_backfill"] == st["mx_frame"]
            assert_replica_equals_primary(rdb, p)
            salts.add(shm_state(rdb)["salts"])
        # Applying goes on after each of them (restart after RESTART/TRUNCATE handled).
        want = commit_and_sync(p, r, ["INSERT INTO t(v) VALUES (99)"])
        st = worker_status(r)
        assert st["resnapshots"] == 0 and st["foreign_writes"] == 0, f"a stock checkpoint was taken for a foreign write: {st}"
        assert st["last_error"] is None, st
        assert len(salts) >= 3, f"no WAL restart/truncate happened: salts {salts}"
        assert lsn_checksum(r) == want
        assert_replica_equals_primary(rdb, p)


# ------------------------------------------------------------------------------- G7 / G8


def test_restart_while_a_reader_holds_read0(tmp):
    """G7: after a complete checkpoint a new reader uses READ0 (the db file only); the applier
    may restart the WAL under it (only READ1..4 must be free), the reader stays consistent, and
    no checkpoint can backfill into the file it reads until it ends."""
    with new_pair(tmp, rows=10, pad=200) as (pdb, rdb, p, r):
        reader = Reader("sqlite3-3.40", rdb)
        try:
            commit_and_sync(p, r, ["UPDATE t SET v = v * 2"])
            busy, log, ckpt = stock_checkpoint(rdb, "FULL")
            assert busy == 0 and log == ckpt > 0
            old = shm_state(rdb)
            reader.exec("BEGIN")
            before = reader.snap()  # mxFrame == nBackfill: this reader takes READ0
            commit_and_sync(p, r, ["INSERT INTO t(v, pad) VALUES (7, randomblob(10))"])
            new = shm_state(rdb)
            assert new["salts"] != old["salts"] and new["mx_frame"] < old["mx_frame"], (
                f"the applier did not restart the WAL although only READ0 was held: {old} -> {new}"
            )
            commit_and_sync(p, r, ["UPDATE t SET v = v + 1 WHERE id < 5"])
            assert reader.snap() == before
            # A PASSIVE checkpoint cannot backfill: the READ0 reader reads the database file.
            busy, log, ckpt = stock_checkpoint(rdb, "PASSIVE")
            assert shm_state(rdb)["n_backfill"] == 0, f"backfilled under a READ0 reader: {shm_state(rdb)}"
            assert ckpt == 0, (busy, log, ckpt)
            assert reader.snap() == before
            reader.exec("COMMIT")
            assert reader.snap() == primary_snap(p)
            busy, log, ckpt = stock_checkpoint(rdb, "PASSIVE")
            assert busy == 0 and log == ckpt == shm_state(rdb)["mx_frame"]
            assert stock_tables(rdb) == worker_tables(p)
        finally:
            reader.close()


def test_restart_refused_while_a_reader_holds_read_i(tmp):
    """G8: a reader that began with frames in the WAL holds READ_i (i >= 1): even with every
    frame backfilled the applier must append (mxFrame + 1), and restart on the first apply
    after the reader left and a checkpoint completed."""
    with new_pair(tmp, rows=10, pad=200) as (pdb, rdb, p, r):
        reader = Reader("apsw-3.54", rdb)
        try:
            commit_and_sync(p, r, ["UPDATE t SET v = v * 3"])
            reader.exec("BEGIN")
            before = reader.snap()  # mxFrame > nBackfill: READ_i, i >= 1
            busy, log, ckpt = stock_checkpoint(rdb, "PASSIVE")
            assert busy == 0 and log == ckpt, "the checkpoint could not reach the reader's own snapshot"
            old = shm_state(rdb)
            assert old["n_backfill"] == old["mx_frame"] > 0
            commit_and_sync(p, r, ["INSERT INTO t(v) VALUES (1)"])
            new = shm_state(rdb)
            assert new["salts"] == old["salts"] and new["mx_frame"] > old["mx_frame"], (
                f"restarted the WAL under a READ_i reader: {old} -> {new}"
            )
            assert reader.snap() == before
            reader.exec("COMMIT")
            busy, log, ckpt = stock_checkpoint(rdb, "PASSIVE")
            assert busy == 0 and log == ckpt
            old = shm_state(rdb)
            commit_and_sync(p, r, ["INSERT INTO t(v) VALUES (2)"])
            new = shm_state(rdb)
            assert new["salts"] != old["salts"] and new["mx_frame"] < old["mx_frame"], (
                f"no restart after the reader left and a checkpoint completed: {old} -> {new}"
            )
            assert reader.snap() == primary_snap(p)
            assert_replica_equals_primary(rdb, p)
        finally:
            reader.close()


def test_long_workload_applier_checkpoints_and_restarts_under_readers(tmp):
    """G7/G8 driven by the applier itself: a primary workload of ~3000 frames, a
    sync after each transaction, the applier's own PASSIVE checkpoints (>= 1000 frames) and
    restarts, while two readers keep taking snapshots and holding them across syncs."""
    with new_pair(tmp, rows=50, pad=200) as (pdb, rdb, p, r):
        readers = [Reader("sqlite3-3.40", rdb), Reader("apsw-3.54", rdb)]
        try:
            salts = set()
            max_frames = 0
            held = [None, None]
            total = 0  # frames appended
            for i in range(60):
                # ~50 pages per transaction (4 KiB pages): 60 txns are ~3000 frames.
                commit_and_sync(p, r, [f"UPDATE t SET v = v + 1, pad = randomblob(8000) WHERE id % 2 = {i % 2}"])
                total += worker_status(r)["last_batch"]["pages"]
                st = shm_state(rdb)
                salts.add(st["salts"])
                max_frames = max(max_frames, st["mx_frame"])
                k = i % 2
                rd = readers[k]
                if held[k] is None and i % 7 < 3:
                    rd.exec("BEGIN")
                    held[k] = rd.snap()
                elif held[k] is not None:
                    assert rd.snap() == held[k], f"reader {rd.kind}'s snapshot changed at txn {i}"
                    if i % 7 >= 3:
                        rd.exec("COMMIT")
                        held[k] = None
                        assert rd.snap() == primary_snap(p)
            for k, rd in enumerate(readers):
                if held[k] is not None:
                    assert rd.snap() == held[k]
                    rd.exec("COMMIT")
                assert rd.snap() == primary_snap(p)
            status = worker_status(r)
            assert status["checkpoints"] > 0, f"the applier never checkpointed: {status}"
            assert len(salts) >= 2, f"the WAL never restarted over ~6000 frames: max mxFrame {max_frames}"
            assert total > 2500 and max_frames < total // 2, f"the WAL was not reused: max mxFrame {max_frames} of {total} frames"
            assert status["resnapshots"] == 0 and status["foreign_writes"] == 0, status
            assert_replica_equals_primary(rdb, p)
        finally:
            for rd in readers:
                rd.close()


# ----------------------------------------------------------------------------------- G10


@pytest.mark.parametrize("how", ["vacuum", "auto_vacuum_delete"])
def test_shrinking_transactions_shrink_the_replica(tmp, how):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = start_primary(pdb)
    try:
        if how == "auto_vacuum_delete":
            p.q("PRAGMA auto_vacuum = FULL")
            p.q("VACUUM")  # auto_vacuum takes effect on an empty database after a VACUUM
            assert p.one("PRAGMA auto_vacuum") == 1
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
        p.q("CREATE TABLE keep(x)")
        p.q("INSERT INTO keep VALUES ('kept')")
        p.q(
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 300) "
            "INSERT INTO t(b) SELECT randomblob(6000) FROM c"
        )
        r = start_replica(rdb, pdb)
        try:
            big = p.one("PRAGMA page_count")
            assert r.one("PRAGMA page_count") == big
            reader = Reader("sqlite3-3.40", rdb)
            reader.exec("BEGIN")
            before = reader.w.q("SELECT count(*) FROM t;")
            p.q("DELETE FROM t WHERE id > 10")
            if how == "vacuum":
                p.q("VACUUM")
            want = lsn_checksum(p)
            small = p.one("PRAGMA page_count")
            assert small < big // 4, (big, small)
            sync_to(r, want[0])
            assert lsn_checksum(r) == want
            assert r.one("PRAGMA page_count") == small
            assert int(stock_one(rdb, "PRAGMA page_count;")) == small
            assert reader.w.q("SELECT count(*) FROM t;") == before  # old, bigger snapshot intact
            reader.exec("COMMIT")
            reader.close()
            busy, log, ckpt = stock_checkpoint(rdb, "TRUNCATE")
            assert busy == 0
            page_size = p.one("PRAGMA page_size")
            assert os.path.getsize(rdb) == small * page_size, "the replica file was not truncated by the checkpoint"
            assert_replica_equals_primary(rdb, p)
            # Grows again fine.
            want = commit_and_sync(p, r, ["INSERT INTO t(b) SELECT randomblob(9000) FROM t"])
            assert r.one("PRAGMA page_count") == p.one("PRAGMA page_count")
            assert stock_tables(rdb) == worker_tables(p)
        finally:
            r.close()
    finally:
        p.close()

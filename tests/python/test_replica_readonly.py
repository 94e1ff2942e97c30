"""A replica is read-only for every connection that goes through the extension (issue 3 item 3):
INSERT / UPDATE / DELETE / DDL / VACUUM / BEGIN IMMEDIATE fail with SQLITE_READONLY ("attempt
to write a readonly database") in the applier process, in another process with the extension
and in the sqlite3 shell with ``.load``; nothing reaches the files (db and ``-wal`` bytes
unchanged), the replica keeps applying and no foreign write is reported afterwards.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from helpers import (
    Worker, WorkerError, lsn_checksum, primary_and_replica, sqlite3_cli, start_primary, start_replica, stock_tables,
    sync_to, worker_status, worker_tables,
)

WRITES = [
    "INSERT INTO t VALUES (100, 'x')",
    "UPDATE t SET v = 'changed'",
    "DELETE FROM t",
    "CREATE TABLE u(x)",
    "CREATE INDEX t_v ON t(v)",
    "DROP TABLE t",
    "ALTER TABLE t ADD COLUMN w",
    "PRAGMA user_version = 7",
    "VACUUM",
    "BEGIN IMMEDIATE",
    "REPLACE INTO t VALUES (1, 'r')",
]


def digest(path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return "absent"


def files(rdb) -> dict[str, str]:
    return {"db": digest(rdb), "wal": digest(f"{rdb}-wal")}


@pytest.mark.parametrize("who", ["applier", "other_process"])
def test_writes_fail_with_sqlite_readonly_and_touch_nothing(tmp, who):
    setup = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", "INSERT INTO t VALUES (1, 'a'), (2, 'b')"]
    with primary_and_replica(tmp, *setup) as (pdb, rdb, p, r):
        w = r if who == "applier" else Worker(rdb)
        try:
            assert w.one("SELECT repl_role()") == "replica"
            assert w.one("SELECT count(*) FROM t") == 2
            before = files(rdb)
            wal_len = os.path.getsize(f"{rdb}-wal")
            for sql in WRITES:
                with pytest.raises(WorkerError) as err:
                    w.q(sql)
                assert err.value.name == "ReadOnlyError", f"{sql}: {err.value}"
                assert "attempt to write a readonly database" in err.value.msg, f"{sql}: {err.value}"
            # Inside an explicit read transaction too; the transaction stays usable.
            w.q("BEGIN")
            assert w.one("SELECT count(*) FROM t") == 2
            with pytest.raises(WorkerError) as err:
                w.q("INSERT INTO t VALUES (3, 'c')")
            assert err.value.name == "ReadOnlyError", err.value
            assert w.one("SELECT group_concat(v) FROM t") == "a,b"
            w.q("ROLLBACK")
            assert files(rdb) == before, "a refused write changed the replica's files"
            assert os.path.getsize(f"{rdb}-wal") == wal_len
            assert stock_tables(rdb) == worker_tables(p)
        finally:
            if w is not r:
                w.close()
        # Replication is unaffected: nothing was mistaken for a foreign write.
        p.q("INSERT INTO t VALUES (3, 'c')")
        want = lsn_checksum(p)
        sync_to(r, want[0])
        assert lsn_checksum(r) == want
        st = worker_status(r)
        assert st["foreign_writes"] == 0 and st["resnapshots"] == 0, st
        assert stock_tables(rdb) == worker_tables(p)


def test_writes_fail_in_the_sqlite3_shell_with_the_extension(tmp):
    setup = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", "INSERT INTO t VALUES (1, 'a')"]
    with primary_and_replica(tmp, *setup) as (pdb, rdb, p, r):
        before = files(rdb)
        for sql in ("INSERT INTO t VALUES (2, 'b');", "CREATE TABLE u(x);", "DELETE FROM t;"):
            proc = sqlite3_cli(rdb, "SELECT repl_role();\n" + sql)
            assert proc.returncode != 0, f"{sql} succeeded on a replica: {proc.stdout}"
            assert proc.stdout.strip() == "replica", proc.stdout
            assert "attempt to write a readonly database" in proc.stderr, proc.stderr
        assert files(rdb) == before
        assert r.one("SELECT group_concat(v) FROM t") == "a"
        p.q("INSERT INTO t VALUES (2, 'b')")
        want = lsn_checksum(p)
        sync_to(r, want[0])
        assert lsn_checksum(r) == want
        assert worker_status(r)["foreign_writes"] == 0


def test_role_resumed_when_opened_during_another_process_exclusive_lock(tmp):
    """The last connection to close holds the database EXCLUSIVE for a moment (close-time
    checkpoint). A replica connection opened in that moment must still get the replica role
    (read-only, repl_sync() without arguments works), not silently become a plain writable
    database. Here a stock process holds EXCLUSIVE (locking_mode=EXCLUSIVE) while a
    connection with the extension opens, and closes shortly after."""
    import threading
    import time

    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        p.q("INSERT INTO t VALUES (1, 'a')")
        start_replica(rdb, pdb).close()
        holder = Worker(rdb, ext=False)
        try:
            holder.q("PRAGMA locking_mode=EXCLUSIVE")
            assert holder.one("SELECT count(*) FROM t") == 1  # now holds the db EXCLUSIVE
            box: dict = {}
            opener = threading.Thread(target=lambda: box.setdefault("w", Worker(rdb)))
            opener.start()
            time.sleep(0.3)  # timing of the contention window, not synchronisation
            holder.close()  # lets go (WAL exclusive mode cannot switch back to NORMAL)
            opener.join(30)
            w = box["w"]
        finally:
            holder.close()
        try:
            assert w.one("SELECT repl_role()") == "replica", w.stderr()
            with pytest.raises(WorkerError) as err:
                w.q("INSERT INTO t VALUES (2, 'b')")
            assert err.value.name == "ReadOnlyError", err.value
            p.q("INSERT INTO t VALUES (3, 'c')")
            want = lsn_checksum(p)
            assert sync_to(w, want[0]) == want[0]
            assert lsn_checksum(w) == want
        finally:
            w.close()

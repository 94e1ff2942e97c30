"""Bad input to ``repl_sync()`` (issue 3 acceptance, "Bad input"): each case is a clear error
(naming what is wrong and what to do) and leaves the files exactly as they were — no
``<db>-replica/`` directory appears, the database, its WAL and an existing replica's metadata
are byte-identical, an existing replica still reads and still syncs from its own primary.

The calling connection is in a child process (a worker); this process only hashes files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import apsw
import pytest

from helpers import (
    Worker,
    WorkerError,
    lsn_checksum,
    start_primary,
    start_replica,
    stock_tables,
    sync_to,
    worker_status,
    worker_tables,
)


def tree(*paths) -> dict[str, str]:
    """sha256 of every file at/under ``paths`` (missing ones as 'absent')."""
    out = {}
    for base in map(Path, paths):
        if base.is_dir():
            for f in sorted(base.rglob("*")):
                if f.is_file():
                    out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif base.exists():
            out[str(base)] = hashlib.sha256(base.read_bytes()).hexdigest()
        else:
            out[str(base)] = "absent"
    return out


def replica_side(db) -> dict[str, str]:
    return tree(db, f"{db}-wal", f"{db}-replica")


def refused(w: Worker, sql: str, args=(), *words: str) -> str:
    with pytest.raises(WorkerError) as err:
        w.q(sql, args)
    msg = err.value.msg
    for word in words:
        assert word.lower() in msg.lower(), f"{sql} {list(args)}: the error does not say {word!r}: {msg}"
    return msg


def test_no_source_on_a_fresh_database(tmp):
    db = tmp / "fresh.db"
    with Worker(db) as w:
        before = replica_side(db)
        refused(w, "SELECT repl_sync()", (), "not a replica", "repl_sync('/path")
        refused(w, "SELECT repl_sync(NULL)", (), "not a replica")
        assert replica_side(db) == before
        assert not Path(f"{db}-replica").exists()
        assert w.one("SELECT repl_role()") is None


@pytest.mark.parametrize(
    "source, words",
    [
        ("{tmp}/missing.db", ("does not exist",)),
        ("{tmp}/nodir/x.db", ("does not exist",)),
        ("{tmp}/plain.db", ("repl_primary()",)),  # exists, never made a primary
        ("{tmp}/areplica.db", ("repl_primary()",)),  # a replica is not a source
        ("", ("empty",)),
        ("   ", ("empty",)),
        ("http://example.invalid/db", ("http",)),
        ("ftp://example.invalid/db", ("scheme",)),
    ],
)
def test_sources_that_are_not_primaries(tmp, source, words):
    plain = apsw.Connection(str(tmp / "plain.db"), vfs="unix")
    plain.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    plain.close()
    with start_primary(tmp / "p.db") as p:
        p.q("CREATE TABLE t(x)")
        start_replica(tmp / "areplica.db", tmp / "p.db").close()
    db = tmp / "r.db"
    src = source.format(tmp=tmp)
    with Worker(db) as w:
        before = replica_side(db)
        others = tree(tmp / "plain.db", tmp / "areplica.db-replica")
        refused(w, "SELECT repl_sync(?)", [src], *words)
        assert replica_side(db) == before, "a refused repl_sync() left files behind"
        assert not Path(f"{db}-replica").exists()
        assert tree(tmp / "plain.db", tmp / "areplica.db-replica") == others
        assert w.one("SELECT repl_role()") is None
        # Still usable as an ordinary database afterwards.
        w.q("CREATE TABLE mine(x)")


def test_arguments_of_the_wrong_kind(tmp):
    with start_primary(tmp / "p.db") as p:
        p.q("CREATE TABLE t(x)")
        db = tmp / "r.db"
        with Worker(db) as w:
            before = replica_side(db)
            refused(w, "SELECT repl_sync(123)", (), "text")
            refused(w, "SELECT repl_sync(x'00ff')", (), "text")
            refused(w, "SELECT repl_sync(1.5)", (), "text")
            refused(w, "SELECT repl_sync(?, ?)", [str(tmp / "p.db"), "extra"], "at most one")
            assert replica_side(db) == before
            assert not Path(f"{db}-replica").exists()


def test_non_empty_database_that_is_not_a_replica(tmp):
    with start_primary(tmp / "p.db") as p:
        p.q("CREATE TABLE t(x)")
        db = tmp / "mine.db"
        with Worker(db) as w:
            w.q("CREATE TABLE precious(x)")
            w.q("INSERT INTO precious VALUES ('keep me')")
            before = replica_side(db)
            refused(w, "SELECT repl_sync(?)", [str(tmp / "p.db")], "not a replica", "new, empty file")
            assert replica_side(db) == before
            assert not Path(f"{db}-replica").exists()
            assert w.q("SELECT * FROM precious") == [["keep me"]]
            w.q("INSERT INTO precious VALUES ('still writable')")


def test_sync_on_a_primary(tmp):
    with start_primary(tmp / "p.db") as p, start_primary(tmp / "q.db") as q:
        p.q("CREATE TABLE t(x)")
        q.q("CREATE TABLE u(y)")
        state = lsn_checksum(p)
        for args in ([str(tmp / "q.db")], [str(tmp / "p.db")], []):
            sql = "SELECT repl_sync(?)" if args else "SELECT repl_sync()"
            refused(p, sql, args, "is a primary")
        assert lsn_checksum(p) == state
        assert p.one("SELECT repl_role()") == "primary"
        assert not (tmp / "p.db-replica" / "replica.json").exists()
        p.q("INSERT INTO t VALUES (1)")
        assert p.one("SELECT repl_lsn()") == state[0] + 1


def test_second_primary_of_another_lineage_is_refused(tmp):
    pdb, qdb, rdb = tmp / "p.db", tmp / "q.db", tmp / "r.db"
    with start_primary(pdb) as p, start_primary(qdb) as q:
        p.q("CREATE TABLE t(x)")
        p.q("INSERT INTO t VALUES ('from p')")
        q.q("CREATE TABLE t(x)")
        q.q("INSERT INTO t VALUES ('from q')")
        with start_replica(rdb, pdb) as r:
            before = replica_side(rdb)
            state = lsn_checksum(r)
            msg = refused(r, "SELECT repl_sync(?)", [str(qdb)], "lineage", "new database file")
            assert str(qdb) in msg, msg
            assert replica_side(rdb) == before, "the refused switch changed the replica's files"
            assert lsn_checksum(r) == state
            assert worker_status(r)["source"] == str(pdb)
            # Also from another process with the extension.
            with Worker(rdb) as other:
                refused(other, "SELECT repl_sync(?)", [str(qdb)], "lineage")
            assert replica_side(rdb) == before
            assert stock_tables(rdb) == worker_tables(p)
            # And it still follows p.
            p.q("INSERT INTO t VALUES ('more from p')")
            want = lsn_checksum(p)
            sync_to(r, want[0])
            assert lsn_checksum(r) == want
            assert stock_tables(rdb) == worker_tables(p)
            # Passing the same primary again is fine.
            assert r.one("SELECT repl_sync(?)", [str(pdb)]) == want[0]


def test_primary_recreated_under_the_replica(tmp):
    """The source path now holds another primary (deleted and re-created): refused, not mixed."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(x)")
        p.q("INSERT INTO t VALUES ('old')")
        with start_replica(rdb, pdb) as r:
            state = lsn_checksum(r)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{pdb}{suffix}"):
            os.remove(f"{pdb}{suffix}")
    shutil.rmtree(f"{pdb}-replica")
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(x)")
        p.q("INSERT INTO t VALUES ('new')")
        with Worker(rdb) as r:
            before = replica_side(rdb)
            refused(r, "SELECT repl_sync()", (), "lineage")
            assert replica_side(rdb) == before
            assert lsn_checksum(r) == state
            assert r.q("SELECT x FROM t") == [["old"]]
            assert worker_status(r)["last_error"], worker_status(r)

"""Bad input to ``repl_sync()`` (issue 3 acceptance, "Bad input"): each case is a clear error
(naming what is wrong and what to do) and leaves the files exactly as they were — no
``<db>-replica/`` directory appears, the database, its WAL and an existing replica's metadata
are byte-identical, an existing replica still reads and still syncs from its own primary.

The calling connection is in a child process (a worker); this process only hashes files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from helpers import (
    Worker, WorkerError, durable, lsn_checksum, primary_and_replica, start_primary, start_replica, stock_one,
    stock_tables, sync_to, wait_for, worker_status, worker_tables,
)
from test_replica_retention import FAST, churn, log_state, small_log


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
    """The replica's files. An empty WAL counts as no WAL: SQLite treats them alike, and any
    reader of a WAL database whose last connection closed (checkpointing and removing the WAL)
    creates an empty one."""
    out = tree(db, f"{db}-wal", f"{db}-replica")
    if out[f"{db}-wal"] == hashlib.sha256(b"").hexdigest():
        out[f"{db}-wal"] = "absent"
    return out


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
        ("http://127.0.0.1:1", ("cannot reach the primary", "readable")),  # nobody listens
        ("https://127.0.0.1:1", ("cannot reach the primary at https://127.0.0.1:1",)),
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
    with primary_and_replica(tmp, "CREATE TABLE t(x)", "INSERT INTO t VALUES ('old')") as (pdb, rdb, p, r):
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


def replica_one_behind(tmp) -> tuple[Path, Path, Worker, dict]:
    """A primary worker whose ``t(x)`` holds 'old' and 'new' (durable), and a closed replica
    ``r.db`` that has only 'old'. Returns (pdb, rdb, primary, the replica's tables)."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = start_primary(pdb)
    try:
        p.q("CREATE TABLE t(x)")
        p.q("INSERT INTO t VALUES ('old')")
        start_replica(rdb, pdb).close()
        tables = stock_tables(rdb)
        p.q("INSERT INTO t VALUES ('new')")
        durable(p)
    except BaseException:
        p.close()
        raise
    return pdb, rdb, p, tables


def test_second_primary_with_another_page_size_is_refused(tmp):
    """Another lineage whose page size also differs: the refusal names both page sizes."""
    pdb, qdb, rdb = tmp / "p.db", tmp / "q.db", tmp / "r.db"
    with start_primary(pdb) as p, Worker(qdb) as q:
        q.q("PRAGMA page_size=1024")  # before the file exists: repl_primary() keeps it
        assert q.one("SELECT repl_primary()") == 0
        q.q("CREATE TABLE t(x)")
        assert q.one("PRAGMA page_size") == 1024
        p.q("CREATE TABLE t(x)")
        p.q("INSERT INTO t VALUES ('from p')")
        with start_replica(rdb, pdb) as r:
            assert stock_one(rdb, "PRAGMA page_size;") == "4096"
            before = replica_side(rdb)
            state = lsn_checksum(r)
            msg = refused(r, "SELECT repl_sync(?)", [str(qdb)], "lineage", "new database file")
            assert "page size is 1024, this replica's 4096" in msg, msg
            assert replica_side(rdb) == before
            assert lsn_checksum(r) == state
            assert stock_tables(rdb) == worker_tables(p)
            p.q("INSERT INTO t VALUES ('more from p')")
            sync_to(r, p.one("SELECT repl_lsn()"))
            assert lsn_checksum(r) == lsn_checksum(p)


def vacuum_to_page_size(db, page_size: int) -> None:
    """What a user does to change a WAL database's page size, with plain SQLite (no extension;
    every process of the primary is closed): leave WAL, VACUUM with the new size, back to WAL."""
    c = apsw.Connection(str(db), vfs="unix")
    try:
        c.execute("PRAGMA journal_mode=DELETE")
        c.execute(f"PRAGMA page_size={page_size}")
        c.execute("VACUUM")
        assert [r[0] for r in c.execute("PRAGMA journal_mode=WAL")] == ["wal"]
        assert [r[0] for r in c.execute("PRAGMA page_size")] == [page_size]
    finally:
        c.close()


@pytest.mark.parametrize("where", ["records", "past_retention"])
def test_primary_changed_its_page_size(tmp, where):
    """The primary was VACUUMed to 1024-byte pages: it detects the gap and starts a new
    generation with a 1024-byte snapshot. The 4096-byte replica cannot follow (a WAL has one
    page size): refused before anything is written, whether it meets the change in the records
    after its LSN or, left behind past retention, in the snapshot it would re-snapshot from."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        p.q("INSERT INTO t(v) VALUES ('old')")
        r = start_replica(rdb, pdb)  # stays open across the primary's page size change
    try:
        state = lsn_checksum(r)
        old = stock_tables(rdb)
        vacuum_to_page_size(pdb, 1024)
        with start_primary(pdb, env=FAST) as p:
            p.q("INSERT INTO t(v) VALUES ('new')")
            st = worker_status(p)
            assert st["generation"] == 2 and st["gaps"] == 1, st
            assert p.one("PRAGMA page_size") == 1024
            if where == "past_retention":
                small_log(p)
                churn(p, 40)
                wait_for(
                    lambda: (s := log_state(p))["first"] and s["first"] > state[0] + 1,
                    timeout=30,
                    what="retention to remove the replica's position from the primary's log",
                )
            durable(p)
            before = replica_side(rdb)
            words = ("page size", "1024", "4096", "new, empty file", f"LSN {state[0]}")
            msg = refused(r, "SELECT repl_sync()", (), *words)
            assert str(pdb) in msg, msg
            # A process that opens the replica afresh is refused the same way.
            with Worker(rdb) as other:
                refused(other, "SELECT repl_sync()", (), *words)
            assert replica_side(rdb) == before, "the refused sync changed the replica's files"
            assert lsn_checksum(r) == state
            st = worker_status(r)
            assert "page size" in st["last_error"] and st["resnapshots"] == 0, st
            assert r.q("SELECT v FROM t") == [["old"]]
            assert stock_one(rdb, "PRAGMA page_size;") == "4096"
            assert stock_tables(rdb) == old
            assert stock_one(rdb, "SELECT v FROM t;") == "old"
            # What the message says to do works: a new file bootstraps with the new page size.
            with start_replica(tmp / "new.db", pdb) as fresh:
                assert stock_one(tmp / "new.db", "PRAGMA page_size;") == "1024"
                assert lsn_checksum(fresh) == lsn_checksum(p)
                assert stock_tables(tmp / "new.db") == worker_tables(p)
    finally:
        r.close()


def test_sync_on_a_read_only_connection(tmp):
    """Opened read-only (SQLITE_OPEN_READONLY; works as root too): repl_sync() is refused
    before anything is written, on a replica and on a new file; reading goes on."""
    pdb, rdb, p, state_tables = replica_one_behind(tmp)
    with p:
        before = replica_side(rdb)
        with Worker(rdb, flags="ro") as w:
            assert w.one("SELECT repl_role()") == "replica"
            state = lsn_checksum(w)
            for sql, args in (("SELECT repl_sync()", ()), ("SELECT repl_sync(?)", [str(pdb)])):
                refused(w, sql, args, "read-only", "read-write connection")
            assert worker_status(w)["last_error"], worker_status(w)
            assert replica_side(rdb) == before
            assert lsn_checksum(w) == state
            assert w.q("SELECT x FROM t") == [["old"]]
        assert stock_tables(rdb) == state_tables
        # A read-write connection syncs as usual: nothing was left half done.
        with Worker(rdb) as r:
            sync_to(r, p.one("SELECT repl_lsn()"))
            assert lsn_checksum(r) == lsn_checksum(p)
        # A new, empty file opened read-only does not become a replica.
        fresh = tmp / "fresh.db"
        fresh.touch()
        with Worker(fresh, flags="ro") as w:
            refused(w, "SELECT repl_sync(?)", [str(pdb)], "read-only")
            assert w.one("SELECT repl_role()") is None
        assert not Path(f"{fresh}-replica").exists()
        assert fresh.stat().st_size == 0


@pytest.fixture
def without_root_powers(tmp, monkeypatch):
    """Workers started inside ``with without_root_powers():`` obey file permissions. As root
    they run under setpriv without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER (root
    otherwise writes any file whatever its mode); skips when that is not possible here."""
    import contextlib

    if os.geteuid() != 0:
        return contextlib.nullcontext
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root, which ignores file permissions, and setpriv (util-linux) is missing")
    caps = "-dac_override,-dac_read_search,-fowner"
    wrapper = tmp / "without-root-powers"
    wrapper.write_text(f'#!/bin/sh\nexec {setpriv} --bounding-set={caps} --inh-caps={caps} {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    probe = tmp / "probe"
    probe.write_text("x")
    probe.chmod(0o444)
    try:
        can_write = subprocess.run([str(wrapper), "-c", f"open({str(probe)!r}, 'a')"], capture_output=True).returncode == 0
    finally:
        probe.unlink()
    if can_write:
        pytest.skip("running as root and setpriv could not drop CAP_DAC_OVERRIDE here")

    @contextlib.contextmanager
    def ctx():
        with monkeypatch.context() as m:
            m.setattr(sys, "executable", str(wrapper))
            yield

    return ctx


@pytest.mark.parametrize("what", ["db_and_wal", "replica_dir", "everything"])
def test_replica_whose_files_are_read_only(tmp, without_root_powers, what):
    """chmod'ed read-only replica files: the role still resumes (reads work, writes are still
    refused as on any replica), repl_sync() says which files and what to do, nothing changes;
    with the permissions back it syncs."""
    pdb, rdb, p, old = replica_one_behind(tmp)
    with p:
        side = Path(f"{rdb}-replica")
        files = {
            "db_and_wal": [rdb, Path(f"{rdb}-wal")],
            "replica_dir": sorted(side.iterdir()),
            "everything": [rdb, Path(f"{rdb}-wal"), Path(f"{rdb}-shm"), *sorted(side.iterdir())],
        }[what]
        dirs = [side] if what != "db_and_wal" else []
        saved = {f: f.stat().st_mode for f in [*files, *dirs] if f.exists()}
        before = replica_side(rdb)
        try:
            for f in saved:
                f.chmod(0o555 if f.is_dir() else 0o444)
            with without_root_powers():
                w = Worker(rdb)
            with w:
                assert w.one("SELECT repl_role()") == "replica", w.stderr()
                assert w.q("SELECT x FROM t") == [["old"]]
                msg = refused(w, "SELECT repl_sync()", (), "read-only", "chmod", "nothing was changed")
                assert any(str(f) in msg for f in saved), msg
                assert worker_status(w)["last_error"], worker_status(w)
                with pytest.raises(WorkerError) as err:
                    w.q("INSERT INTO t VALUES ('mine')")
                assert err.value.name == "ReadOnlyError", err.value
                assert w.q("SELECT x FROM t") == [["old"]]
            assert replica_side(rdb) == before, "the refused sync changed the replica's files"
            assert stock_tables(rdb) == old
        finally:
            for f, mode in saved.items():
                f.chmod(mode)
        with Worker(rdb) as r:
            sync_to(r, p.one("SELECT repl_lsn()"))
            assert lsn_checksum(r) == lsn_checksum(p)
            assert stock_tables(rdb) == worker_tables(p)


@pytest.mark.parametrize("who", ["applier", "new_process"])
def test_corrupt_record_in_the_source_log(tmp, who):
    """A byte flipped inside a record after the replica's LSN: refused with the record's LSN
    and checksum, nothing applied; once the byte is back the replica catches up."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        p.q("INSERT INTO t(v) VALUES ('old')")
        r = start_replica(rdb, pdb)
        try:
            at_a = lsn_checksum(r)
            old = stock_tables(rdb)
            segs = sorted(glob.glob(f"{pdb}-replica/log/*.seg"))
            size_at_a = os.path.getsize(segs[-1])
            p.q("INSERT INTO t(v, pad) VALUES ('new', randomblob(20000))")
            p.q("UPDATE t SET v = 'newer' WHERE v = 'old'")
            want = lsn_checksum(p)
            assert durable(p) == want[0] > at_a[0] + 1
            assert sorted(glob.glob(f"{pdb}-replica/log/*.seg")) == segs
            seg = segs[-1]
            off = os.path.getsize(seg) - 100  # inside the last record's page data
            assert off > size_at_a, "the damage must be after the replica's position"
            fd = os.open(seg, os.O_RDWR)
            try:
                good = os.pread(fd, 1, off)
                os.pwrite(fd, bytes([good[0] ^ 0xFF]), off)
                if who == "new_process":
                    r.close()
                    r = Worker(rdb)
                before = replica_side(rdb)
                words = ("damaged", "checksum", f"LSN {want[0]}", f"still holds LSN {at_a[0]}", "verify")
                msg = refused(r, "SELECT repl_sync()", (), *words)
                assert seg in msg, msg
                assert replica_side(rdb) == before, "the refused sync changed the replica's files"
                assert lsn_checksum(r) == at_a
                assert "checksum" in worker_status(r)["last_error"], worker_status(r)
                assert r.q("SELECT v FROM t") == [["old"]]
                assert stock_tables(rdb) == old
            finally:
                os.pwrite(fd, good, off)
                os.close(fd)
            assert sync_to(r, want[0]) == want[0]
            assert lsn_checksum(r) == want
            assert worker_status(r)["last_error"] is None
            assert stock_tables(rdb) == worker_tables(p)
        finally:
            r.close()

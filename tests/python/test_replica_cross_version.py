"""Cross-version replicas (WAL.md §G24, §F): the applier hosted by one SQLite, the replica read
and RECOVERED by another, in both directions —

* applier in apsw (bundled SQLite 3.54.1) → read by Debian's ``/usr/bin/sqlite3`` 3.40.1;
* applier in the 3.40.1 shell (``.load`` then ``.open``) → read by apsw 3.54.1 without the
  extension.

Each direction: the live replica (frames in our WAL, our wal-index) is read by the other
version with ``integrity_check`` ok and content equal to the primary; then the applier is
killed (no close-time checkpoint: the WAL stays), the ``-shm`` is removed, and the other
version rebuilds the wal-index from our WAL by stock recovery — same content; finally an
applier of the other version takes over the same replica and continues to the primary's LSN.
"""

from __future__ import annotations

import os

import pytest

from helpers import (
    CliWorker,
    Worker,
    lsn_checksum,
    start_primary,
    stock_one,
    stock_tables,
    wait_for,
    worker_tables,
)


class Applier:
    """``repl_sync`` hosted by apsw 3.54 (a Worker) or the sqlite3 3.40 shell (a CliWorker)."""

    def __init__(self, kind: str, rdb):
        self.kind = kind
        self.w = Worker(rdb) if kind == "apsw-3.54" else CliWorker(rdb, load=True)

    def value(self, sql: str) -> str:
        if self.kind == "apsw-3.54":
            return "|".join(str(v) for v in self.w.q(sql)[0])
        (line,) = self.w.q(sql + ";")
        return line

    def sqlite_version(self) -> str:
        return self.value("SELECT sqlite_version()")

    def sync(self, source=None) -> int:
        return int(self.value(f"SELECT repl_sync('{source}')" if source else "SELECT repl_sync()"))

    def sync_to(self, lsn: int) -> int:
        return wait_for(lambda: (got := self.sync()) >= lsn and got, timeout=30, what=f"{self.kind} reaching {lsn}")

    def lsn_checksum(self) -> tuple[int, str]:
        lsn, ck = self.value("SELECT repl_lsn(), repl_checksum()").split("|")
        return int(lsn), ck

    def kill(self) -> None:
        self.w.kill()


DIGEST_SQL = (
    "SELECT count(*), sum(id), sum(length(b)), (SELECT group_concat(v, ',') FROM (SELECT v FROM t ORDER BY id)), "
    "(SELECT group_concat(name, ',') FROM (SELECT name FROM sqlite_schema ORDER BY name)) FROM t"
)


def digest(p) -> str:
    return "|".join(str(v) for v in p.q(DIGEST_SQL)[0])


def reader_check(kind: str, rdb, p) -> None:
    """A fresh reader of ``kind`` (no extension) sees the primary ``p``'s content, integrity ok."""
    if kind == "sqlite3-3.40":
        assert stock_one(rdb, "SELECT sqlite_version();").startswith("3.40")
        assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
        assert stock_one(rdb, DIGEST_SQL + ";") == digest(p)
    else:
        with Worker(rdb, ext=False) as r:
            assert r.sqlite_version.startswith("3.54"), r.sqlite_version
            assert r.one("PRAGMA integrity_check") == "ok"
            assert worker_tables(r) == worker_tables(p)


def write_some(p, n: int, start: int) -> None:
    for i in range(n):
        p.script(
            [
                "BEGIN",
                f"INSERT INTO t(id, v, b) VALUES ({start + i}, 'row {start + i}', randomblob({500 + 97 * i}))",
                f"UPDATE t SET v = v || '+' WHERE id % 5 = {i % 5}",
                "COMMIT",
            ]
        )


@pytest.mark.parametrize(
    "applier_kind, reader_kind",
    [("apsw-3.54", "sqlite3-3.40"), ("sqlite3-3.40", "apsw-3.54")],
    ids=["applier-3.54_reader-3.40", "applier-3.40_reader-3.54"],
)
def test_replica_written_by_one_version_read_and_recovered_by_another(tmp, applier_kind, reader_kind):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
        p.q("CREATE INDEX t_v ON t(v)")
        write_some(p, 5, 0)
        a = Applier(applier_kind, rdb)
        try:
            assert a.sqlite_version().startswith("3.54" if applier_kind == "apsw-3.54" else "3.40")
            assert a.sync(pdb) == lsn_checksum(p)[0]
            write_some(p, 8, 100)  # applied as further batches into the live WAL
            for k in range(3):
                write_some(p, 2, 200 + k * 10)
                want = lsn_checksum(p)
                assert a.sync_to(want[0]) == want[0]
                assert a.lsn_checksum() == want
            assert os.path.getsize(f"{rdb}-wal") > 0
            reader_check(reader_kind, rdb, p)
        finally:
            a.kill()  # no close: the WAL and the wal-index stay as the applier left them
        assert os.path.getsize(f"{rdb}-wal") > 0
        os.remove(f"{rdb}-shm")
        # The other version rebuilds the wal-index from our WAL (stock recovery).
        reader_check(reader_kind, rdb, p)
        assert stock_tables(rdb) == worker_tables(p)

        # An applier of the other version takes over and continues.
        other = "sqlite3-3.40" if applier_kind == "apsw-3.54" else "apsw-3.54"
        applied = want
        write_some(p, 3, 300)
        want = lsn_checksum(p)
        b = Applier(other, rdb)
        try:
            assert b.lsn_checksum() == applied, "the other version's process loads another position"
            assert b.sync_to(want[0]) == want[0]
            assert b.lsn_checksum() == want
        finally:
            b.w.close()
        reader_check("sqlite3-3.40", rdb, p)
        reader_check("apsw-3.54", rdb, p)

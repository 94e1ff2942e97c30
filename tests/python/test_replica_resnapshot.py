"""Re-snapshots while readers hold long transactions (WAL.md §E.10, §G22; issue 3 "re-snapshot
test"): the snapshot is applied as ONE WAL transaction, so a reader inside BEGIN keeps its view
until it ends, a fresh reader sees the new state at once, and nobody sees a mixture.

- the primary changes generation (a foreign write on the PRIMARY is a gap, answered there with
  a snapshot record): the replica's next sync carries the snapshot;
- a foreign write on the REPLICA (§G18) is answered with a re-snapshot from the source.

("Left behind past the primary's log retention" takes the same §E.10 apply; it is tested in
test_replica_retention.py.)
"""

from __future__ import annotations

import pytest

from helpers import (
    CliWorker, Worker, assert_replica_equals_primary, lsn_checksum, serve, start_primary, start_replica, stock_one,
    sync_to, wait_for, worker_status,
)

SNAP = "SELECT count(*), group_concat(v, ',') FROM (SELECT v FROM t ORDER BY id);"


def setup(tmp, transport="dir"):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = start_primary(pdb)
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
    p.q(
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 200) "
        "INSERT INTO t(v, pad) SELECT 'v' || n, randomblob(1500) FROM c"
    )
    source = pdb
    if transport == "http":  # served from the primary's process
        source = serve(p)
    r = start_replica(rdb, source)
    # Only durable records are served (group fsync): catch up with the primary's last commit.
    sync_to(r, p.one("SELECT repl_lsn()"))
    return pdb, rdb, p, r


def primary_snap(p) -> list[str]:
    return ["|".join("" if x is None else str(x) for x in p.q(SNAP.rstrip(";"))[0])]


@pytest.mark.parametrize("transport", ["dir", "http"])
def test_generation_change_on_the_primary_reaches_a_replica_with_a_long_reader(tmp, transport):
    pdb, rdb, p, r = setup(tmp, transport)
    reader = CliWorker(rdb)
    try:
        reader.q("BEGIN;")
        before = reader.q(SNAP)
        assert before == primary_snap(p)
        gen = worker_status(p)["generation"]
        # A write on the primary by a process without the extension: capture answers the gap
        # with a new generation that starts with a snapshot record.
        stock_one(pdb, "INSERT INTO t(v) VALUES ('written without the extension');")
        wait_for(lambda: worker_status(p)["generation"] > gen, timeout=15, what="the primary's new generation")
        p.q("UPDATE t SET v = v || '*' WHERE id % 10 = 0")
        want = lsn_checksum(p)
        frames_before = worker_status(r)["wal"]["mx_frame"]
        sync_to(r, want[0])
        st = worker_status(r)
        assert lsn_checksum(r) == want
        assert st["generation"] == gen + 1, st
        assert st["wal"]["mx_frame"] > frames_before
        # The reader inside BEGIN still sees its old state; a fresh one the new state.
        assert reader.q(SNAP) == before
        assert stock_one(rdb, SNAP) == primary_snap(p)[0]
        reader.q("COMMIT;")
        assert reader.q(SNAP) == primary_snap(p)
        assert_replica_equals_primary(rdb, p)
    finally:
        reader.close()
        r.close()
        p.close()


@pytest.mark.parametrize("transport", ["dir", "http"])
def test_resnapshot_after_a_foreign_write_keeps_a_long_readers_view(tmp, transport):
    pdb, rdb, p, r = setup(tmp, transport)
    reader = Worker(rdb, ext=False)
    try:
        reader.q("BEGIN")
        before = reader.q(SNAP.rstrip(";"))
        stock_one(rdb, "DELETE FROM t WHERE id % 2 = 0;")  # a foreign writer on the replica
        p.q("INSERT INTO t(v) VALUES ('new on the primary')")
        want = lsn_checksum(p)
        sync_to(r, want[0])
        st = worker_status(r)
        assert st["resnapshots"] >= 1, st
        assert lsn_checksum(r) == want
        assert reader.q(SNAP.rstrip(";")) == before, "the re-snapshot changed an open read transaction"
        assert stock_one(rdb, SNAP) == primary_snap(p)[0]
        reader.q("COMMIT")
        assert ["|".join(str(x) for x in reader.q(SNAP.rstrip(";"))[0])] == primary_snap(p)
        assert_replica_equals_primary(rdb, p)
    finally:
        reader.close()
        r.close()
        p.close()


def test_resnapshot_from_an_older_snapshot_never_takes_readers_back(tmp):
    """Found by scripts/torture.py (seed 2): the primary's newest snapshot can be far older than
    the replica (here LSN 0: the empty database before the schema). A re-snapshot that
    published that snapshot alone and caught up in later batches showed stock readers the
    empty database ("no such table") and then old versions. The snapshot and the records after
    it up to the replica's LSN must go into ONE WAL transaction: with every record-carrying
    log response dropped (proxy), the re-snapshot cannot complete, and the replica must stay
    readable at what it showed before (never the old snapshot); once the log passes again it
    re-snapshots and equals the primary."""
    from faultproxy import FaultProxy

    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = start_primary(pdb)  # its newest snapshot: LSN 0, the empty database
    url = serve(p)
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(30):
        p.q("INSERT INTO t(v) VALUES (?)", [f"v{i}"])
    proxy = FaultProxy(int(url.rsplit(":", 1)[1]))
    r = Worker(rdb)
    try:
        want = lsn_checksum(p)
        assert r.one("SELECT repl_sync(?)", [proxy.url]) == want[0]
        assert worker_status(p)["snapshot"]["lsn"] < want[0] - 20, worker_status(p)["snapshot"]
        r.close()  # the next applier process finds the foreign write when it loads
        stock_one(rdb, "UPDATE t SET v = 'foreign' WHERE id = 1;")  # a foreign writer on the replica
        r = Worker(rdb)
        proxy.drop_after(0)  # every log response with records is cut: only /v1/snapshot passes
        with pytest.raises(Exception):
            r.q("SELECT repl_sync()")
        assert proxy.faults["drop"] >= 1, list(proxy.log)
        # Readers still see a state at the replica's LSN (here: with the foreign row), never
        # the old snapshot's empty database.
        assert stock_one(rdb, "SELECT count(*) FROM t;") == "30"
        proxy.pass_()
        sync_to(r, want[0])
        assert worker_status(r)["resnapshots"] >= 1
        assert lsn_checksum(r) == want
        assert_replica_equals_primary(rdb, p)
    finally:
        r.close()
        proxy.close()
        p.close()

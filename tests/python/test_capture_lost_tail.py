"""Lost and torn log tails on the primary (issue 14; docs/FORMAT.md §7 "One meaning of durable",
§4.2), end to end, checked the way a user would: ``repl_lsn()`` continues, no LSN is reused,
replicas keep syncing and end byte-identical to the primary (``repl_checksum()``), and the log
rebuilt by ``sqlite-replica rebuild`` equals the primary.

What an OS crash does to a primary is reproduced with every primary process closed: the last
record of the log is cut off (A) or torn (B) as a crash before the group fsync leaves it, and
``<db>-replica/durable`` is put back to what it was before that record became durable (the
watermark is raised only after the segment's fsync, so in a real crash it never names the lost
record). Then a new process opens the primary and writes.

- (A) the last whole record lost: re-captured from the WAL under the same LSN
  (``event=log_tail_repaired``), no gap; from one writer and from two writer processes.
- (B) the last record torn (cut inside, or one byte flipped): truncated
  (``event=log_tail_truncated``) and re-captured the same way; commits and capture go on.
- lost records that were served (fsynced data lost: the worst case) are re-captured too when
  the WAL holds them; when it does not, the new generation starts PAST the watermark and a
  replica holding the lost LSN re-snapshots by itself.
- a replica holding an LSN the primary reused (what a primary before this fix did) re-snapshots
  by itself instead of failing every sync.
"""

from __future__ import annotations

import os
import struct

import pytest

from capture_check import assert_rebuild_equals, inspect, log_dir
from helpers import (
    Worker, lsn_checksum, serve, start_primary, start_replica, stock_one, sync_to, wait_for, worker_status,
)


def segment_tail(db) -> tuple[str, int, int]:
    """(path of the last segment, offset of its last record, file length)."""
    segs = sorted((log_dir(db) / "log").glob("*.seg"))
    assert segs, "no segment"
    path = str(segs[-1])
    data = open(path, "rb").read()
    off, last = 32, None
    while off + 88 <= len(data):
        (rlen,) = struct.unpack(">Q", data[off + 8 : off + 16])
        last, off = off, off + rlen
    assert last is not None and off == len(data), "the segment does not end with a whole record"
    return path, last, len(data)


def durable_bytes(db) -> bytes:
    return (log_dir(db) / "durable").read_bytes()


def durable_lsn(db) -> int:
    return struct.unpack(">Q", durable_bytes(db)[:8])[0]


def wait_durable(w: Worker, lsn: int) -> None:
    wait_for(lambda: (worker_status(w)["log"]["durable_lsn"] or 0) >= lsn, timeout=15, what=f"LSN {lsn} durable")


def setup(tmp, writers: int = 1, transport: str = "dir"):
    """A primary with a table and 20 rows (the first writer process is the primary), and a
    replica synced to it, from the directory or over HTTP from the first writer's process (the
    URL is kept in ``setup.url``: ``serve_again`` serves a reopened primary there). Returns
    (pdb, rdb, writers, replica, lsn)."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    ws = [start_primary(pdb)]
    setup.url = serve(ws[0]) if transport == "http" else None
    ws[0].q("CREATE TABLE t(id INTEGER PRIMARY KEY, who TEXT, v BLOB)")
    ws += [Worker(pdb) for _ in range(writers - 1)]
    for i in range(20):
        ws[i % writers].q("INSERT INTO t(who, v) VALUES (?, randomblob(300))", [f"w{i % writers}"])
    lsn = ws[0].one("SELECT repl_lsn()")
    wait_durable(ws[0], lsn)
    r = start_replica(rdb, setup.url or pdb)
    sync_to(r, lsn)
    return pdb, rdb, ws, r, lsn


def serve_again(p: Worker) -> None:
    """Serve a reopened primary on the URL of ``setup`` (when the replica follows over HTTP)."""
    if setup.url:
        serve(p, port=int(setup.url.rsplit(":", 1)[1].split("/")[0]))


def last_commit_then_crash(pdb, ws, served: bool, r=None):
    """One more commit (by the last writer); wait until it is durable (and, with ``served``,
    on the replica ``r``); close every primary process; put the watermark back to before that
    commit unless it was ``served``. Returns the commit's LSN."""
    before = durable_bytes(pdb)
    ws[-1].q("INSERT INTO t(who, v) VALUES ('last', randomblob(300))")
    lsn = ws[-1].one("SELECT repl_lsn()")
    wait_durable(ws[-1], lsn)
    if served:
        sync_to(r, lsn)
    for w in ws:
        w.close()
    if not served:
        (log_dir(pdb) / "durable").write_bytes(before)
        assert durable_lsn(pdb) == lsn - 1
    return lsn


def reopen_and_write(pdb, writers: int = 1):
    """New primary processes; each commits one row. Returns (workers, stderr of the first)."""
    ws = [Worker(pdb) for _ in range(writers)]
    for i, w in enumerate(ws):
        w.q("INSERT INTO t(who, v) VALUES (?, randomblob(300))", [f"after{i}"])
    return ws


def events(w: Worker, name: str) -> list[str]:
    return [ln for ln in w.stderr().splitlines() if f"event={name} " in ln]


def assert_replica_matches(r: Worker, p: Worker) -> None:
    want = lsn_checksum(p)
    sync_to(r, want[0])
    assert lsn_checksum(r) == want


@pytest.mark.parametrize("writers", [1, 2])
def test_lost_last_record_is_recaptured_with_the_same_lsn(tmp, writers):
    pdb, _, ws, r, lsn = setup(tmp, writers)
    lost = last_commit_then_crash(pdb, ws, served=False)
    assert lost == lsn + 1
    path, start, _ = segment_tail(pdb)
    os.truncate(path, start)  # the last record never reached the disk
    ws = reopen_and_write(pdb, writers)
    p = ws[0]
    assert p.one("SELECT repl_lsn()") == lost + writers, "one LSN per commit, none reused, none skipped"
    st = worker_status(p)
    assert st["generation"] == 1 and st["gaps"] == 0, st
    repaired = [e for w in ws for e in events(w, "log_tail_repaired")]
    assert len(repaired) == 1 and f"lsns={lost}..={lost}" in repaired[0], repaired
    recs = inspect(pdb)
    assert [x.lsn for x in recs] == list(range(recs[0].lsn, lost + writers + 1))
    assert {x.generation for x in recs} == {1}
    assert_replica_matches(r, p)
    assert p.one("SELECT count(*) FROM t WHERE who = 'last'") == 1
    for w in ws:
        w.close()
    r.close()
    assert_rebuild_equals(pdb, tmp / "out.db")


@pytest.mark.parametrize("damage", ["cut", "flip"])
@pytest.mark.parametrize("writers", [1, 2])
def test_torn_last_record_is_truncated_and_recaptured(tmp, writers, damage):
    pdb, _, ws, r, lsn = setup(tmp, writers)
    lost = last_commit_then_crash(pdb, ws, served=False)
    path, start, end = segment_tail(pdb)
    if damage == "cut":
        os.truncate(path, start + (end - start) // 2)
    else:
        with open(path, "r+b") as f:
            f.seek(start + 88 + 4 + 100)  # inside the first page image
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))
    ws = reopen_and_write(pdb, writers)
    p = ws[0]
    assert p.one("SELECT repl_lsn()") == lost + writers
    st = worker_status(p)
    assert st["generation"] == 1 and st["gaps"] == 0 and st["last_error"] is None, st
    errs = "\n".join(w.stderr() for w in ws)
    assert "event=log_tail_truncated" in errs and "event=log_tail_repaired" in errs, errs[-3000:]
    assert_replica_matches(r, p)
    for w in ws:
        w.close()
    r.close()
    assert_rebuild_equals(pdb, tmp / "out.db")


def test_served_record_lost_is_recaptured_and_the_replica_keeps_it(tmp):
    """Fsynced (and served) data lost: the worst case. The WAL still holds the frames, so the
    record comes back identical and the replica that applied it goes on without a re-snapshot."""
    pdb, _, ws, r, lsn = setup(tmp)
    lost = last_commit_then_crash(pdb, ws, served=True, r=r)
    path, start, end = segment_tail(pdb)
    with open(path, "r+b") as f:  # torn at or below the watermark
        f.seek(end - 20)
        f.write(b"\xff" * 8)
    (p,) = reopen_and_write(pdb)
    assert p.one("SELECT repl_lsn()") == lost + 1
    assert worker_status(p)["gaps"] == 0
    assert events(p, "log_tail_damaged") and events(p, "log_tail_repaired")
    assert_replica_matches(r, p)
    assert not [e for e in r.stderr().splitlines() if "event=resnapshot" in e]
    p.close()
    r.close()
    assert_rebuild_equals(pdb, tmp / "out.db")


@pytest.mark.parametrize("transport", ["dir", "http"])
def test_served_record_lost_for_good_continues_past_the_watermark(tmp, transport):
    """The served record is gone from the log AND its frames from the WAL (a process without the
    extension checkpointed and truncated it): the new generation takes the LSN after the
    watermark, never the lost one, and the replica that held it re-snapshots by itself."""
    pdb, _, ws, r, lsn = setup(tmp, transport=transport)
    lost = last_commit_then_crash(pdb, ws, served=True, r=r)
    path, start, _ = segment_tail(pdb)
    os.truncate(path, start)
    stock_one(pdb, "PRAGMA wal_checkpoint(TRUNCATE);")
    assert not os.path.exists(f"{pdb}-wal") or os.path.getsize(f"{pdb}-wal") == 0
    (p,) = reopen_and_write(pdb)
    serve_again(p)
    st = worker_status(p)
    assert st["generation"] == 2, st
    # The snapshot of generation 2 is LSN lost + 1, the row written after it lost + 2.
    assert p.one("SELECT repl_lsn()") == lost + 2
    recs = inspect(pdb)
    assert recs[0].lsn == lost + 1 and recs[0].kind == "snapshot" and recs[0].generation == 2, recs[:2]
    assert events(p, "log_restarted")
    assert_replica_matches(r, p)
    assert p.one("SELECT count(*) FROM t WHERE who = 'last'") == 1  # in the database all along
    p.close()
    r.close()
    assert_rebuild_equals(pdb, tmp / "out.db")


@pytest.mark.parametrize("transport", ["dir", "http"])
def test_replica_holding_a_reused_lsn_resnapshots_by_itself(tmp, transport):
    """What a primary before issue 14's fix did: the replica applied LSN n, the primary lost it
    without a trace (record and watermark) and reused n for a new generation's snapshot. The
    replica's next syncs see generation 2 records right after its LSN: it re-snapshots once and
    follows, instead of failing every sync with "the source's log is inconsistent"."""
    pdb, _, ws, r, lsn = setup(tmp, transport=transport)
    before = durable_bytes(pdb)
    lost = last_commit_then_crash(pdb, ws, served=True, r=r)
    path, start, _ = segment_tail(pdb)
    os.truncate(path, start)
    (log_dir(pdb) / "durable").write_bytes(before)  # the watermark lost with it
    stock_one(pdb, "PRAGMA wal_checkpoint(TRUNCATE);")
    (p,) = reopen_and_write(pdb)
    serve_again(p)
    assert worker_status(p)["generation"] == 2
    recs = inspect(pdb)
    reused = [x for x in recs if x.lsn == lost]
    assert reused and reused[0].generation == 2 and reused[0].kind == "snapshot", recs[-3:]
    p.q("INSERT INTO t(who, v) VALUES ('more', randomblob(300))")
    assert_replica_matches(r, p)
    assert [e for e in r.stderr().splitlines() if "event=resnapshot" in e and "history the primary lost" in e]
    p.close()
    r.close()


def test_failed_append_is_captured_later_with_correct_checksums(tmp):
    """Item 5 of issue 14: an append that fails after the record was built (its pages already in
    the per-page checksums) must not leave the checksums ahead of the log. The commit succeeds,
    the error is reported, the next capture takes the transaction with the next LSN, and the
    replica and the rebuilt log agree with the primary's checksum."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = start_primary(pdb, env={**os.environ, "REPL_FAULT_FAIL_AT": "log-append:4"})
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    lsn0 = p.one("SELECT repl_lsn()")
    for i in range(6):
        p.q("INSERT INTO t(v) VALUES (randomblob(500))")
        # One record per append: the fault counts appends, and an append pass takes every
        # record pending at the time (a background pass on a loaded machine may find several).
        p.one("SELECT repl_lsn()")
        if i == 2:  # the 4th append (CREATE TABLE was the 1st) failed
            st = worker_status(p)
            assert "injected failure" in (st["last_error"] or ""), st
            # The failed append is retried (repl_lsn() itself runs an append pass), so the
            # transaction is in the log already or after the next commit.
            assert p.one("SELECT repl_lsn()") in (lsn0 + 2, lsn0 + 3)
    assert p.one("SELECT repl_lsn()") == lsn0 + 6
    st = worker_status(p)
    assert st["generation"] == 1 and st["gaps"] == 0, st
    r = start_replica(rdb, pdb)
    assert_replica_matches(r, p)
    assert r.one("SELECT count(*) FROM t") == 6
    p.close()
    r.close()
    assert_rebuild_equals(pdb, tmp / "out.db")

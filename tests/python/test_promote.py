"""Epochs, fencing and promotion (issue 16, parts 2 and 3; docs/SQL.md repl_promote, FORMAT.md
§3.1 version 3, §6 format 2, §8.1 X-Repl-Epoch).

One primary P serving over HTTP, replicas that sync from it; a replica is promoted to epoch 2.
Checked: the promotion refuses while P answers (unless 'force'); P learns of the new epoch and
refuses writes with SQLITE_READONLY naming the new primary; a replica at the promoted LSN
continues without a re-snapshot; a replica that is ahead rewinds by re-snapshot with an event;
a replica that saw epoch 2 refuses the deposed primary; the old primary, pointed at the new one,
becomes its replica and keeps its unreplicated tail in orphaned-<epoch>-<lsn>/.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import subprocess

import pytest

from helpers import (
    REPO,
    Worker,
    WorkerError,
    lsn_checksum,
    start_serving_primary,
    sync_to,
    wait_for,
    worker_status,
)


CLI = REPO / "build" / "sqlite-replica"


def rows(w: Worker) -> list[int]:
    return [r[0] for r in w.q("SELECT id FROM t ORDER BY id")]


def replica_of(path: Path, url: str, lsn: int) -> Worker:
    r = Worker(path)
    r.one("SELECT repl_sync(?)", [url])
    sync_to(r, lsn)
    return r


def first_record_version(log_dir: Path) -> int:
    segs = sorted((log_dir / "log").glob("*.seg"))
    assert segs, f"no segment in {log_dir}"
    b = segs[0].read_bytes()
    # segment header (32 bytes), then the record: magic, u16 version.
    assert b[32:36] == b"RPLR"
    return struct.unpack(">H", b[36:38])[0]


def test_promote_with_force_fences_rewinds_and_orphans(tmp: Path) -> None:
    p, purl = start_serving_primary(tmp / "p.db")
    with p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
        for i in range(1, 6):
            p.q("INSERT INTO t VALUES(?, ?)", [i, f"v{i}"])
        l1 = p.one("SELECT repl_lsn()")
        r1 = replica_of(tmp / "r1.db", purl, l1)
        r2 = replica_of(tmp / "r2.db", purl, l1)
        r3 = replica_of(tmp / "r3.db", purl, l1)
        with r1, r2, r3:
            # P goes on; only r2 gets these records: the new primary (r1) never will.
            for i in range(6, 9):
                p.q("INSERT INTO t VALUES(?, ?)", [i, f"v{i}"])
            l2 = p.one("SELECT repl_lsn()")
            sync_to(r2, l2)
            assert lsn_checksum(r1)[0] == l1 and lsn_checksum(r3)[0] == l1

            # P answers: no promotion without 'force', and nothing changed.
            with pytest.raises(WorkerError) as e:
                r1.one("SELECT repl_promote('127.0.0.1:0')")
            assert "answers" in e.value.msg and "force" in e.value.msg, e.value.msg
            assert r1.one("SELECT repl_role()") == "replica"

            done = json.loads(r1.one("SELECT repl_promote('127.0.0.1:0', NULL, 'force')"))
            assert done["epoch"] == 2 and done["lsn"] == l1, done
            nurl = done["primary"]
            assert nurl.startswith("http://127.0.0.1:"), done
            assert r1.one("SELECT repl_role()") == "primary"
            assert worker_status(r1)["epoch"] == 2

            # The old primary was told: writes are refused (SQLITE_READONLY), naming r1.
            st = wait_for(lambda: worker_status(p).get("fenced"), what="P fenced")
            assert st["epoch"] == 2 and st["primary"] == nurl, st
            with pytest.raises(WorkerError) as e:
                p.q("INSERT INTO t VALUES(99, 'lost')")
            assert e.value.name == "ReadOnlyError", e.value.msg
            assert "event=primary_deposed" in p.stderr() or "event=primary_fenced" in p.stderr()
            # A write forwarded by a replica still following P is refused, naming r1.
            with pytest.raises(WorkerError) as e:
                r2.one("SELECT repl_exec('INSERT INTO t VALUES(98, 1)')")
            assert e.value.name == "ReadOnlyError" and nurl in e.value.msg, e.value.msg

            # The new epoch continues the LSNs; its records are version 3.
            r1.q("INSERT INTO t VALUES(100, 'epoch 2')")
            l3 = r1.one("SELECT repl_lsn()")
            assert l3 == l1 + 1
            wait_for(lambda: first_record_version(tmp / "r1.db-replica") == 3, what="a v3 record")
            # The offline tools read the promoted log (format 2, starting at l1 + 1).
            out = subprocess.run([str(CLI), "verify", str(tmp / "r1.db-replica")],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr

            # r3 shares r1's history up to l1: it continues without a re-snapshot.
            r3.one("SELECT repl_sync(?)", [nurl])
            sync_to(r3, l3)
            s3 = worker_status(r3)
            assert s3["resnapshots"] == 0 and s3["epoch"] == 2, s3
            assert lsn_checksum(r3) == lsn_checksum(r1)
            assert "event=resnapshot" not in r3.stderr()

            # r2 holds l1+1..l2, which r1 never got: it rewinds by re-snapshot, with an event.
            r2.one("SELECT repl_sync(?)", [nurl])
            sync_to(r2, l3)
            s2 = worker_status(r2)
            assert s2["resnapshots"] == 1 and s2["epoch"] == 2, s2
            assert "event=replica_rewound" in r2.stderr()
            assert rows(r2) == [1, 2, 3, 4, 5, 100]
            assert lsn_checksum(r2) == lsn_checksum(r1)

            # A replica that saw epoch 2 refuses the deposed primary (here through its files).
            with pytest.raises(WorkerError) as e:
                r3.one("SELECT repl_sync(?)", [str(tmp / "p.db")])
            assert "epoch 1" in e.value.msg and "seen epoch 2" in e.value.msg, e.value.msg
            assert worker_status(r3)["primary"] == nurl

            # The old primary pointed at the new one becomes its replica; its tail is kept.
            p.one("SELECT repl_sync(?)", [nurl])
            assert p.one("SELECT repl_role()") == "replica"
            aside = tmp / "p.db-replica" / f"orphaned-1-{l1 + 1}"
            report = json.loads((aside / "orphaned.json").read_text())
            assert (report["first_lsn"], report["last_lsn"]) == (l1 + 1, l2), report
            assert list((aside / "log").glob("*.seg")), "the segments are kept"
            assert "event=orphaned_tail" in p.stderr()
            assert worker_status(p)["orphaned"]["first_lsn"] == l1 + 1
            sync_to(p, l3)
            assert rows(p) == [1, 2, 3, 4, 5, 100]
            assert lsn_checksum(p) == lsn_checksum(r1)
            with pytest.raises(WorkerError) as e:
                p.q("INSERT INTO t VALUES(7, 'x')")
            assert e.value.name == "ReadOnlyError"


def test_promote_after_primary_died_and_follower_fences_reopened_primary(tmp: Path) -> None:
    p, purl = start_serving_primary(tmp / "p.db")
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    for i in range(1, 4):
        p.q("INSERT INTO t VALUES(?, ?)", [i, "x" * 500])
    l1 = p.one("SELECT repl_lsn()")
    r1 = replica_of(tmp / "r1.db", purl, l1)
    r2 = replica_of(tmp / "r2.db", purl, l1)
    with r1, r2:
        p.kill()
        done = json.loads(r1.one("SELECT repl_promote('127.0.0.1:0')"))  # P is dead: no force
        nurl = done["primary"]
        # r2 follows the new primary without a re-snapshot and sees its writes.
        r2.one("SELECT repl_follow(?, 50)", [nurl])
        r1.q("INSERT INTO t VALUES(10, 'new')")
        l3 = r1.one("SELECT repl_lsn()")
        wait_for(lambda: r2.one("SELECT repl_lsn()") >= l3, what="r2 following r1")
        assert worker_status(r2)["resnapshots"] == 0
        assert lsn_checksum(r2) == lsn_checksum(r1)

        # The old primary restarts, unaware: it takes a write (epoch 1, LSN l1 + 1).
        p2, purl2 = start_serving_primary(tmp / "p.db")
        with p2:
            p2.q("INSERT INTO t VALUES(11, 'old epoch')")
            assert p2.one("SELECT repl_lsn()") == l1 + 1
            # A replica that saw epoch 2 asks it for records: the request names the new epoch,
            # so it learns it was deposed and stops accepting writes at once.
            r2.q("SELECT repl_follow(NULL)")
            with pytest.raises(WorkerError):
                r2.one("SELECT repl_sync(?)", [purl2])
            st = wait_for(lambda: worker_status(p2).get("fenced"), what="p2 fenced")
            assert st["epoch"] == 2 and st["primary"] == nurl, st
            with pytest.raises(WorkerError) as e:
                p2.q("INSERT INTO t VALUES(12, 'refused')")
            assert e.value.name == "ReadOnlyError"
            # Pointed at the new primary, it becomes a replica; its LSN l1 + 1 is kept aside.
            p2.one("SELECT repl_follow(?, 50)", [nurl])
            report = json.loads(
                (tmp / "p.db-replica" / f"orphaned-1-{l1 + 1}" / "orphaned.json").read_text()
            )
            assert (report["first_lsn"], report["last_lsn"]) == (l1 + 1, l1 + 1), report
            wait_for(lambda: p2.one("SELECT repl_lsn()") >= l3, what="p2 following r1")
            assert lsn_checksum(p2) == lsn_checksum(r1)
            assert [r[0] for r in p2.q("SELECT id FROM t ORDER BY id")] == [1, 2, 3, 10]
            r2.q("SELECT repl_follow(NULL)")
            p2.q("SELECT repl_follow(NULL)")
        # The promoted primary, reopened, resumes its epoch where it was: no gap.
        r1.close()
        with Worker(tmp / "r1.db") as again:
            assert again.one("SELECT repl_role()") == "primary"
            again.q("INSERT INTO t VALUES(13, 'after reopen')")
            assert again.one("SELECT repl_lsn()") == l3 + 1
            assert worker_status(again)["epoch"] == 2
            assert "event=gap" not in again.stderr()


def test_promote_a_directory_replica_fences_the_primary_in_another_process(tmp: Path) -> None:
    pdb = tmp / "p.db"
    p = Worker(pdb)
    with p:
        p.one("SELECT repl_primary()")
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
        p.q("INSERT INTO t VALUES(1, 'a')")
        l1 = p.one("SELECT repl_lsn()")
        r1 = replica_of(tmp / "r1.db", str(pdb), l1)
        r2 = replica_of(tmp / "r2.db", str(pdb), l1)
        with r1, r2:
            # A directory source always answers: promotion needs 'force'.
            with pytest.raises(WorkerError) as e:
                r1.one("SELECT repl_promote()")
            assert "force" in e.value.msg, e.value.msg
            done = json.loads(r1.one("SELECT repl_promote(NULL, NULL, 'force')"))
            assert done["epoch"] == 2 and done["primary"] == str(tmp / "r1.db"), done
            fence = json.loads((tmp / "p.db-replica" / "fence").read_text())
            assert fence["epoch"] == 2 and fence["primary"] == str(tmp / "r1.db"), fence

            # P runs in another process: it reads the fence within a maintenance pass.
            def refused() -> bool:
                try:
                    p.q("INSERT INTO t(v) VALUES('maybe')")
                    return False
                except WorkerError as e:
                    assert e.name == "ReadOnlyError", e.msg
                    return True

            wait_for(refused, timeout=10, interval=0.05, what="P refusing writes")
            assert worker_status(p)["fenced"]["epoch"] == 2
            # The promoted primary is a directory source too: r2 continues from it.
            r1.q("INSERT INTO t VALUES(20, 'epoch 2')")
            l3 = r1.one("SELECT repl_lsn()")
            assert l3 == l1 + 1
            r2.one("SELECT repl_sync(?)", [str(tmp / "r1.db")])
            sync_to(r2, l3)
            assert worker_status(r2)["resnapshots"] == 0
            assert lsn_checksum(r2) == lsn_checksum(r1)

            # Had the promotion not reached P's directory (no fence), a directory follower
            # that saw epoch 2 raises it when it reads P: P stops writing again.
            (tmp / "p.db-replica" / "fence").unlink()

            def accepted() -> bool:
                try:
                    p.q("INSERT INTO t(v) VALUES('unfenced')")
                    return True
                except WorkerError:
                    return False

            wait_for(accepted, timeout=10, interval=0.05, what="P writing again without a fence")
            with pytest.raises(WorkerError) as e:
                r2.one("SELECT repl_sync(?)", [str(pdb)])
            assert "seen epoch 2" in e.value.msg, e.value.msg
            fence = json.loads((tmp / "p.db-replica" / "fence").read_text())
            assert fence["epoch"] == 2 and fence["primary"] == str(tmp / "r1.db"), fence
            wait_for(refused, timeout=10, interval=0.05, what="P refusing writes again")


def test_partitioned_old_primary_cannot_get_a_write_accepted_by_any_replica(tmp: Path) -> None:
    """P keeps running but is cut off (every replica reaches it through a fault proxy that
    refuses connections) and goes on accepting local writes, unaware. r1 is promoted (P does
    not answer: no 'force' needed) and the others follow it. When the partition heals, P's
    writes of the partition are accepted by no replica: a replica that saw epoch 2 refuses P
    (nothing changes on it), and P, told of epoch 2 by that very request, refuses writes."""
    from faultproxy import FaultProxy

    p, purl = start_serving_primary(tmp / "p.db")
    px = FaultProxy(int(purl.rsplit(":", 1)[1]))
    with p, px:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
        for i in range(1, 6):
            p.q("INSERT INTO t VALUES(?, ?)", [i, f"v{i}"])
        l1 = p.one("SELECT repl_lsn()")
        r1 = replica_of(tmp / "r1.db", px.url, l1)
        r2 = replica_of(tmp / "r2.db", px.url, l1)
        r3 = replica_of(tmp / "r3.db", px.url, l1)
        with r1, r2, r3:
            px.refuse()  # the partition
            for i in range(100, 105):  # accepted by P alone
                p.q("INSERT INTO t VALUES(?, 'partitioned')", [i])
            lp = p.one("SELECT repl_lsn()")
            assert lp == l1 + 5
            for r in (r1, r2, r3):
                with pytest.raises(WorkerError):
                    r.one("SELECT repl_sync()")
            assert px.faults["refuse"] > 0, px.log

            done = json.loads(r1.one("SELECT repl_promote('127.0.0.1:0')"))
            assert done["epoch"] == 2 and done["lsn"] == l1, done
            nurl = done["primary"]
            r1.q("INSERT INTO t VALUES(200, 'epoch 2')")
            l2 = r1.one("SELECT repl_lsn()")
            for r in (r2, r3):
                r.one("SELECT repl_sync(?)", [nurl])
                sync_to(r, l2)
                assert worker_status(r)["epoch"] == 2

            px.pass_()  # the partition heals
            before = {r: lsn_checksum(r) for r in (r2, r3)}
            for r in (r2, r3):
                with pytest.raises(WorkerError) as e:
                    r.one("SELECT repl_sync(?)", [px.url])
                # Refused either way: by the replica (it has seen epoch 2) or by P itself, which
                # the request's X-Repl-Epoch just told of epoch 2 (HTTP 409, "deposed").
                assert "epoch 2" in e.value.msg and ("seen epoch 2" in e.value.msg or "deposed" in e.value.msg), e.value.msg
                assert lsn_checksum(r) == before[r], "a refused source changed nothing"
                assert worker_status(r)["primary"] == nurl
            # No replica holds a write of the partition.
            for r in (r1, r2, r3):
                assert r.one("SELECT count(*) FROM t WHERE v = 'partitioned'") == 0
            # P learned epoch 2 from those requests: its writes are refused, naming r1.
            st = wait_for(lambda: worker_status(p).get("fenced"), what="P fenced")
            assert st["epoch"] == 2 and st["primary"] == nurl, st
            with pytest.raises(WorkerError) as e:
                p.q("INSERT INTO t VALUES(300, 'after the partition')")
            assert e.value.name == "ReadOnlyError", e.value.msg


def test_replica_behind_a_promoted_primary_without_commits_resnapshots(tmp: Path) -> None:
    """A replica behind the promoted one's LSN S, pointed at it before its first commit: the new
    primary's log has no segment (its history before S is only the promotion's snapshot), so
    the answer must be 410 (re-snapshot), not "0 records" — which the follower re-asked at once,
    forever (found by the failover tests: 94,740 requests in 10 s, the replica never caught up)."""
    p, purl = start_serving_primary(tmp / "p.db")
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    p.q("INSERT INTO t VALUES(1, 'a')")
    behind = replica_of(tmp / "behind.db", purl, p.one("SELECT repl_lsn()"))
    b2 = replica_of(tmp / "behind2.db", purl, p.one("SELECT repl_lsn()"))
    for i in range(2, 5):
        p.q("INSERT INTO t VALUES(?, 'b')", [i])
    r1 = replica_of(tmp / "r1.db", purl, p.one("SELECT repl_lsn()"))
    with behind, b2, r1:
        p.kill()
        nurl = json.loads(r1.one("SELECT repl_promote('127.0.0.1:0')"))["primary"]
        assert worker_status(r1)["log"]["first_lsn"] is None  # no segment yet
        behind.one("SELECT repl_follow(?, 100)", [nurl])
        wait_for(lambda: lsn_checksum(behind) == lsn_checksum(r1), timeout=15, what="the replica behind catching up")
        assert worker_status(behind)["resnapshots"] == 1
        behind.q("SELECT repl_follow(NULL)")
        # The directory source answers the same way.
        b2.one("SELECT repl_sync(?)", [str(tmp / "r1.db")])
        assert lsn_checksum(b2) == lsn_checksum(r1) and b2.one("SELECT count(*) FROM t") == 4

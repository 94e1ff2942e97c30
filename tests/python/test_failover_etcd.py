"""Automatic failover on etcd (issue 16, part 4; docs/SQL.md repl_config 'failover', docs/
ARCHITECTURE.md "Automatic failover").

Real etcd servers (Debian's etcd-server, `make deps` installs it) run on free loopback ports
with their data under the test's directory: one node, and a 3-node cluster in one test. A
primary holds the leadership key under a lease; two replicas are candidates. The primary is
killed with SIGKILL: a candidate must take over within the lease TTL + 1 s, a write forwarded by
the other replica (repl_exec) must reach the new primary, no acknowledged commit may be lost
(synchronous mode), and no two nodes may have written records of the same epoch (checked in
every node's log with `sqlite-replica inspect`). A primary that cannot reach etcd stops
accepting writes before its lease ends.

Membership (task: leased members): a candidate killed for good leaves `<key>/members/` after the
TTL and no longer holds up an election; but in synchronous mode a follower of the current epoch
that died keeps counting (`<key>/synced/<name>`), so a lagging candidate cannot win while the
acknowledged commits may exist only on the dead one. A deposed primary restarted with failover
configured rejoins by itself as the new primary's replica, its unreplicated tail kept aside.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from capture_check import inspect, run_cli
from helpers import Worker, WorkerError, lsn_checksum, start_serving_primary, wait_for, worker_status

TTL_MS = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdCluster:
    """`n` etcd members on loopback, each with its data directory under `root`."""

    def __init__(self, root: Path, n: int):
        etcd = shutil.which("etcd")
        if etcd is None:
            pytest.fail("etcd is missing: run `make deps` (it installs Debian's etcd-server)")
        self.procs: list[subprocess.Popen] = []
        self.clients = [free_port() for _ in range(n)]
        peers = [free_port() for _ in range(n)]
        cluster = ",".join(f"e{i}=http://127.0.0.1:{peers[i]}" for i in range(n))
        for i in range(n):
            log = open(root / f"etcd{i}.log", "w")
            self.procs.append(subprocess.Popen(
                [etcd, "--name", f"e{i}", "--data-dir", str(root / f"etcd{i}"),
                 "--listen-client-urls", f"http://127.0.0.1:{self.clients[i]}",
                 "--advertise-client-urls", f"http://127.0.0.1:{self.clients[i]}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peers[i]}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[i]}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", f"t{peers[0]}"],
                stdout=log, stderr=subprocess.STDOUT))
            log.close()
        for port in self.clients:
            wait_for(lambda port=port: self.answers(port), timeout=30, interval=0.1,
                     what=f"etcd on port {port}")

    def answers(self, port: int) -> bool:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/kv/range",
                                         data=b'{"key":"AA=="}', method="POST")
            with urllib.request.urlopen(req, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def url(self, key: str, **params: str) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.clients)
        q = "&".join(f"{k}={v}" for k, v in {"ttl_ms": str(TTL_MS), **params}.items())
        return f"etcd://{hosts}/{key}?{q}"

    def prefix(self, prefix: str) -> dict[str, dict]:
        """The keys under `prefix` (of the first member that answers) and their JSON values."""
        body = json.dumps({"key": base64.b64encode(prefix.encode()).decode(),
                           "range_end": base64.b64encode(prefix[:-1].encode() + bytes([ord(prefix[-1]) + 1])).decode()})
        for port in self.clients:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/kv/range", data=body.encode(), method="POST")
                with urllib.request.urlopen(req, timeout=2) as r:
                    kvs = json.load(r).get("kvs", [])
                return {base64.b64decode(kv["key"]).decode()[len(prefix):]: json.loads(base64.b64decode(kv["value"]))
                        for kv in kvs}
            except OSError:
                continue
        raise AssertionError("no etcd member answers")

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def failover(w: Worker) -> dict:
    return worker_status(w)["failover"]


def epochs_written(db: Path) -> set[int]:
    """Epochs of the transaction records in `db`'s log (a replica has none) and in the logs a
    deposed primary kept aside when it rejoined (`orphaned-*/`)."""
    out = set()
    if (Path(f"{db}-replica") / "meta.json").exists():
        out = {r.epoch for r in inspect(db) if r.kind == "txn"}
    for aside in Path(f"{db}-replica").glob("orphaned-*"):
        proc = run_cli("inspect", aside)
        assert proc.returncode == 0, proc.stderr
        out |= {int(ln.split()[7]) for ln in proc.stdout.splitlines() if ln.split()[2] == "txn"}
    return out


def setup(tmp: Path, etcd: EtcdCluster, sync: bool) -> tuple[Worker, str, list[Worker]]:
    p, purl = start_serving_primary(tmp / "p.db")
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    if sync:
        p.one("SELECT repl_config('sync_replicas', 1)")
        p.one("SELECT repl_config('sync_timeout_ms', 10000)")
    cands = []
    for name in ("r1", "r2"):
        r = Worker(tmp / f"{name}.db")
        r.one("SELECT repl_follow(?, 100)", [purl])
        r.one("SELECT repl_config('failover', ?)",
              [etcd.url("app/db", listen=f"127.0.0.1:{free_port()}", name=name)])
        assert failover(r)["role"].startswith("candidate"), failover(r)
        cands.append(r)
    assert p.one("SELECT repl_config('failover', ?)", [etcd.url("app/db")]).startswith("etcd://")
    st = failover(p)
    assert st["role"] == "leader" and st["lease"] and st["leader"] == purl, st
    return p, purl, cands


def kill_primary_and_take_over(tmp: Path, p: Worker, cands: list[Worker]) -> tuple[Worker, Worker, float]:
    """SIGKILL the primary; returns (new primary, other candidate, seconds until it took over)."""
    t0 = time.monotonic()
    p.kill()

    def leader():
        for i, r in enumerate(cands):
            st = failover(r)
            if st["role"] == "leader" and st["writes_held"] is None:
                return i + 1
        return None

    won = wait_for(leader, timeout=TTL_MS / 1000 + 10, interval=0.02, what="a candidate taking over")
    took = time.monotonic() - t0
    new, other = cands[won - 1], cands[2 - won]
    return new, other, took


def resume_writes(new: Worker, other: Worker, first_id: int) -> float:
    """A write forwarded by the other replica reaches the new primary; returns when (monotonic)."""
    new.one("SELECT repl_config('exec')")  # a primary now, with the old one's settings

    def forwarded():
        try:
            other.one("SELECT repl_exec('INSERT INTO t VALUES(?, ''after failover'')', ?)",
                      [json.dumps([first_id])])
            return time.monotonic()
        except WorkerError as e:
            last[0] = e.msg
            return None

    last = [""]
    try:
        done = wait_for(forwarded, timeout=15, interval=0.05, what="repl_exec reaching the new primary")
    except AssertionError as e:
        raise AssertionError(f"{e}; last error: {last[0]}; other: {worker_status(other)}") from None
    assert new.one("SELECT v FROM t WHERE id = ?", [first_id]) == "after failover"
    return done


def check_epochs(tmp: Path, nodes: list[str]) -> None:
    """No two nodes wrote records of one epoch (every node's log)."""
    owner: dict[int, str] = {}
    for n in nodes:
        for e in epochs_written(tmp / f"{n}.db"):
            assert e not in owner, f"epoch {e} written by {owner[e]} and by {n}"
            owner[e] = n
    assert owner.get(1) == "p" and len(owner) == 2, owner


def rejoin_old_primary(etcd: EtcdCluster, again: Worker, new: Worker) -> dict:
    """`again` (the old primary, restarted) configures failover: it must become the new
    primary's replica, refuse local writes and converge; returns its repl_status()."""
    assert again.one("SELECT repl_role()") == "primary"
    assert again.one("SELECT repl_config('failover', ?)", [etcd.url("app/db")]).startswith("etcd://")
    wait_for(lambda: again.one("SELECT repl_role()") == "replica", timeout=15, what="the old primary rejoining")
    assert "event=failover_rejoined" in again.stderr(), again.stderr()[-3000:]
    wait_for(lambda: failover(again)["role"] == "candidate", what="the old primary a candidate")
    with pytest.raises(WorkerError) as e:
        again.q("INSERT INTO t VALUES(5000, 'split brain')")
    assert e.value.name == "ReadOnlyError", e.value.msg
    want = lsn_checksum(new)
    wait_for(lambda: lsn_checksum(again) == want, timeout=20, what=f"the old primary converging to {want}")
    st = worker_status(again)
    assert st["epoch"] == worker_status(new)["epoch"] and failover(again)["leader"] == failover(new)["leader"], st
    return st


def test_sync_failover_on_one_etcd_loses_no_acknowledged_commit(tmp: Path) -> None:
    etcd = EtcdCluster(tmp, 1)
    p, purl, cands = setup(tmp, etcd, sync=True)
    try:
        acked = []
        for i in range(1, 41):
            p.q("INSERT INTO t VALUES(?, 'acked')", [i])
            acked.append(i)
        assert worker_status(p)["sync"]["timeouts"] == 0
        new, other, took = kill_primary_and_take_over(tmp, p, cands)
        assert took <= TTL_MS / 1000 + 1, f"took over after {took:.2f} s"
        st = failover(new)
        assert st["role"] == "leader" and st["leader_epoch"] == 2, st
        assert worker_status(new)["epoch"] == 2
        resume_writes(new, other, 1000)
        # Every acknowledged commit is on the new primary.
        have = {r[0] for r in new.q("SELECT id FROM t WHERE v = 'acked'")}
        assert have == set(acked), sorted(set(acked) - have)
        # The other candidate follows the new primary (its URL published in etcd).
        wait_for(lambda: failover(other)["leader"] == failover(new)["leader"], what="leader seen")
        wait_for(lambda: other.one("SELECT count(*) FROM t WHERE id = 1000") == 1,
                 what="the other replica following the new primary")
        assert "event=failover_won" in new.stderr() and "event=failover_follow" in other.stderr()
        # (Before the old primary rejoins: with nothing unreplicated it drops its old log.)
        check_epochs(tmp, ["p", "r1", "r2"])
        # The old primary comes back with failover configured: etcd names a newer epoch and the
        # new primary's URL, so it rejoins as that primary's replica by itself.
        with Worker(tmp / "p.db") as again:
            rejoin_old_primary(etcd, again, new)
            # Nothing was unreplicated (every commit was acknowledged): no tail kept aside.
            assert worker_status(again)["orphaned"] is None, worker_status(again)
    finally:
        for r in cands:
            r.close()
        etcd.close()


def test_primary_stops_writing_when_it_cannot_renew_its_lease(tmp: Path) -> None:
    etcd = EtcdCluster(tmp, 1)
    p, purl = start_serving_primary(tmp / "p.db")
    with p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY)")
        p.one("SELECT repl_config('failover', ?)", [etcd.url("solo/db")])
        p.q("INSERT INTO t VALUES(1)")
        t0 = time.monotonic()
        etcd.kill(0)

        def refused():
            try:
                p.q("INSERT INTO t VALUES(NULL)")
                return None
            except WorkerError as e:
                assert e.name == "ReadOnlyError", e.msg
                return time.monotonic()

        at = wait_for(refused, timeout=TTL_MS / 1000 + 5, interval=0.02, what="writes refused")
        # Refused no later than the lease's end (counted from the last renewal sent).
        assert at - t0 <= TTL_MS / 1000 + 0.3, at - t0
        st = failover(p)
        assert st["writes_held"] and "lease" in st["writes_held"], st
        assert st["last_error"] and "etcd unreachable" in st["last_error"], st
    etcd.close()


def test_async_failover_on_a_three_node_etcd_cluster(tmp: Path) -> None:
    etcd = EtcdCluster(tmp, 3)
    p, purl, cands = setup(tmp, etcd, sync=False)
    try:
        for i in range(1, 21):
            p.q("INSERT INTO t VALUES(?, 'x')", [i])
        last = p.one("SELECT repl_lsn()")
        for r in cands:
            wait_for(lambda r=r: r.one("SELECT repl_lsn()") >= last, what="candidates caught up")
        etcd.kill(0)  # one member down: the other two keep the quorum
        # (once they elected an etcd leader among them: takeover time is ours, not etcd's)
        wait_for(lambda: etcd.answers(etcd.clients[1]) and etcd.answers(etcd.clients[2]), timeout=20,
                 what="etcd's remaining members electing a leader")
        # If it was etcd's leader, the other two elect a new one, and etcd's new leader restarts
        # every lease's TTL: the takeover bound counts from the primary's first renewal after
        # that, as it would in production (a member loss is not a primary loss).
        killed_ms = time.time() * 1000
        wait_for(lambda: (failover(p)["last_renew_ms"] or 0) > killed_ms + 50, timeout=15,
                 interval=0.05, what="the primary renewing its lease on the remaining members")
        new, other, took = kill_primary_and_take_over(tmp, p, cands)
        events = [ln for r in cands for ln in r.stderr().splitlines() if ln.startswith("event=failover")]
        # The bound: lease TTL + 1 s (etcd's expiry sweep is up to 0.5 s, the candidates
        # poll every 0.2 s), counted from the primary's last renewal before its death.
        assert took <= TTL_MS / 1000 + 1, f"took over after {took:.2f} s: {events}"
        # An unreplicated tail: another process of the old primary (no server, no failover)
        # committed after the last record the candidates received, and nobody heard of it.
        with Worker(tmp / "p.db") as late:
            for i in range(100, 103):
                late.q("INSERT INTO t VALUES(?, 'tail')", [i])
            tail_end = late.one("SELECT repl_lsn()")
        resume_writes(new, other, 2000)
        assert new.one("SELECT count(*) FROM t WHERE v = 'x'") == 20
        assert new.one("SELECT count(*) FROM t WHERE v = 'tail'") == 0
        # The old primary comes back: it rejoins, its tail reported and kept, never discarded.
        with Worker(tmp / "p.db") as again:
            st = rejoin_old_primary(etcd, again, new)
            orph = st["orphaned"]
            assert orph and orph["first_lsn"] == last + 1 and orph["last_lsn"] == tail_end, (orph, last, tail_end)
            assert orph["new_primary"] == failover(new)["leader"], orph
            assert (Path(orph["dir"]) / "orphaned.json").exists() and any((Path(orph["dir"]) / "log").iterdir())
            assert "event=orphaned_tail" in again.stderr()
            assert again.one("SELECT count(*) FROM t WHERE v = 'tail'") == 0
        check_epochs(tmp, ["p", "r1", "r2"])
    finally:
        for r in cands:
            r.close()
        etcd.close()


def test_dead_candidate_leaves_the_membership_after_its_lease(tmp: Path) -> None:
    """Asynchronous: a candidate killed for good leaves `<key>/members/` within the TTL; the
    election then needs no one else (every live member published) and the winner counts one
    member."""
    etcd = EtcdCluster(tmp, 1)
    p, purl, cands = setup(tmp, etcd, sync=False)
    try:
        assert set(etcd.prefix("app/db/members/")) == {"r1", "r2"}
        p.q("INSERT INTO t VALUES(1, 'x')")
        cands[1].kill()
        t0 = time.monotonic()
        wait_for(lambda: set(etcd.prefix("app/db/members/")) == {"r1"}, timeout=TTL_MS / 1000 + 3, interval=0.05,
                 what="the dead candidate's member entry expiring")
        assert time.monotonic() - t0 <= TTL_MS / 1000 + 1.5
        new, _, took = kill_primary_and_take_over(tmp, p, cands[:1] + cands[:1])
        assert new is cands[0] and took <= TTL_MS / 1000 + 1.5, took
        won = [ln for ln in new.stderr().splitlines() if ln.startswith("event=failover_won")]
        assert won and " members=1 " in won[0], won
        # A leader is no member.
        assert etcd.prefix("app/db/members/") == {}, etcd.prefix("app/db/members/")
    finally:
        cands[0].close()
        etcd.close()


def test_sync_dead_follower_keeps_counting_until_it_is_back(tmp: Path) -> None:
    """Synchronous (N = 1): r1 is paused (it acknowledges nothing), so the commits are
    acknowledged by r2 only; then r2 and the primary die. r1's member entry is alive, r2's
    expires, but r2 followed this epoch's leader (`synced/r2`): the lagging r1 must not win.
    When r2 comes back it wins, and every acknowledged commit is on it."""
    etcd = EtcdCluster(tmp, 1)
    p, purl, cands = setup(tmp, etcd, sync=True)
    r1, r2 = cands
    try:
        p.q("INSERT INTO t VALUES(1, 'acked')")
        wait_for(lambda: r1.one("SELECT count(*) FROM t") == 1, what="r1 has the first row")
        wait_for(lambda: set(etcd.prefix("app/db/synced/")) == {"r1", "r2"}, what="both candidates marked")
        assert all(v["epoch"] == 1 for v in etcd.prefix("app/db/synced/").values())
        os.kill(r1.pid, signal.SIGSTOP)
        try:
            for i in range(2, 7):
                p.q("INSERT INTO t VALUES(?, 'acked')", [i])
            assert worker_status(p)["sync"]["timeouts"] == 0
            r2.kill()
            p.kill()
        finally:
            os.kill(r1.pid, signal.SIGCONT)
        assert r1.one("SELECT count(*) FROM t") < 6
        wait_for(lambda: set(etcd.prefix("app/db/members/")) == {"r1"}, timeout=TTL_MS / 1000 + 3,
                 what="r2's member entry expiring")
        wait_for(lambda: failover(r1)["role"] == "candidate (electing)", timeout=TTL_MS / 1000 + 3,
                 what="r1 electing")
        time.sleep(2 * TTL_MS / 1000)
        st = failover(r1)
        assert st["role"] == "candidate (electing)", st  # no primary rather than a lost commit
        assert "event=failover_won" not in r1.stderr()
        # r2 comes back (its process restarted on its files): it is the most advanced and wins.
        with Worker(tmp / "r2.db") as back:
            back.one("SELECT repl_config('failover', ?)",
                     [etcd.url("app/db", listen=f"127.0.0.1:{free_port()}", name="r2")])
            wait_for(lambda: failover(back)["role"] == "leader" and failover(back)["writes_held"] is None,
                     timeout=TTL_MS / 1000 + 10, what="r2 winning once back")
            assert {r[0] for r in back.q("SELECT id FROM t WHERE v = 'acked'")} == set(range(1, 7))
            won = [ln for ln in back.stderr().splitlines() if ln.startswith("event=failover_won")]
            # It started while the key was vacant: the sync rule came from etcd's `settings`.
            assert won and " voters=2 " in won[0] and "sync_replicas=1" in won[0], won
            assert worker_status(back)["settings"]["sync_replicas"] == 1
            try:
                wait_for(lambda: r1.one("SELECT count(*) FROM t") == 6, what="r1 following r2")
            except AssertionError as e:
                raise AssertionError(f"{e}: {worker_status(r1)} {worker_status(back)}") from None
    finally:
        r1.close()
        etcd.close()


def test_paused_primary_rejoins_by_itself(tmp: Path) -> None:
    """A live primary that lost its lease (paused past the TTL) while a candidate won: when it
    runs again its agent finds the newer epoch and becomes the new primary's replica by itself,
    with no one calling repl_sync()."""
    etcd = EtcdCluster(tmp, 1)
    p, purl, cands = setup(tmp, etcd, sync=False)
    try:
        for i in range(1, 6):
            p.q("INSERT INTO t VALUES(?, 'x')", [i])
        os.kill(p.pid, signal.SIGSTOP)
        try:
            won = wait_for(lambda: next((r for r in cands if failover(r)["role"] == "leader"), None),
                           timeout=TTL_MS / 1000 + 10, interval=0.05, what="a candidate taking over")
            assert epochs_written(tmp / "p.db") == {1}
        finally:
            os.kill(p.pid, signal.SIGCONT)
        wait_for(lambda: failover(won)["writes_held"] is None, what="the new primary taking writes")
        won.q("INSERT INTO t VALUES(100, 'new epoch')")
        wait_for(lambda: p.one("SELECT repl_role()") == "replica", timeout=15, what="the paused primary rejoining")
        assert "event=failover_rejoined" in p.stderr(), p.stderr()[-3000:]
        with pytest.raises(WorkerError) as e:
            p.q("INSERT INTO t VALUES(5000, 'split brain')")
        assert e.value.name == "ReadOnlyError", e.value.msg
        want = lsn_checksum(won)
        wait_for(lambda: lsn_checksum(p) == want, timeout=20, what="the old primary converging")
        assert p.one("SELECT count(*) FROM t WHERE id = 100") == 1
        wait_for(lambda: failover(p)["role"] == "candidate", what="the old primary a candidate")
        # Epoch 2 written by the winner only; the old primary wrote epoch 1 only (its log, all of
        # it in the new history, was dropped when it rejoined; a tail would be kept aside).
        assert epochs_written(Path(won.path)) == {2}
        assert epochs_written(tmp / "p.db") <= {1}
        assert all(epochs_written(Path(r.path)) == set() for r in cands if r is not won)
    finally:
        p.close()
        for r in cands:
            r.close()
        etcd.close()

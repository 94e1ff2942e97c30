"""Thousands of databases per process, the followers part (issue 18): followers share the
process's one HTTP event loop and its fixed worker pools, so a process with 200 followers has
the threads of a process with one.

One child process (the *fleet*) holds many replica databases, one connection each, every one
following the same primary with ``repl_follow()``; the test counts the fleet's threads in
``/proc/<pid>/task`` as the followers start, commits on the primary, and polls (with a
deadline) until every replica holds the primary's LSN with the primary's checksum.
"""

from __future__ import annotations

import json
import os
import signal

from faultproxy import FaultProxy
from helpers import (
    PyChild,
    lsn_checksum,
    serve,
    start_primary,
    start_serving_primary,
    wait_for,
    worker_status,
    Worker,
)

# The fleet: cfg {"dir": …}; requests {"op": …}, answers {"rows": …} like a Worker.
FLEET_PY = r"""
cfg = json.loads(sys.stdin.readline())
conns = []
def threads():
    return len(os.listdir(f"/proc/{os.getpid()}/task"))
load()
print(json.dumps({"ok": "ready", "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        op = req["op"]
        if op == "follow":
            # n new replicas, each on its own connection, following `source`.
            for _ in range(req["n"]):
                c = connect(os.path.join(cfg["dir"], f"r{len(conns)}.db"))
                c.setbusytimeout(5000)
                one(c, "SELECT repl_follow(?, ?)", [req["source"], req.get("interval", 1000)])
                conns.append(c)
            out = [threads()]
        elif op == "threads":
            out = [threads()]
        elif op == "fds":
            out = [len(os.listdir(f"/proc/{os.getpid()}/fd"))]
        elif op == "churn":
            # Stop and restart every follower `rounds` times, with a new interval each time.
            for k in range(req["rounds"]):
                for c in conns:
                    one(c, "SELECT repl_follow(NULL)")
                    one(c, "SELECT repl_follow(?, ?)", [req["source"], 200 + k])
            out = [threads()]
        elif op == "behind":
            # Replicas not yet at (lsn, checksum), polled until none or the deadline.
            deadline = time.monotonic() + req["secs"]
            while True:
                behind = [i for i, c in enumerate(conns)
                          if c.execute("SELECT repl_lsn(), repl_checksum()").fetchone() != (req["lsn"], req["checksum"])]
                if not behind or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            out = behind
        elif op == "lsns":
            out = [one(c, "SELECT repl_lsn()") for c in conns]
        elif op == "status":
            out = [one(conns[i], "SELECT repl_status()") for i in req["i"]]
        elif op == "unfollow":
            out = [one(conns[i], "SELECT repl_follow(NULL)") for i in req["i"]]
        else:
            raise ValueError(op)
        print(json.dumps({"rows": [out]}), flush=True)
    except apsw.Error as e:
        print(json.dumps({"error": type(e).__name__, "msg": str(e)}), flush=True)
"""


class Fleet(PyChild):
    what = "fleet"

    def __init__(self, dir_: str):
        super().__init__(FLEET_PY, {"dir": dir_})

    def op(self, op: str, timeout: float = 120, **kw):
        return self._send({"op": op, **kw}, timeout)[0]


def commit(p: Worker, n: int) -> tuple[int, str]:
    """``n`` transactions on the primary; its (LSN, checksum) after them."""
    for i in range(n):
        p.q("INSERT INTO t(v) VALUES (?)", [f"row {i} " + "x" * 200])
    return lsn_checksum(p)


def run_fleet(tmp, source: str, p: Worker, n: int) -> dict:
    fleet = Fleet(str(tmp))
    try:
        base = fleet.op("threads")  # the extension loaded, no follower yet
        one = fleet.op("follow", source=source, n=1)[0]
        all_ = fleet.op("follow", source=source, n=n - 1, timeout=300)[0]
        lsn, ck = commit(p, 20)
        behind = fleet.op("behind", lsn=lsn, checksum=ck, secs=60, timeout=120)
        assert not behind, f"{len(behind)} of {n} replicas did not reach LSN {lsn} (first: {behind[:5]})"
        # Every follower is still following, without errors.
        for s in fleet.op("status", i=[0, n // 2, n - 1]):
            st = json.loads(s)
            assert st["follow"] and st["follow"]["state"] in ("waiting", "applying"), st
            assert st["follow"]["errors"] == 0, st
        after = fleet.op("threads")
        return {"base": base[0], "one": one, "all": all_, "after": after[0]}
    finally:
        fleet.close()


def test_200_http_followers_in_one_process_share_the_engine_threads(tmp):
    p, url = start_serving_primary(tmp / "p.db")
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        t = run_fleet(tmp, url, p, 200)
        print("threads of the fleet process:", t)
        # Threads do not grow with the followers: one follower starts the engine (its loop and
        # pools); 199 more add nothing.
        assert t["all"] - t["one"] <= 2, t
        assert t["after"] - t["one"] <= 2, t
        assert t["all"] - t["base"] <= 12, t
    finally:
        p.close()


def test_20_directory_followers_in_one_process(tmp):
    p = start_primary(tmp / "p.db")
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        t = run_fleet(tmp, str(tmp / "p.db"), p, 20)
        assert t["all"] - t["one"] <= 2, t
        assert t["after"] - t["one"] <= 2, t
    finally:
        p.close()


def test_unfollow_stops_and_followers_resume_after_a_primary_restart(tmp):
    n = 20
    p, url = start_serving_primary(tmp / "p.db")
    port = int(url.rsplit(":", 1)[1])
    fleet = Fleet(str(tmp))
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        # By name (one database of a listener): the same database as `url`.
        fleet.op("follow", source=url + "/v1/db/p.db", n=n, interval=500)
        lsn, ck = commit(p, 3)
        assert not fleet.op("behind", lsn=lsn, checksum=ck, secs=30, timeout=60)

        # Half of them stop following: they stay at their LSN while the others move on.
        stopped = list(range(0, n, 2))
        assert fleet.op("unfollow", i=stopped) == [lsn] * len(stopped)
        for s in fleet.op("status", i=stopped):
            assert json.loads(s)["follow"] is None
        lsn2, _ = commit(p, 3)
        wait_for(lambda: all(fleet.op("lsns")[i] == lsn2 for i in range(1, n, 2)), timeout=30,
                 what="the followers still following reaching the new LSN")
        lsns = fleet.op("lsns")
        assert [lsns[i] for i in stopped] == [lsn] * len(stopped), lsns

        # Kill the primary mid-poll and restart it on the same port: the followers back off,
        # then resume by themselves.
        os.kill(p.pid, signal.SIGKILL)
        p.kill()
        wait_for(lambda: any(json.loads(s)["follow"]["errors"] > 0 for s in fleet.op("status", i=[1, 3])),
                 timeout=30, what="the followers noticing the dead primary")
        p = Worker(tmp / "p.db")
        serve(p, port)
        lsn3, ck3 = commit(p, 5)
        wait_for(lambda: all(fleet.op("lsns")[i] == lsn3 for i in range(1, n, 2)), timeout=60,
                 what="the followers resuming after the restart")
        for s in fleet.op("status", i=list(range(1, n, 2))):
            st = json.loads(s)
            assert st["follow"]["state"] in ("waiting", "applying"), st
            assert st["follow"]["consecutive_errors"] == 0, st
        lsns = fleet.op("lsns")
        assert [lsns[i] for i in stopped] == [lsn] * len(stopped), "a stopped follower applied something"
    finally:
        fleet.close()
        p.close()


def test_followers_left_behind_past_retention_re_snapshot_in_the_background(tmp):
    """A follower whose next LSN the primary no longer retains (410) re-snapshots on the
    engine's background pool and goes on following; the threads stay fixed."""
    n = 3
    pdb = tmp / "p.db"
    p = start_primary(pdb, env={"REPL_MAINTENANCE_MS": "50"})
    fleet = None
    proxy = None
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        for k, v in {"segment_bytes": 65536, "snapshot_bytes": 65536, "retain_bytes": 1, "retain_secs": 0}.items():
            assert p.one("SELECT repl_config(?, ?)", [k, v]) == v
        url = serve(p)
        proxy = FaultProxy(int(url.rsplit(":", 1)[1]))
        fleet = Fleet(str(tmp))
        fleet.op("follow", source=proxy.url, n=n, interval=200)
        one = fleet.op("threads")[0]
        lsn, ck = commit(p, 3)
        assert not fleet.op("behind", lsn=lsn, checksum=ck, secs=30, timeout=60)

        # The followers' answers are held while the primary commits on and its maintenance
        # removes the segments they would read next.
        proxy.stall(120)
        for i in range(60):
            p.q("INSERT INTO t(v, pad) VALUES (?, randomblob(3000))", [f"n{i}"])
        wait_for(lambda: worker_status(p)["log"]["first_lsn"] > lsn + 10, timeout=30,
                 what="retention removing the segments after the followers' LSN")
        proxy.pass_()
        lsn2, ck2 = lsn_checksum(p)
        behind = fleet.op("behind", lsn=lsn2, checksum=ck2, secs=60, timeout=120)
        assert not behind, f"{behind} did not catch up"
        for s in fleet.op("status", i=list(range(n))):
            st = json.loads(s)
            assert st["resnapshots"] >= 1, st
            assert st["follow"]["state"] in ("waiting", "applying"), st
        # The background pool (2 threads) started for the re-snapshots; nothing per follower.
        assert fleet.op("threads")[0] == one + 2, (one, fleet.op("threads"))
        # And they keep following.
        lsn3, ck3 = commit(p, 2)
        assert not fleet.op("behind", lsn=lsn3, checksum=ck3, secs=30, timeout=60)
    finally:
        if fleet is not None:
            fleet.close()
        if proxy is not None:
            proxy.close()
        p.close()


def test_follow_unfollow_churn_leaks_no_connection_or_thread(tmp):
    """Stopping a follower abandons its poll and closes its connection; restarting it many
    times leaves the threads and descriptors where they were, and it still follows."""
    p, url = start_serving_primary(tmp / "p.db")
    fleet = Fleet(str(tmp))
    try:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        fleet.op("follow", source=url, n=5, interval=200)
        lsn, ck = commit(p, 2)
        assert not fleet.op("behind", lsn=lsn, checksum=ck, secs=30, timeout=60)
        threads, fds = fleet.op("threads")[0], fleet.op("fds")[0]
        assert fleet.op("churn", source=url, rounds=30)[0] == threads
        lsn, ck = commit(p, 2)
        assert not fleet.op("behind", lsn=lsn, checksum=ck, secs=30, timeout=60)
        # The abandoned polls' connections are closed (by the loop, asynchronously).
        wait_for(lambda: fleet.op("fds")[0] <= fds + 2, timeout=10, what=f"descriptors back near {fds}")
        for s in fleet.op("status", i=list(range(5))):
            st = json.loads(s)
            assert st["follow"]["interval_ms"] == 229 and st["follow"]["errors"] == 0, st
    finally:
        fleet.close()
        p.close()

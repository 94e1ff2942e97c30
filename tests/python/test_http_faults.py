"""HTTP transport under faults (issue 4 acceptance): a fault-injecting TCP proxy (faultproxy.py)
between a serving primary and its replicas drops connections mid-record, cuts bodies short,
flips bytes inside records, stalls, refuses connections; and the primary process is SIGKILLed
and restarted on the same port.

Every test runs separate processes: a primary worker serving its log
(``repl_primary('127.0.0.1:0')``), a writer process committing bank transfers into it (the sum
of the balances never changes; every transfer stamps a version), a follower replica
(``repl_follow(<proxy url>, 200)``) and a stock reader process (no extension, unix VFS) looping
on the replica. Checked for every fault:

* the proxy really injected it (its counters), and the follower's ``repl_status()`` shows it
  while it lasts (``follow.consecutive_errors`` > 0, ``follow.last_error`` and ``last_error``
  saying what broke and that nothing was applied);
* nothing is applied while every record-carrying response is damaged (the replica's LSN stays
  put), the stock reader never sees an error or a state that is not a committed one, and a
  one-shot ``repl_sync(<proxy url>)`` on a second replica fails with a clear error and leaves
  that replica's LSN and checksum as they were;
* drop/truncate/flip also hit single responses at random (seeded) bytes between successful
  polls, the writer still running: the follower recovers by itself each time;
* once the proxy passes again (or the stall ends, or the primary is back), the follower
  recovers by itself and the replica ends byte-identical to the primary: equal
  ``(repl_lsn(), repl_checksum())`` (also recomputed by a fresh process), equal content read
  by a stock process, integrity_check ok; every response the proxy saw had Content-Length.

A stall shorter than the client's timeouts is not an error; during it the replica's
``repl_lsn()``, ``repl_status()`` and ``repl_wait(…, 200)`` answer at once (the follower makes
no request while it holds the replica's state mutex). A stall longer than those timeouts
(a long-poll waits ``interval + 30 s``, ``/v1/info`` 10 s) is not tested: too slow here.

Knob: REPL_HTTP_FAULTS_SEED (default 4242).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from faultproxy import FaultProxy
import workload
from helpers import (
    Worker, WorkerError, bg_result, lsn_checksum, serve, spawn_bg, start_serving_primary, stock_one, stock_tables,
    wait_for, worker_status, worker_tables,
)

N_ACCT = 8
TOTAL = N_ACCT * 100
SEED = int(os.environ.get("REPL_HTTP_FAULTS_SEED", "4242"))

SCHEMA = workload.schema(N_ACCT, 100, junk_rows=40)

# Bank transfers into P_DB until STOP exists (or the process is killed). With LISTEN, this
# process is also the serving primary (workload.serve: retried while the port is still taken)
# and prints its URL first.
WRITER = """
import random
from workload import serve, transfer
conn = connect(os.environ["P_DB"])
conn.setbusytimeout(10000)
if os.environ.get("LISTEN"):
    print(json.dumps({"url": serve(conn, os.environ["LISTEN"], timeout=15)}), flush=True)
rng = random.Random(int(os.environ["SEED"]))
stop, n = os.environ["STOP"], int(os.environ["N_ACCT"])
done = 0
while not os.path.exists(stop):
    transfer(conn, rng, n, amount=(1, 20))
    if rng.random() < 0.25:  # a multi-page record
        conn.execute("UPDATE junk SET b = randomblob(3000) WHERE id % 5 = ?", (rng.randint(0, 4),))
    conn.execute("COMMIT")
    done += 1
    time.sleep(0.004 + rng.random() * 0.008)  # workload pacing, not synchronisation
print(json.dumps({"txns": done}))
"""

# A stock reader (no extension in this process) looping on the replica until STOP: it must
# never see an error or a state that is not a committed one, nor a version going back.
READER = """
import workload
check = workload.BankCheck(float(os.environ["TOTAL"]), int(os.environ["N_ACCT"]))
print(json.dumps(workload.read_loop(os.environ["R_DB"], os.environ["STOP"], workload.READ_SQL, check,
                                    readonly=True, pace=0.003)))
"""


def follow_status(r: Worker) -> dict:
    st = worker_status(r)
    assert st["follow"] is not None, f"the replica stopped following: {st}"
    return st


class Rig:
    """Primary worker serving on 127.0.0.1:0, a proxy in front of it, a follower replica and a
    one-shot replica (both bootstrapped through the proxy), a writer and a stock reader."""

    def __init__(self, tmp, seed: int):
        self.tmp = tmp
        self.pdb, self.rdb, self.r2db = tmp / "p.db", tmp / "r.db", tmp / "r2.db"
        self.stop_writer, self.stop_reader = tmp / "STOP_W", tmp / "STOP_R"
        self.p, self.url = start_serving_primary(self.pdb)
        self.p.script(SCHEMA)
        self.proxy = FaultProxy(int(self.url.rsplit(":", 1)[1]))
        self.r = Worker(self.rdb)
        assert self.r.one("SELECT repl_follow(?, 200)", [self.proxy.url]) == self.p.one("SELECT repl_lsn()")
        self.r2 = Worker(self.r2db)
        self.r2.one("SELECT repl_sync(?)", [self.proxy.url])
        env = {"P_DB": str(self.pdb), "R_DB": str(self.rdb), "N_ACCT": str(N_ACCT), "TOTAL": str(TOTAL),
               "SEED": str(seed)}
        self.writer = spawn_bg(WRITER, tmp, "writer", {**env, "STOP": str(self.stop_writer)})
        self.reader = spawn_bg(READER, tmp, "reader", {**env, "STOP": str(self.stop_reader)})

    def lsn(self, w: Worker | None = None) -> int:
        return (w or self.r).one("SELECT repl_lsn()")

    def wait_progress(self, n: int = 5) -> int:
        """The follower applies at least ``n`` more LSNs (the proxy passes)."""
        start = self.lsn()
        return wait_for(lambda: (lsn := self.lsn()) >= start + n and lsn, timeout=20, what=f"{n} LSNs applied")

    def wait_failing(self, kind: str, words: tuple[str, ...], faults_before: int, errors_before: int) -> dict:
        """The proxy injected a new fault of ``kind`` and the follower reported a new error;
        returns the status seen while failing."""
        def failing():
            st = follow_status(self.r)
            f = st["follow"]
            if self.proxy.faults[kind] > faults_before and f["errors"] > errors_before and f["consecutive_errors"] > 0:
                return st
            return None

        st = wait_for(failing, timeout=15, what=f"a {kind} fault reported by the follower ({self.proxy.log})")
        f = st["follow"]
        for where in (f["last_error"], st["last_error"]):
            assert where and any(w in where for w in words), f"{kind}: unexpected error {where!r} (want one of {words})"
            assert self.proxy.url in where, where
        return st

    def one_shot_fails(self, words: tuple[str, ...]) -> str:
        """repl_sync(<proxy>) on the second replica fails clearly and changes nothing."""
        before = lsn_checksum(self.r2)
        assert before[0] < self.p.one("SELECT repl_lsn()"), "the one-shot replica has nothing to fetch"
        with pytest.raises(WorkerError) as e:
            self.r2.q("SELECT repl_sync(?)", [self.proxy.url])
        msg = e.value.msg
        assert any(w in msg for w in words) and self.proxy.url in msg, msg
        assert lsn_checksum(self.r2) == before
        assert worker_status(self.r2)["last_error"] == msg
        return msg

    def finish(self) -> None:
        """Writer stopped; the follower catches up by itself; everything byte-identical."""
        self.stop_writer.touch()
        txns = bg_result(self.writer, timeout=30)["txns"]
        assert txns > 10, txns
        want_lsn = self.p.one("SELECT repl_lsn()")
        wait_for(lambda: self.lsn() == want_lsn, timeout=20,
                 what=f"the follower recovering to LSN {want_lsn} ({worker_status(self.r)['follow']})")
        self.stop_reader.touch()
        seen = bg_result(self.reader, timeout=30)
        assert seen["n_errors"] == 0 and seen["n_violations"] == 0 and seen["reads"] > 0, seen
        want = lsn_checksum(self.p)
        assert lsn_checksum(self.r) == want
        st = follow_status(self.r)
        assert st["follow"]["consecutive_errors"] == 0 and st["last_error"] is None, st
        assert self.r2.one("SELECT repl_sync(?)", [self.proxy.url]) == want[0]
        assert lsn_checksum(self.r2) == want
        tables = worker_tables(self.p)
        for w in (self.r, self.r2):
            w.close()
        for db in (self.rdb, self.r2db):
            assert stock_tables(db) == tables
            assert stock_one(db, "PRAGMA integrity_check;") == "ok"
        with Worker(self.rdb) as fresh:  # the checksum recomputed from the files
            assert lsn_checksum(fresh) == want
        # Every response had Content-Length framing (tiny_http would chunk big bodies).
        assert self.proxy.unframed == 0, list(self.proxy.log)[-5:]
        assert self.proxy.responses["/v1/log"] > 10, self.proxy.responses

    def close(self) -> None:
        self.stop_writer.touch()
        self.stop_reader.touch()
        for proc in (self.writer, self.reader):
            try:
                proc.wait(20)
            except Exception:
                proc.kill()
                proc.wait()
        for w in (self.r, self.r2, self.p):
            w.close()
        self.proxy.close()


# (kind, fault settings one after the other, words an error must contain one of)
BROKE = ("broke while reading records", "cut short", "cannot reach the primary")
FAULTS = {
    # a reset right after the headers, mid-record (every record holds a 4096-byte page),
    # and one byte before the end of the body
    "drop": ([lambda px: px.drop_after(0), lambda px: px.drop_after(1000), lambda px: px.drop_after(10**9)], BROKE),
    # a clean close: no body at all, half of it, all but the last byte
    "truncate": ([lambda px: px.truncate(0), lambda px: px.truncate(), lambda px: px.truncate(10**9)], BROKE),
    # a record header byte, a page byte, the last record's trailing checksum
    "flip": ([lambda px: px.flip(9), lambda px: px.flip(3000), lambda px: px.flip(-1)], ("is invalid",)),
    "refuse": ([lambda px: px.refuse()], ("cannot reach the primary",)),
}


# One fault in the next record-carrying response only, at a random (seeded) byte.
ONCE = {
    "drop": lambda px, rng: px.drop_after(rng.randrange(0, 40000), count=1),
    "truncate": lambda px, rng: px.truncate(rng.randrange(0, 40000), count=1),
    "flip": lambda px, rng: px.flip(rng.randrange(0, 1 << 20), count=1),
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_follower_survives_fault(tmp, kind):
    """Persistent faults (every record-carrying response damaged, several settings one after
    the other): errors reported, nothing applied, a one-shot repl_sync() fails cleanly; then
    single faults at random bytes between successful polls; then the proxy passes again."""
    settings, words = FAULTS[kind]
    rig = Rig(tmp, SEED + len(kind))
    try:
        rig.wait_progress()
        stuck = None
        for i, apply_fault in enumerate(settings):
            apply_fault(rig.proxy)  # stays until the next setting
            for _ in range(2):  # two faults reported per setting
                st = follow_status(rig.r)
                st = rig.wait_failing(kind, words, rig.proxy.faults[kind], st["follow"]["errors"])
                if stuck is None:
                    stuck = st["lsn"]  # from the first reported fault on, nothing can be applied
                assert rig.lsn() == stuck, f"{kind} #{i}: the replica moved from LSN {stuck} while every record was damaged"
                assert rig.r.one("SELECT total(bal) FROM acct") == TOTAL  # readable meanwhile
        before = lsn_checksum(rig.r2)
        msg = rig.one_shot_fails(words)
        if kind != "refuse":
            assert "nothing was applied" in msg, msg
        if kind == "flip":  # not "the primary's log is damaged" with a made-up local path
            assert f"still holds LSN {before[0]}" in msg and "-replica directory" in msg, msg
            assert "http://127.0.0.1:" not in msg.split("verify")[-1], msg
        assert rig.lsn() == stuck
        backlog = rig.p.one("SELECT repl_lsn()") - stuck
        assert backlog >= 3, f"the writer committed only {backlog} transactions during the faults"
        assert rig.proxy.faults[kind] >= 2 * len(settings), rig.proxy.faults
        rig.proxy.pass_()
        rig.wait_progress(backlog)
        if kind in ONCE:
            rng = random.Random(SEED + 100 + len(kind))
            for i in range(4):
                st = follow_status(rig.r)
                faults, errors = rig.proxy.faults[kind], st["follow"]["errors"]
                ONCE[kind](rig.proxy, rng)
                wait_for(lambda: rig.proxy.faults[kind] > faults and follow_status(rig.r)["follow"]["errors"] > errors,
                         timeout=15, what=f"single {kind} fault #{i} reported ({list(rig.proxy.log)[-3:]})")
                assert rig.proxy.mode == "pass"
                rig.wait_progress(2)  # recovers by itself, the writer still running
        rig.finish()
    finally:
        rig.close()


def test_stalled_server(tmp):
    """A server that stops answering for 2.5 s (shorter than the client's timeouts: a
    long-poll may take wait + 30 s, /v1/info 10 s): no error, nothing applied during the
    stall, the replica stays readable and its repl_lsn()/repl_status()/repl_wait() answer at
    once; when the stall ends by itself, the follower carries on. Then only /v1/log stalls
    (the follower's long-poll; it takes the source's info from the same response, so it asks
    nothing else before applying): repl_wait() still keeps its timeout."""
    rig = Rig(tmp, SEED + 7)
    try:
        rig.wait_progress()
        errors = follow_status(rig.r)["follow"]["errors"]
        for path, seconds in (("/", 2.5), ("/v1/log", 2.0)):
            held_before = rig.proxy.faults["stall"]
            rig.proxy.stall(seconds, path)
            t0 = time.monotonic()
            wait_for(lambda: rig.proxy.faults["stall"] > held_before, timeout=5, what=f"a response to {path} held")
            # Once the follower's request is held it cannot move until the stall ends; the
            # replica's own SQL functions must answer meanwhile (three rounds, ~0.3 s each).
            held = None
            for _ in range(3):
                t = time.monotonic()
                lsn = rig.lsn()
                held = lsn if held is None else held
                assert lsn == held
                assert rig.r.one("SELECT total(bal) FROM acct") == TOTAL
                assert worker_status(rig.r)["follow"]["consecutive_errors"] == 0
                with pytest.raises(WorkerError) as e:
                    rig.r.q("SELECT repl_wait(?, 200)", [held + 10_000])
                assert "timed out after 200 ms" in e.value.msg
                took = time.monotonic() - t
                assert took < 0.95, f"the replica's SQL functions blocked {took:.2f} s during a stall of {path}"
                assert rig.proxy.mode == "stall", "the checks did not run during the stall"
                time.sleep(0.05)  # pacing of the checks
            rig.wait_progress()  # no pass_(): the stall ended by itself
            assert time.monotonic() - t0 >= seconds - 0.1
        st = follow_status(rig.r)
        assert st["follow"]["errors"] == errors, f"a short stall must not be an error: {st['follow']}"
        rig.finish()
    finally:
        rig.close()


def test_primary_killed_and_restarted_on_the_same_port(tmp):
    """SIGKILL of the serving, writing primary process, three times: the follower keeps the
    replica readable at its last LSN with the error in repl_status(); each new primary process
    listens on the same port (retrying while it is taken) and recaptures what the killed one
    committed; the follower recovers by itself every time and ends byte-identical."""
    pdb, rdb, stop, stop_r = tmp / "p.db", tmp / "r.db", tmp / "STOP_W", tmp / "STOP_R"
    with Worker(pdb) as p:
        p.one("SELECT repl_primary()")
        p.script(SCHEMA)
    env = {"P_DB": str(pdb), "R_DB": str(rdb), "N_ACCT": str(N_ACCT), "TOTAL": str(TOTAL), "STOP": str(stop)}
    procs = []
    r = p2 = reader = None
    url, port = None, 0
    try:
        for round_ in range(3):
            name = f"primary{round_}"
            prim = spawn_bg(WRITER, tmp, name, {**env, "SEED": str(SEED + 9 + round_), "LISTEN": f"127.0.0.1:{port}"})
            procs.append(prim)
            first = wait_for(lambda: (t := (tmp / f"{name}.out").read_text()).strip() and t.splitlines()[0],
                             timeout=20, what=f"{name}'s URL")
            got = json.loads(first)["url"]
            if url is None:
                url, port = got, int(got.rsplit(":", 1)[1])
                r = Worker(rdb)
                r.one("SELECT repl_follow(?, 200)", [url])
                reader = spawn_bg(READER, tmp, "reader", {**env, "STOP": str(stop_r)})
            assert got == url
            start = r.one("SELECT repl_lsn()")
            wait_for(lambda: r.one("SELECT repl_lsn()") >= start + 15, timeout=20,
                     what=f"the follower applying from {name} ({worker_status(r)['follow']})")
            errors = follow_status(r)["follow"]["errors"]
            os.kill(prim.pid, signal.SIGKILL)  # mid-workload: commits in flight, long-polls open
            prim.wait(10)

            def down():
                st = follow_status(r)
                f = st["follow"]
                return f["errors"] > errors and f["consecutive_errors"] >= 2 and st

            st = wait_for(down, timeout=15, what=f"the follower reporting the death of {name}")
            for where in (st["follow"]["last_error"], st["last_error"]):
                assert "cannot reach the primary" in where and url in where and "stays readable" in where, where
            held = st["lsn"]
            assert r.one("SELECT repl_lsn()") == held
            assert r.one("SELECT total(bal) FROM acct") == TOTAL
            assert r.one("SELECT v FROM ver") == r.one("SELECT max(ver) FROM acct")
        # The last primary process: a worker on the same port, a few transfers, then compare.
        p2 = Worker(pdb)
        again = serve(p2, port)  # retried while the killed one's port is still taken
        assert again == url
        assert p2.one("SELECT repl_lsn()") >= held, "the restarted primary lost records a replica had applied"
        for i in range(5):  # new commits after the restart, one transfer each
            p2.script([
                "BEGIN IMMEDIATE",
                "UPDATE ver SET v = v + 1",
                "UPDATE acct SET bal = bal - 1, ver = (SELECT v FROM ver) WHERE id = 0",
                "UPDATE acct SET bal = bal + 1, ver = (SELECT v FROM ver) WHERE id = 1",
                "COMMIT",
            ])
        want_lsn = p2.one("SELECT repl_lsn()")
        wait_for(lambda: r.one("SELECT repl_lsn()") == want_lsn, timeout=20,
                 what=f"the follower recovering to LSN {want_lsn} ({worker_status(r)['follow']})")
        want = lsn_checksum(p2)
        assert lsn_checksum(r) == want
        st = follow_status(r)
        assert st["follow"]["consecutive_errors"] == 0 and st["last_error"] is None, st
        assert st["resnapshots"] == 0, st
        stop_r.touch()
        seen = bg_result(reader, timeout=30)
        assert seen["n_errors"] == 0 and seen["n_violations"] == 0 and seen["reads"] > 0, seen
        tables = worker_tables(p2)
        r.close()
        assert stock_tables(rdb) == tables
        assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
    finally:
        stop.touch()
        stop_r.touch()
        for proc in [*procs, reader]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for w in (r, p2):
            if w is not None:
                w.close()

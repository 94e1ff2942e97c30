#!/usr/bin/env python3
"""Seeded, reproducible torture soak of sqlite-replica (issue 6 item 1): `make torture`.

Processes (each its own OS process, so kill -9 is a real crash):

* a serving primary process: ``repl_primary('127.0.0.1:<port>')`` on ``p.db``, restartable on
  the same port;
* WRITERS writer processes (extension loaded) doing bank transfers on ``p.db``: every
  transaction moves money between two accounts (the total never changes), bumps ``ver.v`` by
  one and stamps the touched accounts with it (so ``max(acct.ver) == ver.v`` in every committed
  state); sometimes multi-page / overflow blob churn in ``junk``; writer 0 commits at
  synchronous=NORMAL (its automatic checkpoints go to the checkpoint assist: the hand-off),
  the others at SQLite's default FULL;
* three replica processes, each following the primary through its own fault proxy
  (tests/python/faultproxy.py) with ``repl_follow(<proxy>, 100)``; every incarnation gets a
  seeded ``REPL_DRAIN_FRAMES`` (some tiny, forcing drains);
* one stock reader per replica (no extension, ``vfs='unix'``, read-only) checking the bank
  invariant: total and count constant, ``max(ver) == v``, ``v`` never decreasing (across
  reads and across replica crashes/re-snapshots), identical reads inside long read
  transactions; any SQLite error other than SQLITE_BUSY is a failure;
* the fault scheduler (this process, seeded): kill -9 of a writer / a replica / the serving
  primary (each restarted), proxy faults (drop / truncate / flip for a while, stall, refuse),
  stock checkpoints on a replica's file, and once per run a foreign write on the primary (a
  stock apsw connection, ``vfs='unix'``, a balanced transfer that bumps the version) so the
  primary detects a gap, starts a new generation and every replica re-snapshots.

At the end: faults stop, writers stop, every replica catches up to the primary's final LSN
(``repl_wait``), then ``repl_checksum()`` (recomputed by a fresh process), the content read by
a stock process and ``PRAGMA integrity_check`` are compared against the primary. A summary is
printed; the exit status is non-zero on any invariant violation, reader error, divergence or
unexpected process death. Event lines are ``key=value``.

``--failover`` (issue 16 part 4; docs/SQL.md "Automatic failover"): the same bank, readers and
end checks on a cluster whose primary moves. A one-member etcd started by the script (free
loopback ports, data in the work directory); four *nodes* (``p.db`` the first primary,
``r0..r2.db`` its replicas), each one process that configures ``repl_config('failover',
'etcd://…?listen=…&name=nI')`` on its database: the primary holds the leadership key, the
replicas are candidates that follow whoever etcd names (directly, so no fault proxies), with
``sync_replicas`` = 1 (the election rule that must lose no acknowledged commit). The writers do
their transfers as ``POST /v1/exec`` scripts (at most once: a retry after a lost answer reuses
the request id) to the primary named in etcd, finding the new one after a failover. Faults:
kill -9 of the primary's node (a candidate takes over through etcd; the killed node is
restarted and rejoins as a replica, its unreplicated tail kept aside), of a candidate's node,
of a writer, stock checkpoints on a replica's file, one foreign write on the primary's file.
At the end every node's checksum must equal the final primary's, every reader's bank
invariant must have held (a reader's ``v`` may go back only on a node that logged an
``orphaned_tail`` or ``replica_rewound``: the documented rewind of an unreplicated tail), and no
epoch may have transaction records in two nodes' logs (``sqlite-replica inspect`` of every
node's log and of the logs kept aside).

Usage: scripts/torture.py --seed N [--secs S] [--dir D] [--keep] [--failover]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The test helpers, the fault proxy and the bank workload (shared with the stress, fault and
# crash tests) live beside the Python tests.
sys.path.insert(0, str(REPO / "tests" / "python"))

import apsw  # noqa: E402

import workload  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from helpers import Worker, lsn_checksum, spawn_bg, stock_one, stock_tables, wait_for  # noqa: E402

N_ACCT = 16
START_BAL = 1000
TOTAL = N_ACCT * START_BAL
WRITERS = 2
REPLICAS = 3

SCHEMA = workload.schema(N_ACCT, START_BAL, junk_rows=30)
READ_SQL = workload.READ_SQL

# The serving primary: holds the HTTP server until STOP exists (or it is killed). Retries
# while the port is still taken by its killed predecessor's socket.
SERVER = """
from workload import serve
conn = connect(os.environ["P_DB"])
conn.setbusytimeout(10000)
print(json.dumps({"url": serve(conn, os.environ["LISTEN"], timeout=30)}), flush=True)
while not os.path.exists(os.environ["STOP"]):
    time.sleep(0.05)
conn.close()
print(json.dumps({"stopped": True}), flush=True)
"""

WRITER = """
import random
from workload import transfer
conn = connect(os.environ["P_DB"])
conn.setbusytimeout(10000)
conn.execute(f"PRAGMA synchronous={os.environ['SYNC']}")
rng = random.Random(int(os.environ["SEED"]))
stop, n = os.environ["STOP"], int(os.environ["N_ACCT"])
done = busy = 0
while not os.path.exists(stop):
    try:
        transfer(conn, rng, n, amount=(1, 50))
        r = rng.random()
        if r < 0.15:  # multi-page commits
            conn.execute("UPDATE junk SET b = randomblob(?) WHERE id % 7 = ?", (rng.randint(1000, 6000), rng.randint(0, 6)))
        elif r < 0.18:  # overflow chains, the file grows and shrinks
            if one(conn, "SELECT count(*) FROM junk") < 45:
                conn.execute("INSERT INTO junk(b) VALUES (randomblob(?))", (rng.randint(20000, 150000),))
            else:
                conn.execute("DELETE FROM junk WHERE id IN (SELECT id FROM junk WHERE length(b) > 10000 LIMIT 3)")
        conn.execute("COMMIT")
        done += 1
    except apsw.BusyError:
        busy += 1
        if not conn.getautocommit():
            conn.execute("ROLLBACK")
        continue
    if done % 200 == 0:
        print(json.dumps({"progress": done, "busy": busy}), flush=True)
    time.sleep(0.003 + rng.random() * 0.012)  # workload pacing (2 shared cores)
conn.close()
print(json.dumps({"txns": done, "busy": busy}), flush=True)
"""

REPLICA = """
conn = connect(os.environ["R_DB"])
conn.setbusytimeout(10000)
url = os.environ["SOURCE"]
deadline = time.monotonic() + 120
tries = 0
while True:  # the first sync runs here: it fails while the proxy faults or the server is down
    try:
        lsn = one(conn, "SELECT repl_follow(?, 100)", (url,))
        break
    except apsw.Error as e:
        tries += 1
        sys.stderr.write(f"event=torture_follow_retry error={type(e).__name__} msg={str(e)[:200]!r}\\n")
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
print(json.dumps({"following": lsn, "tries": tries}), flush=True)
final = os.environ["FINAL"]
while not os.path.exists(final):
    time.sleep(0.05)
want = int(open(final).read())
got = one(conn, "SELECT repl_wait(?, 120000)", (want,))
one(conn, "SELECT repl_follow(NULL)")
st = json.loads(one(conn, "SELECT repl_status()"))
print(json.dumps({"lsn": got, "checksum": one(conn, "SELECT repl_checksum()"), "status": st}), flush=True)
"""

# One stock reader per replica (no extension in this process): the bank invariant on every
# read, long read transactions whose snapshot must not move, a fresh connection now and then;
# SQLITE_BUSY is retried, any other error counts. Violations and errors are printed as they
# happen (with the time, to find them in the event log).
READER = """
import random, workload
check = workload.BankCheck(float(os.environ["TOTAL"]), int(os.environ["N_ACCT"]))
print(json.dumps(workload.read_loop(os.environ["R_DB"], os.environ["STOP"], os.environ["READ_SQL"], check,
                                    rng=random.Random(int(os.environ["SEED"])), long_share=0.05, long_secs=(0.05, 1.5),
                                    long_pace=0.01, pace=0.004, readonly=True, reopen_share=0.01, busy_ok=True,
                                    live=True)), flush=True)
"""


def stock_checkpoint(db: Path, mode: str):
    """A checkpoint of `db` by a stock connection (no extension, `vfs='unix'`): its result row,
    or "busy"."""
    c = apsw.Connection(str(db), vfs="unix")
    c.setbusytimeout(200)
    try:
        return c.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except apsw.BusyError:
        return "busy"
    finally:
        c.close()


def log(**kv) -> None:
    parts = [f"t={time.monotonic() - T0:.2f}"]
    for k, v in kv.items():
        s = str(v)
        parts.append(f"{k}={json.dumps(s) if (' ' in s or not s) else s}")
    print(" ".join(parts), flush=True)


T0 = time.monotonic()


class Torture:
    def __init__(self, seed: int, secs: float, workdir: Path):
        self.seed, self.secs, self.dir = seed, secs, workdir
        self.rng = random.Random(seed)
        self.pdb = workdir / "p.db"
        self.rdbs = [workdir / f"r{i}.db" for i in range(REPLICAS)]
        self.stop_w, self.stop_s, self.stop_r = workdir / "STOP_W", workdir / "STOP_S", workdir / "STOP_R"
        self.final = workdir / "FINAL"
        self.faults: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.incarnation: collections.Counter[str] = collections.Counter()
        self.port = 0
        self.server = None
        self.writers: list = [None] * WRITERS
        self.replicas: list = [None] * REPLICAS
        self.readers: list = []
        self.proxies: list[FaultProxy] = []
        self.undo: list[tuple[float, int]] = []  # (when, proxy index): back to pass

    # ------------------------------------------------------------------ processes

    def env(self, **extra) -> dict[str, str]:
        base = {"P_DB": str(self.pdb), "N_ACCT": str(N_ACCT), "TOTAL": str(TOTAL), "READ_SQL": READ_SQL}
        base.update({k: str(v) for k, v in extra.items()})
        return base

    def spawn(self, code: str, name: str, **extra):
        self.incarnation[name] += 1
        tag = f"{name}.{self.incarnation[name]}"
        proc = spawn_bg(code, self.dir, tag, self.env(**extra))
        log(event="start", proc=tag, pid=proc.pid)
        return proc

    def out_lines(self, proc) -> list[dict]:
        text = (proc.logdir / f"{proc.name}.out").read_text()
        out = []
        for ln in text.splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                pass
        return out

    def start_server(self) -> None:
        listen = f"127.0.0.1:{self.port}"
        self.server = self.spawn(SERVER, "server", LISTEN=listen, STOP=self.stop_s)
        proc = self.server
        first = wait_for(lambda: proc.poll() is None and self.out_lines(proc), timeout=40,
                         what=f"the serving primary on {listen} (see {proc.name}.err)")
        url = first[0]["url"]
        self.port = int(url.rsplit(":", 1)[1])

    def start_writer(self, i: int) -> None:
        self.writers[i] = self.spawn(WRITER, f"writer{i}", SEED=self.rng.randrange(1 << 30), STOP=self.stop_w,
                                     SYNC="NORMAL" if i == 0 else "FULL")

    def start_replica(self, i: int) -> None:
        drain = self.rng.choice([16, 64, 400, 4000])
        self.replicas[i] = self.spawn(REPLICA, f"replica{i}", R_DB=self.rdbs[i], SOURCE=self.proxies[i].url,
                                      FINAL=self.final, REPL_DRAIN_FRAMES=drain, REPL_DRAIN_TIMEOUT_MS=500)
        log(event="replica_env", replica=i, drain_frames=drain)

    def kill(self, proc) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log(event="killed", proc=proc.name, pid=proc.pid)

    def check_alive(self) -> None:
        """A process that ended by itself (not killed by us) is a failure."""
        for proc in [self.server, *self.writers, *self.replicas, *self.readers]:
            if proc is not None and proc.poll() is not None:
                err = (proc.logdir / f"{proc.name}.err").read_text()[-2000:]
                self.failures.append(f"{proc.name} exited by itself rc={proc.returncode}: {err}")
                log(event="unexpected_exit", proc=proc.name, rc=proc.returncode)
                raise RuntimeError(self.failures[-1])

    # ------------------------------------------------------------------ faults

    def foreign_write(self) -> None:
        c = apsw.Connection(str(self.pdb), vfs="unix")  # this process never loads the extension
        c.setbusytimeout(10000)
        try:
            _, _, x, v = workload.transfer(c, self.rng, N_ACCT, amount=(0, 30))
            c.execute("COMMIT")
        finally:
            c.close()
        log(event="fault", kind="foreign_write", v=v, amount=x)

    def replica_foreign_write(self, i: int) -> None:
        """A stock writer on a replica's file: a balanced transfer that keeps every account's
        version stamp (so the bank invariant holds for readers whatever state the replica
        re-snapshots to). The follower must notice it and re-snapshot."""
        c = apsw.Connection(str(self.rdbs[i]), vfs="unix")
        c.setbusytimeout(2000)
        try:
            a, b = self.rng.sample(range(N_ACCT), 2)
            x = self.rng.randint(1, 30)
            c.execute("BEGIN IMMEDIATE")
            c.execute("UPDATE acct SET bal = bal - ? WHERE id = ?", (x, a))
            c.execute("UPDATE acct SET bal = bal + ? WHERE id = ?", (x, b))
            c.execute("COMMIT")
            res = "committed"
        except apsw.BusyError:
            if not c.getautocommit():
                c.execute("ROLLBACK")
            res = "busy"
        finally:
            c.close()
        log(event="fault", kind="replica_foreign_write", replica=i, result=res)

    def checkpoint(self, i: int, mode: str) -> None:
        log(event="fault", kind="checkpoint", replica=i, mode=mode, result=stock_checkpoint(self.rdbs[i], mode))

    def one_fault(self) -> None:
        rng = self.rng
        kind = rng.choices(
            ["kill_writer", "kill_replica", "kill_server", "drop", "truncate", "flip", "stall", "refuse", "checkpoint",
             "replica_foreign_write"],
            weights=[3, 3, 2, 2, 2, 2, 1, 1, 3, 1],
        )[0]
        self.faults[kind] += 1
        if kind == "kill_writer":
            i = rng.randrange(WRITERS)
            log(event="fault", kind=kind, proc=self.writers[i].name)
            self.kill(self.writers[i])
            self.start_writer(i)
        elif kind == "kill_replica":
            i = rng.randrange(REPLICAS)
            log(event="fault", kind=kind, proc=self.replicas[i].name)
            self.kill(self.replicas[i])
            self.start_replica(i)
        elif kind == "kill_server":
            log(event="fault", kind=kind, proc=self.server.name)
            self.kill(self.server)
            time.sleep(rng.uniform(0, 1.5))  # down for a while (fault shape)
            self.start_server()
        elif kind in ("drop", "truncate", "flip"):
            i = rng.randrange(REPLICAS)
            px = self.proxies[i]
            arg = rng.randrange(0, 40000) if kind != "flip" else rng.randrange(0, 1 << 20)
            if rng.random() < 0.5:
                count, dur = rng.randint(1, 4), None
            else:
                count, dur = None, rng.uniform(0.3, 2.5)
                self.undo.append((time.monotonic() + dur, i))
            {"drop": px.drop_after, "truncate": px.truncate, "flip": px.flip}[kind](arg, count=count)
            log(event="fault", kind=kind, proxy=i, arg=arg, count=count, secs=dur and round(dur, 2))
        elif kind == "stall":
            i, dur = rng.randrange(REPLICAS), rng.uniform(0.2, 3.0)
            self.proxies[i].stall(dur)
            log(event="fault", kind=kind, proxy=i, secs=round(dur, 2))
        elif kind == "refuse":
            i, dur = rng.randrange(REPLICAS), rng.uniform(0.2, 2.0)
            self.proxies[i].refuse()
            self.undo.append((time.monotonic() + dur, i))
            log(event="fault", kind=kind, proxy=i, secs=round(dur, 2))
        elif kind == "replica_foreign_write":
            self.replica_foreign_write(rng.randrange(REPLICAS))
        elif kind == "checkpoint":
            self.checkpoint(rng.randrange(REPLICAS), rng.choice(["PASSIVE", "PASSIVE", "RESTART", "TRUNCATE", "FULL"]))

    def run_undo(self, all_now: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for when, i in self.undo:
            if all_now or when <= now:
                self.proxies[i].pass_()
                log(event="fault_end", proxy=i)
            else:
                keep.append((when, i))
        self.undo = keep

    # ------------------------------------------------------------------ the run

    def setup(self) -> None:
        w = Worker(self.pdb)
        try:
            w.one("SELECT repl_primary()")
            w.script(SCHEMA)
        finally:
            w.close()
        self.start_server()
        self.proxies = [FaultProxy(self.port) for _ in range(REPLICAS)]
        for i in range(REPLICAS):
            self.start_replica(i)
        for i in range(REPLICAS):
            proc = self.replicas[i]
            wait_for(lambda: proc.poll() is None and any("following" in d for d in self.out_lines(proc)),
                     timeout=60, what=f"replica {i} to bootstrap (see {proc.name}.err)")
        for i in range(WRITERS):
            self.start_writer(i)
        for i, db in enumerate(self.rdbs):
            self.readers.append(self.spawn(READER, f"reader{i}", R_DB=db, STOP=self.stop_r, SEED=self.rng.randrange(1 << 30)))

    def soak(self) -> None:
        start = time.monotonic()
        end = start + self.secs
        foreign_at = start + self.secs * self.rng.uniform(0.3, 0.6)
        next_fault = start + self.rng.uniform(1, 3)
        while time.monotonic() < end:
            self.run_undo()
            self.check_alive()
            now = time.monotonic()
            if foreign_at and now >= foreign_at:
                self.foreign_write()
                self.faults["foreign_write"] += 1
                foreign_at = 0
            elif now >= next_fault:
                self.one_fault()
                next_fault = time.monotonic() + self.rng.uniform(0.5, 3.5)
            time.sleep(0.05)

    def finish(self) -> dict:
        log(event="phase", name="finish")
        self.run_undo(all_now=True)
        for px in self.proxies:
            px.pass_()
        self.check_alive()
        self.stop_w.touch()
        txns_by_writer = 0
        for proc in self.writers:
            proc.wait(60)
            lines = self.out_lines(proc)
            if proc.returncode != 0 or not lines or "txns" not in lines[-1]:
                self.failures.append(f"{proc.name} did not stop cleanly rc={proc.returncode}")
            else:
                txns_by_writer += lines[-1]["txns"]
        with Worker(self.pdb) as p:
            want = lsn_checksum(p)
            v = p.one("SELECT v FROM ver")
        log(event="primary_final", lsn=want[0], checksum=want[1], v=v)
        tmp = self.final.with_suffix(".tmp")
        tmp.write_text(str(want[0]))
        tmp.rename(self.final)
        finals = []
        for proc in self.replicas:
            try:
                proc.wait(180)
            except Exception:
                self.failures.append(f"{proc.name} did not catch up to LSN {want[0]}")
                self.kill(proc)
            lines = self.out_lines(proc)
            if proc.returncode != 0 or not lines or "lsn" not in lines[-1]:
                err = (proc.logdir / f"{proc.name}.err").read_text()[-2000:]
                self.failures.append(f"{proc.name} failed at the end rc={proc.returncode}: {err}")
                finals.append(None)
            else:
                finals.append(lines[-1])
        self.stop_r.touch()
        reads = []
        for proc in self.readers:
            try:
                proc.wait(60)
            except Exception:
                self.kill(proc)
            lines = self.out_lines(proc)
            if proc.returncode != 0 or not lines or "reads" not in lines[-1]:
                self.failures.append(f"{proc.name} failed rc={proc.returncode}")
                reads.append({"reads": 0, "n_violations": 0, "n_errors": 1, "busy": 0, "long_txns": 0})
            else:
                reads.append(lines[-1])
        self.stop_s.touch()
        self.server.wait(30)
        # Compare every replica with the primary.
        ptables = stock_tables(self.pdb)
        divergences = []
        for i, db in enumerate(self.rdbs):
            with Worker(db) as fresh:  # checksum recomputed from the files by a new process
                got = lsn_checksum(fresh)
            integ = stock_one(db, "PRAGMA integrity_check;")
            same = stock_tables(db) == ptables
            fin = finals[i]
            ok = got == want and integ == "ok" and same and fin is not None and (fin["lsn"], fin["checksum"]) == want
            log(event="compare", replica=i, lsn=got[0], checksum=got[1], integrity=integ, content_equal=same, ok=ok)
            if not ok:
                divergences.append(i)
        # The foreign write on the primary started a new generation (a SNAPSHOT record that
        # every replica applied as an ordinary LSN): each replica must have followed it.
        gens = [f["status"].get("generation") if f else None for f in finals]
        if self.faults["foreign_write"] and not all(g is not None and g >= 2 for g in gens):
            self.failures.append(f"a replica did not follow the primary's new generation: {gens}")
        pinteg = stock_one(self.pdb, "PRAGMA integrity_check;")
        if pinteg != "ok":
            self.failures.append(f"primary integrity_check: {pinteg}")
        bal = stock_one(self.pdb, "SELECT total(bal) FROM acct;")
        if float(bal) != TOTAL:
            self.failures.append(f"primary total {bal} != {TOTAL}")
        # Counts from the extension's event lines of every incarnation.
        events: collections.Counter[str] = collections.Counter()
        for err in self.dir.glob("*.err"):
            for ln in err.read_text(errors="replace").splitlines():
                if ln.startswith("event="):
                    events[ln.split()[0][6:]] += 1
        proxy_injected: collections.Counter[str] = collections.Counter()
        for px in self.proxies:
            proxy_injected.update(px.faults)
            if px.unframed:
                self.failures.append(f"proxy saw {px.unframed} unframed responses")
        return {
            "seed": self.seed,
            "secs": self.secs,
            "transactions": v,
            "txns_of_clean_writers": txns_by_writer,
            "final_lsn": want[0],
            "faults": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()),
            "proxy_injected": dict(sorted(proxy_injected.items())),
            "resyncs": events["resnapshot"] + sum((g or 1) - 1 for g in gens),
            "resnapshots": events["resnapshot"],
            "foreign_writes_detected": events["foreign_write"],
            "replica_generations": gens,
            "follow_errors": events["follow_error"],
            "gaps": events["gap"],
            "wal_pinned": events["wal_pinned"],
            "invariant_checks": sum(r["reads"] for r in reads),
            "long_read_txns": sum(r["long_txns"] for r in reads),
            "reader_busy_retries": sum(r["busy"] for r in reads),
            "invariant_violations": sum(r["n_violations"] for r in reads),
            "reader_errors": sum(r["n_errors"] for r in reads),
            "violation_samples": [x for r in reads for x in r.get("violations", [])][:5],
            "error_samples": [x for r in reads for x in r.get("errors", [])][:5],
            "divergences": len(divergences),
            "failures": self.failures,
        }

    def cleanup(self) -> None:
        for p in (self.stop_w, self.stop_s, self.stop_r):
            p.touch()
        for proc in [self.server, *self.writers, *self.replicas, *self.readers]:
            if proc is not None and proc.poll() is None:
                try:
                    proc.wait(5)
                except Exception:
                    proc.kill()
                    proc.wait()
        for px in self.proxies:
            px.close()


# ---------------------------------------------------------------------- --failover

ETCD_KEY = "torture/db"
FO_TTL_MS = 2000
NODES = ["p", "r0", "r1", "r2"]

# One node: its database under failover. First boot of a replica: bootstrap from the first
# primary. A primary that leads (first start, or it took the key back) serves on its address;
# a candidate that wins serves there by itself (the failover agent's promotion).
NODE = """
import workload
conn = connect(os.environ["DB"])
conn.setbusytimeout(10000)
listen, url, final, stop = os.environ["LISTEN"], os.environ["FAILOVER"], os.environ["FINAL"], os.environ["STOP"]
deadline = time.monotonic() + 120
def retry(what, f):
    while True:
        try:
            return f()
        except apsw.Error as e:
            sys.stderr.write(f"event=torture_node_retry what={what} error={type(e).__name__} msg={str(e)[:300]!r}\\n")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
role = one(conn, "SELECT repl_role()")
if role is None:
    retry("bootstrap", lambda: one(conn, "SELECT repl_sync(?)", (os.environ["BOOT"],)))
retry("failover", lambda: one(conn, "SELECT repl_config('failover', ?)", (url,)))
print(json.dumps({"started": role}), flush=True)
while not os.path.exists(final):
    st = json.loads(one(conn, "SELECT repl_status()"))
    if st.get("role") == "primary" and not st.get("server") and (st.get("failover") or {}).get("role") == "leader":
        print(json.dumps({"serving": workload.serve(conn, listen, timeout=30)}), flush=True)
    time.sleep(0.1)
want = json.loads(open(final).read())
if one(conn, "SELECT repl_role()") == "replica":
    one(conn, "SELECT repl_wait(?, 120000)", (want["lsn"],))
st = json.loads(one(conn, "SELECT repl_status()"))
print(json.dumps({"lsn": one(conn, "SELECT repl_lsn()"), "checksum": one(conn, "SELECT repl_checksum()"), "status": st}), flush=True)
while not os.path.exists(stop):
    time.sleep(0.05)
conn.close()
print(json.dumps({"stopped": True}), flush=True)
"""

# A writer without the extension: each transfer is one /v1/exec script sent to the primary that
# etcd names (found again after every failure); a retry reuses the request id (at most once).
WRITER_FO = """
import base64, random, urllib.error, urllib.request, uuid
rng = random.Random(int(os.environ["SEED"]))
stop, n, etcd, key = os.environ["STOP"], int(os.environ["N_ACCT"]), os.environ["ETCD"], os.environ["KEY"]
def post(url, body, timeout):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)
def leader():
    try:
        kvs = post(f"{etcd}/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()}, 2).get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])).get("url") if kvs else None
    except (OSError, ValueError):
        return None
done = dup = retried = given_up = shown = 0
errors = {}
while not os.path.exists(stop):
    a, b = rng.sample(range(n), 2)
    x = rng.randint(1, 50)
    sql = (f"UPDATE acct SET bal = bal - {x}, ver = (SELECT v FROM ver) + 1 WHERE id = {a}; "
           f"UPDATE acct SET bal = bal + {x}, ver = (SELECT v FROM ver) + 1 WHERE id = {b}; "
           "UPDATE ver SET v = v + 1;")
    r = rng.random()
    if r < 0.15:  # multi-page commits
        sql += f" UPDATE junk SET b = randomblob({rng.randint(1000, 6000)}) WHERE id % 7 = {rng.randint(0, 6)};"
    elif r < 0.18:  # overflow chains, the file grows and shrinks
        sql += (f" INSERT INTO junk(b) SELECT randomblob({rng.randint(20000, 150000)}) WHERE (SELECT count(*) FROM junk) < 45;"
                " DELETE FROM junk WHERE (SELECT count(*) FROM junk) >= 45 AND id IN (SELECT id FROM junk WHERE length(b) > 10000 LIMIT 3);")
    rid = uuid.UUID(int=rng.getrandbits(128)).hex
    for attempt in range(100):
        if os.path.exists(stop) and attempt:
            given_up += 1
            break
        url = leader()
        if url is None:
            time.sleep(0.1)
            continue
        try:
            ans = post(f"{url}/v1/exec", {"sql": sql, "request_id": rid}, 15)
            done += 1
            dup += bool(ans.get("duplicate"))
            retried += attempt > 0
            break
        except urllib.error.HTTPError as e:
            errors[str(e.code)] = errors.get(str(e.code), 0) + 1
            if e.code == 422:  # an SQL error: not retried (none is expected)
                sys.stderr.write(f"event=torture_exec_error body={e.read()[:300]!r}\\n")
                break
        except (OSError, ValueError) as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        time.sleep(0.05 + rng.random() * 0.1)
    else:
        given_up += 1
    if done and done % 200 == 0 and done != shown:
        shown = done
        print(json.dumps({"progress": done}), flush=True)
    time.sleep(0.003 + rng.random() * 0.012)  # workload pacing (2 shared cores)
print(json.dumps({"txns": done, "duplicates": dup, "retried": retried, "given_up": given_up, "errors": errors}), flush=True)
"""

# The stock reader of a node: the same checks, except that a version going back is recorded
# apart (``regressions``): allowed only where the node logged a rewind (checked at the end).
READER_FO = """
import random, workload
class Check(workload.BankCheck):
    regressions = []
    def __call__(self, row):
        v = row[2]
        if workload.consistent(row, self.total, self.n_acct) and v < self.last_v:
            self.regressions.append([self.last_v, v, time.time()])
            print(json.dumps({"regression": [self.last_v, v], "time": time.time()}), flush=True)
            self.last_v = v
            return None
        return super().__call__(row)
check = Check(float(os.environ["TOTAL"]), int(os.environ["N_ACCT"]))
out = workload.read_loop(os.environ["R_DB"], os.environ["STOP"], os.environ["READ_SQL"], check,
                         rng=random.Random(int(os.environ["SEED"])), long_share=0.05, long_secs=(0.05, 1.5),
                         long_pace=0.01, pace=0.004, readonly=True, reopen_share=0.01, busy_ok=True, live=True)
out["regressions"] = Check.regressions[:20]
out["n_regressions"] = len(Check.regressions)
print(json.dumps(out), flush=True)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FailoverTorture(Torture):
    """The ``--failover`` run (module docstring). Reuses the bank, the readers' checks, the
    process bookkeeping and the summary; the topology, faults and end checks are its own."""

    def __init__(self, seed: int, secs: float, workdir: Path):
        super().__init__(seed, secs, workdir)
        self.dbs = {n: workdir / f"{n}.db" for n in NODES}
        self.ports = {n: free_port() for n in NODES}
        self.nodes: dict[str, object] = {n: None for n in NODES}
        self.stops = {n: workdir / f"STOP_{n}" for n in NODES}
        self.etcd = None
        self.etcd_url = ""
        self.writers = [None] * WRITERS
        self.epoch_owners: dict[int, set[str]] = collections.defaultdict(set)

    # ------------------------------------------------------------------ etcd

    def start_etcd(self) -> None:
        import subprocess
        import urllib.request

        exe = shutil.which("etcd")
        if exe is None:
            raise RuntimeError("etcd is missing: run `make deps` (it installs Debian's etcd-server)")
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        logf = open(self.dir / "etcd.log", "w")
        self.etcd = subprocess.Popen(
            [exe, "--name", "e0", "--data-dir", str(self.dir / "etcd"),
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"e0=http://127.0.0.1:{peer}"],
            stdout=logf, stderr=subprocess.STDOUT)
        logf.close()

        def answers() -> bool:
            try:
                req = urllib.request.Request(f"{self.etcd_url}/v3/kv/range", data=b'{"key":"AA=="}', method="POST")
                with urllib.request.urlopen(req, timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(answers, timeout=30, interval=0.1, what="etcd")
        log(event="etcd", url=self.etcd_url, pid=self.etcd.pid)

    def leader(self) -> dict | None:
        """etcd's leader value (name, url, epoch), or None while the key is vacant."""
        import base64
        import urllib.request

        body = json.dumps({"key": base64.b64encode(ETCD_KEY.encode()).decode()}).encode()
        try:
            req = urllib.request.Request(f"{self.etcd_url}/v3/kv/range", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                kvs = json.load(r).get("kvs") or []
        except OSError:
            return None
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def failover_url(self, n: str) -> str:
        return f"etcd://{self.etcd_url[7:]}/{ETCD_KEY}?listen=127.0.0.1:{self.ports[n]}&name={n}&ttl_ms={FO_TTL_MS}"

    # ------------------------------------------------------------------ processes

    def start_node(self, n: str) -> None:
        self.nodes[n] = self.spawn(NODE, f"node_{n}", DB=self.dbs[n], LISTEN=f"127.0.0.1:{self.ports[n]}",
                                   FAILOVER=self.failover_url(n), FINAL=self.final, STOP=self.stops[n],
                                   BOOT=f"http://127.0.0.1:{self.ports['p']}",
                                   REPL_LOG="info")  # the failover events are counted at the end

    def start_writer(self, i: int) -> None:
        self.writers[i] = self.spawn(WRITER_FO, f"writer{i}", SEED=self.rng.randrange(1 << 30), STOP=self.stop_w,
                                     ETCD=self.etcd_url, KEY=ETCD_KEY)

    def all_procs(self) -> list:
        return [*self.nodes.values(), *self.writers, *self.readers]

    def check_alive(self) -> None:
        for proc in self.all_procs():
            if proc is not None and proc.poll() is not None:
                err = (proc.logdir / f"{proc.name}.err").read_text()[-2000:]
                self.failures.append(f"{proc.name} exited by itself rc={proc.returncode}: {err}")
                log(event="unexpected_exit", proc=proc.name, rc=proc.returncode)
                raise RuntimeError(self.failures[-1])

    def setup(self) -> None:
        self.start_etcd()
        w = Worker(self.dbs["p"])
        try:
            w.one("SELECT repl_primary()")
            w.script(SCHEMA)
            w.one("SELECT repl_config('exec', 1)")
            w.one("SELECT repl_config('sync_replicas', 1)")
            w.one("SELECT repl_config('sync_timeout_ms', 3000)")
        finally:
            w.close()
        self.start_node("p")
        wait_for(lambda: (self.leader() or {}).get("url"), timeout=40, what="the first primary leading")
        for n in NODES[1:]:
            self.start_node(n)
        for n in NODES[1:]:
            proc = self.nodes[n]
            wait_for(lambda: proc.poll() is None and any("started" in d for d in self.out_lines(proc)), timeout=60,
                     what=f"node {n} to bootstrap (see {proc.name}.err)")
        for i in range(WRITERS):
            self.start_writer(i)
        for n in NODES:
            self.readers.append(self.spawn(READER_FO, f"reader_{n}", R_DB=self.dbs[n], STOP=self.stop_r,
                                           SEED=self.rng.randrange(1 << 30)))

    # ------------------------------------------------------------------ faults

    def kill_node(self, n: str, down: float) -> None:
        self.kill(self.nodes[n])
        # Its log as the crash left it: a deposed primary that restarts with nothing
        # unreplicated drops its old log when it rejoins, so the epochs it wrote are read now.
        self.note_epochs(n)
        time.sleep(down)
        self.start_node(n)

    def note_epochs(self, n: str) -> None:
        """Adds the epochs of the transaction records in node ``n``'s logs to ``epoch_owners``."""
        d = Path(f"{self.dbs[n]}-replica")
        for ld in ([d] if (d / "meta.json").exists() else []) + sorted(d.glob("orphaned-*")):
            for e in log_epochs(ld):
                self.epoch_owners[e].add(n)

    def one_fault(self, force: str | None = None) -> None:
        """One fault of the schedule; ``force='kill_primary'``: the run's one sure failover."""
        rng = self.rng
        kind = force or rng.choices(["kill_writer", "kill_replica", "kill_primary", "checkpoint"], weights=[3, 3, 3, 3])[0]
        lead = self.leader()
        lead_name = lead.get("name") if lead else None
        others = [n for n in NODES if n != lead_name]
        if kind == "kill_primary" and (lead is None or not lead.get("url")):
            kind = "kill_replica"  # an election runs: no primary to kill now
        # Stock checkpoints only on a replica's file, as in the run without --failover.
        replicas = [n for n in others if (Path(f"{self.dbs[n]}-replica") / "replica.json").exists()]
        if kind == "checkpoint" and not replicas:
            kind = "kill_writer"
        self.faults[kind] += 1
        if kind == "kill_writer":
            i = rng.randrange(WRITERS)
            log(event="fault", kind=kind, proc=self.writers[i].name)
            self.kill(self.writers[i])
            self.start_writer(i)
        elif kind == "kill_replica":
            n = rng.choice(others)
            log(event="fault", kind=kind, node=n, proc=self.nodes[n].name)
            self.kill_node(n, rng.uniform(0, 1.0))
        elif kind == "kill_primary":
            # Mostly down past the lease and an election (a candidate takes over, the node comes
            # back as its replica); now and then back at once (it may take its key back first).
            ttl = FO_TTL_MS / 1000
            short = rng.random() < 0.25 and not force
            down = rng.uniform(0, 1.5) if short else rng.uniform(ttl + 1.5, ttl + 4)
            log(event="fault", kind=kind, node=lead_name, epoch=lead.get("epoch"), proc=self.nodes[lead_name].name,
                down=round(down, 2))
            self.kill_node(lead_name, down)
        elif kind == "checkpoint":
            n = rng.choice(replicas)
            mode = rng.choice(["PASSIVE", "PASSIVE", "RESTART", "TRUNCATE", "FULL"])
            log(event="fault", kind="checkpoint", node=n, mode=mode, result=stock_checkpoint(self.dbs[n], mode))

    def foreign_write(self) -> None:
        lead = self.leader()
        if not lead or not lead.get("url"):
            return
        self.pdb = self.dbs[lead["name"]]
        super().foreign_write()

    def soak(self) -> None:
        start = time.monotonic()
        end = start + self.secs
        foreign_at = start + self.secs * self.rng.uniform(0.3, 0.6)
        # At least one failover per run, whatever the draws: a kill of the primary in the first
        # third, down past its lease.
        failover_at = start + self.secs * self.rng.uniform(0.1, 0.3)
        next_fault = start + self.rng.uniform(2, 4)
        while time.monotonic() < end:
            self.check_alive()
            now = time.monotonic()
            if failover_at and now >= failover_at and (self.leader() or {}).get("url"):
                self.one_fault(force="kill_primary")
                failover_at = 0
                next_fault = time.monotonic() + self.rng.uniform(1.0, 5.0)
            elif foreign_at and now >= foreign_at:
                self.foreign_write()
                self.faults["foreign_write"] += 1
                foreign_at = 0
            elif now >= next_fault:
                self.one_fault()
                # A failover takes the TTL and more: leave the cluster time to settle sometimes.
                next_fault = time.monotonic() + self.rng.uniform(1.0, 5.0)
            time.sleep(0.05)

    # ------------------------------------------------------------------ the end

    def stable_primary(self) -> tuple[dict, int]:
        """The leader once it serves and its durable LSN stays put for a second."""
        import urllib.request

        def info() -> tuple[dict, int] | None:
            lead = self.leader()
            if not lead or not lead.get("url"):
                return None
            try:
                with urllib.request.urlopen(f"{lead['url']}/v1/info", timeout=2) as r:
                    return lead, json.load(r)["durable_lsn"]
            except (OSError, ValueError, KeyError):
                return None

        last = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = info()
            if now is not None and last is not None and now[0].get("name") == last[0].get("name") and now[1] == last[1]:
                return now
            last = now
            time.sleep(1.0)
        raise RuntimeError(f"no stable primary at the end (last: {last})")

    def finish(self) -> dict:
        log(event="phase", name="finish")
        self.check_alive()
        self.stop_w.touch()
        txns = 0
        writer_stats = []
        for proc in self.writers:
            proc.wait(90)
            lines = self.out_lines(proc)
            if proc.returncode != 0 or not lines or "txns" not in lines[-1]:
                self.failures.append(f"{proc.name} did not stop cleanly rc={proc.returncode}")
            else:
                txns += lines[-1]["txns"]
                writer_stats.append(lines[-1])
        lead, durable_lsn = self.stable_primary()
        final_node = lead["name"]
        log(event="primary_final", node=final_node, epoch=lead.get("epoch"), lsn=durable_lsn)
        tmp = self.final.with_suffix(".tmp")
        tmp.write_text(json.dumps({"lsn": durable_lsn, "node": final_node}))
        tmp.rename(self.final)
        finals = {}
        for n in NODES:
            proc = self.nodes[n]
            try:
                wait_for(lambda: proc.poll() is None and any("lsn" in d for d in self.out_lines(proc)), timeout=150,
                         what=f"node {n}'s final line")
                finals[n] = [d for d in self.out_lines(proc) if "lsn" in d][-1]
            except AssertionError as e:
                err = (proc.logdir / f"{proc.name}.err").read_text()[-2000:]
                self.failures.append(f"{proc.name}: {e}: {err}")
                finals[n] = None
        self.stop_r.touch()
        reads = []
        for proc in self.readers:
            try:
                proc.wait(60)
            except Exception:
                self.kill(proc)
            lines = self.out_lines(proc)
            if proc.returncode != 0 or not lines or "reads" not in lines[-1]:
                self.failures.append(f"{proc.name} failed rc={proc.returncode}")
                reads.append({"reads": 0, "n_violations": 0, "n_errors": 1, "busy": 0, "long_txns": 0, "n_regressions": 0})
            else:
                reads.append(lines[-1])
        # Candidates first, the primary last: its lease must not end while they still run (they
        # would elect a successor after the final state was taken).
        for n in [*[m for m in NODES if m != final_node], final_node]:
            self.stops[n].touch()
            self.nodes[n].wait(30)
        # Events of every incarnation, per node.
        events: collections.Counter[str] = collections.Counter()
        node_events: dict[str, collections.Counter[str]] = {n: collections.Counter() for n in NODES}
        for err in self.dir.glob("*.err"):
            for ln in err.read_text(errors="replace").splitlines():
                if ln.startswith("event="):
                    ev = ln.split()[0][6:]
                    events[ev] += 1
                    for n in NODES:
                        if err.name.startswith(f"node_{n}."):
                            node_events[n][ev] += 1
        # Every node against the final primary: checksum (a fresh process), content, integrity.
        want = (finals[final_node]["lsn"], finals[final_node]["checksum"]) if finals.get(final_node) else None
        ptables = stock_tables(self.dbs[final_node])
        divergences = []
        for n in NODES:
            with Worker(self.dbs[n]) as fresh:
                got = lsn_checksum(fresh)
            integ = stock_one(self.dbs[n], "PRAGMA integrity_check;")
            same = stock_tables(self.dbs[n]) == ptables
            fin = finals[n]
            ok = (want is not None and got == want and integ == "ok" and same and fin is not None
                  and (fin["lsn"], fin["checksum"]) == want)
            log(event="compare", node=n, lsn=got[0], checksum=got[1], integrity=integ, content_equal=same, ok=ok)
            if not ok:
                divergences.append(n)
        # A reader's version went back only on a node that rewound (an orphaned tail set aside,
        # or a replica ahead of a new primary): the documented cost of an unreplicated tail.
        for n, r in zip(NODES, reads):
            allowed = node_events[n]["orphaned_tail"] + node_events[n]["replica_rewound"]
            if r.get("n_regressions", 0) > allowed:
                self.failures.append(f"reader of {n}: v went back {r['n_regressions']} times, {allowed} rewinds logged: "
                                     f"{r.get('regressions')}")
        # No two nodes wrote transaction records of one epoch (every log, and the logs kept aside).
        for n in NODES:
            self.note_epochs(n)
        owners = self.epoch_owners
        shared = {e: sorted(ns) for e, ns in owners.items() if len(ns) > 1}
        if shared:
            self.failures.append(f"epochs written by more than one node: {shared}")
        bal = stock_one(self.dbs[final_node], "SELECT total(bal) FROM acct;")
        if float(bal) != TOTAL:
            self.failures.append(f"final primary total {bal} != {TOTAL}")
        v = int(stock_one(self.dbs[final_node], "SELECT v FROM ver;"))
        # Synchronous replication (sync_replicas = 1): a transfer the primary answered 200 to was
        # on a candidate before the answer, so a failover must not lose it (unless its wait
        # timed out: then COMMIT returned unacknowledged, which the writers cannot tell).
        if events["sync_timeout"] == 0 and v < txns + self.faults["foreign_write"]:
            self.failures.append(f"acknowledged transfers lost: version {v} < {txns} answered + "
                                 f"{self.faults['foreign_write']} foreign")
        if not self.faults["kill_primary"] or not events["failover_won"]:
            self.failures.append(f"no failover happened (kill_primary={self.faults['kill_primary']}, "
                                 f"failover_won={events['failover_won']}): run longer")
        return {
            "seed": self.seed,
            "secs": self.secs,
            "mode": "failover",
            "transactions": v,
            "txns_of_clean_writers": txns,
            "exec_retried": sum(w.get("retried", 0) for w in writer_stats),
            "exec_duplicates": sum(w.get("duplicates", 0) for w in writer_stats),
            "exec_given_up": sum(w.get("given_up", 0) for w in writer_stats),
            "exec_errors": dict(sum((collections.Counter(w.get("errors", {})) for w in writer_stats), collections.Counter())),
            "final_primary": final_node,
            "final_epoch": lead.get("epoch"),
            "final_lsn": durable_lsn,
            "faults": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()),
            "failovers": events["failover_won"],
            "promotions": events["failover_promoted"],
            "rejoins": events["failover_rejoined"],
            "orphaned_tails": events["orphaned_tail"],
            "rewinds": events["replica_rewound"],
            "resnapshots": events["resnapshot"],
            "sync_timeouts": events["sync_timeout"],
            "epochs_by_node": {e: sorted(ns) for e, ns in sorted(owners.items())},
            "follow_errors": events["follow_error"],
            "gaps": events["gap"],
            "invariant_checks": sum(r["reads"] for r in reads),
            "long_read_txns": sum(r["long_txns"] for r in reads),
            "reader_busy_retries": sum(r["busy"] for r in reads),
            "reader_v_regressions": sum(r.get("n_regressions", 0) for r in reads),
            "invariant_violations": sum(r["n_violations"] for r in reads),
            "reader_errors": sum(r["n_errors"] for r in reads),
            "violation_samples": [x for r in reads for x in r.get("violations", [])][:5],
            "error_samples": [x for r in reads for x in r.get("errors", [])][:5],
            "divergences": len(divergences),
            "failures": self.failures,
        }

    def cleanup(self) -> None:
        for p in (self.stop_w, self.stop_r, *self.stops.values()):
            p.touch()
        for proc in self.all_procs():
            if proc is not None and proc.poll() is None:
                try:
                    proc.wait(5)
                except Exception:
                    proc.kill()
                    proc.wait()
        if self.etcd is not None:
            self.etcd.kill()
            self.etcd.wait()


def log_epochs(log_dir: Path) -> set[int]:
    """Epochs of the transaction records in one log directory (``sqlite-replica inspect``)."""
    import subprocess

    cli = REPO / "build" / "sqlite-replica"
    proc = subprocess.run([str(cli), "inspect", str(log_dir)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"inspect {log_dir}: {proc.stderr[-500:]}")
    out = set()
    for ln in proc.stdout.splitlines():
        f = ln.split()
        if len(f) == 8 and f[2] == "txn":
            out.add(int(f[7]))
    return out


def print_summary(s: dict) -> None:
    print("\n==== torture summary ====")
    for k, v in s.items():
        if k in ("violation_samples", "error_samples", "failures") and not v:
            continue
        print(f"{k:>22}: {v}")
    print(f"{'result':>22}: {'PASS' if passed(s) else 'FAIL'}")


def passed(s: dict) -> bool:
    return (s["invariant_violations"] == 0 and s["reader_errors"] == 0 and s["divergences"] == 0
            and not s["failures"] and s["transactions"] > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--secs", type=float, default=150)
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory even on success")
    ap.add_argument("--failover", action="store_true",
                    help="primary kills and automatic failover on an etcd started here (module docstring)")
    args = ap.parse_args()
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix=f"torture-{args.seed}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(event="begin", seed=args.seed, secs=args.secs, dir=workdir, failover=args.failover)
    t = (FailoverTorture if args.failover else Torture)(args.seed, args.secs, workdir)
    summary = None
    try:
        t.setup()
        t.soak()
        summary = t.finish()
    except Exception as e:  # noqa: BLE001 - report, then fail
        log(event="error", error=f"{type(e).__name__}: {e}")
        summary = {"seed": args.seed, "failures": [*t.failures, f"{type(e).__name__}: {e}"],
                   "invariant_violations": -1, "reader_errors": -1, "divergences": -1, "transactions": 0}
    finally:
        t.cleanup()
    print_summary(summary)
    print("SUMMARY " + json.dumps(summary), flush=True)
    ok = passed(summary)
    log(event="end", seed=args.seed, ok=ok, elapsed=round(time.monotonic() - T0, 1), dir=workdir)
    if ok and not args.keep and not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

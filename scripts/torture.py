#!/usr/bin/env python3
"""Seeded, reproducible torture soak of sqlite-replica (issue 6 item 1): `make torture`.

Processes (each its own OS process, so kill -9 is a real crash):

* a serving primary process: ``repl_primary('127.0.0.1:<port>')`` on ``p.db``, restartable on
  the same port;
* WRITERS writer processes (extension loaded) doing bank transfers on ``p.db``: every
  transaction moves money between two accounts (the total never changes), bumps ``ver.v`` by
  one and stamps the touched accounts with it (so ``max(acct.ver) == ver.v`` in every committed
  state); sometimes multi-page / overflow blob churn in ``junk``;
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

Usage: scripts/torture.py --seed N [--secs S] [--dir D] [--keep]
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
        self.writers[i] = self.spawn(WRITER, f"writer{i}", SEED=self.rng.randrange(1 << 30), STOP=self.stop_w)

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
        c = apsw.Connection(str(self.rdbs[i]), vfs="unix")
        c.setbusytimeout(200)
        try:
            res = c.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except apsw.BusyError:
            res = "busy"
        finally:
            c.close()
        log(event="fault", kind="checkpoint", replica=i, mode=mode, result=res)

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
    args = ap.parse_args()
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix=f"torture-{args.seed}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(event="begin", seed=args.seed, secs=args.secs, dir=workdir)
    t = Torture(args.seed, args.secs, workdir)
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

"""Concurrency stress on a live replica (WAL.md §G16; issue 3 "differential replication test";
issue 4: the same over HTTP with three replicas), bounded to well under a minute. Every party is
its own process:

* a primary process doing bank transfers: each transaction moves money between two of N
  accounts (the sum of balances never changes), increments the single version row and stamps
  the touched accounts with the new version (so in every committed state
  ``max(acct.ver) == ver.v``); sometimes it also inserts or deletes spilling blobs (multi-page,
  overflow, shrinking commits), commits a savepoint rolled back under a 5-page cache (frames
  spilled before COMMIT, some undone), or VACUUMs. It samples ``(repl_lsn(), repl_checksum())`` as it goes;
* ``dir``: an applier process calling ``repl_sync()`` in a loop, sampling the same pair after
  each sync; ``http``: a process serving the log (``repl_primary('127.0.0.1:0')``) and three
  replicas, each bootstrapped over HTTP by its applier process and following it
  (``repl_follow``), sampling consistent ``(lsn, checksum)`` pairs from ``repl_status()``;
* three reader processes on the replica that never load the extension: two apsw (3.54) loops
  of short reads and long read transactions (the snapshot must not change inside them), and
  the stock ``/usr/bin/sqlite3`` 3.40.1 shell driven from this process (a script of short reads
  and ``BEGIN`` blocks, one fresh shell after the other);
* a stock checkpointer (no extension): PASSIVE every 30 ms, now and then RESTART or TRUNCATE.

Checks: zero invariant violations (sum, max(ver) == v, v never decreasing within one reader,
identical reads inside a read transaction), zero SQLITE_PROTOCOL / SQLITE_CORRUPT (no SQLite
error at all in the readers), the replica's checksum equals the primary's at every LSN both
sampled, and at the end: integrity_check ok, content equal, a fresh process's
``repl_checksum()`` (recomputed from the live files) equal to the primary's.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import workload
from helpers import (
    SQLITE3_CLI, Worker, bg_result, lsn_checksum, spawn_bg, start_primary, start_replica, start_serving_primary,
    stock_one, stock_tables, sync_to, wait_for, worker_tables,
)

N_ACCT = 20
START_BAL = 1000
TOTAL = N_ACCT * START_BAL
TXNS = int(os.environ.get("REPL_STRESS_TXNS", "20000"))  # cap; the run is bounded by WORK_S
WORK_S = float(os.environ.get("REPL_STRESS_SECS", "12"))
SEED = int(os.environ.get("REPL_STRESS_SEED", "1616"))
BUDGET_S = 40  # the whole workload phase; everything is stopped at this deadline

READ_SQL = workload.READ_SQL + ", (SELECT count(*) FROM junk)"

PRIMARY = """
import random
from workload import transfer
conn = connect(os.environ["P_DB"])
conn.setbusytimeout(10000)
rng = random.Random(int(os.environ["SEED"]))
n, txns, deadline = int(os.environ["N_ACCT"]), int(os.environ["TXNS"]), time.monotonic() + float(os.environ["SECS"])
samples, done, big, replica_frames = [], 0, False, 0
while done < txns and time.monotonic() < deadline:
    a, b, x, v = transfer(conn, rng, n, amount=(1, 100))
    r = rng.random()
    if done == 500:  # one commit of > 4062 pages: the replica's wal-index crosses a hash block
        conn.execute("INSERT INTO junk(b) VALUES (randomblob(17500000))")
        big = True
    elif done == 1500:
        conn.execute("DELETE FROM junk WHERE length(b) > 1000000")
    elif r < 0.06:
        conn.execute("INSERT INTO junk(b) VALUES (randomblob(?))", (rng.randint(2000, 60000),))
    elif r < 0.08:
        conn.execute("DELETE FROM junk WHERE rowid % 2 = ?", (rng.randint(0, 1),))
    elif r < 0.11:
        # A savepoint rolled back (its pages were written, then undone) inside a commit that
        # spills: the tiny cache makes the pager write frames before COMMIT.
        conn.execute("PRAGMA cache_size=5")
        conn.execute("SAVEPOINT s")
        conn.execute("INSERT INTO junk(b) VALUES (randomblob(?))", (rng.randint(20000, 90000),))
        conn.execute("UPDATE acct SET bal = bal + 1000000 WHERE id = ?", (a,))  # must vanish
        conn.execute("ROLLBACK TO s")
        conn.execute("RELEASE s")
        conn.execute("INSERT INTO junk(b) VALUES (randomblob(?))", (rng.randint(20000, 90000),))
        conn.execute("PRAGMA cache_size=-2000")
    conn.execute("COMMIT")
    if done % 997 == 996:
        conn.execute("VACUUM")  # rewrites (and shrinks) the whole database: one big commit
    done += 1
    if big:
        # Wait (polling, with a deadline) until the replica published it, so the test can
        # tell the hash-block crossing really happened. This process has no connection on
        # the replica: reading its -shm drops no lock.
        big, until = False, time.monotonic() + 20
        while time.monotonic() < until and replica_frames < 4100:
            with open(os.environ["R_DB"] + "-shm", "rb") as f:
                h = f.read(96)
            if h[:48] == h[48:96]:
                replica_frames = max(replica_frames, int.from_bytes(h[16:20], sys.byteorder))
            time.sleep(0.001)
    if rng.random() < 0.3:
        time.sleep(rng.random() * 0.003)  # workload shape: some syncs see one txn, some many
    if done % 7 == 0:
        samples.append(list(conn.execute("SELECT repl_lsn(), repl_checksum()").fetchone()))
samples.append(list(conn.execute("SELECT repl_lsn(), repl_checksum()").fetchone()))
conn.close()  # a clean close makes the last commits durable for the replica at once
print(json.dumps({"txns": done, "samples": samples, "replica_frames": replica_frames}))
"""

APPLIER = """
conn = connect(os.environ["R_DB"])
conn.setbusytimeout(5000)
stop, source = os.environ["STOP"], os.environ.get("SOURCE")
samples, errors, syncs, max_frames = [], [], 0, 0
if source:  # a new replica: bootstrap from the source (over HTTP in the http variant)
    one(conn, "SELECT repl_sync(?)", (source,))
follow = os.environ.get("MODE") == "follow"
if follow:
    one(conn, "SELECT repl_follow(NULL, 100)")
def sample():
    global max_frames
    st = json.loads(one(conn, "SELECT repl_status()"))
    # A long apply in progress answers with a short status (no checksum): skip that sample.
    if st.get("checksum") is not None:
        samples.append([st["lsn"], st["checksum"]])  # one consistent (lsn, checksum) pair
    max_frames = max(max_frames, st["wal"]["mx_frame"] if st.get("wal") else 0)
while True:
    stopping = os.path.exists(stop)
    try:
        if follow and not stopping:
            sample()
            time.sleep(0.005)  # sampling pace; the follower thread applies meanwhile
        else:
            if follow:
                one(conn, "SELECT repl_follow(NULL)")
            lsn = one(conn, "SELECT repl_sync()")
            samples.append([lsn, one(conn, "SELECT repl_checksum()")])
            syncs += 1
            sample()
    except apsw.Error as e:
        errors.append(f"{type(e).__name__}: {e}")
    if stopping:
        break
st = json.loads(one(conn, "SELECT repl_status()"))
print(json.dumps({"syncs": syncs, "samples": samples, "errors": errors, "max_frames": max_frames,
                  "status": st}))
"""

# A stock reader (no extension in this process): short reads and read transactions whose
# snapshot must not move; no SQLite error of any kind is acceptable (SQLITE_BUSY included).
READER = """
import random, workload
check = workload.BankCheck(float(os.environ["TOTAL"]), int(os.environ["N_ACCT"]))
print(json.dumps(workload.read_loop(os.environ["R_DB"], os.environ["STOP"], os.environ["READ_SQL"], check,
                                    rng=random.Random(int(os.environ["SEED"])), long_share=0.15, long_secs=(0.05, 0.6))))
"""

CHECKPOINTER = """
import random
conn = apsw.Connection(os.environ["R_DB"])  # stock, no extension
conn.setbusytimeout(50)
rng = random.Random(int(os.environ["SEED"]))
stop = os.environ["STOP"]
done, busy, errors = {}, 0, []
while not os.path.exists(stop):
    mode = "PASSIVE" if rng.random() < 0.9 else rng.choice(["RESTART", "TRUNCATE", "FULL"])
    try:
        b, log, ck = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        done[mode] = done.get(mode, 0) + 1
        busy += b
    except apsw.BusyError:
        busy += 1
    except apsw.Error as e:
        errors.append(f"{type(e).__name__}: {e}")
    time.sleep(0.03)  # pacing (every 30 ms, as in WAL.md §G16), not synchronisation
print(json.dumps({"done": done, "busy": busy, "errors": errors[:20]}))
"""


def cli_script(blocks: int) -> str:
    """Short reads and BEGIN blocks for the stock shell; ``.print`` lines delimit the blocks."""
    out = []
    for i in range(blocks):
        if i % 4 == 0:
            out.append(".print BEGIN")
            out.append("BEGIN;")
            out.extend([READ_SQL + ";"] * 30)
            out.append("COMMIT;")
            out.append(".print END")
        else:
            out.extend([READ_SQL + ";"] * 5)
    return "\n".join(out) + "\n"


def check_cli_output(text: str, check: workload.BankCheck, violations: list) -> int:
    """Parse one shell run; returns the number of reads."""
    reads = 0
    block: list[str] | None = None
    for line in text.splitlines():
        if line == "BEGIN":
            block = []
            continue
        if line == "END":
            if block and any(b != block[0] for b in block):
                violations.append(["sqlite3: snapshot moved inside BEGIN", sorted(set(block))[:3]])
            block = None
            continue
        s, c, v, mv, _ = line.split("|")
        reads += 1
        bad = check((float(s), int(c), int(v), int(mv)))
        if bad:
            violations.append(["sqlite3: state", line, bad[2]])
        if block is not None:
            block.append(line)
    return reads


def has_table(db, name: str) -> bool:
    """A stock reader sees table ``name`` in ``db``."""
    try:
        return stock_one(db, f"SELECT count(*) FROM sqlite_schema WHERE name = '{name}';") == "1"
    except Exception:
        return False


@pytest.mark.parametrize("transport", ["dir", "http"])
def test_bank_invariant_under_concurrent_apply_reads_and_checkpoints(tmp, transport):
    """dir: one replica syncing in a loop from the log directory. http: three replicas, each
    bootstrapped over HTTP from a serving primary process and following it (repl_follow),
    with readers on all of them."""
    pdb, stop = tmp / "p.db", tmp / "STOP"
    with start_primary(pdb) as p:
        p.script(workload.schema(N_ACCT, START_BAL))
    server = None
    if transport == "http":
        # A long-lived process that serves the log over HTTP (the writer below is another
        # process of the same primary: its commits are served too).
        server, url = start_serving_primary(pdb)
        rdbs = [tmp / f"r{i}.db" for i in range(3)]
        app_env = [{"SOURCE": url, "MODE": "follow"} for _ in rdbs]
        reader_dbs = [rdbs[0], rdbs[0], rdbs[1], rdbs[2]]
    else:
        rdbs = [tmp / "r.db"]
        start_replica(rdbs[0], pdb).close()  # bootstrapped; the applier process resumes it
        app_env = [{}]
        reader_dbs = [rdbs[0], rdbs[0]]
    rdb = rdbs[0]

    env = {
        "P_DB": str(pdb),
        "STOP": str(stop),
        "N_ACCT": str(N_ACCT),
        "TOTAL": str(TOTAL),
        "TXNS": str(TXNS),
        "SECS": str(WORK_S),
        "READ_SQL": READ_SQL,
        "R_DB": str(rdb),
    }
    appliers = [spawn_bg(APPLIER, tmp, f"applier{i}", {**env, "R_DB": str(d), **app_env[i]}) for i, d in enumerate(rdbs)]
    if transport == "http":
        # Readers start once the replicas exist (bootstrapped over HTTP by their appliers).
        wait_for(lambda: all((tmp / f"applier{i}.err").exists() and d.exists() and os.path.getsize(d) > 0 for i, d in enumerate(rdbs)),
                 timeout=30, what="the replicas to bootstrap over HTTP")
        # Bootstrapped from the first snapshot, the schema arrives with the next batch: readers
        # start once every replica has it.
        wait_for(lambda: all(has_table(d, "acct") for d in rdbs), timeout=30,
                 what="the schema to reach every replica")
    readers = [spawn_bg(READER, tmp, f"reader{i}", {**env, "R_DB": str(d), "SEED": str(SEED + i)}) for i, d in enumerate(reader_dbs)]
    ckpt = spawn_bg(CHECKPOINTER, tmp, "checkpointer", {**env, "SEED": str(SEED + 7)})
    primary = spawn_bg(PRIMARY, tmp, "primary", {**env, "SEED": str(SEED)})
    procs = [*appliers, *readers, ckpt, primary]
    deadline = time.monotonic() + BUDGET_S
    cli_violations: list = []
    cli_reads = cli_runs = 0
    cli_check = workload.BankCheck(TOTAL, N_ACCT)
    try:
        # Another reader: fresh stock sqlite3 shells, one after the other, while the
        # primary works.
        while primary.poll() is None and time.monotonic() < deadline:
            proc = subprocess.run(
                [SQLITE3_CLI, "-batch", "-cmd", ".timeout 5000", str(rdb)],
                input=cli_script(16),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert proc.returncode == 0 and not proc.stderr, f"stock sqlite3 reader failed: {proc.stderr}"
            cli_reads += check_cli_output(proc.stdout, cli_check, cli_violations)
            cli_runs += 1
        prim = bg_result(primary, timeout=max(1, deadline - time.monotonic()))
    finally:
        stop.touch()
        for proc in procs:
            if proc.poll() is None and time.monotonic() > deadline + 20:
                proc.kill()
    apps = [bg_result(a, timeout=30) for a in appliers]
    rds = [bg_result(r, timeout=30) for r in readers]
    ck = bg_result(ckpt, timeout=30)

    summary = {"primary_txns": prim["txns"], "samples": [len(a["samples"]) for a in apps], "max_frames": prim["replica_frames"],
               "cli": (cli_runs, cli_reads), "readers": [(r["reads"], r["long_txns"]) for r in rds], "checkpointer": ck}
    assert prim["txns"] >= 200, f"the primary did too little to mean anything: {summary}"
    # Readers: no violation, no SQLite error of any kind (PROTOCOL, CORRUPT, BUSY...).
    for i, r in enumerate(rds):
        assert r["n_violations"] == 0, f"reader{i} saw inconsistent states: {r['violations']}"
        assert not r["errors"], f"reader{i} got SQLite errors: {r['errors']}"
        assert r["reads"] > 50 and r["long_txns"] > 0, f"reader{i} hardly read: {r}"
    assert not cli_violations, f"the stock sqlite3 reader saw inconsistent states: {cli_violations[:5]}"
    assert cli_runs >= 1 and cli_reads > 0
    assert not ck["errors"], f"the stock checkpointer got errors: {ck['errors']}"
    assert summary["max_frames"] > 4062, f"the replica's WAL never crossed a wal-index hash block: {summary}"
    final_lsn, final_ck = prim["samples"][-1]
    primary_at = {lsn: ck_ for lsn, ck_ in prim["samples"]}
    for i, app in enumerate(apps):
        assert not app["errors"], f"applier{i} failed during the run: {app['errors'][:5]} ({summary})"
        assert len(app["samples"]) > 10, summary
        if transport == "http":
            assert app["status"]["follow"] is None and app["status"]["source"] == url, app["status"]
        # The replica's checksum equals the primary's at every LSN both sampled.
        common = [(lsn, c) for lsn, c in app["samples"] if lsn in primary_at]
        assert len(common) >= 5, f"applier{i}: too few common sampled LSNs: {len(common)} ({summary})"
        bad = [(lsn, c, primary_at[lsn]) for lsn, c in common if c != primary_at[lsn]]
        assert not bad, f"applier{i}: replica checksum != primary checksum at LSNs {bad[:5]}"
        # The last sync ran after the primary process had closed its connection (which makes
        # every captured commit durable for replicas): it reached the final state.
        assert app["samples"][-1] == [final_lsn, final_ck], f"applier{i}'s last sync: {app['samples'][-1]} vs {final_lsn}"
        st = app["status"]
        assert st["resnapshots"] == 0 and st["foreign_writes"] == 0, f"stock readers/checkpoints taken for foreign writes: {st}"

    # Final state, checked by fresh processes (the HTTP server still up for their syncs).
    try:
        with start_primary(pdb) as p2:
            assert lsn_checksum(p2) == (final_lsn, final_ck)
            want = worker_tables(p2)
        for d in rdbs:
            assert stock_one(d, "PRAGMA integrity_check;") == "ok"
            with Worker(d) as r:
                assert sync_to(r, final_lsn) == final_lsn
            assert stock_tables(d) == want
            with Worker(d) as fresh:  # repl_checksum() recomputed from the live files
                assert lsn_checksum(fresh) == (final_lsn, final_ck)
    finally:
        if server is not None:
            server.close()

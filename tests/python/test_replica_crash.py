"""``kill -9`` of the syncing replica process at random points (issue 3 acceptance "crash test",
WAL.md §E.4, §E.8, §G15): a primary process keeps committing bank transfers and multi-page
updates; an applier process loops ``repl_sync()`` and is SIGKILLed after a random (seeded)
delay, at least 30 times — mid-batch, between frames and publish, between the header copies,
before or after the position is recorded, wherever the delay lands. After every kill a new
applier process resumes.

Checks after each kill, by stock readers without the extension: the bank invariant holds (a
killed applier never exposes a partial batch), the version never goes back, and the position a
killed applier had reported is not lost (a fresh process's ``repl_lsn()`` is at least that).
At the end: a clean ``repl_sync()`` reaches the primary's LSN with an equal ``repl_checksum()``
(recomputed from the files by a fresh process), equal content, integrity_check ok.

``test_kill_at_exact_apply_points``: an LD_PRELOAD shim kills the applier at its k-th
``pwrite`` to the replica's ``-wal`` (before it, or after half of it: frames not written / a torn
batch, nothing published) or to ``<db>-replica/applied`` (the intent write before a batch, or
the position write right after a batch was published).

``test_kill_inside_the_publish_or_while_holding_write`` (§G15 (c), (d)): the wal-index publish is a
memory write a shim cannot intercept, so the extension has a fault point there
(``REPL_FAULT_KILL_AT=between-header-copies:<n>``: SIGKILL with copy 2 written, copy 1 not);
and the shim kills an applier holding WRITE before its first frame. A stock reader loops
throughout and must see no error and no uncommitted state.

Knobs: REPL_REPLICA_KILLS (default 32), REPL_REPLICA_CRASH_SEED (default 9090).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

import workload
from helpers import (
    Worker, bg_result, lsn_checksum, spawn_bg, start_primary, start_replica, start_serving_primary, stock_one,
    stock_tables, sync_to, wait_for, worker_tables,
)
from killshim import KILL_MARKER

KILLS = int(os.environ.get("REPL_REPLICA_KILLS", "32"))
SEED = int(os.environ.get("REPL_REPLICA_CRASH_SEED", "9090"))
N_ACCT = 10
TOTAL = N_ACCT * 100

PRIMARY = """
import random
from workload import transfer
conn = connect(os.environ["P_DB"])
conn.setbusytimeout(10000)
rng = random.Random(int(os.environ["SEED"]))
stop, n = os.environ["STOP"], int(os.environ["N_ACCT"])
done = 0
while not os.path.exists(stop):
    transfer(conn, rng, n)  # moves 1
    if rng.random() < 0.3:  # a multi-page commit: the applier needs a while to write it
        conn.execute("UPDATE junk SET b = randomblob(length(b)) WHERE id % 4 = ?", (rng.randint(0, 3),))
    conn.execute("COMMIT")
    done += 1
    if rng.random() < 0.5:
        time.sleep(rng.random() * 0.004)  # workload shape, not synchronisation
print(json.dumps({"txns": done}))
"""

APPLIER = """
conn = connect(os.environ["R_DB"])
conn.setbusytimeout(5000)
print("open", one(conn, "SELECT repl_lsn()"), flush=True)
while True:
    try:
        print("synced", one(conn, "SELECT repl_sync()"), flush=True)
    except apsw.Error as e:
        print("error", json.dumps(f"{type(e).__name__}: {e}"), flush=True)
"""

def bank_schema(junk_rows: int, blob_size: str) -> list[str]:
    """The primary's starting state: N_ACCT accounts of 100, version 0, and ``junk_rows``
    overflow-page blobs of ``blob_size`` bytes (an SQL expression of the row number ``n``)."""
    return workload.schema(N_ACCT, 100, junk_rows, blob_size)


def assert_committed_state(rdb, last_v: int, after: str) -> int:
    """What a fresh stock reader of the replica sees after a kill is a committed state, never
    older than ``last_v``; returns its version."""
    out = stock_one(rdb, workload.READ_SQL + ";").split("|")
    row = float(out[0]), int(out[1]), int(out[2]), int(out[3])
    assert workload.consistent(row, TOTAL, N_ACCT), f"after {after}: inconsistent state {row}"
    assert row[2] >= last_v, f"after {after}: the replica went back from version {last_v} to {row[2]}"
    return row[2]


def assert_killed(tmp, app, name: str, point: str, marker: str) -> None:
    """The applier ``name`` died by SIGKILL at ``point`` (``marker`` in its stderr)."""
    try:
        app.wait(30)
    except subprocess.TimeoutExpired:
        app.kill()
        app.wait()
        raise AssertionError(f"{name} never reached {point}")
    err = (tmp / f"{name}.err").read_text()
    assert app.returncode == -signal.SIGKILL and marker in err, (app.returncode, err[-2000:])


@pytest.mark.parametrize("transport", ["dir", "http"])
def test_kill_9_of_the_applier_at_random_points(tmp, transport):
    pdb, rdb, stop = tmp / "p.db", tmp / "r.db", tmp / "STOP"
    rng = random.Random(SEED)
    with start_primary(pdb) as p:
        p.script(bank_schema(junk_rows=120, blob_size="3000 + n * 20"))
    server = None
    source = str(pdb)
    if transport == "http":  # the appliers resume with the remembered http:// source
        server, source = start_serving_primary(pdb)
    try:
        _kill_applier_at_random_points(tmp, pdb, rdb, stop, rng, source)
    finally:
        if server is not None:
            server.close()


def _kill_applier_at_random_points(tmp, pdb, rdb, stop, rng, source):
    start_replica(rdb, source).close()
    env = {"P_DB": str(pdb), "R_DB": str(rdb), "STOP": str(stop), "N_ACCT": str(N_ACCT), "SEED": str(SEED)}
    primary = spawn_bg(PRIMARY, tmp, "primary", env)
    kills = 0
    last_v = -1
    reported = 0  # highest LSN a killed applier printed after repl_sync() returned
    errors: list[str] = []
    try:
        while kills < KILLS:
            name = f"applier{kills}"
            app = spawn_bg(APPLIER, tmp, name, env)
            out = tmp / f"{name}.out"
            opened = wait_for(
                lambda: (t := out.read_text()).startswith("open") and t, timeout=20, what=f"{name} to open"
            )
            lsn_at_open = int(opened.split()[1])
            assert lsn_at_open >= reported, f"{name} resumed at LSN {lsn_at_open}, a killed applier had reported {reported}"
            # Two in three appliers first complete a sync (so a killed one has reported a
            # position); then a random delay decides where the kill lands.
            if kills % 3:
                wait_for(lambda: "synced" in out.read_text(), timeout=20, what=f"{name}'s first sync")
            time.sleep(rng.uniform(0.0, 0.12))  # the kill point (random), not synchronisation
            os.kill(app.pid, signal.SIGKILL)
            app.wait(10)
            kills += 1
            lines = out.read_text().splitlines()
            errors += [ln for ln in lines if ln.startswith("error")]
            synced = [int(ln.split()[1]) for ln in lines if ln.startswith("synced") and len(ln.split()) == 2]
            if synced:
                reported = max(reported, max(synced))
            # What stock readers see after the crash: a committed state, never older.
            last_v = assert_committed_state(rdb, last_v, f"kill {kills}")
            if kills % 8 == 0:
                assert stock_one(rdb, "PRAGMA integrity_check;") == "ok", f"kill {kills}"
        assert primary.poll() is None, "the primary stopped early"
    finally:
        stop.touch()
    prim = bg_result(primary, timeout=30)
    assert not errors, f"repl_sync() failed in killed appliers: {errors[:5]}"
    assert kills >= 30 and prim["txns"] > 100, (kills, prim)
    assert reported > 0, "no applier ever completed a sync before being killed"

    with start_primary(pdb) as p:
        want = lsn_checksum(p)
        tables = worker_tables(p)
    with Worker(rdb) as r:
        assert r.one("SELECT repl_lsn()") >= reported
        assert sync_to(r, want[0]) == want[0]
    with Worker(rdb) as fresh:  # checksum recomputed from the files by a new process
        assert lsn_checksum(fresh) == want
    assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
    assert stock_tables(rdb) == tables
    resnaps = [n for n in os.listdir(tmp) if n.endswith(".err") and "event=resnapshot" in (tmp / n).read_text()]
    assert not resnaps, f"a crash was answered with a re-snapshot instead of the position logic: {resnaps}"


def assert_resumed_to_the_primary(tmp, pdb, rdb) -> None:
    """After the kills: a clean sync reaches the primary's LSN, a fresh process recomputes the
    same checksum from the files, the content is equal, and no applier's log shows a
    re-snapshot (crashes must be answered by the position logic)."""
    with start_primary(pdb) as p:
        want = lsn_checksum(p)
        tables = worker_tables(p)
    with Worker(rdb) as r:
        assert sync_to(r, want[0]) == want[0]
    with Worker(rdb) as fresh:
        assert lsn_checksum(fresh) == want
    assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
    assert stock_tables(rdb) == tables
    resnaps = [n for n in os.listdir(tmp) if n.endswith(".err") and "event=resnapshot" in (tmp / n).read_text()]
    assert not resnaps, f"a crash was answered with a re-snapshot instead of the position logic: {resnaps}"


# ---------------------------------------------------------------------- exact kill points

KILL_POINTS = [
    # (mode, suffix): killed at the k-th write to it, k = 0, 1, 2, 3, 0 over the runs (at
    # "applied" the even ones are intents, the odd ones positions after a publish)
    ("before", "r.db-wal"),  # frames (or a new WAL header) not written, nothing published
    ("half", "r.db-wal"),  # a torn batch in the WAL, nothing published
    ("before", "r.db-replica/applied"),  # the intent write, or the position after a publish
]


def test_kill_at_exact_apply_points(tmp, kill_shim):
    pdb, rdb, stop = tmp / "p.db", tmp / "r.db", tmp / "STOP"
    with start_primary(pdb) as p:
        p.script(bank_schema(junk_rows=60, blob_size="3000"))
    start_replica(rdb, pdb).close()
    env = {"P_DB": str(pdb), "R_DB": str(rdb), "STOP": str(stop), "N_ACCT": str(N_ACCT), "SEED": str(SEED + 2)}
    primary = spawn_bg(PRIMARY, tmp, "primary", env)
    last_v = -1
    killed = {}
    try:
        for i in range(15):
            mode, suffix = KILL_POINTS[i % len(KILL_POINTS)]
            name = f"applier{i}"
            app = spawn_bg(
                APPLIER,
                tmp,
                name,
                {**env, "LD_PRELOAD": kill_shim, "REPL_CRASH_MODE": mode, "REPL_CRASH_SUFFIX": suffix,
                 "REPL_CRASH_AFTER": str((i // len(KILL_POINTS)) % 4)},
            )
            assert_killed(tmp, app, name, f"its kill point {mode} {suffix}", KILL_MARKER)
            killed[(mode, suffix)] = killed.get((mode, suffix), 0) + 1
            out = (tmp / f"{name}.out").read_text()
            assert "error" not in out, out
            last_v = assert_committed_state(rdb, last_v, f"{name} ({mode} {suffix})")
        assert primary.poll() is None
    finally:
        stop.touch()
    bg_result(primary, timeout=30)
    assert len(killed) == len(KILL_POINTS), killed
    assert_resumed_to_the_primary(tmp, pdb, rdb)


# ------------------------------------------------- kills inside the publish and under WRITE

# A stock reader (no extension in this process) looping while appliers are killed: it must
# never see an error or a non-committed state (WAL.md §G15 (c), (d): readers recover a header
# torn between its copies, and the WRITE lock of a killed applier is released by the kernel).
READER = """
import workload
check = workload.BankCheck(float(os.environ["TOTAL"]), int(os.environ["N_ACCT"]))
print(json.dumps(workload.read_loop(os.environ["R_DB"], os.environ["STOP"], workload.READ_SQL, check, readonly=True)))
"""


@pytest.mark.parametrize("point", ["between-header-copies", "holding-write"])
def test_kill_inside_the_publish_or_while_holding_write(tmp, kill_shim, point):
    """WAL.md §G15 (c): killed with copy 2 of the wal-index header written and copy 1 not (the
    extension's fault point ``REPL_FAULT_KILL_AT``); (d): killed while holding WRITE, before
    its first frame write (the LD_PRELOAD shim). A stock reader loops throughout: zero errors,
    zero non-committed states; a new applier resumes without a re-snapshot; the end state is
    the primary's, byte for byte."""
    pdb, rdb, stop = tmp / "p.db", tmp / "r.db", tmp / "STOP"
    with start_primary(pdb) as p:
        p.script(bank_schema(junk_rows=40, blob_size="2000"))
    start_replica(rdb, pdb).close()
    env = {"P_DB": str(pdb), "R_DB": str(rdb), "STOP": str(stop), "N_ACCT": str(N_ACCT), "SEED": str(SEED + 3),
           "TOTAL": str(TOTAL)}
    primary = spawn_bg(PRIMARY, tmp, "primary", env)
    reader = spawn_bg(READER, tmp, "reader", env)
    last_v = -1
    try:
        for i in range(6):
            name = f"applier{i}"
            if point == "between-header-copies":
                fault = {"REPL_FAULT_KILL_AT": f"{point}:{1 + i % 3}"}
                marker = "REPL_FAULT_KILL_AT: killing"
            else:
                fault = {"LD_PRELOAD": kill_shim, "REPL_CRASH_MODE": "before", "REPL_CRASH_SUFFIX": "r.db-wal",
                         "REPL_CRASH_AFTER": str(i % 3)}
                marker = KILL_MARKER
            app = spawn_bg(APPLIER, tmp, name, {**env, **fault})
            assert_killed(tmp, app, name, point, marker)
            assert "error" not in (tmp / f"{name}.out").read_text()
            last_v = assert_committed_state(rdb, last_v, name)
        assert primary.poll() is None and reader.poll() is None
    finally:
        stop.touch()
    bg_result(primary, timeout=30)
    seen = bg_result(reader, timeout=30)
    assert seen["n_errors"] == 0 and seen["n_violations"] == 0, seen
    assert seen["reads"] > 0, seen
    assert_resumed_to_the_primary(tmp, pdb, rdb)

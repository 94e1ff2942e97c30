"""Crash tests: ``kill -9`` of primary writer processes (WAL.md §D.7 "crashed writer of ours:
killed after its commit, before T2": the frames are in the WAL, the next T1/T3 catches up).

* ``test_random_kills``: a writer process commits transactions in a loop, each one inserting the
  next id into ``t`` and printing the id to stdout once COMMIT returned (with random
  synchronous/cache_size/autocheckpoint settings, big spilling blobs, savepoint rollbacks and
  PASSIVE/RESTART/TRUNCATE checkpoints); the test SIGKILLs it after a random delay (seeded),
  starts the next writer, and so on (>= 20 kills). In the second half this process holds a
  connection of its own (so the wal-index survives the kills and this process's poll/T3 may be
  the one that catches up). At the end a clean process commits one last transaction.

* ``test_kill_at_capture_point``: the kill lands at an exact point instead of a random one: an
  LD_PRELOAD shim (``killshim.py``) SIGKILLs the writer at its first ``pwrite`` to a
  log segment once armed (the transaction is committed in the WAL, its record is not in the log),
  in the middle of that write (a torn record), or at the ``position`` write that follows. The
  crashed commit either appends to the captured WAL generation, or restarts the WAL after a
  RESTART checkpoint; or the crash hits a TRUNCATE checkpoint's bookkeeping. The catch-up is done
  by the next writer process (T1) or by this process's capture agent (T3 poll).

Checks (``check_final_state``), data first: ``verify`` passes, LSNs dense, every id printed by a
killed writer is in the primary and in the rebuild, the rebuild equals the primary (pages, rows,
checksum); then capture: no gap (generation 1, no snapshot record) and exactly one LSN per
committed transaction.

Knobs: REPL_CRASH_KILLS (default 32), REPL_CRASH_SEED (default 4242).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import apsw
import pytest

from capture_check import assert_dense, assert_rebuild_equals, inspect, verify_ok
from helpers import apsw_conn, one, spawn_py, wait_for
from killshim import KILL_MARKER

KILLS = int(os.environ.get("REPL_CRASH_KILLS", "32"))
SEED = int(os.environ.get("REPL_CRASH_SEED", "4242"))

# A writer process: config JSON on stdin; prints "open", then one committed id per line.
WRITER = """
import random
cfg = json.loads(sys.stdin.readline())
c = connect(cfg["db"])
c.setbusytimeout(10000)
if cfg.get("create"):
    assert one(c, "SELECT repl_primary()") == 0
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, payload BLOB, gen INT, note TEXT)")
assert one(c, "SELECT repl_role()") == "primary", one(c, "SELECT repl_role()")
rng = random.Random(cfg["seed"])
c.execute("PRAGMA synchronous=" + rng.choice(["FULL", "NORMAL"]))
c.execute("PRAGMA cache_size=%d" % rng.choice([5, -2000]))
c.execute("PRAGMA wal_autocheckpoint=%d" % rng.choice([10, 50, 1000]))
if "autockpt" in cfg:
    c.execute("PRAGMA wal_autocheckpoint=%d" % cfg["autockpt"])
print("open", flush=True)
script = cfg.get("script")
for n in range(len(script) if script else cfg.get("max", 1000000)):
    op = script[n] if script else None
    if op == "arm":
        # Capture is asynchronous: let the append pass finish (repl_lsn() runs one) so the
        # shim counts only the writes of what follows.
        one(c, "SELECT repl_lsn()")
        # Report the WAL salts (SQLite holds no fcntl lock on the -wal file: reading it here is
        # harmless), then let the LD_PRELOAD shim count from now on.
        with open(cfg["db"] + "-wal", "rb") as f:
            print("salts:" + f.read(32)[16:24].hex(), flush=True)
        open(cfg["arm_file"], "w").close()
        continue
    if op and op.startswith("ckpt:"):
        c.execute("PRAGMA wal_checkpoint(%s)" % op[5:]).fetchall()
        continue
    r = rng.random() if not script else 0.5
    if r < 0.04:
        # Checkpoints (and so WAL restarts/truncations) between commits, also at kill time.
        c.execute("PRAGMA wal_checkpoint(%s)" % rng.choice(["PASSIVE", "RESTART", "TRUNCATE"])).fetchall()
        continue
    if r < 0.15:
        size = rng.randint(20000, 120000)   # overflow chain; spills with the 5-page cache
    else:
        size = rng.randint(10, 3000)
    c.execute("BEGIN IMMEDIATE")
    nid = one(c, "SELECT coalesce(max(id), 0) + 1 FROM t")
    c.execute("INSERT INTO t(id, payload, gen, note) VALUES (?, randomblob(?), ?, ?)", (nid, size, cfg["gen"], "w"))
    if rng.random() < 0.3:
        c.execute("UPDATE t SET payload = randomblob(?) WHERE id = ?", (rng.randint(1, 500), rng.randint(1, nid)))
    if rng.random() < 0.2:
        # Keep the database small: drop old big payloads.
        c.execute("UPDATE t SET payload = NULL WHERE id < ? AND length(payload) > 5000", (nid - 10,))
    if rng.random() < 0.1:
        c.execute("SAVEPOINT s")
        c.execute("INSERT INTO t(id, payload, gen, note) VALUES (?, randomblob(50000), ?, 'rolled back')", (-nid, cfg["gen"]))
        c.execute("ROLLBACK TO s")
        c.execute("RELEASE s")
    c.execute("COMMIT")
    print(nid, flush=True)
c.close()
print("done", flush=True)
"""


class Writer:
    """A running writer process; a reader thread collects its stdout lines."""

    def __init__(self, cfg: dict, env: dict[str, str] | None = None):
        self.p = spawn_py(WRITER, env=env)
        self.p.stdin.write(json.dumps(cfg) + "\n")
        self.p.stdin.flush()
        self.lines: list[str] = []
        self.opened = threading.Event()
        self.first_commit = threading.Event()
        self.stderr = ""
        self._out = threading.Thread(target=self._read_out, daemon=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._out.start()
        self._err.start()

    def _read_out(self) -> None:
        # Only complete lines count (a commit is reported by "<id>\n").
        for line in self.p.stdout:
            if not line.endswith("\n"):
                break
            line = line.strip()
            self.lines.append(line)
            if line == "open":
                self.opened.set()
            elif line.isdigit():
                self.first_commit.set()

    def _read_err(self) -> None:
        self.stderr = self.p.stderr.read()

    def ids(self) -> list[int]:
        return [int(x) for x in self.lines if x.isdigit()]

    def wait_first_commit(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.first_commit.wait(0.01):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.finish()
                raise AssertionError(
                    f"writer exited ({self.p.returncode}) or hung before its first commit:\n{self.stderr}\n{self.lines}"
                )

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
        self.finish()

    def finish(self, timeout: float = 60) -> int:
        self.p.wait(timeout=timeout)
        self.p.stdin.close()
        self._out.join(timeout=10)
        self._err.join(timeout=10)
        return self.p.returncode


def armed_kill(kill_shim: str, tmp, mode: str, suffix: str) -> dict[str, str]:
    """The environment of a writer the kill shim SIGKILLs at its first ``pwrite`` (``mode``:
    before it or half-way) to a file ending in ``suffix``, once ``tmp/armed`` exists."""
    return {"LD_PRELOAD": kill_shim, "REPL_CRASH_SUFFIX": suffix, "REPL_CRASH_AFTER": "0", "REPL_CRASH_MODE": mode,
            "REPL_CRASH_ARM_FILE": str(tmp / "armed")}


def events(text: str) -> list[str]:
    return [line for line in text.splitlines() if "event=" in line or "panic" in line]


def check_final_state(db, tmp, printed: set[int], all_events: list[str], strict: list[str] | None = None) -> dict:
    """The end state after the crashes, checked in two steps so that a failure says which
    promise broke:

    1. data: ``verify`` passes, LSNs dense, ids in ``t`` are 1..count, every printed (= committed)
       id is in the primary and in the rebuild, and the rebuild equals the primary (pages, rows,
       checksum);
    2. capture (WAL.md §D.7): no gap -- one generation, no snapshot record -- and exactly one
       LSN per committed transaction. ``strict`` carries earlier failures of this kind (from the
       test body) so that they are reported after step 1 has run.
    """
    strict = list(strict or [])
    conn = apsw_conn(db)
    conn.setbusytimeout(10_000)
    try:
        final_lsn = one(conn, "SELECT repl_lsn()")
        count = one(conn, "SELECT count(*) FROM t")
        ids = [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
        assert ids == list(range(1, count + 1)), "the ids in t are not 1..count (a committed id vanished?)"
        assert one(conn, "SELECT count(*) FROM t WHERE id < 0 OR note = 'rolled back'") == 0
        missing_here = sorted(printed - set(ids))
        assert not missing_here, f"ids reported committed but missing in the primary: {missing_here[:20]}"

        verify_ok(db)
        records = inspect(db)
        assert_dense(records)
        assert records and records[-1].lsn == final_lsn, (records[-1:], final_lsn)
        info = assert_rebuild_equals(db, tmp / "rebuilt.db", conn)
    finally:
        conn.close()
    plain = apsw.Connection(str(tmp / "rebuilt.db"), flags=apsw.SQLITE_OPEN_READONLY, vfs="unix")
    try:
        rebuilt_ids = {r[0] for r in plain.execute("SELECT id FROM t")}
    finally:
        plain.close()
    missing = sorted(printed - rebuilt_ids)
    assert not missing, f"committed ids missing from the rebuild: {missing[:20]}"

    # Step 2: capture caught every crashed writer's commits up as ordinary transactions.
    snapshots = [(r.lsn, r.generation) for r in records if r.kind != "txn"]
    if snapshots or records[-1].generation != 1:
        strict.append(
            f"{len(snapshots)} gap(s): snapshot records (lsn, generation) {snapshots[:12]}, final generation "
            f"{records[-1].generation}"
        )
    # CREATE TABLE is LSN 1; after that every committed transaction inserted one id.
    if final_lsn != 1 + count:
        strict.append(f"repl_lsn() {final_lsn} != 1 + {count} committed transactions")
    gaps = [e for e in all_events if "event=gap" in e]
    assert not strict, (
        "a writer killed inside its commit/capture must be caught up by the next capture (WAL.md §D.7: "
        "the frames are still in the WAL; the restart/reset was done by a writer of ours that had caught "
        "up), not answered with a gap:\n  " + "\n  ".join(strict)
        + f"\ngap events ({len(gaps)}):\n" + "\n".join(gaps[:30])
    )
    return info


def final_writer(db, gen: int, all_events: list[str]) -> list[int]:
    """A clean process: one more committed transaction (capture catches up first), clean exit."""
    w = Writer({"db": str(db), "seed": -1, "gen": gen, "max": 1})
    rc = w.finish()
    all_events += [f"[final writer] {e}" for e in events(w.stderr)]
    assert rc == 0, f"final writer failed ({rc}):\n{w.stderr}"
    assert "done" in w.lines
    return w.ids()


# ----------------------------------------------------------------------------- random kills


def test_random_kills(tmp, capfd):
    db = tmp / "crash.db"
    rng = random.Random(SEED)
    printed: set[int] = set()
    all_events: list[str] = []
    holder = None
    t0 = time.monotonic()
    kills = 0
    try:
        for gen in range(KILLS):
            if gen == KILLS // 2:
                # From now on this process holds a connection too: the wal-index survives the
                # kills (no recovery) and this process's capture agent is alive (T3).
                holder = apsw_conn(db)
                holder.setbusytimeout(10_000)
                assert one(holder, "SELECT repl_role()") == "primary"
            w = Writer({"db": str(db), "seed": rng.randrange(2**32), "gen": gen, "create": gen == 0})
            try:
                w.wait_first_commit()
                # Kill after a random delay: mostly short (the next commit, its capture), some
                # longer (checkpoints, WAL restarts, big spilling transactions).
                delay = rng.choice([0.0, rng.uniform(0, 0.03), rng.uniform(0, 0.3)])
                time.sleep(delay)
            finally:
                w.kill()
            assert w.p.returncode == -signal.SIGKILL, f"writer {gen} was not killed ({w.p.returncode}):\n{w.stderr}"
            kills += 1
            ids = w.ids()
            assert ids, "the writer reported no commit"
            assert ids == list(range(ids[0], ids[-1] + 1)), f"writer {gen} printed non-consecutive ids {ids}"
            assert not printed or ids[0] > max(printed), "a new writer reused an id: a committed row was lost"
            printed.update(ids)
            all_events += [f"[writer {gen}] {e}" for e in events(w.stderr)]
            assert "panic" not in w.stderr, w.stderr
        printed.update(final_writer(db, KILLS, all_events))
    finally:
        if holder is not None:
            holder.close()
    assert kills >= min(20, KILLS)
    t_loop = time.monotonic() - t0
    all_events += [f"[this process] {e}" for e in events(capfd.readouterr().err)]
    print(f"crash: {kills} kills, {len(printed)} printed commits, {t_loop:.1f}s")
    for e in all_events:
        print(e)
    check_final_state(db, tmp, printed, all_events)


# ---------------------------------------------------------------------- exact crash points

CRASH_POINTS = {
    # Committed in the WAL, its record never reached the log.
    "before-log-append": ("before", ".seg"),
    # Half of the record reached the log: a torn tail the next writer truncates.
    "torn-log-append": ("half", ".seg"),
    # The record is in the log, the shared position file was not updated.
    "before-position-write": ("before", "/position"),
}

SCENARIOS = {
    # The crashed commit appends to the WAL generation that is already captured.
    "append": ["commit", "commit", "commit", "arm", "commit"],
    # The crashed commit restarts the WAL (new salts) after a RESTART checkpoint.
    "restart": ["commit", "commit", "commit", "ckpt:RESTART", "arm", "commit"],
    # The crash hits the capture bookkeeping of a TRUNCATE checkpoint (WAL emptied, new salts).
    "truncate": ["commit", "commit", "commit", "arm", "ckpt:TRUNCATE"],
}


def capture_point_cases():
    for scenario in SCENARIOS:
        for point in CRASH_POINTS:
            if scenario == "truncate" and point != "before-position-write":
                continue  # a checkpoint appends no record
            for catch_up in ("next-writer", "poll"):
                if scenario == "truncate" and catch_up == "poll":
                    continue
                yield pytest.param(scenario, point, catch_up, id=f"{scenario}-{point}-{catch_up}")


@pytest.mark.parametrize("scenario, point, catch_up", list(capture_point_cases()))
def test_kill_at_capture_point(tmp, capfd, kill_shim, scenario, point, catch_up):
    mode, suffix = CRASH_POINTS[point]
    db = tmp / "cp.db"
    all_events: list[str] = []
    strict: list[str] = []
    w = Writer({"db": str(db), "seed": 1, "gen": 0, "create": True, "script": ["commit"] * 5, "autockpt": 0})
    assert w.finish() == 0, w.stderr
    printed = set(w.ids())
    all_events += [f"[setup] {e}" for e in events(w.stderr)]

    holder = None
    if catch_up == "poll":
        # A live primary connection in this process: its capture agent (T3 poll) sees the
        # crashed writer's commit without any further write, and the wal-index survives.
        holder = apsw_conn(db)
        holder.setbusytimeout(10_000)
    try:
        env = armed_kill(kill_shim, tmp, mode, suffix)
        cfg = {"db": str(db), "seed": 2, "gen": 1, "script": SCENARIOS[scenario], "arm_file": str(tmp / "armed"),
               "autockpt": 0}
        w = Writer(cfg, env=env)
        rc = w.finish()
        all_events += [f"[crashed writer] {e}" for e in events(w.stderr)]
        assert KILL_MARKER in w.stderr, f"the shim never fired (rc {rc}):\n{w.stderr}\n{w.lines}"
        assert rc == -signal.SIGKILL
        ids = w.ids()
        # Capture is asynchronous (an append pass on a worker thread): the 4th COMMIT may have
        # returned, and its id been printed, before the pass reached the kill point.
        assert len(ids) in (3, 4), ids
        printed.update(ids)
        # The scenario really happened: same WAL generation / restarted / emptied.
        salts_before = next(x[6:] for x in w.lines if x.startswith("salts:"))
        with open(f"{db}-wal", "rb") as f:
            wal_head = f.read(32)
        if scenario == "append":
            assert wal_head[16:24].hex() == salts_before, "the crashed commit restarted the WAL"
        elif scenario == "restart":
            assert len(wal_head) == 32 and wal_head[16:24].hex() != salts_before, "the WAL was not restarted"
        else:
            assert wal_head == b"", "the TRUNCATE checkpoint did not empty the WAL"
        if holder is not None:
            # The commit that was being captured is in the WAL: the poll catches it up, as one
            # more LSN.
            want = 1 + len(printed) + (1 if len(ids) == 3 else 0)
            wait_for(lambda: one(holder, "SELECT repl_lsn()") >= want, timeout=10,
                     what=f"this process's capture agent catching up to LSN {want}")
            records = inspect(db)
            all_events += [f"[this process] {e}" for e in events(capfd.readouterr().err)]
            tail = [(r.lsn, r.generation, r.kind) for r in records[-2:]]
            if not all(g == 1 and k == "txn" for _, g, k in tail):
                strict.append(f"the poll answered the crashed writer's commit with a gap: last records {tail}")
        printed.update(final_writer(db, 2, all_events))
    finally:
        if holder is not None:
            holder.close()
    for e in all_events:
        print(e)
    check_final_state(db, tmp, printed, all_events, strict)


@pytest.mark.parametrize("wal", ["kept", "deleted"])
def test_crashed_writer_then_foreign_commit_is_a_gap(tmp, kill_shim, wal):
    """The intent of a crashed write session vouches for ONE transaction: a writer without the
    extension that commits on top of the crashed writer's uncaptured commit (before any capture
    of ours ran) is still detected as a gap (docs/ARCHITECTURE.md, Guarantees, 3), and the rebuild
    includes both commits. ``kept``: a plain connection (no extension, no capture) keeps the WAL,
    the catch-up finds two transactions; ``deleted``: the foreign shell is the last to close, so
    it checkpoints and deletes the WAL (the next open recovers an empty one)."""
    db = tmp / "cf.db"
    w = Writer({"db": str(db), "seed": 1, "gen": 0, "create": True, "script": ["commit"] * 3, "autockpt": 0})
    assert w.finish() == 0, w.stderr
    printed = set(w.ids())
    # Killed between its 4th commit and that commit's claim (T2): the commit is in the WAL,
    # its claim is not, the write intent of its session is.
    env = {**os.environ, "REPL_FAULT_KILL_AT": "t2-before-claim:4"}
    w = Writer({"db": str(db), "seed": 2, "gen": 1, "script": ["commit"] * 4, "autockpt": 0}, env=env)
    rc = w.finish()
    assert "REPL_FAULT_KILL_AT" in w.stderr and rc == -signal.SIGKILL, (rc, w.stderr)
    printed.update(w.ids())

    plain = None
    if wal == "kept":
        plain = apsw.Connection(str(db), vfs="unix")
        plain.execute("SELECT count(*) FROM t").fetchall()
    try:
        proc = subprocess.run(
            ["sqlite3", "-bail", "-batch", "-cmd", ".timeout 5000", str(db)],
            input="INSERT INTO t(id, payload, gen, note) SELECT max(id) + 1, NULL, 99, 'foreign' FROM t;\n",
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert os.path.exists(f"{db}-wal") == (wal == "kept")
        # The next writer of ours catches up (T1, or T2 of the recovery it runs first).
        w = Writer({"db": str(db), "seed": -1, "gen": 2, "max": 1})
        rc = w.finish()
    finally:
        if plain is not None:
            plain.close()
    assert rc == 0, w.stderr
    printed.update(w.ids())
    gaps = [e for e in events(w.stderr) if "event=gap" in e]
    why = "not one crashed write session" if wal == "kept" else "database file differs"
    assert len(gaps) == 1 and why in gaps[0], events(w.stderr)

    conn = apsw_conn(db)
    try:
        records = inspect(db)
        assert_dense(records)
        kinds = [(r.generation, r.kind) for r in records]
        # 1 CREATE + 3 + 3 captured commits; the crashed + the foreign commit -> one snapshot;
        # then the final writer's commit.
        assert kinds == [(1, "txn")] * 7 + [(2, "snapshot"), (2, "txn")], kinds
        assert one(conn, "SELECT count(*) FROM t WHERE note = 'foreign'") == 1
        ids = [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
        assert printed <= set(ids) and ids == list(range(1, len(ids) + 1)), (sorted(printed), ids)
        verify_ok(db)
        assert_rebuild_equals(db, tmp / "rebuilt.db", conn)
    finally:
        conn.close()


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_kill_at_capture_point_with_a_warm_log_handle(tmp, capfd, kill_shim, point):
    """Like ``test_kill_at_capture_point`` (append scenario), but this process's capture agent
    has already loaded the log (it committed before the crash), so its log handle's idea of the
    segment end is stale after the crashed writer's (possibly torn) append: its next commit must
    notice that (the append flag in the shared position mapping) and catch up without a gap."""
    mode, suffix = CRASH_POINTS[point]
    db = tmp / "warm.db"
    all_events: list[str] = []
    w = Writer({"db": str(db), "seed": 1, "gen": 0, "create": True, "script": ["commit"] * 3, "autockpt": 0})
    assert w.finish() == 0, w.stderr
    printed = set(w.ids())
    holder = apsw_conn(db)
    holder.setbusytimeout(10_000)

    def holder_commit() -> int:
        # IMMEDIATE: this process's poll (T3) may catch the crashed commit up at any moment;
        # a deferred read-then-write transaction would then fail with SQLITE_BUSY_SNAPSHOT.
        holder.execute("BEGIN IMMEDIATE")
        nid = one(holder, "SELECT coalesce(max(id), 0) + 1 FROM t")
        holder.execute("INSERT INTO t(id, payload, gen, note) VALUES (?, randomblob(100), 9, 'w')", (nid,))
        holder.execute("COMMIT")
        return nid

    try:
        printed.add(holder_commit())
        env = armed_kill(kill_shim, tmp, mode, suffix)
        # The crashed writer's only commit is the one killed in capture: the position it
        # leaves is the one this process's handle already knows, so only the append flag
        # tells this process that the segment may hold more than its handle knows.
        w = Writer({"db": str(db), "seed": 2, "gen": 1, "script": ["arm", "commit"], "arm_file": str(tmp / "armed"),
                    "autockpt": 0}, env=env)
        rc = w.finish()
        all_events += [f"[crashed writer] {e}" for e in events(w.stderr)]
        assert KILL_MARKER in w.stderr and rc == -signal.SIGKILL, (rc, w.stderr)
        assert w.ids() == [], w.lines
        printed.add(holder_commit())
        mine = events(capfd.readouterr().err)
        all_events += [f"[this process] {e}" for e in mine]
        if point == "before-position-write":
            # The crashed writer's record is complete in the log: it is adopted (the log is
            # rescanned), not captured a second time over it.
            assert not [e for e in mine if "event=crash_catch_up" in e], mine
    finally:
        holder.close()
    for e in all_events:
        print(e)
    check_final_state(db, tmp, printed, all_events)


# ------------------------------------------------------------ the asynchronous capture pipeline

# Where the asynchronous capture (docs/ARCHITECTURE.md "Capture") can be cut by kill -9, as
# REPL_FAULT_KILL_AT points of the extension: committed but not claimed (the write intent
# resolves it), claimed but not appended, in the middle of an append pass (after any record),
# records in the log but the position file behind, and the restart hook about to append.
PIPELINE_POINTS = ["t2-before-claim", "t2-after-claim", "append-before-records", "append-after-record",
                   "append-before-position", "restart-before-append"]
PIPELINE_KILLS = int(os.environ.get("REPL_PIPELINE_KILLS", "108"))


def test_kill_at_every_point_of_the_async_pipeline(tmp, capfd):
    """>= 100 kills, spread over every point of the pipeline (and a random n-th arrival there),
    with WAL checkpoints and restarts in between (random writers: autocheckpoint 10..1000,
    RESTART/TRUNCATE checkpoints). The second half runs with a connection of this process open
    (the wal-index survives, this process's workers may append what the killed writer claimed).
    Then the same end checks as the other crash tests: every id whose COMMIT returned is in the
    primary and in the rebuild, LSNs dense, no gap (one generation), one LSN per transaction."""
    db = tmp / "pipe.db"
    rng = random.Random(SEED + 1)
    printed: set[int] = set()
    all_events: list[str] = []
    kills = {p: 0 for p in PIPELINE_POINTS}
    holder = None
    w = Writer({"db": str(db), "seed": 1, "gen": 0, "create": True, "script": ["commit"] * 3})
    assert w.finish() == 0, w.stderr
    printed.update(w.ids())
    attempt = 0
    try:
        while sum(kills.values()) < PIPELINE_KILLS:
            attempt += 1
            assert attempt < PIPELINE_KILLS * 3, f"too few kills landed: {kills}"
            if holder is None and sum(kills.values()) >= PIPELINE_KILLS // 2:
                holder = apsw_conn(db)
                holder.setbusytimeout(10_000)
            point = PIPELINE_POINTS[attempt % len(PIPELINE_POINTS)]
            n = rng.randint(1, 3 if point == "restart-before-append" else 12)
            env = {**os.environ, "REPL_FAULT_KILL_AT": f"{point}:{n}"}
            w = Writer({"db": str(db), "seed": rng.randrange(2**32), "gen": attempt, "max": 400}, env=env)
            rc = w.finish()
            ids = w.ids()
            all_events += [f"[writer {attempt} {point}:{n}] {e}" for e in events(w.stderr)]
            assert not printed or not ids or ids[0] > max(printed), "a new writer reused an id: a committed row was lost"
            printed.update(ids)
            if rc == -signal.SIGKILL:
                assert "REPL_FAULT_KILL_AT" in w.stderr, w.stderr
                kills[point] += 1
            else:
                assert rc == 0, f"writer {attempt} failed ({rc}):\n{w.stderr}"
        printed.update(final_writer(db, 10_000, all_events))
    finally:
        if holder is not None:
            holder.close()
    all_events += [f"[this process] {e}" for e in events(capfd.readouterr().err)]
    print(f"pipeline kills: {kills} in {attempt} writers, {len(printed)} printed commits")
    assert all(k > 0 for p, k in kills.items() if p != "restart-before-append"), kills
    check_final_state(db, tmp, printed, all_events)


def test_stock_truncate_over_claimed_frames_is_a_gap_that_reuses_no_served_lsn(tmp, capfd):
    """The one way claimed frames can go before their append (docs/WAL.md §D.2): a process
    *without* the extension truncates the WAL while a writer's claim waits for its append (here:
    the writer is killed right after claiming, before any append pass ran). The claim can then
    not be proven; the next capture of ours answers with a gap whose snapshot holds the claimed
    transaction (the checkpoint copied it into the database), starting past the durable
    watermark: nothing committed is lost, no LSN a replica may hold is reused."""
    db = tmp / "st.db"
    w = Writer({"db": str(db), "seed": 1, "gen": 0, "create": True, "script": ["commit"] * 3, "autockpt": 0})
    assert w.finish() == 0, w.stderr
    printed = set(w.ids())
    before = inspect(db)
    served = before[-1].lsn
    env = {**os.environ, "REPL_FAULT_KILL_AT": "t2-after-claim:1"}
    w = Writer({"db": str(db), "seed": 2, "gen": 1, "script": ["commit"] * 2, "autockpt": 0}, env=env)
    rc = w.finish()
    assert "REPL_FAULT_KILL_AT" in w.stderr and rc == -signal.SIGKILL, (rc, w.stderr)
    printed.update(w.ids())
    # Its first commit was captured by its first write session (the synchronous path: the
    # process had not loaded the state yet); the second was claimed and never appended.
    proc = subprocess.run(["sqlite3", "-bail", "-batch", str(db)], input="PRAGMA wal_checkpoint(TRUNCATE);\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("0|"), (proc.stdout, proc.stderr)
    # (The stock shell was the last to close: it deleted the WAL too.)
    assert not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") == 0
    w = Writer({"db": str(db), "seed": -1, "gen": 2, "max": 1})
    assert w.finish() == 0, w.stderr
    printed.update(w.ids())
    evs = events(w.stderr)
    assert [e for e in evs if "event=gap" in e], "\n".join(evs)
    records = inspect(db)
    assert_dense(records)
    snaps = [r for r in records if r.kind == "snapshot" and r.generation == 2]
    assert len(snaps) == 1 and snaps[0].lsn > served, (snaps, served)
    conn = apsw_conn(db)
    try:
        ids = {r[0] for r in conn.execute("SELECT id FROM t")}
        assert printed <= ids, sorted(printed - ids)
        verify_ok(db)
        assert_rebuild_equals(db, tmp / "rebuilt.db", conn)
    finally:
        conn.close()

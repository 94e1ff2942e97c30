"""Checkpoint assist (issue 14, primary/checkpoint.rs): a primary checkpoints PASSIVE in the
background once its WAL holds `checkpoint_assist` frames (default 500), so the application's
commits rarely run SQLite's automatic checkpoint themselves; an automatic checkpoint of a
commit while the WAL holds 1,000..4,000 frames is handed to the assist (the committing thread
goes on), past that the writer checkpoints itself.

What a user checks: the assist runs (repl_status), the WAL stays bounded (also when the assist
is stuck), nothing is lost or reordered (the log, a stock reader and a replica agree), a
checkpoint the application asks for itself is never held back, `checkpoint_assist = 0` leaves
the database file untouched by us, and a bad value is refused without changing the setting.
"""

from __future__ import annotations

import json
import os

import apsw
import pytest

from capture_check import assert_dense, assert_rebuild_equals, inspect, verify_ok
from helpers import make_primary, one, py_ok, shm_state, stock_checkpoint, stock_one, wait_for

ROW = "x" * 100


def status(c: apsw.Connection) -> dict:
    return json.loads(one(c, "SELECT repl_status()"))


def commit_rows(c: apsw.Connection, n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        c.execute("INSERT INTO t(id, v) VALUES (?, ?)", (i, ROW))


def assert_nothing_lost(db: str, tmp, n: int, c: apsw.Connection | None = None) -> None:
    """Rows 1..n are all there for a stock reader, the log verifies with dense LSNs, and the
    database rebuilt from the log equals the primary's."""
    assert stock_one(db, "SELECT count(*), min(id), max(id) FROM t;") == f"{n}|1|{n}"
    assert stock_one(db, "PRAGMA integrity_check;") == "ok"
    verify_ok(db)
    assert_dense(inspect(db))
    assert_rebuild_equals(db, tmp / "rebuilt.db", c)


def new_primary(tmp, autocheckpoint: int | None = None, synchronous: str | None = None
                ) -> tuple[apsw.Connection, str]:
    db = str(tmp / "p.db")
    c, _ = make_primary(db)
    c.execute("PRAGMA journal_mode=WAL").fetchall()
    if synchronous is not None:  # SQLite's default in WAL mode is FULL
        c.execute(f"PRAGMA synchronous={synchronous}").fetchall()
    if autocheckpoint is not None:
        c.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}").fetchall()
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    return c, db


def test_assist_checkpoints_in_the_background_and_loses_nothing(tmp):
    # The application turned its own automatic checkpoints off: only the assist copies pages
    # into the database file, so a grown file and a bounded WAL are its work alone.
    c, db = new_primary(tmp, autocheckpoint=0)
    assert status(c)["settings"]["checkpoint_assist"] == 500
    commit_rows(c, 3000)
    lsn = one(c, "SELECT repl_lsn()")
    wait_for(lambda: status(c)["checkpoint"]["assisted"] >= 1, timeout=10,
             what="an assisted checkpoint")
    st = status(c)
    assert st["checkpoint"]["last_error"] is None, st["checkpoint"]
    assert st["checkpoint"]["assist_frames"] == 500
    # Pages reached the database file (it started at two pages).
    assert os.path.getsize(db) > 40 * 4096, os.path.getsize(db)
    shm = shm_state(db)
    assert shm["n_backfill"] > 0, shm
    assert lsn == st["lsn"]
    assert_nothing_lost(db, tmp, 3000, c)
    c.close()


def test_application_checkpoints_are_not_held_back(tmp):
    c, db = new_primary(tmp)
    for k in range(3):
        commit_rows(c, 1200, start=1 + k * 1200)
        # TRUNCATE by the application right after a burst: never busy because of the assist
        # (the assist holds nothing between runs), and the WAL is empty afterwards.
        busy, log, done = wait_for(
            lambda: (lambda r: r if r[0] == 0 else None)(
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]),
            timeout=10, what="a TRUNCATE checkpoint that is not busy")
        assert (busy, log, done) == (0, 0, 0)
        assert os.path.getsize(db + "-wal") == 0
    # A stock process's checkpoint too.
    commit_rows(c, 10, start=10_000)
    assert stock_checkpoint(db, "RESTART")[0] == 0
    assert one(c, "SELECT count(*) FROM t") == 3610
    st = status(c)
    assert st["lsn"] == one(c, "SELECT repl_lsn()")
    assert st["gaps"] == 0, st
    c.close()


FRAME = 24 + 4096  # a WAL frame at the default page size
HANDOFF_MAX_FRAMES = 4000  # primary/checkpoint.rs


def test_automatic_checkpoints_are_handed_to_the_assist(tmp):
    """Back-to-back commits at synchronous=NORMAL with SQLite's default wal_autocheckpoint: the
    automatic checkpoints go to the assist and nothing is lost. The WAL stays bounded: past
    4,000 frames the writer checkpoints itself once no assist run holds the checkpoint lock
    (the commits made during that run come on top; exactly at the bound when the assist is
    stuck, the next test)."""
    c, db = new_primary(tmp, synchronous="NORMAL")
    commit_rows(c, 10_000)
    wait_for(lambda: status(c)["checkpoint"]["assisted"] >= 1, timeout=10,
             what="an assisted checkpoint")
    st = status(c)
    assert st["checkpoint"]["handed_off"] >= 1, st["checkpoint"]
    assert st["checkpoint"]["last_error"] is None, st["checkpoint"]
    assert os.path.getsize(db + "-wal") <= 32 + 2 * HANDOFF_MAX_FRAMES * FRAME
    assert_nothing_lost(db, tmp, 10_000, c)
    c.close()


def test_commits_that_sync_the_wal_keep_their_own_checkpoint(tmp):
    """synchronous=FULL: every commit fsyncs the WAL, and with the hand-off the WAL would grow
    to the bound, each fsync then also committing file-size metadata (measured 1.9x plain at
    FULL). So such commits checkpoint themselves: nothing handed off, the WAL restarts at
    SQLite's 1,000 frames."""
    c, db = new_primary(tmp, synchronous="FULL")
    commit_rows(c, 3000)
    st = status(c)
    assert st["checkpoint"]["handed_off"] == 0, st["checkpoint"]
    # Restarted near SQLite's threshold, far below the hand-off bound (the writer's own
    # checkpoint may meet an assist run and retry at the next commits, a few frames more).
    assert os.path.getsize(db + "-wal") <= 32 + 1500 * FRAME
    assert stock_one(db, "SELECT count(*) FROM t;") == "3000"
    assert_dense(inspect(db))
    c.close()


def test_stuck_assist_leaves_the_writer_its_own_checkpoint_past_the_bound(tmp):
    """The assist held in a test delay (it never runs): automatic checkpoints are handed off
    up to the bound only, then the writer checkpoints itself and the WAL restarts, so it never
    grows past the bound (plus one transaction)."""
    db = str(tmp / "p.db")
    out = py_ok(
        f"""
        db = {db!r}
        c = connect(db)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        one(c, "SELECT repl_primary()")
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        biggest = 0
        for i in range(1, 12_001):
            c.execute("INSERT INTO t(id, v) VALUES (?, ?)", (i, "x" * 100))
            if i % 100 == 0:
                biggest = max(biggest, os.path.getsize(db + "-wal"))
        st = json.loads(one(c, "SELECT repl_status()"))["checkpoint"]
        lsn = one(c, "SELECT repl_lsn()")
        c.close()
        print(json.dumps({{"biggest": biggest, "st": st, "lsn": lsn}}))
        """,
        env={"REPL_FAULT_DELAY_AT": "checkpoint-worker-holds:60000"},
        timeout=120,
    )
    r = json.loads(out.strip().splitlines()[-1])
    assert r["st"]["assisted"] == 0, r  # held in its delay the whole time
    assert r["st"]["handed_off"] >= 1, r
    # The writer's own checkpoint ran past the bound: the WAL restarted instead of growing.
    assert 1000 * FRAME < r["biggest"] <= 32 + (HANDOFF_MAX_FRAMES + 2) * FRAME, r
    assert_nothing_lost(db, tmp, 12_000)


def test_application_checkpoint_waits_for_an_assist_run_instead_of_failing(tmp):
    """Every burst ends with the assist just handed a checkpoint, so the application's own
    TRUNCATE right after it usually meets an assist run holding the checkpoint lock (which
    SQLite takes without a busy handler): it waits for the run and succeeds at the first try."""
    c, db = new_primary(tmp, synchronous="NORMAL")
    c.setbusytimeout(5000)  # for the locks SQLite does wait on (WRITE, the readers)
    for k in range(12):
        commit_rows(c, 1100, start=1 + k * 1100)
        assert c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0] == (0, 0, 0), k
        assert os.path.getsize(db + "-wal") == 0
    st = status(c)
    assert st["checkpoint"]["handed_off"] >= 12, st["checkpoint"]
    assert one(c, "SELECT count(*) FROM t") == 13_200
    c.close()


def test_checkpoint_asked_right_after_a_commit_is_not_handed_off(tmp):
    """Below SQLite's default threshold no automatic checkpoint runs, so a checkpoint lock a
    connection asks for right after its commit is the application's own: never answered
    busy (no retry here, and no assist run is due with a WAL this small)."""
    c, db = new_primary(tmp, synchronous="NORMAL")
    for k in range(5):
        commit_rows(c, 20, start=1 + k * 20)
        assert c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0] == (0, 0, 0)
        assert os.path.getsize(db + "-wal") == 0
    assert status(c)["checkpoint"]["handed_off"] == 0
    assert one(c, "SELECT count(*) FROM t") == 100
    c.close()


def test_assist_off_leaves_checkpoints_to_the_application(tmp):
    c, db = new_primary(tmp, autocheckpoint=0)
    assert one(c, "SELECT repl_config('checkpoint_assist', 0)") is not None
    size0 = os.path.getsize(db)
    commit_rows(c, 3000)
    one(c, "SELECT repl_lsn()")  # the log has everything (an append pass ran)
    st = status(c)
    assert st["settings"]["checkpoint_assist"] == 0
    assert st["checkpoint"]["assisted"] == 0, st["checkpoint"]
    assert st["checkpoint"]["handed_off"] == 0, st["checkpoint"]
    assert shm_state(db)["n_backfill"] == 0
    assert os.path.getsize(db) == size0
    # Turned back on, it runs at the next append pass.
    one(c, "SELECT repl_config('checkpoint_assist', 100)")
    commit_rows(c, 10, start=5000)
    wait_for(lambda: status(c)["checkpoint"]["assisted"] >= 1, timeout=10,
             what="an assisted checkpoint after turning the assist on")
    c.close()


@pytest.mark.parametrize("value", [-1, 1_000_001, "many"])
def test_bad_assist_value_is_refused_and_changes_nothing(tmp, value):
    c, db = new_primary(tmp)
    one(c, "SELECT repl_config('checkpoint_assist', 700)")
    cfg = tmp / "p.db-replica" / "config.json"
    before = cfg.read_bytes()
    with pytest.raises(apsw.Error) as e:
        one(c, "SELECT repl_config('checkpoint_assist', ?)", (value,))
    assert "checkpoint_assist" in str(e.value), str(e.value)
    assert cfg.read_bytes() == before
    assert status(c)["settings"]["checkpoint_assist"] == 700
    c.close()


NICE_CHILD = r"""
import json, os
load()
c = connect(%r)
c.execute("pragma journal_mode=wal").fetchall()
one(c, "select repl_primary()")
c.execute("create table t(x)")
c.execute("insert into t values (1)")
one(c, "select repl_lsn()")
# A worker names itself, then sets its priority, then waits for work: read once every worker
# is named and none is still running its start (on a loaded machine they start late).
WORKERS = ("repl-append", "repl-checkpoint", "repl-durable")
deadline = time.monotonic() + 30
while True:
    nice, running = {}, set()
    for t in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{t}/comm").read().strip()
            fields = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(t) == os.getpid():
            name = "main"
        nice.setdefault(name, set()).add(int(fields[16]))  # field 19 of stat: nice
        if fields[0] == "R":  # field 3: state
            running.add(name)
    if all(w in nice for w in WORKERS) and not running.intersection(WORKERS):
        break
    assert time.monotonic() < deadline, f"workers never all started and idle: {nice} {running}"
    time.sleep(0.01)
print(json.dumps({k: sorted(v) for k, v in nice.items()}))
"""


@pytest.mark.parametrize("env, expected", [({}, 0), ({"REPL_BACKGROUND_NICE": "10"}, 10),
                                           ({"REPL_BACKGROUND_NICE": "5"}, 5)])
def test_background_threads_yield_the_cpu_when_asked(tmp, env, expected):
    nice = json.loads(py_ok(NICE_CHILD % str(tmp / "p.db"), env=env))
    # The log append and the checkpoint assist can wait; the application's thread, the group
    # fsync (commits at sync levels wait for it) and the others keep the inherited priority.
    assert nice["repl-append"] == [expected], nice
    assert nice["repl-checkpoint"] == [expected], nice
    assert nice["repl-durable"] == [0], nice
    assert nice["main"] == [0], nice


"""A writer killed between writing its commit's frames and publishing them (found by the
failover torture, issue 14).

SQLite writes a commit's frames to the WAL file, then publishes them in the wal-index header.
SIGKILL in between leaves a complete, valid transaction in the WAL file that no live connection
sees and no capture claimed (T2 never ran). While another process keeps the wal-index alive,
nothing recovers it; once every connection has closed, the next first opener's stock recovery
would commit it after all: a change nobody witnessed, so the primary would start a new
generation and every replica re-copy the database, for a transaction its writer never saw
succeed. The primary's resume discards such frames under WRITE (as the next writer's overwrite
would), so the transaction stays lost everywhere, and the lineage goes on.

The kill shim (killshim.py, mode "after") SIGKILLs the writer right after the pwrite of the
commit frame's page: frame header and page written, wal-index header not yet published.
"""

from __future__ import annotations

import json
import subprocess
import sys

from capture_check import assert_dense, inspect
from helpers import py_ok, run_py, spawn_py, stock_one
from killshim import KILL_MARKER

SETUP = r"""
load()
c = connect(%r)
c.execute("pragma journal_mode=wal").fetchall()
one(c, "select repl_primary()")
c.execute("create table t(id integer primary key, v text)")
c.execute("insert into t(v) values ('one')")
print(json.dumps({"lsn": one(c, "select repl_lsn()")}))
c.close()
"""

# The writer: one more single-row commit (one frame: its header and its page, two pwrites to
# the -wal), killed after the second.
WRITER = r"""
load()
c = connect(%r)
open(%r, "w").close()  # arm the shim
c.execute("insert into t(v) values ('two')")
print("not killed")
"""

RESUME = r"""
load()
c = connect(%r)
lsn, checksum = json.loads(one(c, "select json_array(repl_lsn(), repl_checksum())"))
st = json.loads(one(c, "select repl_status()"))
print(json.dumps({"lsn": lsn, "generation": st["generation"], "gaps": st["gaps"],
                  "rows": one(c, "select count(*) from t")}), flush=True)
if %r:
    sys.stdin.readline()  # stay open until told: this primary closes last
c.close()
"""

# A stock process (no extension) keeping the wal-index alive, as a reader or a second
# application would: with it open, nothing runs recovery when the writer dies.
HOLDER = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute("select count(*) from t").fetchone()[0], flush=True)
sys.stdin.readline()
print(c.execute("select count(*) from t").fetchone()[0], flush=True)
c.close()
"""


def kill_writer_before_publish(tmp, db: str, kill_shim: str) -> None:
    """Run WRITER under the kill shim: SIGKILLed after writing its commit frame, before
    publishing it in the wal-index header."""
    env = {"LD_PRELOAD": kill_shim, "REPL_CRASH_SUFFIX": "-wal", "REPL_CRASH_AFTER": "1",
           "REPL_CRASH_MODE": "after", "REPL_CRASH_ARM_FILE": str(tmp / "armed")}
    w = run_py(WRITER % (db, str(tmp / "armed")), env=env)
    assert w.returncode == -9 and KILL_MARKER in w.stderr, (w.returncode, w.stderr[-2000:])


def close_primary_expecting_discard(p: subprocess.Popen) -> None:
    """Let a RESUME child that waits on stdin close its (last) connection; its close or its
    resume must have logged the discard."""
    p.stdin.write("\n")
    p.stdin.flush()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "event=unpublished_frames_discarded" in err, err


def assert_killed_commit_stays_lost(db: str, lsn: int) -> None:
    """Every connection closed: a stock opener's recovery over the WAL file finds no
    transaction beyond the published ones, and the primary goes on in the same generation,
    at the same LSN, without a gap."""
    assert stock_one(db, "SELECT count(*) FROM t;") == "1"
    assert stock_one(db, "PRAGMA integrity_check;") == "ok"
    again = json.loads(py_ok(RESUME % (db, False)))
    assert again == {"lsn": lsn, "generation": 1, "gaps": 0, "rows": 1}, (again, lsn)
    records = inspect(db)
    assert_dense(records)
    assert {r.generation for r in records} == {1}, records


def test_unpublished_commit_of_a_killed_writer_is_not_recovered_later(tmp, kill_shim):
    db = str(tmp / "p.db")
    assert json.loads(py_ok(SETUP % db))["lsn"] >= 2
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        kill_writer_before_publish(tmp, db, kill_shim)
        # The primary resumes while the holder keeps the wal-index: the commit was never
        # published, so nobody sees it, and the resume discards its frames.
        r = spawn_py(RESUME % (db, True))
        resumed = json.loads(r.stdout.readline())
        assert resumed["rows"] == 1 and resumed["generation"] == 1 and resumed["gaps"] == 0, resumed
        # The holder closes first (its close is not the last: no checkpoint), then the primary,
        # whose last close leaves the WAL and the wal-index in place (ARCHITECTURE.md "Capture").
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "1"
        holder.wait(10)
        close_primary_expecting_discard(r)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert_killed_commit_stays_lost(db, resumed["lsn"])


def test_unpublished_commit_while_a_primary_process_stays_up_is_discarded_at_its_last_close(tmp, kill_shim):
    """The case the resume check cannot see: a primary process is already up (its agent keeps
    the wal-index alive) when a writer of another process dies between writing its commit's
    frames and publishing them. Nothing resumes afterwards; the primary's last close is the
    last moment before a first opener's recovery would commit the transaction, so the close
    discards the frames under WRITE, as the resume does."""
    db = str(tmp / "p.db")
    assert json.loads(py_ok(SETUP % db))["lsn"] >= 2
    p = spawn_py(RESUME % (db, True))  # a long-lived primary process
    try:
        before = json.loads(p.stdout.readline())
        assert before["rows"] == 1 and before["gaps"] == 0, before
        kill_writer_before_publish(tmp, db, kill_shim)
        close_primary_expecting_discard(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert_killed_commit_stays_lost(db, before["lsn"])

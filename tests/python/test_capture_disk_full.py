"""Disk full (issue 14): nothing acknowledged is ever missing from the log.

RLIMIT_FSIZE in a child process stands in for ENOSPC (SIGXFSZ ignored, so writes past the
limit fail with EFBIG): the log's segment is the only file at the limit (the database and WAL
stay small). Capture is asynchronous: commits go on while the log lags, their frames kept in the
WAL (no writer of ours restarts the WAL over frames the log lacks), up to `capture_lag_max` (5
here) committed transactions; from then on the primary refuses writes at the write lock with
SQLITE_FULL ("database or disk is full") before anything is written. When space returns, the
append pass catches up under the claimed LSNs: no gap, no new generation, and a replica built
from the log holds every row whose commit returned OK.
"""

from __future__ import annotations

import json

from helpers import apsw_conn, one, py_ok

# The children's common start: a primary on `path` with capture_lag_max LAG_MAX whose log
# segment is the only file that grows past `limit` (the database and WAL stay below it).
SETUP = r"""
import apsw, json, os, resource, signal, time
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
load()
path = %r
c = connect(path)
# The background check retries the append under the write lock now and then: a writer without
# a busy timeout could meet that as SQLITE_BUSY (retryable), like any lock holder.
c.execute("pragma busy_timeout=10000")
c.execute("pragma journal_mode=wal; create table t(id integer primary key, b blob)").fetchall()
one(c, "select repl_primary()")
one(c, "select repl_config('capture_lag_max', LAG_MAX)")
# Grow the log, not the database: insert then delete big rows.
for _ in range(3):
    c.execute("with recursive s(i) as (select 1 union all select i+1 from s where i < 100) "
              "insert into t(id, b) select i + 1000, randomblob(20000) from s")
    c.execute("delete from t where id >= 1000")
# Start with the log caught up and the WAL empty: a TRUNCATE checkpoint can meet SQLITE_BUSY
# (the background checkpoint assist reading the WAL), and one unappended setup transaction
# would count against capture_lag_max below (a loaded CI saw 4 commits pass instead of 5).
deadline = time.monotonic() + 30
while c.execute("pragma wal_checkpoint(truncate)").fetchall()[0][0] != 0:
    assert time.monotonic() < deadline, "the setup's TRUNCATE checkpoint stayed busy"
    time.sleep(0.02)
while json.loads(one(c, "select repl_status()"))["log"]["last_lsn"] < one(c, "select repl_lsn()"):
    assert time.monotonic() < deadline, "the log did not catch up with the setup"
    time.sleep(0.02)
seg_dir = path + "-replica/log"
seg = max((os.path.getsize(os.path.join(seg_dir, f)) for f in os.listdir(seg_dir)))
limit = seg + 2048
"""

CHILD = SETUP.replace("LAG_MAX", "5") + r"""
assert os.path.getsize(path) < limit
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
ok, full, other = [], 0, []
for i in range(1, 41):
    try:
        c.execute("insert into t(id, b) values(?, randomblob(100))", (i,))
        ok.append(i)
    except apsw.FullError:
        full += 1
    except apsw.Error as e:
        other.append(repr(e))
status_full = json.loads(one(c, "select repl_status()"))
# The restart hook: frames the log lacks must stay, so a TRUNCATE checkpoint reports busy and
# leaves the WAL as it is.
wal_before = os.path.getsize(path + "-wal")
try:
    ckpt_full = list(c.execute("pragma wal_checkpoint(truncate)").fetchall()[0])
except apsw.FullError:
    ckpt_full = "full"  # refused at the write lock already (the log is capture_lag_max behind)
wal_after = os.path.getsize(path + "-wal")
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
# Space is back: writes go through again (after the capture backoff, at most 5 s).
deadline = time.monotonic() + 30
while True:
    try:
        c.execute("insert into t(id, b) values(100, x'00')")
        ok.append(100)
        break
    except apsw.FullError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
st = json.loads(one(c, "select repl_status()"))
print(json.dumps({"ok": ok, "full": full, "other": other, "gen": st["generation"], "lsn": st["lsn"],
                  "ckpt_full": ckpt_full, "wal_kept": wal_after == wal_before and wal_after > 0,
                  "last_error_full": status_full.get("last_error"), "checksum": one(c, "select repl_checksum()")}))
"""


def test_disk_full_refuses_writes_and_loses_no_acknowledged_commit(tmp_path):
    db = tmp_path / "p.db"
    out = json.loads(py_ok(CHILD % str(db), timeout=120))
    assert out["other"] == [], out
    # The commits up to the lag bound returned OK (they are in the WAL); the rest were refused
    # before writing anything.
    assert out["full"] >= 30, out
    assert 5 <= len(out["ok"]) - 1 <= 10, out
    assert out["last_error_full"], out
    assert out["gen"] == 1, out  # no gap, no new generation
    # The WAL was not truncated: the checkpoint was refused (SQLITE_FULL at the write lock) or
    # reported busy by the restart hook.
    assert (out["ckpt_full"] == "full" or out["ckpt_full"][0] == 1) and out["wal_kept"], out
    # Every acknowledged row reached the log: a replica built from it has exactly those rows.
    r = apsw_conn(tmp_path / "r.db")
    one(r, "select repl_sync(?)", (str(db),))
    rows = [row[0] for row in r.execute("select id from t order by id")]
    assert rows == sorted(out["ok"]), (rows, out["ok"])
    assert one(r, "select repl_checksum()") == out["checksum"]


HOOK_CHILD = SETUP.replace("LAG_MAX", "1000") + r"""
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
for i in range(1, 11):
    c.execute("insert into t(id, b) values(?, randomblob(300))", (i,))
lag = one(c, "select repl_lsn()") - json.loads(one(c, "select repl_status()"))["log"]["last_lsn"]
wal_before = os.path.getsize(path + "-wal")
ckpt = list(c.execute("pragma wal_checkpoint(truncate)").fetchall()[0])
wal_after = os.path.getsize(path + "-wal")
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
deadline = time.monotonic() + 30
while json.loads(one(c, "select repl_status()"))["log"]["last_lsn"] < one(c, "select repl_lsn()"):
    assert time.monotonic() < deadline, "the log did not catch up"
    time.sleep(0.02)
ckpt_after = list(c.execute("pragma wal_checkpoint(truncate)").fetchall()[0])
st = json.loads(one(c, "select repl_status()"))
print(json.dumps({"lag": lag, "ckpt": ckpt, "wal_kept": wal_after == wal_before, "ckpt_after": ckpt_after,
                  "gen": st["generation"], "rows": one(c, "select count(*) from t")}))
"""


def test_restart_hook_keeps_frames_the_log_lacks(tmp_path):
    """Below the lag bound commits go on while the log cannot be written; a TRUNCATE checkpoint
    then reports busy (the shim's restart hook refuses READ1..4 while claimed transactions lack
    their records) and the WAL keeps its frames; when space returns the log catches up, the
    checkpoint goes through, and there is no new generation."""
    db = tmp_path / "h.db"
    out = json.loads(py_ok(HOOK_CHILD % str(db), timeout=120))
    assert out["lag"] >= 1, out  # claimed transactions were waiting for their append
    assert out["ckpt"][0] == 1 and out["wal_kept"], out
    assert out["ckpt_after"][0] == 0, out
    assert out["gen"] == 1 and out["rows"] == 10, out

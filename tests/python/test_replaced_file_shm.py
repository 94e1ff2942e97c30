"""A primary's agent handle on a database file that was replaced must never open the NEW
file's wal-index (src/vfs/agent.rs, `AgentHandle::moved`).

Found by SQLite's walfault.test in primary mode (`make sqlite-tests`): SIGBUS in SQLite's
`walIndexRecover`. A resumed primary opens its agent handle when the database is opened, and its
background thread opens the wal-index lazily. When the files were replaced in between (the
test's faultsim_restore copies a saved image over the database), the unix VFS, which finds the
wal-index by name but keeps one wal-index object per database inode, opened the new `-shm` a
second time for the old inode; seeing no other process hold it (POSIX locks of the same process
are invisible), it truncated the file to 3 bytes as a first opener does, under the live
connection that had mapped it.

Here the race is made deterministic: the `-shm` is a dangling symlink while the primary resumes,
so the background thread cannot open the wal-index until the files have been replaced; then a
connection that bypasses the shim (vfs=unix, so opening it does not detach the old role) uses
the new file while the old agent's background thread keeps polling.
"""

from __future__ import annotations

import json

from helpers import py_ok, run_py


def test_stale_agent_leaves_new_wal_index_alone(tmp, ext_path):
    db = str(tmp / "db.sqlite")
    # A primary with a log (meta.json), left by a process that is gone: the next open resumes it.
    py_ok(
        f"""
        c = connect({db!r})
        one(c, "SELECT repl_primary()")
        c.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
        c.close()
        """
    )
    proc = run_py(
        f"""
        import apsw
        db = {db!r}
        for suffix in ("-wal", "-shm"):
            if os.path.lexists(db + suffix):
                os.remove(db + suffix)
        # The old agent cannot open a wal-index until the files are replaced.
        os.symlink("/nonexistent/wal-index", db + "-shm")
        old = connect(db)  # resumes the primary: agent handle on this file; kept open
        time.sleep(0.1)    # its background thread has tried (and failed) to open the wal-index
        # Replace the database with another one, as a restore (or faultsim_restore) does.
        new = apsw.Connection(db + ".new", vfs="unix")
        one(new, "PRAGMA journal_mode=WAL")
        new.execute("CREATE TABLE u(y); "
                    "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 50) "
                    "INSERT INTO u SELECT randomblob(100) FROM s;")
        new.close()
        os.remove(db + "-shm")
        os.replace(db + ".new", db)
        live = apsw.Connection(db, vfs="unix")  # bypasses the shim: the old role stays
        n0 = one(live, "SELECT count(*) FROM u")
        size0 = os.path.getsize(db + "-shm")
        time.sleep(0.3)    # a dozen polls of the old primary's background thread
        size1 = os.path.getsize(db + "-shm")
        print(json.dumps({{"n0": n0, "size0": size0, "size1": size1}}), flush=True)
        # With the wal-index truncated under it, this write dies with SIGBUS.
        live.execute("INSERT INTO u SELECT randomblob(100) FROM u")
        print(json.dumps({{"n0": n0, "size0": size0, "size1": size1,
                          "n1": one(live, "SELECT count(*) FROM u"),
                          "ic": one(live, "PRAGMA integrity_check")}}))
        live.close()
        old.close()
        """
    )
    lines = proc.stdout.strip().splitlines()
    first = json.loads(lines[0]) if lines else None
    assert first and first["size1"] == first["size0"] >= 32768, (
        f"the new file's wal-index was truncated under its live connection: {first}; "
        f"child exit {proc.returncode}\n{proc.stderr}"
    )
    assert proc.returncode == 0, f"child exit {proc.returncode} (-7 = SIGBUS)\n{proc.stderr}"
    r = json.loads(lines[-1])
    assert (r["n0"], r["n1"], r["ic"]) == (50, 100, "ok"), r

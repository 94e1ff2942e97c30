"""Loading the extension again after `sqlite3_shutdown()` + `sqlite3_initialize()` restores it
(issue 18): the host re-registers its own VFSes with `unix` as the default and clears the
auto-extension list, so new connections had no `repl_*` functions and bypassed the VFS, and
loading again changed neither."""

from __future__ import annotations

import json

from helpers import py_ok


def test_load_after_shutdown_and_initialize_restores_vfs_and_functions(tmp):
    out = py_ok(
        f"""
        load()
        c = connect({str(tmp / 'p.db')!r})
        one(c, "SELECT repl_primary()")
        c.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        gen0 = json.loads(one(c, "SELECT repl_status()"))["generation"]
        c.close()
        apsw.shutdown()
        apsw.initialize()
        before = apsw.vfs_names()[0]
        # Load again, the documented recipe: a throw-away connection first.
        boot = apsw.Connection(":memory:")
        boot.enable_load_extension(True)
        boot.load_extension(EXT)
        boot.close()
        after = apsw.vfs_names()[0]
        c = apsw.Connection({str(tmp / 'p.db')!r})
        c.execute("INSERT INTO t VALUES (2)")
        st = json.loads(one(c, "SELECT repl_status()"))
        print(json.dumps({{"before": before, "after": after, "role": st["role"], "lsn": st["lsn"],
                          "gaps": st["gaps"], "same_generation": st["generation"] == gen0}}))
        """
    )
    r = json.loads(out.strip().splitlines()[-1])
    assert r["before"] == "unix", r  # what the host does on its own
    assert r["after"] == "replica", r
    assert r["role"] == "primary" and r["lsn"] == 3 and r["gaps"] == 0 and r["same_generation"], r


def test_last_close_closes_the_files_while_a_background_thread_holds_the_primary(tmp):
    """The last close ends the role in the closing thread: no file of the database stays open
    afterwards, even while the append worker still holds its reference to the primary (held
    here for 3 s by a test delay). Before, the agent handle closed with the last reference, in
    that worker: after an application's `sqlite3_shutdown()` it closed a file through the
    torn-down unix VFS and hung on its mutex (the CI met this as a 60 s timeout)."""
    db = str(tmp / "p.db")
    out = py_ok(
        f"""
        import os, time
        load()
        db = {db!r}
        c = connect(db)
        one(c, "SELECT repl_primary()")
        c.execute("CREATE TABLE t(x)")

        from helpers import thread_in_test_delay

        def open_files():
            names = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    names.append(os.readlink(f"/proc/self/fd/{{fd}}"))
                except OSError:
                    pass
            return sorted(n for n in names if n in (db, db + "-wal", db + "-shm"))

        c.execute("INSERT INTO t VALUES (1)")
        deadline = time.monotonic() + 10
        while not thread_in_test_delay("repl-append"):
            assert time.monotonic() < deadline, "the append worker never reached its test delay"
            time.sleep(0.005)
        held_before = open_files()
        c.close()
        held_after = open_files()
        worker_still_delayed = thread_in_test_delay("repl-append")
        apsw.shutdown()
        apsw.initialize()
        boot = apsw.Connection(":memory:")
        boot.enable_load_extension(True)
        boot.load_extension(EXT)
        boot.close()
        c = apsw.Connection(db)
        c.execute("INSERT INTO t VALUES (2)")
        st = json.loads(one(c, "SELECT repl_status()"))
        rows = one(c, "SELECT count(*) FROM t")
        c.close()
        print(json.dumps({{"held_before": held_before, "held_after": held_after,
                          "worker_still_delayed": worker_still_delayed, "lsn": st["lsn"],
                          "gaps": st["gaps"], "rows": rows}}))
        """,
        env={"REPL_FAULT_DELAY_AT": "append-worker-holds:3000"},
    )
    r = json.loads(out.strip().splitlines()[-1])
    assert db in r["held_before"], r  # the check sees the files while they are open
    assert r["worker_still_delayed"], r  # the close happened inside the worker's delay
    assert r["held_after"] == [], r
    assert r["lsn"] == 3 and r["gaps"] == 0 and r["rows"] == 2, r

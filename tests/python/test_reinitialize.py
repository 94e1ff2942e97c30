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

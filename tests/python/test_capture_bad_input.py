"""Bad input on the primary side gets a clear error and changes nothing (docs/ARCHITECTURE.md,
Guarantees, 6):

- ``repl_primary()`` on ``:memory:``, on a temporary database (``''``), on a database opened
  before the extension was loaded, on a read-only connection: an error that says what to do,
  and no ``-replica`` directory (nor WAL switch) appears;
- a flipped byte inside a record of a log segment: ``sqlite-replica verify`` (and ``rebuild``)
  fail naming the segment file; the primary process that owns the log does not panic.
"""

from __future__ import annotations

import json
import os
import struct

import apsw
import pytest

from capture_check import log_dir, run_cli
from helpers import apsw_conn, one, py_ok, spawn_py, sqlite3_cli, wait_for


def test_memory_and_temp_databases_are_refused_and_nothing_is_created(tmp):
    out = py_ok(
        f"""
        os.chdir({str(tmp)!r})
        load()
        res = {{}}
        for name in (":memory:", ""):
            c = apsw.Connection(name)
            c.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
            try:
                res[name] = ["ok", one(c, "SELECT repl_primary()")]
            except apsw.Error as e:
                res[name] = ["error", str(e), one(c, "SELECT repl_role()")]
        print(json.dumps({{"res": res, "files": sorted(os.listdir("."))}}))
        """
    )
    got = json.loads(out)
    for name in (":memory:", ""):
        kind, msg, *rest = got["res"][name]
        assert kind == "error", f"repl_primary() accepted {name!r}"
        assert "memory" in msg.lower() or "temp" in msg.lower(), msg
        assert "file" in msg.lower(), f"the message should say to open a file: {msg}"
        assert rest == [None]
    assert got["files"] == [], f"files were created: {got['files']}"


def test_database_opened_before_load_is_refused_and_nothing_is_created(tmp):
    db = tmp / "early.db"
    out = py_ok(
        f"""
        early = apsw.Connection({str(db)!r})  # opened BEFORE the extension is loaded
        early.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        early.enable_load_extension(True)
        early.load_extension(EXT)
        try:
            r = ["ok", one(early, "SELECT repl_primary()")]
        except apsw.Error as e:
            r = ["error", str(e)]
        r.append(one(early, "PRAGMA journal_mode"))
        r.append(sorted(os.listdir({str(tmp)!r})))
        print(json.dumps(r))
        """
    )
    kind, msg, mode, files = json.loads(out)
    assert kind == "error", "repl_primary() accepted a database opened before the load"
    assert "with a new connection" in msg and "vfs=replica" not in msg, msg
    assert mode == "delete"
    assert files == ["early.db"], files
    # The same through the shell, which opens the file named on its command line first.
    proc = sqlite3_cli(db, "SELECT repl_primary();", open_before_load=True)
    assert proc.returncode != 0 and "with a new connection" in proc.stderr and "vfs=replica" not in proc.stderr, proc
    assert sorted(os.listdir(tmp)) == ["early.db"]


def test_read_only_connections_are_refused_and_nothing_is_created(tmp):
    db = tmp / "ro.db"
    setup = apsw_conn(db)
    setup.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    setup.close()
    before = sorted(os.listdir(tmp))
    attempts = {
        "SQLITE_OPEN_READONLY": lambda: apsw_conn(db, flags=apsw.SQLITE_OPEN_READONLY),
        "mode=ro": lambda: apsw_conn(f"file:{db}?mode=ro"),
    }
    for what, opener in attempts.items():
        ro = opener()
        with pytest.raises(apsw.Error) as err:
            one(ro, "SELECT repl_primary()")
        assert "read-only" in str(err.value).lower() or "readonly" in str(err.value).lower(), (what, str(err.value))
        assert one(ro, "SELECT repl_role()") is None
        ro.close()
    proc = sqlite3_cli(None, f".open --readonly '{db}'\nSELECT repl_primary();")
    assert proc.returncode != 0 and "read" in proc.stderr.lower(), proc
    assert sorted(os.listdir(tmp)) == before, "a refused repl_primary() created files"
    assert not log_dir(db).exists()
    rw = apsw_conn(db)
    assert one(rw, "PRAGMA journal_mode") == "delete"
    assert one(rw, "SELECT repl_role()") is None


# ----------------------------------------------------------------------- corrupt log segment

PRIMARY = """
c = connect(json.loads(sys.stdin.readline())["db"])
c.setbusytimeout(5000)
for line in sys.stdin:
    cmd = line.strip()
    try:
        if cmd == "init":
            one(c, "SELECT repl_primary()")
            c.execute("CREATE TABLE t(x)")
            for i in range(6):
                c.execute("INSERT INTO t VALUES (randomblob(1500))")
        elif cmd == "write":
            for i in range(3):
                c.execute("INSERT INTO t VALUES (?)", (i,))
        elif cmd == "exit":
            c.close()
            print(json.dumps({"closed": True}), flush=True)
            break
        print(json.dumps({"ok": cmd, "lsn": one(c, "SELECT repl_lsn()"), "count": one(c, "SELECT count(*) FROM t"),
                          "status": json.loads(one(c, "SELECT repl_status()"))}), flush=True)
    except apsw.Error as e:
        print(json.dumps({"error": str(e), "cmd": cmd}), flush=True)
"""


def records_of(seg: bytes) -> list[tuple[int, int, int]]:
    """(offset, length, lsn) of each record in a segment file (FORMAT.md §3.1, §4)."""
    out, off = [], 32
    while off + 88 <= len(seg):
        assert seg[off:off + 4] == b"RPLR"
        length, lsn = struct.unpack(">QQ", seg[off + 8:off + 24])
        out.append((off, length, lsn))
        off += length
    return out


def ask(p, cmd: str) -> dict:
    p.stdin.write(cmd + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    assert line, f"primary process died on {cmd!r}: rc={p.wait()} stderr:\n{p.stderr.read()}"
    return json.loads(line)


def test_corrupt_segment_is_reported_and_the_primary_does_not_panic(tmp):
    db = tmp / "c.db"
    p = spawn_py(PRIMARY)
    try:
        p.stdin.write(json.dumps({"db": str(db)}) + "\n")
        r = ask(p, "init")
        assert "error" not in r, r
        lsn = r["lsn"]
        assert lsn == 7
        wait_for(lambda: ask(p, "status")["status"]["log"]["durable_lsn"] == lsn, timeout=10, what="durable")

        segs = sorted((log_dir(db) / "log").glob("*.seg"))
        assert len(segs) == 1
        seg = segs[0]
        data = bytearray(seg.read_bytes())
        recs = records_of(bytes(data))
        assert [r[2] for r in recs] == list(range(1, lsn + 1))
        off, length, rec_lsn = recs[3]  # LSN 4, in the middle of the segment
        victim = off + length // 2  # inside a page image
        data[victim] ^= 0x5A
        with open(seg, "r+b") as f:
            f.seek(victim)
            f.write(bytes([data[victim]]))

        proc = run_cli("verify", log_dir(db))
        assert proc.returncode != 0, f"verify accepted a corrupt segment:\n{proc.stdout}"
        assert seg.name in proc.stderr, f"verify's error does not name the segment: {proc.stderr!r}"
        assert "panic" not in proc.stderr.lower()
        out_db = tmp / "out.db"
        proc = run_cli("rebuild", log_dir(db), out_db)
        assert proc.returncode != 0, f"rebuild accepted a corrupt segment:\n{proc.stdout}"
        assert seg.name in proc.stderr, proc.stderr
        assert not out_db.exists(), "rebuild left an output file behind"

        # The primary keeps working: its commits succeed and capture goes on or reports an error.
        r = ask(p, "write")
        assert "error" not in r, r
        assert r["count"] == 9
        r = ask(p, "exit")
        assert r == {"closed": True}
        rc = p.wait(timeout=30)
        err = p.stderr.read()
        assert rc == 0, f"primary process exited with {rc}:\n{err}"
        assert "panic" not in err.lower(), err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()

    # A new process resuming this primary reads the damaged log: no panic, the user's commit
    # still succeeds, and the damage is reported (last_error) rather than ignored.
    p = spawn_py(PRIMARY)
    try:
        p.stdin.write(json.dumps({"db": str(db)}) + "\n")
        r = ask(p, "write")
        assert "error" not in r, r
        assert r["count"] == 12
        assert r["status"]["role"] == "primary"
        ask(p, "exit")
        rc = p.wait(timeout=30)
        err = p.stderr.read()
        assert rc == 0, f"resumed primary exited with {rc}:\n{err}"
        assert "panic" not in err.lower(), err
        assert r["status"]["last_error"], f"the damaged log went unreported: {r['status']}\nstderr:\n{err}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()

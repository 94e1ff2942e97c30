"""Load order cannot silently bypass capture (issue 11 item 4), and a second SQLite library in
the same process is refused instead of crashing it (item 5).

* Loading the extension on a connection whose main database is already a primary or a replica,
  but was opened before the load (Python stdlib, better-sqlite3, `sqlite3 -cmd .load app.db`,
  Go's ConnectHook), fails with a message that says what to do; the next connection goes
  through the VFS, and the primary never sees a foreign writer (no gap, no new generation).
* A database with no role yet, opened before the load: the load works, and `repl_primary()`
  gives the general recipe (load first, then open with a new connection), not `?vfs=replica`.
* The extension loaded into apsw's SQLite and then into the system library (or the other way
  round) in one process: the second load is refused with both versions named, no crash, and
  the first library's connections keep replicating.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, SQLITE3_CLI, Worker, py_ok, require_extension, worker_status

DEBIAN_PY = "/usr/bin/python3"
REFUSED = "opened it before the extension was loaded"


def make_primary(tmp):
    p = Worker(tmp / "p.db")
    p.one("SELECT repl_primary()")
    p.script(["CREATE TABLE t(x)", "INSERT INTO t VALUES (1)"])
    st = worker_status(p)
    p.close()
    return st


def status_of(db):
    w = Worker(db)
    try:
        return worker_status(w)
    finally:
        w.close()


def test_cli_load_after_open_of_a_primary_is_refused(tmp):
    before = make_primary(tmp)
    db = tmp / "p.db"
    proc = subprocess.run(
        [SQLITE3_CLI, "-bail", str(db)],
        input=f".load {require_extension()}\nINSERT INTO t VALUES (2);\n",
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and REFUSED in proc.stderr, proc
    assert "open" in proc.stderr and "new connection" in proc.stderr, proc.stderr
    after = status_of(db)
    assert after["generation"] == before["generation"] and after["gaps"] == before["gaps"] == 0
    assert after["lsn"] == before["lsn"]  # the refused shell wrote nothing


def test_stdlib_load_on_the_open_connection_fails_loudly_then_a_new_connection_works(tmp):
    if not os.access(DEBIAN_PY, os.X_OK):
        pytest.fail(f"{DEBIAN_PY} is missing: make deps installs python3")
    before = make_primary(tmp)
    db = tmp / "p.db"
    code = textwrap.dedent(
        f"""
        import json, sqlite3
        ext, db = {require_extension()!r}, {str(db)!r}
        naive = sqlite3.connect(db)
        naive.enable_load_extension(True)
        try:
            naive.load_extension(ext)
            refused = None
        except sqlite3.OperationalError as e:
            refused = str(e)
        # A pool drops the connection whose setup failed. It was the last one on the file in
        # this process: closing it must not checkpoint and delete the WAL behind capture's back.
        naive.close()
        # The VFS is registered now: a new connection goes through it and captures.
        good = sqlite3.connect(db, isolation_level=None)
        good.execute("INSERT INTO t VALUES (2)")
        lsn = good.execute("SELECT repl_lsn()").fetchone()[0]
        st = json.loads(good.execute("SELECT repl_status()").fetchone()[0])
        print(json.dumps({{"refused": refused, "lsn": lsn, "generation": st["generation"], "gaps": st["gaps"]}}))
        """
    )
    proc = subprocess.run([DEBIAN_PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["refused"] and REFUSED in out["refused"], out
    assert out["lsn"] == before["lsn"] + 1
    assert out["generation"] == before["generation"] and out["gaps"] == 0


def test_cli_refused_load_then_open_keeps_the_generation(tmp):
    """The shell's refused connection is replaced by `.open`: the WAL must survive its close."""
    before = make_primary(tmp)
    db = tmp / "p.db"
    proc = subprocess.run(
        [SQLITE3_CLI, str(db)],
        input=f".load {require_extension()}\n.open {db}\nINSERT INTO t VALUES (3);\nSELECT repl_lsn();\n",
        capture_output=True, text=True, timeout=60,
    )
    assert REFUSED in proc.stderr, proc
    assert proc.stdout.strip().splitlines()[-1] == str(before["lsn"] + 1), proc
    after = status_of(db)
    assert after["generation"] == before["generation"] and after["gaps"] == 0, after


def test_a_replica_opened_before_the_load_is_refused_too(tmp):
    make_primary(tmp)
    r = Worker(tmp / "r.db")
    r.one("SELECT repl_sync(?)", [str(tmp / "p.db")])
    r.close()
    proc = subprocess.run(
        [SQLITE3_CLI, "-bail", str(tmp / "r.db")],
        input=f".load {require_extension()}\nSELECT count(*) FROM t;\n",
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and REFUSED in proc.stderr and "is a replica" in proc.stderr, proc


def test_a_database_without_role_opened_before_the_load_gets_the_recipe(tmp):
    proc = subprocess.run(
        [SQLITE3_CLI, "-bail", str(tmp / "new.db")],
        input=f".load {require_extension()}\nSELECT repl_primary();\n",
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0, proc
    msg = proc.stderr
    assert "it was opened before sqlite-replica was loaded" in msg, msg
    assert "':memory:'" in msg and "with a new connection" in msg, msg
    assert "vfs=replica" not in msg, msg
    assert sorted(os.listdir(tmp)) == ["new.db"]


# ---------------------------------------------------------------- two SQLite libraries

CTYPES_SQLITE = r'''
import ctypes, ctypes.util
sys_lib = ctypes.CDLL("libsqlite3.so.0")
sys_lib.sqlite3_libversion.restype = ctypes.c_char_p
sys_lib.sqlite3_column_text.restype = ctypes.c_char_p
sys_lib.sqlite3_errmsg.restype = ctypes.c_char_p

def sys_open(path):
    db = ctypes.c_void_p()
    rc = sys_lib.sqlite3_open_v2(path.encode(), ctypes.byref(db), 0x2 | 0x4 | 0x40, None)
    assert rc == 0, rc
    return db

def sys_load(db, ext):
    sys_lib.sqlite3_enable_load_extension(db, 1)
    err = ctypes.c_char_p()
    rc = sys_lib.sqlite3_load_extension(db, ext.encode(), None, ctypes.byref(err))
    return rc, (err.value or b"").decode()

def sys_one(db, sql):
    stmt = ctypes.c_void_p()
    rc = sys_lib.sqlite3_prepare_v2(db, sql.encode(), -1, ctypes.byref(stmt), None)
    if rc != 0:
        raise RuntimeError(sys_lib.sqlite3_errmsg(db).decode())
    try:
        rc = sys_lib.sqlite3_step(stmt)
        if rc == 100:
            v = sys_lib.sqlite3_column_text(stmt, 0)
            return None if v is None else v.decode()
        if rc != 101:
            raise RuntimeError(sys_lib.sqlite3_errmsg(db).decode())
        return None
    finally:
        sys_lib.sqlite3_finalize(stmt)
'''


def run_two_libraries(tmp, body: str) -> dict:
    code = CTYPES_SQLITE + "import apsw, json\next = " + repr(require_extension()) + "\ntmp = " + repr(str(tmp)) + "\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, f"the process crashed or failed (exit {proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_sqlite_library_is_refused_and_the_first_keeps_replicating(tmp):
    out = run_two_libraries(tmp, """
        boot = apsw.Connection(":memory:"); boot.enable_load_extension(True); boot.load_extension(ext)
        p = apsw.Connection(tmp + "/p.db")
        p.execute("SELECT repl_primary()").fetchall()
        p.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        sdb = sys_open(":memory:")
        rc, err = sys_load(sdb, ext)
        # The first library still works: a commit is captured, a replica follows it.
        p.execute("INSERT INTO t VALUES (2)")
        lsn = p.execute("SELECT repl_lsn()").fetchone()[0]
        r = apsw.Connection(tmp + "/r.db")
        import time
        deadline = time.monotonic() + 30
        while (got := r.execute("SELECT repl_sync(?)", (tmp + "/p.db",)).fetchone()[0]) < lsn:
            # Only durable records are served (group fsync): poll with a deadline.
            assert time.monotonic() < deadline, (got, lsn)
            time.sleep(0.01)
        same = r.execute("SELECT repl_checksum()").fetchone()[0] == p.execute("SELECT repl_checksum()").fetchone()[0]
        fn = sys_one(sdb, "SELECT count(*) FROM pragma_function_list WHERE name = 'repl_lsn'")
        print(json.dumps({"rc": rc, "err": err, "lsn": lsn, "got": got, "same": same, "fn": fn,
                          "apsw": apsw.sqlite_lib_version(), "sys": sys_lib.sqlite3_libversion().decode()}))
    """)
    assert out["rc"] != 0, out
    assert "already loaded by another SQLite library" in out["err"], out
    assert out["apsw"] in out["err"] and out["sys"] in out["err"], out
    assert out["got"] == out["lsn"] and out["same"], out
    assert out["fn"] == "0"  # nothing was registered in the second library


def test_second_library_refused_in_the_other_order(tmp):
    out = run_two_libraries(tmp, """
        sdb = sys_open(":memory:")
        rc, err = sys_load(sdb, ext)
        assert rc == 0, err
        pdb = sys_open(tmp + "/p.db")
        sys_one(pdb, "SELECT repl_primary()")
        sys_one(pdb, "CREATE TABLE t(x)")
        boot = apsw.Connection(":memory:"); boot.enable_load_extension(True)
        try:
            boot.load_extension(ext)
            refused = None
        except apsw.Error as e:
            refused = str(e)
        sys_one(pdb, "INSERT INTO t VALUES (1)")
        lsn = sys_one(pdb, "SELECT repl_lsn()")
        print(json.dumps({"refused": refused, "lsn": lsn}))
    """)
    assert out["refused"] and "already loaded by another SQLite library" in out["refused"], out
    assert out["lsn"] == "2", out


def test_a_vfs_stacked_on_replica_gets_its_own_message_and_is_captured(tmp):
    """A connection through a VFS stacked on top of `replica` (here an apsw VFS whose base is
    `replica`): repl_primary() names the stacked VFS and what to do instead of claiming the
    database was opened before the load; once a direct connection made it a primary, commits
    through the stacked VFS are captured."""
    out = py_ok(r"""
import json
load()
import apsw
class Stacked(apsw.VFS):
    def __init__(self):
        super().__init__("stacked", base="replica")
vfs = Stacked()
path = %r
s = apsw.Connection(path, vfs="stacked")
s.execute("pragma journal_mode=wal; create table t(x)").fetchall()
try:
    s.execute("select repl_primary()").fetchall()
    msg = None
except apsw.SQLError as e:
    msg = str(e)
direct = connect(path)
one(direct, "select repl_primary()")
before = one(direct, "select repl_lsn()")
s.execute("insert into t values(1)")
after = one(direct, "select repl_lsn()")
gen = json.loads(one(direct, "select repl_status()"))["generation"]
print(json.dumps({"msg": msg, "before": before, "after": after, "gen": gen}))
""" % str(tmp / "stacked.db"))
    r = json.loads(out)
    assert r["msg"] and "'stacked', stacked on top of 'replica'" in r["msg"], r
    assert "opened before" not in r["msg"], r
    assert r["after"] == r["before"] + 1 and r["gen"] == 1, r

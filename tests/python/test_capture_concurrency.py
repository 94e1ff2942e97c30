"""LSN density under concurrent writers (WAL.md §D.3, §D.7 "several primary processes and
threads"): two writer processes with the extension plus a writer thread in this process commit
interleaved transactions on one primary; every commit gets exactly one LSN, the log is dense
1..N, and the rebuild equals the primary.
"""

from __future__ import annotations

import json
import threading
import time

from capture_check import assert_dense, assert_rebuild_equals, inspect, status, verify_ok
from helpers import apsw_conn, one, spawn_py, wait_for

PER_WRITER = 100

CHILD = """
import random
cfg = json.loads(sys.stdin.readline())
c = connect(cfg["db"])
deadline = time.monotonic() + 30
# Retry busy locks quickly (instead of SQLite's growing back-off) so the writers interleave.
c.setbusyhandler(lambda n: time.monotonic() < deadline and (time.sleep(0.0002) or True))
assert one(c, "SELECT repl_role()") == "primary"
print("ready", flush=True)
sys.stdin.readline()  # go
rng = random.Random(cfg["seed"])
done = 0
lsns = []
for i in range(cfg["n"]):
    if i % 10 == 3:
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO t(w, i, v) VALUES (?, ?, randomblob(?))", (cfg["name"], i, rng.randrange(10, 3000)))
        c.execute("UPDATE t SET v = randomblob(50) WHERE w = ? AND i = ?", (cfg["name"], i - 1))
        c.execute("COMMIT")
    elif i % 10 == 7:
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO t(w, i, v) VALUES (?, ?, 'rolled back')", (cfg["name"], -i))
        c.execute("ROLLBACK")
        c.execute("INSERT INTO t(w, i, v) VALUES (?, ?, randomblob(?))", (cfg["name"], i, rng.randrange(10, 3000)))
    else:
        c.execute("INSERT INTO t(w, i, v) VALUES (?, ?, randomblob(?))", (cfg["name"], i, rng.randrange(10, 3000)))
    done += 1
    lsns.append(one(c, "SELECT repl_lsn()"))
print(json.dumps({"done": done, "lsns": lsns}), flush=True)
"""


def test_two_processes_and_a_thread_get_dense_lsns(tmp):
    db = tmp / "mp.db"
    conn = apsw_conn(db)
    conn.setbusytimeout(20000)
    base = one(conn, "SELECT repl_primary()")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, w TEXT, i INT, v BLOB)")
    conn.execute("PRAGMA wal_autocheckpoint=50")  # restarts happen during the run too
    setup_lsn = one(conn, "SELECT repl_lsn()")
    assert setup_lsn == base + 1

    children = []
    for k, name in enumerate(("p1", "p2")):
        p = spawn_py(CHILD)
        p.stdin.write(json.dumps({"db": str(db), "name": name, "n": PER_WRITER, "seed": k}) + "\n")
        p.stdin.flush()
        children.append(p)
    try:
        for p in children:
            line = p.stdout.readline()
            assert line.strip() == "ready", f"child did not start: {line!r} {p.stderr.read() if p.poll() is not None else ''}"

        thread_result: dict = {}

        def writer() -> None:
            c = apsw_conn(db)
            deadline = time.monotonic() + 30
            c.setbusyhandler(lambda n: time.monotonic() < deadline and (time.sleep(0.0002) or True))
            c.execute("PRAGMA wal_autocheckpoint=50")
            lsns = []
            try:
                for i in range(PER_WRITER):
                    if i % 10 == 5:
                        c.execute("BEGIN IMMEDIATE")
                        c.execute("INSERT INTO t(w, i, v) VALUES ('thread', ?, randomblob(2000))", (i,))
                        c.execute("DELETE FROM t WHERE w = 'thread' AND i = ?", (i - 2,))
                        c.execute("COMMIT")
                    else:
                        c.execute("INSERT INTO t(w, i, v) VALUES ('thread', ?, randomblob(?))", (i, 100 + i))
                    lsns.append(one(c, "SELECT repl_lsn()"))
                thread_result["done"] = len(lsns)
                thread_result["lsns"] = lsns
            except BaseException as e:  # reported below
                thread_result["error"] = repr(e)
            finally:
                c.close()

        t = threading.Thread(target=writer)
        for p in children:
            p.stdin.write("go\n")
            p.stdin.flush()
        t.start()
        results = []
        for p in children:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, f"writer process failed ({p.returncode}):\n{err}"
            assert "panic" not in err, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        t.join(timeout=60)
        assert not t.is_alive()
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "error" not in thread_result, thread_result
    commits = sum(r["done"] for r in results) + thread_result["done"]
    # The writers really interleaved (otherwise this tests little): count writer switches in
    # LSN order.
    owner = {lsn: w for w, r in enumerate(results + [thread_result]) for lsn in r["lsns"]}
    order = [owner[k] for k in sorted(owner)]
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches >= 5, f"the writers hardly interleaved ({switches} switches): {order}"
    assert commits == 3 * PER_WRITER

    # Each writer saw its own LSNs strictly increase (read-your-writes tokens are ordered).
    for lsns in [r["lsns"] for r in results] + [thread_result["lsns"]]:
        assert all(a < b for a, b in zip(lsns, lsns[1:])), lsns

    final = one(conn, "SELECT repl_lsn()")
    assert final == setup_lsn + commits, f"repl_lsn() {final} != {setup_lsn} setup + {commits} commits"
    st = status(conn)
    assert st["gaps"] == 0 and st["generation"] == 1 and st["last_error"] is None, st
    records = inspect(db)
    assert_dense(records)
    assert len(records) == final
    assert all(r.kind == "txn" for r in records)
    verify_ok(db)
    assert one(conn, "SELECT count(*) FROM t") == 3 * PER_WRITER - PER_WRITER // 10
    wait_for(lambda: status(conn)["log"]["durable_lsn"] == final, timeout=10, what="durable_lsn == final LSN")
    assert_rebuild_equals(db, tmp / "out.db", conn)

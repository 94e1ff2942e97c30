"""Bounded replica WAL (issue 3 item 4, WAL.md §E.6, §G17). The applier checkpoints through
its own connection and, past ``REPL_DRAIN_FRAMES``, drains: waits (at most
``REPL_DRAIN_TIMEOUT_MS``) until every frame is backfilled and no reader holds a read-mark, so
its next batch restarts the WAL.

* under the §G16 stress shape (4 reader processes with short reads and long snapshots, a stock
  checkpointer every 30 ms, an applier looping over ≥ 400 multi-page transactions) the WAL
  stays under the threshold plus one batch, drains happen, their added lag is measured
  (``max_drain_ms``), and no reader sees an inconsistent state or an error;
* a reader holding a snapshot longer than the drain timeout: the applier gives up waiting,
  keeps applying, reports the pinned WAL in ``repl_status()`` (naming the read-mark) and logs
  ``event=wal_pinned`` once; once the reader ends, the next sync drains and the WAL restarts.
"""

from __future__ import annotations

import json

from helpers import (
    CliWorker, Worker, assert_replica_equals_primary, bg_result, lsn_checksum, spawn_bg, start_primary, start_replica,
    stock_one, sync_to, worker_status,
)

N_ROWS = 20
PAGE = 4096
READ_SQL = "SELECT count(*), min(ver), max(ver), sum(length(pad)) FROM t"

PRIMARY = """
conn = connect(os.environ["P_DB"])
conn.setbusytimeout(10000)
for v in range(1, int(os.environ["TXNS"]) + 1):
    # Every row gets the new version: a committed state has min(ver) == max(ver).
    conn.execute("UPDATE t SET ver = ?, pad = randomblob(1500)", (v,))
conn.close()
print(json.dumps({"txns": int(os.environ["TXNS"])}))
"""

APPLIER = """
conn = connect(os.environ["R_DB"])
conn.setbusytimeout(5000)
target, stop = int(os.environ["TARGET"]), os.environ["STOP"]
max_frames = max_batch = syncs = 0
errors = []
while True:
    try:
        lsn = one(conn, "SELECT repl_sync()")
        syncs += 1
        st = json.loads(one(conn, "SELECT repl_status()"))
        max_frames = max(max_frames, st["wal"]["mx_frame"] if st["wal"] else 0)
        if st["last_batch"]:
            max_batch = max(max_batch, st["last_batch"]["pages"])
        if lsn >= target:
            break
    except apsw.Error as e:
        errors.append(f"{type(e).__name__}: {e}")
    if os.path.exists(stop):
        break
print(json.dumps({"syncs": syncs, "max_frames": max_frames, "max_batch": max_batch, "errors": errors[:5],
                  "wal_bytes": os.path.getsize(os.environ["R_DB"] + "-wal"),
                  "status": json.loads(one(conn, "SELECT repl_status()"))}))
"""

# A stock reader: short reads and read transactions well under the drain timeout. Every
# primary transaction gives every row the new version: a committed state has min == max.
READER = """
import random, workload
n = int(os.environ["N_ROWS"])
class Check:
    last_v = -1
    def __call__(self, row):
        c, lo, hi, _ = row
        bad = None if c == n and lo == hi and lo >= self.last_v else [list(row), self.last_v]
        self.last_v = max(self.last_v, lo)
        return bad
print(json.dumps(workload.read_loop(os.environ["R_DB"], os.environ["STOP"], os.environ["READ_SQL"], Check(),
                                    rng=random.Random(int(os.environ["SEED"])), long_share=0.3, long_secs=(0.02, 0.3))))
"""

CHECKPOINTER = """
conn = apsw.Connection(os.environ["R_DB"], vfs="unix")
conn.setbusytimeout(50)
stop, n, errors = os.environ["STOP"], 0, []
while not os.path.exists(stop):
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        n += 1
    except apsw.BusyError:
        pass
    except apsw.Error as e:
        errors.append(f"{type(e).__name__}: {e}")
    time.sleep(0.03)  # pacing: every 30 ms (WAL.md §G16), not synchronisation
print(json.dumps({"checkpoints": n, "errors": errors[:5]}))
"""


def versioned_primary(pdb):
    p = start_primary(pdb)
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, ver INTEGER NOT NULL, pad BLOB)")
    p.q(
        f"WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {N_ROWS}) "
        "INSERT INTO t SELECT n, 0, randomblob(1500) FROM c"
    )
    return p


def test_wal_stays_bounded_under_readers_and_checkpoints(tmp):
    pdb, rdb, stop = tmp / "p.db", tmp / "r.db", tmp / "STOP"
    threshold = 200
    with versioned_primary(pdb) as p:
        start_replica(rdb, pdb).close()
        txns = 1500
        target = p.one("SELECT repl_lsn()") + txns
        env = {"P_DB": str(pdb), "R_DB": str(rdb), "STOP": str(stop), "N_ROWS": str(N_ROWS), "READ_SQL": READ_SQL,
               "TXNS": str(txns), "TARGET": str(target), "REPL_DRAIN_FRAMES": str(threshold)}
        readers = [spawn_bg(READER, tmp, f"reader{i}", {**env, "SEED": str(70 + i)}) for i in range(4)]
        ckpt = spawn_bg(CHECKPOINTER, tmp, "checkpointer", env)
        applier = spawn_bg(APPLIER, tmp, "applier", env)
        primary = spawn_bg(PRIMARY, tmp, "primary", env)
        try:
            prim = bg_result(primary, timeout=120)
            app = bg_result(applier, timeout=120)
        finally:
            stop.touch()
        rds = [bg_result(r, timeout=30) for r in readers]
        ck = bg_result(ckpt, timeout=30)
        st = app["status"]
        summary = {"app": {k: v for k, v in app.items() if k != "status"}, "drains": st["drains"],
                   "max_drain_ms": st["max_drain_ms"], "readers": [(r["reads"], r["long_txns"]) for r in rds], "ckpt": ck}
        print("G17", json.dumps(summary))
        assert prim["txns"] == txns and not app["errors"], summary
        for i, r in enumerate(rds):
            assert r["n_violations"] == 0 and not r["errors"], f"reader{i}: {r}"
            assert r["reads"] > 20 and r["long_txns"] > 0, f"reader{i} hardly read: {r}"
        assert not ck["errors"], ck
        # Bounded: the applier stops appending past the threshold until the WAL restarts, so
        # the WAL never holds more than the threshold plus one batch.
        assert st["drains"] >= 1, summary
        assert app["max_frames"] <= threshold + app["max_batch"], summary
        assert app["wal_bytes"] <= 32 + (threshold + app["max_batch"]) * (PAGE + 24), summary
        # No reader held a snapshot past the timeout, so every drain succeeded in time.
        assert st["wal_pinned"] is None and st["max_drain_ms"] < 2000, summary
        want = lsn_checksum(p)
        with Worker(rdb) as r:
            assert lsn_checksum(r) == want
        assert_replica_equals_primary(rdb, p)


def test_a_reader_pinning_the_wal_past_the_timeout_is_reported_and_the_applier_goes_on(tmp):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    env = {"REPL_DRAIN_FRAMES": "60", "REPL_DRAIN_TIMEOUT_MS": "300"}
    with versioned_primary(pdb) as p, start_replica(rdb, pdb, env=env) as r:
        reader = CliWorker(rdb)  # stock sqlite3 shell
        try:
            reader.q("BEGIN;")
            before = reader.q(READ_SQL + ";")
            # Push the replica's WAL past the threshold while the reader holds its snapshot.
            for v in range(1, 40):
                p.q("UPDATE t SET ver = ?, pad = randomblob(1500)", [v])
                sync_to(r, p.one("SELECT repl_lsn()"))
            st = worker_status(r)
            assert st["wal"]["mx_frame"] > 60, st
            pinned = st["wal_pinned"]
            assert pinned and "read-mark" in pinned and "REPL_DRAIN_TIMEOUT_MS" in pinned, st
            # The applier went on: the replica is at the primary's LSN, equal checksums.
            assert lsn_checksum(r) == lsn_checksum(p)
            assert r.stderr().count("event=wal_pinned") == 1, "the pinned WAL must be logged once, not per sync"
            # The reader's view never changed.
            assert reader.q(READ_SQL + ";") == before
            reader.q("COMMIT;")
            # Once it ends, the next sync drains and the one after restarts the WAL.
            drains = st["drains"]
            p.q("UPDATE t SET ver = 1000")
            sync_to(r, p.one("SELECT repl_lsn()"))
            st = worker_status(r)
            assert st["wal_pinned"] is None and st["drains"] == drains + 1, st
            p.q("UPDATE t SET ver = 1001")
            sync_to(r, p.one("SELECT repl_lsn()"))
            st = worker_status(r)
            assert st["wal"]["mx_frame"] < 60, f"the WAL did not restart after the drain: {st}"
            assert lsn_checksum(r) == lsn_checksum(p)
            assert reader.q(READ_SQL + ";") == [stock_one(pdb, READ_SQL + ";")]
        finally:
            reader.close()
    assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"

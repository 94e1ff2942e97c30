"""Differential capture test (the capture issue's acceptance test).

Two writer processes and a writer thread (in this pytest process) run a seeded randomised
workload against one primary: inserts, updates, deletes, 20-100 KB blobs (overflow chains),
CREATE/DROP TABLE and INDEX, SAVEPOINT + ROLLBACK TO, whole-transaction ROLLBACK, VACUUM,
``PRAGMA cache_size=5`` (spills into the WAL before commit), ``synchronous=FULL`` in one writer
and ``NORMAL`` in another, and ``psow=0`` (WAL padding frames) in the FULL one.

While they run, a sampler (this process's main thread) repeatedly freezes every writer with
``BEGIN IMMEDIATE`` on its own primary connection (it then holds the WAL WRITE lock, and the
extension's T1 has caught capture up), records ``repl_lsn()``, ``repl_checksum()`` and the
logical pages of the live database as read by ``walutil`` (an independent reader of db + WAL),
then rolls back. After the workload every sample is checked against
``sqlite-replica rebuild --lsn N``: rebuilt pages byte-identical to the sampled ones, rebuilt
checksum == sampled ``repl_checksum()`` (== the db_checksum ``inspect`` shows for record N).

At the end: LSNs dense 1..N, all generation 1 (no gap, no snapshot record), exactly one LSN per
committed transaction, ``verify`` passes, the final rebuild equals the primary (pages, every
table's rows, checksum), and -- when the ``xxhash`` module is available -- ``repl_checksum()``
equals a checksum recomputed here from the pages (FORMAT.md §1).

Knobs: REPL_DIFF_TXNS (committed transactions, default 2000), REPL_DIFF_SEED (default
20240611), REPL_DIFF_SAMPLES (minimum number of samples, default 50).

The workload runs in child processes by importing this module (``child_main``), so everything a
writer needs is defined at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apsw

import walutil
from capture_check import (
    REBUILT,
    assert_dense,
    assert_rebuild_equals,
    inspect,
    log_dir,
    padding_frames,
    run_cli,
    status,
    verify_ok,
    wal_frames,
)
from helpers import apsw_conn, one, spawn_py

TXNS = int(os.environ.get("REPL_DIFF_TXNS", "2000"))
SEED = int(os.environ.get("REPL_DIFF_SEED", "20240611"))
SAMPLES = int(os.environ.get("REPL_DIFF_SAMPLES", "50"))

HERE = str(Path(__file__).resolve().parent)

# Writers: two processes and one thread. "share" is the fraction of TXNS each one commits.
WRITERS = [
    # synchronous=FULL + psow=0: commit frames are padded to the sector size (padding frames).
    {"name": "p1", "where": "process", "share": 0.4, "psow0": True, "sync": "FULL", "cache5": "never",
     "autockpt": 200},
    # synchronous=NORMAL + a 5-page cache: nearly every transaction spills before it commits.
    {"name": "p2", "where": "process", "share": 0.4, "psow0": False, "sync": "NORMAL", "cache5": "always",
     "autockpt": 1000},
    # The thread flips its cache between 5 pages and the default now and then.
    {"name": "th", "where": "thread", "share": 0.2, "psow0": False, "sync": "NORMAL", "cache5": "sometimes",
     "autockpt": 500},
]

BIG_MIN, BIG_MAX = 20_000, 100_000
MAX_LIVE_BIG = 4  # per writer: keeps the database (and every VACUUM) small
MAX_OWN_TABLES = 3


# ------------------------------------------------------------------------------ the workload


class Writer:
    """One writer's seeded workload. Every committed transaction except VACUUM inserts exactly
    one row into ``ops`` (w, seq): that is how commits are counted, and it makes every one of
    them write at least one page (so every commit is exactly one LSN)."""

    def __init__(self, conn: apsw.Connection, cfg: dict, n: int, seed: int):
        self.c = conn
        self.cfg = cfg
        self.w = cfg["name"]
        self.n = n
        self.rng = random.Random(f"{seed}/{self.w}")
        self.seq = 0  # ops.seq of the next committed transaction
        self.key = 0  # next s.k (unique per writer; rolled-back keys are simply not reused)
        self.live: list[int] = []  # keys of this writer's live rows in s
        self.big: list[int] = []  # ... the ones holding a big blob (also in live)
        self.own: dict[str, list[str]] = {}  # own table -> its indexes
        self.own_rows: dict[str, int] = {}
        self.table_no = 0
        self.stats: dict = {"commits": 0, "vacuums": 0, "rollbacks": 0, "busy_retries": 0, "kinds": {}, "seqs": []}

    # -- helpers ---------------------------------------------------------------------------
    def blob(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    def small(self) -> bytes:
        r = self.rng.random()
        if r < 0.7:
            return self.blob(1, 400)
        if r < 0.95:
            return self.blob(400, 3000)
        return self.blob(5000, 15000)  # a few pages of overflow

    def new_key(self) -> int:
        self.key += 1
        return self.key

    # -- transaction plans: (kind, begin, steps, on_commit) -----------------------------------
    # A step is (sql, bindings). on_commit updates the writer's bookkeeping once committed.
    def plan(self):
        r = self.rng.random()
        if r < 0.004 and self.seq > 20:
            return "vacuum", None, [("VACUUM", ())], lambda: None
        if r < 0.06:
            return self.plan_big()
        if r < 0.10:
            return self.plan_ddl()
        if r < 0.17:
            return self.plan_savepoint()
        if r < 0.22:
            return self.plan_rollback()
        if r < 0.40 and self.live:
            return self.plan_update()
        if r < 0.50 and self.live:
            return self.plan_delete()
        if r < 0.58 and self.own:
            return self.plan_own_insert()
        if r < 0.66:
            return self.plan_solo()
        return self.plan_insert()

    def begin(self) -> str:
        # Mostly BEGIN IMMEDIATE; sometimes a deferred BEGIN (may hit SQLITE_BUSY(_SNAPSHOT) when
        # it upgrades to a write: retried like any BUSY).
        return "BEGIN" if self.rng.random() < 0.2 else "BEGIN IMMEDIATE"

    def ops_step(self, kind: str):
        return ("INSERT INTO ops(w, seq, kind) VALUES (?, ?, ?)", (self.w, self.seq, kind))

    def insert_steps(self, count: int):
        keys = [self.new_key() for _ in range(count)]
        steps = [("INSERT INTO s(w, k, v, n) VALUES (?, ?, ?, ?)", (self.w, k, self.small(), self.rng.randrange(1000)))
                 for k in keys]
        return keys, steps

    def plan_insert(self):
        keys, steps = self.insert_steps(self.rng.randint(1, 5))
        return "insert", self.begin(), steps + [self.ops_step("insert")], lambda: self.live.extend(keys)

    def plan_solo(self):
        # One autocommit statement is the whole transaction (it is also the ops row).
        return "solo", None, [("INSERT INTO ops(w, seq, kind, v) VALUES (?, ?, 'solo', ?)",
                               (self.w, self.seq, self.small()))], lambda: None

    def plan_update(self):
        keys = self.rng.sample(self.live, min(len(self.live), self.rng.randint(1, 4)))
        steps = [("UPDATE s SET v = ?, n = n + 1 WHERE w = ? AND k = ?", (self.small(), self.w, k)) for k in keys]
        if self.rng.random() < 0.3:
            steps.append(("UPDATE s SET n = n * 2 WHERE w = ? AND n < ?", (self.w, self.rng.randrange(300))))
        gone = [k for k in keys if k in self.big]

        def done():
            for k in gone:  # its big blob was replaced by a small value
                self.big.remove(k)
        return "update", self.begin(), steps + [self.ops_step("update")], done

    def plan_delete(self):
        keys = self.rng.sample(self.live, min(len(self.live), self.rng.randint(1, 4)))
        steps = [("DELETE FROM s WHERE w = ? AND k = ?", (self.w, k)) for k in keys]

        def done():
            for k in keys:
                self.live.remove(k)
                if k in self.big:
                    self.big.remove(k)
        return "delete", self.begin(), steps + [self.ops_step("delete")], done

    def plan_big(self):
        k = self.new_key()
        steps = [("INSERT INTO s(w, k, v, n) VALUES (?, ?, ?, -1)", (self.w, k, self.blob(BIG_MIN, BIG_MAX)))]
        drop = self.big[0] if len(self.big) >= MAX_LIVE_BIG else None
        if drop is not None:
            steps.append(("DELETE FROM s WHERE w = ? AND k = ?", (self.w, drop)))
        if self.rng.random() < 0.3 and len(self.big) > 1:
            # Rewrite another big blob in place (a new overflow chain, the old one freed).
            other = self.rng.choice([b for b in self.big if b != drop] or [None])
            if other is not None:
                steps.append(("UPDATE s SET v = ? WHERE w = ? AND k = ?", (self.blob(BIG_MIN, BIG_MAX), self.w, other)))

        def done():
            if drop is not None:
                self.big.remove(drop)
                self.live.remove(drop)
            self.big.append(k)
            self.live.append(k)
        return "big", self.begin(), steps + [self.ops_step("big")], done

    def plan_own_insert(self):
        t = self.rng.choice(sorted(self.own))
        count = self.rng.randint(1, 20)
        steps = [(f"INSERT INTO {t}(a, b, c) VALUES (?, ?, ?)",
                  (self.rng.randrange(10**6), f"{self.w}-{self.rng.random()}", self.small())) for _ in range(count)]
        if self.rng.random() < 0.3:
            steps.append((f"DELETE FROM {t} WHERE a % 7 = ?", (self.rng.randrange(7),)))

        def done():
            self.own_rows[t] = self.own_rows.get(t, 0) + count
        return "own_insert", self.begin(), steps + [self.ops_step("own_insert")], done

    def plan_ddl(self):
        r = self.rng.random()
        if (r < 0.35 or not self.own) and len(self.own) < MAX_OWN_TABLES:
            self.table_no += 1
            t = f"{self.w}_t{self.table_no}"
            steps = [(f"CREATE TABLE {t}(id INTEGER PRIMARY KEY, a INT, b TEXT, c BLOB)", ())]
            steps += [(f"INSERT INTO {t}(a, b, c) VALUES (?, ?, ?)", (i, str(i), self.small()))
                      for i in range(self.rng.randint(0, 30))]
            idx = []
            if self.rng.random() < 0.5:
                idx.append(f"{t}_a")
                steps.append((f"CREATE INDEX {t}_a ON {t}(a)", ()))

            def done():
                self.own[t] = idx
            return "create_table", "BEGIN IMMEDIATE", steps + [self.ops_step("create_table")], done
        t = self.rng.choice(sorted(self.own))
        if r < 0.6:
            def done():
                del self.own[t]
            return "drop_table", "BEGIN IMMEDIATE", [(f"DROP TABLE {t}", ()), self.ops_step("drop_table")], done
        if r < 0.8 or not self.own[t]:
            name = f"{t}_i{self.rng.randrange(10**6)}"
            col = self.rng.choice(["a", "b", "a, b", "c"])

            def done():
                self.own[t].append(name)
            return "create_index", "BEGIN IMMEDIATE", [(f"CREATE INDEX {name} ON {t}({col})", ()),
                                                       self.ops_step("create_index")], done
        name = self.rng.choice(self.own[t])

        def done():
            self.own[t].remove(name)
        return "drop_index", "BEGIN IMMEDIATE", [(f"DROP INDEX {name}", ()), self.ops_step("drop_index")], done

    def plan_savepoint(self):
        before_keys, before = self.insert_steps(self.rng.randint(1, 3))
        inner: list = [("SAVEPOINT sp1", ())]
        _, ins = self.insert_steps(self.rng.randint(1, 5))
        inner += ins
        if self.rng.random() < 0.4:
            inner.append(("INSERT INTO s(w, k, v, n) VALUES (?, ?, ?, -2)", (self.w, self.new_key(), self.blob(BIG_MIN, BIG_MAX))))
        if self.live:
            k = self.rng.choice(self.live)
            inner.append(("UPDATE s SET v = ? WHERE w = ? AND k = ?", (self.small(), self.w, k)))
            inner.append(("DELETE FROM s WHERE w = ? AND k = ?", (self.w, self.rng.choice(self.live))))
        inner.append(("ROLLBACK TO sp1", ()))
        after_keys, after = self.insert_steps(self.rng.randint(0, 2))
        nested = []
        nested_keys: list[int] = []
        if self.rng.random() < 0.5:
            nested_keys, ins2 = self.insert_steps(1)
            nested = [("SAVEPOINT sp2", ())] + ins2 + [("RELEASE sp2", ())]
        steps = before + inner + after + nested + [("RELEASE sp1", ()), self.ops_step("savepoint")]
        return "savepoint", "BEGIN IMMEDIATE", steps, lambda: self.live.extend(before_keys + after_keys + nested_keys)

    def plan_rollback(self):
        _, steps = self.insert_steps(self.rng.randint(1, 10))
        if self.rng.random() < 0.5:
            steps.append(("INSERT INTO s(w, k, v, n) VALUES (?, ?, ?, -3)", (self.w, self.new_key(), self.blob(BIG_MIN, BIG_MAX))))
        if self.live:
            steps.append(("DELETE FROM s WHERE w = ? AND k = ?", (self.w, self.rng.choice(self.live))))
            steps.append(("UPDATE s SET v = ? WHERE w = ?", (b"rolled back", self.w)))
        steps.append(("INSERT INTO ops(w, seq, kind) VALUES (?, -1, 'rolled back')", (self.w,)))
        return "rollback", self.begin(), steps, lambda: None

    # -- execution ------------------------------------------------------------------------------
    def run_txn(self, kind, begin, steps, on_commit) -> None:
        c = self.c
        for attempt in range(200):
            try:
                if begin:
                    c.execute(begin)
                for sql, args in steps:
                    c.execute(sql, args)
                if kind == "rollback":
                    c.execute("ROLLBACK")
                elif begin:
                    c.execute("COMMIT")
                break
            except apsw.BusyError:
                self.stats["busy_retries"] += 1
                if not c.getautocommit():
                    c.execute("ROLLBACK")
                time.sleep(0.001 * (1 + attempt % 10))
        else:
            raise AssertionError(f"{self.w}: {kind} still BUSY after 200 attempts")
        self.stats["kinds"][kind] = self.stats["kinds"].get(kind, 0) + 1
        if kind == "rollback":
            self.stats["rollbacks"] += 1
            return
        if kind == "vacuum":
            self.stats["vacuums"] += 1
            return
        self.stats["seqs"].append(self.seq)
        self.seq += 1
        self.stats["commits"] += 1
        on_commit()

    def wait_for_gate(self) -> None:
        """Pace the workload to the sampler: start no transaction while the number of committed
        ``ops`` rows (all writers) has reached the limit the sampler wrote into the gate file.
        Without it a slow sampler (a loaded machine) met the writers every ~50 commits instead of
        every ~20 and the test took fewer samples than it promises."""
        gate = self.cfg.get("gate")
        if not gate:
            return
        deadline = time.monotonic() + 120
        while True:
            with open(gate) as f:
                limit = int(f.read())
            if one(self.c, "SELECT coalesce(max(id), 0) FROM ops") < limit:
                return
            assert time.monotonic() < deadline, f"{self.w}: the sampler never lifted the gate at {limit}"
            time.sleep(0.0005)

    def run(self) -> dict:
        c = self.c
        cache5 = self.cfg["cache5"]
        while self.stats["commits"] < self.n:
            self.wait_for_gate()
            if cache5 == "sometimes" and self.rng.random() < 0.05:
                c.execute("PRAGMA cache_size=5" if self.rng.random() < 0.5 else "PRAGMA cache_size=-2000")
            self.run_txn(*self.plan())
        self.stats["cache_size"] = one(c, "PRAGMA cache_size")
        return self.stats


def busy_handler(timeout: float = 10.0):
    """A 10 s busy timeout that retries every ~0.3 ms (SQLite's own back-off sleeps up to 100 ms,
    which lets one writer hog the write lock: the writers would hardly interleave)."""
    started = [0.0]

    def handler(n: int) -> bool:
        now = time.monotonic()
        if n == 0:
            started[0] = now
        if now - started[0] > timeout:
            return False
        time.sleep(0.0003)
        return True
    return handler


def open_writer(db: str, cfg: dict) -> apsw.Connection:
    conn = apsw_conn(f"file:{db}?psow=0" if cfg["psow0"] else db)
    conn.setbusyhandler(busy_handler())
    conn.execute(f"PRAGMA synchronous={cfg['sync']}")
    conn.execute(f"PRAGMA wal_autocheckpoint={cfg['autockpt']}")
    if cfg["cache5"] == "always":
        conn.execute("PRAGMA cache_size=5")
    assert one(conn, "SELECT repl_role()") == "primary", "the role was not remembered by a new connection"
    return conn


def child_main() -> None:
    """Entry point of a writer process: config on stdin, "ready", wait for "go", result JSON."""
    cfg = json.loads(sys.stdin.readline())
    conn = open_writer(cfg["db"], cfg)
    expect_sync = {"FULL": 2, "NORMAL": 1}[cfg["sync"]]
    assert one(conn, "PRAGMA synchronous") == expect_sync
    print("ready", flush=True)
    sys.stdin.readline()
    stats = Writer(conn, cfg, cfg["n"], cfg["seed"]).run()
    conn.close()
    print(json.dumps(stats), flush=True)


CHILD = f"import sys; sys.path.insert(0, {HERE!r}); import test_differential; test_differential.child_main()\n"


# ------------------------------------------------------------------------------- the sampler


def page_digests(pages: list[bytes]) -> list[bytes]:
    return [hashlib.sha256(p).digest() for p in pages]


def take_sample(conn: apsw.Connection, db: str, frames: bool = False) -> dict:
    """Freeze every writer (WAL WRITE lock), read LSN, checksum and logical pages, roll back.
    With ``frames``, also count the padding frames among the published WAL frames (proof that
    the psow=0 writer's commits were padded)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        lsn = one(conn, "SELECT repl_lsn()")
        checksum = one(conn, "SELECT repl_checksum()")
        page_size, pages = walutil.logical_pages(db)
        padding = padding_frames(wal_frames(db)) if frames else 0
        lsn_after = one(conn, "SELECT repl_lsn()")
    finally:
        conn.execute("ROLLBACK")
    assert lsn_after == lsn, f"the LSN moved while writers were frozen: {lsn} -> {lsn_after}"
    return {"lsn": lsn, "checksum": checksum, "page_size": page_size, "digests": page_digests(pages),
            "padding": padding}


def xxh3_db_checksum(page_size: int, pages: list[bytes]) -> str | None:
    """FORMAT.md §1 database checksum, computed independently; None without ``xxhash``."""
    try:
        import xxhash  # type: ignore[import-not-found]
    except ImportError:
        return None
    lock_page = 2**30 // page_size + 1
    acc = 0
    for i, page in enumerate(pages):
        pgno = i + 1
        if pgno == lock_page:
            continue
        acc ^= xxhash.xxh3_64_intdigest(pgno.to_bytes(4, "big") + page)
    return f"{acc:016x}"


# ---------------------------------------------------------------------------------- the test


def test_differential_capture_under_a_mixed_concurrent_workload(tmp):
    db = str(tmp / "diff.db")
    t_start = time.monotonic()
    sampler = apsw_conn(db)
    sampler.setbusyhandler(busy_handler())
    base = one(sampler, "SELECT repl_primary()")
    assert base == 0
    sampler.execute(
        "BEGIN;"
        "CREATE TABLE s(id INTEGER PRIMARY KEY, w TEXT NOT NULL, k INT NOT NULL, v BLOB, n INT);"
        "CREATE UNIQUE INDEX s_wk ON s(w, k);"
        "CREATE INDEX s_n ON s(n);"
        "CREATE TABLE ops(id INTEGER PRIMARY KEY, w TEXT NOT NULL, seq INT NOT NULL, kind TEXT, v BLOB);"
        "CREATE UNIQUE INDEX ops_ws ON ops(w, seq);"
        "COMMIT"
    )
    setup_lsn = one(sampler, "SELECT repl_lsn()")
    assert setup_lsn == 1

    counts = [round(TXNS * w["share"]) for w in WRITERS]
    counts[-1] = TXNS - sum(counts[:-1])
    gate = tmp / "gate"  # the sampler's limit on committed ops rows; see Writer.wait_for_gate

    def set_gate(limit: int) -> None:
        (tmp / "gate.tmp").write_text(str(limit))
        os.replace(tmp / "gate.tmp", gate)

    cfgs = [dict(w, db=db, n=n, seed=SEED, gate=str(gate)) for w, n in zip(WRITERS, counts)]
    srng = random.Random(f"{SEED}/sampler")
    step = max(1, int(TXNS / (SAMPLES * 2)))
    next_at = srng.randint(1, step)
    set_gate(next_at)

    procs = []
    thread_result: dict = {}
    samples: list[dict] = []
    try:
        for cfg in cfgs:
            if cfg["where"] != "process":
                continue
            p = spawn_py(CHILD, prelude=False)
            p.stdin.write(json.dumps(cfg) + "\n")
            p.stdin.flush()
            procs.append((cfg, p))
        for cfg, p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                p.kill()
                raise AssertionError(f"writer {cfg['name']} did not start: {line!r}\n{p.stderr.read()}")

        th_cfg = next(c for c in cfgs if c["where"] == "thread")

        def thread_writer() -> None:
            try:
                conn = open_writer(db, th_cfg)
                try:
                    thread_result.update(Writer(conn, th_cfg, th_cfg["n"], SEED).run())
                finally:
                    conn.close()
            except BaseException as e:  # reported by the test
                thread_result["error"] = repr(e)

        thread = threading.Thread(target=thread_writer, name="writer-th")
        for _, p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        thread.start()

        # Sample roughly every `step` commits (jittered) while anything is still writing. The
        # writers start no transaction once `next_at` ops rows are committed, so each sample
        # lands at most one in-flight transaction per writer past its point, however slow the
        # sampler is on a loaded machine (the LSN of a sample is whatever repl_lsn() says).
        workload_deadline = time.monotonic() + 150
        while thread.is_alive() or any(p.poll() is None for _, p in procs):
            assert time.monotonic() < workload_deadline, "the workload did not finish in time"
            if one(sampler, "SELECT coalesce(max(id), 0) FROM ops") >= next_at:
                s = take_sample(sampler, db, frames=len(samples) % 8 == 0)
                samples.append(s)
                next_at += srng.randint(max(1, step // 2), step + step // 2)
                set_gate(next_at)
            else:
                time.sleep(0.002)
        thread.join(timeout=30)
        results = []
        for cfg, p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, f"writer {cfg['name']} failed ({p.returncode}):\n{err[-5000:]}"
            assert "panic" not in err, err
            results.append(json.loads(out.strip().splitlines()[-1]))
            if err.strip():
                print(f"writer {cfg['name']} stderr:\n{err[-3000:]}")
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "error" not in thread_result, f"writer thread failed: {thread_result['error']}"
    results.append(thread_result)
    t_workload = time.monotonic() - t_start

    # One last sample with everything quiet.
    samples.append(take_sample(sampler, db))

    # ---- the workload did what it claims
    commits = sum(r["commits"] for r in results)
    vacuums = sum(r["vacuums"] for r in results)
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    summary = {
        "commits": commits, "vacuums": vacuums, "kinds": kinds, "samples": len(samples),
        "busy_retries": sum(r["busy_retries"] for r in results), "workload_s": round(t_workload, 1),
        "padding_frames_seen": sum(s["padding"] for s in samples),
    }
    print(f"differential workload: {json.dumps(summary)}")
    assert commits >= TXNS, summary
    for kind in ("insert", "solo", "update", "delete", "big", "own_insert", "create_table", "drop_table",
                 "create_index", "drop_index", "savepoint", "rollback"):
        assert kinds.get(kind, 0) > 0, f"the workload never ran a {kind!r} transaction: {summary}"
    if TXNS >= 1000:
        assert vacuums > 0, f"the workload never ran VACUUM: {summary}"
    assert [r["cache_size"] for r in results[:2]] == [-2000, 5], "p1 default cache, p2 5 pages"
    if TXNS >= 1000:
        assert summary["padding_frames_seen"] > 0, f"no WAL padding frames seen (psow=0 + FULL): {summary}"
    required = min(SAMPLES, max(1, TXNS // 20))
    assert len(samples) >= required, f"only {len(samples)} samples (need {required}): {summary}"

    # ---- every commit is exactly one LSN, no gap, one generation
    final_lsn = one(sampler, "SELECT repl_lsn()")
    final_checksum = one(sampler, "SELECT repl_checksum()")
    st = status(sampler)
    assert st["gaps"] == 0 and st["generation"] == 1 and st["last_error"] is None, st
    assert final_lsn == setup_lsn + commits + vacuums, (
        f"repl_lsn() {final_lsn} != {setup_lsn} (setup) + {commits} commits + {vacuums} VACUUMs"
    )
    records = inspect(db)
    assert_dense(records)
    assert len(records) == final_lsn
    assert all(r.generation == 1 and r.kind == "txn" for r in records), (
        [(r.lsn, r.generation, r.kind) for r in records if r.generation != 1 or r.kind != "txn"][:10]
    )
    verify_ok(db)
    by_lsn = {r.lsn: r for r in records}

    # ---- the final state: rebuild == primary (pages, rows, checksum)
    info = assert_rebuild_equals(db, tmp / "final.db", sampler)
    assert info["lsn"] == final_lsn and info["checksum"] == final_checksum
    assert info["generation"] == 1
    plain = apsw.Connection(str(tmp / "final.db"), flags=apsw.SQLITE_OPEN_READONLY, vfs="unix")
    try:
        for r, cfg in zip(results, cfgs[:2] + [th_cfg]):
            seqs = [row[0] for row in plain.execute("SELECT seq FROM ops WHERE w = ? ORDER BY seq", (cfg["name"],))]
            assert seqs == sorted(r["seqs"]) == list(range(r["commits"])), (
                f"{cfg['name']}: committed transactions missing or extra in the rebuild"
            )
        assert one(plain, "SELECT count(*) FROM ops WHERE seq < 0") == 0, "a rolled-back transaction is in the rebuild"
        # The writers really interleaved (ops.id is commit order).
        order = [row[0] for row in plain.execute("SELECT w FROM ops ORDER BY id")]
        switches = sum(a != b for a, b in zip(order, order[1:]))
        assert switches >= min(50, commits // 20), f"the writers hardly interleaved: {switches} switches"
        print(f"differential: {switches} writer switches in commit order")
        assert one(plain, "SELECT count(*) FROM s WHERE v = x'726f6c6c6564206261636b'") == 0
        final_size, final_pages = walutil.file_pages(str(tmp / "final.db"))
    finally:
        plain.close()
    assert final_checksum == by_lsn[final_lsn].db_checksum
    independent = xxh3_db_checksum(final_size, final_pages)
    if independent is None:
        print("xxhash module not installed: independent checksum recomputation skipped "
              "(the rebuild's checksum, computed from the log's pages, was compared instead)")
    else:
        assert independent == final_checksum, f"recomputed checksum {independent} != repl_checksum() {final_checksum}"

    # ---- every sample: rebuild --lsn N is byte-identical to what the primary held at N
    assert samples[-1]["lsn"] == final_lsn
    lsns = [s["lsn"] for s in samples]
    assert lsns == sorted(lsns)
    distinct = {s["lsn"]: s for s in samples}
    assert len(distinct) >= required, f"only {len(distinct)} distinct sampled LSNs"
    scratch = tmp / "rebuilds"
    scratch.mkdir()

    def check(s: dict) -> str | None:
        out = scratch / f"at-{s['lsn']}.db"
        proc = run_cli("rebuild", log_dir(db), out, "--lsn", str(s["lsn"]), timeout=120)
        if proc.returncode != 0:
            return f"LSN {s['lsn']}: rebuild failed ({proc.returncode}): {proc.stderr.strip()}"
        m = REBUILT.match(proc.stdout.strip())
        if not m:
            return f"LSN {s['lsn']}: unexpected rebuild output {proc.stdout!r}"
        problems = []
        if int(m["lsn"]) != s["lsn"] or int(m["gen"]) != 1:
            problems.append(f"reached LSN {m['lsn']} generation {m['gen']}")
        if m["checksum"] != s["checksum"]:
            problems.append(f"rebuilt checksum {m['checksum']} != sampled repl_checksum() {s['checksum']}")
        if by_lsn[s["lsn"]].db_checksum != s["checksum"]:
            problems.append(f"inspect's db_checksum {by_lsn[s['lsn']].db_checksum} != sampled {s['checksum']}")
        ps, pages = walutil.file_pages(str(out))
        out.unlink()
        if ps != s["page_size"]:
            problems.append(f"page size {ps} != {s['page_size']}")
        got = page_digests(pages)
        if len(got) != len(s["digests"]):
            problems.append(f"{len(got)} pages rebuilt, the primary had {len(s['digests'])}")
        differing = [i + 1 for i, (a, b) in enumerate(zip(got, s["digests"])) if a != b]
        if differing:
            problems.append(f"pages differ: {differing[:20]}{' ...' if len(differing) > 20 else ''}")
        return f"LSN {s['lsn']}: " + "; ".join(problems) if problems else None

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(check, sorted(distinct.values(), key=lambda s: s["lsn"])) if f]
    assert not failures, f"{len(failures)} of {len(distinct)} sampled LSNs differ from their rebuild:\n" + "\n".join(failures[:20])
    print(f"differential: {len(distinct)} sampled LSNs verified, total {time.monotonic() - t_start:.1f}s")
    sampler.close()

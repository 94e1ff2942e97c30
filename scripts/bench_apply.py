#!/usr/bin/env python3
"""Replica apply benchmark (part of `make bench`): apply throughput and reader latency.

1. Catch-up: a replica bootstrapped from a small primary; the primary then commits TXNS
   transactions (each inserts 4 rows of 3000-byte blobs: ~3 new pages + the b-tree path, so
   batches merge little: nearly every page image in the log is written to the replica);
   one timed `repl_sync()` applies them all (batches of up to 32 MiB, each one replica commit,
   checksum-verified, fdatasync'd). Reported as MiB of page images and transactions per second.
2. Live: the primary commits one transaction, the replica syncs until it has it (records are
   served once durable: the primary's group fsync comes a moment after the commit); LIVE times.
   Reported as commit returned → applied on the replica (p50 / p99) and syncs per transaction.
3. Reader latency: a stock reader process (apsw, no extension) runs point lookups on the
   replica for READ_SECS, idle and then while a writer process commits continuously on the
   primary and an applier process loops `repl_sync()`. p50 / p99 / max per lookup.

Appends its section to BENCHMARKS.md (after the bootstrap section).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apsw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXT = str(REPO / "build" / "libreplica")
TXNS = int(os.environ.get("REPL_BENCH_APPLY_TXNS", "4000"))
LIVE = int(os.environ.get("REPL_BENCH_APPLY_LIVE", "1000"))
READ_SECS = float(os.environ.get("REPL_BENCH_READ_SECS", "3"))
ROWS = 400

PRELUDE = f"""
import apsw, json, os, sys, time
boot = apsw.Connection(":memory:")
boot.enable_load_extension(True)
boot.load_extension({EXT!r})
"""

WRITER = PRELUDE + """
p = apsw.Connection(sys.argv[1]); p.setbusytimeout(5000)
stop, n, i = sys.argv[2], int(sys.argv[3]), 0
while not os.path.exists(stop):
    p.execute("UPDATE t SET v = randomblob(3000) WHERE id = ?", (1 + i % n,)); i += 1
print(json.dumps({"txns": i}))
"""

APPLIER = PRELUDE + """
r = apsw.Connection(sys.argv[1]); r.setbusytimeout(5000)
stop, syncs = sys.argv[2], 0
while not os.path.exists(stop):
    r.execute("SELECT repl_sync()").fetchall(); syncs += 1
print(json.dumps({"syncs": syncs}))
"""

READER = """
import apsw, json, random, sys, time
c = apsw.Connection(sys.argv[1], vfs="unix"); c.setbusytimeout(5000)
secs, rows = float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(5)
lat = []
end = time.perf_counter() + secs
while time.perf_counter() < end:
    k = rng.randint(1, rows)
    t = time.perf_counter()
    c.execute("SELECT length(v) FROM t WHERE id = ?", (k,)).fetchall()
    lat.append(time.perf_counter() - t)
lat.sort()
q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1e6
print(json.dumps({"n": len(lat), "p50": q(0.5), "p99": q(0.99), "max": lat[-1] * 1e6}))
"""


def load() -> None:
    boot = apsw.Connection(":memory:")
    boot.enable_load_extension(True)
    boot.load_extension(EXT)


def one(c, sql, args=()):
    return c.execute(sql, args).fetchone()[0]


def reader(rdb: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", READER, str(rdb), str(READ_SECS), str(ROWS)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-apply."))
    try:
        load()
        pdb, rdb = tmp / "p.db", tmp / "r.db"
        p = apsw.Connection(str(pdb))
        p.setbusytimeout(5000)
        p.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL")
        one(p, "SELECT repl_primary()")
        one(p, "SELECT repl_config('snapshot_bytes', 0)")  # measure apply, not compaction
        p.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        p.execute(f"WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {ROWS}) "
                  "INSERT INTO t SELECT n, randomblob(3000) FROM c")
        r = apsw.Connection(str(rdb))
        r.setbusytimeout(5000)
        start = one(r, "SELECT repl_sync(?)", (str(pdb),))

        # 1. catch-up
        log0 = json.loads(one(p, "SELECT repl_status()"))["log"]["bytes"]
        for i in range(TXNS):
            p.execute("INSERT INTO t(v) SELECT randomblob(3000) FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4)")
        want = (one(p, "SELECT repl_lsn()"), one(p, "SELECT repl_checksum()"))
        log_bytes = json.loads(one(p, "SELECT repl_status()"))["log"]["bytes"] - log0
        t = time.perf_counter()
        got = one(r, "SELECT repl_sync()")
        catch_s = time.perf_counter() - t
        if (got, one(r, "SELECT repl_checksum()")) != want:
            raise SystemExit(f"bench_apply: replica at {got} != primary {want}")
        records = want[0] - start
        mib = log_bytes / 2**20
        print(f"bench_apply: caught up {records} txns ({mib:.1f} MiB of records) in {catch_s:.2f} s", flush=True)

        # 2. live: one transaction per sync
        # The directory source serves records once durable (the primary's group fsync round
        # raises the watermark a moment after the commit): time from the commit's return until
        # the replica has applied it, syncing until it is there (usually one or two calls).
        per, calls = [], 0
        for i in range(LIVE):
            p.execute("UPDATE t SET v = randomblob(3000) WHERE id = ?", (1 + i % ROWS,))
            target = one(p, "SELECT repl_lsn()")
            t = time.perf_counter()
            while one(r, "SELECT repl_sync()") < target:
                calls += 1
                if time.perf_counter() - t > 10:
                    raise SystemExit(f"bench_apply: LSN {target} not applied within 10 s")
            calls += 1
            per.append(time.perf_counter() - t)
        if (one(r, "SELECT repl_lsn()"), one(r, "SELECT repl_checksum()")) != (
                one(p, "SELECT repl_lsn()"), one(p, "SELECT repl_checksum()")):
            raise SystemExit("bench_apply: live phase diverged (same LSN, different checksum)")
        per.sort()
        live_p50, live_p99 = per[len(per) // 2] * 1e6, per[int(len(per) * 0.99)] * 1e6
        print(f"bench_apply: live commit -> applied p50 {live_p50:.0f} µs p99 {live_p99:.0f} µs "
              f"({calls / LIVE:.1f} syncs per transaction)", flush=True)
        r.close()
        p.close()

        # 3. reader latency, idle and under sync
        idle = reader(rdb)
        stop = tmp / "STOP"
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(pdb), str(stop), str(ROWS)], stdout=subprocess.PIPE, text=True)
        a = subprocess.Popen([sys.executable, "-c", APPLIER, str(rdb), str(stop)], stdout=subprocess.PIPE, text=True)
        try:
            busy = reader(rdb)
        finally:
            stop.touch()
        wr, ap = json.loads(w.communicate(timeout=60)[0]), json.loads(a.communicate(timeout=60)[0])
        print(f"bench_apply: reader idle {idle}, under sync {busy} (writer {wr}, applier {ap})", flush=True)

        lines = [
            "",
            f"- Command: `make bench` (scripts/bench_apply.py; REPL_BENCH_APPLY_TXNS={TXNS}, REPL_BENCH_APPLY_LIVE={LIVE}, "
            f"REPL_BENCH_READ_SECS={READ_SECS:g}); 4 KiB pages, synchronous=NORMAL primary, 2-core VM",
            "- Catch-up: one `repl_sync()` applying every transaction committed since the last sync "
            "(each inserts 4 rows of 3000-byte blobs), batches of ≤ 32 MiB, each verified against the primary's checksum and fdatasync'd",
            f"- Live: the primary commits one transaction, then `repl_sync()` until the replica has applied it (records are served once durable; {calls / LIVE:.1f} calls per transaction on average); time from the commit's return to applied",
            "- Reader: a stock apsw process (no extension) doing point lookups on the replica; "
            "`under sync` = while a writer process commits continuously and an applier process loops `repl_sync()`",
            "",
            "| measurement | value |",
            "|---|---:|",
            f"| catch-up: transactions | {records} |",
            f"| catch-up: seconds | {catch_s:.2f} |",
            f"| catch-up: MiB/s (log records) | {mib / catch_s:.0f} |",
            f"| catch-up: transactions/s | {records / catch_s:.0f} |",
            f"| live: commit returned → applied on the replica, p50 / p99 | {live_p50:.0f} / {live_p99:.0f} µs |",
            f"| reader lookup idle p50 / p99 / max | {idle['p50']:.0f} / {idle['p99']:.0f} / {idle['max']:.0f} µs |",
            f"| reader lookup under sync p50 / p99 / max | {busy['p50']:.0f} / {busy['p99']:.0f} / {busy['max']:.0f} µs |",
            f"| under sync: primary txns, applier syncs | {wr['txns']}, {ap['syncs']} |",
            "",
        ]
        write_section("Replica apply throughput and reader latency (directory source)", lines)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""HTTP transport benchmark (part of `make bench`): replication lag, catch-up throughput and a
256 MiB bootstrap over loopback HTTP.

1. Lag: a writer process (a primary with synchronous=NORMAL that also serves its log with
   `repl_primary('127.0.0.1:0')`) commits at RATES commits/s for LAG_SECS each, stamping every
   commit with its wall-clock time (ns); a replica process follows it (`repl_follow(url)`); a stock
   reader process on the replica (no extension) polls the stamp every ~0.1 ms and records, for
   every new value it sees, now - stamp: commit on the primary -> visible to a reader on the
   replica (the polling adds up to ~0.2 ms).
   Also reports the CPU the follower process used (cores = CPU seconds / wall seconds).
2. Catch-up: one `repl_sync()` over HTTP applying TXNS transactions (4 new rows of 3000 bytes
   each), MiB/s of log records and transactions/s.
3. Bootstrap: a new replica of a BOOT_MB MiB primary over HTTP vs `cp` + `sync` of the file.

Appends its section to BENCHMARKS.md (after the apply section).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmd import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXT = str(REPO / "build" / "libreplica")
RATES = [int(r) for r in os.environ.get("REPL_BENCH_LAG_RATES", "100,500").split(",")]
LAG_SECS = float(os.environ.get("REPL_BENCH_LAG_SECS", "5"))
TXNS = int(os.environ.get("REPL_BENCH_HTTP_TXNS", "4000"))
BOOT_MB = int(os.environ.get("REPL_BENCH_HTTP_BOOT_MB", "256"))

PRELUDE = f"""
import apsw, json, os, sys, time
boot = apsw.Connection(":memory:")
boot.enable_load_extension(True)
boot.load_extension({EXT!r})
"""

# argv: db, url-file, stop-file, go-file, rate, secs
WRITER = PRELUDE + """
p = apsw.Connection(sys.argv[1]); p.setbusytimeout(5000)
p.execute("SELECT repl_primary('127.0.0.1:0')").fetchall()
p.execute("CREATE TABLE IF NOT EXISTS stamp(id INTEGER PRIMARY KEY, ns INTEGER)")
p.execute("INSERT OR REPLACE INTO stamp VALUES (1, 0)")
url = json.loads(p.execute("SELECT repl_status()").fetchone()[0])["server"]["url"]
open(sys.argv[2] + ".tmp", "w").write(url); os.rename(sys.argv[2] + ".tmp", sys.argv[2])
while not os.path.exists(sys.argv[4]):
    time.sleep(0.01)  # start signal from the driver (not synchronisation of data)
rate, secs = float(sys.argv[5]), float(sys.argv[6])
start = time.perf_counter(); n = 0
while time.perf_counter() - start < secs:
    due = start + n / rate
    left = due - time.perf_counter()
    if left > 0:
        time.sleep(left)  # pacing: a steady commit rate (sleeping: the 2 cores are shared)
    p.execute("UPDATE stamp SET ns = ? WHERE id = 1", (time.time_ns(),)); n += 1
open(sys.argv[3] + ".tmp", "w").write(str(n)); os.rename(sys.argv[3] + ".tmp", sys.argv[3])  # whole, never seen empty
while os.path.exists(sys.argv[3]):
    time.sleep(0.05)  # keep serving until the driver is done
"""

FOLLOWER = PRELUDE + """
r = apsw.Connection(sys.argv[1]); r.setbusytimeout(5000)
r.execute("SELECT repl_follow(?, 1000)", (sys.argv[2],)).fetchall()
open(sys.argv[3], "w").write("ready")
while os.path.exists(sys.argv[3]):
    time.sleep(0.05)
print(json.dumps(json.loads(r.execute("SELECT repl_status()").fetchone()[0])["follow"]))
"""

READER = """
import apsw, json, os, sys, time
c = apsw.Connection(sys.argv[1], vfs="unix"); c.setbusytimeout(5000)
stop = sys.argv[2]
last, lags = None, []
n = 0
while True:
    n += 1
    if n % 256 == 0 and os.path.exists(stop):
        break
    time.sleep(0.0001)  # poll every ~0.1 ms: precise enough, and leaves the CPU to the others
    v = c.execute("SELECT ns FROM stamp WHERE id = 1").fetchone()[0]
    if v != last:
        now = time.time_ns()
        if last is not None and v:
            lags.append((now - v) / 1e6)
        last = v
print(json.dumps(lags))
"""

CATCHUP = PRELUDE + """
r = apsw.Connection(sys.argv[1]); r.setbusytimeout(5000)
t = time.perf_counter(); lsn = r.execute("SELECT repl_sync()").fetchone()[0]; dt = time.perf_counter() - t
print(json.dumps({"lsn": lsn, "secs": dt, "checksum": r.execute("SELECT repl_checksum()").fetchone()[0]}))
"""

BOOT = PRELUDE + """
r = apsw.Connection(sys.argv[1]); r.setbusytimeout(5000)
t = time.perf_counter(); lsn = r.execute("SELECT repl_sync(?)", (sys.argv[2],)).fetchone()[0]; dt = time.perf_counter() - t
print(json.dumps({"lsn": lsn, "secs": dt, "checksum": r.execute("SELECT repl_checksum()").fetchone()[0]}))
"""

SERVE = PRELUDE + """
p = apsw.Connection(sys.argv[1]); p.setbusytimeout(5000)
p.execute("SELECT repl_primary('127.0.0.1:0')").fetchall()
url = json.loads(p.execute("SELECT repl_status()").fetchone()[0])["server"]["url"]
open(sys.argv[2] + ".tmp", "w").write(url); os.rename(sys.argv[2] + ".tmp", sys.argv[2])
while os.path.exists(sys.argv[2]):
    time.sleep(0.05)
"""


def py(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True, **kw)


def wait_file(p: Path, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while not p.exists():
        if time.monotonic() > end:
            raise SystemExit(f"bench_http: {p} never appeared")
        time.sleep(0.01)
    return p.read_text()


def cpu_secs(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def lag_run(tmp: Path, rate: int) -> dict:
    d = tmp / f"lag{rate}"
    d.mkdir()
    pdb, rdb = d / "p.db", d / "r.db"
    urlf, stopf, gof, readyf = d / "url", d / "stop", d / "go", d / "ready"
    w = py(WRITER, pdb, urlf, stopf, gof, rate, LAG_SECS, stderr=subprocess.DEVNULL)
    url = wait_file(urlf)
    f = py(FOLLOWER, rdb, url, readyf, stderr=subprocess.DEVNULL)
    wait_file(readyf)
    rstop = d / "rstop"
    rd = py(READER, rdb, rstop)
    cpu0, t0 = cpu_secs(f.pid), time.monotonic()
    gof.touch()
    n = int(wait_file(stopf, timeout=LAG_SECS + 60))
    cpu1, t1 = cpu_secs(f.pid), time.monotonic()
    time.sleep(0.2)  # let the last commit arrive before the reader stops (measurement tail)
    rstop.touch()
    lags = json.loads(rd.communicate(timeout=60)[0])
    readyf.unlink()
    follow = json.loads(f.communicate(timeout=60)[0])
    stopf.unlink()
    w.wait(timeout=60)
    if follow["errors"]:
        raise SystemExit(f"bench_http: the follower had errors: {follow}")
    return {"rate": rate, "commits": n, "seen": len(lags), "p50": pct(lags, 0.5), "p99": pct(lags, 0.99),
            "max": max(lags), "cores": (cpu1 - cpu0) / (t1 - t0)}


def load_primary(pdb: Path, boot_mb: int | None) -> None:
    import apsw

    c = apsw.Connection(str(pdb), vfs="unix")
    c.execute("PRAGMA journal_mode=WAL").fetchall()
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    if boot_mb:
        c.execute("BEGIN")
        for _ in range(boot_mb - 1):
            c.execute("INSERT INTO t(v) VALUES (randomblob(?))", ((1 << 20) - 2048,))
        c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    c.close()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-http."))
    try:
        lag = []
        for rate in RATES:
            r = lag_run(tmp, rate)
            print(f"bench_http: {rate}/s: p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms max {r['max']:.1f} ms, follower {r['cores']:.2f} cores", flush=True)
            lag.append(r)

        # Catch-up over HTTP.
        import apsw

        boot = apsw.Connection(":memory:")
        boot.enable_load_extension(True)
        boot.load_extension(EXT)
        d = tmp / "catchup"
        d.mkdir()
        pdb, rdb, urlf = d / "p.db", d / "r.db", d / "url"
        load_primary(pdb, None)
        p = apsw.Connection(str(pdb))
        p.execute("SELECT repl_primary()").fetchall()
        p.execute("SELECT repl_config('snapshot_bytes', 0)").fetchall()
        srv = py(SERVE, pdb, urlf)
        url = wait_file(urlf)
        r = apsw.Connection(str(rdb))
        start = r.execute("SELECT repl_sync(?)", (url,)).fetchone()[0]
        r.close()
        log0 = json.loads(p.execute("SELECT repl_status()").fetchone()[0])["log"]["bytes"]
        for _ in range(TXNS):
            p.execute("INSERT INTO t(v) SELECT randomblob(3000) FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4)")
        want = p.execute("SELECT repl_lsn(), repl_checksum()").fetchone()
        log_mib = (json.loads(p.execute("SELECT repl_status()").fetchone()[0])["log"]["bytes"] - log0) / 2**20
        p.close()
        out = json.loads(py(CATCHUP, rdb).communicate(timeout=300)[0])
        if (out["lsn"], out["checksum"]) != tuple(want):
            raise SystemExit(f"bench_http: catch-up ended at {out}, primary {want}")
        catch = {"txns": want[0] - start, "secs": out["secs"], "mib": log_mib}
        urlf.unlink()
        srv.wait(timeout=60)
        print(f"bench_http: catch-up {catch}", flush=True)

        # Bootstrap of BOOT_MB over HTTP vs cp.
        d = tmp / "boot"
        d.mkdir()
        pdb, urlf = d / "p.db", d / "url"
        load_primary(pdb, BOOT_MB)
        p = apsw.Connection(str(pdb))
        p.execute("SELECT repl_primary()").fetchall()
        checksum = p.execute("SELECT repl_checksum()").fetchone()[0]
        p.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        p.close()
        size = pdb.stat().st_size
        srv = py(SERVE, pdb, urlf)
        url = wait_file(urlf)
        cp_s, boot_s = [], []
        for i in range(3):
            dst = d / f"copy{i}.db"
            t = time.perf_counter()
            subprocess.run(["cp", str(pdb), str(dst)], check=True)
            subprocess.run(["sync", str(dst)], check=True)
            cp_s.append(time.perf_counter() - t)
            dst.unlink()
            rep = d / f"r{i}.db"
            out = json.loads(py(BOOT, rep, url).communicate(timeout=600)[0])
            if out["checksum"] != checksum:
                raise SystemExit(f"bench_http: bootstrap checksum {out['checksum']} != {checksum}")
            boot_s.append(out["secs"])
            for f_ in d.glob(f"r{i}.db*"):
                shutil.rmtree(f_) if f_.is_dir() else f_.unlink()
        urlf.unlink()
        srv.wait(timeout=60)
        mib = size / 2**20
        cp_rate, boot_rate = mib / statistics.median(cp_s), mib / statistics.median(boot_s)

        lines = [
            "",
            f"- Command: `make bench` (scripts/bench_http.py; REPL_BENCH_LAG_RATES={','.join(map(str, RATES))}, "
            f"REPL_BENCH_LAG_SECS={LAG_SECS:g}, REPL_BENCH_HTTP_TXNS={TXNS}, REPL_BENCH_HTTP_BOOT_MB={BOOT_MB}); 2-core VM, "
            "primary synchronous=NORMAL (a commit is served once the group fsync made it durable)",
            "- Lag = a stock reader on the replica sees the commit's wall-clock stamp, minus the stamp "
            "(commit on the primary -> visible on a following replica: group fsync + long-poll answer + apply + publish). "
            "Target: p50 <= 2 ms, p99 <= 7 ms. Follower CPU = CPU seconds of the replica process / wall seconds.",
            "",
            "| commits/s | commits | seen by reader | lag p50 | lag p99 | lag max | follower CPU |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['rate']} | {r['commits']} | {r['seen']} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['max']:.1f} ms | {r['cores']:.2f} cores |" for r in lag],
            "",
            "| measurement | value |",
            "|---|---:|",
            f"| catch-up over HTTP: transactions | {catch['txns']} |",
            f"| catch-up over HTTP: MiB/s (log records) | {catch['mib'] / catch['secs']:.0f} |",
            f"| catch-up over HTTP: transactions/s | {catch['txns'] / catch['secs']:.0f} |",
            f"| bootstrap {mib:.0f} MiB over HTTP (median of 3) | {statistics.median(boot_s):.2f} s, {boot_rate:.0f} MiB/s |",
            f"| cp + sync of the same file (median of 3) | {statistics.median(cp_s):.2f} s, {cp_rate:.0f} MiB/s |",
            f"| bootstrap vs cp | {boot_rate / cp_rate:.2f}x |",
            "",
        ]
        write_section("HTTP transport: replication lag, catch-up, bootstrap (loopback)", lines)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Synchronous replication benchmark (part of `make bench`; issue 16): commit latency and
throughput of one writer at `sync_replicas` 0, 1 and 2 and each `sync_level`, next to plain
SQLite, on loopback.

Every configuration runs in a fresh directory: a writer process (a primary with
synchronous=NORMAL serving its log with `repl_primary('127.0.0.1:0')`) and, for the replicated
rows, two follower processes (`repl_follow(url)`, long-polling), attached before the first timed
commit so the serving cost is the same at every `sync_replicas`. The writer commits COMMITS
single-row INSERTs back to back and reports each COMMIT's latency. "plain" is the same writer
without the extension. ROUNDS interleaved rounds; the table shows medians over rounds.

sqlite-replica's followers acknowledge an LSN by asking for the next one, which they do once it
is applied and their WAL fsynced, so the three levels wait for the same moment (docs/SQL.md,
`sync_level`); the rows show what that costs.

Writes its section to BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
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
COMMITS = int(os.environ.get("REPL_BENCH_SYNC_COMMITS", "2000"))
ROUNDS = int(os.environ.get("REPL_BENCH_SYNC_ROUNDS", "3"))

# argv: db, mode (plain | primary), sync_replicas, level, url-file, go-file, commits
WRITER = f"""
import apsw, json, os, sys, time
db, mode, n_sync, level, url_file, go_file, commits = sys.argv[1:8]
if mode == "primary":
    boot = apsw.Connection(":memory:"); boot.enable_load_extension(True); boot.load_extension({EXT!r})
p = apsw.Connection(db); p.setbusytimeout(5000)
p.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL").fetchall()
p.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
if mode == "primary":
    p.execute("SELECT repl_primary('127.0.0.1:0')").fetchall()
    url = json.loads(p.execute("SELECT repl_status()").fetchone()[0])["server"]["url"]
else:
    url = ""
open(url_file + ".tmp", "w").write(url); os.rename(url_file + ".tmp", url_file)
deadline = time.time() + 60
while not os.path.exists(go_file):
    if time.time() > deadline:
        sys.exit("no start signal within 60 s")
    time.sleep(0.01)  # start signal from the driver (not synchronisation of data)
if mode == "primary":
    p.execute("SELECT repl_config('sync_timeout_ms', 10000)").fetchall()
    p.execute("SELECT repl_config('sync_level', ?)", (level,)).fetchall()
    p.execute("SELECT repl_config('sync_replicas', ?)", (int(n_sync),)).fetchall()
v = "x" * 100
lat = []
start = time.perf_counter()
for i in range(int(commits)):
    t0 = time.perf_counter()
    p.execute("INSERT INTO t(v) VALUES (?)", (v,))
    lat.append(time.perf_counter() - t0)
wall = time.perf_counter() - start
timeouts = 0
if mode == "primary":
    st = json.loads(p.execute("SELECT repl_status()").fetchone()[0])
    timeouts = (st.get("sync") or {{}}).get("timeouts", 0)
print(json.dumps({{"lat": lat, "wall": wall, "timeouts": timeouts}}))
"""

FOLLOWER = f"""
import apsw, os, sys, time
boot = apsw.Connection(":memory:"); boot.enable_load_extension(True); boot.load_extension({EXT!r})
r = apsw.Connection(sys.argv[1]); r.setbusytimeout(5000)
r.execute("SELECT repl_follow(?)", (sys.argv[2],)).fetchall()
open(sys.argv[3], "w").write("ready")
while os.path.exists(sys.argv[3]):
    time.sleep(0.05)  # follow (on the extension's threads) until the driver is done
"""

CONFIGS = [("plain", 0, "applied", 0)]
CONFIGS += [("primary", 0, "applied", 2)]
CONFIGS += [("primary", n, lvl, 2) for n in (1, 2) for lvl in ("received", "durable", "applied")]


def wait_file(path: Path, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited: {proc.stderr.read() if proc.stderr else ''}")
        if time.time() > deadline:
            raise SystemExit(f"{what}: not ready within {timeout} s")
        time.sleep(0.01)


def run(mode: str, n_sync: int, level: str, followers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
        d = Path(d)
        url_file, go = d / "url", d / "go"
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(d / "p.db"), mode, str(n_sync), level,
                              str(url_file), str(go), str(COMMITS)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        fs = []
        try:
            wait_file(url_file, w, "writer")
            url = url_file.read_text()
            for i in range(followers):
                ready = d / f"ready{i}"
                f = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(d / f"r{i}.db"), url, str(ready)],
                                     stderr=subprocess.PIPE, text=True)
                fs.append((f, ready))
                wait_file(ready, f, f"follower {i}")
            go.write_text("go")
            out, err = w.communicate(timeout=600)
            if w.returncode != 0:
                raise SystemExit(f"writer failed: {err}")
            return json.loads(out.strip().splitlines()[-1])
        finally:
            for f, ready in fs:
                ready.unlink(missing_ok=True)
            for f, _ in fs:
                try:
                    f.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    f.kill()
            if w.poll() is None:
                w.kill()


def main() -> None:
    results: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(ROUNDS):
        for c in CONFIGS:
            res = run(*c)
            results[c].append(res)
            lat = sorted(res["lat"])
            print(f"round {r + 1} {c[0]} sync_replicas={c[1]} level={c[2]}: "
                  f"p50 {lat[len(lat) // 2] * 1e6:.0f} µs, {COMMITS / res['wall']:.0f} commits/s", file=sys.stderr)
    plain_p50 = statistics.median(sorted(x["lat"])[len(x["lat"]) // 2] for x in results[CONFIGS[0]])
    lines = [
        "",
        f"One writer, {COMMITS} single-row INSERT commits per configuration at synchronous=NORMAL, two "
        f"followers long-polling over loopback HTTP for every replicated row; medians of {ROUNDS} "
        "interleaved rounds (`scripts/bench_sync.py`). A follower acknowledges an LSN by asking for the "
        "next one, after applying it and fsyncing its WAL, so every level waits for the same moment.",
        "",
        "| configuration | followers | commit p50 | commit p99 | commits/s | p50 added to plain | timeouts |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in CONFIGS:
        rs = results[c]
        p50 = statistics.median(sorted(x["lat"])[len(x["lat"]) // 2] for x in rs)
        p99 = statistics.median(sorted(x["lat"])[int(len(x["lat"]) * 0.99)] for x in rs)
        tput = statistics.median(COMMITS / x["wall"] for x in rs)
        name = "plain SQLite" if c[0] == "plain" else (
            "primary, sync_replicas=0 (asynchronous)" if c[1] == 0 else f"sync_replicas={c[1]}, level={c[2]}")
        lines.append(f"| {name} | {c[3]} | {p50 * 1e6:.0f} µs | {p99 * 1e6:.0f} µs | {tput:.0f} | "
                     f"{(p50 - plain_p50) * 1e6:+.0f} µs | {sum(x['timeouts'] for x in rs)} |")
    write_section("Synchronous replication (issue 16)", lines)


if __name__ == "__main__":
    main()

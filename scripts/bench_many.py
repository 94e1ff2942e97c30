#!/usr/bin/env python3
"""Many databases in one process (issue 18): threads, file descriptors and RSS of a process
holding 1, 100 and 1,000 primaries OPEN at once (each: WAL, one table, one insert), next to the
same number of plain WAL databases without a role; then after closing them all; and the cost of
reopening a closed primary (resume from disk) and writing one row.

Each row is measured in a fresh child process (python3 + apsw, the extension loaded first), so
the figures are that process's own: /proc/self/task, /proc/self/fd, VmRSS. The soft descriptor
limit is raised to the hard limit (1,000 open primaries need about 9,000 descriptors).

Usage: python3 scripts/bench_many.py [--counts 1,100,1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXT = os.environ.get("REPLICA_EXT", str(REPO / "build" / "libreplica"))

CHILD = r"""
import apsw, json, os, resource, sys, time
n, root, primary, ext = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
m = apsw.Connection(":memory:")
m.enable_load_extension(True)
m.load_extension(ext)
def counts():
    rss = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd")), "rss": rss}
base = counts()
conns = []
t0 = time.perf_counter()
for i in range(n):
    c = apsw.Connection(f"{root}/d{i}.db")
    c.execute("pragma synchronous=normal; pragma journal_mode=wal; create table t(x)").fetchall()
    if primary:
        c.execute("select repl_primary()").fetchall()
    c.execute("insert into t values(?)", (i,))
    conns.append(c)
made_s = time.perf_counter() - t0
open_ = counts()
for c in conns:
    c.close()
conns = []
closed = counts()
reopen = []
for i in range(min(n, 200)):
    t = time.perf_counter()
    c = apsw.Connection(f"{root}/d{i}.db")
    c.execute("insert into t values(-1)")
    c.close()
    reopen.append(time.perf_counter() - t)
print(json.dumps({"base": base, "open": open_, "closed": closed, "made_s": made_s, "reopen": reopen}))
"""


def run(n: int, primary: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-many-") as root:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), root, "1" if primary else "0", EXT],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"child failed: {out.stderr}")
        return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,100,1000")
    args = ap.parse_args()
    counts = [int(x) for x in args.counts.split(",")]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "",
        "One child process per row (python3 + apsw, extension loaded); `N` databases opened and kept",
        "open at once (WAL, one table, one insert), then all closed. Threads, descriptors and RSS",
        "are the process's own (/proc/self), shown as the increase over the process before the first",
        "open. `plain` rows are the same databases without a role (the extension loaded, no",
        "`repl_primary()`). Reopen = open a closed database (the primary resumes from disk), insert",
        "one row, close; median over up to 200 databases.",
        "",
        "| N open | kind | threads (+) | fds (+) | fds per db | RSS (+ MiB) | RSS per db (KiB) | after closing all: threads / fds / RSS (+ MiB) | create ms/db | reopen+write+close ms |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for n in counts:
        for kind in ("plain", "primary"):
            r = run(n, kind == "primary")
            b, o, c = r["base"], r["open"], r["closed"]
            lines.append(
                f"| {n} | {kind} | {o['threads'] - b['threads']} | {o['fds'] - b['fds']} | "
                f"{(o['fds'] - b['fds']) / n:.1f} | {mib(o['rss'] - b['rss'])} | {(o['rss'] - b['rss']) / n / 1024:.0f} | "
                f"{c['threads'] - b['threads']} / {c['fds'] - b['fds']} / {mib(c['rss'] - b['rss'])} | "
                f"{r['made_s'] / n * 1000:.2f} | {statistics.median(r['reopen']) * 1000:.2f} |")
            print(lines[-1], flush=True)
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmd import write_section

    write_section("Many databases in one process: threads, descriptors, memory", lines)


if __name__ == "__main__":
    main()

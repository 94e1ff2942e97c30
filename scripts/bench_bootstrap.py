#!/usr/bin/env python3
"""Bootstrap benchmark (part of `make bench`): a new replica of a 256 MiB primary, against `cp`.

An existing database of REPL_BENCH_BOOT_MB MiB (default 256; random blobs, so nothing compresses)
becomes a primary (its first snapshot holds every page); then, in a fresh process each time:
  * `cp` of the primary's database file (after a TRUNCATE checkpoint: the whole content);
  * `repl_sync(primary)` into a new, empty file: snapshot read + verified + written + fsynced.
Both are run ROUNDS times, interleaved; the table reports the medians in MB/s (MiB of database
per second). The replica is checked against the primary (`repl_checksum()`) after every round.

Appends its section to BENCHMARKS.md (bench.py rewrites the file first).
"""

from __future__ import annotations

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
MB = int(os.environ.get("REPL_BENCH_BOOT_MB", "256"))
ROUNDS = int(os.environ.get("REPL_BENCH_BOOT_ROUNDS", "3"))

CHILD = r"""
import apsw, sys, time
boot = apsw.Connection(":memory:")
boot.enable_load_extension(True)
boot.load_extension(sys.argv[1])
t0 = time.perf_counter()
r = apsw.Connection(sys.argv[3])
lsn = r.execute("SELECT repl_sync(?)", (sys.argv[2],)).fetchone()[0]
t1 = time.perf_counter()
print(t1 - t0, lsn, r.execute("SELECT repl_checksum()").fetchone()[0])
"""


def load() -> None:
    boot = apsw.Connection(":memory:")
    boot.enable_load_extension(True)
    boot.load_extension(EXT)


def make_primary(path: Path) -> tuple[str, int]:
    c = apsw.Connection(str(path), vfs="unix")
    c.execute("PRAGMA journal_mode=WAL").fetchall()
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    chunk = 1 << 20
    c.execute("BEGIN")
    for _ in range(MB - 1):
        c.execute("INSERT INTO t(v) VALUES (randomblob(?))", (chunk - 2048,))
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    c.close()
    load()
    p = apsw.Connection(str(path))
    p.execute("SELECT repl_primary()").fetchall()
    checksum = p.execute("SELECT repl_checksum()").fetchone()[0]
    p.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    size = path.stat().st_size
    p.close()
    return checksum, size


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-boot."))
    try:
        primary = tmp / "primary.db"
        t0 = time.perf_counter()
        checksum, size = make_primary(primary)
        print(f"bench_bootstrap: primary of {size / 2**20:.0f} MiB ready in {time.perf_counter() - t0:.1f} s", flush=True)
        cp_s, boot_s = [], []
        for i in range(ROUNDS):
            dst = tmp / f"copy{i}.db"
            t = time.perf_counter()
            subprocess.run(["cp", str(primary), str(dst)], check=True)
            subprocess.run(["sync", str(dst)], check=True)
            cp_s.append(time.perf_counter() - t)
            dst.unlink()
            rep = tmp / f"replica{i}.db"
            out = subprocess.run(
                [sys.executable, "-c", CHILD, EXT, str(primary), str(rep)],
                check=True, capture_output=True, text=True,
            ).stdout.split()
            boot_s.append(float(out[0]))
            if out[2] != checksum:
                raise SystemExit(f"bench_bootstrap: replica checksum {out[2]} != primary {checksum}")
            for p in tmp.glob(f"replica{i}.db*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            print(f"  round {i + 1}: cp+sync {cp_s[-1]:.2f} s, bootstrap {boot_s[-1]:.2f} s", flush=True)
        mib = size / 2**20
        cp_rate = mib / statistics.median(cp_s)
        boot_rate = mib / statistics.median(boot_s)
        lines = [
            "",
            f"- Primary: {mib:.0f} MiB of random blobs ({size} bytes), made a primary afterwards (its first snapshot holds every page)",
            f"- Command: `make bench` (scripts/bench_bootstrap.py; REPL_BENCH_BOOT_MB={MB}, {ROUNDS} interleaved rounds, medians)",
            "- `cp` = `cp` of the checkpointed database file + `sync` of the copy; bootstrap = a new process: load the extension, "
            "`repl_sync(primary)` into a new empty file (snapshot read and checksum-verified, written, fsynced), checked equal by `repl_checksum()`",
            "",
            "| | seconds (median) | MiB/s | vs cp |",
            "|---|---:|---:|---:|",
            f"| cp + sync | {statistics.median(cp_s):.2f} | {cp_rate:.0f} | 1.00× |",
            f"| repl_sync bootstrap | {statistics.median(boot_s):.2f} | {boot_rate:.0f} | {boot_rate / cp_rate:.2f}× |",
            "",
            "Per round (cp, bootstrap) seconds: " + ", ".join(f"({a:.2f}, {b:.2f})" for a, b in zip(cp_s, boot_s)),
            "",
        ]
        write_section("Bootstrap of a new replica (directory source) vs `cp`", lines)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""make bench: the write overhead of a primary, in one run.

Workload: N single-row insert transactions (one autocommit INSERT each, ~100-byte rows) into a
fresh WAL database, at synchronous=NORMAL and at synchronous=FULL, in three variants:

  unix     plain SQLite on the stock `unix` VFS (apsw `vfs='unix'`): the baseline without our shim
  plain    plain SQLite through the `replica` VFS (extension loaded, database NOT a primary)
  primary  the same, after `SELECT repl_primary()`: every commit is captured into the log

All cells are measured in one process and interleaved: every round runs every (synchronous,
variant) cell once, the variant order rotating from round to round, each run on a fresh file in a
temp directory. The result per cell is the median over the rounds of the mean µs per commit.
The target is primary/plain ≤ 1.10× at both settings; plain/unix is the cost of the VFS shim
alone. For primary runs `repl_lsn()` must have grown by exactly N, or the benchmark fails.

Environment: BENCH_N (commits per run, ≥ 5000, default 5000), BENCH_ROUNDS (≥ 3, default 11: one WAL restart that finds the log behind moves a 5000-commit round by ~0.5 µs, so the median needs the rounds),
BENCH_DIR (where the temp directory goes; default the system temp dir; it must be a real disk
for the FULL numbers to mean anything). Prints a table and writes BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apsw

REPO = Path(__file__).resolve().parent.parent
EXT = REPO / "build" / "libreplica.so"
OUT = REPO / "BENCHMARKS.md"

VARIANTS = ("unix", "plain", "primary")
LABELS = {
    "unix": "plain, unix VFS",
    "plain": "plain, replica VFS",
    "primary": "primary",
}
SYNCS = ("NORMAL", "FULL")
TARGET = 1.10
ROW_BYTES = 100


def env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"bench: {name}={raw!r} is not an integer")
    if value < minimum:
        sys.exit(f"bench: {name}={value} is below the minimum {minimum}")
    return value


N = env_int("BENCH_N", 5000, 5000)
ROUNDS = env_int("BENCH_ROUNDS", 11, 3)


def one(conn: apsw.Connection, sql: str):
    return conn.execute(sql).fetchall()[0][0]


def run(tmp: Path, variant: str, sync: str, rnd: int, rows: list[str]) -> float:
    """One run: a fresh database, N autocommit inserts; returns the mean µs per commit."""
    path = tmp / f"{variant}-{sync.lower()}-{rnd + 1}.db"
    conn = apsw.Connection(str(path), vfs="unix") if variant == "unix" else apsw.Connection(str(path))
    mode = one(conn, "PRAGMA journal_mode=WAL")
    assert mode == "wal", f"{variant}: journal_mode is {mode!r}"
    conn.execute(f"PRAGMA synchronous={sync}")
    status = json.loads(one(conn, "SELECT repl_status()"))
    through_vfs = status.get("through_vfs")  # informational key: checked when present
    if through_vfs is not None:
        assert through_vfs == (variant != "unix"), f"{variant}: repl_status() = {status}"
    if variant == "primary":
        one(conn, "SELECT repl_primary()")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    role = one(conn, "SELECT repl_role()")
    assert role == ("primary" if variant == "primary" else None), f"{variant}: repl_role() = {role!r}"
    start_lsn = one(conn, "SELECT repl_lsn()")

    cur = conn.cursor()
    sql = "INSERT INTO t(v) VALUES (?)"
    gc.disable()
    try:
        t0 = time.perf_counter()
        for v in rows:
            cur.execute(sql, (v,))
        elapsed = time.perf_counter() - t0
    finally:
        gc.enable()

    assert one(conn, "SELECT count(*) FROM t") == N
    end_lsn = one(conn, "SELECT repl_lsn()")
    if variant == "primary":
        assert end_lsn - start_lsn == N, f"primary: repl_lsn() went {start_lsn} -> {end_lsn}, expected +{N}"
    else:
        assert end_lsn is None, f"{variant}: repl_lsn() = {end_lsn!r} on a database without a role"
    conn.close()
    for p in tmp.glob(path.name + "*"):  # the db, -wal, -shm and the -replica/ log directory
        if p.is_dir():
            for q in sorted(p.rglob("*"), reverse=True):
                q.rmdir() if q.is_dir() else q.unlink()
            p.rmdir()
        else:
            p.unlink()
    return elapsed * 1e6 / N


def filesystem_of(path: Path) -> str:
    """`fstype (device)` of the mount holding `path`, from /proc/mounts."""
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}, mounted on {best[0] or '?'})"


def machine(loader: apsw.Connection) -> dict[str, str]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    debug = one(loader, "SELECT repl_debug()").splitlines()
    host = next((l.strip() for l in debug if l.strip().startswith("host SQLite")), "host SQLite ?")
    return {
        "nproc": sh("nproc"),
        "cpu": cpu,
        "kernel": f"{platform.system()} {sh('uname', '-r')}",
        "sqlite": host.removeprefix("host ").strip(),
        "extension": debug[0].strip() if debug else "?",
        "build": next((l.strip() for l in debug if l.strip().startswith("build")), "build ?"),
        "apsw": apsw.apsw_version(),
        "python": platform.python_version(),
    }


def main() -> int:
    if not EXT.is_file():
        sys.exit(f"bench: {EXT} not found: run `make build` first (or `make bench`, which builds)")
    # Load once per process, before any benchmark database is opened: from then on every
    # connection goes through the `replica` VFS (the default) unless it names `unix`.
    loader = apsw.Connection(":memory:")
    loader.enable_load_extension(True)
    loader.load_extension(str(EXT.with_suffix("")))
    info = machine(loader)

    # ~100-byte rows, generated before any timing: 50 random bytes as 100 hex characters.
    rows = [os.urandom(ROW_BYTES // 2).hex() for _ in range(N)]
    results: dict[tuple[str, str], list[float]] = {(s, v): [] for s in SYNCS for v in VARIANTS}

    base = os.environ.get("BENCH_DIR") or None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="replica-bench-", dir=base) as d:
        tmp = Path(d)
        fs = filesystem_of(tmp.resolve())
        print(f"bench: N={N}, {ROUNDS} rounds, temp dir {tmp} on {fs}", file=sys.stderr)
        for rnd in range(ROUNDS):
            order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[: rnd % len(VARIANTS)]
            for sync in SYNCS:
                for variant in order:
                    us = run(tmp, variant, sync, rnd, rows)
                    results[(sync, variant)].append(us)
                    print(f"bench: round {rnd + 1}/{ROUNDS} {sync:<6} {variant:<7} {us:8.1f} µs/commit",
                          file=sys.stderr)
    runtime = time.monotonic() - started

    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = {s: med[(s, "primary")] / med[(s, "plain")] for s in SYNCS}
    shim = {s: med[(s, "plain")] / med[(s, "unix")] for s in SYNCS}
    total = {s: med[(s, "primary")] / med[(s, "unix")] for s in SYNCS}
    met = all(r <= TARGET for r in ratio.values())

    table = [
        "| synchronous | plain, unix VFS µs/commit | plain, replica VFS µs/commit | primary µs/commit "
        "| **primary / plain** | plain replica / unix (shim) | primary / unix |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in SYNCS:
        table.append(
            f"| {s} | {med[(s, 'unix')]:.1f} | {med[(s, 'plain')]:.1f} | {med[(s, 'primary')]:.1f} "
            f"| **{ratio[s]:.2f}×** | {shim[s]:.2f}× | {total[s]:.2f}× |"
        )
    raw = ["| synchronous | variant | µs/commit per round (in run order) | min | max |", "|---|---|---|---:|---:|"]
    for s in SYNCS:
        for v in VARIANTS:
            xs = results[(s, v)]
            raw.append(f"| {s} | {LABELS[v]} | {' · '.join(f'{x:.1f}' for x in xs)} | {min(xs):.1f} | {max(xs):.1f} |")

    verdict = (
        f"Target primary / plain ≤ {TARGET:.2f}× at both settings: **met** "
        f"(NORMAL {ratio['NORMAL']:.2f}×, FULL {ratio['FULL']:.2f}×)."
        if met
        else f"Target primary / plain ≤ {TARGET:.2f}× at both settings: **NOT met** "
        f"(NORMAL {ratio['NORMAL']:.2f}×, FULL {ratio['FULL']:.2f}×)."
    )
    env_shown = " ".join(f"{k}={os.environ[k]}" for k in ("BENCH_N", "BENCH_ROUNDS", "BENCH_DIR") if k in os.environ)
    command = f"{env_shown} make bench" if env_shown else "make bench"
    text = "\n".join([
        "# Benchmarks",
        "",
        "Generated by `make bench` (scripts/bench.py); rerun it to refresh this file.",
        "",
        "## Primary write overhead: single-row insert transactions",
        "",
        f"- Machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}; kernel {info['kernel']}",
        f"- Host: {info['sqlite']} as reported by `repl_debug()` (apsw {info['apsw']}'s own library); "
        f"{info['extension']}, {info['build']}; Python {info['python']}",
        f"- Files: a fresh temp directory on {fs}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Command: `{command}` (N={N} commits per run, {ROUNDS} interleaved rounds; runtime {runtime:.0f} s)",
        "",
        f"Workload: per run, a fresh WAL database, `CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)`, then "
        f"{N} × autocommit `INSERT INTO t(v) VALUES (?)` with a {ROW_BYTES}-byte value, one transaction "
        "each, from one apsw connection; the time of the insert loop divided by N (so it includes "
        "apsw's per-call cost, the same in every variant). Variants: *plain, unix VFS* opens with "
        "`vfs='unix'` (no shim); *plain, replica VFS* is the default after loading the extension, "
        "database not a primary; *primary* is the same after `SELECT repl_primary()` "
        f"(checked: `repl_lsn()` grew by exactly {N}). Every round runs every cell once, the variant "
        "order rotating; the value is the median of the rounds.",
        "",
        *table,
        "",
        verdict,
        "",
        "Where the cost comes from, and the planned fix: docs/ARCHITECTURE.md, *Known costs*.",
        "",
        "### Per-round values",
        "",
        *raw,
        "",
    ])
    print(text)
    OUT.write_text(text)
    print(f"bench: wrote {OUT.relative_to(REPO)} ({runtime:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Smoke version of the torture soak (issue 6 item 1): scripts/torture.py for ~60 s with one
seed, as part of `make test`. `make torture` runs the full length with several seeds.

The soak runs in its own process (it starts ~10 more: serving primary, writers, followers behind
fault proxies, stock readers) and must exit 0: no invariant violation, no reader error other
than SQLITE_BUSY, no divergence between any replica and the primary, no process dying by itself.

Knobs: REPL_TORTURE_SMOKE_SEED (default 7), REPL_TORTURE_SMOKE_SECS (default 60).

A second smoke runs ``--failover`` for REPL_TORTURE_FAILOVER_SECS (default 30; about 40 s with
start and end): an etcd of its own, the primary killed -9 at least once and replaced through
etcd, the killed node back as a replica, every node's checksum equal at the end, no epoch
written by two nodes (scripts/torture.py's docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO, require_extension

SEED = int(os.environ.get("REPL_TORTURE_SMOKE_SEED", "7"))
SECS = float(os.environ.get("REPL_TORTURE_SMOKE_SECS", "60"))
FAILOVER_SECS = float(os.environ.get("REPL_TORTURE_FAILOVER_SECS", "30"))


def run_torture(tmp, secs: float, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    require_extension()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "torture.py"), "--seed", str(SEED), "--secs", str(secs), "--dir", str(tmp),
         *extra],
        capture_output=True,
        text=True,
        timeout=secs + 240,
        cwd=REPO,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert lines, f"no summary (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    s = json.loads(lines[-1][len("SUMMARY "):])
    print(lines[-1])  # shown with pytest -rP / -s
    detail = f"summary: {s}\nlog tail:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-2000:]}\nwork dir: {tmp}"
    return proc, s, detail


def test_torture_failover_smoke(tmp):
    proc, s, detail = run_torture(tmp, FAILOVER_SECS, "--failover")
    assert proc.returncode == 0, detail
    assert s["invariant_violations"] == 0 and s["reader_errors"] == 0 and s["divergences"] == 0, detail
    assert not s["failures"], detail
    assert s["failovers"] >= 1 and s["rejoins"] >= 1 and s["transactions"] > 100, detail
    assert all(len(nodes) == 1 for nodes in s["epochs_by_node"].values()), detail


def test_torture_smoke(tmp):
    proc, s, detail = run_torture(tmp, SECS)
    assert proc.returncode == 0, detail
    assert s["invariant_violations"] == 0 and s["reader_errors"] == 0 and s["divergences"] == 0, detail
    assert not s["failures"], detail
    assert s["transactions"] > 100 and s["invariant_checks"] > 1000 and s["faults_total"] >= 10, detail

"""The minimal programs in examples/ run and end with "ok" (issue 5 item 4): the Python one
(apsw) and the Rust one (rusqlite; `cargo test --release` in `make test` builds it first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import require_extension

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str]) -> str:
    env = {**os.environ, "REPLICA_EXT": require_extension()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().splitlines()[-1] == "ok", proc.stdout
    return proc.stdout


def test_python_example():
    out = run([sys.executable, "examples/python/replicate.py"])
    assert "repl_exec -> LSN" in out and "refused" in out


def test_rust_example():
    exe = REPO / "target" / "release" / "examples" / "rust-replica"
    if not exe.exists():
        subprocess.run(["cargo", "build", "--release", "--example", "rust-replica"], cwd=REPO, check=True)
    out = run([str(exe)])
    assert "replica checksum" in out and "written through the replica" in out

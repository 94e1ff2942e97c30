"""Every binding, first try (issue 11): the examples for Go (mattn/go-sqlite3), Node
(better-sqlite3), Tcl (libsqlite3-tcl) and Python's standard-library sqlite3 each run a primary
and a following replica in two processes, forward a write with repl_exec, wait for it with
repl_wait, compare repl_checksum() and end with "ok". The Go package's tests also pin down the
naive ConnectHook trap (examples/go/trap_test.go).

`make deps` installs every toolchain these need; a missing one is a failure (naming what to run),
never a skip, so CI cannot pass without having run them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import require_extension

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MATTN = Path("/usr/share/gocode/src/github.com/mattn/go-sqlite3")
BETTER_SQLITE3 = EXAMPLES / "node" / "node_modules" / "better-sqlite3" / "build" / "Release" / "better_sqlite3.node"
STDLIB_PYTHON = "/usr/bin/python3"


def need(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"{what} is missing: run `make deps` (it installs it)")


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"`{name}` ({package})")
    return str(path)


def go_env() -> dict[str, str]:
    """Offline: no module proxy, no toolchain download; go.mod replaces mattn by Debian's copy."""
    env = {**os.environ, "REPLICA_EXT": require_extension(), "GOPROXY": "off", "GOTOOLCHAIN": "local",
           "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "1"}
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(REPO / "target" / "go-cache")
    return env


def run(cmd: list[str], cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    env = env or {**os.environ, "REPLICA_EXT": require_extension()}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    took = time.monotonic() - start
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode}) after {took:.1f} s:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
    print(f"{cmd[0]}: {took:.2f} s")
    return proc.stdout


def check_example(out: str) -> None:
    """What a user checks: the write made it through, both sides agree, the last line is ok."""
    lines = out.strip().splitlines()
    assert lines and lines[-1] == "ok", out
    assert "written through the replica" in out, out
    m = re.search(r"^primary LSN (\d+) checksum (\w+); replica LSN (\d+) checksum (\w+)$", out, re.M)
    assert m, out
    assert m[1] == m[3] and m[2] == m[4], f"LSN or checksum differ: {m[0]}"
    assert "a local write on the replica: attempt to write a readonly database" in out, out


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory) -> str:
    tool("go", "golang-go")
    need(MATTN.is_dir(), f"{MATTN} (golang-github-mattn-go-sqlite3-dev)")
    exe = tmp_path_factory.mktemp("go") / "go-replica"
    run(["go", "build", "-tags", "libsqlite3", "-o", str(exe), "."], cwd=EXAMPLES / "go", env=go_env(), timeout=600)
    return str(exe)


def test_go_example(go_binary):
    check_example(run([go_binary]))


def test_go_connect_hook_trap():
    """go test in examples/go: the naive ConnectHook's first connection fails loudly (or its write
    is captured) and never makes the primary start a new generation; LoadExtension(path, "")
    fails with "undefined symbol"; load-then-open works on every pool connection."""
    tool("go", "golang-go")
    need(MATTN.is_dir(), f"{MATTN} (golang-github-mattn-go-sqlite3-dev)")
    out = run(["go", "test", "-tags", "libsqlite3", "-count=1", "-v", "."], cwd=EXAMPLES / "go", env=go_env(),
              timeout=600)
    for name in ("TestNaiveConnectHookNeverWritesUncaptured", "TestEmptyEntryPointFails", "TestLoadThenOpen",
                 "TestExtensionsFieldDerivesEntryPoint"):
        assert f"--- PASS: {name}" in out, out


def test_node_example():
    tool("node", "nodejs")
    need(BETTER_SQLITE3.exists(), f"{BETTER_SQLITE3.relative_to(REPO)} (npm install --build-from-source in examples/node)")
    check_example(run(["node", "examples/node/replicate.js"]))


def test_tcl_example():
    tclsh = tool("tclsh", "tcl")
    probe = subprocess.run([tclsh], input="puts [package require sqlite3]", capture_output=True, text=True, timeout=30)
    need(probe.returncode == 0, "Tcl's sqlite3 package (libsqlite3-tcl)")
    check_example(run([tclsh, "examples/tcl/replicate.tcl"]))


def test_python_stdlib_example():
    need(os.access(STDLIB_PYTHON, os.X_OK), f"{STDLIB_PYTHON} (python3)")
    probe = subprocess.run(
        [STDLIB_PYTHON, "-c", "import sqlite3; sqlite3.connect(':memory:').enable_load_extension(True)"],
        capture_output=True, text=True, timeout=30,
    )
    assert probe.returncode == 0, f"{STDLIB_PYTHON}'s sqlite3 cannot load extensions:\n{probe.stderr}"
    check_example(run([STDLIB_PYTHON, "examples/python-stdlib/replicate.py"]))

"""Failover time on etcd (issue 16, part 4): a primary serving over loopback HTTP with
`repl_config('failover', 'etcd://…')`, two candidate replicas, one local etcd (Debian's
etcd-server; `make deps` installs it). Each round writes a few synchronous commits, kills the
primary with SIGKILL and measures the time until a write forwarded by the losing replica
(`repl_exec`) is accepted by the new primary: lease expiry + election + promotion + the other
replica re-pointing. Lease TTL 2 s (etcd's minimum with its default election timeout).
Writes its section of BENCHMARKS.md (benchmd.write_section)."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "python"))
from benchmd import write_section  # noqa: E402
from test_failover_etcd import TTL_MS, EtcdCluster, failover, setup  # noqa: E402
from helpers import WorkerError, wait_for  # noqa: E402

ROUNDS = 5


def one_round(root: Path) -> tuple[float, float]:
    """(seconds until the new primary leads, seconds until the first forwarded write)."""
    etcd = EtcdCluster(root, 1)
    p, purl, cands = setup(root, etcd, sync=True)
    try:
        for i in range(1, 21):
            p.q("INSERT INTO t VALUES(?, 'x')", [i])
        t0 = time.monotonic()
        p.kill()

        def leader():
            for r in cands:
                st = failover(r)
                if st["role"] == "leader" and st["writes_held"] is None:
                    return (r, time.monotonic())
            return None

        new, led = wait_for(leader, timeout=30, interval=0.01, what="a new leader")
        other = cands[1] if new is cands[0] else cands[0]

        def write():
            try:
                other.one("SELECT repl_exec('INSERT INTO t VALUES(?, 1)', ?)", [json.dumps([1000])])
                return time.monotonic()
            except WorkerError:
                return None

        wrote = wait_for(write, timeout=30, interval=0.01, what="a forwarded write")
        return led - t0, wrote - t0
    finally:
        for r in cands:
            r.close()
        etcd.close()


def main() -> None:
    if shutil.which("etcd") is None:
        sys.exit("etcd is missing: run `make deps` (it installs Debian's etcd-server)")
    leads, writes = [], []
    for n in range(ROUNDS):
        with tempfile.TemporaryDirectory(prefix="bench-failover-") as d:
            led, wrote = one_round(Path(d))
        leads.append(led)
        writes.append(wrote)
        print(f"round {n + 1}: new primary leading after {led:.2f} s, first write accepted after {wrote:.2f} s",
              flush=True)
    fmt = lambda xs: f"{statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f})"  # noqa: E731
    write_section("Failover on etcd: primary killed → first write accepted by the new one", [
        "",
        f"{ROUNDS} rounds, `scripts/bench_failover.py`: one etcd {'3.4'} node, a primary with",
        "`sync_replicas = 1` and two candidate replicas on loopback, lease TTL "
        f"{TTL_MS / 1000:.0f} s; the primary is killed with SIGKILL after 20 synchronous commits.",
        "",
        "| measure (from the kill) | median (min, max) |",
        "|---|---|",
        f"| a candidate leads (promoted, lease held, accepting writes) | {fmt(leads)} |",
        f"| first write forwarded by the other replica (`repl_exec`) accepted | {fmt(writes)} |",
        "",
        "Most of it is the lease: etcd expires a lease up to 500 ms after its TTL; the election,",
        "the promotion and the other replica re-pointing take the rest (polls every 200 ms).",
    ])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Start a primary and two edge gateways, drive them over HTTP, print a latency table.

    python3 examples/gateway/demo.py [--n 200]

* the primary: ``gateway.py --primary p.db`` (owns the primary database, serves its replication
  log, answers the reads the other gateways promote);
* gateway "wait": ``gateway.py --replica w.db --strategy wait`` (its own replica, following);
* gateway "promote": ``gateway.py --replica r.db --strategy promote``.

Then, with one keep-alive HTTP client per gateway (latency = the client's round trip):
local reads without a cookie; writes (POST, forwarded with repl_exec); and read-after-write
sessions: write on one gateway, then read the new note on the OTHER gateway with the
``x-db-session-lsn`` cookie the write returned (wait on one, promote on the other). Every
read-after-write is checked: a stale read makes the demo fail. Everything lives in a
temporary directory and is stopped at the end. Needs ``make build`` (or $REPLICA_EXT).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
COOKIE = "x-db-session-lsn"


class Gateway:
    """A gateway.py process; stdout/stderr go to files (a pipe nobody reads could fill up)."""

    def __init__(self, name: str, args: list[str], workdir: Path):
        self.name, self.err_path = name, workdir / f"{name}.err"
        out_path = workdir / f"{name}.out"
        with open(out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(HERE / "gateway.py"), *args],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (line := out_path.read_text().partition("\n")[0]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {name} did not start:\n{self.err_path.read_text()[-3000:]}")
            time.sleep(0.02)  # polling the ready line, with a deadline
        self.info = json.loads(line)
        self.url = self.info["url"]
        self.http = http.client.HTTPConnection(urllib.parse.urlsplit(self.url).netloc, timeout=30)

    def call(self, method: str, path: str, body: dict | None = None, cookie: str | None = None):
        """(status, JSON body, Set-Cookie session LSN or None, client round trip in ms)."""
        headers = {"Content-Type": "application/json"}
        if cookie is not None:
            headers["Cookie"] = f"{COOKIE}={cookie}"
        data = json.dumps(body).encode() if body is not None else None
        t0 = time.perf_counter()
        self.http.request(method, path, body=data, headers=headers)
        resp = self.http.getresponse()
        doc = json.loads(resp.read())
        ms = (time.perf_counter() - t0) * 1000
        set_cookie = resp.getheader("Set-Cookie") or ""
        lsn = set_cookie.split(";")[0].partition("=")[2] if set_cookie.startswith(COOKIE + "=") else None
        return resp.status, doc, lsn, ms

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the gateway shuts down cleanly
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(n: int, workdir: Path) -> int:
    gateways: list[Gateway] = []
    try:
        p = Gateway("primary", ["--primary", str(workdir / "p.db"), "--serve-log", "127.0.0.1:0"], workdir)
        gateways.append(p)
        common = ["--source", p.info["repl_url"], "--primary-gateway", p.url]
        wait = Gateway("wait", ["--replica", str(workdir / "w.db"), *common, "--strategy", "wait", "--wait-ms", "200"], workdir)
        gateways.append(wait)
        promote = Gateway("promote", ["--replica", str(workdir / "r.db"), *common, "--strategy", "promote"], workdir)
        gateways.append(promote)

        ops = ["local read (no cookie)", "write (POST via repl_exec)",
               "read-after-write, wait", "read-after-write, promote"]
        ms: dict[str, dict[str, list[float]]] = {op: collections.defaultdict(list) for op in ops}
        stale = 0

        def record(op: str, status: int, doc: dict, t: float, want: int) -> None:
            if status != want:
                raise RuntimeError(f"{op}: HTTP {status} {doc}")
            ms[op][doc["route"]].append(t)

        status, doc, _, _ = wait.call("POST", "/notes", {"text": "seed"})
        seed = doc["note"]["id"]
        promote.call("GET", f"/notes/{seed}", cookie=str(doc["lsn"]))  # warm up both paths
        for i in range(n):
            g = (wait, promote)[i % 2]
            status, doc, _, t = g.call("GET", f"/notes/{seed}")
            record(ops[0], status, doc, t, 200)
        for i in range(n):
            # Write on one gateway, read on the OTHER with the session cookie (as a user whose
            # next request lands on another edge): the wait gateway, then the promote gateway.
            for writer, reader, op in ((promote, wait, ops[2]), (wait, promote, ops[3])):
                text = f"note {i} via {writer.name}"
                status, doc, lsn, t = writer.call("POST", "/notes", {"text": text})
                record(ops[1], status, doc, t, 201)
                status, doc, _, t = reader.call("GET", f"/notes/{doc['note']['id']}", cookie=lsn)
                record(op, status, doc, t, 200)
                stale += doc["note"]["text"] != text

        print(f"{n} iterations; latency = client round trip over loopback HTTP, in ms")
        print(f"{'operation':<28} {'route':<18} {'count':>5} {'p50':>7} {'p99':>7} {'max':>7}")
        for op in ops:
            by_route = sorted(ms[op].items())
            if len(by_route) > 1:
                by_route.insert(0, ("(all)", [t for _, ts in by_route for t in ts]))
            for i, (route, ts) in enumerate(by_route):
                print(f"{op if i == 0 else '':<28} {route:<18} {len(ts):>5} {percentile(ts, 0.5):>7.2f} "
                      f"{percentile(ts, 0.99):>7.2f} {max(ts):>7.2f}")
        print(f"stale reads after a write: {stale}")
        return 1 if stale else 0
    except Exception:
        for g in gateways:
            sys.stderr.write(f"--- {g.name} stderr (tail)\n{g.err_path.read_text()[-2000:]}\n")
        raise
    finally:
        for g in gateways:
            g.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="iterations of each operation (default 200)")
    args = ap.parse_args()
    if not os.environ.get("REPLICA_EXT") and not (HERE.parents[1] / "build" / "libreplica.so").exists():
        sys.exit("build/libreplica.so is missing: run `make build` first (or set REPLICA_EXT)")
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp:
        sys.exit(run(args.n, Path(tmp)))


if __name__ == "__main__":
    main()

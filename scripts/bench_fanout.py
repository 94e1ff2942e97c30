#!/usr/bin/env python3
"""Fan-out benchmark (part of `make bench`; issue 13): one primary serving 1, 100 and 1000
followers that long-poll its log over loopback HTTP.

- The primary is a child process (apsw, the extension loaded first on `:memory:`) serving with a
  token (`repl_primary('127.0.0.1:0', token)`), with `REPL_HTTP_MAX_CONNECTIONS=4096` and its
  RLIMIT_NOFILE raised (the server caps its connection limit at half the open-file limit). It
  commits one small row per command and reports each commit's LSN and the time `execute()`
  returned, on CLOCK_MONOTONIC (machine-wide, so comparable across processes).
- The light followers are N sockets in THIS process (one epoll, no thread per follower). Each
  keeps one `GET /v1/log?from=<next>&wait_ms=30000` outstanding with `Authorization: Bearer` and
  `X-Repl-Follower`, reads the head and the Content-Length body, and asks again from
  `X-Repl-Last-Lsn + 1`. A commit "arrives" at a light follower when the response carrying it is
  complete; the time is taken when epoll returned the readiness (not when Python got round to
  the socket), so the client's own queueing is counted as little as possible.
- Real followers: replica processes with `repl_follow(url)`; each waits with `repl_wait(next)`
  and stamps the time it returns (commit -> visible to SQL on the replica).

Rows: 1 light follower (the single-follower baseline), 1 real follower alone (the real
baseline), then 100 and 1000 followers, of which 3 are real followers (a subset) and the rest
light. For each row: (a) idle: the primary process's CPU over IDLE_SECS with every follower
parked (utime+stime from /proc/<pid>/stat), its threads (/proc/<pid>/task) and fds; (b) RATE
commits/s for LOAD_SECS: commit -> visible p50/p99/max over every (follower, commit) pair, and
p99(N)/p99(1).

The pieces (`Primary`, `LightClient`) are imported by tests/python/test_fanout_smoke.py.
Only 127.0.0.1. Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
EXT = os.environ.get("REPLICA_EXT") or str(REPO / "build" / "libreplica")
TOKEN = "fanout-bench-token"
SIZES = [int(n) for n in os.environ.get("REPL_BENCH_FANOUT_SIZES", "1,100,1000").split(",")]
REAL = int(os.environ.get("REPL_BENCH_FANOUT_REAL", "3"))
IDLE_SECS = float(os.environ.get("REPL_BENCH_FANOUT_IDLE_SECS", "10"))
LOAD_SECS = float(os.environ.get("REPL_BENCH_FANOUT_LOAD_SECS", "5"))
RATE = float(os.environ.get("REPL_BENCH_FANOUT_RATE", "100"))
# After the last commit, how long the followers get to receive it; a commit not received by
# then counts as infinitely late in the percentiles (and in `missing`).
TAIL_SECS = float(os.environ.get("REPL_BENCH_FANOUT_TAIL_SECS", "15"))
WAIT_MS = 30000
CLK = time.CLOCK_MONOTONIC


def now_ns() -> int:
    return time.clock_gettime_ns(CLK)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# The primary. argv: db, token. Commands on stdin, one JSON line answered on stdout for each.
PRIMARY = """
import apsw, json, os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # before the listener reads it
boot = apsw.Connection(":memory:")
boot.enable_load_extension(True)
boot.load_extension(os.environ["REPLICA_EXT"])
p = apsw.Connection(sys.argv[1]); p.setbusytimeout(5000)
p.execute("SELECT repl_primary('127.0.0.1:0', ?)", (sys.argv[2],)).fetchall()
p.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
p.execute("INSERT INTO t(v) VALUES (x'00')")
def one(sql, *a):
    return p.execute(sql, a).fetchone()[0]
def out(o):
    sys.stdout.write(json.dumps(o) + "\\n"); sys.stdout.flush()
st = json.loads(one("SELECT repl_status()"))
out({"url": st["server"]["url"], "lsn": one("SELECT repl_lsn()"), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]})
M = time.CLOCK_MONOTONIC
for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    if cmd[0] == "status":
        s = json.loads(one("SELECT repl_status()"))
        out({"listener": s["server"]["listener"], "lsn": one("SELECT repl_lsn()"), "log": s["log"]})
    elif cmd[0] == "commit":  # commit <rate> <count>: paced commits, then all stamps at once
        rate, count = float(cmd[1]), int(cmd[2])
        stamps = []
        start = time.perf_counter()
        for n in range(count):
            left = start + n / rate - time.perf_counter()
            if left > 0:
                time.sleep(left)  # pacing: a steady commit rate (sleeping: the 2 cores are shared)
            p.execute("INSERT INTO t(v) VALUES (randomblob(16))")
            t = time.clock_gettime_ns(M)
            stamps.append((one("SELECT repl_lsn()"), t))
        out({"stamps": stamps})
"""

# A real follower. argv: db, url (with ?token=). Commands: "dump" -> the (lsn, visible ns)
# pairs seen since the last dump; "quit".
REAL_FOLLOWER = """
import apsw, json, os, select, sys, time
boot = apsw.Connection(":memory:")
boot.enable_load_extension(True)
boot.load_extension(os.environ["REPLICA_EXT"])
r = apsw.Connection(sys.argv[1]); r.setbusytimeout(5000)
last = r.execute("SELECT repl_follow(?, 30000)", (sys.argv[2],)).fetchone()[0]
sys.stdout.write(json.dumps({"lsn": last}) + "\\n"); sys.stdout.flush()
M = time.CLOCK_MONOTONIC
seen = []
deadline = time.monotonic() + 600  # bounded even if the driver disappears
while time.monotonic() < deadline:
    if select.select([sys.stdin], [], [], 0)[0]:
        cmd = sys.stdin.readline().strip()
        if cmd in ("", "quit"):
            break
        if cmd == "dump":
            st = json.loads(r.execute("SELECT repl_status()").fetchone()[0])
            sys.stdout.write(json.dumps({"seen": seen, "errors": st["follow"].get("errors")}) + "\\n"); sys.stdout.flush()
            seen = []
    try:
        v = r.execute("SELECT repl_wait(?, 100)", (last + 1,)).fetchone()[0]
    except apsw.BusyError:
        continue  # nothing new within 100 ms: look at stdin again
    t = time.clock_gettime_ns(M)
    for lsn in range(last + 1, v + 1):
        seen.append((lsn, t))
    last = max(last, v)
r.execute("SELECT repl_follow(NULL)").fetchall()
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "REPLICA_EXT": EXT, "REPL_HTTP_MAX_CONNECTIONS": "4096"}


class Child:
    """A Python child speaking one JSON line per command on stdout."""

    def __init__(self, code: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=REPO,
        )
        self.pid = self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 60) -> dict:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"child {self.pid} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.pid} exited (rc {self.proc.poll()})")
        return json.loads(line)

    def ask(self, line: str, timeout: float = 60) -> dict:
        self.send(line)
        return self.read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(timeout=20)


class Primary(Child):
    def __init__(self, db: Path, token: str = TOKEN):
        super().__init__(PRIMARY, db, token)
        hello = self.read(60)
        self.url, self.start_lsn, self.nofile = hello["url"], hello["lsn"], hello["nofile"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.token = token

    def status(self) -> dict:
        return self.ask("status")

    def durable_lsn(self, timeout: float = 10) -> int:
        """The primary's LSN once the watermark covers it (served LSNs stop there: a long-poll
        past it is answered "ahead", not parked)."""
        lsn = self.status()["lsn"]
        end = time.monotonic() + timeout
        while (self.status()["log"]["durable_lsn"] or 0) < lsn:
            if time.monotonic() > end:
                raise SystemExit(f"LSN {lsn} not durable within {timeout} s")
            time.sleep(0.01)
        return lsn

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_secs(self) -> float:
        return proc_cpu_secs(self.pid)

    def wait_parked(self, n: int, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["listener"]["parked_long_polls"] >= n or time.monotonic() > end:
                return st
            time.sleep(0.1)


def runq_wait_secs(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat field 2,
    summed over its current threads): how much the shared machine held it back."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def proc_cpu_secs(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


class LightClient:
    """N long-polling followers on one epoll in this process (no thread per follower).

    `arrivals[lsn]` lists the times (CLOCK_MONOTONIC ns) at which a response carrying `lsn`
    was complete, one entry per follower that received it; `next_from[i]` is follower i's next
    LSN. Non-200 answers and closed connections are counted in `errors` (and the follower
    reconnects, at most `max_reconnects` times in all), so is a response whose X-Repl-Last-Lsn
    is above its X-Repl-Durable-Lsn (FORMAT.md §8.3 forbids it); `error_samples` keeps the first
    few (status, from, headers, body) for the report."""

    def __init__(self, port: int, token: str, n: int, from_lsn: int, name: str = "light",
                 wait_ms: int = WAIT_MS, max_reconnects: int = 50):
        self.port, self.token, self.n, self.name, self.wait_ms = port, token, n, name, wait_ms
        self.ep = select.epoll()
        self.socks: list[socket.socket | None] = [None] * n
        self.fd_of: dict[int, int] = {}
        self.buf = [b""] * n
        self.next_from = [from_lsn] * n
        self.want = [0] * n  # Content-Length + head length of the response being read, 0 = head
        self.head_of: list[tuple[str, dict]] = [("", {})] * n
        self.arrivals: dict[int, list[int]] = {}
        self.track: set[int] = set()  # LSNs whose arrivals are recorded
        self.errors: dict[str, int] = {}
        self.error_samples: list[dict] = []  # the first few non-200 answers, for the report
        self.last_body = b""
        self.responses = 0
        self.reconnects_left = max_reconnects
        for i in range(n):
            self._connect(i)

    def _connect(self, i: int) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.socks[i] = s
        self.fd_of[s.fileno()] = i
        self.buf[i], self.want[i] = b"", 0
        self.ep.register(s.fileno(), select.EPOLLIN)
        self._request(i)

    def _request(self, i: int) -> None:
        req = (f"GET /v1/log?from={self.next_from[i]}&wait_ms={self.wait_ms} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {self.token}\r\nX-Repl-Follower: {self.name}-{i}\r\n\r\n").encode()
        self.socks[i].send(req)  # ~200 bytes into an empty socket buffer: never partial

    def _error(self, i: int, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        s = self.socks[i]
        if s is not None:
            self.fd_of.pop(s.fileno(), None)
            try:
                self.ep.unregister(s.fileno())
            except OSError:
                pass
            s.close()
            self.socks[i] = None
        if self.reconnects_left > 0:
            self.reconnects_left -= 1
            self._connect(i)

    def _on_readable(self, i: int, t: int) -> None:
        s = self.socks[i]
        try:
            data = s.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            self._error(i, f"recv {e.errno}")
            return
        if not data:
            self._error(i, "closed by the server")
            return
        b = self.buf[i] + data
        while True:  # at most one response is outstanding; the loop runs once or twice
            if not self.want[i]:
                end = b.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = b[:end].decode("latin-1").split("\r\n")
                status = head[0].split(" ", 2)[1]
                h = {}
                for line in head[1:]:
                    k, _, v = line.partition(":")
                    h[k.strip().lower()] = v.strip()
                self.want[i] = end + 4 + int(h.get("content-length", "0"))
                self.head_of[i] = (status, h)
            if len(b) < self.want[i]:
                break
            status, h = self.head_of[i]
            if status != "200":
                self.last_body = b[self.want[i] - int(h.get("content-length", "0")):self.want[i]]
            b = b[self.want[i]:]
            self.want[i] = 0
            self.responses += 1
            if status != "200":
                if len(self.error_samples) < 5:
                    self.error_samples.append({"status": status, "from": self.next_from[i], "headers": h,
                                               "body": self.last_body.decode("latin-1", "replace")[:300]})
                self.buf[i] = b""
                self._error(i, f"HTTP {status}")
                return
            if int(h.get("x-repl-records", "0")) > 0:
                last = int(h["x-repl-last-lsn"])
                if last > int(h.get("x-repl-durable-lsn", last)):  # §8.3: none above the durable LSN
                    self.errors["record above X-Repl-Durable-Lsn"] = self.errors.get("record above X-Repl-Durable-Lsn", 0) + 1
                    if len(self.error_samples) < 5:
                        self.error_samples.append({"status": status, "from": self.next_from[i], "headers": h})
                for lsn in range(self.next_from[i], last + 1):
                    if lsn in self.track:
                        self.arrivals.setdefault(lsn, []).append(t)
                self.next_from[i] = last + 1
            self._request(i)
        self.buf[i] = b

    def poll(self, timeout: float) -> int:
        """One epoll round; returns the number of ready sockets."""
        evs = self.ep.poll(timeout)
        t = now_ns()
        for fd, _ in evs:
            i = self.fd_of.get(fd)
            if i is not None:
                self._on_readable(i, t)
        return len(evs)

    def run_until(self, done, timeout: float) -> bool:
        """Serve the sockets until done() or timeout seconds; returns done()."""
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(left, 0.05))
        return True

    def all_at(self, lsn: int) -> bool:
        return all(f > lsn for f in self.next_from)

    def close(self) -> None:
        for s in self.socks:
            if s is not None:
                s.close()
        self.socks = [None] * self.n
        self.ep.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_row(prim: Primary, n_light: int, reals: list[Child], idle: bool) -> dict:
    """One row: n_light light followers plus the real followers `reals` (already following)."""
    n_total = n_light + len(reals)
    lsn0 = prim.durable_lsn()
    base_threads, base_fds = prim.threads(), prim.fds()
    client = LightClient(prim.port, prim.token, n_light, lsn0 + 1, name=f"light{n_light}")
    row: dict = {"light": n_light, "real": len(reals), "followers": n_total}
    try:
        # Every follower parked (the light client is idle in epoll meanwhile).
        end = time.monotonic() + 30
        while time.monotonic() < end:
            client.poll(0.05)
            st = prim.status()
            if st["listener"]["parked_long_polls"] >= n_total:
                break
        row["parked"] = st["listener"]["parked_long_polls"]
        row["open_connections"] = st["listener"]["open_connections"]
        if idle:
            c0, t0 = prim.cpu_secs(), time.monotonic()
            client.run_until(lambda: False, IDLE_SECS)  # nobody touches the primary meanwhile
            c1, t1 = prim.cpu_secs(), time.monotonic()
            row["idle_cpu"] = (c1 - c0) / (t1 - t0)
            row["threads"], row["fds"] = prim.threads(), prim.fds()
            row["base_threads"], row["base_fds"] = base_threads, base_fds
            row["parked_after_idle"] = prim.status()["listener"]["parked_long_polls"]

        # Load: RATE commits/s for LOAD_SECS.
        count = int(RATE * LOAD_SECS)
        lsn0 = prim.status()["lsn"]
        row["lsn_start"] = lsn0
        client.track = set(range(lsn0 + 1, lsn0 + count + 1))
        for r in reals:
            r.ask("dump")  # forget what came before
        c0, t0, w0 = prim.cpu_secs(), time.monotonic(), runq_wait_secs(prim.pid)
        my0 = resource.getrusage(resource.RUSAGE_SELF)
        prim.send(f"commit {RATE} {count}")
        got: list[dict] = []

        def primary_done() -> bool:
            if not got and select.select([prim.proc.stdout], [], [], 0)[0]:
                got.append(prim.read(5))
            return bool(got)

        client.run_until(primary_done, LOAD_SECS + 60)
        c1, t1, w1 = prim.cpu_secs(), time.monotonic(), runq_wait_secs(prim.pid)
        my1 = resource.getrusage(resource.RUSAGE_SELF)
        row["load_primary_runq"] = (w1 - w0) / (t1 - t0)
        row["loadavg"] = os.getloadavg()[0]
        stamps = {lsn: t for lsn, t in got[0]["stamps"]}
        last = max(stamps)
        all_in = client.run_until(lambda: client.all_at(last), TAIL_SECS)  # the tail: bounded
        row["load_primary_cpu"] = (c1 - c0) / (t1 - t0)
        row["load_client_cpu"] = (my1.ru_utime + my1.ru_stime - my0.ru_utime - my0.ru_stime) / (t1 - t0)
        row["commits"] = len(stamps)
        row["responses"] = client.responses
        row["errors"] = dict(client.errors)
        row["error_samples"] = client.error_samples
        light = [(t - stamps[lsn]) / 1e6 for lsn, ts in client.arrivals.items() for t in ts]
        row["light_missing"] = n_light * len(stamps) - len(light)
        light += [float("inf")] * row["light_missing"]
        row["light_all_in"] = all_in
        real: list[float] = []
        row["real_missing"] = 0
        end = time.monotonic() + TAIL_SECS
        for r in reals:
            seen: dict[int, int] = {}
            while True:
                d = r.ask("dump")
                seen.update((lsn, t) for lsn, t in d["seen"] if lsn in stamps)
                if max(seen, default=0) >= last or time.monotonic() > end:
                    break
                time.sleep(0.05)
            real += [(t - stamps[lsn]) / 1e6 for lsn, t in seen.items()]
            missing = sum(1 for lsn in stamps if lsn not in seen)
            row["real_missing"] += missing
            real += [float("inf")] * missing
            if d.get("errors"):
                row.setdefault("real_errors", []).append(d["errors"])
        for key, xs in (("light", light), ("real", real), ("all", light + real)):
            row[key] = {"n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": max(xs, default=float("nan"))}
        row["threads_after_load"] = prim.threads()
    finally:
        client.close()
    return row


def fmt_ms(x: float) -> str:
    if x != x:
        return "–"
    if x == float("inf"):
        return f"> {TAIL_SECS:g} s"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def main() -> None:
    t_start = time.monotonic()
    nofile = raise_nofile()
    if nofile < 2 * max(SIZES) + 64:
        raise SystemExit(f"bench_fanout: open-file limit {nofile} is too low for {max(SIZES)} sockets")
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-fanout."))
    prim = None
    reals: list[Child] = []
    rows = []
    try:
        prim = Primary(tmp / "p.db")
        print(f"bench_fanout: primary pid {prim.pid} at {prim.url}, its open-file limit {prim.nofile}", flush=True)
        url = f"{prim.url}?token={TOKEN}"

        def add_real() -> None:
            c = Child(REAL_FOLLOWER, tmp / f"r{len(reals)}.db", url)
            c.read(60)
            reals.append(c)

        for n in SIZES:
            if n == 1:
                r = run_row(prim, 1, [], idle=True)
                r["label"] = "1 (light)"
                rows.append(r)
                print(f"bench_fanout: {json.dumps(r)}", flush=True)
                if REAL:
                    add_real()
                    r = run_row(prim, 0, reals[:1], idle=False)
                    r["label"] = "1 (real)"
                    rows.append(r)
                    print(f"bench_fanout: {json.dumps(r)}", flush=True)
                continue
            while len(reals) < min(REAL, n):
                add_real()
            r = run_row(prim, n - len(reals), reals, idle=True)
            r["label"] = f"{n} ({n - len(reals)} light + {len(reals)} real)"
            rows.append(r)
            print(f"bench_fanout: {json.dumps(r)}", flush=True)
    finally:
        for c in reals:
            c.close()
        if prim is not None:
            prim.close()
        shutil.rmtree(tmp, ignore_errors=True)

    base_l = next((r["light"]["p99"] for r in rows if r["label"] == "1 (light)"), float("nan"))
    base_r = next((r["real"]["p99"] for r in rows if r["label"] == "1 (real)"), float("nan"))
    lines = [
        "",
        f"- Command: `make bench` (scripts/bench_fanout.py; REPL_BENCH_FANOUT_SIZES={','.join(map(str, SIZES))}, "
        f"REPL_BENCH_FANOUT_REAL={REAL}, REPL_BENCH_FANOUT_IDLE_SECS={IDLE_SECS:g}, REPL_BENCH_FANOUT_LOAD_SECS={LOAD_SECS:g}, "
        f"REPL_BENCH_FANOUT_RATE={RATE:g}); run took {time.monotonic() - t_start:.0f} s. 2-core VM shared with other "
        "jobs (noisy: take single runs as indications), loopback only, token set, primary with "
        "`REPL_HTTP_MAX_CONNECTIONS=4096` and its open-file limit raised.",
        "- Light followers: sockets on one epoll in the bench process, each with one "
        f"`GET /v1/log?from=<next>&wait_ms={WAIT_MS}` outstanding (Bearer token, `X-Repl-Follower`); a commit is visible "
        "when the response carrying it is complete (time taken when epoll reported it). Real followers: replica "
        "processes with `repl_follow(url, 30000)`; visible = `repl_wait()` returned on the replica. Commit time = "
        "the primary's `execute()` returned. All times CLOCK_MONOTONIC.",
        "- Idle: the primary process's CPU (utime+stime) over "
        f"{IDLE_SECS:g} s with every follower parked, as % of one core; threads and fds of that process "
        "(before the followers connected -> while they were parked). Load: "
        f"{RATE:g} commits/s (one small row each) for {LOAD_SECS:g} s; latency over every (follower, commit) pair; "
        "`missing` = (follower, commit) pairs not received within "
        f"{TAIL_SECS:g} s after the last commit (counted as infinitely late in the percentiles). CPU of the primary "
        "process and of the one-process light client during the load, in cores (a client near 1.0 would be "
        "measuring itself); \"waiting for a CPU\" = the primary's threads' run-queue time (schedstat) per second: "
        "how much the shared machine held the primary back; load average = 1-minute, at the end of the load.",
        "- Targets (issue 13): p99 with 1000 followers <= 2x the single-follower p99; idle CPU <= 2 % of a core with "
        "1000 idle followers; threads do not grow with followers.",
        "",
        "| followers | parked | idle CPU | threads | fds | log LSN at load start | light p50 / p99 / max | light p99 / p99(1) | "
        "real p50 / p99 / max | real p99 / p99(1) | missing | errors | primary CPU (load) | primary waiting for a CPU (load) | "
        "client CPU (load) | load average |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        L, R = r["light"], r["real"]
        idle = f"{100 * r['idle_cpu']:.2f} %" if "idle_cpu" in r else "–"
        thr = f"{r['base_threads']} -> {r['threads']}" if "threads" in r else "–"
        fds = f"{r['base_fds']} -> {r['fds']}" if "fds" in r else "–"
        lr = f"{L['p99'] / base_l:.1f}x" if L["n"] else "–"
        rr = f"{R['p99'] / base_r:.1f}x" if R["n"] else "–"
        lat = lambda x: f"{fmt_ms(x['p50'])} / {fmt_ms(x['p99'])} / {fmt_ms(x['max'])} ms" if x["n"] else "–"  # noqa: E731
        errs = ", ".join(f"{v}x {k}" for k, v in r["errors"].items()) or "0"
        if r.get("real_errors"):
            errs += f"; real followers: {r['real_errors']}"
        lines.append(
            f"| {r['label']} | {r['parked']} | {idle} | {thr} | {fds} | {r['lsn_start']} | {lat(L)} | {lr} | {lat(R)} | {rr} | "
            f"{r['light_missing'] + r['real_missing']} | {errs} | {r['load_primary_cpu']:.2f} | {r['load_primary_runq']:.2f} | "
            f"{r['load_client_cpu']:.2f} | {r['loadavg']:.1f} |"
        )
    big = max(rows, key=lambda r: r["followers"])
    if big["followers"] > 1 and "idle_cpu" in big:
        ratio = big["all"]["p99"] / base_l
        idle_ok, p99_ok = big["idle_cpu"] <= 0.02, ratio <= 2
        thr_ok = all(r.get("threads", 0) <= r.get("base_threads", 0) and r["threads_after_load"] <= r.get("base_threads", r["threads_after_load"]) for r in rows if "threads" in r)
        lines += [
            "",
            f"Verdict with {big['followers']} followers: idle CPU {100 * big['idle_cpu']:.2f} % of a core "
            f"({'meets' if idle_ok else 'MISSES'} <= 2 %); threads {'do not grow' if thr_ok else 'GROW'} with followers; "
            f"p99 over all followers {fmt_ms(big['all']['p99'])} ms = {ratio:.1f}x the single-follower p99 "
            f"({'meets' if p99_ok else 'MISSES'} <= 2x).",
        ]
    lines.append("")
    from benchmd import write_section

    write_section("Fan-out: one primary, 1 to 1000 long-polling followers (loopback HTTP)", lines)


if __name__ == "__main__":
    main()

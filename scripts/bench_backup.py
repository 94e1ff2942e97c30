#!/usr/bin/env python3
"""Bucket backup figures (issue 17), against moto_server on a loopback port (make deps installs
it). Writes the section "Bucket backups (moto_server, loopback)" of BENCHMARKS.md.

1. Upload lag p50/p99 (commit until the manifest names its LSN, as
   repl_status().backup.uploaded_lsn shows it) at backup_interval_ms 1000 and 100, and the time
   `sqlite-replica restore s3://…` takes for the result.
2. A large database: REPL_BENCH_BACKUP_MB (default 1024) MiB of random blobs made a primary with
   a backup (its first snapshot goes up as a multipart upload), then REPL_BENCH_BACKUP_TXNS
   (default 100000) single-row transactions through the extension in this process. Then: the
   time of `restore s3://… --time <the middle of the transactions>` (snapshot + half the log,
   peak RSS), a replica's bootstrap `repl_sync('s3://…')` vs `cp` + `sync` of the primary's file.
3. 100 simulated bucket followers (threads polling the manifest every 100 ms, as a follower's
   fetch_wait does, and reading each new chunk) while the primary commits 100/s: the primary
   process's CPU (user+sys seconds per second) with and without them. The followers talk to the
   bucket only, so the primary's CPU should not move.

Usage: python3 scripts/bench_backup.py [--commits N] [--mb MB] [--txns N]
"""

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
sys.path.insert(0, str(REPO / "scripts"))
from helpers import apsw_conn, load_in_process, one, start_primary  # noqa: E402
from benchmd import write_section  # noqa: E402

CLI = str(REPO / "build" / "sqlite-replica")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def status(conn) -> dict:
    return json.loads(one(conn, "SELECT repl_status()"))["backup"] or {}


def wait_uploaded(conn, timeout: float = 600) -> None:
    lsn = one(conn, "SELECT repl_lsn()")
    end = time.time() + timeout
    while (status(conn).get("uploaded_lsn") is None or status(conn)["uploaded_lsn"] < lsn
           or not status(conn).get("objects")):
        if time.time() > end:
            raise SystemExit(f"LSN {lsn} not uploaded after {timeout} s: {status(conn)}")
        time.sleep(0.05)


def timed_rss(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB, of the child alone: forked from a small Python parent),
    stdout."""
    code = ("import os,sys,time\nt=time.time()\npid=os.fork()\n"
            "if pid==0: os.execv(sys.argv[1], sys.argv[1:])\n"
            "_,st,ru=os.wait4(pid,0)\nprint(time.time()-t, ru.ru_maxrss, os.waitstatus_to_exitcode(st))")
    r = subprocess.run([sys.executable, "-c", code] + args, capture_output=True, text=True)
    *out, last = r.stdout.rstrip("\n").split("\n")
    secs, kib, rc = last.split()
    if int(rc) != 0:
        raise SystemExit(f"{args}: {r.stdout}{r.stderr}")
    return float(secs), int(kib) / 1024, "\n".join(out)


def lag_runs(tmp: Path, commits: int, env: dict) -> list[dict]:
    out = []
    for interval in (1000, 100):
        p = start_primary(tmp / f"b{interval}.db", env=env)
        p.one("SELECT repl_config('backup_interval_ms', ?)", [interval])
        p.one("SELECT repl_config('backup', ?)", [f"s3://bench/i{interval}"])
        p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)"])
        lags = []
        for i in range(commits):
            p.q("INSERT INTO t(v) VALUES (randomblob(2000))")
            lsn = p.one("SELECT repl_lsn()")
            t0 = time.time()
            while (json.loads(p.one("SELECT repl_status()"))["backup"] or {}).get("uploaded_lsn", 0) < lsn:
                time.sleep(0.005)
            lags.append((time.time() - t0) * 1000)
            time.sleep(0.037 * (i % 7))  # commits at varying phases of the interval
        lags.sort()
        p.close()
        secs, _, _ = timed_rss([CLI, "restore", f"s3://bench/i{interval}", str(tmp / f"r{interval}.db")])
        r = {"interval_ms": interval, "commits": commits,
             "lag_p50_ms": round(statistics.median(lags), 1),
             "lag_p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 1),
             "restore_ms": round(secs * 1000, 1)}
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


class Followers:
    """n threads, each polling the manifest every 100 ms and reading each new chunk it names."""

    def __init__(self, endpoint: str, prefix: str, n: int):
        import boto3
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="x", aws_secret_access_key="x")
        self.prefix = prefix
        self.stop = threading.Event()
        self.requests = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]

    def run(self) -> None:
        seen = None
        while not self.stop.is_set():
            try:
                m = json.loads(urllib.request.urlopen(self.url("manifest.json"), timeout=10).read())
                n = 1
                if m["chunks"] and m["chunks"][-1]["key"] != seen:
                    seen = m["chunks"][-1]["key"]
                    urllib.request.urlopen(self.url(seen), timeout=10).read()
                    n += 1
                with self.lock:
                    self.requests += n
            except OSError:
                pass
            self.stop.wait(0.1)

    def url(self, key: str) -> str:
        """A signed GET (signing is local: no request)."""
        return self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": "bench", "Key": f"{self.prefix}/{key}"}, ExpiresIn=600)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def cpu_while_committing(conn, secs: float, rate: int) -> tuple[float, int]:
    """This process's CPU (user+sys s per wall s) while it commits `rate` transactions/s."""
    r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.time(), 0
    while time.time() - t0 < secs:
        conn.execute("INSERT INTO small(v) VALUES (randomblob(100))")
        n += 1
        time.sleep(max(0.0, t0 + n / rate - time.time()))
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    return ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / (t1 - t0), n


def large_run(tmp: Path, mb: int, txns: int, endpoint: str) -> list[str]:
    db = tmp / "large.db"
    # The base: random blobs (nothing compresses), written by stock SQLite.
    c = apsw_conn(db)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v BLOB); CREATE TABLE small(id INTEGER PRIMARY KEY, v BLOB)")
    rows = mb * 2**20 // 4000
    c.execute("BEGIN")
    for _ in range(0, rows, 1000):
        c.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) "
                  "INSERT INTO big(v) SELECT randomblob(4000) FROM n")
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    size = db.stat().st_size
    load_in_process()
    conn = apsw_conn(db)
    one(conn, "SELECT repl_primary()")
    one(conn, "SELECT repl_config('backup', 's3://bench/large')")
    t0 = time.time()
    wait_uploaded(conn)
    snap_up = time.time() - t0
    print(f"large: {size / 2**20:.0f} MiB primary, first snapshot uploaded in {snap_up:.1f} s", flush=True)
    t0 = time.time()
    mid = None
    for i in range(txns):
        conn.execute("INSERT INTO small(v) VALUES (randomblob(100))")
        if i == txns // 2:
            time.sleep(0.01)
            mid = time.time(), one(conn, "SELECT repl_lsn()")
            time.sleep(0.01)
    txn_s = time.time() - t0
    wait_uploaded(conn)
    up_s = time.time() - t0
    print(f"large: {txns} transactions in {txn_s:.1f} s, all uploaded {up_s:.1f} s after the first", flush=True)
    # Restore to the middle of the transactions.
    restore_s, restore_rss, out = timed_rss([CLI, "restore", "s3://bench/large", str(tmp / "mid.db"),
                                             "--time", iso(mid[0])])
    print(f"large: restore --time (middle): {restore_s:.1f} s, peak RSS {restore_rss:.0f} MiB: {out}", flush=True)
    os.unlink(tmp / "mid.db")
    # Bootstrap from the bucket vs cp.
    t0 = time.time()
    subprocess.run(["cp", str(db), str(tmp / "copy.db")], check=True)
    subprocess.run(["sync", str(tmp / "copy.db")], check=True)
    cp_s = time.time() - t0
    os.unlink(tmp / "copy.db")
    code = ("import sys,time\nsys.path.insert(0, sys.argv[3])\nfrom helpers import apsw_conn, load_in_process, one\n"
            "load_in_process()\nt=time.time()\nc=apsw_conn(sys.argv[1])\none(c, \"SELECT repl_sync(?)\", [sys.argv[2]])\n"
            "print(time.time()-t)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp / "boot.db"), "s3://bench/large",
                        str(REPO / "tests" / "python")], capture_output=True, text=True, env=os.environ)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    boot_s = float(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(tmp / "boot.db-replica", ignore_errors=True)
    for f in tmp.glob("boot.db*"):
        f.unlink()
    print(f"large: cp+sync {cp_s:.1f} s, bootstrap from the bucket {boot_s:.1f} s", flush=True)
    # 100 simulated followers polling the bucket while the primary commits 100/s.
    one(conn, "SELECT repl_config('backup_interval_ms', 1000)")
    cpu0, n0 = cpu_while_committing(conn, 15, 100)
    # The followers run in another process, so this one's CPU is the primary's alone.
    fol = subprocess.Popen([sys.executable, __file__, "--followers", endpoint, "large", "100", "17"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    cpu1, n1 = cpu_while_committing(conn, 15, 100)
    reqs = int(fol.communicate(timeout=60)[0].strip().splitlines()[-1]) / 17
    print(f"large: primary CPU {cpu0:.3f} without followers, {cpu1:.3f} with 100 ({reqs:.0f} bucket requests/s)", flush=True)
    conn.close()
    mib = size / 2**20
    return [
        "",
        f"- Database: {mib:.0f} MiB of random blobs (REPL_BENCH_BACKUP_MB={mb}) made a primary with "
        f"`repl_config('backup', 's3://…')`; its first snapshot went up as a multipart upload (64 MiB parts) "
        f"in {snap_up:.1f} s; then {txns} single-row transactions (REPL_BENCH_BACKUP_TXNS) through the extension "
        f"in {txn_s:.1f} s, all in the bucket {up_s:.1f} s after the first",
        f"- Bucket: moto_server {moto_version()} on loopback (Python, objects in memory): its throughput, not the "
        "network's, bounds these figures",
        "",
        "| | seconds | MiB/s | notes |",
        "|---|---:|---:|---|",
        f"| `cp` + `sync` of the primary's file | {cp_s:.1f} | {mib / cp_s:.0f} | |",
        f"| replica bootstrap `repl_sync('s3://…')` | {boot_s:.1f} | {mib / boot_s:.0f} | {boot_s / cp_s:.1f}× cp's time |",
        f"| `restore s3://… --time <middle>` | {restore_s:.1f} | {mib / restore_s:.0f} | snapshot + {txns // 2} transactions of log; peak RSS {restore_rss:.0f} MiB |",
        "",
        f"- 100 simulated followers (threads polling the manifest every 100 ms and reading each new chunk: "
        f"{reqs:.0f} bucket requests/s) while the primary commits 100 transactions/s with backup_interval_ms 1000: "
        f"primary process CPU {cpu0:.3f} cores without them, {cpu1:.3f} with them ({n0} and {n1} commits in 15 s each)",
        "",
    ]


def moto_version() -> str:
    try:
        import moto
        return moto.__version__
    except Exception:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=40)
    ap.add_argument("--mb", type=int, default=int(os.environ.get("REPL_BENCH_BACKUP_MB", "1024")))
    ap.add_argument("--txns", type=int, default=int(os.environ.get("REPL_BENCH_BACKUP_TXNS", "100000")))
    ap.add_argument("--followers", nargs=4, metavar=("ENDPOINT", "PREFIX", "N", "SECS"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.followers:
        endpoint, prefix, n, secs = a.followers
        with Followers(endpoint, prefix, int(n)) as f:
            time.sleep(float(secs))
        print(f.requests)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([shutil.which("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    tmp = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    try:
        import boto3
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                             aws_access_key_id="x", aws_secret_access_key="x").create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        lag = lag_runs(tmp, a.commits, env)
        lines = [
            "",
            "- Command: `make bench` (scripts/bench_backup.py); moto_server on a loopback port",
            "",
            "| backup_interval_ms | commits | upload lag p50 | upload lag p99 | restore of the result |",
            "|---:|---:|---:|---:|---:|",
            *[f"| {r['interval_ms']} | {r['commits']} | {r['lag_p50_ms']:.0f} ms | {r['lag_p99_ms']:.0f} ms | "
              f"{r['restore_ms']:.0f} ms |" for r in lag],
        ]
        if a.mb > 0:
            lines += large_run(tmp, a.mb, a.txns, endpoint)
        write_section("Bucket backups (moto_server, loopback)", lines)
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Bucket backup figures (issue 17): upload lag p50/p99 (commit until the manifest names its
LSN, as repl_status().backup.uploaded_lsn shows it) at backup_interval_ms 1000 and 100, and the
time `sqlite-replica restore s3://…` takes for the result. Runs moto_server on a loopback port
(make deps installs it). Usage: python3 scripts/bench_backup.py [--commits N]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
from helpers import start_primary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=40)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([shutil.which("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    tmp = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    try:
        import boto3
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="x", aws_secret_access_key="x").create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        for interval in (1000, 100):
            p = start_primary(tmp / f"b{interval}.db", env=env)
            p.one("SELECT repl_config('backup_interval_ms', ?)", [interval])
            p.one("SELECT repl_config('backup', ?)", [f"s3://bench/i{interval}"])
            p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)"])
            lags = []
            for i in range(a.commits):
                p.q("INSERT INTO t(v) VALUES (randomblob(2000))")
                lsn = p.one("SELECT repl_lsn()")
                t0 = time.time()
                while (json.loads(p.one("SELECT repl_status()"))["backup"] or {}).get("uploaded_lsn", 0) < lsn:
                    time.sleep(0.005)
                lags.append((time.time() - t0) * 1000)
                time.sleep(0.037 * (i % 7))  # commits at varying phases of the interval
            lags.sort()
            p.close()
            t0 = time.time()
            subprocess.run([str(REPO / "build" / "sqlite-replica"), "restore", f"s3://bench/i{interval}",
                            str(tmp / f"r{interval}.db")], check=True, capture_output=True)
            restore_ms = (time.time() - t0) * 1000
            print(json.dumps({"interval_ms": interval, "commits": a.commits,
                              "lag_p50_ms": round(statistics.median(lags), 1),
                              "lag_p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 1),
                              "restore_ms": round(restore_ms, 1)}))
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

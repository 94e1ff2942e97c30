"""Object storage backups (issue 17; FORMAT.md §9): a primary ships its log to an S3-compatible
bucket, which is then enough on its own to restore (newest, ``--lsn``, ``--time``), to verify,
and to bootstrap and follow a replica.

The bucket is a real S3-compatible server: moto's ``moto_server`` (installed by ``make deps``),
started on a loopback port for this module; its conditional PUTs (``If-None-Match: *``,
``If-Match``) are what keep two uploaders apart. The uploaders reach it through a FaultProxy,
so "the bucket is down" is the proxy refusing connections (moto keeps its objects in memory:
stopping the server itself would lose them); the outage lasts about 6 s instead of the issue's
30 s to keep the test short — the uploader's behaviour does not depend on the length.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from faultproxy import FaultProxy
from helpers import Worker, lsn_checksum, start_primary, stock_one, wait_for, worker_status

CLI = str(Path(__file__).resolve().parents[2] / "build" / "sqlite-replica")
KEY = "11" * 32
WRONG_KEY = "22" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto():
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server is missing: run `make deps` (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            urllib.request.urlopen(base + "/", timeout=1).read()
            return True
        except OSError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.1, what="moto_server listening")
        with FaultProxy(port) as proxy:
            yield base, proxy
    finally:
        proc.terminate()
        proc.wait(10)


def s3(base: str):
    """A boto3 client of the moto server (boto3 comes with moto)."""
    import boto3
    return boto3.client("s3", endpoint_url=base, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def make_bucket(base: str, name: str) -> None:
    s3(base).create_bucket(Bucket=name)


def objects(base: str, bucket: str) -> dict[str, bytes]:
    c = s3(base)
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def put_object(base: str, bucket: str, key: str, body: bytes) -> None:
    s3(base).put_object(Bucket=bucket, Key=key, Body=body)


def aws_env(endpoint: str, key: str | None = None) -> dict[str, str]:
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "REPL_BACKUP_KEY": key or "",
    }
    return env


def cli(args: list[str], env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([CLI] + args, capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    if ok:
        assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r


def restored(out: str) -> tuple[int, str]:
    m = re.search(r"at LSN (\d+), checksum ([0-9a-f]+), committed (\S+)", out)
    assert m, out
    return int(m.group(1)), m.group(2)


def backup_status(p: Worker) -> dict:
    return worker_status(p)["backup"] or {}


def uploaded(p: Worker, timeout: float = 20) -> int:
    """The primary's LSN once the bucket has it."""
    lsn = p.one("SELECT repl_lsn()")
    wait_for(lambda: (backup_status(p).get("uploaded_lsn") or 0) >= lsn, timeout=timeout,
             interval=0.05, what=f"LSN {lsn} uploaded")
    return lsn


def start_backed_up(db: Path, target: str, endpoint: str, key: str | None = None,
                    interval_ms: int = 200) -> Worker:
    p = start_primary(db, env=aws_env(endpoint, key))
    p.one("SELECT repl_config('backup_interval_ms', ?)", [interval_ms])
    assert p.one("SELECT repl_config('backup', ?)", [target]) == target
    return p


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_restore_pitr_and_outage(moto, tmp):
    """Continuous backup under writes with a bucket outage in the middle; then the primary's
    directory is deleted and the bucket alone restores the last uploaded LSN, the state just
    before a "bad migration" (--time) and every 100th LSN (--lsn), each with the primary's
    checksum at that LSN. The directory source restores the same points."""
    base, proxy = moto
    make_bucket(base, "pitr")
    db = tmp / "app.db"
    p = start_backed_up(db, "s3://pitr/app", f"http://127.0.0.1:{proxy.port}")
    p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
              "CREATE TABLE keepme(id INTEGER PRIMARY KEY, v TEXT)",
              "INSERT INTO keepme(v) VALUES ('precious 1'), ('precious 2')"])
    sums: dict[int, str] = {}

    def write(n: int) -> None:
        for i in range(n):
            p.q("INSERT INTO t(v) VALUES (?)", [f"row {i} " + "x" * 200])
            lsn, ck = lsn_checksum(p)
            sums[lsn] = ck

    write(120)
    uploaded(p)
    # The bucket goes away: commits go on, the backlog and the error show, then it drains.
    proxy.refuse()
    t_down = time.time()
    write(80)
    wait_for(lambda: backup_status(p).get("last_error"), timeout=10, what="the outage reported")
    st = backup_status(p)
    assert st["backlog"] > 0 and "unreachable" in st["last_error"], st
    metrics_ok = True
    time.sleep(max(0.0, 6 - (time.time() - t_down)))
    proxy.pass_()
    last = uploaded(p, timeout=30)
    assert backup_status(p)["backlog"] == 0 and backup_status(p)["last_error"] is None
    # The bad migration, at a known time.
    time.sleep(0.05)
    before_drop_lsn, before_drop_sum = lsn_checksum(p)
    t_before = time.time()
    time.sleep(0.05)
    p.q("DROP TABLE keepme")
    write(110)
    final_lsn, final_sum = lsn_checksum(p)
    assert uploaded(p) == final_lsn
    assert metrics_ok

    env = aws_env(base)
    # The directory source, before the directory goes.
    out = cli(["restore", str(db), str(tmp / "dir-pitr.db"), "--time", iso(t_before)], env).stdout
    assert restored(out) == (before_drop_lsn, before_drop_sum), out
    out = cli(["restore", str(db), str(tmp / "dir-100.db"), "--lsn", "100"], env).stdout
    assert restored(out) == (100, sums[100]), out
    p.close()
    shutil.rmtree(str(db) + "-replica")
    for f in tmp.glob("app.db*"):
        f.unlink()

    out = cli(["restore", "s3://pitr/app", str(tmp / "last.db")], env).stdout
    assert restored(out) == (final_lsn, final_sum), out
    out = cli(["restore", "s3://pitr/app", str(tmp / "pitr.db"), "--time", iso(t_before)], env).stdout
    assert restored(out) == (before_drop_lsn, before_drop_sum), out
    assert stock_one(tmp / "pitr.db", "SELECT group_concat(v) FROM keepme;") == "precious 1,precious 2"
    for n in range(100, final_lsn + 1, 100):
        out = cli(["restore", "s3://pitr/app", str(tmp / f"at-{n}.db"), "--lsn", str(n)], env).stdout
        assert restored(out) == (n, sums[n]), out
    r = cli(["restore", "s3://pitr/app", str(tmp / "beyond.db"), "--lsn", str(final_lsn + 5)], env, ok=False)
    assert r.returncode == 1 and "ends at LSN" in r.stderr, r.stderr
    assert not (tmp / "beyond.db").exists()
    out = cli(["verify", "s3://pitr/app"], env).stdout
    assert out.rstrip().endswith("OK") and f"..{final_lsn}" in out, out


def test_damaged_objects_and_two_uploaders(moto, tmp):
    """A corrupted or truncated object is refused by restore and named by verify; a second
    primary pointed at a prefix another one writes refuses to upload."""
    base, proxy = moto
    make_bucket(base, "dmg")
    p = start_backed_up(tmp / "a.db", "s3://dmg/a", base)
    p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"])
    for i in range(3):
        for j in range(10):
            p.q("INSERT INTO t(v) VALUES (?)", [f"{i}-{j}"])
        uploaded(p)
    q = start_backed_up(tmp / "b.db", "s3://dmg/a", base)
    q.script(["CREATE TABLE u(x)", "INSERT INTO u VALUES (1)"])
    wait_for(lambda: backup_status(q).get("last_error"), timeout=10, what="second uploader refused")
    assert "another database" in backup_status(q)["last_error"], backup_status(q)
    assert (backup_status(q).get("uploaded_lsn") or 0) == 0
    p.close()
    q.close()
    env = aws_env(base)
    assert cli(["verify", "s3://dmg/a"], env).stdout.rstrip().endswith("OK")
    objs = objects(base, "dmg")
    chunks = sorted(k for k in objs if k.startswith("a/log/"))
    assert len(chunks) >= 2, list(objs)
    bad = bytearray(objs[chunks[1]])
    bad[len(bad) // 2] ^= 0xFF
    put_object(base, "dmg", chunks[1], bytes(bad))
    r = cli(["restore", "s3://dmg/a", str(tmp / "r.db")], env, ok=False)
    assert r.returncode == 1 and chunks[1] in r.stderr and "damaged" in r.stderr, r.stderr
    assert not (tmp / "r.db").exists()
    r = cli(["verify", "s3://dmg/a"], env, ok=False)
    assert r.returncode == 1 and chunks[1] in r.stderr, r.stderr
    put_object(base, "dmg", chunks[1], objs[chunks[1]][:100])
    r = cli(["verify", "s3://dmg/a"], env, ok=False)
    assert r.returncode == 1 and chunks[1] in r.stderr and "truncated" in r.stderr, r.stderr


def test_replica_follows_the_bucket(moto, tmp):
    """A replica bootstrapped from the bucket and following it: a stock reader polling it
    never sees a torn bank (the sum of the balances never changes), and it ends equal to the
    primary."""
    base, proxy = moto
    make_bucket(base, "follow")
    p = start_backed_up(tmp / "bank.db", "s3://follow/bank", base, interval_ms=100)
    p.script(["CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER)",
              "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 10) "
              "INSERT INTO acct SELECT i, 100 FROM c"])
    uploaded(p)
    rdb = tmp / "replica.db"
    r = Worker(rdb, env=aws_env(base))
    assert r.one("SELECT repl_follow('s3://follow/bank', 200)") >= 1
    seen = set()
    for i in range(150):
        a, b = 1 + i % 10, 1 + (i * 7 + 3) % 10
        p.script(["BEGIN", f"UPDATE acct SET bal = bal - 7 WHERE id = {a}",
                  f"UPDATE acct SET bal = bal + 7 WHERE id = {b}", "COMMIT"])
        if i % 10 == 0:
            total = stock_one(rdb, "SELECT sum(bal) FROM acct;")
            assert total == "1000", f"torn state seen: sum {total}"
            seen.add(stock_one(rdb, "SELECT group_concat(bal) FROM acct;"))
    lsn = uploaded(p)
    t0 = time.time()
    wait_for(lambda: r.one("SELECT repl_lsn()") >= lsn, timeout=20, interval=0.02, what="replica caught up")
    lag = time.time() - t0
    assert lsn_checksum(r) == lsn_checksum(p)
    assert stock_one(rdb, "SELECT sum(bal) FROM acct;") == "1000"
    assert len(seen) > 1, "the replica never moved while the primary wrote"
    assert lag < 5, lag
    r.close()
    p.close()


def test_encrypted_backup(moto, tmp):
    """With a key no page of the database reaches the bucket in clear; the key restores it,
    a wrong key or none is refused before anything is written."""
    base, proxy = moto
    make_bucket(base, "enc")
    marker = "SECRET-ROW-MARKER-31337"
    p = start_backed_up(tmp / "s.db", "s3://enc/s", base, key=KEY)
    p.script(["CREATE TABLE s(v TEXT)"])
    for i in range(20):
        p.q("INSERT INTO s VALUES (?)", [f"{marker} {i}"])
    lsn, ck = lsn_checksum(p)
    uploaded(p)
    p.close()
    objs = objects(base, "enc")
    assert any(k.startswith("s/log/") for k in objs) and any(k.startswith("s/snap/") for k in objs)
    for k, body in objs.items():
        assert marker.encode() not in body, f"{k} holds a page in clear"
        assert b"SQLite format 3" not in body, k
    out = cli(["restore", "s3://enc/s", str(tmp / "ok.db")], aws_env(base, KEY)).stdout
    assert restored(out) == (lsn, ck)
    assert cli(["verify", "s3://enc/s"], aws_env(base, KEY)).stdout.rstrip().endswith("OK")
    for env, why in ((aws_env(base, WRONG_KEY), "not the key"), (aws_env(base), "is encrypted")):
        r = cli(["restore", "s3://enc/s", str(tmp / "no.db")], env, ok=False)
        assert r.returncode == 1 and why in r.stderr, r.stderr
        assert not (tmp / "no.db").exists()
    # A primary with the wrong key does not upload to the encrypted prefix either.
    q = start_backed_up(tmp / "s2.db", "s3://enc/s", base, key=WRONG_KEY)
    wait_for(lambda: backup_status(q).get("last_error"), timeout=10, what="wrong key refused")
    q.close()

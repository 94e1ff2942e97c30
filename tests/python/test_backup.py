"""Object storage backups (issue 17; FORMAT.md §9): a primary ships its log to an S3-compatible
bucket, which is then enough on its own to restore (newest, ``--lsn``, ``--time``), to verify,
and to bootstrap and follow a replica.

The bucket is a real S3-compatible server: moto's ``moto_server`` (installed by ``make deps``),
started on a loopback port for this module; its conditional PUTs (``If-None-Match: *``,
``If-Match``) are what keep two uploaders apart. The uploaders reach it through a FaultProxy,
so "the bucket is down" is the proxy refusing connections, which is what a stopped server looks
like to a client (moto keeps its objects in memory: stopping the server itself would lose them).
The outage lasts the issue's 30 s: it runs in a background thread started with the module's first
test (the ``outage`` fixture) while the other tests run against moto directly, and the last test
of the module (``test_restore_pitr_and_outage``) checks its outcome, so it costs little test time.
"""

from __future__ import annotations

import os
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


OUTAGE_S = 30


class OutageRun:
    """The first half of test_restore_pitr_and_outage, in a background thread: a primary backed
    up through the fault proxy writes 120 transactions, then the bucket goes away for OUTAGE_S
    seconds while it commits one transaction every 50 ms, then it comes back and the backlog
    drains."""

    def __init__(self, base: str, proxy: FaultProxy, tmp: Path):
        self.base, self.proxy, self.tmp = base, proxy, tmp
        self.db = tmp / "app.db"
        self.p: Worker | None = None
        self.sums: dict[int, str] = {}
        self.during: dict = {}
        self.drain_s = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="outage", daemon=True)

    def write(self, n: int) -> None:
        for i in range(n):
            self.p.q("INSERT INTO t(v) VALUES (?)", [f"row {len(self.sums)} " + "x" * 200])
            lsn, ck = lsn_checksum(self.p)
            self.sums[lsn] = ck

    def _run(self) -> None:
        try:
            make_bucket(self.base, "pitr")
            self.p = p = start_backed_up(self.db, "s3://pitr/app", f"http://127.0.0.1:{self.proxy.port}")
            p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
                      "CREATE TABLE keepme(id INTEGER PRIMARY KEY, v TEXT)",
                      "INSERT INTO keepme(v) VALUES ('precious 1'), ('precious 2')"])
            self.write(120)
            uploaded(p)
            # The bucket goes away: commits go on, the backlog and the error show.
            self.proxy.refuse()
            t_down = time.time()
            while time.time() - t_down < OUTAGE_S:
                self.write(1)
                time.sleep(0.05)
                if not self.during and time.time() - t_down > 5:
                    self.during = backup_status(p)
            self.during["commits"] = len(self.sums) - 120
            self.during["lsn"] = p.one("SELECT repl_lsn()")
            self.proxy.pass_()
            t_up = time.time()
            uploaded(p, timeout=60)
            self.drain_s = time.time() - t_up
        except BaseException as e:  # re-raised by the test
            self.error = e
        finally:
            self.proxy.pass_()


@pytest.fixture(scope="module", autouse=True)
def outage(moto, tmp_path_factory, request):
    """Starts OutageRun with the module's first test, so its 30 s run alongside the others
    (only when test_restore_pitr_and_outage was selected)."""
    if not any(i.name == "test_restore_pitr_and_outage" for i in request.session.items):
        yield None
        return
    base, proxy = moto
    run = OutageRun(base, proxy, tmp_path_factory.mktemp("outage"))
    run.thread.start()
    yield run
    run.thread.join(OUTAGE_S + 90)
    if run.p is not None:
        run.p.close()


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
                    interval_ms: int = 200, env: dict[str, str] | None = None) -> Worker:
    p = start_primary(db, env={**aws_env(endpoint, key), **(env or {})})
    p.one("SELECT repl_config('backup_interval_ms', ?)", [interval_ms])
    assert p.one("SELECT repl_config('backup', ?)", [target]) == target
    return p


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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


LONG_READER = r"""
import json, os, sqlite3, sys, time
db, stop = sys.argv[1], sys.argv[2]
c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5, isolation_level=None)
q = "SELECT sum(bal), group_concat(bal) FROM acct"
reads, bad, states = 0, [], set()
while not os.path.exists(stop):
    c.execute("BEGIN")
    first = c.execute(q).fetchone()
    time.sleep(0.03)  # a long read transaction: the replica applies under it
    again = c.execute(q).fetchone()
    c.execute("COMMIT")
    reads += 1
    states.add(first[1])
    if first != again or first[0] != 1000:
        bad.append([first, again])
print(json.dumps({"reads": reads, "bad": bad[:5], "states": len(states)}))
"""


def test_replica_follows_the_bucket(moto, tmp):
    """A replica bootstrapped from the bucket and following it: stock readers never see a torn
    bank (the sum of the balances never changes) — one polling, one holding long read
    transactions that must read the same state twice inside each — and it ends equal to the
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
    stop = tmp / "stop-long-reader"
    long_reader = subprocess.Popen([sys.executable, "-c", LONG_READER, str(rdb), str(stop)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = set()
    # At least 150 transfers, and on until the reader saw the replica move (bounded: the
    # bucket is read every 200 ms; on a loaded machine 150 transfers can take less than that).
    i, deadline = 0, time.time() + 20
    while i < 150 or (len(seen) < 2 and time.time() < deadline):
        a, b = 1 + i % 10, 1 + (i * 7 + 3) % 10
        p.script(["BEGIN", f"UPDATE acct SET bal = bal - 7 WHERE id = {a}",
                  f"UPDATE acct SET bal = bal + 7 WHERE id = {b}", "COMMIT"])
        if i % 10 == 0:
            total = stock_one(rdb, "SELECT sum(bal) FROM acct;")
            assert total == "1000", f"torn state seen: sum {total}"
            seen.add(stock_one(rdb, "SELECT group_concat(bal) FROM acct;"))
        i += 1
    lsn = uploaded(p)
    t0 = time.time()
    wait_for(lambda: r.one("SELECT repl_lsn()") >= lsn, timeout=20, interval=0.02, what="replica caught up")
    lag = time.time() - t0
    stop.write_text("stop")
    out, err = long_reader.communicate(timeout=30)
    assert long_reader.returncode == 0, err
    lr = json.loads(out)
    assert lr["bad"] == [] and lr["reads"] >= 3, lr
    assert lsn_checksum(r) == lsn_checksum(p)
    assert stock_one(rdb, "SELECT sum(bal) FROM acct;") == "1000"
    assert len(seen) > 1, "the replica never moved while the primary wrote"
    assert lag < 5, lag
    r.close()
    p.close()


READER = r"""
import json, sqlite3, sys, time
db, secs = sys.argv[1], float(sys.argv[2])
c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
seen, last, end = [], None, time.time() + secs
while time.time() < end:
    try:
        v = c.execute("SELECT ns FROM stamp WHERE id = 1").fetchone()[0]
    except sqlite3.OperationalError:
        v = last
    if v != last:
        seen.append((time.time_ns(), v))
        last = v
    time.sleep(0.002)
print(json.dumps(seen))
"""


def test_follower_lag_steady_state(moto, tmp):
    """A replica following the bucket lags the primary by at most 1.5 × backup_interval_ms in
    steady state (SQL.md's promise), measured as scripts/bench_http.py does: the primary stamps
    a row with the wall clock every 50 ms, a stock reader process polls the replica every 2 ms,
    and each commit's lag is the time the reader first sees its stamp (or a later one) minus the
    stamp. Tolerance: 250 ms on top of 1.5 × the interval for the worst commit (this 2-core
    machine is shared with benchmarks; upload, manifest poll and apply take ~100 ms of it), and
    the p90 must be within the bound itself."""
    base, _ = moto
    make_bucket(base, "lag")
    interval = 1000
    p = start_backed_up(tmp / "lag.db", "s3://lag/l", base, interval_ms=interval)
    p.script(["CREATE TABLE stamp(id INTEGER PRIMARY KEY, ns INTEGER)",
              "INSERT INTO stamp VALUES (1, 0)"])
    uploaded(p)
    rdb = tmp / "lag-replica.db"
    r = Worker(rdb, env=aws_env(base))
    r.one("SELECT repl_follow('s3://lag/l', 200)")
    wait_for(lambda: r.one("SELECT repl_lsn()") >= p.one("SELECT repl_lsn()"), timeout=20,
             what="replica caught up")
    secs = 7.0
    reader = subprocess.Popen([sys.executable, "-c", READER, str(rdb), str(secs + 2.5)],
                              stdout=subprocess.PIPE, text=True)
    stamps = []
    t_end = time.time() + secs
    while time.time() < t_end:
        ns = time.time_ns()
        p.q("UPDATE stamp SET ns = ? WHERE id = 1", [ns])
        stamps.append(ns)
        time.sleep(0.05)
    seen = json.loads(reader.communicate(timeout=30)[0])
    r.close()
    p.close()
    lags = []
    i = 0
    for ns in stamps:
        while i < len(seen) and seen[i][1] < ns:
            i += 1
        assert i < len(seen), f"stamp {ns} never reached the replica"
        lags.append((seen[i][0] - ns) / 1e6)
    lags.sort()
    p90, worst = lags[int(len(lags) * 0.9)], lags[-1]
    print(f"lag over {len(lags)} commits: p50 {lags[len(lags) // 2]:.0f} ms, p90 {p90:.0f} ms, "
          f"max {worst:.0f} ms (interval {interval} ms)")
    assert p90 <= 1.5 * interval, lags
    assert worst <= 1.5 * interval + 250, lags


def test_uri_parameter_and_serve_backup(moto, tmp):
    """``file:u.db?repl_backup=s3://…`` on an existing primary sets its backup as
    repl_config('backup', …) does (the endpoint percent-encoded in it, no AWS_ENDPOINT_URL); and
    ``sqlite-replica serve s.db --backup s3://…`` uploads a live primary's log from the server
    process: the bucket restores the primary's last LSN, the target is remembered as the
    primary's setting, and a second serve with another target is refused."""
    base, _ = moto
    make_bucket(base, "uri")
    env = {**aws_env(base), "AWS_ENDPOINT_URL": ""}
    p = start_primary(tmp / "u.db", env=env)
    p.script(["CREATE TABLE t(v)", "INSERT INTO t VALUES (1), (2)"])
    p.close()
    target = f"s3://uri/u?endpoint={base}"
    enc = target.replace("?", "%3F")
    q = Worker(f"file:{tmp / 'u.db'}?repl_backup={enc}", env=env)
    assert q.one("SELECT repl_config('backup')") == target
    q.q("INSERT INTO t VALUES (3)")
    lsn, ck = lsn_checksum(q)
    uploaded(q)
    q.close()
    out = cli(["restore", "s3://uri/u", str(tmp / "u-r.db")], aws_env(base)).stdout
    assert restored(out) == (lsn, ck), out

    s = start_primary(tmp / "s.db", env=aws_env(base))
    s.script(["CREATE TABLE t(v)", "INSERT INTO t VALUES ('a')"])
    port = free_port()
    srv = subprocess.Popen([CLI, "serve", str(tmp / "s.db"), "--listen", f"127.0.0.1:{port}",
                            "--backup", "s3://uri/s"], env={**os.environ, **aws_env(base)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: s.one("SELECT repl_config('backup')") == "s3://uri/s", timeout=10,
                 interval=0.05, what="serve stored its target as the primary's")
        for i in range(20):
            s.q("INSERT INTO t VALUES (?)", [i])
        lsn, ck = lsn_checksum(s)
        wait_for(lambda: (backup_status(s).get("uploaded_lsn") or 0) >= lsn, timeout=20,
                 interval=0.05, what="serve uploaded the primary's log")
        r = cli(["serve", str(tmp / "s.db"), "--listen", f"127.0.0.1:{free_port()}",
                 "--backup", "s3://uri/other"], aws_env(base), ok=False)
        assert r.returncode != 0 and "already backs up to s3://uri/s" in r.stderr, r.stderr
    finally:
        srv.terminate()
        err = srv.communicate(timeout=10)[1]
    assert "event=backup_start" in err and "event=backup_upload" in err, err
    s.close()
    out = cli(["restore", "s3://uri/s", str(tmp / "s-r.db")], aws_env(base)).stdout
    assert restored(out) == (lsn, ck), out


RSS_OF = r"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mib(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """The peak RSS (MiB) of ``args`` and its stdout. Measured by a small Python parent that
    forks it, since a child's ru_maxrss starts from its parent's RSS at the fork (pytest's is
    ~80 MiB); that parent's own few MiB are in it, hence the --help baseline."""
    r = subprocess.run([sys.executable, "-c", RSS_OF] + args, env={**os.environ, **env},
                       capture_output=True, text=True, timeout=120)
    *out, last = r.stdout.rstrip("\n").split("\n")
    kib, code = map(int, last.split())
    assert code == 0, f"{args}: {r.stdout}{r.stderr}"
    return kib / 1024, "\n".join(out)

def test_large_snapshot_multipart_and_streamed(moto, tmp):
    """A snapshot larger than one part goes up as a multipart upload (REPL_BACKUP_PART_MB=5, the
    S3 minimum, stands in for the default 64 on a 24 MiB database: same code path, a short test)
    and comes back streamed: restore, verify and a replica's bootstrap from the bucket read it
    in pieces, so the restore's peak RSS stays well under the object's size (it held the whole
    object, twice, before)."""
    import sqlite3
    base, _ = moto
    make_bucket(base, "big")
    db = tmp / "big.db"
    c = sqlite3.connect(db)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE b(id INTEGER PRIMARY KEY, v BLOB)")
    c.executemany("INSERT INTO b(v) VALUES (randomblob(8000))", [()] * 3000)
    c.commit()
    c.close()
    size = db.stat().st_size
    assert size > 20 << 20, size
    p = start_backed_up(db, "s3://big/b", base, env={"REPL_BACKUP_PART_MB": "5"})
    p.q("INSERT INTO b(v) VALUES (randomblob(100))")
    lsn, ck = lsn_checksum(p)
    uploaded(p, timeout=60)
    p.close()
    c = s3(base)
    snaps = [o for o in c.list_objects_v2(Bucket="big", Prefix="b/snap/")["Contents"]]
    assert len(snaps) == 1 and snaps[0]["Size"] > size * 0.9, snaps
    # A multipart object's ETag is "<md5 of the parts' md5s>-<parts>".
    etag = c.head_object(Bucket="big", Key=snaps[0]["Key"])["ETag"]
    assert etag.strip('"').endswith(f"-{-(-snaps[0]['Size'] // (5 << 20))}"), etag
    env = aws_env(base)
    t0 = time.time()
    base_rss, _ = peak_rss_mib([CLI, "--help"], env)
    rss, out = peak_rss_mib([CLI, "restore", "s3://big/b", str(tmp / "r.db")], env)
    assert restored(out) == (lsn, ck), out
    print(f"restore of a {size >> 20} MiB snapshot: {time.time() - t0:.1f} s, peak RSS {rss:.1f} MiB "
          f"({base_rss:.1f} MiB for --help)")
    assert rss - base_rss < (size >> 20) / 4, f"peak RSS {rss:.1f} MiB for a {size >> 20} MiB snapshot"
    assert cli(["verify", "s3://big/b"], env).stdout.rstrip().endswith("OK")
    rep = Worker(tmp / "rep.db", env=env)
    assert rep.one("SELECT repl_sync('s3://big/b')") == lsn
    assert lsn_checksum(rep) == (lsn, ck)
    rep.close()
    # A damaged snapshot is refused by the streamed check, before restore creates anything.
    body = bytearray(c.get_object(Bucket="big", Key=snaps[0]["Key"])["Body"].read())
    body[len(body) // 2] ^= 0xFF
    put_object(base, "big", snaps[0]["Key"], bytes(body))
    r = cli(["restore", "s3://big/b", str(tmp / "bad.db")], env, ok=False)
    assert r.returncode == 1 and snaps[0]["Key"] in r.stderr, r.stderr
    assert "damaged" in r.stderr or "checksum" in r.stderr, r.stderr
    assert not (tmp / "bad.db").exists()


def test_bucket_retention(moto, tmp):
    """Bucket retention end to end: with backup_retain '3s' and a bucket snapshot cadence of
    1 s (backup_snapshot_secs), 8 s of writes leave a bucket whose oldest snapshot is newer than
    LSN 0, whose deleted objects are really gone (the listing is exactly the manifest), that
    still restores every LSN from its oldest snapshot on (each with the primary's checksum),
    refuses an LSN before it, and verifies clean."""
    base, _ = moto
    make_bucket(base, "ret")
    p = start_backed_up(tmp / "ret.db", "s3://ret/r", base, interval_ms=200,
                        env={"REPL_MAINTENANCE_MS": "300"})
    assert p.one("SELECT repl_config('backup_retain', '3s')") == 3
    assert p.one("SELECT repl_config('backup_snapshot_secs', 1)") == 1
    p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"])
    sums: dict[int, str] = {}
    when: dict[int, float] = {}
    t_end = time.time() + 8
    while time.time() < t_end:
        p.q("INSERT INTO t(v) VALUES (?)", ["r" * 300])
        lsn, ck = lsn_checksum(p)
        sums[lsn], when[lsn] = ck, time.time()
        time.sleep(0.03)
    final = uploaded(p)
    time.sleep(0.5)  # one more pass: its retention runs with the last upload's manifest
    t_check = time.time()
    p.close()
    c = s3(base)
    m = json.loads(c.get_object(Bucket="ret", Key="r/manifest.json")["Body"].read())
    listed = {o["Key"] for o in c.list_objects_v2(Bucket="ret", Prefix="r/")["Contents"]}
    named = {"r/" + o["key"] for o in m["snapshots"] + m["chunks"]} | {"r/manifest.json"}
    assert listed == named, (sorted(listed - named), sorted(named - listed))
    oldest = m["snapshots"][0]["first_lsn"]
    assert oldest > 1 and len(m["snapshots"]) >= 2, m["snapshots"]
    assert not any(k.startswith("r/log/00000000000000000001-") for k in listed), sorted(listed)
    # Every LSN committed inside the window (3 s before the last pass, 0.5 s of slack) is reachable.
    inside = [n for n in sums if when[n] >= t_check - 3 + 0.5 + 0.5]
    assert inside and min(inside) >= oldest, (min(inside), oldest)
    env = aws_env(base)
    for n in sorted({oldest, oldest + 1, (oldest + final) // 2, min(inside), final}):
        out = cli(["restore", "s3://ret/r", str(tmp / f"at-{n}.db"), "--lsn", str(n)], env).stdout
        assert restored(out) == (n, sums[n]), out
    r = cli(["restore", "s3://ret/r", str(tmp / "gone.db"), "--lsn", str(oldest - 1)], env, ok=False)
    assert r.returncode == 1 and not (tmp / "gone.db").exists(), r.stderr
    out = cli(["verify", "s3://ret/r"], env).stdout
    assert out.rstrip().endswith("OK") and f"..{final}" in out, out


def test_chunk_compaction(moto, tmp):
    """Chunk compaction: with runs of 8 small chunks merged (REPL_BACKUP_COMPACT_CHUNKS=8; 64 by
    default) and a 0.6 s lease (so merged-away chunks are deleted 1.8 s later), 5 s of writes
    uploaded every 100 ms leave fewer, larger chunk objects, and once the grace period is over
    the listing is exactly the manifest. A replica following the bucket meanwhile never fails
    and ends equal to the primary; restore (every 25th LSN, and --time) and verify are as
    without compaction."""
    base, _ = moto
    make_bucket(base, "cmp")
    env = {"REPL_BACKUP_COMPACT_CHUNKS": "8", "REPL_BACKUP_LEASE_MS": "600"}
    p = start_backed_up(tmp / "c.db", "s3://cmp/c", base, interval_ms=100, env=env)
    p.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"])
    uploaded(p)
    r = Worker(tmp / "c-replica.db", env=aws_env(base))
    r.one("SELECT repl_follow('s3://cmp/c', 200)")
    sums: dict[int, str] = {}
    t_end = time.time() + 5
    while time.time() < t_end:
        p.q("INSERT INTO t(v) VALUES (?)", ["c" * 100])
        lsn, ck = lsn_checksum(p)
        sums[lsn] = ck
        time.sleep(0.03)
    time.sleep(0.05)
    t_mid = time.time()
    time.sleep(0.05)
    p.q("INSERT INTO t(v) VALUES ('after')")
    final, final_ck = lsn_checksum(p)
    uploaded(p)
    wait_for(lambda: r.one("SELECT repl_lsn()") >= final, timeout=20, what="follower caught up")
    assert lsn_checksum(r) == (final, final_ck)
    assert "follow_error" not in r.stderr(), r.stderr()
    r.close()
    st = backup_status(p)
    assert st["compactions"] >= 2, st
    c = s3(base)

    def listing_is_manifest():
        m = json.loads(c.get_object(Bucket="cmp", Key="c/manifest.json")["Body"].read())
        listed = {o["Key"] for o in c.list_objects_v2(Bucket="cmp", Prefix="c/")["Contents"]}
        return m if listed == {"c/" + o["key"] for o in m["snapshots"] + m["chunks"]} | {"c/manifest.json"} else None

    m = wait_for(listing_is_manifest, timeout=10, interval=0.2, what="merged-away chunks deleted")
    p.close()
    assert len(m["chunks"]) < st["uploads"] / 3, (len(m["chunks"]), st)
    assert any(ch["last_lsn"] - ch["first_lsn"] >= 8 for ch in m["chunks"]), m["chunks"]
    env = aws_env(base)
    for n in list(range(25, final, 25)) + [final]:
        out = cli(["restore", "s3://cmp/c", str(tmp / f"at-{n}.db"), "--lsn", str(n)], env).stdout
        assert restored(out) == (n, sums.get(n, final_ck)), out
    out = cli(["restore", "s3://cmp/c", str(tmp / "t.db"), "--time", iso(t_mid)], env).stdout
    assert restored(out) == (final - 1, sums[final - 1]), out
    out = cli(["verify", "s3://cmp/c"], env).stdout
    assert out.rstrip().endswith("OK") and f"..{final}" in out, out


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


def manifest_writer(base: str, bucket: str, prefix: str) -> str:
    body = s3(base).get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    return json.loads(body)["writer"]


def test_same_lineage_lease_and_lost_race(moto, tmp):
    """Two uploaders of the SAME database lineage on one prefix: a copy of the primary's files
    opened on another path while the primary runs (what a reopen elsewhere after a crash looks
    like to the bucket). The copy refuses while the primary's uploader holds the manifest's
    lease; once the primary is frozen (SIGSTOP) past the lease the copy takes over, and when the
    primary wakes up its conditional manifest write is refused: it stops for good, says so in
    repl_status().backup.last_error and in an event line, and never writes again. Last, a third
    copy that committed its own transaction (a history the bucket does not have) refuses to
    append to the bucket. The lease is shortened to 3 s for the test (REPL_BACKUP_LEASE_MS;
    10 s by default; 1.5 s was too short for a moto server shared with the outage run on a
    loaded 2-core machine: a renewal delayed by a slow PUT let the copy take over)."""
    base, _ = moto
    make_bucket(base, "lease")
    lease = {"REPL_BACKUP_LEASE_MS": "3000"}
    db = tmp / "a.db"
    a = start_backed_up(db, "s3://lease/a", base, interval_ms=100, env=lease)
    a.script(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"])
    for i in range(20):
        a.q("INSERT INTO t(v) VALUES (?)", [f"row {i}"])
    lsn, ck = lsn_checksum(a)
    uploaded(a)
    a.close()
    copy, copy2 = tmp / "elsewhere", tmp / "elsewhere2"
    for d in (copy, copy2):
        d.mkdir()
        for f in tmp.glob("a.db*"):
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, d / f.name)
    # The reopened primary resumes its backup at once: the manifest's writer served this very
    # directory, whose backup.lock it holds now, so that uploader is gone (no lease to wait out).
    old_writer = manifest_writer(base, "lease", "a")
    t0 = time.monotonic()
    a = start_primary(db, env={**aws_env(base), **lease})
    wait_for(lambda: (backup_status(a).get("writer") or old_writer) != old_writer
             and backup_status(a).get("writer") == manifest_writer(base, "lease", "a")
             and backup_status(a).get("last_error") is None,
             timeout=15, interval=0.05, what="the reopened primary holds the prefix")
    assert time.monotonic() - t0 < 3.0, "the reopened primary waited out its own old lease"
    a_writer = backup_status(a)["writer"]
    b = start_primary(copy / "a.db", env={**aws_env(base), **lease})
    assert lsn_checksum(b) == (lsn, ck)
    wait_for(lambda: "is held by uploader" in (backup_status(b).get("last_error") or ""),
             timeout=10, interval=0.05, what="the copy refused")
    assert a_writer in backup_status(b)["last_error"], backup_status(b)
    # Two leases later the copy still waits: the live primary renews its lease.
    time.sleep(6.2)
    st = backup_status(b)
    assert "is held by uploader" in (st.get("last_error") or ""), st
    assert manifest_writer(base, "lease", "a") == a_writer
    assert "event=backup_error" in b.stderr() and "is held by uploader" in b.stderr()
    # The primary freezes: past the lease, the copy takes the prefix over.
    os.kill(a.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: backup_status(b).get("last_error") is None
                 and manifest_writer(base, "lease", "a") == backup_status(b).get("writer"),
                 timeout=15, interval=0.05, what="the copy took over")
        b_writer = backup_status(b)["writer"]
    finally:
        os.kill(a.pid, signal.SIGCONT)
    # The primary wakes up: its conditional write loses; it stops for good and says so.
    wait_for(lambda: backup_status(a).get("refused"), timeout=15, interval=0.05,
             what="the woken primary's uploader stopped")
    st = backup_status(a)
    assert f"was changed by uploader {b_writer}" in st["last_error"] and "stops" in st["last_error"], st
    wait_for(lambda: "event=backup_stopped" in a.stderr(), timeout=5, what="event line")
    assert b_writer in a.stderr()
    uploads = st["uploads"]
    time.sleep(1.0)
    st = backup_status(a)
    assert st["refused"] and st["uploads"] == uploads and st["last_error"], st
    assert manifest_writer(base, "lease", "a") == b_writer
    a.close()
    # The copy that holds the prefix commits and uploads; then it stops, and another copy made
    # at the same point, which committed a transaction of its own, comes up after the lease:
    # its history is not the bucket's, so it refuses instead of appending to it.
    b.q("INSERT INTO t(v) VALUES ('from the copy')")
    lsn, ck = lsn_checksum(b)
    uploaded(b)
    b.close()
    c2 = start_primary(copy2 / "a.db", env={**aws_env(base), **lease})
    c2.q("INSERT INTO t(v) VALUES ('from the other copy')")
    wait_for(lambda: backup_status(c2).get("refused"), timeout=15, interval=0.05,
             what="the diverged copy refused")
    assert "another copy" in backup_status(c2)["last_error"], backup_status(c2)
    c2.close()
    env = aws_env(base)
    out = cli(["restore", "s3://lease/a", str(tmp / "r.db")], env).stdout
    assert restored(out) == (lsn, ck), out
    assert cli(["verify", "s3://lease/a"], env).stdout.rstrip().endswith("OK")


def test_restore_pitr_and_outage(outage, tmp):
    """Continuous backup under writes with a 30 s bucket outage (OutageRun, run in the
    background while the module's other tests ran; this test is last in the file): commits go on
    during it, repl_status().backup shows the backlog and the error, and once the bucket is back
    the backlog drains and nothing is lost (every LSN restores with the primary's checksum at it).
    Then a "bad migration", and the primary's directory is deleted: the bucket alone restores the
    last uploaded LSN, the state just before the migration (--time) and every 100th LSN (--lsn).
    The directory source restores the same points."""
    outage.thread.join(OUTAGE_S + 90)
    assert not outage.thread.is_alive(), "the outage scenario did not finish"
    if outage.error is not None:
        raise outage.error
    st = outage.during
    assert st["backlog"] > 0 and "unreachable" in (st.get("last_error") or ""), st
    assert st["commits"] >= 100, st
    p, sums, db = outage.p, outage.sums, outage.db
    st = backup_status(p)
    assert st["backlog"] == 0 and st["last_error"] is None, st
    assert outage.drain_s < 20, outage.drain_s
    assert "event=backup_error" in p.stderr() and "event=backup_resumed" in p.stderr()
    write = outage.write
    # The bad migration, at a known time.
    time.sleep(0.05)
    before_drop_lsn, before_drop_sum = lsn_checksum(p)
    t_before = time.time()
    time.sleep(0.05)
    p.q("DROP TABLE keepme")
    write(110)
    final_lsn, final_sum = lsn_checksum(p)
    assert uploaded(p) == final_lsn

    env = aws_env(outage.base)
    # The directory source, before the directory goes.
    out = cli(["restore", str(db), str(tmp / "dir-pitr.db"), "--time", iso(t_before)], env).stdout
    assert restored(out) == (before_drop_lsn, before_drop_sum), out
    out = cli(["restore", str(db), str(tmp / "dir-100.db"), "--lsn", "100"], env).stdout
    assert restored(out) == (100, sums[100]), out
    p.close()
    outage.p = None
    shutil.rmtree(str(db) + "-replica")
    for f in db.parent.glob("app.db*"):
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
    # verify replays every record and checks each database checksum: nothing lost or torn.
    out = cli(["verify", "s3://pitr/app"], env).stdout
    assert out.rstrip().endswith("OK") and f"..{final_lsn}" in out, out
    assert f"database checksums verified: {final_lsn} records" in out, out

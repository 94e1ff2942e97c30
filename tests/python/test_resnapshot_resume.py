"""Resumable re-snapshot (issue 15): an existing replica that must re-snapshot downloads the
snapshot file into ``<db>-replica/snapshot.part`` first (``snapshot.json`` names the snapshot
by its ETag and records the durable length every 16 MiB); an interrupted download continues
from there, and only the complete, validated file is applied as one WAL transaction.

A primary of random blobs is served by ``sqlite-replica serve`` behind the fault proxy, which
counts the snapshot bytes it forwards and can slow them down. A replica is bootstrapped, then
written by a stock sqlite3 (a foreign write), so its next sync must re-snapshot.

* kill -9 of the re-snapshotting process past half → readers still see the replica's old
  state; a new process finishes with the primary's checksum, transferring exactly the part that
  was not recorded (HTTP Range);
* the same, continued from the primary's directory (a byte offset into the same snapshot);
* a connection cut in the middle → the same repl_sync() call continues and succeeds;
* a flipped byte in the resumed part → refused, nothing applied, the next sync starts over;
* the primary took a new snapshot meanwhile → the download starts over, still correct;
* a compressed (version 2) snapshot resumes the same way (Range over the stored bytes).
"""

from __future__ import annotations

import json
import os
import signal
import struct

import pytest

from faultproxy import FaultProxy
from helpers import py_ok, run_py, spawn_py, stock_one, wait_for
from test_large_database import make_primary_of, start_server

MIB = 1 << 20
SIZE_MIB = 64
SEG_HEADER = 32


@pytest.fixture(scope="module")
def primary(tmp_path_factory):
    db = tmp_path_factory.mktemp("resnap") / "p.db"
    info = make_primary_of(db, SIZE_MIB)
    proc, port = start_server(db)
    try:
        yield db, info, port
    finally:
        proc.kill()
        proc.wait()


def snapshot_file(db) -> str:
    d = f"{db}-replica/snap"
    return os.path.join(d, sorted(os.listdir(d))[-1])


def saved(rdb) -> dict | None:
    try:
        with open(f"{rdb}-replica/snapshot.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


SYNC = r"""
import json
load()
r = connect(%r)
try:
    one(r, "select repl_sync(?)", (%r,))
    st = json.loads(one(r, "select repl_status()"))
    print(json.dumps({"error": None, "checksum": one(r, "select repl_checksum()"),
                      "resnapshots": st.get("resnapshots")}))
except Exception as e:
    print(json.dumps({"error": str(e)}))
"""


def sync(rdb, url) -> tuple[dict, str]:
    """repl_sync(url) in a new process: its answer and its event log (stderr)."""
    proc = run_py(SYNC % (str(rdb), url), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def diverged_replica(rdb, port) -> int:
    """A replica bootstrapped from the primary (directly, not through a proxy), then written by
    a stock sqlite3: its next sync re-snapshots. Returns its row count after the foreign write."""
    r, _ = sync(rdb, f"http://127.0.0.1:{port}")
    assert r["error"] is None, r
    stock_one(rdb, "delete from t where id % 2 = 0;")
    return int(stock_one(rdb, "select count(*) from t;"))


def kill_past_half(rdb, url, proxy, total) -> dict:
    """Starts the re-snapshot through the (throttled) proxy and kills it -9 once its recorded
    download passed half of the snapshot file; returns that record."""
    proxy.throttle(32 * MIB)
    child = spawn_py(r"""
load()
r = connect(%r)
one(r, "select repl_sync(?)", (%r,))
""" % (str(rdb), url))
    try:
        def past_half():
            if child.poll() is not None:
                raise AssertionError(f"the re-snapshot ended before half: {child.stderr.read()}")
            s = saved(rdb)
            return s and s["bytes"] >= total // 2 and s

        wait_for(past_half, timeout=240, interval=0.005, what="re-snapshot download past half")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        proxy.throttle(None)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    rec = saved(rdb)  # the last record before the kill
    assert rec and rec["bytes"] < total and rec["len"] == total, rec
    return rec


def resumed_at(log: str) -> int | None:
    for line in log.splitlines():
        if "event=snapshot_download_resume" in line:
            return int(line.split(" bytes=")[1].split()[0])
    return None


def assert_finished(rdb, r, want_checksum):
    assert r["error"] is None, r
    assert r["checksum"] == want_checksum
    assert r["resnapshots"] >= 1, r
    assert not os.path.exists(f"{rdb}-replica/snapshot.part")
    assert not os.path.exists(f"{rdb}-replica/snapshot.json")
    assert stock_one(rdb, "pragma quick_check;") == "ok"


def test_kill_at_half_then_resume_transfers_only_the_rest(primary, tmp_path):
    db, p, port = primary
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    rows = diverged_replica(rdb, port)
    with FaultProxy(port) as proxy:
        rec = kill_past_half(rdb, proxy.url, proxy, total)
    # The half-downloaded snapshot touched nothing readers see: still the old state.
    assert int(stock_one(rdb, "select count(*) from t;")) == rows
    assert stock_one(rdb, "pragma quick_check;") == "ok"
    # A proxy of its own for the resumed download: the first one may still be counting the
    # bytes it was sending to the killed process.
    with FaultProxy(port) as proxy:
        r, log = sync(rdb, proxy.url)
        sent = proxy.body_bytes["/v1/snapshot"]
    print(f"snapshot {total} bytes, recorded {rec['bytes']}, resumed transfer {sent}")
    assert_finished(rdb, r, p["checksum"])
    assert resumed_at(log) == rec["bytes"], log
    assert sent == total - rec["bytes"], (sent, total, rec)


def test_http_download_continues_from_the_primary_directory(primary, tmp_path):
    """The ETag is the snapshot's, not the transport's: a download begun over HTTP continues
    from the directory source with a byte offset."""
    db, p, port = primary
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    diverged_replica(rdb, port)
    with FaultProxy(port) as proxy:
        rec = kill_past_half(rdb, proxy.url, proxy, total)
    r, log = sync(rdb, str(db))
    assert_finished(rdb, r, p["checksum"])
    assert resumed_at(log) == rec["bytes"], log


def test_cut_connection_continues_within_the_call(primary, tmp_path):
    db, p, port = primary
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    diverged_replica(rdb, port)
    with FaultProxy(port) as proxy:
        proxy.snapshots = True
        proxy.drop_after(total // 2, count=1)
        r, log = sync(rdb, proxy.url)
        assert proxy.faults["drop"] == 1
        sent = proxy.body_bytes["/v1/snapshot"]
    assert_finished(rdb, r, p["checksum"])
    assert "event=snapshot_download_retry" in log, log
    # From the last record (every 16 MiB; the cut came past 16 MiB), not from zero.
    at = resumed_at(log)
    assert at is not None and at >= 16 * MIB, log
    assert sent <= total + 16 * MIB + MIB, (sent, total)


def test_corrupt_byte_in_the_resumed_part_is_refused(primary, tmp_path):
    """The record checksum covers the bytes an earlier process received too: a flipped byte in
    the resumed part fails it, nothing is applied (readers keep the old state), the part file
    is removed, and the next sync downloads again and succeeds."""
    db, p, port = primary
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    rows = diverged_replica(rdb, port)
    with FaultProxy(port) as proxy:
        rec = kill_past_half(rdb, proxy.url, proxy, total)
    with FaultProxy(port) as proxy:
        proxy.snapshots = True
        proxy.flip((total - rec["bytes"]) // 2, count=1)  # inside the resumed part
        r, _ = sync(rdb, proxy.url)
        assert r["error"] and "checksum" in r["error"], r
        assert proxy.faults["flip"] == 1
        assert not os.path.exists(f"{rdb}-replica/snapshot.part")
        assert int(stock_one(rdb, "select count(*) from t;")) == rows
        again, log = sync(rdb, proxy.url)
    assert_finished(rdb, again, p["checksum"])
    assert resumed_at(log) is None, log


def new_snapshot(db, old: str, compress: str | None = None, blob: str = "randomblob(length(b))") -> str:
    """The primary rewrites a quarter of its rows (as `blob`) at a time until its log outgrows
    the snapshot and a maintenance pass (every 50 ms here) takes a new snapshot (compressed with
    `compress`); returns the primary's checksum after that."""
    out = json.loads(py_ok(r"""
import json, os, time
load()
c = connect(%r)
one(c, "select repl_primary()")
if %r:
    one(c, "select repl_config('compress', ?)", (%r,))
one(c, "select repl_config('snapshot_bytes', 1)")
snap = os.path.dirname(%r)
deadline = time.monotonic() + 120
i = 0
while sorted(os.listdir(snap))[-1] == os.path.basename(%r) and time.monotonic() < deadline:
    c.execute("update t set b = %s where id %% 4 = ?", (i %% 4,))
    i += 1
    time.sleep(0.05)  # polling for the maintenance pass, with a deadline
print(json.dumps({"checksum": one(c, "select repl_checksum()")}))
""" % (str(db), compress, compress, old, old, blob), timeout=300, env={"REPL_MAINTENANCE_MS": "50"}))
    assert snapshot_file(db) != old, "the primary took no new snapshot"
    return out["checksum"]


def test_new_snapshot_meanwhile_starts_over(tmp_path):
    db = tmp_path / "p.db"
    make_primary_of(db, 40)
    proc, port = start_server(db)
    try:
        total = os.path.getsize(snapshot_file(db))
        rdb = tmp_path / "r.db"
        diverged_replica(rdb, port)
        with FaultProxy(port) as proxy:
            kill_past_half(rdb, proxy.url, proxy, total)
            checksum = new_snapshot(db, snapshot_file(db))
            new_total = os.path.getsize(snapshot_file(db))
            proxy.body_bytes.clear()
            r, log = sync(rdb, proxy.url)
            # The replica may be newer than the snapshot (the records after it), never another state.
            assert_finished(rdb, r, checksum)
            assert "event=snapshot_download_restart" in log, log
            assert resumed_at(log) is None, log
            assert proxy.body_bytes["/v1/snapshot"] >= new_total
    finally:
        proc.kill()
        proc.wait()


def record_version(path: str) -> int:
    with open(path, "rb") as f:
        return struct.unpack(">H", f.read(SEG_HEADER + 6)[SEG_HEADER + 4:SEG_HEADER + 6])[0]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A primary whose newest snapshot is compressed (version 2, zstd), about 2:1; served."""
    db = tmp_path_factory.mktemp("resnapz") / "p.db"
    py_ok(r"""
load()
c = connect(%r)
c.execute("pragma journal_mode=wal")
c.execute("create table t(id integer primary key, b blob)")
c.execute("begin")
for i in range(192):  # half of each row random, half zeros
    c.execute("insert into t(b) values(randomblob(131072) || zeroblob(131072))")
c.execute("commit")
one(c, "select repl_primary()")
""" % str(db), timeout=300)
    checksum = new_snapshot(db, snapshot_file(db), "zstd", "randomblob(131072) || zeroblob(131072)")
    snap = snapshot_file(db)
    assert record_version(snap) == 2
    assert os.path.getsize(snap) < os.path.getsize(db) * 3 // 4, (os.path.getsize(snap), os.path.getsize(db))
    proc, port = start_server(db)
    try:
        yield db, checksum, port
    finally:
        proc.kill()
        proc.wait()


def test_compressed_snapshot_resumes(compressed, tmp_path):
    """Version 2 records are resumed over their stored (compressed) bytes: the part file holds
    exactly what the primary stored, the record checksum covers it whole at the end."""
    db, checksum, port = compressed
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    diverged_replica(rdb, port)
    with FaultProxy(port) as proxy:
        rec = kill_past_half(rdb, proxy.url, proxy, total)
    with FaultProxy(port) as proxy:
        r, log = sync(rdb, proxy.url)
        sent = proxy.body_bytes["/v1/snapshot"]
    print(f"compressed snapshot {total} bytes, recorded {rec['bytes']}, resumed transfer {sent}")
    assert_finished(rdb, r, checksum)
    assert resumed_at(log) == rec["bytes"], log
    assert sent == total - rec["bytes"], (sent, total, rec)


def test_compressed_bootstrap_resumes(compressed, tmp_path):
    """A bootstrap of a compressed snapshot downloads the stored file (resumably) and writes
    the database from it; killed past half, the file is still empty and the next process
    fetches only the rest."""
    db, checksum, port = compressed
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    with FaultProxy(port) as proxy:
        rec = kill_past_half(rdb, proxy.url, proxy, total)
    assert os.path.getsize(rdb) == 0
    with FaultProxy(port) as proxy:
        r, log = sync(rdb, proxy.url)
        sent = proxy.body_bytes["/v1/snapshot"]
    print(f"compressed bootstrap {total} bytes, recorded {rec['bytes']}, resumed transfer {sent}")
    assert r["error"] is None, r
    assert r["checksum"] == checksum
    assert resumed_at(log) == rec["bytes"], log
    # Only the rest (the recorded download says how to continue: no probe of the encoding).
    assert sent == total - rec["bytes"], (sent, total, rec)
    assert not os.path.exists(f"{rdb}-replica/snapshot.part")
    assert not os.path.exists(f"{rdb}-replica/bootstrap.json")
    assert stock_one(rdb, "pragma quick_check;") == "ok"

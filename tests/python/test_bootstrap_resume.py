"""Resumable bootstrap (issue 15): an interrupted bootstrap continues where it stopped.

A primary of random blobs is served by ``sqlite-replica serve`` behind the fault proxy, which
counts the snapshot bytes it forwards and can slow them down (so the test can act in the middle
of a transfer). The bootstrapping replica records its durable progress in
``<db>-replica/bootstrap.json`` every 16 MiB; the tests read it to know how far it got.

* kill -9 of the bootstrapping process past half → a new process finishes with the primary's
  checksum, transferring exactly the part that was not recorded (HTTP Range);
* a connection cut in the middle → the same repl_sync() call continues and succeeds;
* the primary took a new snapshot meanwhile → the bootstrap starts over, still correct;
* a corrupt byte in the resumed part → refused, the file has no page 1 (not a database),
  and the next try bootstraps.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from faultproxy import FaultProxy
from helpers import py_ok, spawn_py, wait_for
from test_large_database import make_primary_of, start_server

MIB = 1 << 20
SIZE_MIB = 96


@pytest.fixture(scope="module")
def primary(tmp_path_factory):
    db = tmp_path_factory.mktemp("resume") / "p.db"
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
        with open(f"{rdb}-replica/bootstrap.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sync(rdb, url) -> dict:
    out = py_ok(r"""
import json
load()
r = connect(%r)
try:
    one(r, "select repl_sync(?)", (%r,))
    print(json.dumps({"error": None, "checksum": one(r, "select repl_checksum()")}))
except Exception as e:
    print(json.dumps({"error": str(e)}))
""" % (str(rdb), url), timeout=300)
    return json.loads(out)


def kill_past_half(rdb, url, proxy, total) -> dict:
    """Starts a bootstrap through the (throttled) proxy and kills it -9 once its recorded
    progress passed half of the snapshot; returns that record."""
    proxy.throttle(32 * MIB)
    child = spawn_py(r"""
load()
r = connect(%r)
one(r, "select repl_sync(?)", (%r,))
""" % (str(rdb), url))
    try:
        def past_half():
            if child.poll() is not None:
                raise AssertionError(f"the bootstrap ended before half: {child.stderr.read()}")
            s = saved(rdb)
            return s and s["bytes"] >= total // 2 and s

        wait_for(past_half, timeout=240, interval=0.005, what="bootstrap progress past half")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        proxy.throttle(None)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    rec = saved(rdb)  # the last record before the kill
    assert rec and rec["bytes"] < total, rec
    with open(rdb, "rb") as f:
        assert f.read(16) != b"SQLite format 3\0", "page 1 was written before the end"
    return rec


def test_kill_at_half_then_resume_transfers_only_the_rest(primary, tmp_path):
    db, p, port = primary
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    with FaultProxy(port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        rec = kill_past_half(rdb, url, proxy, total)
        assert rec["bytes"] >= total // 2
    # A proxy of its own for the resumed download: the first one may still be counting the
    # bytes it was sending to the killed process.
    with FaultProxy(port) as proxy:
        r = sync(rdb, f"http://127.0.0.1:{proxy.port}")
        assert r["error"] is None, r
        assert r["checksum"] == p["checksum"]
        sent = proxy.body_bytes["/v1/snapshot"]
    print(f"snapshot {total} bytes, recorded {rec['bytes']}, resumed transfer {sent}")
    assert sent == total - rec["bytes"], (sent, total, rec)
    assert not os.path.exists(f"{rdb}-replica/bootstrap.json")
    assert not os.path.exists(f"{rdb}-replica/bootstrap.page1")


def test_cut_connection_continues_within_the_call(primary, tmp_path):
    db, p, port = primary
    total = os.path.getsize(snapshot_file(db))
    with FaultProxy(port) as proxy:
        proxy.snapshots = True
        proxy.drop_after(total // 2, count=1)
        r = sync(tmp_path / "r.db", f"http://127.0.0.1:{proxy.port}")
        assert r["error"] is None, r
        assert r["checksum"] == p["checksum"]
        assert proxy.faults["drop"] == 1
        sent = proxy.body_bytes["/v1/snapshot"]
    # From the last record (every 16 MiB), not from zero.
    assert sent <= total + 16 * MIB + MIB, (sent, total)


def test_corrupt_byte_in_the_resumed_part_is_refused(primary, tmp_path):
    db, p, port = primary
    total = os.path.getsize(snapshot_file(db))
    rdb = tmp_path / "r.db"
    with FaultProxy(port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        rec = kill_past_half(rdb, url, proxy, total)
        proxy.snapshots = True
        proxy.flip((total - rec["bytes"]) // 2, count=1)  # inside the resumed part
        r = sync(rdb, url)
        assert r["error"] and "checksum" in r["error"], r
        assert proxy.faults["flip"] == 1
        with open(rdb, "rb") as f:
            assert f.read(16) != b"SQLite format 3\0", "a refused snapshot made a database"
        assert os.path.getsize(rdb) == 0
        again = sync(rdb, url)
        assert again["error"] is None, again
        assert again["checksum"] == p["checksum"]


def test_new_snapshot_meanwhile_starts_over(tmp_path):
    db = tmp_path / "p.db"
    make_primary_of(db, 40)
    proc, port = start_server(db)
    try:
        total = os.path.getsize(snapshot_file(db))
        old = snapshot_file(db)
        rdb = tmp_path / "r.db"
        with FaultProxy(port) as proxy:
            url = f"http://127.0.0.1:{proxy.port}"
            kill_past_half(rdb, url, proxy, total)
            # The primary rewrites every row; its log then outgrows the snapshot: a new one.
            # The primary rewrites every row twice: its log outgrows the snapshot, and the
            # next maintenance pass (every 50 ms here) takes a new one.
            out = json.loads(py_ok(r"""
import json, os, time
load()
c = connect(%r)
one(c, "select repl_primary()")
one(c, "select repl_config('snapshot_bytes', 1)")
for _ in range(2):
    c.execute("update t set b = randomblob(length(b))")
snap = os.path.dirname(%r)
deadline = time.monotonic() + 120
while sorted(os.listdir(snap))[-1] == os.path.basename(%r) and time.monotonic() < deadline:
    time.sleep(0.05)  # polling for the maintenance pass, with a deadline
print(json.dumps({"checksum": one(c, "select repl_checksum()")}))
""" % (str(db), old, old), timeout=300, env={"REPL_MAINTENANCE_MS": "50"}))
            assert snapshot_file(db) != old, "the primary took no new snapshot"
            new_total = os.path.getsize(snapshot_file(db))
            proxy.body_bytes.clear()
            r = sync(rdb, url)
            assert r["error"] is None, r
            # The replica may be newer than the snapshot (the records after it), never another state.
            assert r["checksum"] == out["checksum"]
            assert proxy.body_bytes["/v1/snapshot"] >= new_total
    finally:
        proc.kill()
        proc.wait()

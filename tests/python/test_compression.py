"""Compression on the wire and in the log (issue 15; FORMAT.md §3.7, §8.9).

A primary with ``repl_config('compress', …)`` stores new records and snapshots compressed; a
replica of this build reads them over HTTP as stored and from the directory source, and ends
byte-identical to the primary (equal ``repl_lsn()``/``repl_checksum()``, equal content for a
stock reader) with each codec and without compression. A client that does not name the codec
(an older build: no ``X-Repl-Accept-Encoding``) gets version-1 records decoded by the server.
A byte flipped inside a compressed record on the way (faultproxy) is refused with nothing
applied, and the next clean answer is applied.
"""

from __future__ import annotations

import os
import struct
import urllib.request
from pathlib import Path

import pytest

from faultproxy import FaultProxy
from helpers import (
    Worker,
    WorkerError,
    assert_replica_equals_primary,
    durable,
    lsn_checksum,
    start_serving_primary,
    wait_for,
)

SEG_HEADER = 32


def write_pages(p: Worker, rounds: int, start: int = 0) -> None:
    """Text-heavy rows (compressible) and random blobs (not), one transaction per round."""
    for i in range(start, start + rounds):
        p.script([
            "BEGIN",
            "WITH RECURSIVE c(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM c WHERE value < 60) "
            "INSERT INTO notes(body) SELECT printf('note %d of round %d: the replica follows the primary, "
            "user%d ordered %d items; status pending shipped delivered', value, " + str(i) + ", value % 97, value * 3) "
            "FROM c",
            "WITH RECURSIVE c(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM c WHERE value < 3) "
            "INSERT INTO blobs(b) SELECT randomblob(1500) FROM c",
            "COMMIT",
        ])


def make_tables(p: Worker) -> None:
    """The two tables write_pages fills."""
    p.script([
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)",
        "CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB)",
    ])


def record_versions(data: bytes) -> list[int]:
    """The version field of each record in concatenated records (FORMAT.md §3.1)."""
    out, at = [], 0
    while at + 88 <= len(data):
        assert data[at:at + 4] == b"RPLR", f"no record at {at}"
        out.append(struct.unpack(">H", data[at + 4:at + 6])[0])
        at += struct.unpack(">Q", data[at + 8:at + 16])[0]
    assert at == len(data)
    return out


def stored_versions(pdb: Path) -> list[int]:
    out = []
    for seg in sorted((Path(str(pdb) + "-replica") / "log").glob("*.seg")):
        out += record_versions(seg.read_bytes()[SEG_HEADER:])
    return out


def get(url: str, accept: str | None) -> tuple[dict, bytes]:
    req = urllib.request.Request(url)
    if accept is not None:
        req.add_header("X-Repl-Accept-Encoding", accept)
    with urllib.request.urlopen(req, timeout=30) as r:
        return {k.lower(): v for k, v in r.headers.items()}, r.read()


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4"])
def test_replicas_over_http_and_directory_end_byte_identical(tmp, codec):
    p, url = start_serving_primary(tmp / "p.db")
    try:
        make_tables(p)
        assert p.one("SELECT repl_config('compress', ?)", [codec]) == codec
        assert p.one("SELECT repl_config('compress')") == codec
        write_pages(p, 12)
        lsn = durable(p)
        versions = stored_versions(tmp / "p.db")
        if codec == "none":
            assert set(versions) == {1}, versions
        else:
            assert versions.count(2) >= 12, versions  # every record written after the setting
        # Over HTTP (this build names every codec) and from the directory: byte-identical.
        want = lsn_checksum(p)
        for name, source in (("http", url), ("dir", str(tmp / "p.db"))):
            with Worker(tmp / f"r-{name}.db") as r:
                assert r.one("SELECT repl_sync(?)", [source]) == lsn
                assert lsn_checksum(r) == want, name
                assert_replica_equals_primary(tmp / f"r-{name}.db", p)
        # On the wire: stored records as they are to a client naming the codec, version 1
        # (decoded by the server) to one that names none, the same pages either way.
        log = f"{url}/v1/log?from=1&max_bytes=268435456"
        h_new, new = get(log, "zstd, lz4")
        h_old, old = get(log, None)
        assert set(record_versions(old)) == {1}
        assert h_new["x-repl-records"] == h_old["x-repl-records"]
        if codec == "none":
            assert new == old and "x-repl-encoding" not in h_new
        else:
            assert h_new["x-repl-encoding"] == codec and h_old["x-repl-encoding"] == "identity"
            assert 2 in record_versions(new)
            assert len(new) < len(old) * 0.8, (len(new), len(old))
    finally:
        p.close()


def test_compressed_snapshot_serves_both_clients_and_bootstraps(tmp):
    """A snapshot written while compression is on (a maintenance pass after enough log)."""
    p, url = start_serving_primary(tmp / "p.db")
    try:
        make_tables(p)
        p.one("SELECT repl_config('compress', 'zstd')")
        p.one("SELECT repl_config('snapshot_bytes', 65536)")
        write_pages(p, 30)
        snapdir = Path(str(tmp / "p.db") + "-replica") / "snap"

        def compressed_snapshot() -> bool:
            for f in snapdir.glob("*.snap"):
                b = f.read_bytes()
                if len(b) > SEG_HEADER + 88 and struct.unpack(">H", b[SEG_HEADER + 4:SEG_HEADER + 6])[0] == 2:
                    return True
            return False

        wait_for(compressed_snapshot, timeout=30, what="a compressed snapshot file")
        h_new, new = get(f"{url}/v1/snapshot", "zstd")
        h_old, old = get(f"{url}/v1/snapshot", None)
        # The newest durable snapshot is served: the compressed one.
        assert h_new["x-repl-encoding"] == "zstd", h_new
        assert record_versions(new[SEG_HEADER:]) == [2]
        assert record_versions(old[SEG_HEADER:]) == [1]
        assert h_old["x-repl-encoding"] == "identity" and len(new) < len(old)
        lsn = durable(p)
        with Worker(tmp / "r.db") as r:
            assert r.one("SELECT repl_sync(?)", [url]) == lsn
            assert lsn_checksum(r) == lsn_checksum(p)
            assert_replica_equals_primary(tmp / "r.db", p)
    finally:
        p.close()


def test_flipped_byte_in_compressed_record_is_refused_nothing_applied(tmp):
    p, url = start_serving_primary(tmp / "p.db")
    proxy = FaultProxy(int(url.rsplit(":", 1)[1]))
    try:
        make_tables(p)
        p.one("SELECT repl_config('compress', 'zstd')")
        write_pages(p, 2)
        with Worker(tmp / "r.db") as r:
            assert r.one("SELECT repl_sync(?)", [proxy.url]) == durable(p)
            before = lsn_checksum(r)
            write_pages(p, 5, start=2)
            lsn = durable(p)
            assert 2 in stored_versions(tmp / "p.db")
            # Byte 100 of the body: inside the first record's first compressed page entry.
            for offset in (100, 2000):
                proxy.flip(offset, count=1)
                with pytest.raises(WorkerError) as e:
                    r.one("SELECT repl_sync(?)", [proxy.url])
                assert "nothing was applied" in e.value.msg, e.value.msg
                assert proxy.faults["flip"] >= 1
                assert lsn_checksum(r) == before
            assert r.one("SELECT repl_sync(?)", [proxy.url]) == lsn
            assert lsn_checksum(r) == lsn_checksum(p)
            assert_replica_equals_primary(tmp / "r.db", p)
    finally:
        proxy.close()
        p.close()


def test_compress_setting_refuses_bad_values(tmp):
    p, _ = start_serving_primary(tmp / "p.db")
    try:
        for bad in ["gzip", "zstd:20", 20, -1, 2.5]:
            with pytest.raises(WorkerError) as e:
                p.one("SELECT repl_config('compress', ?)", [bad])
            assert "compress" in e.value.msg and "'zstd'" in e.value.msg, e.value.msg
        assert p.one("SELECT repl_config('compress')") == "none"
        assert p.one("SELECT repl_config('compress', 9)") == "zstd:9"
        assert p.one("SELECT repl_config('compress', 0)") == "none"
    finally:
        p.close()


def test_follower_on_the_event_loop_client_reads_compressed_records(tmp):
    """repl_follow() long-polls through the engine's own client (not ureq): same negotiation."""
    p, url = start_serving_primary(tmp / "p.db")
    try:
        make_tables(p)
        p.one("SELECT repl_config('compress', 'lz4')")
        with Worker(tmp / "r.db") as r:
            r.one("SELECT repl_follow(?, 200)", [url])
            for i in range(5):
                write_pages(p, 1, start=i)
                lsn = p.one("SELECT repl_lsn()")
                assert r.one("SELECT repl_wait(?, 10000)", [lsn]) >= lsn
            assert 2 in stored_versions(tmp / "p.db")
            assert lsn_checksum(r) == lsn_checksum(p)
            st = r.one("SELECT repl_status()")
            assert '"errors":0' in st.replace(" ", ""), st
            r.q("SELECT repl_follow(NULL)")
        assert_replica_equals_primary(tmp / "r.db", p)
    finally:
        p.close()


@pytest.mark.skipif(not os.environ.get("REPL_OLD_EXT"), reason="REPL_OLD_EXT: an older build's libreplica (no .so)")
def test_an_older_build_bootstraps_and_follows_a_compressing_primary_over_http(tmp):
    """With REPL_OLD_EXT set to a build from before compression (e.g. ``git archive`` of an older
    commit built with ``cargo build --release --lib``): it bootstraps from a compressed snapshot
    and follows compressed records over HTTP (the server decodes for it), ending byte-identical;
    reading the compressed log directory itself it stops with a clear error."""
    old = {"REPLICA_EXT": os.environ["REPL_OLD_EXT"]}
    p, url = start_serving_primary(tmp / "p.db", env={"REPL_MAINTENANCE_MS": "50"})
    try:
        make_tables(p)
        p.one("SELECT repl_config('compress', 'zstd')")
        p.one("SELECT repl_config('snapshot_bytes', 65536)")
        write_pages(p, 30)
        snapdir = Path(str(tmp / "p.db") + "-replica") / "snap"
        wait_for(lambda: any(struct.unpack(">H", f.read_bytes()[SEG_HEADER + 4:SEG_HEADER + 6])[0] == 2
                             for f in snapdir.glob("*.snap")), timeout=30, what="a compressed snapshot")
        with Worker(tmp / "old.db", env=old) as r:
            assert r.one("SELECT repl_sync(?)", [url]) == durable(p)
            assert lsn_checksum(r) == lsn_checksum(p)
            r.one("SELECT repl_follow(?, 200)", [url])
            write_pages(p, 5, start=30)
            lsn = p.one("SELECT repl_lsn()")
            assert r.one("SELECT repl_wait(?, 10000)", [lsn]) >= lsn
            assert lsn_checksum(r) == lsn_checksum(p)
            r.q("SELECT repl_follow(NULL)")
        assert_replica_equals_primary(tmp / "old.db", p)
        with Worker(tmp / "old-dir.db", env=old) as r:
            with pytest.raises(WorkerError) as e:
                r.one("SELECT repl_sync(?)", [str(tmp / "p.db")])
            assert "unsupported record format version 2" in e.value.msg, e.value.msg
    finally:
        p.close()


def test_gap_snapshot_of_a_compressing_primary_is_logged_as_written(tmp):
    """A commit by a writer without the extension (a gap) on a zstd primary: the new
    generation's snapshot is written compressed and copied into the log as written; a replica
    that was following re-snapshots and ends equal."""
    import sqlite3  # this interpreter's SQLite, without the extension: a foreign writer

    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = Worker(pdb)
    try:
        p.one("SELECT repl_primary()")
        assert p.one("SELECT repl_config('compress', 'zstd')") == "zstd"
        p.script(["CREATE TABLE notes(body TEXT)", "CREATE TABLE blobs(b BLOB)"])
        write_pages(p, 3)
        r = Worker(rdb)
        try:
            r.one("SELECT repl_sync(?)", [str(pdb)])
            stock = sqlite3.connect(pdb)
            stock.execute("INSERT INTO notes(body) VALUES ('written without the extension')")
            stock.commit()
            stock.close()
            write_pages(p, 1, start=3)  # the next capture sees the foreign commit: a gap
            st = lsn_checksum(p)
            assert p.one("SELECT json_extract(repl_status(), '$.generation')") == 2
            assert 2 in set(stored_versions(pdb)), "the logged snapshot should be compressed"
            durable(p)
            wait_for(lambda: r.one("SELECT repl_sync()") == st[0], timeout=30, what="the replica at the new generation")
            assert lsn_checksum(r) == st
        finally:
            r.close()
    finally:
        p.close()

#!/usr/bin/env python3
"""sqlite-replica from Python (apsw): a primary and a replica, first through the log directory
(one machine or shared disk), then over HTTP with a follower and a forwarded write.

Run from the repository root after `make build`:  python3 examples/python/replicate.py
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import apsw

EXT = os.environ.get("REPLICA_EXT", str(Path(__file__).resolve().parents[2] / "build" / "libreplica"))

# Load once per process; every connection opened afterwards goes through the extension's VFS.
boot = apsw.Connection(":memory:")
boot.enable_load_extension(True)
boot.load_extension(EXT)


def one(conn, sql, args=()):
    return conn.execute(sql, args).fetchone()[0]


# The primary's server keeps the role (and its background threads) alive until the process
# exits, so they may still write into primary.db-replica/ while the directory is removed.
with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as d:
    primary = apsw.Connection(f"{d}/primary.db")
    one(primary, "SELECT repl_primary()")  # WAL mode + replication log
    primary.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    primary.execute("INSERT INTO notes(text) VALUES (?)", ("hello",))

    # 1. Directory source: the replica reads the primary's <db>-replica/ log directly.
    replica = apsw.Connection(f"{d}/replica.db")
    print("repl_sync ->", one(replica, "SELECT repl_sync(?)", (f"{d}/primary.db",)))
    print("replica reads", replica.execute("SELECT * FROM notes").fetchall())
    primary.execute("INSERT INTO notes(text) VALUES ('second')")
    print("repl_sync again ->", one(replica, "SELECT repl_sync()"))
    # Only durable records are served (the primary's group fsync runs about every 2 ms):
    # repl_wait syncs until the replica holds the primary's last commit.
    one(replica, "SELECT repl_wait(?, 5000)", (one(primary, "SELECT repl_lsn()"),))
    assert one(replica, "SELECT repl_checksum()") == one(primary, "SELECT repl_checksum()")

    # 2. HTTP: the primary serves its log; a second replica follows and forwards a write.
    one(primary, "SELECT repl_primary('127.0.0.1:0')")
    one(primary, "SELECT repl_config('exec', 1)")  # accept forwarded writes (off by default)
    url = json.loads(one(primary, "SELECT repl_status()"))["server"]["url"]
    remote = apsw.Connection(f"{d}/remote.db")
    print("repl_follow ->", one(remote, "SELECT repl_follow(?)", (url,)))
    lsn = one(remote, "SELECT repl_exec('INSERT INTO notes(text) VALUES (?)', ?)", (json.dumps(["via http"]),))
    print(f"repl_exec -> LSN {lsn}; the replica reads", remote.execute("SELECT text FROM notes").fetchall())
    try:
        remote.execute("INSERT INTO notes(text) VALUES ('local')")
    except apsw.ReadOnlyError as e:
        print("a local write on the replica is refused:", e)
    status = json.loads(one(remote, "SELECT repl_status()"))
    print("status: lsn", status["lsn"], "lag_lsn", status["lag_lsn"], "follow", status["follow"]["state"])
    one(remote, "SELECT repl_wait(?, 5000)", (one(primary, "SELECT repl_lsn()"),))
    ok = one(remote, "SELECT repl_checksum()") == one(primary, "SELECT repl_checksum()")
    one(remote, "SELECT repl_follow(NULL)")
    print("ok" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)

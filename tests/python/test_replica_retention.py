"""Log retention and periodic snapshots on the primary (issue 3 item 5, "re-snapshot test"):
``repl_config()`` sets retention by size and age and the snapshot threshold, persisted for
every process of the primary; the primary's maintenance pass builds new snapshots from the log
and removes segments the newest snapshot covers; a replica left behind past retention catches
up through a snapshot applied as one WAL transaction while a reader holds a long transaction
(the reader's view does not change until it ends); a new replica bootstraps from the
compacted snapshot.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers import (
    CliWorker, Worker, WorkerError, assert_replica_equals_primary, lsn_checksum, serve, start_primary, start_replica,
    stock_one, stock_tables, sync_to, wait_for, worker_status, worker_tables,
)

SNAP = "SELECT count(*), sum(length(pad)), group_concat(v, ',') FROM (SELECT v, pad FROM t ORDER BY id);"
FAST = {"REPL_MAINTENANCE_MS": "50"}


def small_log(p: Worker, **extra: int) -> None:
    settings = {"segment_bytes": 65536, "snapshot_bytes": 65536, "retain_bytes": 1, "retain_secs": 0}
    settings.update(extra)
    for k, v in settings.items():
        assert p.one("SELECT repl_config(?, ?)", [k, v]) == v


def churn(p: Worker, n: int) -> None:
    for i in range(n):
        p.q("INSERT INTO t(v, pad) VALUES (?, randomblob(3000))", [f"n{i}"])
        p.q("UPDATE t SET v = v || '+' WHERE id = (SELECT min(id) FROM t)")


def log_state(p: Worker) -> dict:
    st = worker_status(p)
    return {"first": st["log"]["first_lsn"], "snap": (st["snapshot"] or {}).get("lsn"), "lsn": st["lsn"]}


def snap_files(pdb) -> list[str]:
    return sorted(n for n in os.listdir(f"{pdb}-replica/snap") if n.endswith(".snap"))


def source_of(p: Worker, pdb, transport: str) -> str:
    """The primary's path, or (http) the URL of a server started in the primary's process."""
    if transport == "dir":
        return str(pdb)
    return serve(p)


@pytest.mark.parametrize("transport", ["dir", "http"])
def test_left_behind_past_retention_catches_up_through_a_snapshot_with_a_long_reader(tmp, transport):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb, env=FAST) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        small_log(p)
        churn(p, 20)
        source = source_of(p, pdb, transport)
        with start_replica(rdb, source) as r:
            left_at = r.one("SELECT repl_lsn()")
            reader = CliWorker(rdb)  # stock sqlite3, no extension
            try:
                reader.q("BEGIN;")
                before = reader.q(SNAP)
                churn(p, 150)  # ~1 MB of log in 64 KiB segments
                want = lsn_checksum(p)
                # The maintenance pass snapshots from the log and removes covered segments.
                state = wait_for(
                    lambda: (s := log_state(p))["first"] and s["first"] > left_at + 1 and s["snap"] and s,
                    timeout=30,
                    what="retention to remove the replica's position from the primary's log",
                )
                assert state["snap"] > left_at
                # Older snapshots go once a newer one exists (the pass may be mid-way: poll).
                wait_for(lambda: len(snap_files(pdb)) == 1, timeout=10, what="one snapshot file left")
                # The replica is told, and answers with a re-snapshot as one WAL transaction
                # (more than one if a pass compacts and removes segments again meanwhile).
                resnaps = worker_status(r)["resnapshots"]
                sync_to(r, want[0])
                st = worker_status(r)
                assert st["resnapshots"] >= resnaps + 1, st
                resnaps = st["resnapshots"]
                assert lsn_checksum(r) == want
                assert reader.q(SNAP) == before, "the catch-up changed an open read transaction"
                assert stock_one(rdb, SNAP) != before[0]
                reader.q("COMMIT;")
                assert reader.q(SNAP) == [stock_one(pdb, SNAP)]
            finally:
                reader.close()
            # And it keeps following with ordinary batches afterwards: unless retention (still
            # aggressive here) removed its position again meanwhile, no re-snapshot. The log's
            # first LSN only grows, so reading it after the sync decides that soundly.
            at = r.one("SELECT repl_lsn()")
            churn(p, 3)
            want = lsn_checksum(p)
            sync_to(r, want[0])
            assert lsn_checksum(r) == want
            if log_state(p)["first"] <= at + 1:
                assert worker_status(r)["resnapshots"] == resnaps, "an ordinary catch-up took a re-snapshot"
        assert_replica_equals_primary(rdb, p)
        # A new replica bootstraps from the compacted snapshot plus the retained log.
        with start_replica(tmp / "new.db", source) as n:
            assert lsn_checksum(n) == want
        assert stock_tables(tmp / "new.db") == worker_tables(p)


def test_a_replica_within_retention_catches_up_from_the_log(tmp):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb, env=FAST) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        small_log(p, retain_bytes=64 << 20)  # snapshots, but nothing old enough or big enough to go
        with start_replica(rdb, pdb) as r:
            churn(p, 100)
            wait_for(lambda: (log_state(p)["snap"] or 0) > 1, timeout=30, what="a compacted snapshot")
            assert log_state(p)["first"] == 1, "segments went although the log is under retain_bytes"
            want = lsn_checksum(p)
            sync_to(r, want[0])
            assert worker_status(r)["resnapshots"] == 0
            assert lsn_checksum(r) == want


def test_age_limit_removes_old_segments(tmp):
    pdb = tmp / "p.db"
    with start_primary(pdb, env=FAST) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        small_log(p, retain_bytes=0, retain_secs=0)
        churn(p, 60)
        wait_for(lambda: (log_state(p)["snap"] or 0) > 1, timeout=30, what="a compacted snapshot")
        assert log_state(p)["first"] == 1, "no limit set, yet segments were removed"
        # Segments only age: set the mtime of the covered ones back instead of waiting.
        p.q("SELECT repl_config('retain_secs', 3600)")
        old = 1_000_000_000
        for name in os.listdir(f"{pdb}-replica/log"):
            os.utime(f"{pdb}-replica/log/{name}", (old, old))
        wait_for(lambda: log_state(p)["first"] > 1, timeout=30, what="the age limit to remove old segments")
        # The newest segment is never removed, and the log still reads from its new start.
        st = log_state(p)
        assert st["first"] <= st["snap"] + 1, st
        with start_replica(tmp / "r.db", pdb) as r:
            assert lsn_checksum(r) == lsn_checksum(p)


def test_repl_config_reads_sets_persists_and_refuses_bad_input(tmp):
    pdb = tmp / "p.db"
    with start_primary(pdb) as p:
        defaults = json.loads(p.one("SELECT repl_config()"))
        assert set(defaults) == {"retain_bytes", "retain_secs", "snapshot_bytes", "segment_bytes",
                                 "exec", "exec_timeout_ms", "exec_max_rows", "exec_max_bytes", "compress",
                                 "capture_lag_max", "sync_replicas", "sync_level", "sync_timeout_ms",
                                 "backup_interval_ms", "backup_retain_secs", "backup_snapshot_secs",
                                 "checkpoint_assist"}
        assert all(isinstance(v, int) and v > 0 for k, v in defaults.items()
                   if k not in ("exec", "compress", "sync_replicas", "backup_retain_secs", "backup_snapshot_secs")), defaults
        assert defaults["compress"] == 0, "records are stored uncompressed by default"
        assert defaults["exec"] == 0, "forwarded writes are off by default"
        assert p.one("SELECT repl_config('retain_secs', 60)") == 60
        assert p.one("SELECT repl_config('retain_secs')") == 60
        for sql, args, words in [
            ("SELECT repl_config('retain_days', 1)", (), ("unknown setting", "retain_secs")),
            ("SELECT repl_config('nope')", (), ("unknown setting",)),
            ("SELECT repl_config('retain_secs', -1)", (), ("non-negative",)),
            ("SELECT repl_config('retain_secs', 'soon')", (), ("integer",)),
            ("SELECT repl_config('retain_secs', 1.5)", (), ("integer",)),
            ("SELECT repl_config('segment_bytes', 100)", (), ("65536",)),
            ("SELECT repl_config(1, 2)", (), ("text",)),
            ("SELECT repl_config('a', 1, 2)", (), ("at most two",)),
        ]:
            with pytest.raises(WorkerError) as e:
                p.q(sql, args)
            for w in words:
                assert w in e.value.msg, (sql, e.value.msg)
        assert p.one("SELECT repl_config('retain_secs')") == 60, "a refused call changed a setting"
        # Another process of the same primary sees the same settings.
        with Worker(pdb) as other:
            other.q("SELECT repl_primary()")
            assert other.one("SELECT repl_config('retain_secs')") == 60
            assert json.loads(other.one("SELECT repl_status()"))["settings"]["retain_secs"] == 60
    # Persisted across restarts.
    with start_primary(pdb) as p:
        assert p.one("SELECT repl_config('retain_secs')") == 60
        with start_replica(tmp / "r.db", pdb) as r:
            with pytest.raises(WorkerError) as e:
                r.q("SELECT repl_config()")
            assert "not a primary" in e.value.msg
        # A damaged config file is named, and nothing is removed because of it.
        (tmp / "p.db-replica" / "config.json").write_text("{not json")
        with pytest.raises(WorkerError) as e:
            p.q("SELECT repl_config('retain_secs')")
        assert "config.json" in e.value.msg and "repl_config() rewrites it" in e.value.msg
        (tmp / "p.db-replica" / "config.json").write_text('{"retain_secs": "x"}')
        with pytest.raises(WorkerError) as e:
            p.q("SELECT repl_config()")
        assert "retain_secs is not a non-negative integer" in e.value.msg

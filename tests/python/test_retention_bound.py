"""Retention bounds the primary's disk use (issue 15): under a steady write load of ten times
the database's size, `<db>-replica/` stays within the bound docs/SQL.md states ("Disk use"):

    newest snapshot (≈ S) + the log (≤ max(retain_bytes, snapshot_bytes, S) + 2 segments
    + what is written during one maintenance interval) + during a compaction, its scratch
    database and the new snapshot (2 S)

where S is the database size. Sampled after every batch of writes, compactions in flight
included; the database keeps a constant size (updates), so S is fixed. The load is paced at
about 1 MiB/s (64 KiB per batch, a batch per 60 ms), so one 50 ms maintenance interval writes
at most about one batch more.
"""

from __future__ import annotations

import os
import time

from helpers import start_primary

FAST = {"REPL_MAINTENANCE_MS": "50"}
SEG = 65536


def dir_bytes(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:
                pass  # removed by the maintenance pass while we walked
    return total


def test_log_directory_stays_within_the_documented_bound(tmp):
    pdb = tmp / "p.db"
    with start_primary(pdb, env=FAST) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB)")
        p.q("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 128) "
            "INSERT INTO t(pad) SELECT randomblob(3000) FROM c")
        s = os.path.getsize(pdb) + os.path.getsize(f"{pdb}-wal")  # generous: the WAL counts too
        settings = {"segment_bytes": SEG, "snapshot_bytes": SEG, "retain_bytes": 2 * SEG, "retain_secs": 0}
        for k, v in settings.items():
            assert p.one("SELECT repl_config(?, ?)", [k, v]) == v
        batch = 16 * 4200  # 16 one-page records
        bound = s + max(settings["retain_bytes"], settings["snapshot_bytes"], s) + 2 * SEG + 2 * batch + 2 * s + 8192
        written, peak = 0, 0
        while written < 10 * s:
            t0 = time.monotonic()
            for _ in range(16):
                p.q("UPDATE t SET pad = randomblob(3000) WHERE id = abs(random() % 128) + 1")
            written += batch
            peak = max(peak, dir_bytes(f"{pdb}-replica"))
            time.sleep(max(0.0, 0.06 - (time.monotonic() - t0)))  # the load's pace, not a wait
        assert peak <= bound, f"log directory reached {peak} bytes; the bound for S={s} is {bound}"

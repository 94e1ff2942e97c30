"""Primary-side capture edge cases (WAL.md §D.7 and §G11, §G12, §G13, §G20, §G23), checked the
way a user would: every commit is exactly one LSN, and the log rebuilt by ``sqlite-replica
rebuild`` equals the primary byte for byte (``capture_check.assert_rebuild_equals``).

- G11: a transaction that spills its page cache into the WAL, with SAVEPOINT / ROLLBACK TO and
  in-place frame overwrites inside it, then a spilling transaction rolled back entirely;
- G12: padding frames (``psow=0`` + ``synchronous=FULL``, 1 KiB pages) are not transactions;
- G13 (our side): WAL restarts and TRUNCATE / RESTART / PASSIVE checkpoints between commits, from
  connections and processes that have the extension, are witnessed: no gap;
- G20: leaving WAL is refused; closing every connection of the primary process does not delete
  the WAL (the agent's SHARED lock); reopening continues the LSNs;
- restart: the role and the LSN sequence survive the primary process;
- G23 (primary side): with ``synchronous=NORMAL`` the durable watermark reaches the last LSN
  shortly after writes stop and is never above the last LSN.

Foreign (extension-less) writers are in test_capture_foreign.py, bad input in
test_capture_bad_input.py, concurrent writers in test_capture_concurrency.py.
"""

from __future__ import annotations

import json
import os
import struct
import threading

import apsw
import pytest

from capture_check import (
    assert_dense,
    assert_rebuild_equals,
    inspect,
    log_dir,
    padding_frames,
    status,
    verify_ok,
    wal_frames,
)
from helpers import apsw_conn, cli_ok, lsn_of, make_primary, one, py_ok, sqlite3_cli, wait_for


def commit(conn: apsw.Connection, sql: str, expect_lsn: int) -> int:
    """Run one transaction and check it got exactly the next LSN."""
    conn.execute(sql)
    got = lsn_of(conn)
    assert got == expect_lsn, f"after {sql[:60]!r}: repl_lsn() = {got}, expected {expect_lsn}"
    return got


def wal_salts(db) -> bytes:
    # Reading the -wal in this process is safe: SQLite takes no fcntl locks on the WAL file
    # (the db file and -shm are read by a child process only; see capture_check).
    with open(f"{db}-wal", "rb") as f:
        return f.read(32)[16:24]


def assert_no_gap(conn: apsw.Connection) -> dict:
    st = status(conn)
    assert st["gaps"] == 0, st
    assert st["generation"] == 1, st
    assert st["last_error"] is None, st
    return st


# ------------------------------------------------------------------------------------- G11


def test_spilling_transaction_with_savepoint_rollback_and_overwrites(tmp):
    db = tmp / "spill.db"
    conn, lsn = make_primary(db)
    lsn = commit(conn, "BEGIN; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB, n INT); CREATE INDEX t_n ON t(n); COMMIT", lsn + 1)
    lsn = commit(
        conn,
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 300) "
        "INSERT INTO t SELECT i, randomblob(300), i FROM c",
        lsn + 1,
    )
    conn.execute("PRAGMA cache_size=2")  # SQLite keeps at least ~10 pages: every txn below spills
    page_size = one(conn, "PRAGMA page_size")
    wal = f"{db}-wal"

    size_before = os.path.getsize(wal)
    mx_before = len(wal_frames(db))
    conn.execute("BEGIN")
    conn.execute(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 3000) "
        "INSERT INTO t(v, n) SELECT randomblob(700), i FROM c"
    )
    # The cache spilled: frames were written to the WAL but not published.
    assert os.path.getsize(wal) > size_before + 100 * page_size, "the transaction did not spill"
    assert len(wal_frames(db)) == mx_before, "spilled frames must not be published before COMMIT"
    # Rewrite pages that were already spilled by this transaction (in-place frame overwrites).
    conn.execute("UPDATE t SET v = randomblob(650), n = n + 1 WHERE id % 3 = 0")
    conn.execute("SAVEPOINT s1")
    conn.execute(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 2000) "
        "INSERT INTO t(v, n) SELECT randomblob(900), -i FROM c"
    )
    conn.execute("UPDATE t SET v = zeroblob(10) WHERE id % 5 = 0")
    conn.execute("DELETE FROM t WHERE id % 7 = 0")
    conn.execute("ROLLBACK TO s1")  # frame positions rewound and reused below
    conn.execute("UPDATE t SET v = randomblob(500) WHERE id % 11 = 0")
    conn.execute("SAVEPOINT s2")
    conn.execute("DELETE FROM t WHERE id % 13 = 0")
    conn.execute("RELEASE s2")
    conn.execute("RELEASE s1")
    assert lsn_of(conn) == lsn, "an open transaction got an LSN"
    conn.execute("COMMIT")
    lsn += 1
    assert lsn_of(conn) == lsn, "one spilling transaction must be exactly one LSN"

    # A spilling transaction rolled back entirely: stale frames beyond mxFrame, no LSN.
    conn.execute("BEGIN")
    conn.execute("UPDATE t SET v = randomblob(800)")
    conn.execute("INSERT INTO t(v, n) SELECT v, n FROM t")
    conn.execute("ROLLBACK")
    assert lsn_of(conn) == lsn
    # A normal small commit right after (its frames follow the rolled-back tail positions).
    lsn = commit(conn, "UPDATE t SET n = 42 WHERE id = 1", lsn + 1)

    assert_no_gap(conn)
    records = inspect(db)
    assert_dense(records)
    assert [r.kind for r in records] == ["txn"] * lsn
    verify_ok(db)
    assert_rebuild_equals(db, tmp / "out.db", conn)


# ------------------------------------------------------------------------------------- G12


def test_padding_frames_are_not_transactions(tmp):
    db = tmp / "p.db"
    conn = apsw_conn(f"file:{db}?psow=0")
    # Materialise the 1 KiB page size before repl_primary() (see
    # test_page_size_set_before_repl_primary_is_kept for doing it in the other order).
    conn.execute("PRAGMA page_size=1024; CREATE TABLE t(id INTEGER PRIMARY KEY, x)")
    conn.execute("PRAGMA synchronous=FULL")
    lsn = one(conn, "SELECT repl_primary()")
    assert one(conn, "PRAGMA page_size") == 1024
    assert one(conn, "PRAGMA synchronous") == 2
    assert one(conn, "PRAGMA journal_mode") == "wal"
    txns = [
        "CREATE TABLE t0(id INTEGER PRIMARY KEY, x)",
        "INSERT INTO t(x) VALUES (1)",  # one-page transactions: padding repeats their only frame
        "INSERT INTO t(x) VALUES (2)",
        "UPDATE t SET x = 3 WHERE id = 1",
        "UPDATE t SET x = 4 WHERE id = 1",
        "INSERT INTO t(x) SELECT randomblob(300) FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3)",
        "BEGIN; INSERT INTO t(x) VALUES ('a'); INSERT INTO t(x) VALUES ('b'); COMMIT",
        "BEGIN; CREATE TABLE u(y); INSERT INTO u VALUES (zeroblob(3000)); COMMIT",
        "DELETE FROM t WHERE id = 2",
        "UPDATE u SET y = 'small'",
    ]
    for sql in txns:
        lsn = commit(conn, sql, lsn + 1)
    frames = wal_frames(db)
    assert padding_frames(frames) > 0, "no padding frames were written: the test does not test padding"
    assert_no_gap(conn)
    records = inspect(db)
    assert_dense(records)
    assert len(records) == len(txns) == lsn
    assert all(r.kind == "txn" for r in records)
    verify_ok(db)
    assert_rebuild_equals(db, tmp / "out.db", conn)


def test_page_size_set_before_repl_primary_is_kept(tmp):
    """`PRAGMA page_size=1024; SELECT repl_primary();` on a new database: like
    `PRAGMA journal_mode=WAL` would, the database is created with 1 KiB pages."""
    db = tmp / "ps.db"
    conn = apsw_conn(db)
    conn.execute("PRAGMA page_size=1024")
    one(conn, "SELECT repl_primary()")
    conn.execute("CREATE TABLE t(x)")
    assert one(conn, "PRAGMA page_size") == 1024, "repl_primary() dropped the page size chosen before it"


def test_padding_frames_from_the_cli(tmp):
    """Same rule through the Debian sqlite3 shell (3.40.1, another SQLite build)."""
    db = tmp / "cli.db"
    out = cli_ok(
        None,
        f".open 'file:{db}?psow=0'\n"
        "PRAGMA page_size=1024;\nCREATE TABLE t0(x);\nPRAGMA synchronous=FULL;\nSELECT repl_primary();\n"
        "CREATE TABLE t(x);\nINSERT INTO t VALUES (1);\nINSERT INTO t VALUES (2);\n"
        "UPDATE t SET x = 5 WHERE x = 1;\nSELECT repl_lsn();\nPRAGMA page_size;\n",
    )
    first, last, page_size = out.split()
    assert int(last) == int(first) + 4
    assert page_size == "1024"
    assert padding_frames(wal_frames(db)) > 0, "no padding frames were written"
    records = inspect(db)
    assert_dense(records)
    assert len(records) == 4
    assert_rebuild_equals(db, tmp / "out.db")


# ------------------------------------------------------------------------------ G13 (ours)


def test_wal_restarts_and_checkpoints_by_primaries_are_witnessed(tmp):
    db = tmp / "r.db"
    conn, lsn = make_primary(db)
    other = apsw_conn(db)  # a second connection of this process
    lsn = commit(conn, "CREATE TABLE t(x)", lsn + 1)
    lsn = commit(conn, "INSERT INTO t VALUES (randomblob(5000))", lsn + 1)

    salts = wal_salts(db)
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0] == 0
    assert os.path.getsize(f"{db}-wal") == 0, "TRUNCATE did not truncate the WAL"
    lsn = commit(conn, "INSERT INTO t VALUES (1)", lsn + 1)
    assert wal_salts(db) != salts
    salts = wal_salts(db)

    # RESTART: the next writer (another connection) restarts the WAL at frame 1.
    assert conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()[0][0] == 0
    lsn = commit(other, "INSERT INTO t VALUES (2)", lsn + 1)
    assert wal_salts(db) != salts, "the WAL was not restarted"
    salts = wal_salts(db)

    # PASSIVE checkpoint that backfills everything: the next writer restarts the WAL itself.
    assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][0] == 0
    lsn = commit(conn, "BEGIN; INSERT INTO t VALUES (3); INSERT INTO t VALUES (4); COMMIT", lsn + 1)
    assert wal_salts(db) != salts, "the WAL was not restarted"
    salts = wal_salts(db)

    # Restart + TRUNCATE from another process that has the extension, between our commits.
    out = py_ok(
        f"""
        c = connect({str(db)!r})
        c.setbusytimeout(5000)
        c.execute("INSERT INTO t VALUES ('child')")
        ck = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
        wal = os.path.getsize({str(db)!r} + "-wal")
        c.execute("INSERT INTO t VALUES ('child2')")
        print(json.dumps({{"ck": list(ck), "wal": wal, "lsn": one(c, "SELECT repl_lsn()")}}))
        """
    )
    child = json.loads(out)
    assert child["ck"][0] == 0 and child["wal"] == 0, child
    lsn += 2
    assert child["lsn"] == lsn
    assert lsn_of(conn) == lsn
    lsn = commit(conn, "INSERT INTO t VALUES (5)", lsn + 1)

    # Autocheckpoints (1000 frames) + restarts inside a burst of commits.
    conn.execute("PRAGMA wal_autocheckpoint=20")
    for i in range(60):
        lsn = commit(conn if i % 2 else other, f"INSERT INTO t VALUES (randomblob({1000 + i}))", lsn + 1)

    assert_no_gap(conn)
    records = inspect(db)
    assert_dense(records)
    assert len(records) == lsn and all(r.kind == "txn" and r.generation == 1 for r in records)
    verify_ok(db)
    assert_rebuild_equals(db, tmp / "out.db", conn)


# ------------------------------------------------------------------------------------- G20


def test_leaving_wal_is_refused_and_the_wal_survives_closing_every_connection(tmp):
    db = tmp / "j.db"
    conn, lsn = make_primary(db)
    second = apsw_conn(db)
    lsn = commit(conn, "CREATE TABLE t(x)", lsn + 1)
    lsn = commit(second, "INSERT INTO t VALUES (1)", lsn + 1)
    for mode in ("DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF"):
        with pytest.raises(apsw.Error) as err:
            conn.execute(f"PRAGMA journal_mode={mode}").fetchall()
        msg = str(err.value)
        assert "journal_mode" in msg.lower() and "wal" in msg.lower(), f"unclear message: {msg}"
    assert one(conn, "PRAGMA journal_mode") == "wal"
    assert one(second, "PRAGMA journal_mode=WAL") == "wal"  # staying in WAL is fine
    lsn = commit(conn, "INSERT INTO t VALUES (2)", lsn + 1)

    # Another process (stock shell, no extension) cannot switch it either: the agent's SHARED lock.
    proc = cli_ok(db, "PRAGMA journal_mode;", load=False)
    assert proc.strip() == "wal"
    proc = sqlite3_cli(db, "PRAGMA journal_mode=DELETE;", load=False)
    assert proc.returncode != 0 and "database is locked" in proc.stderr, proc

    # Close every user connection of this (still living) process: the WAL stays.
    wal_bytes = os.path.getsize(f"{db}-wal")
    conn.close()
    second.close()
    assert os.path.exists(f"{db}-wal"), "closing the last connection deleted the WAL of a live primary"
    assert os.path.getsize(f"{db}-wal") == wal_bytes
    assert os.path.exists(f"{db}-shm")

    again = apsw_conn(db)
    assert one(again, "SELECT repl_role()") == "primary"
    assert lsn_of(again) == lsn
    lsn = commit(again, "INSERT INTO t VALUES (3)", lsn + 1)
    lsn = commit(again, "INSERT INTO t VALUES (4)", lsn + 1)
    assert_no_gap(again)
    records = inspect(db)
    assert_dense(records)
    assert len(records) == lsn and all(r.generation == 1 for r in records)
    assert_rebuild_equals(db, tmp / "out.db", again)


# ------------------------------------------------------------------------------------ restart


def test_primary_restart_remembers_role_and_continues_lsns(tmp):
    db = tmp / "restart.db"
    n, m, k = 20, 15, 5
    out = py_ok(
        f"""
        c = connect({str(db)!r})
        base = one(c, "SELECT repl_primary()")
        c.execute("CREATE TABLE t(i INTEGER PRIMARY KEY, p TEXT, v BLOB)")
        for i in range({n}):
            c.execute("INSERT INTO t(p, v) VALUES ('first', randomblob(200 + ?))", (i,))
        print(json.dumps({{"base": base, "lsn": one(c, "SELECT repl_lsn()")}}))
        c.close()
        """
    )
    first = json.loads(out)
    assert first["base"] == 0
    assert first["lsn"] == n + 1
    out = py_ok(
        f"""
        c = connect({str(db)!r})
        before = [one(c, "SELECT repl_role()"), one(c, "SELECT repl_lsn()")]
        for i in range({m}):
            c.execute("INSERT INTO t(p, v) VALUES ('second', randomblob(300 + ?))", (i,))
        c.execute("UPDATE t SET v = NULL WHERE i % 4 = 0")
        st = json.loads(one(c, "SELECT repl_status()"))
        print(json.dumps({{"before": before, "lsn": one(c, "SELECT repl_lsn()"), "status": st}}))
        """
    )
    second = json.loads(out)
    assert second["before"] == ["primary", n + 1], "role or LSN not remembered by a new process"
    lsn = n + 1 + m + 1
    assert second["lsn"] == lsn
    assert second["status"]["gaps"] == 0 and second["status"]["generation"] == 1, second["status"]
    # A third host: the stock shell with the extension loaded.
    cli_out = cli_ok(db, "SELECT repl_role();\n" + "INSERT INTO t(p) VALUES ('cli');\n" * k + "SELECT repl_lsn();")
    role, cli_lsn = cli_out.split()
    assert role == "primary" and int(cli_lsn) == lsn + k
    lsn += k

    records = inspect(db)
    assert_dense(records)
    assert len(records) == lsn
    assert all(r.kind == "txn" and r.generation == 1 for r in records)
    verify_ok(db)
    conn = apsw_conn(db)
    assert lsn_of(conn) == lsn
    assert_no_gap(conn)
    assert_rebuild_equals(db, tmp / "out.db", conn)


# ------------------------------------------------------------------------- G23 (primary side)


def read_durable_file(db) -> tuple[int, int] | None:
    """``<dir>/durable``: 20 bytes, BE u64 LSN, BE u32 generation, u64 checksum (FORMAT.md §7)."""
    try:
        with open(log_dir(db) / "durable", "rb") as f:
            b = f.read()
    except FileNotFoundError:
        return None
    if not b:
        return None
    assert len(b) == 20, f"durable file has {len(b)} bytes"
    lsn, gen = struct.unpack(">QI", b[:12])
    return lsn, gen


def test_durable_watermark_catches_up_and_never_passes_the_log(tmp):
    """synchronous=NORMAL: commits do not fsync the WAL; the capture agent's group fsync raises
    the watermark shortly after. (Power loss itself cannot be simulated here: this checks only
    that the watermark converges and is never ahead of the log.)"""
    db = tmp / "d.db"
    conn, lsn = make_primary(db)
    conn.execute("PRAGMA synchronous=NORMAL")
    assert one(conn, "PRAGMA synchronous") == 1
    lsn = commit(conn, "CREATE TABLE t(x)", lsn + 1)

    stop = threading.Event()
    violations: list[str] = []
    samples = [0]

    def sampler() -> None:
        watcher = apsw_conn(db)
        while not stop.is_set():
            d = read_durable_file(db)  # read the watermark first, then the LSN (which only grows)
            st = status(watcher)
            last = st["log"]["last_lsn"]
            if d is not None and last is not None and d[0] > max(last, st["lsn"]):
                violations.append(f"durable file {d} > last LSN {last}")
            if st["log"]["durable_lsn"] is not None and st["log"]["durable_lsn"] > last:
                violations.append(f"status durable_lsn {st['log']['durable_lsn']} > last_lsn {last}")
            samples[0] += 1
        watcher.close()

    t = threading.Thread(target=sampler)
    t.start()
    try:
        # The sampler is running before the commits start (they are fast: capture appends in
        # the background), and samples while they run.
        wait_for(lambda: samples[0] > 0, timeout=10, what="the sampler's first sample")
        for i in range(300):
            conn.execute("INSERT INTO t VALUES (?)", (i,))
        lsn += 300
        conn.execute("BEGIN; UPDATE t SET x = x + 1; DELETE FROM t WHERE x % 2 = 0; COMMIT")
        lsn += 1
    finally:
        stop.set()
        t.join(timeout=30)
    assert lsn_of(conn) == lsn
    assert not violations, violations[:5]
    assert samples[0] > 0
    # Writes stopped: the watermark reaches the last LSN without any further commit.
    wait_for(lambda: status(conn)["log"]["durable_lsn"] == lsn, timeout=10, what="log.durable_lsn == last LSN")
    wait_for(lambda: read_durable_file(db) == (lsn, 1), timeout=10, what="<dir>/durable == (last LSN, generation 1)")
    st = status(conn)
    assert st["log"]["last_lsn"] == lsn and st["log"]["durable_lsn"] == lsn
    verify_out = verify_ok(db)
    assert f"durable watermark LSN {lsn}" in verify_out


def test_backlog_appended_in_batches(tmp_path):
    """A pass that finds the log far behind (here: the append worker held in a test delay while
    about 2.4 MiB of transactions commit, three of them larger than one append batch) appends
    it in batches of at most 256 KiB of pages plus one transaction: every transaction is one
    record under its own LSN, each big one whole, and the log rebuilds to the primary."""
    db = str(tmp_path / "p.db")
    out = py_ok(
        f"""
        db = {db!r}
        c = connect(db)
        c.execute("PRAGMA journal_mode=WAL")
        first = one(c, "SELECT repl_primary()")
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")

        from helpers import thread_in_test_delay

        c.execute("INSERT INTO t(v) VALUES (x'00')")
        deadline = time.monotonic() + 10
        while not thread_in_test_delay("repl-append"):
            assert time.monotonic() < deadline, "the append worker never reached its test delay"
            time.sleep(0.005)
        txns = 0
        for i in range(300):
            if i % 100 == 50:
                c.execute("INSERT INTO t(v) VALUES (randomblob(400000))")  # ~100 pages
            else:
                c.execute("INSERT INTO t(v) VALUES (randomblob(100))")
            txns += 1
        held = thread_in_test_delay("repl-append")
        wal_bytes = os.path.getsize(db + "-wal")
        lsn = one(c, "SELECT repl_lsn()")  # appends the backlog now, in this thread
        c.close()
        print(json.dumps({{"first": first, "txns": txns, "held": held, "wal_bytes": wal_bytes, "lsn": lsn}}))
        """,
        env={"REPL_FAULT_DELAY_AT": "append-worker-holds:4000"},
        timeout=120,
    )
    r = json.loads(out.strip().splitlines()[-1])
    assert r["held"], r  # the 300 commits all happened while the worker was held
    assert r["wal_bytes"] > 2 << 20, r  # a backlog of about ten batches
    expected = r["first"] + 2 + r["txns"]  # CREATE TABLE, the first INSERT, the 300
    assert r["lsn"] == expected, r
    records = inspect(db)
    assert_dense(records)
    assert records[-1].lsn == expected
    big = [rec for rec in records if rec.pages >= 90]
    assert len(big) == 3, [(rec.lsn, rec.pages) for rec in records if rec.pages > 2]
    assert assert_rebuild_equals(db, tmp_path / "out.db")["lsn"] == expected

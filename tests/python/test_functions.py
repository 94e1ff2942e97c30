"""The issue-2 SQL functions against their contract (docs/SQL.md), from apsw and the sqlite3 CLI.

repl_version / repl_debug: build information. repl_primary: makes the main db a primary
(idempotent, WAL enforced), refused on :memory:/temp/read-only dbs and on a db opened before the
extension was loaded. repl_lsn / repl_role / repl_checksum / repl_status: NULL (or role null)
without a role; on a primary every committed transaction, from any connection or process with
the extension loaded, gets exactly one LSN.
"""

from __future__ import annotations

import json
import re

import apsw
import pytest

from helpers import REPO, apsw_conn, cli_ok, make_primary, one, py_ok, sqlite3_cli, wait_for

HEX16 = re.compile(r"^[0-9a-f]{16}$")


def crate_version() -> str:
    import tomllib

    with open(REPO / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


def status(conn: apsw.Connection) -> dict:
    text = one(conn, "SELECT repl_status()")
    assert isinstance(text, str)
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


# ------------------------------------------------------------------------ repl_version, repl_debug


def test_repl_version_is_the_crate_version(tmp):
    conn = apsw_conn(tmp / "v.db")
    v = one(conn, "SELECT repl_version()")
    assert v == crate_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.]+)?", v)


def test_repl_debug_in_apsw_names_version_and_host_sqlite(tmp):
    conn = apsw_conn(tmp / "d.db")
    text = one(conn, "SELECT repl_debug()")
    assert isinstance(text, str) and "\n" in text
    assert crate_version() in text
    assert apsw.sqlite_lib_version() in text  # apsw's own bundled SQLite, not the system one


def test_repl_debug_in_cli_names_the_cli_sqlite():
    host = cli_ok(None, "SELECT sqlite_version();", load=False).strip()
    text = cli_ok(None, "SELECT repl_debug();")
    assert crate_version() in text
    assert host in text


# ------------------------------------------------------------------------------ no role yet


def test_no_role_functions_return_null(tmp):
    conn = apsw_conn(tmp / "plain.db")
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    assert one(conn, "SELECT repl_role()") is None
    assert one(conn, "SELECT repl_lsn()") is None
    assert one(conn, "SELECT repl_checksum()") is None
    st = status(conn)
    assert st["role"] is None
    assert st.get("lsn") is None
    # Nothing was turned on behind our back.
    assert one(conn, "PRAGMA journal_mode") == "delete"


def test_no_role_on_memory_db(loaded):
    conn = apsw.Connection(":memory:")
    assert one(conn, "SELECT repl_role()") is None
    assert one(conn, "SELECT repl_lsn()") is None
    assert one(conn, "SELECT repl_checksum()") is None
    assert status(conn)["role"] is None


# ------------------------------------------------------------------------------ repl_primary


def test_repl_primary_makes_a_wal_primary(tmp):
    """Including for the calling connection, at once: `SELECT repl_primary(); PRAGMA
    journal_mode;` says wal (the docs/SQL.md example)."""
    conn, lsn = make_primary(tmp / "p.db")
    assert one(conn, "SELECT repl_role()") == "primary"
    assert one(conn, "SELECT repl_lsn()") == lsn
    assert one(conn, "PRAGMA journal_mode") == "wal"


def test_repl_primary_is_idempotent(tmp):
    conn, lsn = make_primary(tmp / "p.db")
    assert one(conn, "SELECT repl_primary()") == lsn
    assert one(conn, "SELECT repl_primary()") == lsn
    assert one(conn, "SELECT repl_lsn()") == lsn


def test_repl_primary_on_existing_database_keeps_its_data(tmp):
    db = tmp / "old.db"
    # Made by a process that never loaded the extension: rollback journal, some data.
    cli_ok(db, "CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);", load=False)
    conn, lsn = make_primary(db)
    assert one(conn, "SELECT sum(x) FROM t") == 6
    assert one(conn, "PRAGMA journal_mode") == "wal"
    assert HEX16.match(one(conn, "SELECT repl_checksum()"))
    conn.execute("INSERT INTO t VALUES (4)")
    assert one(conn, "SELECT repl_lsn()") == lsn + 1


def test_each_commit_gets_exactly_one_lsn(tmp):
    conn, lsn = make_primary(tmp / "p.db")
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("INSERT INTO t VALUES (2)")
    assert one(conn, "SELECT repl_lsn()") == lsn + 3
    # One explicit transaction with several statements: one LSN.
    conn.execute("BEGIN; INSERT INTO t VALUES (3); INSERT INTO t VALUES (4); UPDATE t SET x = x + 1; COMMIT")
    assert one(conn, "SELECT repl_lsn()") == lsn + 4
    # Reads and rolled-back transactions: none.
    assert one(conn, "SELECT count(*) FROM t") == 4
    conn.execute("BEGIN; INSERT INTO t VALUES (99); ROLLBACK")
    assert one(conn, "SELECT repl_lsn()") == lsn + 4
    # A large transaction (spills the page cache) is still one LSN.
    conn.execute("BEGIN")
    conn.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 5000) "
                 "INSERT INTO t SELECT randomblob(1000) FROM c")
    conn.execute("COMMIT")
    assert one(conn, "SELECT repl_lsn()") == lsn + 5


def test_commits_from_another_connection_get_lsns(tmp):
    db = tmp / "p.db"
    a, lsn = make_primary(db)
    b = apsw_conn(db)
    assert one(b, "SELECT repl_role()") == "primary"
    b.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    assert one(a, "SELECT repl_lsn()") == lsn + 2
    assert one(b, "SELECT repl_lsn()") == lsn + 2
    assert one(a, "SELECT repl_checksum()") == one(b, "SELECT repl_checksum()")


def test_commits_from_another_process_get_lsns(tmp):
    db = tmp / "p.db"
    conn, lsn = make_primary(db)
    conn.execute("CREATE TABLE t(x)")
    out = py_ok(
        f"""
        conn = connect({str(db)!r})
        conn.setbusytimeout(5000)
        for i in range(5):
            conn.execute("INSERT INTO t VALUES (?)", (i,))
        print(json.dumps({{"role": one(conn, "SELECT repl_role()"),
                           "lsn": one(conn, "SELECT repl_lsn()"),
                           "checksum": one(conn, "SELECT repl_checksum()")}}))
        """
    )
    child = json.loads(out)
    assert child["role"] == "primary"
    assert child["lsn"] == lsn + 6
    assert one(conn, "SELECT repl_lsn()") == lsn + 6
    assert one(conn, "SELECT repl_checksum()") == child["checksum"]


def test_role_is_remembered_across_processes(tmp):
    db = tmp / "p.db"
    conn, _ = make_primary(db)
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    lsn = one(conn, "SELECT repl_lsn()")
    conn.close()
    out = py_ok(
        f"""
        conn = connect({str(db)!r})
        print(json.dumps([one(conn, "SELECT repl_role()"), one(conn, "SELECT repl_lsn()")]))
        conn.execute("INSERT INTO t VALUES (2)")
        print(json.dumps([one(conn, "SELECT repl_role()"), one(conn, "SELECT repl_lsn()")]))
        """
    )
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == ["primary", lsn]
    assert second == ["primary", lsn + 1]


def test_repl_primary_refuses_memory_and_temp_databases(loaded):
    for name in (":memory:", ""):
        conn = apsw.Connection(name)
        with pytest.raises(apsw.Error, match=r"(?i)memory|temp"):
            one(conn, "SELECT repl_primary()")
        assert one(conn, "SELECT repl_role()") is None


def test_repl_primary_refuses_read_only_database(tmp):
    db = tmp / "ro.db"
    setup = apsw_conn(db)
    setup.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    setup.close()
    # We run as root, so file permissions do not stop us: open read-only instead.
    ro = apsw_conn(db, flags=apsw.SQLITE_OPEN_READONLY)
    with pytest.raises(apsw.Error, match=r"(?i)read-?only"):
        one(ro, "SELECT repl_primary()")
    ro.close()
    rw = apsw_conn(db)
    assert one(rw, "SELECT repl_role()") is None
    assert one(rw, "PRAGMA journal_mode") == "delete"


def test_repl_primary_refuses_db_opened_before_load(tmp):
    """A database opened before the extension was loaded is not under the VFS: refuse, and say
    to reopen it; reopening works. Needs a process where the extension is not loaded yet."""
    db = tmp / "early.db"
    out = py_ok(
        f"""
        early = apsw.Connection({str(db)!r})
        early.enable_load_extension(True)
        early.load_extension(EXT)
        try:
            one(early, "SELECT repl_primary()")
            print(json.dumps({{"error": None}}))
        except apsw.Error as e:
            print(json.dumps({{"error": str(e), "role": one(early, "SELECT repl_role()")}}))
        again = apsw.Connection({str(db)!r})
        print(json.dumps({{"lsn": one(again, "SELECT repl_primary()"),
                           "role": one(again, "SELECT repl_role()")}}))
        """
    )
    refused, reopened = (json.loads(line) for line in out.splitlines())
    assert refused["error"] is not None, "repl_primary() accepted a db opened before the load"
    assert "with a new connection" in refused["error"] and "vfs=replica" not in refused["error"]
    assert refused["role"] is None
    assert reopened["role"] == "primary" and isinstance(reopened["lsn"], int)


def test_cli_repl_primary_refuses_db_opened_before_load(tmp):
    proc = sqlite3_cli(tmp / "early.db", "SELECT repl_primary();", open_before_load=True)
    assert proc.returncode != 0
    assert "with a new connection" in proc.stderr and "vfs=replica" not in proc.stderr, proc.stderr


def test_primary_refuses_leaving_wal(tmp):
    conn, lsn = make_primary(tmp / "p.db")
    assert one(conn, "SELECT count(*) FROM sqlite_schema") == 0
    with pytest.raises(apsw.Error, match="(?i)wal"):
        conn.execute("PRAGMA journal_mode=DELETE").fetchall()
    assert one(conn, "PRAGMA journal_mode") == "wal"
    assert one(conn, "SELECT repl_role()") == "primary"
    conn.execute("CREATE TABLE t(x)")
    assert one(conn, "SELECT repl_lsn()") == lsn + 1


def test_cli_primary_script(tmp):
    """sql/primary_basic.sql through the stock sqlite3 shell."""
    out = cli_ok(tmp / "cli.db", ".read sql/primary_basic.sql")
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert values["role_before"] == "NULL"
    assert values["role"] == "primary"
    assert values["journal_mode"] == "wal"
    assert int(values["lsn_after"]) == int(values["lsn_start"]) + 2
    assert HEX16.match(values["checksum"])
    # Same LSN and checksum seen from apsw (another SQLite build) in this process.
    conn = apsw_conn(tmp / "cli.db")
    assert one(conn, "SELECT repl_role()") == "primary"
    assert one(conn, "SELECT repl_lsn()") == int(values["lsn_after"])
    assert one(conn, "SELECT repl_checksum()") == values["checksum"]


# ---------------------------------------------------------------------------- repl_checksum


def test_repl_checksum_tracks_content(tmp):
    conn, _ = make_primary(tmp / "p.db")
    c0 = one(conn, "SELECT repl_checksum()")
    assert HEX16.match(c0), c0
    assert one(conn, "SELECT repl_checksum()") == c0  # stable without writes
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    c1 = one(conn, "SELECT repl_checksum()")
    assert HEX16.match(c1) and c1 != c0
    conn.execute("BEGIN; INSERT INTO t VALUES (2); ROLLBACK")
    assert one(conn, "SELECT repl_checksum()") == c1
    conn.execute("UPDATE t SET x = 5")
    assert one(conn, "SELECT repl_checksum()") != c1


def test_repl_checksum_after_checkpoint_is_unchanged(tmp):
    conn, _ = make_primary(tmp / "p.db")
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2)")
    before = (one(conn, "SELECT repl_lsn()"), one(conn, "SELECT repl_checksum()"))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    after = (one(conn, "SELECT repl_lsn()"), one(conn, "SELECT repl_checksum()"))
    assert after == before


# ------------------------------------------------------------------------------ repl_status


def test_repl_status_on_a_primary(tmp):
    conn, _ = make_primary(tmp / "p.db")
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    lsn = one(conn, "SELECT repl_lsn()")
    st = status(conn)
    assert st["role"] == "primary"
    assert st["lsn"] == lsn
    assert isinstance(st["generation"], int) and st["generation"] >= 1
    assert st["lineage"]
    assert st["last_error"] is None
    log = st["log"]
    for key in ("first_lsn", "last_lsn", "durable_lsn", "bytes", "segments"):
        assert key in log, f"repl_status().log lacks {key}: {log}"
    assert log["last_lsn"] == lsn
    assert log["first_lsn"] <= log["last_lsn"]
    assert log["bytes"] > 0 and log["segments"] >= 1
    # Durability is a group fsync in the background: poll, do not sleep.
    wait_for(lambda: status(conn)["log"]["durable_lsn"] == lsn, timeout=10, what="durable_lsn to reach lsn")


def test_repl_status_lineage_is_stable(tmp):
    conn, _ = make_primary(tmp / "p.db")
    lineage = status(conn)["lineage"]
    conn.execute("CREATE TABLE t(x)")
    assert status(conn)["lineage"] == lineage
    out = py_ok(f"print(one(connect({str(tmp / 'p.db')!r}), 'SELECT repl_status()'))")
    assert json.loads(out)["lineage"] == lineage

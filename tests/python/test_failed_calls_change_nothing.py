"""Every failed `repl_primary()`, `repl_*` URI parameter or `repl_sync()` leaves the files
exactly as they were (issue 11 item 6): file bytes, journal mode and directory listing are
compared before and after each failure we can provoke.

A bad `repl_listen` used to fail with "invalid port value" AFTER the database had been switched
to WAL mode and given a log directory and a new lineage: now the address, the port and the
token are checked (and the socket bound) before anything on disk is touched.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess

import apsw
import pytest

from helpers import SQLITE3_CLI, apsw_conn, one, require_extension, start_serving_primary


def state(tmp):
    """Everything a failed call must not change: listing, bytes of every file, journal mode."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        p = tmp / name
        files[name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    mode = subprocess.run(
        [SQLITE3_CLI, "-readonly", str(tmp / "d.db"), "PRAGMA journal_mode"],
        capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    return files, mode


@pytest.fixture
def existing(tmp):
    """A database with data in rollback-journal mode, written without the extension."""
    subprocess.run(
        [SQLITE3_CLI, str(tmp / "d.db"), "CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);"],
        check=True, timeout=30,
    )
    return tmp


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


PRIMARY_FAILURES = {
    "port out of range": ("SELECT repl_primary('127.0.0.1:99999')", "invalid port value"),
    "not host:port": ("SELECT repl_primary('nonsense')", "cannot listen on"),
    "non-loopback without token": ("SELECT repl_primary('0.0.0.0:0')", "without a token"),
    "port in use": ("SELECT repl_primary('127.0.0.1:{busy}')", "Address already in use"),
    "too many arguments": ("SELECT repl_primary('127.0.0.1:0', 't', 'x', 'y')", "at most three arguments"),
    "token as a blob": ("SELECT repl_primary('127.0.0.1:0', x'00')", "must be text"),
}


@pytest.mark.parametrize("case", PRIMARY_FAILURES)
def test_failed_repl_primary_changes_nothing(existing, loaded, case):
    sql, expect = PRIMARY_FAILURES[case]
    sock = busy_port()
    try:
        before = state(existing)
        c = apsw_conn(existing / "d.db")
        with pytest.raises(apsw.Error) as e:
            one(c, sql.replace("{busy}", str(sock.getsockname()[1])))
        assert expect in str(e.value), str(e.value)
        assert one(c, "SELECT repl_role()") is None
        c.close()
        assert state(existing) == before
        assert state(existing)[1] == "delete"
    finally:
        sock.close()


URI_FAILURES = {
    "bad repl_listen": ("repl_listen=127.0.0.1:99999", "invalid port value"),
    "repl_listen port in use": ("repl_listen=127.0.0.1:{busy}", "Address already in use"),
    "repl_token without repl_listen": ("repl_token=secret", "needs repl_listen"),
    "bad repl_follow": ("repl_follow=maybe", "must be 1 or 0"),
    "good repl_listen, bad repl_follow": ("repl_listen=127.0.0.1:0&repl_follow=maybe", "must be 1 or 0"),
    "non-loopback repl_listen without token": ("repl_listen=0.0.0.0:0", "without a token"),
    "good repl_listen, bad repl_backup": ("repl_listen=127.0.0.1:0&repl_backup=http://b/x", "not an s3:// URL"),
    "repl_backup on a non-primary": ("repl_backup=s3://bkt/x", "not a primary"),
}


@pytest.mark.parametrize("case", URI_FAILURES)
def test_failed_uri_parameters_change_nothing(existing, case):
    """Through the stock shell, the way an application opens a URI."""
    param, expect = URI_FAILURES[case]
    sock = busy_port()
    try:
        before = state(existing)
        uri = f"file:{existing / 'd.db'}?{param.replace('{busy}', str(sock.getsockname()[1]))}"
        proc = subprocess.run(
            [SQLITE3_CLI, "-bail", ":memory:"],
            input=f".load {require_extension()}\n.open {uri}\nSELECT repl_role();\n",
            capture_output=True, text=True, timeout=60,
        )
        # The shell reports a failed .open and goes on with its in-memory database.
        assert "unable to open" in proc.stderr and expect in proc.stderr, proc
        assert state(existing) == before
    finally:
        sock.close()


def test_failed_repl_sync_changes_nothing(tmp, loaded):
    """Unreachable, https, missing and wrong-token sources: the new replica file stays as it was
    (empty) and no replica directory appears."""
    (tmp / "src").mkdir()
    p, url = start_serving_primary(tmp / "src" / "p.db", token="right-tok-abc")
    try:
        work = tmp / "w"
        work.mkdir()
        (work / "d.db").write_bytes(b"")
        cases = {
            "unreachable": ("http://127.0.0.1:1", "127.0.0.1:1"),
            "https": ("https://127.0.0.1:1", "https"),
            "missing path": (str(tmp / "nowhere.db"), "nowhere.db"),
            "wrong token": (url + "?token=wrong-tok-xyz", "token"),
            "no token": (url, "token"),
            "a blob": (b"\x00", "must be text"),
        }
        for what, (source, expect) in cases.items():
            before = sorted(os.listdir(work)), (work / "d.db").read_bytes()
            c = apsw_conn(work / "d.db")
            with pytest.raises(apsw.Error) as e:
                one(c, "SELECT repl_sync(?)", (source,))
            assert expect in str(e.value), (what, str(e.value))
            assert "wrong-tok" not in str(e.value) and "right-tok" not in str(e.value), "the token leaked"
            assert one(c, "SELECT repl_role()") is None, what
            c.close()
            assert (sorted(os.listdir(work)), (work / "d.db").read_bytes()) == before, what
    finally:
        p.close()


def test_repl_sync_refuses_a_database_with_data_and_changes_nothing(existing, loaded):
    before = state(existing)
    c = apsw_conn(existing / "d.db")
    with pytest.raises(apsw.Error, match="already holds a database"):
        one(c, "SELECT repl_sync(?)", (str(existing / "nowhere.db"),))
    c.close()
    assert state(existing) == before

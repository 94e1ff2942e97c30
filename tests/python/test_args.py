"""SQL function arguments follow SQLite's conventions (issue 11 item 3).

Bindings do not all bind integers as INTEGER: better-sqlite3 binds every JavaScript Number as
REAL, Tcl binds `set x 2000` as TEXT. Wherever a function expects an integer, an integral REAL
(3.0) and an integer-looking TEXT ('3') are accepted, like SQLite's own functions do; anything
else is refused with a message naming the function, the argument and the value in SQL terms,
and changes nothing. One table drives every integer (and text) argument of every function.
"""

from __future__ import annotations

import re

import apsw
import pytest

from helpers import apsw_conn, load_in_process, one, require_extension

# (function call with one placeholder argument, the integer value it is given, where it runs)
# The placeholder is the argument under test; the others are fixed integers.
INTEGER_ARGS = [
    ("SELECT repl_wait(?, 1000)", "LSN", 1, "replica"),
    ("SELECT repl_wait(1, ?)", "timeout_ms", 1000, "replica"),
    ("SELECT repl_wait(?, 1000)", "LSN", 1, "primary"),
    ("SELECT repl_wait(1, ?)", "timeout_ms", 1000, "primary"),
    ("SELECT repl_follow(NULL), repl_follow({src}, ?)", "interval_ms", 50, "replica"),
    ("SELECT repl_config('retain_secs', ?)", "value of retain_secs", 3600, "primary"),
    ("SELECT repl_config('retain_bytes', ?)", "value of retain_bytes", 1 << 30, "primary"),
    ("SELECT repl_config('snapshot_bytes', ?)", "value of snapshot_bytes", 1 << 26, "primary"),
    ("SELECT repl_config('segment_bytes', ?)", "value of segment_bytes", 1 << 26, "primary"),
]

# Text arguments: refused as REAL and BLOB; an integer is refused too, except for a token or a
# request id (taken as its decimal text: bindings pass numeric ids as numbers).
TEXT_ARGS = [
    ("SELECT repl_primary(?)", "repl_primary", "address (host:port)", "plain"),
    ("SELECT repl_primary('127.0.0.1:0', ?)", "repl_primary", "token", "plain"),
    ("SELECT repl_sync(?)", "repl_sync", "source (a path or URL)", "plain"),
    ("SELECT repl_exec(?)", "repl_exec", "SQL", "primary"),
    ("SELECT repl_exec_json(?)", "repl_exec_json", "SQL", "primary"),
    ("SELECT repl_exec('SELECT 1', ?)", "repl_exec", "params (a JSON array as text)", "primary"),
    ("SELECT repl_exec('SELECT 1', '[]', ?)", "repl_exec", "request id", "primary"),
    ("SELECT repl_config(?)", "repl_config", "setting name", "primary"),
    ("SELECT repl_config('log', ?)", "repl_config", "log level", "primary"),
]

BAD_NUMBERS = [
    (3.5, "a real number 3.5"),
    ("abc", "the text 'abc'"),
    (b"\x01\x02", "a blob of 2 bytes"),
    ("3.0", "the text '3.0'"),
]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    # One primary and one replica for the whole table: every role holds threads and files
    # for the life of this (pytest) process.
    require_extension()
    load_in_process()
    tmp = tmp_path_factory.mktemp("args")
    p = apsw_conn(tmp / "p.db")
    one(p, "SELECT repl_primary()")
    p.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    r = apsw_conn(tmp / "r.db")
    one(r, "SELECT repl_sync(?)", (str(tmp / "p.db"),))
    plain = apsw_conn(tmp / "plain.db")
    yield {"primary": p, "replica": r, "plain": plain, "src": str(tmp / "p.db"), "tmp": tmp}
    one(r, "SELECT repl_follow(NULL)")
    for c in (r, p, plain):
        c.close()


def settings(conn):
    return one(conn, "SELECT repl_config()")


@pytest.mark.parametrize("sql,name,value,where", INTEGER_ARGS, ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("form", ["integer", "real", "text"])
def test_integer_arguments_accept_integral_real_and_integer_text(dbs, sql, name, value, where, form):
    given = {"integer": value, "real": float(value), "text": str(value)}[form]
    conn = dbs[where]
    sql = sql.replace("{src}", "'" + dbs["src"] + "'")
    row = conn.execute(sql, (given,)).fetchall()[0]
    if "repl_config" in sql:
        assert row[-1] == value  # the setting now holds the integer
    else:
        assert isinstance(row[-1], int)


@pytest.mark.parametrize("sql,name,value,where", INTEGER_ARGS, ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("bad,said", BAD_NUMBERS, ids=["real", "text", "blob", "real-text"])
def test_integer_arguments_refuse_anything_else_by_name(dbs, sql, name, value, where, bad, said):
    conn = dbs[where]
    func = re.search(r"(repl_\w+)\((?!NULL)", sql).group(1)
    before = settings(dbs["primary"])
    sql = sql.replace("{src}", "'" + dbs["src"] + "'")
    with pytest.raises(apsw.SQLError) as e:
        conn.execute(sql, (bad,)).fetchall()
    msg = str(e.value)
    assert f"{func}(): the {name} (argument " in msg, msg
    assert f"got {said}" in msg, msg
    # No Rust debug output leaks into messages.
    assert "Real(" not in msg and "Text(" not in msg and "Blob(" not in msg, msg
    assert settings(dbs["primary"]) == before  # nothing changed


@pytest.mark.parametrize("sql,func,name,where", TEXT_ARGS, ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("bad,said", [(3.5, "a real number 3.5"), (b"\x01", "a blob of 1 byte")], ids=["real", "blob"])
def test_text_arguments_refuse_reals_and_blobs_by_name(dbs, sql, func, name, where, bad, said):
    conn, tmp = dbs[where], dbs["tmp"]
    files = sorted(p.name for p in tmp.iterdir())
    with pytest.raises(apsw.SQLError) as e:
        conn.execute(sql, (bad,)).fetchall()
    msg = str(e.value)
    assert f"{func}(): the {name} (argument " in msg and f"must be text, got {said}" in msg, msg
    assert sorted(p.name for p in tmp.iterdir()) == files
    assert one(dbs["plain"], "SELECT repl_role()") is None


LENIENT = {"token", "request id"}


@pytest.mark.parametrize("sql,func,name,where", [a for a in TEXT_ARGS if a[2] not in LENIENT], ids=lambda x: str(x)[:40])
def test_text_arguments_refuse_integers_except_ids(dbs, sql, func, name, where):
    with pytest.raises(apsw.SQLError) as e:
        dbs[where].execute(sql, (5,)).fetchall()
    assert f"{func}(): the {name} (argument " in str(e.value) and "must be text, got the integer 5" in str(e.value)


def test_lsn_token_text_still_works(dbs):
    r = dbs["replica"]
    lineage = __import__("json").loads(one(r, "SELECT repl_status()"))["lineage"]
    lsn = one(r, "SELECT repl_lsn()")
    assert one(r, "SELECT repl_wait(?, 100)", (f"{lineage}:{lsn}",)) == lsn
    assert one(r, "SELECT repl_wait(?, 100.0)", (f" {lsn} ",)) == lsn
    with pytest.raises(apsw.SQLError, match="belongs to lineage"):
        one(r, "SELECT repl_wait('0123:1', 100)")


def test_out_of_range_integers_name_the_range(dbs):
    with pytest.raises(apsw.SQLError, match=r"repl_wait\(\): the timeout_ms \(argument 2\) must be an integer between 0 and 3600000, got -1"):
        one(dbs["replica"], "SELECT repl_wait(1, -1.0)")
    with pytest.raises(apsw.SQLError, match=r"interval_ms \(argument 2\) must be an integer between 1 and 60000, got 0"):
        one(dbs["replica"], "SELECT repl_follow(?, '0')", (dbs["src"],))

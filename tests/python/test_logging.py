"""The event log is the host's business (issue 11 item 7): `REPL_LOG` (off, error, warn,
info, debug; default warn) and `REPL_LOG_FILE`, also as `repl_config('log' | 'log_file')`.

* `REPL_LOG=off`: a whole primary + follower session over HTTP writes nothing to stderr.
* The default still prints a warning for a real problem: a follower that cannot reach its
  source says so (`event=follow_error level=warn`), while routine events (listening,
  bootstrap, follow_start) stay quiet.
* `REPL_LOG_FILE`: the lines go to the file (appended, owner-only), stderr stays empty.
"""

from __future__ import annotations

import os
import stat

import apsw
import pytest

from helpers import Worker, apsw_conn, lsn_checksum, one, wait_for, worker_status


def session(tmp, env):
    """A primary serving over HTTP, a replica following it, writes, a forwarded write, equal
    checksums; returns (primary stderr, replica stderr)."""
    p = Worker(tmp / "p.db", env=env)
    r = None
    try:
        p.one("SELECT repl_primary('127.0.0.1:0')")
        p.one("SELECT repl_config('exec', 1)")
        url = worker_status(p)["server"]["url"]
        p.script(["CREATE TABLE t(x)", "INSERT INTO t VALUES (1)"])
        r = Worker(tmp / "r.db", env=env)
        r.one("SELECT repl_follow(?, 10)", [url])
        for i in range(5):
            p.one("INSERT INTO t VALUES (?)", [i])
        r.one("SELECT repl_exec('INSERT INTO t VALUES (99)')")
        lsn = p.one("SELECT repl_lsn()")
        r.one("SELECT repl_wait(?, 10000)", [lsn])
        assert lsn_checksum(p) == lsn_checksum(r)
        r.one("SELECT repl_follow(NULL)")
        r.close()
        p.close()
        return p.stderr(), r.stderr()
    finally:
        for w in (r, p):
            if w is not None:
                w.kill()


def test_off_leaves_stderr_empty_through_a_whole_session(tmp):
    perr, rerr = session(tmp, {"REPL_LOG": "off"})
    assert perr == "" and rerr == "", (perr, rerr)


def test_info_shows_routine_events(tmp):
    perr, rerr = session(tmp, {"REPL_LOG": "info"})
    assert "event=listening level=info" in perr, perr
    assert "event=follow_start level=info" in rerr, rerr


def test_default_is_quiet_for_routine_events(tmp):
    perr, rerr = session(tmp, {"REPL_LOG": ""})
    assert "event=" not in perr and "event=" not in rerr, (perr, rerr)


def test_default_warns_when_a_follower_cannot_reach_its_source(tmp):
    p = Worker(tmp / "p.db", env={"REPL_LOG": ""})
    p.one("SELECT repl_primary('127.0.0.1:0')")
    url = worker_status(p)["server"]["url"]
    p.script(["CREATE TABLE t(x)"])
    r = Worker(tmp / "r.db", env={"REPL_LOG": ""})
    try:
        r.one("SELECT repl_follow(?, 10)", [url])
        p.kill()  # the source goes away
        wait_for(lambda: "event=follow_error level=warn" in r.stderr(), timeout=30, what="a follow_error warning")
        assert "event=follow_start" not in r.stderr()  # routine events stay quiet by default
    finally:
        r.kill()
        p.kill()


def test_log_file_takes_the_lines_instead_of_stderr(tmp):
    log = tmp / "events.log"
    perr, rerr = session(tmp, {"REPL_LOG": "info", "REPL_LOG_FILE": str(log)})
    assert perr == "" and rerr == "", (perr, rerr)
    text = log.read_text()
    assert "event=listening level=info" in text and "event=follow_start level=info" in text, text
    assert all(line.startswith("event=") for line in text.splitlines()), text
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


def test_repl_config_sets_level_and_file_for_the_process(tmp, loaded):
    c = apsw_conn(tmp / "plain.db")
    before = one(c, "SELECT repl_config('log')")
    try:
        assert one(c, "SELECT repl_config('log', 'debug')") == "debug"
        assert one(c, "SELECT repl_config('log')") == "debug"
        log = tmp / "x.log"
        assert one(c, "SELECT repl_config('log_file', ?)", (str(log),)) == str(log)
        assert log.exists()
        with pytest.raises(apsw.Error, match="cannot open"):
            one(c, "SELECT repl_config('log_file', ?)", (str(tmp / "no" / "such" / "dir.log"),))
        assert one(c, "SELECT repl_config('log_file')") == str(log)  # unchanged by the failure
    finally:
        one(c, "SELECT repl_config('log_file', '')")
        one(c, "SELECT repl_config('log', ?)", (before,))
    assert one(c, "SELECT repl_config('log_file')") is None

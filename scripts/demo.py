#!/usr/bin/python3
"""The driver of `make demo` (scripts/demo.sh starts it; run it through demo.sh, which owns the
temporary directory and the clean-up).

It runs under Debian's /usr/bin/python3 on purpose: its stdlib `sqlite3` module can load
extensions and uses the system SQLite, the same library as the stock `sqlite3` shell. Only the
standard library is used.

Two modes:

  demo.py run  --dir DIR --ext EXT --sqlite3 SQLITE3
      The demo: starts a primary process and a replica process (the `node` mode below), drives
      them, runs a stock sqlite3 shell on the replica file, checks every claim it prints and
      exits 1 with "demo: FAILED: ..." when one does not hold.

  demo.py node primary|replica --dir DIR --ext EXT
      One process owning one database. Reads one JSON command per line on stdin, answers one
      JSON line on stdout ({"ok": true, ...} or {"ok": false, "error": ...}). Exits at "quit"
      or when stdin closes (so a node never outlives a driver that died).

Lag is measured across the two processes with CLOCK_MONOTONIC (time.monotonic_ns(), one clock
for the whole machine): the primary notes the time right after its INSERT committed, the replica
polls its own repl_lsn() until it reaches that commit's LSN and notes the time it saw it. The
replica is told which LSN to expect before the primary writes, so the poll is already running
when the commit happens.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time

WRITES = 10  # timed writes on the primary
REPLY_TIMEOUT_S = 30.0  # one command to a node (a bootstrap on a busy machine included)
VISIBLE_TIMEOUT_MS = 5000  # one write, commit to visible on the replica
POLL_S = 0.0001  # between two repl_lsn() reads of the replica while a write is expected


# --------------------------------------------------------------------------------------------
# node: one process, one database


def open_db(ext: str, path: str) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """Load the extension on a :memory: connection FIRST (it registers the `replica` VFS as the
    process default), then open the database: it goes through the VFS."""
    boot = sqlite3.connect(":memory:")
    boot.enable_load_extension(True)
    boot.load_extension(ext)
    boot.enable_load_extension(False)
    # isolation_level=None: autocommit, every statement is its own transaction (the module's
    # default would hold a transaction open across the replica's reads).
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    return boot, conn


def one(conn: sqlite3.Connection, sql: str, params: tuple = ()) -> object:
    return conn.execute(sql, params).fetchone()[0]


def node(role: str, d: str, ext: str) -> int:
    path = os.path.join(d, f"{role}.db")
    _boot, conn = open_db(ext, path)

    def lsn_checksum() -> dict:
        lsn, checksum = conn.execute("SELECT repl_lsn(), repl_checksum()").fetchone()  # one snapshot
        return {"lsn": lsn, "checksum": checksum}

    def handle(cmd: dict) -> dict:
        op = cmd["op"]
        if op == "primary":
            start = one(conn, "SELECT repl_primary(?)", (cmd["listen"],))
            one(conn, "SELECT repl_config('exec', 1)")  # the replica forwards a write (step 5)
            url = one(conn, "SELECT json_extract(repl_status(), '$.server.url')")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS greetings(id INTEGER PRIMARY KEY, text TEXT NOT NULL,"
                " origin TEXT NOT NULL DEFAULT 'primary')"
            )
            return {"start_lsn": start, "url": url, **lsn_checksum()}
        if op == "write":  # one transaction on the primary, timed at the moment it committed
            cur = conn.execute("INSERT INTO greetings(text) VALUES (?)", (cmd["text"],))
            t = time.monotonic_ns()
            return {"t_commit_ns": t, "id": cur.lastrowid, "lsn": one(conn, "SELECT repl_lsn()")}
        if op == "follow":
            lsn = one(conn, "SELECT repl_follow(?)", (cmd["source"],))
            st = json.loads(one(conn, "SELECT repl_status()"))
            return {"lsn": lsn, "role": st.get("role"), "follow": st.get("follow")}
        if op == "await":  # answered twice: "armed" at once, then when the LSN is visible
            reply({"ok": True, "armed": True})
            target, deadline = cmd["lsn"], time.monotonic() + cmd["timeout_ms"] / 1000
            polls, started = 0, time.monotonic_ns()
            while True:
                lsn = one(conn, "SELECT repl_lsn()")
                polls += 1
                if lsn is not None and lsn >= target:
                    t = time.monotonic_ns()
                    break
                if time.monotonic() > deadline:
                    st = one(conn, "SELECT repl_status()")
                    return {"ok": False, "error": f"the replica did not reach LSN {target} within "
                            f"{cmd['timeout_ms']} ms (it is at LSN {lsn}); repl_status(): {st}"}
                time.sleep(POLL_S)
            polled_ns = time.monotonic_ns() - started
            return {"t_visible_ns": t, "lsn": lsn, "polls": polls, "polled_ns": polled_ns}
        if op == "exec":  # forwarded write, then read it back at once on this replica
            lsn = one(conn, "SELECT repl_exec(?, ?)", (cmd["sql"], json.dumps(cmd["params"])))
            local = one(conn, "SELECT repl_lsn()")
            rows = conn.execute(cmd["check_sql"], cmd["check_params"]).fetchall()
            return {"lsn": lsn, "local_lsn": local, "rows": rows}
        if op == "local_write":
            try:
                conn.execute(cmd["sql"])
            except sqlite3.Error as e:
                return {"refused": True, "error": str(e),
                        "code": getattr(e, "sqlite_errorcode", None),
                        "name": getattr(e, "sqlite_errorname", None)}
            return {"refused": False}
        if op == "query":
            return {"rows": conn.execute(cmd["sql"], cmd.get("params", [])).fetchall()}
        if op == "status":
            return {"status": json.loads(one(conn, "SELECT repl_status()"))}
        if op == "state":
            return lsn_checksum()
        if op == "wait":
            return {"lsn": one(conn, "SELECT repl_wait(?, ?)", (cmd["lsn"], cmd["timeout_ms"]))}
        if op == "quit":
            if role == "replica":
                conn.execute("SELECT repl_follow(NULL)")
            conn.close()
            return {}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            out = handle(cmd)
            out.setdefault("ok", True)
        except Exception as e:  # answered, not fatal: the driver decides
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply(out)
        if cmd["op"] == "quit":
            return 0
    return 0  # stdin closed: the driver is gone


# --------------------------------------------------------------------------------------------
# run: the demo


class Failed(Exception):
    pass


BOLD, PLAIN = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{PLAIN}", flush=True)


def say(line: str) -> None:
    print(f"  {line}", flush=True)


class Node:
    """A node process; its stdout is read by a thread into a queue, so every read has a deadline."""

    def __init__(self, role: str, d: str, ext: str, log) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "node", role, "--dir", d, "--ext", ext],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, op: str, **kw) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise Failed(f"the {self.role} process (pid {self.pid}) is gone (exit code "
                         f"{self.proc.poll()}); its stderr is in the events below")

    def recv(self, what: str, timeout: float = REPLY_TIMEOUT_S) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise Failed(f"the {self.role} process (pid {self.pid}) did not answer {what} within "
                         f"{timeout:.0f} s")
        if line is None:
            raise Failed(f"the {self.role} process (pid {self.pid}) exited (code "
                         f"{self.proc.wait()}) during {what}; its stderr is in the events below")
        out = json.loads(line)
        if not out.get("ok"):
            raise Failed(f"{self.role}: {what} failed: {out.get('error')}")
        return out

    def call(self, op: str, **kw) -> dict:
        self.send(op, **kw)
        return self.recv(op)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.recv("quit", timeout=5)
            except Failed:
                pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stock(sqlite3_bin: str, db: str, sql: str) -> tuple[int, str]:
    """One stock sqlite3 process (no extension) on `db`; returns (pid, output)."""
    p = subprocess.Popen([sqlite3_bin, "-batch", "-bail", db, sql], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=REPLY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise Failed(f"stock sqlite3 on {db} did not finish within {REPLY_TIMEOUT_S:.0f} s")
    if p.returncode != 0:
        raise Failed(f"stock sqlite3 on {db} failed ({p.returncode}): {err.strip()}")
    return p.pid, out.strip()


def fmt_ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def run(d: str, ext: str, sqlite3_bin: str) -> None:
    log = open(os.path.join(d, "events.log"), "ab")  # the nodes' stderr (append: shared)
    nodes: list[Node] = []
    # demo.sh stops this driver with SIGTERM (its trap on EXIT/INT/TERM): stop the nodes first.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        drive(d, ext, sqlite3_bin, log, nodes)
    finally:
        for n in reversed(nodes):  # the replica first: its follower would log the primary's absence
            n.stop()
        log.close()


def drive(d: str, ext: str, sqlite3_bin: str, log, nodes: list[Node]) -> None:
    replica_db = os.path.join(d, "replica.db")

    step("1. primary process: primary.db becomes a primary serving its log over HTTP")
    primary = Node("primary", d, ext, log)
    nodes.append(primary)
    p = primary.call("primary", listen="127.0.0.1:0")
    url = p["url"]
    if not (isinstance(url, str) and url.startswith("http://127.0.0.1:") and not url.endswith(":0")):
        raise Failed(f"repl_status() of the primary shows no HTTP server URL: {url!r}")
    say(f"primary pid {primary.pid}: SELECT repl_primary('127.0.0.1:0')  -- port 0: any free port")
    say(f"serving at {url}  (repl_status().server.url), table greetings created, LSN {p['lsn']}")

    step("2. replica process: a new, empty file follows the primary over HTTP (repl_follow)")
    replica = Node("replica", d, ext, log)
    nodes.append(replica)
    r = replica.call("follow", source=url)
    if r["role"] != "replica" or not r.get("follow"):
        raise Failed(f"after repl_follow the replica's repl_status() shows role={r['role']!r}, "
                     f"follow={r.get('follow')!r}: it is not following")
    say(f"replica pid {replica.pid}: SELECT repl_follow('{url}')")
    say(f"bootstrapped to LSN {r['lsn']}; a background thread of the replica process follows")
    # The timed writes start once the follower's long-poll is parked on the primary ("waiting"),
    # so the first one measures replication and not the follower's start-up.
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while (follow := replica.call("status")["status"].get("follow") or {}).get("state") != "waiting":
        if time.monotonic() > deadline:
            raise Failed(f"the replica's follower did not reach state 'waiting' within "
                         f"{REPLY_TIMEOUT_S:.0f} s: repl_status().follow = {follow}")
        time.sleep(0.01)
    say(f"repl_status().follow: state={follow.get('state')}, source={follow.get('source')}, "
        f"errors={follow.get('errors')}")

    step(f"3. live replication: {WRITES} writes on the primary, each timed until visible on the replica")
    lags: list[int] = []
    polls = polled_ns = 0
    for i in range(1, WRITES + 1):
        target = primary.call("state")["lsn"] + 1
        replica.send("await", lsn=target, timeout_ms=VISIBLE_TIMEOUT_MS)
        replica.recv("await (armed)")
        w = primary.call("write", text=f"write {i} from the primary")
        if w["lsn"] != target:
            raise Failed(f"write {i} committed at LSN {w['lsn']}, expected {target}: "
                         "something else wrote to the primary")
        v = replica.recv(f"await LSN {target}", timeout=VISIBLE_TIMEOUT_MS / 1000 + REPLY_TIMEOUT_S)
        lag = max(0, v["t_visible_ns"] - w["t_commit_ns"])
        polls, polled_ns = polls + v["polls"], polled_ns + v["polled_ns"]
        rows = replica.call("query", sql="SELECT id, text FROM greetings WHERE id = ?", params=[w["id"]])["rows"]
        if rows != [[w["id"], f"write {i} from the primary"]]:
            raise Failed(f"the replica reached LSN {v['lsn']} but reads row {w['id']} as {rows!r}")
        lags.append(lag)
        say(f"write {i:2} -> visible on replica after {fmt_ms(lag)}  (LSN {w['lsn']}, row {w['id']})")
    lags_sorted = sorted(lags)
    say(f"commit-to-visible over {len(lags)} writes: p50 {fmt_ms(int(statistics.median(lags)))}, "
        f"min {fmt_ms(lags_sorted[0])}, max {fmt_ms(lags_sorted[-1])}")
    say("(primary: time after its COMMIT returned; replica: first repl_lsn() read at that LSN, "
        f"polled every {polled_ns / max(polls, 1) / 1e6:.2f} ms on average; one machine-wide monotonic clock)")

    step("4. stock sqlite3 (no extension) reads the replica file while the replica follows")
    count_sql = "SELECT count(*) FROM greetings;"
    spid, out = stock(sqlite3_bin, replica_db,
                      "SELECT 'journal_mode=' || (SELECT journal_mode FROM pragma_journal_mode) || "
                      "', rows=' || (SELECT count(*) FROM greetings) || ', last=' || "
                      "(SELECT quote(text) FROM greetings ORDER BY id DESC LIMIT 1) || "
                      "', integrity_check=' || (SELECT integrity_check FROM pragma_integrity_check);")
    say(f"sqlite3 pid {spid}: {sqlite3_bin} {replica_db} "
        "'SELECT journal_mode, count(*), the last row, integrity_check ...'")
    say(f"  -> {out}")
    if f"rows={WRITES}," not in out or "integrity_check=ok" not in out:
        raise Failed(f"stock sqlite3 read {out!r} from the replica; expected rows={WRITES} and "
                     "integrity_check=ok")
    target = primary.call("state")["lsn"] + 1
    replica.send("await", lsn=target, timeout_ms=VISIBLE_TIMEOUT_MS)
    replica.recv("await (armed)")
    w = primary.call("write", text=f"write {WRITES + 1}, after the first stock read")
    v = replica.recv(f"await LSN {target}", timeout=VISIBLE_TIMEOUT_MS / 1000 + REPLY_TIMEOUT_S)
    say(f"primary: one more write (LSN {w['lsn']}), on the replica after "
        f"{fmt_ms(max(0, v['t_visible_ns'] - w['t_commit_ns']))}")
    spid, out = stock(sqlite3_bin, replica_db, count_sql)
    say(f"sqlite3 pid {spid}: {count_sql}  -> {out}  (a new process sees the new row: the follower "
        "appends to the replica's own WAL)")
    if out != str(WRITES + 1):
        raise Failed(f"stock sqlite3 counted {out} rows on the replica after the extra write, "
                     f"expected {WRITES + 1}")

    step("5. forwarded write: repl_exec on the replica runs on the primary, read-your-writes")
    text = "written through the replica"
    sql = "INSERT INTO greetings(text, origin) VALUES (?, ?)"
    params = [text, "replica, via repl_exec"]
    e = replica.call("exec", sql=sql, params=params,
                     check_sql="SELECT id, text, origin FROM greetings WHERE text = ?",
                     check_params=[text])
    say(f"replica> SELECT repl_exec('{sql}', '{json.dumps(params)}');  -> LSN {e['lsn']}")
    say(f"replica> SELECT id, text, origin FROM greetings WHERE text = '{text}';  -- right after "
        "the call returned")
    say(f"  -> {', '.join(str(tuple(r)) for r in e['rows']) or '(no row)'}  (replica repl_lsn() = {e['local_lsn']})")
    if len(e["rows"]) != 1 or e["local_lsn"] < e["lsn"]:
        raise Failed(f"read-your-writes broken: repl_exec returned LSN {e['lsn']} but the replica "
                     f"is at LSN {e['local_lsn']} and reads {e['rows']!r}")
    on_primary = primary.call("query", sql="SELECT count(*) FROM greetings WHERE text = ?",
                              params=[text])["rows"][0][0]
    say(f"primary> the same row is there: count = {on_primary}")
    if on_primary != 1:
        raise Failed(f"the forwarded write is on the primary {on_primary} times, expected once")

    step("6. a local write on the replica is refused")
    bad = "INSERT INTO greetings(text) VALUES ('local write')"
    lw = replica.call("local_write", sql=bad)
    if not lw["refused"]:
        raise Failed("a local INSERT on the replica succeeded: the replica must be read-only")
    say(f"replica> {bad};")
    say(f"  -> refused: {lw['name'] or 'error'} ({lw['code']}): {lw['error']}")
    if lw["code"] != 8 or "readonly" not in lw["error"]:  # SQLITE_READONLY
        raise Failed(f"the local write was refused with {lw['name']} ({lw['code']}): {lw['error']}; "
                     "expected SQLITE_READONLY (8), attempt to write a readonly database")

    step("7. result: primary and replica at the same LSN, same checksum")
    ps = primary.call("state")
    replica.call("wait", lsn=ps["lsn"], timeout_ms=VISIBLE_TIMEOUT_MS)
    rs = replica.call("state")
    say(f"primary pid {primary.pid}: repl_lsn() = {ps['lsn']}, repl_checksum() = {ps['checksum']}")
    say(f"replica pid {replica.pid}: repl_lsn() = {rs['lsn']}, repl_checksum() = {rs['checksum']}")
    if (ps["lsn"], ps["checksum"]) != (rs["lsn"], rs["checksum"]) or not ps["checksum"]:
        raise Failed(f"the replica (LSN {rs['lsn']}, checksum {rs['checksum']}) does not equal the "
                     f"primary (LSN {ps['lsn']}, checksum {ps['checksum']})")
    say("checksums equal: the replica's content is byte-identical to the primary's at this LSN")

    step("stopping the demo's processes")
    for n in reversed(nodes):
        n.stop()
        say(f"{n.role} pid {n.pid} exited ({n.proc.returncode})")
        if n.proc.returncode != 0:
            raise Failed(f"the {n.role} process exited with code {n.proc.returncode}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["run", "node"])
    ap.add_argument("role", nargs="?", choices=["primary", "replica"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--ext", required=True)
    ap.add_argument("--sqlite3", default="sqlite3")
    a = ap.parse_args()
    if a.mode == "node":
        if not a.role:
            ap.error("node needs a role: primary or replica")
        return node(a.role, a.dir, a.ext)
    try:
        run(a.dir, a.ext, a.sqlite3)
    except Failed as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr, flush=True)
        with open(os.path.join(a.dir, "failed.txt"), "w") as f:  # demo.sh repeats it last
            f.write(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

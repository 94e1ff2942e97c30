#!/usr/bin/python3
"""sqlite-replica from Python's standard library `sqlite3` module: a primary serving its log over
HTTP in one process, a replica following it in another, a write forwarded from the replica with
repl_exec, repl_wait, and equal checksums. Last line: "ok".

    make build && /usr/bin/python3 examples/python-stdlib/replicate.py

Needs an interpreter whose `sqlite3` module was built with loadable extensions (Debian's
/usr/bin/python3 is; pyenv and python.org/macOS builds usually are not). Check with:

    python3 -c 'import sqlite3; sqlite3.connect(":memory:").enable_load_extension(True)'

(AttributeError: 'sqlite3.Connection' object has no attribute 'enable_load_extension' means
no.) Python 3.11's load_extension() takes no entry point: SQLite derives sqlite3_replica_init
from the file name libreplica.so, and appends ".so" itself.

The script runs itself twice: without arguments it is the replica and starts
`replicate.py primary DIR`, which prints "url <url>" and then answers "state" with
"state <lsn> <checksum>" until its standard input says "quit" or closes.
"""

import json
import os
import queue
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

EXT = os.path.abspath(
    os.environ.get("REPLICA_EXT", str(Path(__file__).resolve().parents[2] / "build" / "libreplica"))
)


def load_replica():
    """Load the extension once per process, on a throw-away connection, BEFORE opening a
    database file: that registers the "replica" VFS as the default and an auto-extension, so
    every connection opened afterwards goes through the VFS and has the repl_* functions."""
    boot = sqlite3.connect(":memory:")
    if not hasattr(boot, "enable_load_extension"):
        sys.exit(f"{sys.executable}: this Python's sqlite3 cannot load extensions; use /usr/bin/python3")
    boot.enable_load_extension(True)
    boot.load_extension(EXT)
    boot.close()  # the extension stays loaded: its init asks SQLite to keep it


def one(conn, sql, args=()):
    return conn.execute(sql, args).fetchone()[0]


def primary(directory):
    load_replica()
    db = sqlite3.connect(os.path.join(directory, "primary.db"), isolation_level=None)
    one(db, "SELECT repl_primary('127.0.0.1:0')")
    one(db, "SELECT repl_config('exec', 1)")  # accept forwarded writes (off by default)
    url = json.loads(one(db, "SELECT repl_status()"))["server"]["url"]
    db.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    db.execute("INSERT INTO notes(text) VALUES (?)", ("written on the primary",))
    print("url", url, flush=True)
    for line in sys.stdin:
        if line.strip() == "state":
            lsn, checksum = db.execute("SELECT repl_lsn(), repl_checksum()").fetchone()
            print("state", lsn, checksum, flush=True)
        elif line.strip() == "quit":
            break
        else:
            sys.exit(f"primary: unknown command {line!r}")


class Child:
    """The primary process: commands on its stdin, its stdout read as lines with deadlines."""

    def __init__(self, directory):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "primary", directory],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the primary printed no {prefix!r} line within {timeout} s") from None
        if line is None:
            raise RuntimeError(f"the primary exited before printing {prefix!r} (see its stderr above)")
        words = line.split()
        if words[:1] != [prefix]:
            raise RuntimeError(f"the primary printed {line!r}, expected {prefix!r}")
        return words[1:]

    def stop(self):
        """Ask it to quit; kill it if it has not exited within the deadline."""
        try:
            self.send("quit")
            self.proc.stdin.close()
        except OSError:
            pass  # already gone
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("the primary did not exit within 10 s of quit; killed it") from None


def replica(directory):
    load_replica()  # first: a Python that cannot load extensions stops here, with the reason
    child = Child(directory)
    try:
        (url,) = child.expect("url", timeout=30)
        db = sqlite3.connect(os.path.join(directory, "replica.db"), isolation_level=None)
        lsn = one(db, "SELECT repl_follow(?)", (url,))
        print(f"replica bootstrapped from {url} at LSN {lsn}")

        # A write through the replica runs on the primary; repl_exec returns once it is here too.
        lsn = one(db, "SELECT repl_exec('INSERT INTO notes(text) VALUES (?)', ?)",
                  (json.dumps(["written through the replica"]),))
        notes = [r[0] for r in db.execute("SELECT text FROM notes ORDER BY id")]
        print(f"after repl_exec (LSN {lsn}) the replica reads {notes}")

        # Equal checksums at the primary's LSN (an int from the child's line: bound as INTEGER).
        child.send("state")
        p_lsn, p_sum = child.expect("state", timeout=10)
        lsn = one(db, "SELECT repl_wait(?, 5000)", (int(p_lsn),))
        r_sum = one(db, "SELECT repl_checksum()")
        print(f"primary LSN {p_lsn} checksum {p_sum}; replica LSN {lsn} checksum {r_sum}")
        if r_sum != p_sum or len(notes) != 2:
            sys.exit("the replica does not equal the primary")

        # A local write on the replica is refused: writes go through repl_exec.
        try:
            db.execute("INSERT INTO notes(text) VALUES ('local')")
            sys.exit("a local write on the replica was accepted")
        except sqlite3.OperationalError as e:
            print("a local write on the replica:", e)
        one(db, "SELECT repl_follow(NULL)")
        db.close()
    finally:
        code = child.stop()  # always: the child never outlives us
    if code != 0:
        sys.exit(f"the primary process exited with {code}")
    print("ok")


if __name__ == "__main__":
    if sys.argv[1:2] == ["primary"] and len(sys.argv) == 3:
        primary(sys.argv[2])
    elif len(sys.argv) == 1:
        with tempfile.TemporaryDirectory() as d:
            replica(d)
    else:
        sys.exit(f"usage: {sys.argv[0]}  (runs both roles)  |  {sys.argv[0]} primary DIR")

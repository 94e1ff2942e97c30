"""The bank-transfer workload shared by the stress, fault and crash tests and by scripts/torture.py.

The bank: ``acct(id, bal, ver)`` holds N accounts, ``ver(v)`` one version row, ``junk(id, b)``
blobs for multi-page and overflow commits. Every transfer moves an amount between two accounts
(the total never changes), bumps ``ver.v`` by one and stamps both accounts with it, so every
committed state has ``max(acct.ver) == ver.v`` (once a transfer ran), and ``v`` never goes back.
A reader that sees anything else saw a state that was never committed.

Here: the schema, one transfer, the invariant (``consistent``, ``BankCheck``), a reader loop and
``serve`` (a process becoming the serving primary, retrying while its port is still taken). The
writer loops stay in each test: what they add to a transfer (blob churn, savepoints, VACUUM,
pacing) is what that test is about.

It runs inside the child processes (``from workload import …`` in a snippet: PY_PRELUDE puts this
folder on ``sys.path``) and in the processes that drive them, so it needs only apsw and the
standard library (no pytest). It lives beside the tests, not in ``scripts/``, because the
torture script already builds on the test helpers (``Worker``, ``spawn_bg``, the fault proxy)
from this folder: one direction of dependency, scripts -> tests/python.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Callable, Sequence

import apsw

# (total of the balances, number of accounts, version row, highest stamped version)
READ_SQL = (
    "SELECT (SELECT total(bal) FROM acct), (SELECT count(*) FROM acct), (SELECT v FROM ver), "
    "(SELECT max(ver) FROM acct)"
)


def schema(n_acct: int, start_bal: int, junk_rows: int = 0, blob_size: str = "3000") -> list[str]:
    """The starting state: ``n_acct`` accounts of ``start_bal``, version 0, and ``junk_rows``
    overflow-page blobs of ``blob_size`` bytes (an SQL expression of the row number ``n``)."""
    stmts = [
        "CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL, ver INTEGER NOT NULL)",
        "CREATE TABLE ver(v INTEGER NOT NULL)",
        "CREATE TABLE junk(id INTEGER PRIMARY KEY, b BLOB)",
        "BEGIN",
        *[f"INSERT INTO acct VALUES ({i}, {start_bal}, 0)" for i in range(n_acct)],
        "INSERT INTO ver VALUES (0)",
    ]
    if junk_rows:
        stmts.append(
            f"WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {junk_rows}) "
            f"INSERT INTO junk(b) SELECT randomblob({blob_size}) FROM c"
        )
    stmts.append("COMMIT")
    return stmts


def transfer(conn: apsw.Connection, rng: random.Random, n_acct: int, amount: tuple[int, int] = (1, 1)) -> tuple[int, int, int, int]:
    """``BEGIN IMMEDIATE``, then move a random amount in ``amount`` (inclusive; no draw when the
    range is one value) between two random accounts, bump the version and stamp both accounts.
    The transaction stays open: the caller adds to it and COMMITs (or rolls back on
    ``apsw.BusyError``). Returns ``(a, b, amount, v)``."""
    a, b = rng.sample(range(n_acct), 2)
    lo, hi = amount
    x = rng.randint(lo, hi) if hi > lo else lo
    conn.execute("BEGIN IMMEDIATE")
    v = conn.execute("SELECT v FROM ver").fetchone()[0] + 1
    conn.execute("UPDATE acct SET bal = bal - ?, ver = ? WHERE id = ?", (x, v, a))
    conn.execute("UPDATE acct SET bal = bal + ?, ver = ? WHERE id = ?", (x, v, b))
    conn.execute("UPDATE ver SET v = ?", (v,))
    return a, b, x, v


def consistent(row: Sequence[Any], total: float, n_acct: int) -> bool:
    """Whether a ``READ_SQL`` row (extra columns after the fourth are ignored) is a committed
    state: total and account count unchanged, the newest stamp equal to the version row."""
    s, c, v, mv = row[:4]
    return s == total and c == n_acct and (v == 0 or mv == v)


class BankCheck:
    """The invariant one reader checks on every row it reads: ``consistent``, and the version
    never lower than the highest this reader saw before (``last_v``)."""

    def __init__(self, total: float, n_acct: int):
        self.total, self.n_acct, self.last_v = total, n_acct, -1

    def __call__(self, row: Sequence[Any]) -> list | None:
        """None when ``row`` is fine, else what was wrong (for the report)."""
        v = row[2]
        bad = None if consistent(row, self.total, self.n_acct) and v >= self.last_v else ["state", list(row), self.last_v]
        self.last_v = max(self.last_v, v)
        return bad


def read_loop(
    db: str,
    stop: str,
    sql: str,
    check: Callable[[Sequence[Any]], list | None],
    *,
    rng: random.Random | None = None,
    long_share: float = 0.0,
    long_secs: tuple[float, float] = (0.05, 0.6),
    long_pace: float = 0.0,
    pace: float = 0.0,
    readonly: bool = False,
    reopen_share: float = 0.0,
    busy_ok: bool = False,
    live: bool = False,
) -> dict:
    """A stock reader (this process must not have loaded the extension: plain unix VFS) reading
    ``sql`` on ``db`` until the file ``stop`` exists; ``check(row)`` judges each row.

    With ``long_share``, that share of the reads is a read transaction held for a random time in
    ``long_secs`` (re-reading every ``long_pace`` s) that must see the same row throughout.
    ``reopen_share``: now and then a fresh connection. ``busy_ok``: SQLITE_BUSY is retried, not an
    error. ``live``: each violation and error is also printed (a JSON line) when it happens.
    Returns the counts, the first 20 violations and errors, and the checker's ``last_v``.
    """
    rng = rng or random.Random(0)
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE

    def connect() -> apsw.Connection:
        c = apsw.Connection(db, flags=flags, vfs="unix")
        c.setbusytimeout(10000 if readonly else 5000)
        return c

    conn = connect()
    out: dict[str, Any] = {"reads": 0, "long_txns": 0, "busy": 0, "reopen": 0}
    violations: list = []
    errors: list[str] = []

    def note(kind: str, what: Any, into: list) -> None:
        into.append(what)
        if live:
            print(json.dumps({kind: what, "time": time.time()}), flush=True)

    def judge(row: Sequence[Any]) -> None:
        out["reads"] += 1
        bad = check(row)
        if bad:
            note("violation", bad, violations)

    while not os.path.exists(stop):
        try:
            if long_share and rng.random() < long_share:
                conn.execute("BEGIN")
                first = conn.execute(sql).fetchone()
                judge(first)
                until = time.monotonic() + rng.uniform(*long_secs)
                while time.monotonic() < until:
                    again = conn.execute(sql).fetchone()
                    out["reads"] += 1
                    if again != first:
                        note("violation", ["snapshot moved", list(first), list(again)], violations)
                    if long_pace:
                        time.sleep(long_pace)
                conn.execute("COMMIT")
                out["long_txns"] += 1
            else:
                judge(conn.execute(sql).fetchone())
            if reopen_share and rng.random() < reopen_share:
                conn.close()
                conn = connect()
                out["reopen"] += 1
        except apsw.BusyError as e:
            if not busy_ok:
                note("error", f"{type(e).__name__}: {e}", errors)
            out["busy"] += 1
            if not conn.getautocommit():
                conn.execute("ROLLBACK")
        except apsw.Error as e:
            note("error", f"{type(e).__name__}: {e}", errors)
            if not conn.getautocommit():
                conn.execute("ROLLBACK")
        if pace:
            time.sleep(pace)  # pacing: leave the CPUs to the processes under test
    out.update(violations=violations[:20], n_violations=len(violations), errors=errors[:20], n_errors=len(errors),
               last_v=getattr(check, "last_v", None))
    return out


def serve(conn: apsw.Connection, listen: str, timeout: float = 15) -> str:
    """``repl_primary(listen)`` on ``conn`` (extension loaded): this process becomes the serving
    primary. Retried while the port is still taken (by a killed predecessor's socket), at most
    ``timeout`` seconds. Returns the server's URL."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("SELECT repl_primary(?)", (listen,)).fetchall()
            break
        except apsw.Error as e:
            if "cannot listen" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return json.loads(conn.execute("SELECT repl_status()").fetchone()[0])["server"]["url"]

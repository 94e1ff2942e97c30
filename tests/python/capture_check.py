"""Checks shared by the test_capture_*.py files (primary-side capture, WAL.md §D and
§G11–§G23).

The central one is ``assert_rebuild_equals(db)``: "what the log says equals what the primary
holds". With writers finished, it compares

* ``sqlite-replica rebuild <db>-replica out.db`` page by page with ``walutil.logical_pages(db)``
  (an independent reader of the live db + WAL; byte-identical, and the rebuilt file has exactly
  commit_size pages),
* the rows of every table, through SQL, in the rebuilt file and in the primary,
* the LSN and checksum printed by rebuild with ``repl_lsn()`` / ``repl_checksum()`` of the
  primary.

Also: ``inspect`` / ``verify`` wrappers, ``status`` (repl_status as a dict) and a tiny WAL frame
scanner (``wal_frames``) used to prove that a workload really produced what a test is about
(spilled frames, padding frames).

POSIX advisory locks: closing ANY file descriptor of a file drops every fcntl lock the process
holds on that file. SQLite's unix VFS works around that for its own opens, but a plain
``open(db).read(); close()`` in a process that has connections on ``db`` silently releases
their locks on the db file (and, for ``-shm``, the WAL locks) -- including the capture agent's
SHARED lock, after which another process's last close checkpoints and deletes the WAL under us.
So everything that reads the database, ``-shm`` or ``-wal`` files directly (walutil included)
runs here in a separate process (``_read_in_child``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import apsw

import walutil
from helpers import REPO, apsw_conn, one

CLI = str(REPO / "build" / "sqlite-replica")

REBUILT = re.compile(
    r"^rebuilt (?P<out>.+): LSN (?P<lsn>\d+) generation (?P<gen>\d+), (?P<pages>\d+) pages, "
    r"checksum (?P<checksum>[0-9a-f]{16})$"
)


def log_dir(db: str | os.PathLike[str]) -> Path:
    return Path(f"{db}-replica")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert os.path.exists(CLI), f"{CLI} missing: run `make build`"
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def status(conn: apsw.Connection) -> dict:
    value = json.loads(one(conn, "SELECT repl_status()"))
    assert isinstance(value, dict)
    return value


@dataclass
class LogRecord:
    lsn: int
    generation: int
    kind: str  # "txn" | "snapshot"
    pages: int
    commit_size: int
    db_checksum: str
    epoch: int = 1


def inspect(db: str | os.PathLike[str]) -> list[LogRecord]:
    """``sqlite-replica inspect <db>-replica`` parsed: one LogRecord per log record."""
    proc = run_cli("inspect", log_dir(db))
    assert proc.returncode == 0, f"inspect failed ({proc.returncode}): {proc.stderr}"
    out = []
    for line in proc.stdout.splitlines():
        f = line.split()
        assert len(f) == 8, f"unexpected inspect line: {line!r}"
        out.append(LogRecord(int(f[0]), int(f[1]), f[2], int(f[3]), int(f[4]), f[5], int(f[7])))
    return out


def assert_dense(records: list[LogRecord], first: int = 1) -> None:
    """LSNs first..N, each exactly previous + 1 (so strictly increasing, no hole, no repeat)."""
    lsns = [r.lsn for r in records]
    assert lsns == list(range(first, first + len(lsns))), f"LSNs not dense from {first}: {lsns}"
    gens = [r.generation for r in records]
    assert gens == sorted(gens), f"generation went backwards: {gens}"
    for prev, cur in zip(records, records[1:]):
        if cur.generation > prev.generation:
            assert cur.kind == "snapshot", f"generation {cur.generation} starts with a {cur.kind} at LSN {cur.lsn}"


def verify_ok(db: str | os.PathLike[str]) -> str:
    proc = run_cli("verify", log_dir(db))
    assert proc.returncode == 0, f"verify failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    return proc.stdout


def rebuild(db: str | os.PathLike[str], out: str | os.PathLike[str], lsn: int | None = None) -> dict:
    args = ["rebuild", log_dir(db), out] + (["--lsn", str(lsn)] if lsn is not None else [])
    proc = run_cli(*args)
    assert proc.returncode == 0, f"rebuild failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    m = REBUILT.match(proc.stdout.strip())
    assert m, f"unexpected rebuild output: {proc.stdout!r}"
    return {"lsn": int(m["lsn"]), "generation": int(m["gen"]), "pages": int(m["pages"]), "checksum": m["checksum"]}


def table_rows(conn: apsw.Connection) -> dict[str, list[tuple]]:
    """Every row of every table (schema included), in a deterministic order."""
    out: dict[str, list[tuple]] = {
        "sqlite_schema": sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema").fetchall(), key=repr)
    }
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    for name in sorted(names):
        quoted = '"' + name.replace('"', '""') + '"'
        out[name] = sorted(conn.execute(f"SELECT * FROM {quoted}").fetchall(), key=repr)
    return out


def open_plain(path: str | os.PathLike[str]) -> apsw.Connection:
    """Open a rebuilt file WITHOUT the replica VFS (the plain unix VFS of apsw's SQLite)."""
    return apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE, vfs="unix")


def assert_rebuild_equals(db: str | os.PathLike[str], out: str | os.PathLike[str], conn: apsw.Connection | None = None) -> dict:
    """The log rebuilt into ``out`` equals the primary ``db`` (writers must be finished).

    ``conn``: a connection to the primary through the VFS (opened here when None). Returns
    rebuild's report (lsn, generation, pages, checksum).
    """
    own = conn is None
    if conn is None:
        conn = apsw_conn(db)
    conn.setbusytimeout(10_000)
    lsn = one(conn, "SELECT repl_lsn()")
    checksum = one(conn, "SELECT repl_checksum()")
    # Freeze writers while reading the live pages (walutil's rule); BEGIN IMMEDIATE also runs
    # capture's catch-up (T1), so anything still uncaptured would show up as an LSN change.
    conn.execute("BEGIN IMMEDIATE")
    try:
        page_size, pages = logical_pages(db, Path(f"{out}.primary-pages"))
        frozen_lsn = one(conn, "SELECT repl_lsn()")
        primary_rows = table_rows(conn)
    finally:
        conn.execute("COMMIT")
    assert frozen_lsn == lsn, f"the primary moved (LSN {lsn} -> {frozen_lsn}): are the writers finished?"
    assert one(conn, "SELECT repl_lsn()") == lsn, "an empty transaction got an LSN"

    info = rebuild(db, out)
    assert info["lsn"] == lsn, f"rebuild reached LSN {info['lsn']}, primary repl_lsn() is {lsn}"
    assert info["checksum"] == checksum, f"rebuild checksum {info['checksum']} != primary repl_checksum() {checksum}"

    out_ps, out_pages = walutil.file_pages(str(out))
    assert out_ps == page_size, f"page size {out_ps} != primary {page_size}"
    assert os.path.getsize(out) == len(pages) * page_size, (
        f"rebuilt file has {os.path.getsize(out)} bytes, the primary has {len(pages)} pages of {page_size}"
    )
    assert info["pages"] == len(pages)
    differing = [i + 1 for i, (a, b) in enumerate(zip(out_pages, pages)) if a != b]
    assert not differing, f"rebuilt pages differ from the primary's: {differing[:20]} (of {len(pages)})"

    plain = open_plain(out)
    try:
        assert one(plain, "PRAGMA integrity_check") == "ok"
        assert table_rows(plain) == primary_rows, "table contents of the rebuild differ from the primary"
    finally:
        plain.close()
    if own:
        conn.close()
    return info


# ------------------------------------------------------------------ raw file reads (in a child)

HERE = str(Path(__file__).resolve().parent)


def _read_in_child(code: str) -> str:
    """Run ``code`` (which may ``import walutil``) in a separate process; returns its stdout.
    See the module docstring: reading SQLite's files in this process would drop our locks."""
    src = f"import sys, json, hashlib, struct\nsys.path.insert(0, {HERE!r})\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"reader child failed:\n{proc.stderr}"
    return proc.stdout


def logical_pages(db: str | os.PathLike[str], scratch: Path) -> tuple[int, list[bytes]]:
    """``walutil.logical_pages(db)``, read by a child process (through the file ``scratch``)."""
    out = _read_in_child(
        f"""
        import walutil
        ps, pages = walutil.logical_pages({str(db)!r})
        with open({str(scratch)!r}, "wb") as f:
            f.write(b"".join(pages))
        print(json.dumps([ps, len(pages)]))
        """
    )
    ps, n = json.loads(out)
    data = scratch.read_bytes()
    scratch.unlink()
    assert len(data) == ps * n
    return ps, [data[i * ps:(i + 1) * ps] for i in range(n)]


# ---------------------------------------------------------------------------------- WAL frames


@dataclass
class Frame:
    no: int
    pgno: int
    commit_size: int
    digest: str  # sha256 of the page image


def wal_frames(db: str | os.PathLike[str]) -> list[Frame]:
    """The published frames 1..mxFrame of ``<db>-wal`` (format: WAL.md §A), read by a child."""
    out = _read_in_child(
        f"""
        import walutil
        h = walutil.shm_header({str(db)!r})
        upto = h[0] if h else 0
        with open({str(db)!r} + "-wal", "rb") as f:
            wal = f.read()
        frames = []
        if upto and len(wal) >= 32:
            ps = struct.unpack(">I", wal[8:12])[0]
            for i in range(upto):
                off = 32 + i * (24 + ps)
                pgno, commit = struct.unpack(">II", wal[off:off + 8])
                frames.append([i + 1, pgno, commit, hashlib.sha256(wal[off + 24:off + 24 + ps]).hexdigest()])
        print(json.dumps(frames))
        """
    )
    return [Frame(*f) for f in json.loads(out)]


def padding_frames(frames: list[Frame]) -> int:
    """Commit frames that repeat the previous commit frame exactly (WAL.md §D.4 step 7)."""
    n = 0
    for prev, cur in zip(frames, frames[1:]):
        if prev.commit_size and cur.commit_size and (prev.pgno, prev.commit_size, prev.digest) == (
            cur.pgno,
            cur.commit_size,
            cur.digest,
        ):
            n += 1
    return n

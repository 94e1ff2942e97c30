"""Checks shared by the test_capture_*.py files (primary-side capture, wal-spec D and G11-G23).

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
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
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


def inspect(db: str | os.PathLike[str]) -> list[LogRecord]:
    """``sqlite-replica inspect <db>-replica`` parsed: one LogRecord per log record."""
    proc = run_cli("inspect", log_dir(db))
    assert proc.returncode == 0, f"inspect failed ({proc.returncode}): {proc.stderr}"
    out = []
    for line in proc.stdout.splitlines():
        f = line.split()
        assert len(f) == 7, f"unexpected inspect line: {line!r}"
        out.append(LogRecord(int(f[0]), int(f[1]), f[2], int(f[3]), int(f[4]), f[5]))
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
        page_size, pages = walutil.logical_pages(str(db))
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


# ---------------------------------------------------------------------------------- WAL frames


@dataclass
class Frame:
    no: int
    pgno: int
    commit_size: int
    data: bytes


def wal_frames(db: str | os.PathLike[str], upto: int | None = None) -> list[Frame]:
    """The frames 1..upto (default: the wal-index mxFrame) of ``<db>-wal`` (format: wal-spec A)."""
    if upto is None:
        h = walutil.shm_header(str(db))
        upto = h[0] if h else 0
    with open(f"{db}-wal", "rb") as f:
        wal = f.read()
    if upto == 0 or len(wal) < 32:
        return []
    ps = struct.unpack(">I", wal[8:12])[0]
    out = []
    for i in range(upto):
        off = 32 + i * (24 + ps)
        pgno, commit = struct.unpack(">II", wal[off:off + 8])
        out.append(Frame(i + 1, pgno, commit, wal[off + 24:off + 24 + ps]))
    return out


def padding_frames(frames: list[Frame]) -> int:
    """Commit frames that repeat the previous commit frame exactly (wal-spec D.4 step 7)."""
    n = 0
    for prev, cur in zip(frames, frames[1:]):
        if prev.commit_size and cur.commit_size and (prev.pgno, prev.commit_size, prev.data) == (
            cur.pgno,
            cur.commit_size,
            cur.data,
        ):
            n += 1
    return n

"""Same-process safety (WAL.md §G21, §C.1): the applier and a stock SQLite connection on the
replica live in ONE process, and no lock of that process is lost.

POSIX ``fcntl`` locks belong to the process, not to a file descriptor, and closing ANY
descriptor of a file drops every lock the process holds on it. An applier that opened and
closed the replica's database or ``-shm`` with raw ``open()``/``close()`` would silently drop the
SHARED lock and the WAL read lock of the other connections of its process: a checkpointer in
another process could then truncate the WAL under an open reader, or a connection could take the
database exclusively. Likewise an applier that locked WAL slots through a private descriptor
would not see the same-process reader and could restart the WAL under it. (The unix VFS avoids
both inside SQLite: one descriptor per inode and per-process lock counting.)

One child process ("same") holds a stock connection (apsw, ``vfs='unix'``) inside
``BEGIN; SELECT …`` and, through the extension, runs ``repl_sync()`` while the primary writes —
bootstrapping or loading, appending, the applier's own checkpoints, closing and reopening its
connection — with the reader opened after the applier (``applier_first``) or before the
extension attached to the replica in that process (``reader_first``). Between the steps this
pytest process, which holds no lock on the replica (so its own opens and closes disturb
nobody), asks the kernel with ``F_GETLK`` whether the child still holds its locks, and tries to
take them itself; a stock process tries exclusive locking mode and a TRUNCATE checkpoint. A
final control shows the check is sharp: one raw open+close in the child and the kernel reports
the locks gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import textwrap

import pytest

from helpers import (
    SNAP_SQL, PyChild, assert_replica_equals_primary, durable, lsn_checksum, primary_snap, shm_state, sqlite3_cli, start_primary,
    start_replica, stock_one, sync_to, wait_for,
)

# SQLite unix VFS lock bytes (os_unix.c; WAL.md §C.1, §C.2).
PENDING_BYTE = 0x40000000
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510
SHM_LOCK_BASE = 120  # slot i <-> -shm byte 120 + i
SLOT_READ0 = 3  # WAL_READ_LOCK(i) = 3 + i
SHM_DMS = 128
FLOCK = "hhqqi4x"  # struct flock on Linux x86_64/aarch64: l_type, l_whence, l_start, l_len, l_pid

# ------------------------------------------------------------------ the same-process child

SAME_PY = textwrap.dedent(
    """\
    cfg = json.loads(sys.stdin.readline())
    rdb = cfg["rdb"]
    conns = {}
    def open_conn(name):
        if name == "stock":  # plain SQLite on the unix VFS, as an application would open it
            c = apsw.Connection(rdb, flags=apsw.SQLITE_OPEN_READWRITE, vfs="unix")
        else:  # through the extension (its VFS is the process default once loaded)
            c = connect(rdb)
        c.setbusytimeout(5000)
        conns[name] = c
        return c.open_vfs
    load()
    print(json.dumps({"ok": "ready", "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            op = req["op"]
            if op == "open":
                out = {"rows": [[open_conn(req["conn"])]]}
            elif op == "close":
                conns.pop(req["conn"]).close()
                out = {"rows": []}
            elif op == "sql":
                out = {"rows": [list(r) for r in conns[req["conn"]].execute(req["sql"], req.get("args", []))]}
            elif op == "raw_open_close":  # the control: exactly what an applier must never do
                os.close(os.open(req["path"], os.O_RDONLY))
                out = {"rows": []}
            else:
                out = {"error": "BadRequest", "msg": op}
        except apsw.Error as e:
            out = {"error": type(e).__name__, "msg": str(e)}
        print(json.dumps(out), flush=True)
    """
)


class SameProcess(PyChild):
    """One child process with named connections on the replica: ``stock`` (unix VFS) and
    ``ext`` (through the extension, the applier)."""

    what = "same-process child"

    def __init__(self, rdb):
        self.rdb = str(rdb)
        super().__init__(SAME_PY, {"rdb": self.rdb})

    def open(self, conn: str) -> str:
        """Open connection ``conn``; returns its VFS name."""
        return self._send({"op": "open", "conn": conn})[0][0]

    def close_conn(self, conn: str) -> None:
        self._send({"op": "close", "conn": conn})

    def q(self, conn: str, sql: str, args=()) -> list:
        return self._send({"op": "sql", "conn": conn, "sql": sql, "args": list(args)})

    def raw_open_close(self, path: str) -> None:
        self._send({"op": "raw_open_close", "path": path})

    # the applier side
    def sync_to(self, lsn: int) -> int:
        return wait_for(
            lambda: (got := self.q("ext", "SELECT repl_sync()")[0][0]) >= lsn and got,
            timeout=30,
            interval=0.01,
            what=f"the same-process applier reaching LSN {lsn}",
        )

    def lsn_checksum(self) -> tuple[int, str]:
        lsn, ck = self.q("ext", "SELECT repl_lsn(), repl_checksum()")[0]
        return lsn, ck

    def status(self) -> dict:
        return json.loads(self.q("ext", "SELECT repl_status()")[0][0])

    # the stock reader
    def snap(self) -> tuple:
        c, s, m = self.q("stock", SNAP_SQL)[0]
        return int(c), float(s), int(m)


# ---------------------------------------------------------------- lock checks (this process)


def getlk(path: str, start: int, length: int = 1) -> dict | None:
    """Who holds a lock that conflicts with a WRITE lock on ``[start, start+length)`` of
    ``path`` (kernel F_GETLK), or None. Only meaningful because this process holds no locks on
    the file itself: opening and closing a descriptor here drops nothing of anybody's."""
    fd = os.open(path, os.O_RDWR)
    try:
        req = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        l_type, _, l_start, l_len, l_pid = struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, req))
    finally:
        os.close(fd)
    if l_type == fcntl.F_UNLCK:
        return None
    return {"mode": "shared" if l_type == fcntl.F_RDLCK else "exclusive", "pid": l_pid, "start": l_start, "len": l_len}


def can_write_lock(path: str, start: int, length: int) -> bool:
    """Try (non-blocking) to take a POSIX write lock there; released at once by the close."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
        return True
    except OSError as e:
        assert e.errno in (errno.EACCES, errno.EAGAIN), e
        return False
    finally:
        os.close(fd)


def locks(rdb) -> dict:
    shm = f"{rdb}-shm"
    return {
        "db_shared": getlk(str(rdb), SHARED_FIRST, SHARED_SIZE),
        "read": {i: getlk(shm, SHM_LOCK_BASE + SLOT_READ0 + i) for i in range(5)},
        "dms": getlk(shm, SHM_DMS),
    }


def assert_reader_locks_held(rdb, pid: int, slot: int | None = None) -> int:
    """The child ``pid`` still holds, in the kernel: SHARED on the database, a WAL read lock
    (READ_i, shared) on the -shm and the DMS lock. Returns i."""
    got = locks(rdb)
    shared = {"mode": "shared", "pid": pid}
    held = lambda lk: lk is not None and {"mode": lk["mode"], "pid": lk["pid"]} == shared  # noqa: E731
    assert held(got["db_shared"]), f"the process lost its SHARED lock on the database: {got}"
    assert held(got["dms"]), f"the process lost its DMS lock on the -shm: {got}"
    slots = [i for i, lk in got["read"].items() if held(lk)]
    assert slots, f"the open reader's WAL read lock is gone: {got}"
    if slot is None:
        assert len(slots) == 1, f"more than one WAL read lock held while idle: {got}"
        slot = slots[0]
    assert slot in slots, f"the reader's READ{slot} lock is gone: {got}"
    # Nobody else gets them: the kernel refuses a write lock to this (pytest) process.
    assert not can_write_lock(str(rdb), SHARED_FIRST, SHARED_SIZE), "another process could lock the SHARED range exclusively"
    assert not can_write_lock(f"{rdb}-shm", SHM_LOCK_BASE + SLOT_READ0 + slot, 1), f"another process could take READ{slot}"
    return slot


# ----------------------------------------------------------------------------------- helpers


def stock_cli(db, sql: str, timeout_ms: int = 200):
    """A fresh stock sqlite3 3.40 (no extension) with a short busy timeout."""
    return sqlite3_cli(db, sql, load=False, args=["-cmd", f".timeout {timeout_ms}"])


ROWS = 1200  # one row per page: the big update below is > 1000 frames (the applier checkpoints)


def setup(tmp):
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    p = start_primary(pdb)
    p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v REAL, pad BLOB)")
    p.q(
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < ?) "
        "INSERT INTO t(v, pad) SELECT n, randomblob(3000) FROM c",
        [ROWS],
    )
    # Records are served once the group fsync made them durable: the replica's first
    # repl_sync() below must find the last commit served.
    durable(p)
    return pdb, rdb, p


# -------------------------------------------------------------------------------------- test


@pytest.mark.parametrize("order", ["applier_first", "reader_first"])
def test_applier_and_a_stock_reader_in_one_process_lose_no_locks(tmp, order):
    pdb, rdb, p = setup(tmp)
    same = r = None
    try:
        if order == "applier_first":
            same = SameProcess(rdb)
            assert same.open("ext") == "replica"
            assert same.q("ext", "SELECT repl_sync(?)", [str(pdb)])[0][0] == lsn_checksum(p)[0]  # bootstrap
            p.q("UPDATE t SET v = v + 1 WHERE id % 10 = 0")
            same.sync_to(lsn_checksum(p)[0])  # frames in the WAL: the reader below takes READ_i
            assert same.open("stock") == "unix"
            same.q("stock", "BEGIN")
            before = same.snap()
        else:
            # Another process bootstraps and appends, then dies (SIGKILL keeps WAL and -shm).
            r = start_replica(rdb, pdb)
            p.q("UPDATE t SET v = v + 1 WHERE id % 10 = 0")
            sync_to(r, lsn_checksum(p)[0])
            r.kill()
            same = SameProcess(rdb)
            assert same.open("stock") == "unix"
            same.q("stock", "BEGIN")
            before = same.snap()
            assert_reader_locks_held(rdb, same.pid)
            # Only now does the extension attach to the replica in this process (its own
            # database handle, its stock connection, its WAL descriptor).
            assert same.open("ext") == "replica"
            assert same.lsn_checksum() == lsn_checksum(p)
        assert before == primary_snap(p), "the reader does not see the replicated state"
        assert shm_state(rdb)["mx_frame"] > 0
        slot = assert_reader_locks_held(rdb, same.pid)
        assert slot >= 1, "the reader should be on READ_i (i >= 1): frames were in the WAL when it began"

        # Everything is backfilled up to the reader's mark: the next apply would restart the WAL
        # if it could take READ1..4 — it must see the same-process reader and append instead.
        out = stock_one(rdb, "PRAGMA wal_checkpoint(PASSIVE);")
        busy, log, ckpt = (int(x) for x in out.split("|"))
        assert busy == 0 and log == ckpt > 0, out
        pinned = shm_state(rdb)
        assert pinned["n_backfill"] == pinned["mx_frame"], pinned

        for i in range(5):
            if i == 2:  # > 1000 frames: the applier checkpoints (PASSIVE) from this process too
                p.q("UPDATE t SET pad = randomblob(3000), v = v + 0.5")
            else:
                p.script(["BEGIN", f"INSERT INTO t(v, pad) VALUES ({-i}, randomblob(100))", "UPDATE t SET v = v * 2 WHERE id < 20", "COMMIT"])
            if i in (1, 3):  # the applier's connection closed and reopened under the reader
                same.close_conn("ext")
                assert_reader_locks_held(rdb, same.pid, slot)
                same.open("ext")
            want = lsn_checksum(p)
            same.sync_to(want[0])
            assert same.lsn_checksum() == want, f"round {i}: the replica's checksum differs from the primary's"
            now = shm_state(rdb)
            assert now["salts"] == pinned["salts"] and now["mx_frame"] > pinned["mx_frame"], (
                f"round {i}: the WAL was restarted under the same process's reader: {pinned} -> {now}"
            )
            assert same.snap() == before, f"round {i}: the open read transaction changed"
            assert_reader_locks_held(rdb, same.pid, slot)
        st = same.status()
        assert st["checkpoints"] >= 1, f"the applier never checkpointed: {st}"
        assert st["resnapshots"] == 0 and st["foreign_writes"] == 0 and st["last_error"] is None, st

        # Another process cannot get the database exclusively...
        proc = stock_cli(rdb, "PRAGMA locking_mode = EXCLUSIVE;\nSELECT count(*) FROM t;")
        assert proc.returncode != 0 and "database is locked" in proc.stderr, (
            f"exclusive locking mode succeeded beside an open reader: rc {proc.returncode} {proc.stdout!r} {proc.stderr!r}"
        )
        # ...nor truncate the WAL under the open reader.
        frames, wal = shm_state(rdb), os.path.getsize(f"{rdb}-wal")
        proc = stock_cli(rdb, "PRAGMA wal_checkpoint(TRUNCATE);", timeout_ms=300)
        assert proc.returncode == 0, proc.stderr
        busy, log, ckpt = (int(x) for x in proc.stdout.split("|"))
        assert busy == 1 and ckpt < log, f"TRUNCATE completed beside a reader on READ{slot}: {proc.stdout!r}"
        assert os.path.getsize(f"{rdb}-wal") == wal > 0, "the WAL was truncated under the open reader"
        after = shm_state(rdb)
        assert (after["mx_frame"], after["salts"]) == (frames["mx_frame"], frames["salts"]), (frames, after)
        assert same.snap() == before, "the open read transaction changed after the TRUNCATE attempt"
        assert_reader_locks_held(rdb, same.pid, slot)

        # The reader ends: it sees the new state; its connection (still open) keeps SHARED.
        same.q("stock", "COMMIT")
        assert same.snap() == primary_snap(p), "after COMMIT the same-process reader does not see the new state"
        got = locks(rdb)
        assert got["db_shared"] and got["db_shared"]["pid"] == same.pid, got
        assert all(lk is None for lk in got["read"].values()), f"a WAL read lock outlived the transaction: {got}"
        assert_replica_equals_primary(rdb, p)

        # Control: the check above is sharp. One raw open+close of each file in the child (what
        # an applier must never do) and the kernel no longer shows any of its locks.
        same.q("stock", "BEGIN")
        assert same.snap() == primary_snap(p)
        assert_reader_locks_held(rdb, same.pid)
        same.raw_open_close(f"{rdb}-shm")
        same.raw_open_close(str(rdb))
        lost = locks(rdb)
        assert lost["db_shared"] is None and lost["dms"] is None and all(v is None for v in lost["read"].values()), (
            f"a raw open+close did not drop the locks, so the check above proves nothing: {lost}"
        )
    finally:
        if same is not None:
            same.kill()  # after the control its SQLite state no longer matches the kernel's
        if r is not None:
            r.kill()
        p.close()

"""Recovery of the replica's wal-index (WAL.md §G14, §C.8, §E.2 step 3), every party in its own
process: a primary, the applier (a worker that stays alive and idle between ``repl_sync()``
calls), stock readers without the extension (``/usr/bin/sqlite3`` 3.40.1 and apsw 3.54 on the
plain unix VFS) and stock checkpointers.

The wal-index (``<replica>-shm``) is never fsynced and may be rebuilt from the WAL by anyone at
any time (a missing, truncated or invalid header ⇒ stock recovery). Recovery gives the same
mxFrame, salts and frame checksum — the WAL is the truth — but resets iChange to 0, nBackfill to
0 and the read-marks. The applier must accept that header as its own (no foreign-write alarm,
no re-snapshot), append after it, and keep restarting the WAL when a checkpoint completes:

- (a) the test damages the header (zeroed, copies differing, bad checksum) and a reader meets
  it first and recovers: the stock shell, stock apsw, a process reading through the
  extension's VFS (which keeps replica connections read-only but must let them recover), or
  the applier process's own connection;
- (b) nobody reads in between: the applier's next ``repl_sync()`` meets the invalid header,
  has its own stock connection recover it, and continues (no hang); likewise when its first
  call is ``repl_checksum()``, and when a stock reader holds a snapshot across it;
- (c) the read-mark slots are reset to junk while no reader is active;
- (d) every replica process gone, the ``-shm`` deleted or truncated to 0 bytes: the first
  opener (a stock reader, a reader through the extension, or the applier itself) rebuilds it
  from the WAL.

The damage is done by this pytest process with plain file writes; it holds no SQLite connection
on the replica, so opening and closing ``-shm`` here drops nobody's POSIX locks, and the other
processes see the bytes at once through their shared mapping.
"""

from __future__ import annotations

import os
import struct
import sys

import pytest

from helpers import (
    SNAP_SQL, CliWorker, Worker, assert_replica_equals_primary, cli_snap, commit_and_sync, lsn_checksum, new_pair,
    primary_snap, stock_checkpoint, stock_snap, sync_to, worker_status,
)

READMARK_UNUSED = 0xFFFFFFFF

assert sys.byteorder == "little", "the wal-index parsing below assumes a little-endian host"


# ------------------------------------------------------------------------ wal-index bytes


def hdr_cksum(b: bytes) -> tuple[int, int]:
    """WAL.md §A.3 checksum, native (LE) word order, initial (0, 0), over ``b`` (40 bytes)."""
    s1 = s2 = 0
    for i in range(0, len(b), 8):
        x0, x1 = struct.unpack_from("<II", b, i)
        s1 = (s1 + x0 + s2) & 0xFFFFFFFF
        s2 = (s2 + x1 + s1) & 0xFFFFFFFF
    return s1, s2


# The WAL.md §B.2 test vector: our validity check must agree with it before we trust it.
_VEC = bytes.fromhex("18e22d00 00000000 07000000 01 00 0010 02000000 03000000 11111111 22222222 0102030405060708".replace(" ", ""))
assert hdr_cksum(_VEC) == (0xCE5F4DEB, 0x5D5D1364)


def shm_info(db) -> dict:
    """The replica's wal-index header (first copy), whether stock readers accept it (§B.2: copies
    identical, isInit, checksum), and the checkpoint information (§B.4)."""
    with open(f"{db}-shm", "rb") as f:
        b = f.read(136)
    assert len(b) == 136, f"-shm is only {len(b)} bytes"
    change, is_init = struct.unpack_from("<IB", b, 8)
    mx_frame, n_page, ck0, ck1 = struct.unpack_from("<IIII", b, 16)
    valid = b[0:48] == b[48:96] and is_init != 0 and hdr_cksum(b[0:40]) == struct.unpack_from("<II", b, 40)
    return {
        "valid": valid,
        "version": struct.unpack_from("<I", b, 0)[0],
        "change": change,
        "mx_frame": mx_frame,
        "n_page": n_page,
        "frame_cksum": (ck0, ck1),
        "salts": b[32:40].hex(),
        "n_backfill": struct.unpack_from("<I", b, 96)[0],
        "read_marks": list(struct.unpack_from("<5I", b, 100)),
    }


def wal_key(info: dict) -> tuple:
    """What recovery must reproduce from the WAL: (mxFrame, salts, running checksum)."""
    return info["mx_frame"], info["salts"], info["frame_cksum"]


def pwrite_shm(db, offset: int, data: bytes) -> None:
    fd = os.open(f"{db}-shm", os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def damage_header(db, how: str) -> None:
    """Make the wal-index header invalid the ways §C.8 lists, without touching the rest."""
    with open(f"{db}-shm", "rb") as f:
        b = bytearray(f.read(96))
    if how == "zeroed":  # both copies gone (isInit 0)
        b[:] = bytes(96)
    elif how == "copies_differ":  # copy 2 says another iChange (a "torn publish")
        struct.pack_into("<I", b, 56, struct.unpack_from("<I", b, 56)[0] + 1)
    elif how == "bad_checksum":  # identical copies whose aCksum does not match
        for base in (0, 48):
            b[base + 40] ^= 0xFF
    else:
        raise ValueError(how)
    pwrite_shm(db, 0, bytes(b))
    assert not shm_info(db)["valid"], f"damage {how!r} left a valid header"


DAMAGE = ["zeroed", "copies_differ", "bad_checksum"]


# ------------------------------------------------------------------------------- parties


def some_txns(p, r, n: int, tag: int) -> tuple[int, str]:
    want = None
    for i in range(n):
        want = commit_and_sync(
            p,
            r,
            [f"INSERT INTO t(v, pad) VALUES ({tag + i}, randomblob(2000))", f"UPDATE t SET v = v + 1 WHERE id % 4 = {i % 4}"],
        )
    return want


def checkpoint_then_restart(p, r, rdb, before: dict, tag: int, after_what: str) -> tuple[int, str]:
    """A stock PASSIVE checkpoint backfills every frame of ``before`` (the wal-index as it was);
    then one more primary transaction, and the applier has restarted the WAL (new salts, fewer
    frames) without a re-snapshot. Returns the primary's (lsn, checksum)."""
    busy, log, ckpt = stock_checkpoint(rdb, "PASSIVE")
    assert busy == 0 and log == ckpt == before["mx_frame"], (busy, log, ckpt, before)
    want = some_txns(p, r, 1, tag)
    after = shm_info(rdb)
    assert after["salts"] != before["salts"] and after["mx_frame"] < before["mx_frame"], (
        f"no WAL restart after {after_what}: {before} -> {after}"
    )
    assert_clean_status(r)
    return want


def assert_clean_status(r, before: dict | None = None) -> dict:
    st = worker_status(r)
    assert st["resnapshots"] == 0, f"the applier re-snapshotted although only the wal-index was rebuilt: {st}"
    assert st["foreign_writes"] == 0, f"a rebuilt wal-index was taken for a foreign write: {st}"
    assert st["last_error"] is None, st
    if before is not None:
        assert st["batches"] > before["batches"], f"the applier wrote nothing: {before} -> {st}"
    return st


# ------------------------------------------------------------------------------------ (a)


class Recoverer:
    """Whoever reads first after the damage, and so runs §C.8 recovery: the stock shell, stock
    apsw (unix VFS), another process reading through the extension's VFS (a replica connection,
    which the VFS keeps read-only but must let recover), or the applier process's own
    connection."""

    def __init__(self, kind: str, rdb, applier):
        self.kind = kind
        self.own = kind == "applier_conn"
        if kind == "sqlite3-3.40":
            self.w = CliWorker(rdb)
        elif kind == "apsw-3.54":
            self.w = Worker(rdb, ext=False)
        elif kind == "ext_reader":
            self.w = Worker(rdb)
        else:
            self.w = applier

    def snap(self) -> tuple:
        return cli_snap(self.w) if self.kind == "sqlite3-3.40" else primary_snap(self.w)

    def close(self) -> None:
        if not self.own:
            self.w.close()


@pytest.mark.parametrize("recoverer", ["sqlite3-3.40", "apsw-3.54", "ext_reader", "applier_conn"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_reader_recovers_a_damaged_wal_index_and_the_applier_continues(tmp, damage, recoverer):
    with new_pair(tmp, rows=20, pad=300) as (pdb, rdb, p, r):
        some_txns(p, r, 3, 100)
        good = shm_info(rdb)
        assert good["valid"] and good["mx_frame"] > 0, good
        damage_header(rdb, damage)

        # A reader meets the invalid header first: §C.8 recovery from the WAL.
        reader = Recoverer(recoverer, rdb, r)
        try:
            assert reader.snap() == primary_snap(p), "the reader that recovered the wal-index sees other content"
        finally:
            reader.close()
        rec = shm_info(rdb)
        assert rec["valid"], f"the reader did not rebuild the header: {rec}"
        assert wal_key(rec) == wal_key(good), f"recovery found another WAL end than the applier published: {good} -> {rec}"
        assert rec["change"] == 0 < good["change"], f"iChange was not reset (WAL.md §B.2), so no recovery ran: {good} -> {rec}"
        assert rec["n_backfill"] == 0, rec
        assert_replica_equals_primary(rdb, p)

        # The same applier process (alive and idle all along) continues after the rebuilt header.
        st0 = worker_status(r)
        some_txns(p, r, 2, 200)
        st = assert_clean_status(r, st0)
        new = shm_info(rdb)
        assert new["valid"] and new["salts"] == rec["salts"] and new["mx_frame"] > rec["mx_frame"], (
            f"the applier did not append after the recovered header: {rec} -> {new}"
        )
        assert new["change"] == rec["change"] + (st["batches"] - st0["batches"]), (
            f"iChange must continue from the recovered value (+1 per commit): {rec} -> {new}, {st0} -> {st}"
        )
        assert_replica_equals_primary(rdb, p)

        # Recovery reset nBackfill and the read-marks: a checkpoint + restart still works.
        want = checkpoint_then_restart(p, r, rdb, new, 300, "a complete checkpoint over the recovered wal-index")
        with Worker(rdb) as fresh:  # repl_checksum() recomputed from the files by a new process
            assert lsn_checksum(fresh) == want
        assert_replica_equals_primary(rdb, p)


# ------------------------------------------------------------------------------------ (b)


@pytest.mark.parametrize("wal", ["frames", "truncated"], ids=["wal_with_frames", "wal_truncated"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_applier_meets_a_damaged_wal_index_itself_and_continues(tmp, damage, wal):
    with new_pair(tmp, rows=20, pad=300) as (pdb, rdb, p, r):
        some_txns(p, r, 3, 100)
        if wal == "truncated":  # mxFrame 0 and a 0-byte WAL: recovery finds nothing at all
            busy, _, _ = stock_checkpoint(rdb, "TRUNCATE")
            assert busy == 0 and os.path.getsize(f"{rdb}-wal") == 0
        good = shm_info(rdb)
        assert good["valid"], good
        damage_header(rdb, damage)
        st0 = worker_status(r)

        # Nobody reads in between: the applier's next sync meets the invalid header itself.
        p.q("INSERT INTO t(v, pad) VALUES (-1, randomblob(5000))")
        want = lsn_checksum(p)
        sync_to(r, want[0], timeout=15)
        assert lsn_checksum(r) == want, "the replica's checksum differs from the primary's at the same LSN"
        st = assert_clean_status(r, st0)
        new = shm_info(rdb)
        assert new["valid"], f"the applier left an invalid header: {new}"
        # Recovery reset iChange to 0 (§B.2); the applier's commits count on from there.
        assert new["change"] == st["batches"] - st0["batches"] < good["change"], (
            f"the header was not rebuilt by recovery before the applier appended: {good} -> {new}, {st0} -> {st}"
        )
        if wal == "frames":
            assert new["salts"] == good["salts"] and new["mx_frame"] > good["mx_frame"], (
                f"the applier did not append after the recovered header: {good} -> {new}"
            )
        else:
            assert new["mx_frame"] > 0 and os.path.getsize(f"{rdb}-wal") > 0, new
        assert st["wal"]["mx_frame"] == new["mx_frame"], (st, new)
        assert_replica_equals_primary(rdb, p)

        # And keeps going.
        want = some_txns(p, r, 2, 200)
        assert_clean_status(r)
        with Worker(rdb) as fresh:
            assert lsn_checksum(fresh) == want
        assert_replica_equals_primary(rdb, p)


@pytest.mark.parametrize("damage", DAMAGE)
def test_repl_checksum_over_a_damaged_wal_index_recovers_instead_of_failing(tmp, damage):
    """The applier process's first call after the damage is ``repl_checksum()`` (which reads
    the live content), not a sync: it too must recover and report the applied state."""
    with new_pair(tmp, rows=20, pad=300) as (pdb, rdb, p, r):
        want = some_txns(p, r, 3, 100)
        good = shm_info(rdb)
        damage_header(rdb, damage)
        assert lsn_checksum(r) == want, "repl_checksum() over a rebuilt wal-index differs"
        rec = shm_info(rdb)
        assert rec["valid"] and wal_key(rec) == wal_key(good), f"recovery differs: {good} -> {rec}"
        want = some_txns(p, r, 2, 200)
        assert_clean_status(r)
        assert_replica_equals_primary(rdb, p)


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_wal_index_while_a_reader_holds_a_snapshot(tmp, damage):
    """Beyond (b): a stock reader is inside BEGIN when the header is damaged. The recovery run
    for the applier's next sync cannot reset the read-mark the reader holds; the reader keeps
    its view while the applier appends, and sees the new state after COMMIT."""
    with new_pair(tmp, rows=20, pad=300) as (pdb, rdb, p, r):
        reader = CliWorker(rdb)
        try:
            some_txns(p, r, 3, 100)
            reader.q("BEGIN;")
            before = cli_snap(reader)
            assert before == primary_snap(p)
            good = shm_info(rdb)
            damage_header(rdb, damage)
            st0 = worker_status(r)
            some_txns(p, r, 2, 200)
            st = assert_clean_status(r, st0)
            new = shm_info(rdb)
            assert new["valid"] and new["salts"] == good["salts"] and new["mx_frame"] > good["mx_frame"], (good, new)
            assert new["change"] == st["batches"] - st0["batches"], f"no recovery ran (iChange not reset to 0): {good} -> {new}"
            assert cli_snap(reader) == before, "the open read transaction changed across recovery + apply"
            reader.q("COMMIT;")
            assert cli_snap(reader) == primary_snap(p), "after COMMIT the reader does not see the new state"
            assert_replica_equals_primary(rdb, p)
        finally:
            reader.close()


# ------------------------------------------------------------------------------------ (c)


def junk_marks(how: str, mx_frame: int) -> list[int]:
    if how == "unused":
        return [READMARK_UNUSED] * 4
    if how == "zero":
        return [0] * 4
    if how == "stale":  # below mxFrame: readers must move them before using them
        return [1, 1, 1, 1]
    if how == "future":  # above mxFrame: no reader may use them
        return [mx_frame + 1000 + i for i in range(4)]
    raise ValueError(how)


@pytest.mark.parametrize("how", ["unused", "zero", "stale", "future"])
def test_read_marks_reset_while_no_reader_is_active(tmp, how):
    with new_pair(tmp, rows=20, pad=300) as (pdb, rdb, p, r):
        reader = None
        try:
            some_txns(p, r, 3, 100)
            st = shm_info(rdb)
            assert st["mx_frame"] > st["n_backfill"], st
            marks = junk_marks(how, st["mx_frame"])
            pwrite_shm(rdb, 104, struct.pack("<4I", *marks))  # read-mark[1..4]; read-mark[0] stays 0
            assert shm_info(rdb)["read_marks"][1:] == marks

            # A reader starts over the junk marks and holds its snapshot while the applier publishes.
            reader = CliWorker(rdb)
            reader.q("BEGIN;")
            before = cli_snap(reader)
            assert before == primary_snap(p), "a reader over reset read-marks sees other content"
            some_txns(p, r, 2, 200)
            assert cli_snap(reader) == before, "the open read transaction changed while the applier published"
            assert stock_snap(rdb) == primary_snap(p), "a new reader does not see the new state"

            # A checkpoint cannot overtake the reader (its read-mark was re-established), and the
            # applier, though the reader pins the WAL, appends instead of restarting under it.
            stock_checkpoint(rdb, "PASSIVE")
            held = shm_info(rdb)
            some_txns(p, r, 1, 300)
            now = shm_info(rdb)
            assert now["salts"] == held["salts"] and now["mx_frame"] > held["mx_frame"], (
                f"the WAL was restarted under an open reader: {held} -> {now}"
            )
            assert cli_snap(reader) == before, "the open read transaction changed"
            reader.q("COMMIT;")
            assert cli_snap(reader) == primary_snap(p), "after COMMIT the reader does not see the new state"
            reader.close()
            reader = None

            # With the reader gone a complete checkpoint lets the applier restart the WAL again.
            want = checkpoint_then_restart(p, r, rdb, now, 400, "the reader left and a checkpoint completed")
            assert lsn_checksum(r) == want
            assert_replica_equals_primary(rdb, p)
        finally:
            if reader is not None:
                reader.close()


# ------------------------------------------------------------------------------------ (d)


@pytest.mark.parametrize("opener", ["stock_reader", "ext_reader", "applier"])
@pytest.mark.parametrize("shm", ["deleted", "truncated"])
def test_wal_index_gone_while_every_replica_process_is_closed(tmp, shm, opener):
    with new_pair(tmp, rows=20, pad=300) as (pdb, rdb, p, r):
        holder = None
        try:
            want = some_txns(p, r, 3, 100)
            good = shm_info(rdb)
            assert good["mx_frame"] > 0
            # SIGKILL, not close: a polite last close would checkpoint and delete the WAL and the
            # wal-index itself. Killed, the WAL keeps the frames and the -shm stays as it was.
            r.kill()
            wal_size = os.path.getsize(f"{rdb}-wal")
            assert wal_size > 0
            if shm == "deleted":
                os.remove(f"{rdb}-shm")
            else:
                os.truncate(f"{rdb}-shm", 0)

            if opener != "applier":
                # The first opener (stock apsw, or a reader through the extension's VFS) rebuilds the
                # wal-index from the WAL and stays open, so the applier below attaches to the rebuilt
                # one. ("applier": the new applier process is the first opener and rebuilds it.)
                holder = Worker(rdb, ext=opener == "ext_reader")
                assert tuple(holder.q(SNAP_SQL)[0]) == tuple(p.q(SNAP_SQL)[0]), "the recovering reader sees other content"
                rec = shm_info(rdb)
                assert rec["valid"] and wal_key(rec) == wal_key(good), f"recovery from the WAL differs: {good} -> {rec}"
                assert_replica_equals_primary(rdb, p)

            r = Worker(rdb)  # a new applier process on the existing replica
            assert lsn_checksum(r) == want, "the new applier process does not find the replicated position"
            rec = shm_info(rdb)
            assert rec["valid"] and wal_key(rec) == wal_key(good), f"recovery from the WAL differs: {good} -> {rec}"
            assert os.path.getsize(f"{rdb}-wal") == wal_size, "the WAL changed before anything new was applied"
            st0 = worker_status(r)
            want = some_txns(p, r, 2, 200)
            assert_clean_status(r, st0)
            new = shm_info(rdb)
            assert new["salts"] == rec["salts"] and new["mx_frame"] > rec["mx_frame"], (
                f"the applier did not append after the rebuilt wal-index: {rec} -> {new}"
            )
            if holder is not None:
                assert tuple(holder.q(SNAP_SQL)[0]) == tuple(p.q(SNAP_SQL)[0]), "the stock reader does not see the new state"
            with Worker(rdb) as fresh:
                assert lsn_checksum(fresh) == want
            assert_replica_equals_primary(rdb, p)
        finally:
            if holder is not None:
                holder.close()
            r.close()

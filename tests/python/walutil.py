"""An independent, minimal reader of a live SQLite database's logical pages (db file + WAL
frames up to the wal-index's mxFrame), written from the file-format docs for the tests. It
shares no code with the extension, so comparing its output with what the extension logged is an
honest check. Use it only while writers are frozen (e.g. inside BEGIN IMMEDIATE).

The raw reads run in a CHILD process: closing any file descriptor of the db or -shm drops every
POSIX lock the calling process holds on it (the capture agent's SHARED lock, WAL locks), which
would let a foreign process checkpoint and delete the WAL under a live primary."""

import os
import struct


def shm_header(db_path):
    """(mx_frame, n_page, salts) from the first valid wal-index header copy, or None."""
    try:
        with open(db_path + "-shm", "rb") as f:
            b = f.read(96)
    except FileNotFoundError:
        return None
    if len(b) < 96 or b[0:48] != b[48:96] or b[12] == 0:
        return None
    mx_frame, n_page = struct.unpack("<II", b[16:24])
    return mx_frame, n_page, b[32:40]


def logical_pages(db_path):
    """(page_size, [page images]) of the database as readers currently see it, read in a child
    process (see the module docstring)."""
    import pickle
    import subprocess
    import sys
    code = ("import pickle, sys; sys.path.insert(0, %r); import walutil; "
            "sys.stdout.buffer.write(pickle.dumps(walutil._logical_pages_here(%r)))"
            % (os.path.dirname(os.path.abspath(__file__)), str(db_path)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    return pickle.loads(out)


def _logical_pages_here(db_path):
    """In-process reader; only for a process that holds no SQLite connection on db_path."""
    with open(db_path, "rb") as f:
        head = f.read(100)
        ps = struct.unpack(">H", head[16:18])[0]
        ps = 65536 if ps == 1 else ps
        f.seek(0)
        data = f.read()
    h = shm_header(db_path)
    n_pages = len(data) // ps
    frames = {}
    if h and h[0] > 0:
        mx, n_page, salts = h
        n_pages = n_page
        with open(db_path + "-wal", "rb") as w:
            wal = w.read(32 + mx * (24 + ps))
        for i in range(mx):
            off = 32 + i * (24 + ps)
            pgno = struct.unpack(">I", wal[off:off + 4])[0]
            assert wal[off + 8:off + 16] == salts, "frame salts differ from the wal-index"
            frames[pgno] = wal[off + 24:off + 24 + ps]
    else:
        n_pages = struct.unpack(">I", head[28:32])[0] if len(data) >= 100 else 0
    pages = []
    lock_page = (0x40000000 // ps) + 1
    for p in range(1, n_pages + 1):
        if p == lock_page:
            pages.append(b"\0" * ps)
        elif p in frames:
            pages.append(frames[p])
        else:
            pages.append(data[(p - 1) * ps:p * ps].ljust(ps, b"\0"))
    return ps, pages


def file_pages(path):
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return 0, []
    ps = struct.unpack(">H", data[16:18])[0]
    ps = 65536 if ps == 1 else ps
    return ps, [data[i:i + ps] for i in range(0, len(data), ps)]

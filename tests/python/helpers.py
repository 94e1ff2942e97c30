"""Helpers for the Python (apsw + sqlite3 CLI) tests; conftest.py turns some into fixtures.

How the extension is loaded here, and why:

* The extension lives at ``build/libreplica.so`` (``make build``). SQLite appends ``.so`` by
  itself and derives the entry point ``sqlite3_replica_init`` from the file name
  (``libreplica`` -> drop ``lib`` -> ``replica``), so the path without the suffix works both for
  the CLI's ``.load`` and for apsw's ``Connection.load_extension``. ``REPLICA_EXT`` overrides it.
* Loading once per process registers the ``replica`` VFS as the process default and an
  auto-extension, so every connection opened AFTER that has the ``repl_*`` functions and goes
  through the VFS. A connection whose database was opened BEFORE the load did not go through
  the VFS: ``repl_primary()`` refuses it ("reopen it"). Hence ``apsw_conn`` loads the extension
  through a throw-away ``:memory:`` connection first, then opens the real database.
* In the CLI the same rule means: ``.load`` first, then ``.open`` (``sqlite3_cli`` does that).
* The pytest process keeps the extension loaded for its whole life; tests that need a process
  without it, or several processes, use ``run_py`` / ``spawn_py``.

Synchronisation between processes is done by polling with a deadline (``wait_for``), never by
bare sleeps.

What is where: this module has the setup every test shares (loading, the CLI, child processes,
workers), primaries (``start_primary``, ``make_primary`` in-process), replicas
(``start_replica``, ``primary_and_replica``, ``new_pair``), the serving primary
(``serve``, ``start_serving_primary``, ``serving_primary_and_follower``) and the comparisons
(``lsn_checksum``, ``assert_replica_equals_primary``, ``primary_snap``/``cli_snap``/
``stock_snap``, ``shm_state``). The bank-transfer workload (schema, transfer, invariant, stock
reader loop) is in workload.py, which child processes and scripts/torture.py import too.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import apsw
import pytest

REPO = Path(__file__).resolve().parents[2]
SQLITE3_CLI = os.environ.get("REPLICA_SQLITE3", "/usr/bin/sqlite3")

# The documented SQL functions (docs/SQL.md has one heading per name).
FUNCTIONS = (
    "repl_version",
    "repl_debug",
    "repl_primary",
    "repl_sync",
    "repl_lsn",
    "repl_role",
    "repl_checksum",
    "repl_status",
    "repl_config",
    "repl_follow",
    "repl_promote",
    "repl_wait",
    "repl_exec",
    "repl_exec_json",
)


def extension_path() -> str:
    """Absolute path of the built extension, without the ``.so`` suffix."""
    env = os.environ.get("REPLICA_EXT")
    if env:
        return str(Path(env).resolve())
    return str(REPO / "build" / "libreplica")


def require_extension() -> str:
    path = extension_path()
    if not (os.path.exists(path) or os.path.exists(path + ".so")):
        pytest.fail(f"extension not built: {path}.so is missing; run `make build` first")
    return path


_loaded_in_process = False


def load_in_process() -> None:
    """Load the extension into this process's SQLite once (via a throw-away connection)."""
    global _loaded_in_process
    if _loaded_in_process:
        return
    boot = apsw.Connection(":memory:")
    boot.enable_load_extension(True)
    boot.load_extension(require_extension())
    boot.close()
    _loaded_in_process = True


def apsw_conn(path: str | os.PathLike[str], flags: int | None = None, **kwargs: Any) -> apsw.Connection:
    """Open ``path`` with apsw, with the extension loaded BEFORE the database is opened.

    After the first load the ``replica`` VFS is the process default and the functions are
    registered on every new connection; extension loading is still enabled on the returned
    connection and the extension loaded on it explicitly (loading twice must be harmless).
    """
    load_in_process()
    if flags is None:
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI
    conn = apsw.Connection(str(path), flags=flags, **kwargs)
    conn.enable_load_extension(True)
    conn.load_extension(require_extension())
    return conn


def one(conn: apsw.Connection, sql: str, bindings: Iterable[Any] = ()) -> Any:
    """The first column of the first row of ``sql`` (None when there is no row)."""
    for row in conn.execute(sql, tuple(bindings)):
        return row[0]
    return None


def make_primary(path: str | os.PathLike[str], busy: int | None = None, **kwargs: Any) -> tuple[apsw.Connection, int]:
    """An in-process primary: ``apsw_conn(path, **kwargs)`` that ran ``SELECT repl_primary()``
    (and ``setbusytimeout(busy)`` when given); returns the connection and the LSN it returned."""
    conn = apsw_conn(path, **kwargs)
    lsn = one(conn, "SELECT repl_primary()")
    assert isinstance(lsn, int) and lsn >= 0, lsn
    if busy is not None:
        conn.setbusytimeout(busy)
    return conn, lsn


def lsn_of(conn: apsw.Connection) -> int:
    """``repl_lsn()`` of an in-process connection."""
    return one(conn, "SELECT repl_lsn()")


def _cli_quote(path: str) -> str:
    if "'" not in path:
        return f"'{path}'"
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sqlite3_cli(
    db: str | os.PathLike[str] | None,
    sql: str,
    load: bool = True,
    open_before_load: bool = False,
    args: Iterable[str] = (),
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the system sqlite3 shell (Debian's 3.40.1) with ``-bail`` on ``sql`` (stdin).

    With ``load``, the script starts with ``.load <ext>`` and THEN ``.open <db>``, the order
    the VFS needs. ``open_before_load`` puts ``db`` on the command line instead, so the shell
    opens it before the ``.load`` (the "reopen it" case). ``db=None`` keeps the shell's
    in-memory database. Returns the CompletedProcess (text, stdout/stderr captured); the caller
    checks ``returncode``.
    """
    argv = [SQLITE3_CLI, "-bail", "-batch", *args]
    script = []
    if open_before_load and db is not None:
        argv.append(str(db))
    if load:
        script.append(f".load {_cli_quote(require_extension())}")
    if db is not None and not open_before_load:
        script.append(f".open {_cli_quote(str(db))}")
    script.append(sql)
    return subprocess.run(
        argv,
        input="\n".join(script) + "\n",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def cli_ok(db: str | os.PathLike[str] | None, sql: str, **kwargs: Any) -> str:
    """``sqlite3_cli`` that must succeed; returns stdout."""
    proc = sqlite3_cli(db, sql, **kwargs)
    assert proc.returncode == 0, f"sqlite3 failed ({proc.returncode}):\n{proc.stderr}\nstdout:\n{proc.stdout}"
    return proc.stdout


HERE = Path(__file__).resolve().parent

# Put in front of every run_py/spawn_py snippet: the extension path, a connect() that loads
# the extension before opening (same rule as apsw_conn), and this folder on sys.path (so a
# snippet can import the shared bank workload: ``from workload import transfer``).
PY_PRELUDE = f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + textwrap.dedent(
    """\
    import json, os, sys, time
    import apsw
    EXT = os.environ["REPLICA_EXT"]
    _loaded = False
    def load():
        global _loaded
        if not _loaded:
            boot = apsw.Connection(":memory:")
            boot.enable_load_extension(True)
            boot.load_extension(EXT)
            boot.close()
            _loaded = True
    def connect(path, flags=None):
        load()
        if flags is None:
            flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI
        return apsw.Connection(str(path), flags=flags)
    def one(conn, sql, bindings=()):
        for row in conn.execute(sql, tuple(bindings)):
            return row[0]
        return None
    """
)


def _py_env(env: dict[str, str] | None) -> dict[str, str]:
    full = dict(os.environ)
    full["REPLICA_EXT"] = require_extension()
    full["PYTHONUNBUFFERED"] = "1"
    if env:
        full.update(env)
    return full


def run_py(
    code: str, timeout: float = 60, env: dict[str, str] | None = None, prelude: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a SEPARATE process (``sys.executable -c``) and wait for it.

    The snippet is dedented and, with ``prelude``, gets ``PY_PRELUDE`` (``EXT``, ``load()``,
    ``connect(path)``, ``one(conn, sql)``) in front. Returns the CompletedProcess; stdout is
    the snippet's channel back (print JSON).
    """
    src = (PY_PRELUDE if prelude else "") + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", src],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_py_env(env),
        cwd=REPO,
    )


def py_ok(code: str, **kwargs: Any) -> str:
    """``run_py`` that must succeed; returns stdout."""
    proc = run_py(code, **kwargs)
    assert proc.returncode == 0, f"python child failed ({proc.returncode}):\n{proc.stderr}\nstdout:\n{proc.stdout}"
    return proc.stdout


def spawn_py(code: str, env: dict[str, str] | None = None, prelude: bool = True) -> subprocess.Popen[str]:
    """Start a Python snippet in a separate process without waiting (pipes for stdin/stdout)."""
    return _popen_py((PY_PRELUDE if prelude else "") + textwrap.dedent(code), subprocess.PIPE, subprocess.PIPE,
                     subprocess.PIPE, env)


def _popen_py(src: str, stdin: Any, stdout: Any, stderr: Any, env: dict[str, str] | None) -> subprocess.Popen[str]:
    """``python -c src`` in the repository with the extension's path in its environment."""
    return subprocess.Popen(
        [sys.executable, "-c", src], stdin=stdin, stdout=stdout, stderr=stderr, text=True, env=_py_env(env), cwd=REPO
    )


def thread_in_test_delay(name: str) -> bool:
    """True when a thread of THIS process named ``name`` sleeps in a test delay
    (``REPL_FAULT_DELAY_AT``: a nanosleep); for child snippets that hold a worker there."""
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/self/task/{t}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            continue
        if comm == name and wchan == "hrtimer_nanosleep":
            return True
    return False


def wait_for(
    cond: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``cond()`` until it returns something truthy, and return that; fail at the deadline.

    Exceptions listed in ``ignore`` count as "not yet" (e.g. ``apsw.BusyError``).
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except ignore as exc:  # noqa: PERF203 - polling
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


# ------------------------------------------------------------- long-lived worker processes
#
# Replica tests need a primary process, an applier process and reader processes that stay
# alive across steps (a reader holding BEGIN, an applier keeping its connection). A worker is a
# child process owning ONE connection; the test sends it one request per line and reads one
# JSON reply per line, with a deadline (select), so a hung child fails the test instead of
# hanging it.

import json as _json
import select as _select
import signal as _signal
import tempfile

# The worker's request loop. cfg (first stdin line): path, ext (load the extension before
# opening; False = a process that never loads it, plain unix VFS), flags ("rw" / "ro").
WORKER_PY = textwrap.dedent(
    """\
    cfg = json.loads(sys.stdin.readline())
    if cfg["flags"] == "ro":
        flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
    else:
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI
    if cfg["ext"]:
        conn = connect(cfg["path"], flags)
    else:
        conn = apsw.Connection(cfg["path"], flags=flags)
    conn.setbusytimeout(cfg.get("busy", 5000))
    def enc(v):
        return {"hex": v.hex()} if isinstance(v, (bytes, bytearray, memoryview)) else v
    print(json.dumps({"ok": "ready", "pid": os.getpid(),
                      "sqlite": apsw.sqlite_lib_version()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if "script" in req:
                out = {"rows": []}
                for stmt in req["script"]:
                    out["rows"] = [[enc(v) for v in r] for r in conn.execute(stmt)]
            else:
                out = {"rows": [[enc(v) for v in r] for r in conn.execute(req["sql"], req.get("args", []))]}
        except apsw.Error as e:
            out = {"error": type(e).__name__, "msg": str(e)}
        print(json.dumps(out), flush=True)
    """
)


class WorkerError(Exception):
    """An SQL error reported by a worker: ``name`` is apsw's exception class name."""

    def __init__(self, name: str, msg: str):
        super().__init__(f"{name}: {msg}")
        self.name = name
        self.msg = msg


class _Lines:
    """Line reader over a child's stdout pipe with a deadline (select on the raw fd, own
    buffer: a buffered readline could hold a second line select cannot see)."""

    def __init__(self, proc: subprocess.Popen[str], stderr_text: Callable[[], str] = lambda: ""):
        self.proc = proc
        self.stderr_text = stderr_text
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def readline(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: no reply within {timeout}s")
            r, _, _ = _select.select([self.fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.proc.wait(5)
                err = self.stderr_text()
                raise AssertionError(f"{what}: the process ended (rc {self.proc.returncode}); stderr:\n{err}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


class _Child:
    """What every worker process shares: closing it politely (``farewell`` first on its stdin,
    then EOF, then a bounded wait) or killing it (SIGKILL: a crash, no close-time checkpoint)."""

    proc: subprocess.Popen[str]
    farewell = ""

    def close(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                if self.farewell:
                    self.proc.stdin.write(self.farewell)
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL (a crash), then reap."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, _signal.SIGKILL)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PyChild(_Child):
    """A Python child process (``PY_PRELUDE`` + ``code``) answering one JSON line per request.

    ``cfg`` is its first stdin line; it answers ``{"ok": "ready", "pid": …}`` once set up, then
    ``{"rows": …}`` or ``{"error": <apsw class name>, "msg": …}`` per request. Its stderr goes to
    a file, not a pipe: the extension logs events there and a full pipe would block a
    long-running child.
    """

    what = "python child"

    def __init__(self, code: str, cfg: dict, env: dict[str, str] | None = None):
        self.err = tempfile.TemporaryFile("w+")
        self.proc = _popen_py(PY_PRELUDE + code, subprocess.PIPE, subprocess.PIPE, self.err, env)
        self.proc.stdin.write(_json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        self.lines = _Lines(self.proc, self.stderr)
        self.hello = _json.loads(self.lines.readline(30, self.what))
        assert self.hello.get("ok") == "ready", self.hello
        self.pid = self.hello["pid"]

    def stderr(self) -> str:
        """What the child wrote to stderr so far (the extension's event lines)."""
        self.err.flush()
        self.err.seek(0)
        text = self.err.read()
        self.err.seek(0, os.SEEK_END)
        return text

    def _send(self, req: dict, timeout: float = 60) -> list[list[Any]]:
        self.proc.stdin.write(_json.dumps(req) + "\n")
        self.proc.stdin.flush()
        out = _json.loads(self.lines.readline(timeout, f"{self.what} {self.pid}: {req}"))
        if "error" in out:
            raise WorkerError(out["error"], out["msg"])
        return out["rows"]


class Worker(PyChild):
    """A child process with one apsw connection on ``path`` (see WORKER_PY).

    ``ext=True`` loads the extension before opening (so the connection uses the replica VFS);
    ``ext=False`` is a process that never loads it (stock SQLite 3.54 of apsw, unix VFS).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        ext: bool = True,
        flags: str = "rw",
        busy: int = 5000,
        env: dict[str, str] | None = None,
    ):
        self.path = str(path)
        self.what = f"worker on {self.path}"
        super().__init__(WORKER_PY, {"path": self.path, "ext": ext, "flags": flags, "busy": busy}, env)
        self.sqlite_version = self.hello["sqlite"]

    def q(self, sql: str, args: Iterable[Any] = (), timeout: float = 60) -> list[list[Any]]:
        """Rows of ``sql`` (raises WorkerError on an SQL error)."""
        return self._send({"sql": sql, "args": list(args)}, timeout)

    def one(self, sql: str, args: Iterable[Any] = (), timeout: float = 60) -> Any:
        rows = self.q(sql, args, timeout)
        return rows[0][0] if rows else None

    def script(self, stmts: Iterable[str], timeout: float = 60) -> list[list[Any]]:
        """Run statements in order; rows of the last one."""
        return self._send({"script": list(stmts)}, timeout)



class CliWorker(_Child):
    """A long-lived stock ``/usr/bin/sqlite3`` shell (3.40.1) on ``path`` WITHOUT the extension.

    Each ``q`` sends SQL plus a ``.print`` marker and returns the output lines before it (list
    mode, ``|`` separated); error messages go to the same stream, so ``q`` raises WorkerError
    when a line starts with ``Error:``/``Parse error``/``Runtime error``.
    """

    farewell = ".quit\n"
    MARK = "@@done@@"

    def __init__(self, path: str | os.PathLike[str], busy: int = 5000, load: bool = False):
        """``load``: ``.load`` the extension first, then ``.open`` the database (an applier or
        replica connection hosted by SQLite 3.40.1)."""
        self.path = str(path)
        self.proc = subprocess.Popen(
            # stdbuf: the shell's stdout is a pipe (fully buffered by stdio otherwise).
            ["stdbuf", "-oL", SQLITE3_CLI, "-batch"] + ([] if load else [self.path]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        self.pid = self.proc.pid
        self.lines = _Lines(self.proc)
        self.events: list[str] = []
        if load:
            self.q(f".load {_cli_quote(require_extension())}")
            self.q(f".open {_cli_quote(self.path)}")
        self.q(f".timeout {busy}")

    def q(self, sql: str, timeout: float = 60) -> list[str]:
        self.proc.stdin.write(sql.rstrip() + f"\n.print {self.MARK}\n")
        self.proc.stdin.flush()
        lines = []
        while True:
            line = self.lines.readline(timeout, f"sqlite3 {self.pid} on {self.path}: {sql!r}")
            if line == self.MARK:
                break
            if line.startswith("event="):  # the extension's log lines (stderr is merged)
                self.events.append(line)
                continue
            lines.append(line)
        errors = [ln for ln in lines if ln.startswith(("Error:", "Parse error", "Runtime error"))]
        if errors:
            raise WorkerError("sqlite3", "\n".join(lines))
        return lines


# ------------------------------------------------------------------ replica test helpers


def start_primary(path: str | os.PathLike[str], **kwargs: Any) -> Worker:
    """A primary process: a worker on ``path`` that ran ``SELECT repl_primary()``."""
    w = Worker(path, **kwargs)
    lsn = w.one("SELECT repl_primary()")
    assert isinstance(lsn, int), f"repl_primary() returned {lsn!r}"
    return w


def start_replica(path: str | os.PathLike[str], source: str | os.PathLike[str], **kwargs: Any) -> Worker:
    """An applier process: a worker on the NEW file ``path`` that ran ``repl_sync(source)``."""
    w = Worker(path, **kwargs)
    lsn = w.one("SELECT repl_sync(?)", [str(source)])
    assert isinstance(lsn, int), f"repl_sync() returned {lsn!r}"
    return w


def serve(w: Worker, port: int = 0, token: str | None = None, timeout: float = 15,
          exec_on: bool = True, exec_token: str | None = None) -> str:
    """Make ``w``'s process the serving primary: ``repl_primary('127.0.0.1:<port>' [, token
    [, exec_token]])`` (port 0: a free one), retried while the port is still taken (a killed
    predecessor's socket), at most ``timeout`` seconds. ``exec_on`` accepts forwarded writes
    (``repl_config('exec', 1)``; the product default is off, most tests forward writes).
    Returns the server's URL."""
    listen = f"127.0.0.1:{port}"
    args = [listen, token] if token else [listen]
    if exec_token:
        args = [listen, token, exec_token]
    wait_for(lambda: _try_listen(w, args), timeout=timeout, interval=0.05, what=f"listening on {listen}")
    if exec_on:
        w.one("SELECT repl_config('exec', 1)")
    url = worker_status(w)["server"]["url"]
    assert url.startswith("http://127.0.0.1:"), url
    return url


def _try_listen(w: Worker, args: list) -> bool:
    try:
        w.one("SELECT repl_primary(" + ", ".join("?" * len(args)) + ")", args)
        return True
    except WorkerError as e:
        if "cannot listen" not in e.msg:
            raise
        return False


def start_serving_primary(
    path: str | os.PathLike[str], token: str | None = None, port: int = 0, exec_on: bool = True,
    exec_token: str | None = None, **kwargs: Any
) -> tuple[Worker, str]:
    """A primary process that also serves its log over HTTP on a loopback port (``serve``);
    returns the worker and the server's URL."""
    w = Worker(path, **kwargs)
    try:
        return w, serve(w, port, token, exec_on=exec_on, exec_token=exec_token)
    except BaseException:
        w.close()
        raise


def lsn_checksum(w: Worker) -> tuple[int, str]:
    """(repl_lsn(), repl_checksum()) of a primary or replica worker."""
    lsn, ck = w.q("SELECT repl_lsn(), repl_checksum()")[0]
    return lsn, ck


def sync_to(replica: Worker, lsn: int, timeout: float = 30) -> int:
    """``repl_sync()`` until the replica reached ``lsn`` (the primary serves only durable
    records, so a sync right after a commit may legitimately return less)."""
    return wait_for(
        lambda: (got := replica.one("SELECT repl_sync()")) >= lsn and got,
        timeout=timeout,
        interval=0.01,
        what=f"the replica reaching LSN {lsn}",
    )


def worker_status(w: Worker) -> dict:
    value = _json.loads(w.one("SELECT repl_status()"))
    assert isinstance(value, dict), value
    return value


def worker_tables(w: Worker) -> dict[str, list]:
    """Every row of every table (schema included) through ``w``'s connection, sorted."""
    out: dict[str, list] = {"sqlite_schema": sorted(w.q("SELECT type, name, tbl_name, sql FROM sqlite_schema"), key=repr)}
    names = [r[0] for r in w.q("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    for name in sorted(names):
        quoted = '"' + name.replace('"', '""') + '"'
        out[name] = sorted(w.q(f"SELECT * FROM {quoted}"), key=repr)
    return out


def assert_replica_equals_primary(rdb: str | os.PathLike[str], p: Worker) -> None:
    """Stock readers (no extension) of ``rdb`` find it intact and holding the primary's content."""
    assert stock_one(rdb, "PRAGMA integrity_check;") == "ok"
    assert stock_tables(rdb) == worker_tables(p), "a stock reader sees other content than the primary"


def stock_tables(db: str | os.PathLike[str]) -> dict[str, list]:
    """``worker_tables`` read by a fresh process that never loads the extension."""
    with Worker(db, ext=False, flags="ro") as r:
        return worker_tables(r)


def stock_one(db: str | os.PathLike[str], sql: str) -> str:
    """``sql`` run by a fresh stock ``/usr/bin/sqlite3`` (3.40.1) WITHOUT the extension; stdout."""
    proc = sqlite3_cli(db, sql, load=False, args=["-cmd", ".timeout 5000"])
    assert proc.returncode == 0, f"stock sqlite3 failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout.strip()


def spawn_bg(code: str, logdir: str | os.PathLike[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a Python snippet (with PY_PRELUDE) in the background, stdout and stderr into
    ``logdir/name.out`` / ``name.err`` (files, not pipes: a long-running child that logs must
    never block on a full pipe). Read the result with ``bg_result``."""
    out = open(Path(logdir) / f"{name}.out", "w")
    err = open(Path(logdir) / f"{name}.err", "w")
    proc = _popen_py(PY_PRELUDE + textwrap.dedent(code), subprocess.DEVNULL, out, err, env)
    out.close()
    err.close()
    proc.logdir, proc.name = Path(logdir), name  # type: ignore[attr-defined]
    return proc


def bg_result(proc: subprocess.Popen[str], timeout: float = 60) -> Any:
    """Wait for a ``spawn_bg`` child; it must exit 0; returns the JSON of its last stdout line."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.name} did not finish within {timeout}s")  # type: ignore[attr-defined]
    out = (proc.logdir / f"{proc.name}.out").read_text()  # type: ignore[attr-defined]
    err = (proc.logdir / f"{proc.name}.err").read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, f"{proc.name} failed ({proc.returncode}):\n{err[-4000:]}\nstdout:\n{out[-2000:]}"  # type: ignore[attr-defined]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, f"{proc.name} printed nothing; stderr:\n{err[-4000:]}"  # type: ignore[attr-defined]
    return _json.loads(lines[-1])


def durable(p: Worker, timeout: float = 10) -> int:
    """The primary's LSN once it is durable (the server and the log serve only durable records)."""
    lsn = p.one("SELECT repl_lsn()")
    wait_for(lambda: (worker_status(p)["log"]["durable_lsn"] or 0) >= lsn, timeout=timeout, what=f"LSN {lsn} durable")
    return lsn


def stock_checkpoint(db: str | os.PathLike[str], mode: str) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(mode)`` by a fresh stock sqlite3 3.40 (no extension): (busy, log, checkpointed)."""
    busy, log, ckpt = (int(x) for x in stock_one(db, f"PRAGMA wal_checkpoint({mode});").split("|"))
    return busy, log, ckpt


def shm_state(db: str | os.PathLike[str]) -> dict:
    """mxFrame, nPage, salts and nBackfill of a wal-index (first header copy), read from the
    ``-shm`` file by a process holding no SQLite connection on it (reading drops no lock)."""
    with open(f"{db}-shm", "rb") as f:
        b = f.read(136)
    assert b[0:48] == b[48:96], "the two wal-index header copies differ (a torn publish?)"
    mx_frame, n_page = struct.unpack("<II", b[16:24])
    (n_backfill,) = struct.unpack("<I", b[96:100])
    return {"mx_frame": mx_frame, "n_page": n_page, "salts": b[32:40].hex(), "n_backfill": n_backfill}


# ------------------------------------------------- the replica tests' table t(id, v REAL, pad)

# What the reader tests compare between the primary, the replica and readers inside BEGIN.
SNAP_SQL = "SELECT count(*), total(v), max(id) FROM t"


def _snap(c: Any, s: Any, m: Any) -> tuple[int, float, int]:
    return int(c), float(s), int(m)


def primary_snap(w: Worker) -> tuple[int, float, int]:
    """``SNAP_SQL`` through a worker (the primary, the applier or an apsw reader)."""
    return _snap(*w.q(SNAP_SQL)[0])


def cli_snap(w: CliWorker) -> tuple[int, float, int]:
    """``SNAP_SQL`` through a stock sqlite3 shell worker."""
    (line,) = w.q(SNAP_SQL + ";")
    return _snap(*line.split("|"))


def stock_snap(db: str | os.PathLike[str]) -> tuple[int, float, int]:
    """``SNAP_SQL`` through a fresh stock sqlite3 3.40 (no extension)."""
    return _snap(*stock_one(db, SNAP_SQL + ";").split("|"))


@contextlib.contextmanager
def primary_and_replica(tmp: Path, *setup_sql: str) -> Iterator[tuple[Path, Path, Worker, Worker]]:
    """A primary worker on ``tmp/p.db`` that ran ``setup_sql`` (one statement each) and a replica
    worker bootstrapped from it on ``tmp/r.db``; yields (pdb, rdb, primary, replica) and closes
    both on exit, the replica first."""
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        for sql in setup_sql:
            p.q(sql)
        with start_replica(rdb, pdb) as r:
            # Only durable records are served (group fsync): catch up with the last commit.
            sync_to(r, p.one("SELECT repl_lsn()"))
            yield pdb, rdb, p, r


@contextlib.contextmanager
def serving_primary_and_follower(tmp: Path, *setup_sql: str) -> Iterator[tuple[Worker, str, Worker]]:
    """A serving primary worker on ``tmp/p.db`` (``start_serving_primary``) that ran
    ``setup_sql`` and a replica worker on ``tmp/r.db`` following it (``repl_follow(url)``);
    yields (primary, url, replica) and closes both on exit, the replica first."""
    p, url = start_serving_primary(tmp / "p.db")
    with p:
        for sql in setup_sql:
            p.q(sql)
        with Worker(tmp / "r.db") as r:
            r.q("SELECT repl_follow(?)", [url])
            yield p, url, r


@contextlib.contextmanager
def new_pair(tmp: Path, rows: int, pad: int) -> Iterator[tuple[Path, Path, Worker, Worker]]:
    """A primary worker on ``tmp/p.db`` with ``t(id, v REAL, pad BLOB)`` holding ``rows`` rows
    (``pad`` random bytes each) and a replica worker bootstrapped from it on ``tmp/r.db``, at the
    same (lsn, checksum). Yields (pdb, rdb, primary, replica); closes both on exit, the replica
    first."""
    fill = (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < ?) "
        "INSERT INTO t(v, pad) SELECT n, randomblob(?) FROM c"
    )
    pdb, rdb = tmp / "p.db", tmp / "r.db"
    with start_primary(pdb) as p:
        p.q("CREATE TABLE t(id INTEGER PRIMARY KEY, v REAL, pad BLOB)")
        p.q(fill, [rows, pad])
        with start_replica(rdb, pdb) as r:
            # Only durable records are served (group fsync): sync until the replica has the
            # primary's last commit, then compare.
            sync_to(r, lsn_checksum(p)[0])
            assert lsn_checksum(r) == lsn_checksum(p)
            yield pdb, rdb, p, r


def commit_and_sync(p: Worker, r: Worker, stmts: Iterable[str]) -> tuple[int, str]:
    """One primary transaction of ``stmts``; the replica syncs to it and has the same checksum.
    Returns the primary's (lsn, checksum)."""
    p.script(["BEGIN", *stmts, "COMMIT"])
    want = lsn_checksum(p)
    sync_to(r, want[0])
    assert lsn_checksum(r) == want, "the replica's checksum differs from the primary's at the same LSN"
    return want

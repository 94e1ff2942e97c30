"""A server that strangers cannot knock over (issue 13): every limit pushed past, from outside.

Each test is named after the problem it closes (the review's findings):
* 400 idle connections gave 405 threads and 815 fds; under `ulimit -n 128`, 78 idle
  connections made the listener refuse connections *for good* (tiny_http's accept loop exited
  on EMFILE) → `test_connection_flood_*`, `test_accept_survives_emfile_*`;
* one header byte every 25 s was still served after 75 s → `test_slowloris_*`;
* one 400 MiB header line raised the primary's RSS by 410 MB → `test_huge_header_*`;
* any of several Authorization headers was accepted → `test_one_request_one_token_guess`;
* each repl_primary(listen) needed its own port → `test_two_primaries_share_one_listener`,
  `test_serve_dir_serves_every_primary`;
* https was not built in → `test_https_follower_*`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import REPO, Worker, durable, lsn_checksum, wait_for, worker_status

TOKEN = "s3cret-token"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def get(url: str, path: str, token: str | None = TOKEN, timeout: float = 10):
    req = urllib.request.Request(url + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def serving(tmp, name="p.db", env=None, token=TOKEN, port=0):
    p = Worker(tmp / name, env=env)
    p.one("SELECT repl_primary(?, ?)", [f"127.0.0.1:{port}", token])
    p.script(["CREATE TABLE t(x)", "INSERT INTO t VALUES (1)"])
    durable(p)  # served LSNs stop at the watermark (in the log and fsynced, a round after commit)
    url = worker_status(p)["server"]["url"]
    return p, url


def listener(p):
    return worker_status(p)["server"]["listener"]


def test_connection_flood_under_low_fd_limit_keeps_serving_followers(tmp):
    p, url = serving(tmp)
    port = int(url.rsplit(":", 1)[1])
    r = Worker(tmp / "r.db")
    try:
        r.one("SELECT repl_follow(?, 10)", [f"{url}?token={TOKEN}"])
        # The primary's process now may open 128 files: the server's limit becomes 64.
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (128, 128))
        flood = []
        for _ in range(300):  # more connections than the process has descriptors
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", port))
                flood.append(s)
            except OSError:
                s.close()
        # During the flood: the follower keeps receiving commits, the host's SQL works.
        for i in range(5):
            p.one("INSERT INTO t VALUES (?)", [i])
            lsn = p.one("SELECT repl_lsn()")
            r.one("SELECT repl_wait(?, 20000)", [lsn])
        # A NEW authorised client during the flood gets in (a never-served stranger is evicted).
        assert get(url, "/v1/info")[0] == 200
        st = listener(p)
        assert st["state"] == "listening", st
        assert st["max_connections"] == 64, st
        assert st["refused"] + st["evicted"] > 0, st
        assert st["open_connections"] <= 64, st
        for s in flood:
            s.close()
        # After it: new connections are served, and everything still replicates.
        wait_for(lambda: get(url, "/v1/info")[0] == 200, timeout=10, what="serving after the flood")
        p.one("INSERT INTO t VALUES (99)")
        lsn = p.one("SELECT repl_lsn()")
        r.one("SELECT repl_wait(?, 20000)", [lsn])
        assert lsn_checksum(p) == lsn_checksum(r)
        # Threads do not grow with connections.
        assert threads_of(p.pid) < 40, threads_of(p.pid)
    finally:
        r.close()
        p.close()


def test_accept_survives_emfile_and_recovers_by_itself(tmp):
    """The host application itself exhausts the descriptors: accepting pauses (degraded, one
    log line), never exits, and resumes once descriptors are free again."""
    p, url = serving(tmp, env={"REPL_LOG": "warn"})
    try:
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (64, 64))
        held = []
        # The host exhausts its descriptors: each attached database holds one.
        for i in range(80):
            try:
                p.one(f"ATTACH ? AS a{i}", [str(tmp / f"x{i}.db")])
                held.append(i)
            except Exception:
                break
        # Connections now cannot be accepted: the server must stay alive.
        s = socket.socket()
        s.settimeout(2)
        s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            s.recv(1)
        except OSError:
            pass
        s.close()
        st = wait_for(lambda: (l := listener(p))["state"] == "degraded" and l, timeout=10, what="degraded state")
        assert "paused" in st["reason"], st
        for i in held:
            p.one(f"DETACH a{i}")
        wait_for(lambda: get(url, "/v1/info")[0] == 200, timeout=15, what="accepting again")
        assert listener(p)["state"] == "listening"
        assert "event=accept_error" in p.stderr()
        assert p.stderr().count("event=accept_error") == 1, p.stderr()
    finally:
        p.close()


def test_slowloris_is_closed_within_the_head_timeout(tmp):
    p, url = serving(tmp, env={"REPL_HTTP_HEAD_TIMEOUT_MS": "1000"})
    try:
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        t0 = time.monotonic()
        closed_at = None
        for b in b"GET /v1/info HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed_at = time.monotonic()
                break
            s.settimeout(0.3)
            try:
                if s.recv(1) == b"":
                    closed_at = time.monotonic()
                    break
            except socket.timeout:
                pass
        assert closed_at is not None and closed_at - t0 < 5, "a trickling head was not cut off"
        assert listener(p)["timeouts"] >= 1
    finally:
        p.close()


def test_huge_header_is_refused_without_memory_growth(tmp):
    p, url = serving(tmp)
    try:
        before = rss_kib(p.pid)
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.settimeout(10)
        sent = 0
        chunk = b"a" * (1 << 20)
        try:
            s.sendall(b"GET /v1/info HTTP/1.1\r\nX-Big: ")
            while sent < 400 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        answer = b""
        try:
            answer = s.recv(4096)
        except OSError:
            pass
        s.close()
        assert sent < 400 << 20, "the server read a 400 MiB header"
        if answer:
            assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert listener(p)["too_large"] >= 1
        grew = rss_kib(p.pid) - before
        assert grew < 1024, f"RSS grew by {grew} KiB"
    finally:
        p.close()


def test_too_many_headers_is_431(tmp):
    p, url = serving(tmp)
    try:
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        head = b"GET /v1/info HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n"
        s.sendall(head)
        assert s.recv(4096).startswith(b"HTTP/1.1 431")
        s.close()
    finally:
        p.close()


def test_one_request_one_token_guess(tmp):
    p, url = serving(tmp)
    try:
        port = int(url.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            b"GET /v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(4096):  # the refusal closes the connection
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400") and b"exactly one Authorization" in answer, answer
        s.close()
        assert get(url, "/v1/info")[0] == 200
    finally:
        p.close()


def test_idle_long_polls_cost_no_threads(tmp):
    p, url = serving(tmp)
    try:
        port = int(url.rsplit(":", 1)[1])
        base_threads = threads_of(p.pid)
        lsn = p.one("SELECT repl_lsn()")
        socks = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(
                f"GET /v1/log?from={lsn + 1}&wait_ms=30000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
            )
            socks.append(s)
        wait_for(lambda: listener(p)["parked_long_polls"] == 200, timeout=20, what="200 parked long-polls")
        assert threads_of(p.pid) <= base_threads + 1, (base_threads, threads_of(p.pid))
        # One commit wakes them all: each gets its record.
        p.one("INSERT INTO t VALUES (2)")
        for s in socks:
            s.settimeout(20)
            got = s.recv(65536)
            assert got.startswith(b"HTTP/1.1 200") and b"X-Repl-Records: 1" in got, got[:300]
            s.close()
    finally:
        p.close()


def test_two_primaries_share_one_listener(tmp):
    """Two primaries in one process, one address: the second joins the first's listener and
    is reached by name; two replicas follow them by name."""
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-c", TWO_DBS, str(tmp), str(port), TOKEN],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "REPLICA_EXT": os.environ.get("REPLICA_EXT", str(REPO / "build" / "libreplica"))},
    )
    try:
        urls = json.loads(child.stdout.readline())
        assert urls["one"] == f"http://127.0.0.1:{port}", urls
        assert urls["two"] == f"http://127.0.0.1:{port}/v1/db/two.db", urls
        assert urls["databases"] == ["one.db", "two.db"], urls
        r1, r2 = Worker(tmp / "r1.db"), Worker(tmp / "r2.db")
        try:
            assert r1.one("SELECT repl_sync(?)", [f"http://127.0.0.1:{port}/v1/db/one.db?token={TOKEN}"]) >= 1
            assert r2.one("SELECT repl_sync(?)", [f"{urls['two']}?token={TOKEN}"]) >= 1
            assert r1.one("SELECT count(*) FROM t1") == 1 and r2.one("SELECT count(*) FROM t2") == 2
            child.stdin.write("lsn\n")
            child.stdin.flush()
            sums = json.loads(child.stdout.readline())
            assert lsn_checksum(r1) == tuple(sums["one"]) and lsn_checksum(r2) == tuple(sums["two"])
            # An unknown name is a 404, not another database.
            assert get(f"http://127.0.0.1:{port}", "/v1/db/three.db/info")[0] == 404
        finally:
            r1.close()
            r2.close()
    finally:
        child.stdin.close()
        child.wait(timeout=30)


TWO_DBS = r"""
import json, os, sys
import apsw
tmp, port, token = sys.argv[1], sys.argv[2], sys.argv[3]
boot = apsw.Connection(":memory:"); boot.enable_load_extension(True); boot.load_extension(os.environ["REPLICA_EXT"])
one = lambda c, q, a=(): next(iter(c.execute(q, a)), [None])[0]
c1 = apsw.Connection(tmp + "/one.db"); c2 = apsw.Connection(tmp + "/two.db")
one(c1, "SELECT repl_primary(?, ?)", (f"127.0.0.1:{port}", token))
one(c2, "SELECT repl_primary(?, ?)", (f"127.0.0.1:{port}", token))
c1.execute("CREATE TABLE t1(x); INSERT INTO t1 VALUES (1)")
c2.execute("CREATE TABLE t2(x); INSERT INTO t2 VALUES (1), (2)")
s1 = json.loads(one(c1, "SELECT repl_status()"))["server"]; s2 = json.loads(one(c2, "SELECT repl_status()"))["server"]
print(json.dumps({"one": s1["url"], "two": s2["url"], "databases": s1["databases"]}), flush=True)
for line in sys.stdin:
    print(json.dumps({"one": [one(c1, "SELECT repl_lsn()"), one(c1, "SELECT repl_checksum()")],
                      "two": [one(c2, "SELECT repl_lsn()"), one(c2, "SELECT repl_checksum()")]}), flush=True)
"""


def test_serve_dir_serves_every_primary(tmp):
    d = tmp / "dbs"
    d.mkdir()
    for name, rows in [("a.db", 1), ("b.db", 3)]:
        w = Worker(d / name)
        w.one("SELECT repl_primary()")
        w.script(["CREATE TABLE t(x)"] + [f"INSERT INTO t VALUES ({i})" for i in range(rows)])
        w.close()
    tokfile = tmp / "token"
    tokfile.write_text(TOKEN + "\n")
    port = free_port()
    srv = subprocess.Popen(
        [str(REPO / "build" / "sqlite-replica"), "serve", str(d), "--listen", f"127.0.0.1:{port}", "--token-file", str(tokfile)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = [srv.stdout.readline() for _ in range(2)]
        assert any("/v1/db/b.db" in line for line in lines), lines
        assert TOKEN not in " ".join(lines)
        for name, rows in [("a.db", 1), ("b.db", 3)]:
            r = Worker(tmp / f"r-{name}")
            try:
                r.one("SELECT repl_sync(?)", [f"http://127.0.0.1:{port}/v1/db/{name}?token={TOKEN}"])
                assert r.one("SELECT count(*) FROM t") == rows
            finally:
                r.close()
    finally:
        srv.kill()
        srv.wait()


def make_ca(dirpath, name):
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is missing: make deps installs it")
    ca_key, ca = dirpath / f"{name}-ca.key", dirpath / f"{name}-ca.pem"
    key, csr, cert = dirpath / f"{name}.key", dirpath / f"{name}.csr", dirpath / f"{name}.pem"
    ext = dirpath / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=60)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", f"/CN={name} test CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def test_https_follower_with_a_test_ca_and_a_wrong_ca_refused(tmp):
    ca, cert, key = make_ca(tmp, "good")
    other_ca, _, _ = make_ca(tmp, "other")
    p, url = serving(tmp, env={"REPL_TLS_CERT": str(cert), "REPL_TLS_KEY": str(key)})
    try:
        assert url.startswith("https://127.0.0.1:"), url
        r = Worker(tmp / "r.db")
        try:
            r.one("SELECT repl_follow(?, 10)", [f"{url}?token={TOKEN}&ca={ca}"])
            p.one("INSERT INTO t VALUES (5)")
            lsn = p.one("SELECT repl_lsn()")
            r.one("SELECT repl_wait(?, 20000)", [lsn])
            assert lsn_checksum(r) == lsn_checksum(p)
        finally:
            r.close()
        bad = Worker(tmp / "bad.db")
        try:
            with pytest.raises(Exception) as e:
                bad.one("SELECT repl_sync(?)", [f"{url}?token={TOKEN}&ca={other_ca}"])
            assert "not accepted" in str(e.value) and "ca=" in str(e.value), str(e.value)
            assert TOKEN not in str(e.value)
        finally:
            bad.close()
        assert sorted(x.name for x in tmp.iterdir() if x.name.startswith("bad.db")) in (["bad.db"], [])
        # Plain HTTP to a TLS listener is not served.
        port = int(url.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(5)
        s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = s.recv(100)
        except OSError:
            got = b""
        assert not got.startswith(b"HTTP/1.1 200"), got
        s.close()
    finally:
        p.close()

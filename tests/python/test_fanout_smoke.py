"""Fan-out smoke test (issue 13; the full figures are scripts/bench_fanout.py in `make bench`):
200 long-polling followers on one primary. Every follower gets every commit (a lost wake-up
would leave a follower waiting for its 30 s `wait_ms`, far past the deadline here), the
primary's thread count does not grow with the followers, and all 200 are parked at once.

The followers are the bench's light client: 200 sockets on one epoll in this process, each with
one `GET /v1/log?from=<next>&wait_ms=30000` outstanding."""

from __future__ import annotations

import sys
import time
import urllib.request

from helpers import REPO, require_extension

sys.path.insert(0, str(REPO / "scripts"))
import bench_fanout  # noqa: E402

N = 200
COMMITS = 40


def test_200_long_polls_get_every_commit_on_no_extra_threads(tmp):
    require_extension()
    bench_fanout.raise_nofile()
    prim = bench_fanout.Primary(tmp / "p.db")
    client = None
    try:
        req = urllib.request.Request(prim.url + "/v1/info", headers={"Authorization": f"Bearer {prim.token}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        base_threads = prim.threads()
        lsn0 = prim.durable_lsn()  # a long-poll past the watermark is answered "ahead", not parked

        client = bench_fanout.LightClient(prim.port, prim.token, N, lsn0 + 1, name="smoke")
        parked = 0
        end = time.monotonic() + 10
        while time.monotonic() < end and parked < N:
            client.poll(0.05)
            parked = prim.status()["listener"]["parked_long_polls"]
        assert parked == N, f"{parked} of {N} long-polls parked"
        assert prim.threads() <= base_threads, (base_threads, prim.threads())

        # 40 commits at 20/s: each wakes the parked followers (or finds them between requests).
        client.track = set(range(lsn0 + 1, lsn0 + COMMITS + 1))
        prim.send(f"commit 20 {COMMITS}")
        got: list[dict] = []

        def primary_done() -> bool:
            if not got and bench_fanout.select.select([prim.proc.stdout], [], [], 0)[0]:
                got.append(prim.read(5))
            return bool(got)

        assert client.run_until(primary_done, 20), "the primary did not finish its commits"
        stamps = dict(got[0]["stamps"])
        assert sorted(stamps) == list(range(lsn0 + 1, lsn0 + COMMITS + 1)), stamps
        last = max(stamps)
        # Well under wait_ms (30 s): a follower whose wake-up was lost would still be waiting.
        client.run_until(lambda: client.all_at(last), 5)
        behind = [i for i, f in enumerate(client.next_from) if f <= last]
        assert not behind, f"{len(behind)} followers never got LSN {last} (first: {behind[:5]}); errors {client.errors}"
        for lsn in stamps:
            assert len(client.arrivals.get(lsn, [])) == N, (lsn, len(client.arrivals.get(lsn, [])))
        assert not client.errors, client.errors
        assert prim.threads() <= base_threads, (base_threads, prim.threads())
    finally:
        if client is not None:
            client.close()
        prim.close()

"""`serve --drain-delay`: after SIGTERM readiness is 503 at once, yet new requests are still
accepted and answered 200 for the delay (what keeps a rolling update from dropping requests while
endpoints and load balancers catch up); then the server drains and every rank exits 0.

Two real ranks under the local launcher, as a Deployment or LWS pod runs them (`dscluster serve
--nproc 2` is the pod's process and receives the SIGTERM), real HTTP clients.
"""

from __future__ import annotations

import signal
import time

import httpx

from cli_in_process import run_dscluster  # tests/cli_in_process.py
from servers import RemoteServer  # tests/e2e/servers.py

DELAY = 4.0
SMALL = {"prompt": "hello", "max_tokens": 2, "temperature": 0, "ignore_eos": True}


def _ready(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health/ready", timeout=5).status_code
    except httpx.HTTPError:
        return None


def _complete(url: str) -> int | None:
    try:
        return httpx.post(f"{url}/v1/completions", json=SMALL, timeout=30).status_code
    except httpx.HTTPError:
        return None


def test_requests_answered_while_not_ready_during_the_delay(tiny):
    with RemoteServer(tiny, "--drain-delay", str(DELAY)) as server:
        assert _complete(server.url) == 200
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # (seconds after SIGTERM when sent, readiness before it, completion status)
        seen: list[tuple[float, int | None, int | None]] = []
        repeated = False
        while server.proc.poll() is None and time.monotonic() - signalled < DELAY + 60:
            sent = time.monotonic() - signalled
            if sent > 1.0 and not repeated:
                # A second SIGTERM (under MPI the pod's own and the launcher's SIGUSR1 both
                # arrive) does not cut the delay short.
                server.proc.send_signal(signal.SIGTERM)
                repeated = True
            seen.append((sent, _ready(server.url), _complete(server.url)))
            time.sleep(0.2)
        code = server.proc.wait(60)
        exited = time.monotonic() - signalled
        log = server.output()
    assert code == 0, log[-3000:]
    during = [s for s in seen if s[0] < DELAY - 0.5]
    assert len(during) >= 3, seen
    # Readiness turns 503 at once, and stays 503 for the whole delay.
    assert all(ready == 503 for _, ready, _ in during), seen
    # Every request sent during the delay, after readiness said 503, was answered.
    assert all(done == 200 for _, _, done in during), seen
    assert exited >= DELAY, f"drained {exited:.2f} s after SIGTERM, before the {DELAY} s delay ended"
    assert f"still answering for {DELAY:g} s (--drain-delay)" in log
    assert "rank 1: stop received" in log


def test_drain_delay_must_be_a_non_negative_number():
    # The parser refuses it, so in this process (tests/test_cli_usage.py has the entry point itself);
    # a model that does not exist, so that a value let through fails here instead of serving.
    for bad in ("-1", "soon"):
        proc = run_dscluster("serve", "some-model", "--drain-delay", bad)
        assert proc.returncode == 2 and "--drain-delay" in proc.stderr, proc.stderr

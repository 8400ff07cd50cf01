"""Looking up the master's name, bounded in time.

getaddrinfo has no timeout of its own: a DNS server that never answers holds the caller for the
resolver's retries (seconds to minutes). The lookup runs on a daemon thread, so a caller that gives
up can still exit: the interpreter never waits for it (a ThreadPoolExecutor's threads it does).

A name that does not resolve yet is normal at a group's start on Kubernetes: a headless Service
publishes rank 0's pod only once the pod has an address. So the rendezvous asks again until its
deadline, as torch's own store client does, but names the failure itself, as "does not resolve",
instead of leaving torch to time out on the connection.
"""

from __future__ import annotations

import socket
import threading
import time

RETRY_S = 0.25   # between lookups of a name that did not resolve


class NotResolved(OSError):
    """The name did not resolve: `reason` is the resolver's ("Name or service not known",
    "Temporary failure in name resolution"), or `timed_out` when it gave no answer in time."""

    def __init__(self, host: str, reason: str, timed_out: bool = False):
        super().__init__(f"{host} does not resolve ({reason})")
        self.host, self.reason, self.timed_out = host, reason, timed_out


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses `host` resolves to (sorted, without repeats), within `timeout` seconds.
    Raises NotResolved when the resolver fails or does not answer in time."""
    outcome: dict = {}

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=lookup, name="dscluster-resolve", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.0))
    if "infos" in outcome:
        return sorted({info[4][0] for info in outcome["infos"]})
    if "error" in outcome:
        error = outcome["error"]
        raise NotResolved(host, getattr(error, "strerror", None) or str(error)) from None
    raise NotResolved(host, f"no answer from the name service within {timeout:g} s", timed_out=True)


def resolve_until(host: str, port: int, deadline: float) -> list[str]:
    """`resolve`, asked again until it succeeds or `deadline` (time.monotonic()) passes; then the
    last failure is raised. Tries at least once."""
    while True:
        try:
            return resolve(host, port, max(deadline - time.monotonic(), 0.1))
        except NotResolved:
            if time.monotonic() + RETRY_S >= deadline:
                raise
        time.sleep(RETRY_S)

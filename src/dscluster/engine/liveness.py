"""Liveness: every rank proves it is alive through the rendezvous store, in a thread of its own.

Collectives alone cannot bound detection: a rank that hangs (SIGSTOP, a dead node, a cut link)
mid-forward leaves its peers blocked in a collective until the long collective timeout. So each
rank bumps a counter `beat/RANK` in the store every interval. Rank 0 watches every worker's
counter; workers watch rank 0's. A counter that does not move for `timeout` seconds, or a store
that stops answering, breaks the group: `on_failure(reason)` is called once, naming the rank.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from dscluster.errors import PeerFailure

log = logging.getLogger(__name__)


class LivenessMonitor:
    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int,
                 interval: float, timeout: float, on_failure: Callable[[str], None],
                 prefix: str = "dscluster"):
        self.rank = rank
        self.world_size = world_size
        self.interval = interval
        self.timeout = timeout
        self.on_failure = on_failure
        self.prefix = prefix
        self._store = dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                                    timeout=timedelta(seconds=max(timeout, 1.0)), wait_for_workers=False)
        self._stop = threading.Event()
        self._failed = False
        self._watched = [r for r in range(world_size) if r != rank] if rank == 0 else [0]
        self._last: dict[int, tuple[int, float]] = {}
        self.hosts: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="dscluster-liveness", daemon=True)
        self._fail_lock = threading.Lock()
        self._last_round = time.monotonic()

    # -- store keys ------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def start(self) -> None:
        self._store.set(self._key(f"host/{self.rank}"), socket.gethostname())
        self._beat()
        self._last_round = time.monotonic()
        self._thread.start()
        threading.Thread(target=self._watchdog, name="dscluster-liveness-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> int:
        return self._store.add(self._key(f"beat/{self.rank}"), 1)

    def counter(self, rank: int) -> int:
        return self._store.add(self._key(f"beat/{rank}"), 0)

    def host(self, rank: int) -> str:
        if rank not in self.hosts:
            try:
                key = self._key(f"host/{rank}")
                self.hosts[rank] = self._store.get(key).decode() if self._store.check([key]) else "?"
            except Exception:  # noqa: BLE001 - only for a nicer message
                return "?"
        return self.hosts[rank]

    def describe(self, rank: int) -> str:
        return f"rank {rank} (host {self.host(rank)})"

    # -- start-up barrier ------------------------------------------------------------------
    def mark_ready(self) -> None:
        self._ready_count(1)

    def wait_all_ready(self, poll: float = 0.05) -> None:
        """Wait until every rank has loaded its model; the monitor keeps watching meanwhile."""
        while self._ready_count(0) < self.world_size:
            if self._failed or self._stop.wait(poll):
                return

    def _ready_count(self, add: int) -> int:
        """The store lives in rank 0: losing it here means rank 0 is gone (a group failure, exit 3,
        not a crash), whichever of this and the watching thread notices first."""
        try:
            return self._store.add(self._key("ready"), add)
        except Exception as exc:  # noqa: BLE001 - DistNetworkError, DistStoreError, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerFailure(f"lost {self.describe(0)} while waiting for every rank to load ({first})") from exc

    # -- the watching thread ---------------------------------------------------------------
    def stale_ranks(self) -> list[int]:
        now = time.monotonic()
        return [r for r, (_, seen) in self._last.items() if now - seen > self.timeout]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                now = time.monotonic()
                for r in self._watched:
                    value = self.counter(r)
                    previous = self._last.get(r)
                    if previous is None or value != previous[0]:
                        self._last[r] = (value, now)
                self._last_round = time.monotonic()
                stale = self.stale_ranks()
                if stale:
                    who = ", ".join(self.describe(r) for r in stale)
                    self._fail(f"{who} stopped answering for more than {self.timeout:g} s")
                    return
            except Exception as exc:  # noqa: BLE001 - a store that fails is a broken group
                if self._stop.is_set():
                    return
                target = "rank 0 (it hosts the rendezvous store)" if self.rank != 0 else "the rendezvous store"
                self._fail(f"{target} is unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                return

    def _watchdog(self) -> None:
        """A store call can block far past its timeout: with a node's link cut, TCP retransmits
        for many minutes and `add` never returns. A watching round that has not completed within
        the timeout is therefore a failure as well."""
        while not self._stop.wait(self.interval):
            if self._failed:
                return
            stalled = time.monotonic() - self._last_round
            if stalled > self.timeout + self.interval:
                target = "rank 0 (it hosts the rendezvous store)" if self.rank != 0 else "the rendezvous store"
                self._fail(f"{target} is unreachable: no answer for {stalled:.1f} s")
                return

    def _fail(self, reason: str) -> None:
        with self._fail_lock:
            if self._failed:
                return
            self._failed = True
        self.on_failure(reason)

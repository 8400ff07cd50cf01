"""The start-up barrier when rank 0 (which hosts the rendezvous store) disappears: a worker waiting
for every rank to load must report a group failure (exit 3 through PeerFailure), not crash with
the store's network error (exit 1). A real TCPStore in a child process plays rank 0."""

import multiprocessing
import time

import pytest
import torch.distributed as dist

from dscluster.cluster.launch import free_port
from dscluster.engine.liveness import LivenessMonitor
from dscluster.errors import PeerFailure


def _host_store(port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    store.set("up", "1")
    time.sleep(600)


def test_lost_store_during_ready_barrier_is_a_peer_failure():
    port = free_port()
    rank0 = multiprocessing.get_context("spawn").Process(target=_host_store, args=(port,), daemon=True)
    rank0.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                monitor = LivenessMonitor("127.0.0.1", port, 1, 2, interval=30, timeout=5,
                                          on_failure=lambda reason: None, prefix="t")
                break
            except Exception:  # noqa: BLE001 - the store is not listening yet
                assert time.monotonic() < deadline, "the store never came up"
                time.sleep(0.2)
        monitor.mark_ready()  # only this rank: the barrier waits for rank 0
        rank0.kill()
        rank0.join(10)
        with pytest.raises(PeerFailure, match="lost rank 0"):
            monitor.wait_all_ready()
    finally:
        if rank0.is_alive():
            rank0.kill()

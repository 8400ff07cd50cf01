"""The control channel over its sockets, with real rank processes: rank 0 is this test process (it
also hosts the rendezvous store), the workers are spawned processes running `_worker`. Messages
with and without payload, row actions, failed-step counts and predict outcomes reach every rank;
a lost peer raises at once on the other end, a silent one after the timeout; a rank that never
connects is named."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dscluster.cluster.launch import free_port
from dscluster.engine.control_socket import LinkLost, open_link
from dscluster.engine.protocol import LEAVE, ControlChannel, Join, Op, prefill
from dscluster.errors import PeerFailure

KEY = "test/control"
SPAWN = multiprocessing.get_context("spawn")


def _worker(rank: int, world_size: int, port: int, timeout: float, results, micro_batches: int = 1) -> None:
    """A worker as run_worker plays it, scripted by the payloads: {"rows": n} sets the running rows
    after a step (a list: per micro-batch), {"fail_step": [ranks]} makes the step fail on those
    ranks, {"ok": [ranks]} decides a predict's outcome, {"sleep": s} takes that long. Sends what it
    saw, message by message."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=30))
    channel = ControlChannel(open_link(store, KEY, rank, world_size, "127.0.0.1", timeout, 30), rank, micro_batches)
    try:
        while True:
            message = channel.recv()
            seen = {"op": message.op.name, "actions": message.actions, "failed": message.failed,
                    "micro_batch": message.micro_batch,
                    "payload": pickle.dumps(message.payload)}  # plain bytes: the process may be gone when read
            script = message.payload if isinstance(message.payload, dict) else {}
            time.sleep(script.get("sleep", 0))
            if message.failed:
                channel.rows = [0] * micro_batches
            if message.op is Op.STEP and "rows" in script:
                rows = script["rows"]
                channel.rows = list(rows) if isinstance(rows, list) else [rows]
                channel.step_failed = rank in script.get("fail_step", ())
            if message.op is Op.PREDICT:
                seen["agreed"] = channel.agree_ok(rank in script.get("ok", ()))
            results.put((rank, seen))
            if message.op is Op.STOP:
                channel.close()
                return
    except LinkLost as exc:
        results.put((rank, {"lost": exc.ranks, "error": str(exc)}))


class Group:
    """Rank 0 here, workers in processes; `results` gets what each worker saw."""

    def __init__(self, world_size: int, timeout: float = 30.0, started: int | None = None, micro_batches: int = 1):
        """`started`: how many ranks start (rank 0 included); the others never do."""
        self.port = free_port()
        self.store = dist.TCPStore("127.0.0.1", self.port, world_size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30))
        self.results = SPAWN.Queue()
        self.procs = [SPAWN.Process(target=_worker, args=(r, world_size, self.port, timeout, self.results,
                                                          micro_batches),
                                    daemon=True) for r in range(1, started or world_size)]
        self.micro_batches = micro_batches
        for p in self.procs:
            p.start()
        self.timeout = timeout
        self.world_size = world_size

    def connect(self, setup_timeout: float = 60.0) -> ControlChannel:
        link = open_link(self.store, KEY, 0, self.world_size, "127.0.0.1", self.timeout, setup_timeout)
        return ControlChannel(link, 0, self.micro_batches)

    def seen(self, n: int) -> dict[int, list[dict]]:
        """The next n messages each worker reports, by rank."""
        out: dict[int, list[dict]] = {p: [] for p in range(1, self.world_size)}
        for _ in range(n * (self.world_size - 1)):
            rank, seen = self.results.get(timeout=60)
            if "payload" in seen:
                seen["payload"] = pickle.loads(seen["payload"])
            out[rank].append(seen)
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.join(10)


@pytest.fixture
def groups():
    made: list[Group] = []

    def make(*args, **kwargs) -> Group:
        made.append(Group(*args, **kwargs))
        return made[-1]

    yield make
    for g in made:
        g.close()


def test_three_ranks_in_lockstep(groups):
    group = groups(3)
    channel = group.connect()
    joins = [Join(7, (1, 2, 3), 3), Join(8, (4, 5), 2)]

    assert channel.send(Op.HEARTBEAT).failed == 0
    channel.send(Op.STEP, {"joins": joins, "rows": 2})                  # payload, no rows yet
    channel.rows = [2]
    channel.send(Op.STEP, {"rows": 2, "fail_step": [2]}, [41, prefill(1)])
    message = channel.send(Op.STEP, None, [42, LEAVE])                  # a decode step: header only
    assert message.failed == 1, "rank 2's failed step is counted in the next header"
    channel.rows = [0]                                                    # every rank drops the batch
    channel.step_failed = True                                          # rank 0's own step failed
    assert channel.send(Op.HEARTBEAT).failed == 1
    batch = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    channel.send(Op.PREDICT, {"ok": [1], "batch": batch})
    assert channel.agree_ok(True) == 1, "rank 2 failed the predict"
    channel.send(Op.PREDICT, {"ok": [1, 2]})
    assert channel.agree_ok(False) == 1, "rank 0 failed it"
    channel.send(Op.STOP)
    start = time.monotonic()
    channel.close()                                                     # waits until the workers closed
    assert time.monotonic() - start < 10

    seen = group.seen(8)
    for rank in (1, 2):
        ops = [s["op"] for s in seen[rank]]
        assert ops == ["HEARTBEAT", "STEP", "STEP", "STEP", "HEARTBEAT", "PREDICT", "PREDICT", "STOP"], ops
        hb, join, step, decode, failed_hb, predict, predict2, _ = seen[rank]
        assert hb["payload"] is None and hb["actions"] == [] and hb["failed"] == 0
        assert join["payload"]["joins"] == joins and join["actions"] == []
        assert step["actions"] == [41, prefill(1)] and step["failed"] == 0
        assert decode["actions"] == [42, LEAVE] and decode["payload"] is None and decode["failed"] == 1
        assert failed_hb["failed"] == 1
        assert torch.equal(predict["payload"]["batch"], batch) and predict["agreed"] == 1
        assert predict2["agreed"] == 1
    for p in group.procs:
        p.join(30)
        assert p.exitcode == 0


def test_steps_in_flight_within_the_window_are_reported_in_order(groups):
    """A pipeline's window of two: a step is sent while the worker still computes the one before (no
    wait for its report), the reports are read in order later, and a step's failure reaches the
    header after the window; each header is sized by its own micro-batch's rows."""
    group = groups(2, micro_batches=2)
    channel = group.connect()
    start = time.monotonic()
    assert channel.send(Op.STEP, {"sleep": 2.0, "rows": [1, 0]}, micro_batch=0, window=2).failed == 0
    channel.rows = [1, 0]
    sent = channel.send(Op.STEP, {"rows": [1, 2], "fail_step": [1]}, micro_batch=1, window=2)
    took = time.monotonic() - start
    assert sent.failed == 0 and took < 1.5, f"the second step waited {took:.1f} s for the first one's report"
    assert channel.steps_unreported == 2
    channel.rows = [1, 2]
    third = channel.send(Op.STEP, {"rows": [0, 2]}, [LEAVE], micro_batch=0, window=2)
    assert time.monotonic() - start >= 2.0, "the third step waited for the first one's report"
    assert third.failed == 0, "the second step's failure is not read until the window moves past it"
    channel.rows = [0, 2]
    assert channel.send(Op.HEARTBEAT).failed == 1, "a heartbeat reads every report: the failed step"
    assert channel.steps_unreported == 1
    channel.send(Op.STOP)
    channel.close()
    seen = group.seen(5)[1]
    assert [(s["op"], s["micro_batch"], s["actions"]) for s in seen] == [
        ("STEP", 0, []), ("STEP", 1, []), ("STEP", 0, [LEAVE]), ("HEARTBEAT", 0, []), ("STOP", 0, [])]
    assert [s["failed"] for s in seen] == [0, 0, 0, 1, 0]


def test_worker_killed_during_a_predict_raises_on_rank0_at_once(groups):
    group = groups(2, timeout=60.0)
    channel = group.connect()
    channel.send(Op.PREDICT, {"ok": [1], "sleep": 60})
    time.sleep(0.5)
    group.procs[0].kill()
    start = time.monotonic()
    with pytest.raises(LinkLost) as lost:
        channel.agree_ok(True)
    assert time.monotonic() - start < 30, "the closed socket is noticed, not the 60 s timeout"
    assert lost.value.ranks == [1] and "closed its control connection" in str(lost.value)


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_rank0_names_a_worker_lost_while_idle(groups, fault):
    """Killed: its closed socket is noticed at the next message, not after the long timeout; the
    other worker goes on. Stopped (SIGSTOP): its socket stays open, and the timeout names it (the
    only worker, so that no live worker slowed by a loaded machine is named with it)."""
    killed = fault == "killed"
    group = groups(3 if killed else 2, timeout=60.0 if killed else 1.5)
    channel = group.connect()
    channel.send(Op.HEARTBEAT)
    group.seen(1)
    worker, lost_rank = group.procs[-1], group.world_size - 1
    if killed:
        worker.kill()
        worker.join(10)
    else:
        os.kill(worker.pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(LinkLost) as lost:
        # killed: at the next message, whether or not it reported first; stopped: its report on the
        # first heartbeat may have gone out before the stop, then the second one never comes
        for _ in range(1 if killed else 3):
            channel.send(Op.HEARTBEAT)
    took = time.monotonic() - start
    assert lost.value.ranks == [lost_rank]
    if killed:
        assert "closed its control connection" in str(lost.value) and took < 30
    else:
        assert "stopped answering on the control channel for more than 1.5 s" in str(lost.value)
        assert 1.5 <= took < 30


def _rank0(port: int, hold: float) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    channel = ControlChannel(open_link(store, KEY, 0, 2, "127.0.0.1", 60, 30), 0)
    channel.send(Op.HEARTBEAT)
    time.sleep(hold)


@pytest.mark.parametrize("fault", ["killed", "silent"])
def test_worker_loses_rank0(fault):
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    rank0 = SPAWN.Process(target=_rank0, args=(port, 120), daemon=True)
    rank0.start()
    try:
        timeout = 60.0 if fault == "killed" else 2.0
        channel = ControlChannel(open_link(store, KEY, 1, 2, "127.0.0.1", timeout, 60), 1)
        assert channel.recv().op is Op.HEARTBEAT
        if fault == "killed":
            rank0.kill()
        start = time.monotonic()
        with pytest.raises(LinkLost) as lost:
            channel.recv()
        took = time.monotonic() - start
        assert lost.value.ranks == [0]
        if fault == "killed":
            assert "closed its control connection" in str(lost.value) and took < 30
        else:
            assert "stopped answering on the control channel for more than 2 s" in str(lost.value) and 2.0 <= took < 30
    finally:
        rank0.kill()
        rank0.join(10)


def test_setup_names_the_rank_that_never_connects(groups):
    group = groups(3, started=2)                                        # rank 2 never starts
    start = time.monotonic()
    with pytest.raises(PeerFailure, match=r"rank\(s\) 2 did not connect to rank 0 at 127\.0\.0\.1:\d+ within 3 s"):
        group.connect(setup_timeout=3)
    assert time.monotonic() - start < 30


def test_setup_ignores_strangers_and_a_worker_without_rank0_gives_up():
    store = dist.HashStore()
    found: dict = {}

    def rank0() -> None:
        try:
            found["link"] = open_link(store, KEY, 0, 2, "127.0.0.1", 10, 30)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            found["error"] = exc

    thread = threading.Thread(target=rank0)
    thread.start()
    store.wait([KEY])
    port = json.loads(store.get(KEY))["port"]
    with socket.create_connection(("127.0.0.1", port)) as stranger:    # a port scanner, a probe
        stranger.sendall(b"x" * 24)                                     # as long as a worker's hello
        assert stranger.recv(100) == b"", "rank 0 closes it without a word"
    worker = open_link(store, KEY, 1, 2, "127.0.0.1", 10, 30)
    thread.join(30)
    assert "error" not in found, found
    found["link"].broadcast([1, 2, 3], b"ok")
    values, payload = worker.receive()
    assert values.tolist() == [1, 2, 3] and payload == b"ok"
    worker.close()
    found["link"].close()

    with pytest.raises(PeerFailure, match="rank 0 did not publish its address within 0.5 s"):
        open_link(dist.HashStore(), KEY, 1, 2, "127.0.0.1", 10, 0.5)

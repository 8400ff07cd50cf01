"""A broken group ends every process within a bounded time (exit 3, naming the failed rank).

Ranks are started directly, without a supervising launcher, so that only the engine's own
detection (heartbeats, liveness counters, collective errors) is measured."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dscluster.cluster.launch import free_port

PROBE = Path(__file__).with_name("engine_probe.py")
INTERVAL, TIMEOUT = 0.5, 3.0
BOUND = TIMEOUT + 7.0  # detection timeout, plus exit grace and a noisy 2-core machine


class Group:
    """Two rank processes started by hand, with their logs in files."""

    def __init__(self, tmp_path: Path, model: str, work: dict, hold: float, pp: int = 1):
        self.ready = tmp_path / "ready"
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({
            "options": {"model": model, "engine": "tp", "heartbeat_interval": INTERVAL,
                        "heartbeat_timeout": TIMEOUT, "failure_grace": 0.2, "pp": pp},
            "work": work, "output": str(tmp_path / "out.json"), "ready_file": str(self.ready),
            "hold_seconds": hold}))
        port = free_port()
        self.logs = [tmp_path / f"rank{r}.log" for r in range(2)]
        self.procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DSCLUSTER_LAUNCHER="local",
                       OMP_NUM_THREADS="1")
            log = open(self.logs[rank], "w")
            self.procs.append(subprocess.Popen([sys.executable, str(PROBE), str(spec)], env=env,
                                               stdout=log, stderr=subprocess.STDOUT))

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert all(p.poll() is None for p in self.procs), self.log(0) + self.log(1)
            assert time.monotonic() < deadline, "ranks never became ready"
            time.sleep(0.1)

    def wait_exit(self, rank: int, bound: float) -> tuple[int, float]:
        start = time.monotonic()
        try:
            code = self.procs[rank].wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {rank} still running {bound} s after the fault:\n{self.log(rank)[-2000:]}")
        return code, time.monotonic() - start

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def group_factory(tmp_path, tiny):
    groups = []

    def make(work: dict | None = None, hold: float = 60, pp: int = 1) -> Group:
        g = Group(tmp_path, tiny, work or {}, hold, pp)
        groups.append(g)
        g.wait_ready()
        return g

    yield make
    for g in groups:
        g.kill_all()


LONG_GENERATION = {"generate": [{"prompt_ids": [1, 2, 3],
                                 "params": {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}}]}


@pytest.mark.parametrize("when", ["idle", "mid-batch"])
def test_worker_killed_ends_rank0(group_factory, when):
    group = group_factory(LONG_GENERATION if when == "mid-batch" else None, hold=0 if when == "mid-batch" else 60)
    time.sleep(1.0)
    group.procs[1].send_signal(signal.SIGKILL)
    code, took = group.wait_exit(0, BOUND)
    assert code == 3, group.log(0)[-2000:]
    assert "group broken" in group.log(0)
    assert "rank 1 (host" in group.log(0), "the exit message names the failed rank"


def test_rank0_killed_ends_worker(group_factory):
    group = group_factory()
    group.procs[0].send_signal(signal.SIGKILL)
    code, _ = group.wait_exit(1, BOUND)
    assert code == 3
    assert "rank 0" in group.log(1)


def test_hung_worker_is_named(group_factory):
    """SIGSTOP: the worker's sockets stay open, so only the liveness timeout can notice it."""
    group = group_factory()
    group.procs[1].send_signal(signal.SIGSTOP)
    try:
        code, _ = group.wait_exit(0, BOUND)
    finally:
        group.procs[1].send_signal(signal.SIGCONT)
    assert code == 3
    assert "rank 1" in group.log(0)


@pytest.mark.parametrize("stopped", [1, 0])
def test_hung_pipeline_stage_is_named(group_factory, stopped):
    """pp=2: one stage SIGSTOPped mid-generation. The other stage is blocked in a point-to-point
    hand-over (rank 0 waiting for the last stage's logits, rank 1 for rank 0's hidden states), whose
    sockets stay open; the liveness timeout still ends it, exit 3 naming the stopped rank."""
    group = group_factory(LONG_GENERATION, hold=0, pp=2)
    time.sleep(1.0)
    group.procs[stopped].send_signal(signal.SIGSTOP)
    survivor = 1 - stopped
    try:
        code, _ = group.wait_exit(survivor, BOUND)
    finally:
        group.procs[stopped].send_signal(signal.SIGCONT)
    assert code == 3, group.log(survivor)[-2000:]
    assert re.search(rf"group broken: .*\brank {stopped}\b", group.log(survivor)), group.log(survivor)[-2000:]

"""Thread policy of a rank (engine/threads.py): torch threads, and how idle OpenMP threads wait."""

from __future__ import annotations

import os
import subprocess
import sys

from dscluster.engine.threads import prefer_passive_openmp_wait, torch_threads

CORES = os.cpu_count() or 1


def test_front_end_rank_leaves_a_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torch_threads(1, runs_front_end=False) == CORES
    assert torch_threads(1, runs_front_end=True) == max(1, CORES - 1)
    assert torch_threads(2, runs_front_end=True) == max(1, CORES // 2 - 1)
    assert torch_threads(CORES * 4, runs_front_end=True) == 1


def test_launcher_or_user_thread_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(1, runs_front_end=True) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert torch_threads(1, runs_front_end=False) == CORES


def test_passive_wait_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    prefer_passive_openmp_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prefer_passive_openmp_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_wait_policy_is_set_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY once, when torch loads: the policy module must not load torch."""
    code = ("import sys; import dscluster.cli, dscluster.engine.threads as t; t.prefer_passive_openmp_wait(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

"""Thread policy of a rank (engine/threads.py): torch threads, and how idle OpenMP threads wait."""

from __future__ import annotations

import os
import subprocess
import sys

from dscluster.engine.threads import bound_openmp_spin, openmp_wait, torch_threads

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


def test_bounded_spin_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    bound_openmp_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "20000" and "OMP_WAIT_POLICY" not in os.environ
    assert openmp_wait() == "GOMP_SPINCOUNT=20000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    bound_openmp_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")       # a policy of the user's: no spin count added
    bound_openmp_spin()
    assert "GOMP_SPINCOUNT" not in os.environ and openmp_wait() == "OMP_WAIT_POLICY=PASSIVE"


def test_wait_policy_is_set_before_torch_loads():
    """libgomp reads its wait settings once, when torch loads: the policy module must not load torch."""
    code = ("import sys; import dscluster.cli, dscluster.engine.threads as t; t.bound_openmp_spin(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

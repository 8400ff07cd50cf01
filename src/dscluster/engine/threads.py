"""CPU threads of a rank: how many torch threads it runs, and how its idle OpenMP threads wait.

Rank 0 runs the front end (Uvicorn's event loop, or batch mode's in-process application) on the
same cores as its share of the model. Measured on 2 cores: two torch threads on a 1-rank server
made the loop wait for a core, and with other work on the machine one connection was answered in
24-28 ms instead of 4.9 ms; with `OMP_NUM_THREADS=1` it reached three times the throughput under
load. OpenMP threads that finish a parallel region keep spinning for a while (libgomp's default:
300,000 spins, milliseconds) and take the core from whatever else wants it; but a generation step
is a few hundred parallel regions back to back, and threads put to sleep after each one
(`OMP_WAIT_POLICY=PASSIVE`) must be woken for the next: measured on llama-100m, 16 decoding rows,
a step took 116 ms on one thread, 91-112 ms on two sleeping threads, 65 ms on two threads that spin
20,000 times (about a millisecond at most) before they sleep, the same as libgomp's default. So,
unless the user chose otherwise (OMP_WAIT_POLICY or GOMP_SPINCOUNT set):

- idle OpenMP threads spin briefly, then sleep (`GOMP_SPINCOUNT=20000`): libgomp reads it once,
  when torch loads, so it is set before torch is imported;
- the rank that runs the front end leaves one core of its share to it for predict units (short
  forward passes that come as fast as the front end can parse them), and uses its whole share
  for generation steps (long matrix multiplies, while the front end mostly waits for tokens).
  Measured on the generation benchmark: one torch thread on 2 cores made 0.81x
  `transformers serve --continuous-batching`'s tokens/s, two threads 0.92x
  (benchmarks/README.md has the figures after the key/value pool).

An explicit `OMP_NUM_THREADS`, `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` (a launcher's, the user's) always wins.
"""

from __future__ import annotations

import os


SPIN_COUNT = "20000"


def bound_openmp_spin() -> None:
    """Idle OpenMP threads spin briefly (hot for the next operation of a step), then sleep, unless
    the user set a wait policy. Call before torch is imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def openmp_wait() -> str:
    """The OpenMP wait settings in force, for the log."""
    return " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ) \
        or "libgomp's default wait"


def torch_threads(local_world_size: int, runs_front_end: bool) -> int:
    """OMP_NUM_THREADS when set; else this rank's share of the cores, less one for the front end."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    from dscluster.cluster.group import default_threads  # imports torch: not at module level

    share = default_threads(local_world_size)
    return max(1, share - 1) if runs_front_end else share

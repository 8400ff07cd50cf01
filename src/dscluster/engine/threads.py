"""CPU threads of a rank: how many torch threads it runs, and how its idle OpenMP threads wait.

Rank 0 runs the front end (Uvicorn's event loop, or batch mode's in-process application) on the
same cores as its share of the model. Measured on 2 cores: two torch threads on a 1-rank server
made the loop wait for a core, and with other work on the machine one connection was answered in
24-28 ms instead of 4.9 ms; with `OMP_NUM_THREADS=1` it reached three times the throughput under
load. OpenMP threads that finish a parallel region keep spinning for a while (libgomp's default
wait policy) and take the core from whatever else wants it. So, unless the user chose otherwise:

- idle OpenMP threads sleep (`OMP_WAIT_POLICY=PASSIVE`): libgomp reads it once, when torch loads,
  so it is set before torch is imported;
- the rank that runs the front end leaves one core of its share to it for predict units (short
  forward passes that come as fast as the front end can parse them), and uses its whole share
  for generation steps (long matrix multiplies, while the front end mostly waits for tokens).
  Measured on the generation benchmark: one torch thread on 2 cores made 0.81x
  `transformers serve --continuous-batching`'s tokens/s, two threads 0.92x
  (benchmarks/README.md has the figures after the key/value pool).

An explicit `OMP_NUM_THREADS` or `OMP_WAIT_POLICY` (a launcher's, the user's) always wins.
"""

from __future__ import annotations

import os


def prefer_passive_openmp_wait() -> None:
    """Idle OpenMP threads sleep instead of spinning. Call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def torch_threads(local_world_size: int, runs_front_end: bool) -> int:
    """OMP_NUM_THREADS when set; else this rank's share of the cores, less one for the front end."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    from dscluster.cluster.group import default_threads  # imports torch: not at module level

    share = default_threads(local_world_size)
    return max(1, share - 1) if runs_front_end else share

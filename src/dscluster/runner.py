"""`serve` and `batch` share one path: find out who we are, spawn local ranks if this process is a
node agent, else join the group, load the model, and play rank 0's role or a worker's.

Bad input is caught here before any rank starts (exit 2), not after every rank loaded a model.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dscluster.cluster.launch import launch
from dscluster.cluster.rendezvous import PER_NODE_LAUNCHERS, discover
from dscluster.engine.model_spec import check_model_spec
from dscluster.errors import EXIT_PEER_FAILED, UsageError

DEFAULT_BATCHED_TOKENS = 256  # a step of 256 tokens keeps decoding requests moving on CPUs, too

log = logging.getLogger(__name__)


def _preflight(args: argparse.Namespace, role: str) -> None:
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = max(DEFAULT_BATCHED_TOKENS, args.max_num_seqs)
    if args.max_num_batched_tokens < args.max_num_seqs:
        raise UsageError(f"--max-num-batched-tokens {args.max_num_batched_tokens} must be at least --max-num-seqs "
                         f"{args.max_num_seqs}: every running request computes one token per step")
    check_model_spec(args.model)
    if args.heartbeat_timeout <= args.heartbeat_interval:
        raise UsageError(f"--heartbeat-timeout {args.heartbeat_timeout:g} must exceed "
                         f"--heartbeat-interval {args.heartbeat_interval:g}")
    if role == "batch":
        from dscluster.batch import check_batch_files

        check_batch_files(args.input, args.output)
    if role == "serve" and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port (1-65535)")


def _sigusr1_means_sigterm() -> None:
    """mpirun turns a SIGTERM into SIGTERM to every rank followed by SIGKILL one second later
    (OpenMPI's odls_base_sigkill_timeout), too soon to drain; it forwards SIGUSR1 at once and
    nothing after. The rendered MPI launchers turn the pod's SIGTERM into SIGUSR1 to mpirun, and
    every rank handles SIGUSR1 as the SIGTERM it stands for (whatever SIGTERM does at that moment:
    rank 0 drains, a worker waits for rank 0's stop, a rank still loading ends)."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: signal.raise_signal(signal.SIGTERM))


def run(args: argparse.Namespace, role: str) -> int:
    _preflight(args, role)
    _sigusr1_means_sigterm()
    rdzv = discover(nproc_per_node=args.nproc)
    spawning = rdzv.spawn_local > 1 and (rdzv.launcher == "none" or rdzv.launcher in PER_NODE_LAUNCHERS)
    if args.nproc and not spawning and rdzv.launcher not in ("none", "local", *PER_NODE_LAUNCHERS):
        if args.nproc != rdzv.local_world_size:
            raise UsageError(f"--nproc {args.nproc} under {rdzv.launcher}, which already started "
                             f"{rdzv.local_world_size} rank(s) on this node: drop --nproc")
    if role == "serve" and (spawning or rdzv.rank == 0):
        from dscluster.serving.port import check_port_free

        check_port_free(args.host, args.port)
    if spawning:
        argv = getattr(args, "argv", None) or sys.argv[1:]
        # No launcher: this machine is the whole group, on a free port unless MASTER_PORT is set.
        node = None if rdzv.launcher == "none" else rdzv
        return launch([sys.executable, "-m", "dscluster", *argv], nproc=rdzv.spawn_local, rdzv=node)

    from dscluster.cluster.group import destroy_groups
    from dscluster.engine.client import make_engine
    from dscluster.engine.runtime import RuntimeOptions, build_runtime
    from dscluster.engine.worker import run_worker

    placeholder = None
    if role == "serve" and rdzv.rank == 0:  # 503 on the port, not a refused connection, while loading
        from dscluster.serving.placeholder import PlaceholderServer

        placeholder = PlaceholderServer(args.host, args.port, "loading: the group is forming and loading the model")
        placeholder.start()
    try:
        runtime = build_runtime(RuntimeOptions.from_args(args), rdzv)
    finally:
        if placeholder is not None:
            placeholder.stop()
    if rdzv.rank != 0:
        code = run_worker(runtime)
        destroy_groups()
        return code
    engine = make_engine(runtime)
    try:
        if role == "serve":
            from dscluster.serving.server import run_server

            code = run_server(engine, args)
        else:
            from dscluster.batch import run_batch

            code = run_batch(engine, args)
    finally:
        engine.shutdown()
    if engine.failure:
        print(f"dscluster: group broken: {engine.failure}", file=sys.stderr)
        return EXIT_PEER_FAILED
    destroy_groups()
    return code

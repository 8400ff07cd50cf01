"""The local launcher: start N ranks on this machine and supervise them like torchrun's agent.

Each rank is its own process with its rank in its environment. Output lines are prefixed with
the rank. SIGINT/SIGTERM are forwarded. When one rank fails, the others are terminated (then
killed after a grace period) and the launcher exits non-zero, so that whoever started it (a shell,
Kubernetes) sees one failure for the whole group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from dscluster.cluster.gpus import gpu_count
from dscluster.cluster.rendezvous import Rendezvous
from dscluster.errors import EXIT_PEER_FAILED

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def visible_gpus(environ: dict[str, str], gpu_count: int) -> list[str]:
    """GPU ids this node may use: CUDA_VISIBLE_DEVICES if set, else 0..gpu_count-1."""
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d for d in given.split(",") if d.strip()]
    return [str(i) for i in range(gpu_count)]


def rank_env(base: dict[str, str], rdzv: Rendezvous, local_rank: int, gpus: list[str]) -> dict[str, str]:
    """The environment of local rank `local_rank` on this node (rank offsets by the node's first rank)."""
    env = dict(base)
    child = Rendezvous(rank=rdzv.rank + local_rank, local_rank=local_rank, world_size=rdzv.world_size,
                       local_world_size=rdzv.spawn_local, master_addr=rdzv.master_addr,
                       master_port=rdzv.master_port, launcher="local", node_rank=rdzv.node_rank)
    env.update(child.torch_env())
    env["DSCLUSTER_LAUNCHER"] = "local"
    env["GROUP_RANK"] = str(rdzv.node_rank)
    if gpus:
        # One GPU per rank when there are enough; the rank then uses cuda:0.
        env["CUDA_VISIBLE_DEVICES"] = gpus[local_rank] if len(gpus) >= rdzv.spawn_local else ",".join(gpus)
    if "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // rdzv.spawn_local))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        try:
            out.buffer.write(prefix.encode() + line)
            out.flush()
        except (ValueError, OSError):
            pass
    stream.close()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def launch(cmd: Sequence[str], nproc: int, grace: float = 10.0, rdzv: Rendezvous | None = None,
           environ: dict[str, str] | None = None) -> int:
    """Run `cmd` as local ranks and supervise them. Returns the group's exit code.

    `rdzv` describes this node: the first rank it runs, the world size and the master. Without
    it this machine is the whole group (ranks 0..nproc-1, master on loopback, a free port).
    """
    base = dict(os.environ if environ is None else environ)
    if rdzv is None:
        port = int(base["MASTER_PORT"]) if base.get("MASTER_PORT") else free_port()
        rdzv = Rendezvous(0, 0, nproc, nproc, base.get("MASTER_ADDR") or "127.0.0.1", port, "local",
                          spawn_local=nproc)
    nproc = rdzv.spawn_local
    gpus = _gpus(base)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    stopping = {"signal": None}

    def forward(signum, _frame):
        stopping["signal"] = signum
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    # Forward signals before the first rank starts: a rank may be up (and be signalled) before
    # this thread gets to run again.
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for local_rank in range(nproc):
            if stopping["signal"] is not None:
                break
            env = rank_env(base, rdzv, local_rank, gpus)
            # Own session: a terminal's Ctrl-C reaches ranks once, through the launcher's forwarding.
            proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            procs.append(proc)
            prefix = f"[rank {rdzv.rank + local_rank}] "
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, prefix, out), daemon=True)
                t.start()
                pumps.append(t)
        if stopping["signal"] is not None:  # arrived while a rank was being started
            forward(stopping["signal"], None)
        code = _supervise(procs, rdzv.rank, grace, stopping)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for t in pumps:
            t.join(timeout=2)
    return code


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL this rank if the launcher dies (even by SIGKILL), so a
    killed launcher never leaves ranks behind holding ports, GPUs and half-written output."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: ranks then outlive a SIGKILLed launcher
        pass


def _gpus(base: dict[str, str]) -> list[str]:
    count = gpu_count()
    return visible_gpus(base, count) if count else []


def _supervise(procs: list[subprocess.Popen], first_rank: int, grace: float, stopping: dict) -> int:
    """Wait for all ranks; on the first failure stop the rest. Exit code: the failed rank's own
    code if it exited (1, 2, 3), 3 if it was killed by a signal, 0 when every rank exited 0."""
    failed: tuple[int, int] | None = None
    while True:
        alive = False
        for i, p in enumerate(procs):
            code = p.poll()
            if code is None:
                alive = True
            elif code != 0 and failed is None:
                failed = (first_rank + i, code)
                if stopping["signal"] is None:
                    print(f"dscluster launch: rank {first_rank + i} {_describe_exit(code)}; "
                          f"stopping the other ranks", file=sys.stderr, flush=True)
                _terminate(procs, grace)
        if not alive:
            break
        time.sleep(0.05)
    if failed is None:
        return 0
    rank, code = failed
    if stopping["signal"] is not None and code < 0:
        return 128 + stopping["signal"]
    return code if code > 0 else EXIT_PEER_FAILED


def _terminate(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every live rank now; a background timer SIGKILLs whatever is left after `grace`."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill_later():
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    threading.Thread(target=kill_later, daemon=True).start()

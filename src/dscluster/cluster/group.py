"""Process groups: the data group the model's collectives use, and a gloo control group.

The control group is always gloo, even on GPUs: rank 0 idles in it between requests, and an idle
NCCL collective would trip the NCCL watchdog. Transport code never imports DeepSpeed; the engine
hands the already-initialised default group to DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dscluster.cluster.rendezvous import Rendezvous
from dscluster.errors import PeerFailure, UsageError

log = logging.getLogger(__name__)


def resolve_backend(requested: str, cuda_available: bool | None = None) -> str:
    """auto = NCCL when CUDA is available, else gloo. NCCL without CUDA is a usage error."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise UsageError("--backend nccl needs CUDA GPUs, and none is visible: use --backend gloo")
    if requested not in ("nccl", "gloo"):
        raise UsageError(f"--backend {requested!r}: choose auto, nccl or gloo")
    return requested


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU a rank uses: its only visible GPU when the launcher pinned CUDA_VISIBLE_DEVICES
    to one device per rank, else the GPU numbered by its local rank."""
    if visible_devices <= 0:
        raise UsageError("no CUDA device is visible to this rank")
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise UsageError(f"local rank {local_rank} has no GPU: only {visible_devices} visible")
    return local_rank


@dataclass
class Groups:
    rdzv: Rendezvous
    backend: str
    control: dist.ProcessGroup | None
    device: torch.device

    @property
    def rank(self) -> int:
        return self.rdzv.rank

    @property
    def world_size(self) -> int:
        return self.rdzv.world_size


def join_store(rdzv: Rendezvous, timeout_s: float) -> dist.Store:
    """The env:// rendezvous store, bounded by `timeout_s`: rank 0 waits that long for every rank
    to connect, the others that long to reach rank 0. Raises PeerFailure naming what is missing,
    UsageError when rank 0 cannot listen on MASTER_PORT."""
    where = f"{rdzv.master_addr}:{rdzv.master_port}"
    outcome: dict = {}

    def attempt() -> None:
        try:
            outcome["store"] = next(dist.rendezvous("env://", rank=rdzv.rank, world_size=rdzv.world_size,
                                                    timeout=timedelta(seconds=timeout_s)))[0]
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            outcome["error"] = exc

    # A client connected to something that accepts but never answers (another program on
    # MASTER_PORT) waits in torch forever; the thread bounds it. Connect retries can overrun the
    # timeout by up to one more timeout, hence the factor 2.
    thread = threading.Thread(target=attempt, name="dscluster-rendezvous", daemon=True)
    thread.start()
    thread.join(2 * timeout_s + 5)
    if thread.is_alive():
        raise PeerFailure(f"rendezvous timed out after {timeout_s:g} s (--rendezvous-timeout): something at "
                          f"{where} accepted the connection but never answered as the rendezvous store; "
                          "is another program listening on MASTER_PORT on the master?")
    if "store" in outcome:
        return outcome["store"]
    try:
        raise outcome["error"]
    except dist.DistError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "EADDRINUSE" in text or "address already in use" in text:
            raise UsageError(f"rank 0 cannot listen on MASTER_PORT {rdzv.master_port}: the port is "
                             "already in use on this node; choose another MASTER_PORT") from None
        if rdzv.rank == 0:
            joined = re.search(r"(\d+)/(\d+) clients joined", text)
            count = f"only {joined.group(1)} of {joined.group(2)}" if joined else "not all"
            raise PeerFailure(f"rendezvous timed out after {timeout_s:g} s (--rendezvous-timeout): {count} "
                              f"ranks reached the master at {where}; check that every node started "
                              "and can reach this address") from None
        try:
            socket.getaddrinfo(rdzv.master_addr, rdzv.master_port)
            cause = "did not answer"
        except OSError:
            cause = "does not resolve"
        raise PeerFailure(f"rendezvous timed out after {timeout_s:g} s (--rendezvous-timeout): the master "
                          f"{where} (MASTER_ADDR, MASTER_PORT) {cause}; check the master address and "
                          "that rank 0 is running") from None


def init_groups(rdzv: Rendezvous, backend: str = "auto", timeout_s: float = 600.0,
                control_timeout_s: float = 600.0, rendezvous_timeout_s: float | None = None) -> Groups:
    """Join the default (data) group over env:// and create the gloo control group.
    `rendezvous_timeout_s` bounds forming the group (default: `timeout_s`)."""
    backend = resolve_backend(backend)
    rdzv.export()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", cuda_device_index(rdzv.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        store = join_store(rdzv, rendezvous_timeout_s or timeout_s)
        store.set_timeout(timedelta(seconds=timeout_s))
        _mark_joined()
        dist.init_process_group(backend=backend, store=store, rank=rdzv.rank,
                                world_size=rdzv.world_size, timeout=timedelta(seconds=timeout_s))
    control = None
    if rdzv.world_size > 1:
        control = (dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s))
                   if backend != "gloo" or control_timeout_s != timeout_s else dist.group.WORLD)
    log.info("rank %d/%d joined: backend=%s control=gloo master=%s:%d launcher=%s",
             rdzv.rank, rdzv.world_size, backend, rdzv.master_addr, rdzv.master_port, rdzv.launcher)
    return Groups(rdzv, backend, control, device)


_joined = False  # this process joined a process group (torch's C++ threads may be running)


def _mark_joined() -> None:
    global _joined
    _joined = True


def exit_now_if_joined(code: int) -> int:
    """End a process that joined a group with `code` once its work is flushed, skipping the
    interpreter's teardown: torch's C++ threads (gloo, the store client) can still be running
    then, and destroying them aborts the process ("terminate called without an active
    exception", SIGABRT) after a clean finish. Returns `code` when this process never joined."""
    if not _joined:
        return code
    # mpi4py (the master address) wants MPI finalized after a clean finish; after a failure, skip
    # it (it may wait for a dead peer) and let mpirun end the job.
    mpi = sys.modules.get("mpi4py.MPI")
    if code == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def destroy_groups() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown of a broken group must not mask the real error
            log.debug("destroy_process_group failed", exc_info=True)


def check_all_reduce(groups: Groups) -> int:
    """All-reduce each rank's (rank + 1): the sum proves every rank joined the same group."""
    t = torch.tensor([groups.rank + 1], dtype=torch.int64, device=groups.device)
    if groups.world_size > 1:
        dist.all_reduce(t)
    expected = groups.world_size * (groups.world_size + 1) // 2
    if int(t.item()) != expected:
        raise RuntimeError(f"all-reduce gave {int(t.item())}, expected {expected}")
    return int(t.item())


def default_threads(local_world_size: int) -> int:
    """Threads per rank when no launcher set OMP_NUM_THREADS: the cores split between local ranks."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))

"""Process groups: the data group the model's collectives use, and a gloo control group.

The control group is always gloo, even on GPUs: rank 0 idles in it between requests, and an idle
NCCL collective would trip the NCCL watchdog. Transport code never imports DeepSpeed; the engine
hands the already-initialised default group to DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dscluster.cluster.rendezvous import Rendezvous
from dscluster.errors import UsageError

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


def init_groups(rdzv: Rendezvous, backend: str = "auto", timeout_s: float = 600.0,
                control_timeout_s: float = 600.0) -> Groups:
    """Join the default (data) group over env:// and create the gloo control group."""
    backend = resolve_backend(backend)
    rdzv.export()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", cuda_device_index(rdzv.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rdzv.rank,
                                world_size=rdzv.world_size, timeout=timedelta(seconds=timeout_s))
    control = None
    if rdzv.world_size > 1:
        control = (dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s))
                   if backend != "gloo" or control_timeout_s != timeout_s else dist.group.WORLD)
    log.info("rank %d/%d joined: backend=%s control=gloo master=%s:%d launcher=%s",
             rdzv.rank, rdzv.world_size, backend, rdzv.master_addr, rdzv.master_port, rdzv.launcher)
    return Groups(rdzv, backend, control, device)


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

"""Split the loaded model across ranks: `tp` (DeepSpeed AutoTP), `zero3` (partitioned parameters,
gathered layer by layer on every forward), or `replicated` (every rank holds it all).

Every engine returns a plain module to call; all ranks must call it with the same inputs at the
same time (the protocol guarantees that). DeepSpeed is imported only here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dscluster.engine.loading import LoadedModel
from dscluster.errors import UsageError

log = logging.getLogger(__name__)

ENGINES = ("tp", "zero3", "replicated")


@dataclass
class ParallelModel:
    module: nn.Module
    engine: str
    tp_size: int
    description: str


def choose_engine(requested: str | None, loaded: LoadedModel, world_size: int) -> str:
    """Default: tp when there are several ranks and AutoTP can split the model, else replicated."""
    if requested is not None and requested not in ENGINES:
        raise UsageError(f"--engine {requested!r}: choose tp, zero3 or replicated")
    if world_size == 1:
        if requested in ("tp", "zero3"):
            log.info("one rank: --engine %s runs unsplit", requested)
        return "replicated"
    if requested is None:
        if loaded.hf:
            return "tp"
        log.info("AutoTP cannot split %s (not a transformers model): running it replicated on every rank; "
                 "--engine zero3 partitions its parameters", loaded.name)
        return "replicated"
    if requested == "tp" and not loaded.hf:
        raise UsageError(f"--engine tp needs a transformers model AutoTP can split; {loaded.name} is a plain "
                         "torch module: use --engine zero3 or replicated")
    return requested


def parallelize(loaded: LoadedModel, engine: str, world_size: int,
                zero3_persistence_threshold: int = 0, group=None) -> ParallelModel:
    """`group`: a gloo group of all ranks (the control group) for agreeing on shared memory."""
    if engine == "replicated" or world_size == 1:
        return ParallelModel(loaded.module, "replicated", 1, f"replicated on {world_size} rank(s)")
    import deepspeed

    _shared_memory_only_within_one_node(world_size, group)
    if engine == "tp":
        try:
            wrapped = deepspeed.init_inference(loaded.module, tensor_parallel={"tp_size": world_size},
                                               dtype=loaded.dtype, replace_with_kernel_inject=False)
        except AssertionError as exc:  # AutoTP's "Not able to determine model policy automatically"
            raise UsageError(f"--engine tp: DeepSpeed AutoTP cannot split {loaded.name}: {exc}; "
                             "use --engine zero3 or replicated") from None
        module = wrapped.module
        desc = f"tensor parallel (DeepSpeed AutoTP), tp={world_size}"
    elif engine == "zero3":
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": zero3_persistence_threshold},
        }
        if str(loaded.dtype) == "torch.bfloat16":
            config["bf16"] = {"enabled": True}
        elif str(loaded.dtype) == "torch.float16":
            config["fp16"] = {"enabled": True}
        wrapped, *_ = deepspeed.initialize(model=loaded.module, config=config)
        module = wrapped.module
        desc = f"ZeRO stage 3, parameters partitioned over {world_size} ranks"
    else:
        raise UsageError(f"--engine {engine!r}: choose tp, zero3 or replicated")
    module.eval()
    log.info("engine: %s", desc)
    return ParallelModel(module, engine, world_size if engine == "tp" else 1, desc)


def _shared_memory_only_within_one_node(world_size: int, group=None) -> None:
    """DeepSpeed's CPU shared-memory all-reduce is for ranks on one machine that agree on it. When
    ranks span nodes (LOCAL_SIZE < world size) DeepSpeed 0.19 still calls its kernel, on buffers it
    never set up, and every rank dies of SIGSEGV at the first all-reduce; when ranks disagree about
    LOCAL_SIZE (a hand-written environment) some wait in the kernel for peers that never come. So
    every rank reports its host and LOCAL_SIZE, and all of them use the kernel only when all are on
    one host with LOCAL_SIZE = world size; otherwise all skip it: plain gloo."""
    import socket

    import torch.distributed as dist

    mine = (socket.gethostname(), os.environ.get("LOCAL_SIZE", ""))
    views = [mine]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        views = [None] * dist.get_world_size(group)
        dist.all_gather_object(views, mine, group=group)
    if all(host == mine[0] and local == str(world_size) for host, local in views):
        return
    import importlib

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None
    hosts = len({host for host, _ in views})
    log.info("ranks on %d host(s), LOCAL_SIZE %s for a world of %d: all-reduce over the process group, "
             "no shared memory", hosts, "/".join(sorted({local or "unset" for _, local in views})), world_size)


def release_shared_memory(rank: int) -> bool:
    """Unlink this rank's DeepSpeed shared-memory all-reduce segment once every rank has mapped it.

    DeepSpeed creates one ~64 MiB /dev/shm segment per rank and never unlinks it, so each run
    leaks RAM (and a restarted container in the same pod would reopen stale segments). Every
    peer maps every segment during DeepSpeed's init, so after the group's ready barrier the name
    can go: the memory stays mapped until the processes exit, and is freed even after SIGKILL.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    path = Path("/dev/shm") / name
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not unlink %s: %s", path, exc)
        return False
    return True

"""Load the model split across ranks: `tp` (DeepSpeed AutoTP), `zero3` (partitioned parameters,
gathered layer by layer on every forward), or `replicated` (every rank holds it all).

Each engine reads only what its rank keeps: `tp` builds the model on the meta device, splits it with
AutoTP and fills each rank's shards from slices of the checkpoint files (`tp_load.py`); `zero3`
builds it under `deepspeed.zero.Init` and fills each rank's partitions from the files
(`zero3_load.py`); `replicated` loads it whole. Without safetensors files (a PyTorch .bin
checkpoint) or for an import-spec model, every rank loads the whole model and the engine splits it.

Loading is in two steps. `prepare` runs on every rank before any collective and names what is
wrong with the model for this engine (a missing tensor, a shape the config contradicts, heads that
do not divide by the tp degree) as a UsageError, so every rank exits 2 with the same one line
instead of some waiting in a collective for the others. `load_split` then loads and splits.

With `--pp N` (pipeline parallelism, engine/pipeline.py) the model is cut into N stages of
consecutive decoder layers before a weight is read: each rank builds only its stage's layers (on
the meta device), AutoTP splits them over the stage's ranks in a process group of their own, and
each rank reads its shards of its stage's tensors. Only transformers causal LMs whose decoder
layers sit in a ModuleList can be cut; anything else under `--pp` is a UsageError on every rank.

Every engine returns a plain module to call; all ranks must call it with the same inputs at the
same time (the protocol guarantees that). DeepSpeed is imported only here and in the two loaders.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dscluster.engine.checkpoint import DTYPES, SafetensorsCheckpoint
from dscluster.engine.host_memory import check_host_memory
from dscluster.engine.loading import LoadedModel, ModelSource, build_on_meta, load_whole, model_tensors
from dscluster.engine.pipeline import Pipeline, StageLayout, cut, decoder_parts, plan_layout, stage_groups
from dscluster.errors import UsageError

log = logging.getLogger(__name__)

ENGINES = ("tp", "zero3", "replicated")


@dataclass
class ParallelModel:
    module: nn.Module
    engine: str
    tp_size: int
    description: str
    pipeline: Pipeline | None = None     # --pp: this rank's stage and its hand-over

    @property
    def micro_batches(self) -> int:
        """Generation steps that can be in flight at once: one per pipeline stage, else one."""
        return self.pipeline.in_flight if self.pipeline is not None else 1


@dataclass
class Prepared:
    """A model checked for its engine on this rank, before any collective."""

    source: ModelSource
    engine: str
    world_size: int
    checkpoint: SafetensorsCheckpoint | None = None   # None: no safetensors (a .bin), or not a directory
    meta_module: nn.Module | None = None              # tp: the structure AutoTP splits
    keys: dict[str, str] | None = None                # tensor name (every alias) -> checkpoint key
    layout: StageLayout | None = None                 # --pp: this rank's pipeline stage


def choose_engine(requested: str | None, source: ModelSource | LoadedModel, world_size: int) -> str:
    """Default: tp when there are several ranks and AutoTP can split the model, else replicated."""
    if requested is not None and requested not in ENGINES:
        raise UsageError(f"--engine {requested!r}: choose tp, zero3 or replicated")
    if world_size == 1:
        if requested in ("tp", "zero3"):
            log.info("one rank: --engine %s runs unsplit", requested)
        return "replicated"
    if requested is None:
        if source.hf:
            return "tp"
        log.info("AutoTP cannot split %s (not a transformers model): running it replicated on every rank; "
                 "--engine zero3 partitions its parameters", source.name)
        return "replicated"
    if requested == "tp" and not source.hf:
        raise UsageError(f"--engine tp needs a transformers model AutoTP can split; {source.name} is a plain "
                         "torch module: use --engine zero3 or replicated")
    return requested


def prepare(source: ModelSource, engine: str, world_size: int, pp: int = 1, rank: int = 0) -> Prepared:
    """Check the model and its checkpoint for `engine` over `world_size` ranks (in `pp` pipeline
    stages; `rank`: this rank, whose stage is cut out). No collective."""
    if pp > 1:
        return _prepare_stage(source, engine, world_size, pp, rank)
    prepared = Prepared(source, engine, world_size)
    if not source.hf:
        return prepared
    split = engine == "tp" and world_size > 1
    if split:
        from dscluster.engine.tp_load import check_divisible

        check_divisible(source.config, world_size)
    prepared.checkpoint = SafetensorsCheckpoint.open(source.path)
    if prepared.checkpoint is None:
        log.warning("%s has no safetensors weights: every rank reads the whole checkpoint", source.path)
        return prepared
    meta = build_on_meta(source)
    tensors = model_tensors(meta)
    prepared.keys = prepared.checkpoint.locate(tensors.parameters, tensors.aliases, tensors.prefix,
                                               optional=tensors.buffers)
    prepared.meta_module = meta if split else None
    return prepared


def _prepare_stage(source: ModelSource, engine: str, world_size: int, pp: int, rank: int) -> Prepared:
    """--pp: this rank's stage of the model on the meta device, checked against the checkpoint."""
    if not source.hf:
        raise UsageError(f"--pp {pp}: {source.name} cannot be cut into pipeline stages: an import-spec model "
                         "(package.module:factory) has no decoder layers dscluster knows how to cut; drop --pp")
    if source.kind != "causal-lm":
        raise UsageError(f"--pp {pp}: {source.name} cannot be cut into pipeline stages: pipeline parallelism is "
                         "for causal language models; drop --pp")
    if engine != "tp" and world_size > 1:
        raise UsageError(f"--pp {pp} runs tensor parallelism inside each stage: use --engine tp (the default), "
                         f"not --engine {engine}")
    if world_size % pp:
        raise UsageError(f"--pp {pp}: the world of {world_size} rank(s) does not divide into {pp} stages of equal "
                         "size; start a multiple of --pp ranks")
    checkpoint = SafetensorsCheckpoint.open(source.path)
    if checkpoint is None:
        raise UsageError(f"--pp {pp}: {source.path} has no safetensors weights, which each stage reads its "
                         "layers from; convert the checkpoint to safetensors")
    meta = build_on_meta(source)
    layout = plan_layout(world_size, pp, rank, len(decoder_parts(meta, source.name).layers))
    if layout.tp_size > 1:
        from dscluster.engine.tp_load import check_divisible

        check_divisible(source.config, layout.tp_size)
    tensors = model_tensors(meta)
    keys = checkpoint.locate(tensors.parameters, tensors.aliases, tensors.prefix, optional=tensors.buffers)
    cut(meta, layout, source.name)
    return Prepared(source, "tp", world_size, checkpoint=checkpoint, meta_module=meta, keys=keys, layout=layout)


def _load_stage(prepared: Prepared, device: torch.device) -> tuple[LoadedModel, ParallelModel]:
    """--pp: this rank's stage read from the checkpoint (its tp shards of them when a stage has
    several ranks), and the pipeline that runs it."""
    source, layout, module = prepared.source, prepared.layout, prepared.meta_module
    prepared.meta_module = None
    group, logits_group = stage_groups(layout)        # every rank, before any DeepSpeed call
    if layout.tp_size > 1:
        use_accelerator(device)
        if device.type == "cpu":
            # DeepSpeed's CPU shared-memory all-reduce spans every rank of the machine, whatever
            # group it is given: a stage must all-reduce over its own group (plain gloo).
            _no_shared_memory_op("pipeline stages all-reduce within their own group")
        from dscluster.engine.tp_load import load_tensor_parallel

        module = load_tensor_parallel(source, module, prepared.checkpoint, prepared.keys, layout.tp_size, device,
                                      group=group)
    else:
        from dscluster.engine.device_load import fill_from_checkpoint, materialize_parameters

        buffers = {name: buf.clone() for name, buf in module.named_buffers(remove_duplicate=False)}
        if device.type == "cpu":
            need = sum(p.numel() * p.element_size() for p in module.parameters())
            check_host_memory(need, f"its pipeline stage ({_dtype_name(source.dtype)}, {layout.stages} stages)")
        materialize_parameters(module, device)
        fill_from_checkpoint(module, buffers, prepared.checkpoint, prepared.keys, device)
        module.eval()
    _check_device(module, device)
    config = source.config.get_text_config() if hasattr(source.config, "get_text_config") else source.config
    pipeline = Pipeline(module, decoder_parts(module, source.name), layout, int(config.hidden_size), source.dtype,
                        device, logits_group)
    desc = (f"pipeline parallel, pp={layout.stages} x tp={layout.tp_size}: {layout.describe()}; each rank read "
            f"its own stage's shards, on {device}")
    log.info("engine: %s", desc)
    return source.loaded(module), ParallelModel(module, "tp", layout.tp_size, desc, pipeline)


def load_split(prepared: Prepared, device: torch.device,
               zero3_persistence_threshold: int = 0) -> tuple[LoadedModel, ParallelModel]:
    """Load the prepared model onto `device` (this rank's: cuda:LOCAL_RANK with NCCL, else the CPU),
    split by its engine."""
    source, engine, world_size = prepared.source, prepared.engine, prepared.world_size
    if prepared.layout is not None:
        return _load_stage(prepared, device)
    if engine == "replicated" or world_size == 1:
        if device.type != "cpu" and prepared.checkpoint is not None:
            from dscluster.engine.device_load import load_whole_on_device

            module = load_whole_on_device(source, prepared.checkpoint, prepared.keys, device)
        else:
            if device.type == "cpu" and prepared.checkpoint is not None:
                check_host_memory(_converted_bytes(prepared), f"the whole model ({_dtype_name(source.dtype)}, "
                                  "converted from the checkpoint's dtype; one unsharded rank)")
            elif device.type != "cpu" and source.hf:
                log.warning("%s has no safetensors weights: the whole model is loaded on the host, then moved "
                            "to %s", source.name, device)
            module = load_whole(source, device)
        _check_device(module, device)
        desc = f"replicated on {world_size} rank(s), on {device}"
        return source.loaded(module), ParallelModel(module, "replicated", 1, desc)
    use_accelerator(device)
    import deepspeed

    if device.type == "cpu" and _shared_memory_only_within_one_node(world_size):
        build_shared_memory_op()  # timed and logged apart: a compile is no part of reading the model
    if engine == "tp":
        if prepared.meta_module is not None:
            from dscluster.engine.tp_load import load_tensor_parallel

            module = load_tensor_parallel(source, prepared.meta_module, prepared.checkpoint, prepared.keys,
                                          world_size, device)
            prepared.meta_module = None
            how = "each rank read its own shards"
        else:
            module = _autotp(load_whole(source), source, world_size)
            how = "split after every rank read the whole checkpoint"
        desc = f"tensor parallel (DeepSpeed AutoTP), tp={world_size}, {how}"
    elif engine == "zero3":
        config = _zero3_config(source.dtype, zero3_persistence_threshold)
        if prepared.checkpoint is not None:
            from dscluster.engine.zero3_load import load_zero3

            if device.type == "cpu":
                need = sum(-(-math.prod(prepared.checkpoint.tensors[k].shape) // world_size)
                           for k in set(prepared.keys.values())) * source.dtype.itemsize
                check_host_memory(need, f"its ZeRO-3 partitions ({_dtype_name(source.dtype)}, {world_size} ranks)")
            built = load_zero3(source, prepared.checkpoint, prepared.keys, config, device)
            how = "each rank read its own partitions"
        else:
            built = load_whole(source)
            how = "partitioned after every rank read the whole checkpoint"
        wrapped, *_ = deepspeed.initialize(model=built, config=config)
        module = wrapped.module
        desc = f"ZeRO stage 3, parameters partitioned over {world_size} ranks, {how}"
    else:
        raise UsageError(f"--engine {engine!r}: choose tp, zero3 or replicated")
    _check_device(module, device)
    module.eval()
    desc += f", on {device}"
    log.info("engine: %s", desc)
    parallel = ParallelModel(module, engine, world_size if engine == "tp" else 1, desc)
    return source.loaded(module), parallel


def use_accelerator(device: torch.device) -> None:
    """Make DeepSpeed's accelerator the kind of this rank's device, before DeepSpeed first picks one.

    DeepSpeed chooses its accelerator once per process (DS_ACCELERATOR, else CUDA when torch sees a
    GPU) and allocates AutoTP's and ZeRO-3's tensors there, whatever device the process group uses.
    `--backend gloo` on a GPU host puts the ranks on the CPU, so DeepSpeed must use the CPU too."""
    import sys

    kind = "cuda" if device.type == "cuda" else "cpu"
    os.environ["DS_ACCELERATOR"] = kind
    chosen = getattr(sys.modules.get("deepspeed.accelerator.real_accelerator"), "ds_accelerator", None)
    if chosen is not None and chosen.device_name() != kind:
        raise RuntimeError(f"DeepSpeed already chose the {chosen.device_name()} accelerator in this process; "
                           f"this rank runs on {device}")


def _autotp(module: nn.Module, source: ModelSource, world_size: int) -> nn.Module:
    """AutoTP on a whole model (a checkpoint without safetensors): every rank held it all first."""
    import deepspeed

    try:
        wrapped = deepspeed.init_inference(module, tensor_parallel={"tp_size": world_size}, dtype=source.dtype,
                                           replace_with_kernel_inject=False)
    except AssertionError as exc:  # AutoTP's "Not able to determine model policy automatically"
        raise UsageError(f"--engine tp: DeepSpeed AutoTP cannot split {source.name}: {exc}; "
                         "use --engine zero3 or replicated") from None
    return wrapped.module


def _converted_bytes(prepared: Prepared) -> int:
    """Host memory a whole-model load allocates: tensors stored in the serving dtype are mapped from
    the file by transformers (pages the kernel can reclaim); the others are converted into new
    memory."""
    dtype = prepared.source.dtype
    stored = {prepared.checkpoint.tensors[k] for k in prepared.keys.values()}
    return sum(math.prod(t.shape) * dtype.itemsize for t in stored if DTYPES[t.dtype] != dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _zero3_config(dtype: torch.dtype, persistence_threshold: int) -> dict:
    """ZeRO-3 for serving: gathered parameters are released as soon as their module has run.
    DeepSpeed's defaults (made for training) keep up to 1e9 gathered parameters alive and reuse
    them within a distance of 1e9: after one forward pass a rank held the whole model again."""
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold,
                              "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                              "stage3_prefetch_bucket_size": 0},
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    return config


def _check_device(module: nn.Module, device: torch.device) -> None:
    """Every parameter this rank holds (its ZeRO-3 partition, or its shard) is on its device."""
    for name, param in module.named_parameters():
        held = getattr(param, "ds_tensor", param)
        if held.device.type != device.type or (device.index is not None and held.device.index != device.index):
            raise RuntimeError(f"{name} is on {held.device}, not on this rank's {device}")


def _shared_memory_only_within_one_node(world_size: int) -> bool:
    """DeepSpeed's CPU shared-memory all-reduce is for ranks on one machine that agree on it. When
    ranks span nodes (LOCAL_SIZE < world size) DeepSpeed 0.19 still calls its kernel, on buffers it
    never set up, and every rank dies of SIGSEGV at the first all-reduce; when ranks disagree about
    LOCAL_SIZE (a hand-written environment) some wait in the kernel for peers that never come. So
    every rank reports its host and LOCAL_SIZE, and all of them use the kernel only when all are on
    one host with LOCAL_SIZE = world size; otherwise all skip it: plain gloo. (The views go over the
    default group, gloo on the CPU; on GPUs DeepSpeed has no such op, and this is not called.)"""
    import socket

    import torch.distributed as dist

    mine = (socket.gethostname(), os.environ.get("LOCAL_SIZE", ""))
    views = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, mine)
    if all(host == mine[0] and local == str(world_size) for host, local in views):
        return True
    hosts = len({host for host, _ in views})
    _no_shared_memory_op(f"ranks on {hosts} host(s), LOCAL_SIZE {'/'.join(sorted({local or 'unset' for _, local in views}))} "
                         f"for a world of {world_size}")
    return False


def _no_shared_memory_op(why: str) -> None:
    """DeepSpeed all-reduces over the process group (gloo), never its shared-memory op."""
    import importlib

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None
    log.info("%s: all-reduce over the process group, no shared memory", why)


def build_shared_memory_op():
    """DeepSpeed's CPU shared-memory all-reduce op: compiled into the torch extensions cache
    (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions) unless it is there already, and loaded.
    Returns the loaded module, or None where DeepSpeed has no such op for this machine.

    `make install` runs this (`python -m dscluster.engine.parallel`), so that the first `serve`
    loads the op instead of compiling it (about 40 s on 2 cores). A rank calls it before loading
    the model: a compile then shows in the log as one, not as slow reading of the checkpoint.

    The compile runs under the ninja of dscluster's own environment (the `ninja` package, which
    DeepSpeed requires), not whichever one PATH finds first: with none on PATH (an environment not
    activated, no system ninja) DeepSpeed could not build the op and every rank failed at start,
    and ninja rebuilds everything when another version wrote the cache."""
    import time

    use_accelerator(torch.device("cpu"))
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not __compatible_ops__.get(builder.NAME, False):
        return None
    path = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:  # DeepSpeed then uses the ninja on PATH, if any
        pass
    started, started_at = time.monotonic(), time.time()
    try:
        op = builder.load()  # DeepSpeed keeps it: its own build_shm_op later returns this module
    finally:
        os.environ["PATH"] = path
    library = Path(op.__file__)
    if library.stat().st_mtime >= started_at:
        log.info("DeepSpeed's shared-memory all-reduce op: compiled in %.1f s into %s (once; `make install` "
                 "compiles it ahead of the first start)", time.monotonic() - started, library.parent)
    else:
        log.info("DeepSpeed's shared-memory all-reduce op: loaded from %s in %.1f s", library,
                 time.monotonic() - started)
    return op


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


if __name__ == "__main__":  # `make install`: compile the op now rather than at the first start
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if build_shared_memory_op() is None:
        log.info("DeepSpeed has no shared-memory all-reduce op for this machine: nothing to build")

"""Tensor parallelism that splits memory: each rank materialises and reads only its own shards.

1. The model is built with its parameters on the meta device (no memory) and its buffers real.
2. DeepSpeed AutoTP (`init_inference(..., replace_with_kernel_inject=False)`, no checkpoint) swaps
   in its tensor-parallel layers. On a meta model it leaves every parameter in its shard's shape,
   allocated on the accelerator's device but uninitialised (CPU pages untouched, so no resident
   memory yet), and it empties the buffers too.
3. Every parameter is filled from its slice of the safetensors files: the split dimension is the
   one where the shard's shape differs from the checkpoint tensor's, the offsets come from
   DeepSpeed's own shard-size rule (`tp_shard.get_shard_size_list`, the rule its layers split by)
   and this rank's size is checked against it. Unsplit tensors (norms, the embedding) are read
   whole. Buffers get back the values the constructor computed.

The reads go straight into the parameters' storage on the rank's device (the dtype converted per
tensor; `engine/checkpoint.py`), so a rank never holds more than its shards plus a 16 MiB staging
buffer. `check_divisible` and the checkpoint check run earlier (`parallel.prepare`), on every rank
alike and before any collective.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from dscluster.engine.checkpoint import SafetensorsCheckpoint
from dscluster.engine.device_load import fill_from_checkpoint, materialize_parameters
from dscluster.engine.host_memory import check_host_memory
from dscluster.engine.loading import ModelSource
from dscluster.errors import UsageError

log = logging.getLogger(__name__)


def check_divisible(config, tp_size: int) -> None:
    """Attention heads and the MLP width must split evenly over the ranks, so every rank holds an
    equal share (and `dscluster plan` recommends only such degrees). Heads are counted as DeepSpeed
    counts them. Fewer key/value heads than ranks is allowed: AutoTP gives each rank whole
    key/value groups, the ranks past the last group hold no attention weights, and the output is
    still the unsharded model's (measured: tp=4 with 2 key/value heads)."""
    from deepspeed.module_inject.tp_shard import AutoTPMeta

    meta = AutoTPMeta.from_model_config(config)
    text = getattr(config, "text_config", None) or config
    for label, value in (("num_attention_heads", meta.num_attention_heads),
                         ("intermediate_size", getattr(text, "intermediate_size", None))):
        if isinstance(value, int) and value % tp_size:
            raise UsageError(f"--engine tp over {tp_size} ranks: config.json's {label} {value} does not divide "
                             f"by {tp_size}; use a tensor-parallel degree that divides it")


def load_tensor_parallel(source: ModelSource, meta_module: nn.Module, checkpoint: SafetensorsCheckpoint,
                         keys: dict[str, str], tp_size: int, device: torch.device, group=None) -> nn.Module:
    """`meta_module` (from `build_on_meta`) split by AutoTP and filled with this rank's shards
    from `checkpoint` (`keys`: parameter or buffer name -> checkpoint key), on `device`. `group`:
    the ranks it is split over (a pipeline stage's), default every rank."""
    import deepspeed

    buffers = {name: buf.clone() for name, buf in meta_module.named_buffers(remove_duplicate=False)}
    started = time.monotonic()
    tensor_parallel = {"tp_size": tp_size}
    if group is not None:
        from dscluster.engine.pipeline import StageGroup

        deepspeed.init_distributed()   # what DeepSpeed does itself when it makes its own group
        tensor_parallel.update(tp_group=group, mpu=StageGroup(group))
    try:
        wrapped = deepspeed.init_inference(meta_module, tensor_parallel=tensor_parallel, dtype=source.dtype,
                                           replace_with_kernel_inject=False)
    except AssertionError as exc:  # AutoTP's "Not able to determine model policy automatically"
        raise UsageError(f"--engine tp: DeepSpeed AutoTP cannot split {source.name}: {exc}; "
                         "use --engine zero3 or replicated") from None
    module = wrapped.module
    if device.type == "cpu":  # the shards exist, untouched: check before a byte is written
        need = sum(p.numel() * p.element_size() for p in module.parameters())
        check_host_memory(need, f"its tensor-parallel shards ({str(source.dtype).replace('torch.', '')}, tp={tp_size})")
    materialize_parameters(module, device)  # AutoTP allocated them on its accelerator: make sure it is ours
    copied = fill_from_checkpoint(module, buffers, checkpoint, keys, device,
                                  lambda name, shard, full: shard_of(module, name, shard, full))
    log.info("tp rank %d/%d: read %.1f MiB of shards from %d checkpoint file(s) onto %s in %.1f s",
             _tp_rank(module), tp_size, copied / 2**20, len(checkpoint.files), device, time.monotonic() - started)
    return module.eval()


def shard_of(module: nn.Module, name: str, shard: tuple[int, ...], full: tuple[int, ...]
             ) -> tuple[int | None, int, int]:
    """(dim, start, length) of parameter `name`'s shard within the checkpoint tensor of shape
    `full`; (None, 0, 0) when AutoTP left it whole. The offsets follow DeepSpeed's shard sizes
    for the layer that owns it, checked against the shape AutoTP gave this rank."""
    from deepspeed.module_inject.tp_shard import get_shard_size_list

    if shard == full:
        return None, 0, 0
    split = [d for d in range(len(full)) if len(shard) == len(full) and shard[d] != full[d]]
    if len(split) != 1:
        raise RuntimeError(f"AutoTP made {name} {list(shard)} from {list(full)}: not a split along one dimension")
    dim = split[0]
    owner = module.get_submodule(name.rpartition(".")[0])
    if not hasattr(owner, "tp_meta"):
        raise RuntimeError(f"{name} is {list(shard)} of {list(full)}, but {type(owner).__name__} is no AutoTP layer")
    sizes = get_shard_size_list(full[dim], owner.tp_world_size, owner.tp_meta, owner.name)
    frozen = getattr(owner, "_partition_sizes", None)
    if frozen is not None and tuple(frozen) != tuple(sizes):
        raise RuntimeError(f"{name}: DeepSpeed's shard sizes {list(sizes)} differ from the layer's {list(frozen)}")
    if sizes[owner.tp_index] != shard[dim]:
        raise RuntimeError(f"{name}: rank {owner.tp_index}'s shard is {shard[dim]} along dim {dim}, "
                           f"DeepSpeed's rule gives {sizes[owner.tp_index]} of {list(sizes)}")
    return dim, sum(sizes[:owner.tp_index]), shard[dim]


def _tp_rank(module: nn.Module) -> int:
    return next((m.tp_index for m in module.modules() if hasattr(m, "tp_index")), 0)

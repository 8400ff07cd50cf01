"""Parameters made on the rank's device and filled from the checkpoint files, never held whole on
the host first.

Two loaders fill a model this way: the tensor-parallel one (`tp_load.py`: each rank its shards)
and, here, the whole model read straight onto a GPU (one rank, or the `replicated` engine on
CUDA). transformers' `from_pretrained` would build the model on the host and a `.to("cuda")`
would then copy it over: a full host copy per rank, which a node serving several GPUs of one
large model cannot afford. Instead the model is built on the meta device (`build_on_meta`: no
memory), each parameter is allocated on the device, and the checkpoint's bytes go through one
page-locked staging buffer into it (`checkpoint.py`).

On the CPU the whole model still comes from `from_pretrained`: it maps the files, so tensors
stored in the serving dtype are pages the kernel can reclaim (`host_memory.py` counts on that).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from dscluster.engine.checkpoint import SafetensorsCheckpoint, TensorRead
from dscluster.engine.loading import ModelSource, build_on_meta

log = logging.getLogger(__name__)

# (parameter name, its shape on this rank, the stored shape) -> (dim, start, length) to read
Slicer = Callable[[str, tuple[int, ...], tuple[int, ...]], tuple[int | None, int, int]]


def materialize_parameters(module: nn.Module, device: torch.device) -> None:
    """Give every parameter that is on the meta device, or on another device than `device`, fresh
    uninitialised storage on `device`. Tied parameters stay one parameter: each is replaced once
    and the replacement put wherever the original was. (`param.data = ...` cannot turn a meta
    tensor into a real one, and `Module.to_empty` unties shared parameters.)"""
    replaced: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for attr, param in owner._parameters.items():
            if param is None or (not param.is_meta and param.device == device):
                continue
            new = replaced.get(id(param))
            if new is None:
                data = torch.empty(param.shape, dtype=param.dtype, device=device)
                new = type(param)(data, requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)  # Parameter subclasses keep their attributes
                replaced[id(param)] = new
            owner._parameters[attr] = new


def fill_from_checkpoint(module: nn.Module, buffers: dict[str, torch.Tensor], checkpoint: SafetensorsCheckpoint,
                         keys: dict[str, str], device: torch.device, slicer: Slicer | None = None) -> int:
    """Read every parameter of `module` (already on `device`) from `checkpoint` (`keys`: name ->
    checkpoint key), sliced by `slicer` when this rank holds a shard, and put `buffers` (the
    values the model's constructor computed) back on `device`; persistent buffers the checkpoint
    holds are read from it. Returns the bytes copied."""
    reads = []
    for name, param in module.named_parameters():
        if name not in keys:
            raise RuntimeError(f"the loaded model has a parameter {name} that the checkpoint check did not see")
        if param.is_meta or param.device != device:
            raise RuntimeError(f"{name} is on {param.device}, not on {device}, before it is read")
        stored = checkpoint.tensors[keys[name]].shape
        where = slicer(name, tuple(param.shape), stored) if slicer is not None else (None, 0, 0)
        reads.append(TensorRead(keys[name], param.data, *where))
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        holder = module.get_submodule(owner)
        holder._buffers[attr] = value.to(device)
        if name in keys:  # a persistent buffer the checkpoint holds
            reads.append(TensorRead(keys[name], holder._buffers[attr]))
    return checkpoint.read(reads)


def load_whole_on_device(source: ModelSource, checkpoint: SafetensorsCheckpoint, keys: dict[str, str],
                         device: torch.device) -> nn.Module:
    """The whole model, its parameters allocated on `device` and read there from the checkpoint."""
    started = time.monotonic()
    module = build_on_meta(source)
    buffers = {name: buf.clone() for name, buf in module.named_buffers(remove_duplicate=False)}
    materialize_parameters(module, device)
    copied = fill_from_checkpoint(module, buffers, checkpoint, keys, device)
    log.info("read %.1f MiB of weights from %d checkpoint file(s) straight onto %s in %.1f s",
             copied / 2**20, len(checkpoint.files), device, time.monotonic() - started)
    return module.eval()

"""ZeRO-3 that partitions while loading: each rank reads only its own partition of every parameter.

The model is built under `deepspeed.zero.Init`: as each submodule is constructed, its parameters
are partitioned and the full tensors freed, so construction holds one module's parameters at most
(with weight initialisation switched off, those are never even written). ZeRO-3 keeps, on rank r,
the entries [r x p, (r + 1) x p) of each flattened parameter, p = ceil(numel / ranks) (the last
partition padded). So each rank reads exactly that range from the checkpoint (the rows that hold
it) into its partition: no rank gathers a parameter or reads another rank's share, and loading
needs no collective at all. Then `deepspeed.initialize` takes the partitioned model as it is.

Measured against transformers' own route (`HfDeepSpeedConfig` alive, then `from_pretrained`, where
rank 0 reads every value and each layer is gathered and broadcast): see docs/loading.md.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from dscluster.engine.checkpoint import SafetensorsCheckpoint, TensorRead
from dscluster.engine.loading import ModelSource, construct

log = logging.getLogger(__name__)


def load_zero3(source: ModelSource, checkpoint: SafetensorsCheckpoint, keys: dict[str, str], config: dict,
               device: torch.device) -> nn.Module:
    """The model partitioned by ZeRO-3 over all ranks (`config`: the ZeRO-3 config
    `deepspeed.initialize` gets too), this rank's partitions read from `checkpoint`."""
    import deepspeed
    import torch.distributed as dist
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.enter_context(no_init_weights())
        stack.enter_context(prevent_arange_dtype_change())  # rotary buffers keep the dtypes they ask for
        # The dtype comes from the config (bf16 / fp16 enabled, else float32). Passing `dtype=`
        # instead gives bfloat16 on a CPU whatever is asked (DeepSpeed 0.19 reads it as
        # `dtype or float16 if fp16 supported else bfloat16 if ...`).
        stack.enter_context(deepspeed.zero.Init(config_dict_or_path=config))
        module = construct(source)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    reads = []
    for name, param in module.named_parameters():
        part = param.ds_tensor
        ranks = dist.get_world_size(param.ds_process_group)
        rank = dist.get_rank(param.ds_process_group)
        size = -(-param.ds_numel // ranks)
        if part.numel() != size or part.device != device:
            raise RuntimeError(f"ZeRO-3 partition of {name}: {part.numel()} entries on {part.device}, expected "
                               f"{size} on {device}")
        start = rank * size
        length = max(0, min(size, param.ds_numel - start))
        if length:
            reads.append(TensorRead(keys[name], part.narrow(0, 0, length), start=start, length=length, flat=True))
    for name, buf in module.named_buffers():
        if name in keys:  # a persistent buffer the checkpoint holds; ZeRO-3 does not partition buffers
            reads.append(TensorRead(keys[name], buf))
    copied = checkpoint.read(reads)
    log.info("zero3 rank %d: read %.1f MiB of partitions from %d checkpoint file(s) onto %s in %.1f s",
             dist.get_rank(), copied / 2**20, len(checkpoint.files), device, time.monotonic() - started)
    return module

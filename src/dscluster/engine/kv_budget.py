"""Every rank: how many bytes its key/value pool may take, from the memory it runs in.

- `--kv-cache-memory BYTES`: exactly that, on any device.
- GPU: `--gpu-memory-utilization` of the device (vLLM's default 0.9), less what is already in use
  on it (the weights, CUDA's own, other processes) and the activation peak of the largest step,
  measured by running one (engine/batch.py `probe`).
- CPU: the memory limit the process runs under (engine/host_memory.py: cgroup v2 `memory.max`,
  cgroup v1 `memory.limit_in_bytes`, shared by the ranks of the node), less what is already in
  use (interpreter, libraries, weights), an estimate of the activation peak and a margin. Without
  any cgroup limit it does not claim the host: at most DEFAULT_CPU_BYTES (as vLLM's CPU backend
  takes 4 GiB), and never more than half of what the node has available. The pool's pages are
  committed only when first written, so an idle server stays light whatever the pool's size.

Every rank sizes its own pool; the group takes the smallest block count (`Runtime`), so block
decisions mean the same on every rank.
"""

from __future__ import annotations

import torch

from dscluster.engine.host_memory import GIB, host_memory

DEFAULT_CPU_BYTES = 4 * GIB
MIB = 2**20


def activation_estimate(config, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a forward pass of `tokens` tokens keeps alive at its peak, over-estimated: a few hidden
    states, the MLP's intermediate activations, q/k/v, and a chunk's attention scores."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    size = torch.empty((), dtype=dtype).element_size()
    per_token = (8 * hidden + 3 * inter) * size
    scores = heads * tokens * tokens * 4
    return 2 * (tokens * per_token + scores)


def kv_cache_budget(device: torch.device, *, kv_cache_memory: int | None, gpu_memory_utilization: float,
                    activation: int) -> tuple[int, str]:
    """Bytes for this rank's pool, and a phrase saying where the number comes from."""
    if kv_cache_memory is not None:
        return kv_cache_memory, "--kv-cache-memory"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * gpu_memory_utilization) - (total - free) - activation
        return max(0, budget), (f"--gpu-memory-utilization {gpu_memory_utilization} of {total / GIB:.1f} GiB, "
                                f"less {(total - free) / GIB:.2f} GiB in use and {activation / GIB:.2f} GiB "
                                "of activations")
    memory = host_memory()
    margin = 64 * MIB + memory.room // 20
    room = max(0, memory.room - activation - margin)
    if "cgroup" in memory.source:
        return room, f"{memory.room / GIB:.2f} GiB left under {memory.source}"
    return min(room // 2, DEFAULT_CPU_BYTES), (f"no memory limit found: at most {DEFAULT_CPU_BYTES / GIB:.0f} GiB "
                                                "(--kv-cache-memory sets it)")

"""Every rank: the key/value cache's pool of blocks, and the attention that reads it.

The pool holds, per layer, a key and a value tensor of shape [kv heads, blocks x block size, head
dim] (head-major), where the heads are this rank's share (tensor parallelism splits them). It is
allocated once, at its full size, when the first layer is first written (only the attention layer
knows this rank's head count, head size and dtype); on the CPU its pages are committed only when a
token is first written to them. Which request holds which blocks is rank 0's decision
(engine/kv_blocks.py), applied identically on every rank. A request holds one run of consecutive
blocks, so its keys and values at positions [0, n) are the view `pool[:, base:base + n]` of the
pool (base = its run's first block x block size): attention reads them in place, with no gather.

A step's tokens go through the model as one packed sequence [1, N] (every request's new tokens
side by side, with their own position ids), so every linear layer runs once per step for all
requests together. Attention is the only place the requests must be kept apart; it is done here,
through transformers' attention interface (`attn_implementation`), for the model's own attention
modules, whatever engine split them: each token's key and value are written at its slot in the
pool, then each request's new tokens attend to its own view, one
`scaled_dot_product_attention` per request (causally from its chunk's offset for a prompt chunk).
Measured on this CPU, one call per request over views of the pool costs within a few percent of
one batched call over a dense padded cache (docs/architecture.md).

Outside a generation step (a predict unit runs between steps), calls go to the model's original
attention and mask functions untouched.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATION = "dscluster_batch"

_active = threading.local()  # the step being computed in this thread, if any


class KVPool:
    """Per-layer key and value tensors of `num_blocks` blocks of `block_size` positions."""

    def __init__(self, device: torch.device, num_blocks: int, block_size: int):
        self.device = device
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.slots = num_blocks * block_size
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._bytes: dict[int, int] = {}     # per layer; read by the metrics thread, so kept apart

    def layer(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value pool, allocated (uninitialised) at its first use."""
        k = self.keys.get(layer)
        if k is None:
            k = torch.empty(key.shape[1], self.slots, key.shape[-1], dtype=key.dtype, device=self.device)
            v = torch.empty(value.shape[1], self.slots, value.shape[-1], dtype=value.dtype, device=self.device)
            self.keys[layer], self.values[layer] = k, v
            self._bytes[layer] = k.numel() * k.element_size() + v.numel() * v.element_size()
        return k, self.values[layer]

    def copy_blocks(self, src: int, dst: int, count: int) -> None:
        """Copy `count` blocks from block `src` to block `dst`, in every layer (the ranges may overlap)."""
        if count <= 0 or src == dst:
            return
        size = self.block_size
        a, b, n = src * size, dst * size, count * size
        overlap = abs(a - b) < n
        for store in (self.keys, self.values):
            for t in store.values():
                part = t[:, a:a + n]
                t[:, b:b + n] = part.clone() if overlap else part

    def nbytes(self) -> int:
        """Bytes allocated (safe to call from another thread)."""
        return sum(list(self._bytes.values()))


@dataclass
class StepLayout:
    """Where each of a step's N packed tokens belongs, shared by every layer of the forward pass.

    `token_slots`: each token's slot in the pool. `rows`: per request computing tokens this step,
    (first packed index, count, base slot of its run, position of its first new token)."""

    pool: KVPool
    token_slots: torch.Tensor                          # [N]
    rows: list[tuple[int, int, int, int]]
    _layer_of: dict = field(default_factory=dict)

    def layer(self, module: nn.Module) -> int:
        """The module's layer index (transformers sets layer_idx), else its order of first call."""
        idx = getattr(module, "layer_idx", None)
        if idx is not None:
            return int(idx)
        return self._layer_of.setdefault(id(module), len(self._layer_of))


class ShapeProbe:
    """A layout that stores nothing: it records each layer's key and value shape and dtype (what
    one token costs in the pool on this rank), and computes the chunk's causal attention alone."""

    def __init__(self):
        self.layers: dict[int, tuple[int, int, int, int, torch.dtype]] = {}
        self._layer_of: dict = {}

    layer = StepLayout.layer

    def bytes_per_token(self) -> int:
        total = 0
        for kheads, kdim, vheads, vdim, dtype in self.layers.values():
            total += (kheads * kdim + vheads * vdim) * torch.empty((), dtype=dtype).element_size()
        return total


class active_step:
    """Context manager: the model's attention uses `layout` while the forward pass runs."""

    def __init__(self, layout: StepLayout | ShapeProbe):
        self.layout = layout

    def __enter__(self):
        _active.layout = self.layout
        return self.layout

    def __exit__(self, *exc) -> None:
        _active.layout = None


def _layout() -> StepLayout | ShapeProbe | None:
    return getattr(_active, "layout", None)


UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, lo: int, window: int | None,
            scaling: float | None, gqa: bool) -> torch.Tensor:
    """q [1, heads, n, dim] at positions first..first+n-1 over k/v [1, kv heads, positions lo..end)."""
    count, end = q.shape[2], first + q.shape[2]
    if count == 1:          # a decoding token sees every position up to its own (lo applies the window)
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
    if first == 0 and lo == 0 and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    qpos = torch.arange(first, end, device=q.device)[:, None]
    kpos = torch.arange(lo, end, device=q.device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)


def batch_attention(layout: StepLayout | ShapeProbe, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, scaling: float | None = None, sliding_window: int | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for the step's packed tokens: query [1, heads, N, dim], key/value [1, kv heads, N,
    dim]; returns [1, N, heads, dim] (transformers' attention interface)."""
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with {name} is not supported by dscluster's batched attention")
    layer = layout.layer(module)
    gqa = query.shape[1] != key.shape[1]
    if isinstance(layout, ShapeProbe):
        layout.layers[layer] = (key.shape[1], key.shape[-1], value.shape[1], value.shape[-1], key.dtype)
        o = _attend(query, key, value, 0, 0, sliding_window, scaling, gqa)
        return o.transpose(1, 2), None
    keys, values = layout.pool.layer(layer, key, value)
    keys[:, layout.token_slots] = key[0]
    values[:, layout.token_slots] = value[0]
    keys, values = keys[None], values[None]                 # [1, kv heads, slots, dim]
    outs = []                                               # per request [1, heads, count, vdim], in order
    for start, count, base, first in layout.rows:
        end = first + count
        lo = 0 if sliding_window is None else max(0, end - sliding_window - count + 1)
        outs.append(_attend(query[:, :, start:start + count], keys[:, :, base + lo:base + end],
                            values[:, :, base + lo:base + end], first, lo, sliding_window, scaling, gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2), None


def install(model: nn.Module) -> str | None:
    """Route `model`'s attention through `batch_attention`. Returns why it cannot, or None."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return (f"{type(model).__name__} does not use transformers' attention interface, which "
                "dscluster's continuous batching needs")
    original = config._attn_implementation or "sdpa"
    if original.startswith(IMPLEMENTATION):
        return None
    if original == "eager":  # the model's own eager function is not in the interface: use sdpa's
        if not getattr(model, "_supports_sdpa", False):
            return f"{type(model).__name__} supports only eager attention"
        original = "sdpa"
    name = f"{IMPLEMENTATION}_{original}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        layout = _layout()
        if layout is None:
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(original, None)
            return fn(module, query, key, value, attention_mask, **kwargs)
        return batch_attention(layout, module, query, key, value, **kwargs)

    def mask(*args, **kwargs):
        if _layout() is not None:
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[original](*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    config._attn_implementation = name
    return None

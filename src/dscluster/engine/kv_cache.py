"""Every rank: the running batch's key/value cache, and the attention that reads it.

Layout: per layer, a key and a value tensor of shape [rows, kv heads, capacity, head dim], where
the heads are this rank's share (tensor parallelism splits them) and row i belongs to the i-th
running request. Rows stay packed at the front: a leaving row takes the last row's place (one row
copied), a joining row takes the next free one. A step writes each new token's key and value in
place at (its row, its position), so nothing is concatenated or copied per step; the capacity
grows geometrically (and is freed when the batch empties).

A step's tokens go through the model as one packed sequence [1, N] (every request's new tokens
side by side, with their own position ids), so every linear layer runs once per step for all
requests together. Attention is the only place the requests must be kept apart; it is done here,
through transformers' attention interface (`attn_implementation`), for the model's own attention
modules, whatever engine split them:

- requests computing one token (decoding) attend together: one batched
  `scaled_dot_product_attention` over a view of the cache's first rows, masked by length;
- requests computing a prompt chunk attend one at a time, causally from their chunk's offset.

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


@dataclass
class StepLayout:
    """Where each of a step's N packed tokens belongs, shared by every layer of the forward pass.

    `single_*`: rows computing exactly one token (index in the packed sequence, row, position).
    `chunks`: rows computing several tokens: (row, first packed index, count, first position)."""

    cache: KVCache
    token_rows: torch.Tensor            # [N] row of each token
    token_pos: torch.Tensor             # [N] position of each token
    single_index: torch.Tensor          # [S] packed index of each one-token row
    single_rows: torch.Tensor           # [S]
    single_pos: torch.Tensor            # [S]
    single_span: int                    # rows [0, single_span) cover every one-token row
    single_longest: int                 # positions [0, single_longest) cover every one-token row's
    chunks: list[tuple[int, int, int, int]]
    _masks: dict = field(default_factory=dict)
    _layer_of: dict = field(default_factory=dict)

    def layer(self, module: nn.Module) -> int:
        """The module's layer index (transformers sets layer_idx), else its order of first call."""
        idx = getattr(module, "layer_idx", None)
        if idx is not None:
            return int(idx)
        return self._layer_of.setdefault(id(module), len(self._layer_of))

    def single_mask(self, window: int | None) -> torch.Tensor:
        """[span, 1, 1, longest] bool: which cached positions each one-token row may attend to.
        Rows in the span that compute no single token see position 0 only (their output is unused)."""
        key = ("single", window)
        if key not in self._masks:
            device = self.single_rows.device
            lengths = torch.ones(self.single_span, dtype=torch.long, device=device)
            lengths[self.single_rows] = self.single_pos + 1
            span = torch.arange(self.single_longest, device=device)  # known on the host: no device sync
            mask = span[None, :] < lengths[:, None]
            if window is not None:
                mask &= span[None, :] > lengths[:, None] - 1 - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]


class KVCache:
    """Per-layer key and value tensors for the running rows (allocated at first use, since only the
    attention layer knows this rank's head count, head size and dtype)."""

    def __init__(self, device: torch.device, max_rows: int, max_len: int):
        self.device = device
        self.max_rows = max_rows
        self.max_len = max_len
        self.rows = 0                       # capacity every layer grows to before it is written
        self.length = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._bytes: dict[int, int] = {}     # per layer; read by the metrics thread, so kept apart

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` positions (layers grow when next written)."""
        if rows > self.rows:
            self.rows = min(self.max_rows, max(rows, 2 * self.rows, 4))
        if length > self.length:
            grown = max(length, 2 * self.length, 64)
            self.length = min(self.max_len, -(-grown // 64) * 64)

    def _ensure(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        k = self.keys.get(layer)
        if k is not None and k.shape[0] >= self.rows and k.shape[2] >= self.length:
            return
        heads, kdim, vdim = key.shape[1], key.shape[-1], value.shape[-1]
        new_k = torch.zeros(self.rows, heads, self.length, kdim, dtype=key.dtype, device=self.device)
        new_v = torch.zeros(self.rows, value.shape[1], self.length, vdim, dtype=value.dtype, device=self.device)
        if k is not None:
            r, n = k.shape[0], k.shape[2]
            new_k[:r, :, :n] = k
            new_v[:r, :, :n] = self.values[layer]
        self.keys[layer], self.values[layer] = new_k, new_v
        self._bytes[layer] = new_k.numel() * new_k.element_size() + new_v.numel() * new_v.element_size()

    def write(self, layer: int, rows: torch.Tensor, pos: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """key/value: [1, heads, N, dim] for the packed tokens at (rows[i], pos[i])."""
        self._ensure(layer, key, value)
        self.keys[layer][rows, :, pos] = key[0].transpose(0, 1)
        self.values[layer][rows, :, pos] = value[0].transpose(0, 1)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst, in every layer."""
        for store in (self.keys, self.values):
            for t in store.values():
                t[dst, :, :length] = t[src, :, :length]

    def clear(self) -> None:
        self.keys.clear()
        self.values.clear()
        self._bytes = {}
        self.rows = self.length = 0

    def nbytes(self) -> int:
        """Bytes allocated (safe to call from another thread)."""
        return sum(list(self._bytes.values()))


class active_step:
    """Context manager: the model's attention uses `layout` while the forward pass runs."""

    def __init__(self, layout: StepLayout):
        self.layout = layout

    def __enter__(self) -> StepLayout:
        _active.layout = self.layout
        return self.layout

    def __exit__(self, *exc) -> None:
        _active.layout = None


def _layout() -> StepLayout | None:
    return getattr(_active, "layout", None)


UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def batch_attention(layout: StepLayout, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, scaling: float | None = None, sliding_window: int | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for the step's packed tokens: query [1, heads, N, dim], key/value [1, kv heads, N,
    dim]; returns [1, N, heads, dim] (transformers' attention interface)."""
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with {name} is not supported by dscluster's batched attention")
    layer = layout.layer(module)
    cache = layout.cache
    cache.write(layer, layout.token_rows, layout.token_pos, key, value)
    keys, values = cache.keys[layer], cache.values[layer]
    gqa = query.shape[1] != key.shape[1]
    q = query[0]                                               # [heads, N, dim]
    out = query.new_empty(q.shape[1], q.shape[0], value.shape[-1])  # [N, heads, vdim]
    if layout.single_index.numel():
        mask = layout.single_mask(sliding_window)
        span, longest = mask.shape[0], mask.shape[-1]
        qs = q.new_zeros(span, q.shape[0], 1, q.shape[2])
        qs[layout.single_rows, :, 0] = q[:, layout.single_index].transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, keys[:span, :, :longest], values[:span, :, :longest],
                                           attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[layout.single_index] = o[layout.single_rows, :, 0]
    for row, start, count, first in layout.chunks:
        end = first + count
        qc = q[None, :, start:start + count]
        kc, vc = keys[row:row + 1, :, :end], values[row:row + 1, :, :end]
        if first == 0 and sliding_window is None:
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            qpos = torch.arange(first, end, device=q.device)[:, None]
            kpos = torch.arange(end, device=q.device)[None, :]
            allowed = kpos <= qpos
            if sliding_window is not None:
                allowed &= kpos > qpos - sliding_window
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
        out[start:start + count] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


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

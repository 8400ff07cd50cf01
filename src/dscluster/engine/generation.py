"""Batched decoding that every rank runs step for step.

Prompts of different lengths are left-padded into one batch. After each forward pass only rank 0
samples: it broadcasts the chosen tokens and which requests are still running, so every rank feeds
the model identical inputs on the next step and stops at the same step (a sharded model needs both;
ZeRO-3 and AutoTP all-reduces deadlock or, with DeepSpeed's shared-memory all-reduce, silently
corrupt results otherwise). Sampling uses one torch.Generator per request, seeded from the request,
so the same seed gives the same tokens with any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dscluster.engine.api import GenerationRequest, GenerationResult, TokenCallback

# Broadcasts rank 0's chosen tokens (and the still-running mask) to every rank, in place.
SyncTokens = Callable[[torch.Tensor], torch.Tensor]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from one row of logits: greedy at temperature 0, else nucleus sampling."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


@torch.no_grad()
def generate(model: nn.Module, requests: list[GenerationRequest], *, is_rank0: bool, sync: SyncTokens | None,
             pad_id: int, eos_ids: tuple[int, ...] = (), on_token: TokenCallback | None = None,
             device: torch.device | None = None) -> list[GenerationResult]:
    """Decode `requests` together. Every rank calls this with the same requests; only rank 0's
    results and `on_token` calls matter. `sync` is None when there is a single rank."""
    device = device or torch.device("cpu")
    batch = len(requests)
    lengths = [len(r.prompt_ids) for r in requests]
    width = max(lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, r in enumerate(requests):
        input_ids[i, width - lengths[i]:] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - lengths[i]:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)

    generators = [torch.Generator().manual_seed(r.params.seed if r.params.seed is not None else 0)
                  for r in requests]
    stops = [set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(eos_ids)) for r in requests]
    out: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * batch
    steps = max(r.params.max_tokens for r in requests)
    past = None
    next_pos = positions[:, -1:] + 1

    for step in range(steps):
        result = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       past_key_values=past, use_cache=True)
        past = result.past_key_values
        last = result.logits[:, -1, :]
        # Row i of `chosen`: the next token; row batch+i: 1 while request i is still running.
        chosen = torch.zeros(2 * batch, dtype=torch.long)
        if is_rank0:
            for i, r in enumerate(requests):
                if finish[i] is not None:
                    continue
                token = sample(last[i], r.params.temperature, r.params.top_p, generators[i])
                if token in stops[i]:  # a stop token ends the request and is not part of its text
                    finish[i] = "stop"
                else:
                    out[i].append(token)
                    if on_token is not None and on_token(i, token) is False:
                        finish[i] = "cancelled"
                    elif len(out[i]) >= r.params.max_tokens:
                        finish[i] = "length"
                chosen[i] = token
                chosen[batch + i] = 1 if finish[i] is None else 0
        if sync is not None:
            sync(chosen)
        if not bool(chosen[batch:].any()):
            break
        input_ids = chosen[:batch].view(batch, 1).to(device)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = next_pos
        next_pos = next_pos + 1
    return [GenerationResult(token_ids=out[i], finish_reason=finish[i] or "length", prompt_tokens=lengths[i])
            for i in range(batch)]

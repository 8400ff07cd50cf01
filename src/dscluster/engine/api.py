"""What rank 0's front ends (HTTP server, batch mode, tests) see of the engine.

The engine executes every call on all ranks in lockstep; callers on rank 0 just call methods.
Calls are blocking and not thread-safe: one thread (the batcher) owns the engine. Inputs must be
validated before they get here: whatever reaches the engine is sent to every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None         # None: rank 0 draws one, so every rank still samples alike
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False        # keep going past the model's end-of-sequence tokens


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int


# Called on rank 0 after every decoding step with (index of the request in the batch, new token id).
# Return False to stop that request (client gone, stop string found); the other requests go on.
TokenCallback = Callable[[int, int], bool]


@dataclass(frozen=True)
class ModelInfo:
    name: str                                   # served model name
    kind: Literal["causal-lm", "module"]        # causal-lm: completions and chat; module: tensors only
    engine: Literal["tp", "zero3", "replicated"]
    world_size: int
    dtype: torch.dtype
    max_context: int | None = None              # causal LM context length (prompt + generated)
    vocab_size: int | None = None
    input_dtype: torch.dtype = torch.float32    # dtype /v1/predict inputs are converted to
    input_shape: tuple[int, ...] | None = None  # per-example shape, when the model declares it
    tokenizer: Any = None                       # a transformers tokenizer for causal LMs
    extra: dict[str, Any] = field(default_factory=dict)


class EngineClient(Protocol):
    """Rank 0's handle on the group."""

    info: ModelInfo
    heartbeat_interval: float                   # call heartbeat() at least this often when idle
    failure: str | None                         # why the group broke; the process exits 3 soon after

    def ranks_alive(self) -> int:
        """How many ranks answered the last heartbeat (world size while healthy)."""

    def predict(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run one batch of examples (each a tensor of the model's per-example shape) on all ranks.
        Returns one output tensor per example, in order."""

    def generate(self, requests: list[GenerationRequest],
                 on_token: TokenCallback | None = None) -> list[GenerationResult]:
        """Decode a batch of prompts (different lengths allowed) on all ranks."""

    def heartbeat(self) -> None:
        """Prove every rank is alive and in step; raises PeerFailure otherwise."""

    def shutdown(self) -> None:
        """Tell every rank to exit cleanly."""

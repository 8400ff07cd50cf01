"""What rank 0's front ends (HTTP server, batch mode, tests) see of the engine.

The engine executes every call on all ranks in lockstep; callers on rank 0 just call methods.
Calls are blocking and not thread-safe: one thread (the batcher) owns the engine. Inputs must be
validated before they get here: whatever reaches the engine is sent to every rank.

Generation is scheduled per step (continuous batching): a front end adds requests with `submit`,
each with a `GenerationSink` that hears its tokens and its end, and calls `step` while
`has_generation_work()` is true, interleaving predict units as it likes. `generate` does all of
that for a list of prompts and returns when they are done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 (or below 1e-5) means greedy
    top_p: float = 1.0
    seed: int | None = None         # None: rank 0 draws one (only rank 0 samples)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False        # keep going past the model's end-of-sequence tokens


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


class GenerationSink(Protocol):
    """Rank 0's receiver of one request's progress. The engine calls it on its own thread, after a
    step's forward pass and before the next step is sent, so whatever it does (detokenising, stop
    strings, pushing to a stream) is rank-0-only work: if it raises, that request ends with the
    error and every other request and rank goes on."""

    @property
    def cancelled(self) -> bool:
        """True once nobody wants the answer (client gone, deadline passed): the request leaves."""

    def on_token(self, token: int) -> bool:
        """A new token of the request. Return False to end it here (a stop string was found)."""

    def on_finish(self, result: GenerationResult) -> None:
        """The request ended normally (stop, length, or on_token said so)."""

    def on_error(self, error: BaseException) -> None:
        """The request ended because something failed for it (its sampling, its callback, or the
        step it was part of). The group is intact."""


# Called on rank 0 after every decoding step with (index of the request in the list, new token id).
# Return False to stop that request (client gone, stop string found); the other requests go on.
TokenCallback = Callable[[int, int], bool]


@dataclass(frozen=True)
class GenerationLimits:
    """The user's limits on generation (vLLM's names): requests running at once, tokens computed
    per step (prompt chunks plus one per running request), and prompt + output per request."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    max_model_len: int | None = None            # None: the model's context


@dataclass(frozen=True)
class GenerationStats:
    """A snapshot for metrics: requests waiting to join, requests running, rows and tokens of the
    last step, and the key-value cache's memory (bytes allocated and bytes holding tokens)."""

    waiting: int = 0
    running: int = 0
    step_rows: int = 0
    step_tokens: int = 0
    kv_bytes: int = 0
    kv_used_bytes: int = 0


@dataclass(frozen=True)
class ModelInfo:
    name: str                                   # served model name
    kind: Literal["causal-lm", "module"]        # causal-lm: completions and chat; module: tensors only
    engine: Literal["tp", "zero3", "replicated"]
    world_size: int
    dtype: torch.dtype
    max_context: int | None = None              # prompt + generated tokens (--max-model-len, else the model's)
    vocab_size: int | None = None
    input_dtype: torch.dtype = torch.float32    # dtype /v1/predict inputs are converted to
    input_shape: tuple[int, ...] | None = None  # per-example shape, when the model declares it
    tokenizer: Any = None                       # a transformers tokenizer for causal LMs
    generation_unsupported: str | None = None   # why this causal LM cannot generate here, if it cannot
    extra: dict[str, Any] = field(default_factory=dict)


class EngineClient(Protocol):
    """Rank 0's handle on the group."""

    info: ModelInfo
    limits: GenerationLimits
    heartbeat_interval: float                   # call heartbeat() at least this often when idle
    failure: str | None                         # why the group broke; the process exits 3 soon after

    def ranks_alive(self) -> int:
        """How many ranks answered the last heartbeat (world size while healthy)."""

    def predict(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run one batch of examples (each a tensor of the model's per-example shape) on all ranks.
        Returns one output tensor per example, in order."""

    def submit(self, request: GenerationRequest, sink: GenerationSink) -> None:
        """Queue a request; it joins the running batch at a coming step."""

    def has_generation_work(self) -> bool:
        """Requests are waiting or running: call step()."""

    def step(self) -> None:
        """One generation step on every rank: requests join and leave, every running one advances."""

    def generation_stats(self) -> GenerationStats:
        """Waiting and running requests, the last step's size, the cache's memory."""

    def generate(self, requests: list[GenerationRequest],
                 on_token: TokenCallback | None = None) -> list[GenerationResult]:
        """Submit `requests` and step until all are done (for batch jobs, tests and benchmarks).
        A request that fails raises its error after the others are done."""

    def heartbeat(self) -> None:
        """Prove every rank is alive and in step; raises PeerFailure otherwise."""

    def shutdown(self) -> None:
        """Tell every rank to exit cleanly."""

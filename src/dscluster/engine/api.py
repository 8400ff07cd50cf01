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
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Everything per request that decides its tokens, or what the model computes for it. It travels
    whole to every rank in the step that the request joins (`protocol.Join`): `prompt_logprobs`
    changes which logits every rank's forward pass keeps, and the rest keeps every rank able to
    sample identically (only rank 0 samples today). The same seed gives the same tokens on one
    rank or many, whatever else runs beside the request."""

    max_tokens: int = 16            # 0: nothing generated (the prompt's logprobs only)
    temperature: float = 1.0        # 0 (or below 1e-5) means greedy
    top_p: float = 1.0
    top_k: int = 0                  # vLLM's: sample among the k most likely only (0 or -1: all)
    min_p: float = 0.0              # vLLM's: drop tokens less likely than min_p x the most likely
    seed: int | None = None         # None: rank 0 draws one (only rank 0 samples)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False        # keep going past the model's end-of-sequence tokens
    min_tokens: int = 0             # end-of-sequence and stop tokens cannot be drawn before this many
    presence_penalty: float = 0.0   # OpenAI's: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often the token was generated
    repetition_penalty: float = 1.0  # vLLM's (CTRL's): tokens of the prompt or output divided by this
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit), OpenAI's logit_bias
    logprobs: int | None = None     # each generated token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (computed while prefilling)

    @property
    def processed(self) -> bool:
        """Something beyond temperature and top_p changes the logits before a token is chosen."""
        return bool(self.min_tokens or self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of a request with n choices: seed + index, as vLLM
        derives them, so choice 0 is what the same request with n = 1 gives."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=(self.seed + index) % 2**63)


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (the raw distribution, before temperature,
    penalties or biases, as vLLM reports it), and the most likely tokens at that position."""

    token: int
    logprob: float
    rank: int                                   # 1 for the most likely token
    top: tuple[tuple[int, float], ...] = ()     # (token id, logprob), most likely first


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt and how to continue it. `grammar` (an engine.grammar.GrammarState, rank 0 only: it
    never travels to the other ranks) restricts every token to what the grammar allows next."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    grammar: Any = None


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprobs] | None = None     # one per token_ids entry, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # one per prompt token (the first: None)
    joined_at: float | None = None      # time.monotonic() when it joined the running batch


class GenerationSink(Protocol):
    """Rank 0's receiver of one request's progress. The engine calls it on its own thread, after a
    step's forward pass and before the next step is sent, so whatever it does (detokenising, stop
    strings, pushing to a stream) is rank-0-only work: if it raises, that request ends with the
    error and every other request and rank goes on."""

    @property
    def cancelled(self) -> bool:
        """True once nobody wants the answer (client gone, deadline passed): the request leaves."""

    def on_token(self, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        """A new token of the request (with its logprobs, when the request asked for them).
        Return False to end it here (a stop string was found)."""

    def on_prompt_logprobs(self, logprobs: list[TokenLogprobs | None]) -> None:
        """Called once, only for a request that asked for prompt logprobs, when its whole prompt
        has been computed (before its first token): one entry per prompt token, the first None."""

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
    last step, and the key-value cache's pool (engine/kv_blocks.py): its blocks, how many hold
    running requests' tokens, preemptions, and the prefix cache's queries and hits (in tokens, as
    vLLM counts them). Counters only grow."""

    waiting: int = 0
    running: int = 0
    step_rows: int = 0
    step_tokens: int = 0
    kv_bytes: int = 0               # bytes of the pool on this rank (rank 0)
    kv_used_bytes: int = 0          # bytes of the blocks held by running requests
    kv_usage: float = 0.0           # blocks held by running requests / blocks in the pool (0-1)
    block_size: int = 0             # tokens per block
    num_blocks: int = 0             # blocks in the pool (the same on every rank)
    prefix_caching: bool = False    # --enable-prefix-caching
    preemptions: int = 0            # running requests sent back to wait for blocks (counter)
    prefix_queries: int = 0         # prompt tokens looked up in the prefix cache (counter)
    prefix_hits: int = 0            # of those, tokens found cached and not computed again (counter)


@dataclass(frozen=True)
class ModelInfo:
    name: str                                   # served model name
    kind: Literal["causal-lm", "module"]        # causal-lm: completions and chat; module: tensors only
    engine: Literal["tp", "zero3", "replicated"]
    world_size: int
    dtype: torch.dtype
    pipeline_parallel: int = 1                  # --pp: stages; `engine` (tp) runs inside each
    max_context: int | None = None              # prompt + generated tokens (--max-model-len, else the model's)
    vocab_size: int | None = None
    input_dtype: torch.dtype = torch.float32    # dtype /v1/predict inputs are converted to
    input_shape: tuple[int, ...] | None = None  # per-example shape, when the model declares it
    tokenizer: Any = None                       # a transformers tokenizer for causal LMs
    eos_ids: tuple[int, ...] = ()               # the tokens that end a generation (unless ignore_eos)
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

"""The engine's options, shared by `serve` and `batch` (one field per command-line option), and the
generation limits they resolve to once the model's context is known."""

from __future__ import annotations

from dataclasses import dataclass

from dscluster.engine.api import GenerationLimits
from dscluster.errors import UsageError


@dataclass
class RuntimeOptions:
    model: str
    engine: str | None = None
    pp: int = 1                          # pipeline stages (--pp); tensor parallel over world / pp ranks in each
    dtype: str = "auto"
    backend: str = "auto"
    checkpoint: str | None = None
    served_model_name: str | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    collective_timeout: float = 600.0
    rendezvous_timeout: float = 300.0   # forming the group: every rank must arrive by then
    failure_grace: float = 1.0           # rank 0 answers in-flight requests 503 before it exits
    zero3_persistence_threshold: int = 0  # 0: partition every parameter, however small
    max_num_seqs: int = GenerationLimits.max_num_seqs
    max_num_batched_tokens: int = GenerationLimits.max_num_batched_tokens
    max_model_len: int | None = None     # None: the model's context
    kv_cache_memory: int | None = None   # bytes of key/value pool per rank (None: from the memory it runs in)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None     # the pool's block count, whatever the memory (tests, benchmarks)

    @classmethod
    def from_args(cls, args) -> RuntimeOptions:
        fields = cls.__dataclass_fields__
        return cls(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})


def resolve_limits(options: RuntimeOptions, context: int | None) -> GenerationLimits:
    """The generation limits; the longest request (prompt + output) is --max-model-len, which may
    not exceed the model's context, else the context itself."""
    if options.max_num_batched_tokens < options.max_num_seqs:
        raise UsageError(f"--max-num-batched-tokens {options.max_num_batched_tokens} must be at least "
                         f"--max-num-seqs {options.max_num_seqs} (every running request computes a token per step)")
    length = options.max_model_len or context
    if context is not None and length > context:
        raise UsageError(f"--max-model-len {length} exceeds the model's context of {context} tokens")
    if length is None:
        raise UsageError("the model does not say its context length: set --max-model-len")
    return GenerationLimits(options.max_num_seqs, options.max_num_batched_tokens, length)

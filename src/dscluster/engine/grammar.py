"""Rank 0 only: compiled grammars and the per-step token masks that enforce them while decoding.

A request with a structured output (a JSON schema, a regular expression, a list of choices, a
context-free grammar) carries a `GrammarState`: an llguidance matcher that knows, after the tokens
drawn so far, which tokens may come next. Before sampling, `apply_masks` writes one bitmask per
constrained row (llguidance fills it in Rust, 1-2 microseconds per row; with the unpacking, 5-16 at
a vocabulary of 1024 and 33-40 at 32000, benchmarks/structured_output.py) and sets every forbidden
logit to -inf without a Python loop over the vocabulary; the rows without a grammar are not
touched. So the lockstep protocol does not change: only rank 0 samples, and the other ranks still
receive only the chosen tokens.

Why llguidance: it was measured against xgrammar on the tiny model here; xgrammar 0.2.8 let a JSON
string with `maxLength` hold raw control characters (invalid JSON), llguidance masks them. JSON is
compiled without flexible whitespace (`, ` and `: ` between items, nothing else), so a model cannot
pad a reply with tabs and newlines until it runs out of tokens, and every reply parses as strict
JSON.

`GrammarCompiler.compile` validates a grammar and caches a fresh matcher per spec (least recently
used first out); each request gets a copy of it. Compiling is the front end's job, off its event
loop and before the request is queued, so a grammar that cannot compile is the client's error and
never reaches the engine. (torch and llguidance are imported where they are used: the command
line's parser reads this package's names without paying for them.)
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal


GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]

# llguidance's JSON compiler: no free whitespace, the separators a person would write.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Whitespace allowed between JSON tokens when a request asks for it (vLLM's default is any).
FLEXIBLE_JSON_OPTIONS = {"whitespace_flexible": True}
CACHE_SIZE = 256


class GrammarError(ValueError):
    """The grammar cannot be compiled (the client's error: a 400 over HTTP)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asked for, canonical so that equal asks share one compiled grammar.

    kind: json_schema (`source` is the schema as JSON text), regex, choice (a JSON list of
    strings), grammar (Lark, or GBNF / EBNF as llama.cpp and xgrammar write it)."""

    kind: GrammarKind
    source: str
    flexible_whitespace: bool = False

    @staticmethod
    def json_schema(schema: dict | bool, flexible_whitespace: bool = False) -> GrammarSpec:
        return GrammarSpec("json_schema", json.dumps(schema, sort_keys=True), flexible_whitespace)

    @staticmethod
    def choice(options: list[str]) -> GrammarSpec:
        return GrammarSpec("choice", json.dumps(list(options)))


class GrammarState:
    """One request's position in its grammar. Created for the request by the front end, then used
    only by the engine's thread."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def accept(self, token: int) -> None:
        """The drawn token moves the grammar on. It was allowed by the mask, so a refusal is a bug
        (or a stop token the grammar did not expect): it ends this request alone."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing can follow: the reply is whole (the request ends with finish_reason stop)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class GrammarCompiler:
    """The tokenizer as llguidance sees it, and a cache of compiled grammars. Thread-safe: front
    ends compile on worker threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]):
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        # n_vocab is the logits' width (the model's vocabulary, padded past the tokenizer's): ids
        # the tokenizer does not know are never allowed.
        eos = list(eos_ids) or tokenizer.eos_token_id
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.eos_ids = tuple(eos_ids)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _grammar(self, spec: GrammarSpec) -> str:
        llg = self._llg
        try:
            if spec.kind == "json_schema":
                options = FLEXIBLE_JSON_OPTIONS if spec.flexible_whitespace else JSON_OPTIONS
                return llg.LLMatcher.grammar_from_json_schema(spec.source, defaults=options)
            if spec.kind == "regex":
                return llg.LLMatcher.grammar_from_regex(spec.source)
            if spec.kind == "choice":
                return llg.grammar_from("choice", spec.source)
            return llg.grammar_from("grammar", spec.source)
        except ValueError as exc:
            raise GrammarError(str(exc).strip().splitlines()[0]) from None

    def cached(self, spec: GrammarSpec) -> GrammarState | None:
        """A fresh state of `spec` if it was compiled before (microseconds), else None."""
        with self._lock:
            template = self._cache.get(spec)
            if template is None:
                return None
            self._cache.move_to_end(spec)
            return GrammarState(template.deep_copy())

    def compile(self, spec: GrammarSpec) -> GrammarState:
        """A fresh state at the start of `spec`'s grammar; GrammarError if it cannot compile."""
        state = self.cached(spec)
        if state is not None:
            return state
        grammar = self._grammar(spec)
        problem = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise GrammarError(_short(problem))
        template = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(_short(template.get_error()))
        with self._lock:
            self._cache[spec] = template
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return GrammarState(template.deep_copy())


def _short(message: str) -> str:
    """llguidance's error on one line: its first two lines (the second says where, for a regex)."""
    return " ".join(message.strip().split("\n")[:2]).strip()


def apply_masks(logits, rows: list[tuple[int, GrammarState]]) -> list[bool]:
    """Forbid, in place, every token each row's grammar does not allow next. `logits`: [rows, vocab]
    float; `rows`: (row index, its grammar). Returns, per entry of `rows`, whether its grammar
    allows any token at all. llguidance writes one bitmask for all of them; it is
    unpacked without a Python loop over the vocabulary: by numpy on the CPU (single-threaded: a
    torch op this size would wake the OpenMP team, which costs milliseconds on a busy machine), by
    shifts on the GPU after copying the 32x smaller bitmask there."""
    import numpy
    import torch

    if not rows:
        return []
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    stride = words * 4
    for k, (_, state) in enumerate(rows):
        state.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + k * stride, stride)
    if logits.device.type == "cpu":
        bits = numpy.unpackbits(bitmask.numpy().view(numpy.uint8), axis=1, bitorder="little")[:, :vocab]
        forbidden = torch.from_numpy(bits == 0)
        some = bits.any(axis=1).tolist()
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        shifted = bitmask.to(logits.device, non_blocking=True).unsqueeze(-1) >> shifts
        forbidden = ((shifted & 1) == 0).reshape(len(rows), words * 32)[:, :vocab]
        some = (~forbidden).any(dim=1).tolist()
    for k, (row, _) in enumerate(rows):
        logits[row].masked_fill_(forbidden[k], float("-inf"))
    return some

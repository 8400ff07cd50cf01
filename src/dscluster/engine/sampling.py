"""Rank 0 only: logits -> tokens, one request at a time in effect, never raising for the step.

Only rank 0 samples; every rank is fed the tokens it chose in the next step's control message, so
ranks cannot disagree about a random draw. Each request owns a `RequestSampler`: its parameters,
its own `torch.Generator` on the logits' device (CUDA on a GPU), seeded from the request, and the
tokens it has produced. So a request's tokens depend on its seed and its logits only, not on what
else runs beside it or on how many ranks share the model.

`sample` turns one row of logits per request into one `Sample` per request. Whatever goes wrong
for one request (a non-finite row, a failing processor) comes back as that request's error; the
other rows are sampled as usual. The step's broadcast follows sampling, so an exception here
would strand every other rank in a collective: nothing may escape.

Before a token is chosen, `RequestSampler.adjust` applies what the request asked for, in vLLM's
order: `logit_bias` and `min_tokens` (stop tokens masked until enough tokens exist), then the
repetition, frequency and presence penalties (read from the prompt and the tokens so far, kept as
counts on the logits' device), then temperature, min_p, top_k and top_p. Logprobs are those of the raw
distribution (the model's own log-softmax, as vLLM reports by default), for the drawn token and
the k most likely (`token_logprobs`, also used for prompt logprobs). `n` > 1 is several requests
(rows) with seeds derived from the request's (`SamplingParams.for_choice`).

A request with a grammar (engine/grammar.py) has the tokens its grammar forbids set to -inf first,
for all such rows at once, before anything else: as in vLLM, its logprobs are then those of the
distribution the grammar allows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dscluster.engine.api import SamplingParams, TokenLogprobs
from dscluster.engine.grammar import GrammarState, apply_masks

log = logging.getLogger(__name__)

# Temperatures below this sample greedily, as vLLM does: dividing logits by a tiny temperature
# overflows to infinity (1e-320 is a valid OpenAI temperature) and softmax turns that into NaN.
GREEDY_BELOW = 1e-5
NON_FINITE = "the model produced non-finite logits (NaN or infinity)"


@dataclass
class Sample:
    """What one request drew at one step: a token, or the error that ends the request."""

    token: int = -1
    error: BaseException | None = None
    logprobs: TokenLogprobs | None = None     # when the request asked for them


class RequestSampler:
    """One request's sampling state on rank 0. `stop_ids`: the tokens that end it (end-of-sequence
    and its stop_token_ids), which `min_tokens` keeps from being drawn too early."""

    def __init__(self, params: SamplingParams, prompt_ids: tuple[int, ...] = (),
                 stop_ids: frozenset[int] = frozenset(), grammar: GrammarState | None = None):
        self.params = params
        self.grammar = grammar
        self.prompt_ids = prompt_ids
        self.stop_ids = sorted(stop_ids)
        self.output_ids: list[int] = []
        self.greedy = not params.temperature >= GREEDY_BELOW   # NaN included
        # Greedy with nothing to change the logits: sampled for all such requests with one argmax.
        self.plain_greedy = self.greedy and not params.processed
        # ... and nothing else of its logits used (no logprobs, no grammar): its token can be drawn
        # where the logits are, by the last pipeline stage (protocol.Join.argmax_only).
        self.argmax_only = self.plain_greedy and grammar is None and params.logprobs is None
        self.seed = params.seed if params.seed is not None else 0
        self._generator: torch.Generator | None = None
        self._counts: torch.Tensor | None = None    # [vocab] times each token was generated
        self._seen: torch.Tensor | None = None      # [vocab] in the prompt or generated (repetition)

    def generator(self, device: torch.device) -> torch.Generator:
        """The request's generator, created on first use on the device the logits live on."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias, min_tokens and the penalties, on one row of logits (a new tensor)."""
        p = self.params
        if not p.processed:
            return logits
        logits = logits.clone()
        vocab, device = logits.shape[-1], logits.device
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=device)
            logits.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype, device=device))
        if len(self.output_ids) < p.min_tokens and self.stop_ids:
            logits[torch.tensor(self.stop_ids, device=device)] = float("-inf")
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            if self._counts is None or self._counts.device != device:
                self._counts = torch.zeros(vocab, dtype=logits.dtype, device=device)
                self._counts.index_add_(0, torch.tensor(self.output_ids, dtype=torch.long, device=device),
                                        torch.ones(len(self.output_ids), dtype=logits.dtype, device=device))
                self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                self._seen[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
            generated = self._counts > 0
            if p.repetition_penalty != 1.0:
                penalised = logits / p.repetition_penalty
                penalised = torch.where(logits > 0, penalised, logits * p.repetition_penalty)
                logits = torch.where(self._seen | generated, penalised, logits)
            logits -= p.frequency_penalty * self._counts + p.presence_penalty * generated
        return logits

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of logits (float32) -> the distribution's logits this request samples from."""
        logits = self.adjust(logits)
        if self.greedy:
            return logits
        p = self.params
        logits = logits / p.temperature
        if p.min_p > 0.0:                   # tokens less likely than min_p x the most likely one
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if 0 < p.top_k < logits.shape[-1]:
            logits = logits.masked_fill(logits < logits.topk(p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            logits = top_p_filter(logits, p.top_p)
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        """A token from one processed row."""
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator(logits.device)))

    def accept(self, token: int) -> None:
        """The token joins the request's output (a stop token does not) and moves its grammar on
        (raising if the grammar refuses it)."""
        if self.grammar is not None:
            self.grammar.accept(token)
        self.output_ids.append(token)
        if self._counts is not None and 0 <= token < self._counts.numel():
            self._counts[token] += 1


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """For each row of `logits` ([n, vocab]) the log-probability and rank of the matching token, and
    the k most likely tokens: the model's own log-softmax, computed in float32."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(tokens, dtype=torch.long, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, ids)
    ranks = (logprobs > chosen).sum(dim=-1).add_(1).tolist()
    chosen = chosen[:, 0].tolist()
    if k:
        values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        # Tokens a grammar forbids (-inf) are not among the likely ones (and -inf is not JSON).
        tops = [tuple((t, v) for t, v in zip(i, vs) if v != float("-inf"))
                for i, vs in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprobs(t, lp, r, top)
            for t, lp, r, top in zip(tokens, chosen, ranks, tops, strict=True)]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (always at
    least the most likely one, however small top_p is); the rest get -inf."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = torch.cumsum(probs, dim=-1) - probs >= top_p
    drop[0] = False
    return logits.scatter(0, order[drop], float("-inf"))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token ([rows, vocab] -> [rows]), as `sample` draws it for a plain greedy
    request: the argmax of the row in float32; -1 for a row with a non-finite value (`sample` fails
    that request). The last pipeline stage draws argmax-only rows with it (engine/pipeline.py)."""
    rows = logits.float()
    tokens = torch.argmax(rows, dim=-1)
    return tokens.masked_fill(~torch.isfinite(rows).all(dim=-1), -1)


def sample(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[Sample]:
    """One token per row of `logits` ([rows, vocab]) for the matching sampler. Never raises: a row
    whose sampling fails gets its error in its `Sample`."""
    out = [Sample() for _ in samplers]
    try:
        rows = logits.float()
        finite = torch.isfinite(rows).all(dim=-1).tolist()
        _mask_grammars(rows, samplers, finite, out)
        greedy = [i for i, s in enumerate(samplers) if s.plain_greedy and finite[i] and out[i].error is None]
        if greedy:  # one argmax for every greedy request
            picks = torch.argmax(rows[greedy], dim=-1).tolist()
            for i, token in zip(greedy, picks, strict=True):
                out[i].token = token
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the float copy: every row fails alone
        log.exception("sampling the step failed")
        for s in out:
            s.error = exc
        return out
    for i, sampler in enumerate(samplers):
        if out[i].error is not None:
            continue
        if not finite[i]:
            out[i].error = FloatingPointError(NON_FINITE)
            continue
        try:
            if not sampler.plain_greedy:
                out[i].token = sampler.choose(sampler.process(rows[i]))
            if sampler.params.logprobs is not None:
                (out[i].logprobs,) = token_logprobs(rows[i:i + 1], [out[i].token], sampler.params.logprobs)
        except Exception as exc:  # noqa: BLE001 - this request's problem, not the step's
            log.warning("sampling failed for one request: %s: %s", type(exc).__name__, exc)
            out[i].error = exc
    return out


def _mask_grammars(rows: torch.Tensor, samplers: list[RequestSampler], finite: list[bool], out: list[Sample]) -> None:
    """The grammars' masks on their rows, in place; a grammar that fails, or leaves no token
    allowed, ends its own request only."""
    constrained = []
    for i, s in enumerate(samplers):
        if s.grammar is not None and finite[i]:
            if s.grammar.error is None:
                constrained.append((i, s.grammar))
            else:
                out[i].error = RuntimeError(f"the grammar failed: {s.grammar.error}")
    if not constrained:
        return
    try:
        allowed = apply_masks(rows, constrained)
    except Exception as exc:  # noqa: BLE001 - the grammars' problem: their requests only
        log.warning("applying grammar masks failed: %s: %s", type(exc).__name__, exc)
        for i, _ in constrained:
            out[i].error = exc
        return
    for (i, state), ok in zip(constrained, allowed, strict=True):
        if not ok:
            out[i].error = RuntimeError(f"the grammar allows no next token ({state.error or 'no match'})")

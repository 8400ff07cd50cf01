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

Where the next features go (they need no change of this shape): presence, frequency and
repetition penalties, `logit_bias` and `min_tokens` are steps of `RequestSampler.process` (they
read `prompt_ids` and `output_ids`); logprobs and top-k alternatives are fields of `Sample`, filled
from the processed row; `n` > 1 is several requests (rows) with seeds derived from the request's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dscluster.engine.api import SamplingParams

log = logging.getLogger(__name__)

# Temperatures below this sample greedily, as vLLM does: dividing logits by a tiny temperature
# overflows to infinity (1e-320 is a valid OpenAI temperature) and softmax turns that into NaN.
GREEDY_BELOW = 1e-5


@dataclass
class Sample:
    """What one request drew at one step: a token, or the error that ends the request."""

    token: int = -1
    error: BaseException | None = None


class RequestSampler:
    """One request's sampling state on rank 0."""

    def __init__(self, params: SamplingParams, prompt_ids: tuple[int, ...] = ()):
        self.params = params
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.greedy = not params.temperature >= GREEDY_BELOW   # NaN included
        # Greedy with nothing to change the logits: sampled for all such requests with one argmax.
        self.plain_greedy = self.greedy
        self.seed = params.seed if params.seed is not None else 0
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The request's generator, created on first use on the device the logits live on."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of logits (float32) -> the distribution's logits this request samples from."""
        if self.greedy:
            return logits
        logits = logits / self.params.temperature
        if self.params.top_p < 1.0:
            logits = top_p_filter(logits, self.params.top_p)
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        """A token from one processed row."""
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator(logits.device)))

    def accept(self, token: int) -> None:
        """The token joins the request's output (a stop token does not)."""
        self.output_ids.append(token)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (always at
    least the most likely one, however small top_p is); the rest get -inf."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = torch.cumsum(probs, dim=-1) - probs >= top_p
    drop[0] = False
    return logits.scatter(0, order[drop], float("-inf"))


def sample(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[Sample]:
    """One token per row of `logits` ([rows, vocab]) for the matching sampler. Never raises: a row
    whose sampling fails gets its error in its `Sample`."""
    out = [Sample() for _ in samplers]
    try:
        rows = logits.float()
        finite = torch.isfinite(rows).all(dim=-1).tolist()
        greedy = [i for i, s in enumerate(samplers) if s.plain_greedy and finite[i]]
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
        if not finite[i]:
            out[i].error = FloatingPointError("the model produced non-finite logits (NaN or infinity)")
            continue
        try:
            if not sampler.plain_greedy:
                out[i].token = sampler.choose(sampler.process(rows[i]))
        except Exception as exc:  # noqa: BLE001 - this request's problem, not the step's
            log.warning("sampling failed for one request: %s: %s", type(exc).__name__, exc)
            out[i].error = exc
    return out

"""Rank 0's sampling: per-request generators, tiny temperatures and top_p, and a failure that stays
with its own request."""

from __future__ import annotations

import pytest
import torch

from dscluster.engine.api import SamplingParams
from dscluster.engine.sampling import RequestSampler, greedy_tokens, sample


def logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_takes_the_argmax():
    x = logits()
    out = sample(x, [RequestSampler(SamplingParams(temperature=0)) for _ in range(4)])
    assert [s.token for s in out] == x.argmax(-1).tolist()
    assert all(s.error is None for s in out)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-320),            # a valid OpenAI temperature: logits / t overflows
    SamplingParams(temperature=5e-6, seed=1),
    SamplingParams(temperature=1.0, top_p=1e-300, seed=2),   # keeps only the most likely token
    SamplingParams(temperature=0.7, top_p=1e-300, seed=3),
])
def test_tiny_temperature_and_top_p_sample_the_most_likely_token(params):
    x = logits()
    out = sample(x, [RequestSampler(params) for _ in range(4)])
    assert all(s.error is None for s in out), [s.error for s in out]
    assert [s.token for s in out] == x.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_the_neighbours():
    x = logits(rows=1, vocab=200, seed=5)

    def draw(neighbours: int) -> list[int]:
        mine = RequestSampler(SamplingParams(temperature=1.0, seed=7))
        others = [RequestSampler(SamplingParams(temperature=1.0, seed=100 + i)) for i in range(neighbours)]
        tokens = []
        for _ in range(20):
            rows = torch.cat([x, logits(rows=neighbours, vocab=200, seed=len(tokens))]) if neighbours else x
            tokens.append(sample(rows, [mine, *others])[0].token)
        return tokens

    alone = draw(0)
    assert alone == draw(3)
    assert len(set(alone)) > 3, "20 draws at temperature 1 over 200 tokens should not repeat one token"


def test_top_p_never_draws_outside_the_nucleus():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = RequestSampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    drawn = {sample(x, [sampler])[0].token for _ in range(200)}
    assert drawn == {0, 1}


def test_a_failing_request_fails_alone():
    x = logits()
    x[2, 5] = float("nan")
    samplers = [RequestSampler(SamplingParams(temperature=t, seed=1)) for t in (0, 0.8, 0.8, 0)]

    class Boom(RequestSampler):
        def choose(self, row):
            raise RuntimeError("injected")

    samplers[1] = Boom(SamplingParams(temperature=0.8, seed=1))
    out = sample(x, samplers)
    assert isinstance(out[1].error, RuntimeError)
    assert isinstance(out[2].error, FloatingPointError)     # non-finite logits
    assert out[0].error is None and out[0].token == int(x[0].argmax())
    assert out[3].error is None and out[3].token == int(x[3].argmax())


# -- what a request asks for beyond temperature and top_p (vLLM's semantics, written out here) ----------


def test_penalties_follow_their_definitions():
    """repetition (prompt and output tokens: positive logits divided, negative multiplied), then
    frequency (times each output token's count) and presence (once per output token)."""
    x = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    sampler = RequestSampler(params, prompt_ids=(0, 1))
    for token in (3, 3, 4):
        sampler.accept(token)
    want = x.clone()
    for t in (0, 1, 3, 4):                              # in the prompt or generated
        want[t] = want[t] / 2.0 if want[t] > 0 else want[t] * 2.0
    want[3] -= 0.5 * 2 + 0.25
    want[4] -= 0.5 * 1 + 0.25
    assert torch.allclose(sampler.adjust(x), want)
    assert not sampler.plain_greedy and sample(x[None], [sampler])[0].token == int(want.argmax())


def test_counts_follow_tokens_accepted_after_the_first_adjustment():
    x = torch.zeros(5)
    sampler = RequestSampler(SamplingParams(temperature=0, frequency_penalty=1.0))
    sampler.adjust(x)                                   # counts now live on the logits' device
    sampler.accept(2)
    sampler.accept(2)
    assert sampler.adjust(x).tolist() == [0.0, 0.0, -2.0, 0.0, 0.0]


def test_logit_bias_and_min_tokens():
    x = torch.zeros(6)
    x[5] = 4.0                                          # the stop token is the most likely
    sampler = RequestSampler(SamplingParams(temperature=0, min_tokens=2, logit_bias=((1, 3.0), (2, -100.0))),
                             stop_ids=frozenset({5}))
    first = sampler.adjust(x)
    assert first[5] == float("-inf") and first[1] == 3.0 and first[2] == -100.0
    assert sample(x[None], [sampler])[0].token == 1
    sampler.accept(1)
    sampler.accept(1)
    assert sample(x[None], [sampler])[0].token == 5    # two tokens made: the stop token may come


def test_logprobs_are_the_raw_log_softmax_with_rank_and_top_k():
    x = logits(rows=1, vocab=30, seed=9)
    sampler = RequestSampler(SamplingParams(temperature=0.8, seed=4, logprobs=3, presence_penalty=1.0))
    drawn = sample(x, [sampler])[0]
    reference = torch.log_softmax(x[0], dim=-1)
    assert drawn.logprobs.token == drawn.token
    assert abs(drawn.logprobs.logprob - reference[drawn.token].item()) < 1e-6
    assert drawn.logprobs.rank == int((reference > reference[drawn.token]).sum()) + 1
    top_ids = [t for t, _ in drawn.logprobs.top]
    assert top_ids == reference.topk(3).indices.tolist()


def test_choice_seeds_are_derived_from_the_request_seed():
    params = SamplingParams(seed=2**63 - 1)
    assert params.for_choice(0) is params and params.for_choice(1).seed == 0
    assert SamplingParams(seed=None).for_choice(3).seed is None


def test_top_k_and_min_p_never_draw_outside_their_sets():
    x = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    top_k = RequestSampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {sample(x, [top_k])[0].token for _ in range(200)} == {0, 1}
    min_p = RequestSampler(SamplingParams(temperature=1.0, min_p=0.4, seed=0))   # >= 0.16: tokens 0, 1, 2
    assert {sample(x, [min_p])[0].token for _ in range(300)} == {0, 1, 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_pipeline_stage_draws_rank_0s_greedy_tokens(dtype):
    """Under pipeline parallelism a step of greedy requests is drawn by the last stage
    (sampling.greedy_tokens): the same token as rank 0's greedy sampling of the same logits
    for every row, ties (the first of equal maxima) and non-finite rows (-1: rank 0 fails them
    with sampling's error) included."""
    x = logits(rows=6).to(dtype)
    x[1, 7] = x[1, 3] = x[1].max() + 1          # a tie: the first of the two
    x[2, 5] = float("nan")
    x[3, 0] = float("inf")
    x[4, :] = -5.0                              # every token equal
    drawn = sample(x, [RequestSampler(SamplingParams(temperature=0)) for _ in range(6)])
    assert [s.token if s.error is None else -1 for s in drawn] == greedy_tokens(x).tolist()
    assert greedy_tokens(x).tolist()[1:5] == [3, -1, -1, 0]

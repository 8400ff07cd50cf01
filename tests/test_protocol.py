"""Control-message encoding: what rank 0 sends is exactly what every rank decodes."""

import torch

from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.protocol import LEAVE, Join, decode, encode, prefill, prefill_count


def test_tensors_round_trip_bit_exact():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        t = (torch.randn(3, 5) * 100).to(dtype)
        back = decode(encode(t))
        assert back.dtype == dtype and back.shape == t.shape
        assert torch.equal(back, t)


def test_generation_requests_round_trip():
    reqs = [GenerationRequest((1, 2, 3), SamplingParams(max_tokens=4, temperature=0.5, top_p=0.9, seed=7,
                                                        stop_token_ids=(2,))),
            GenerationRequest((5,), SamplingParams())]
    assert decode(encode(reqs)) == reqs


def test_joins_round_trip():
    joins = [Join(3, (1, 2, 3), 2, SamplingParams(max_tokens=4, temperature=0.5, seed=7)), Join(4, (9,), 1)]
    assert decode(encode(joins)) == joins


def test_step_actions_are_distinct():
    """A row's action is a token id (>= 0), LEAVE, or a prompt chunk of n >= 0 tokens."""
    codes = [prefill(n) for n in range(5)]
    assert LEAVE not in codes and all(code < 0 for code in codes)
    assert [prefill_count(code) for code in codes] == list(range(5))


def test_message_is_small():
    """A predict unit of the seeds' model is a few hundred bytes, not a pickled module."""
    assert len(encode(torch.zeros(1, 10))) < 400

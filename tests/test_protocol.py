"""Control-message encoding: what rank 0 sends is exactly what every rank decodes."""

import torch

from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.protocol import decode, encode


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


def test_message_is_small():
    """A predict unit of the seeds' model is a few hundred bytes, not a pickled module."""
    assert len(encode(torch.zeros(1, 10))) < 400

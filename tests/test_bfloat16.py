"""bfloat16 on the CPU against float32 (tests/bfloat16_reference.py: the tolerance, and why a
wrong kernel fails it). tests/test_gpu.py holds a GPU's bfloat16 to the same check."""

from __future__ import annotations

import torch

from bfloat16_reference import check_bfloat16_against_float32  # tests/bfloat16_reference.py
from dscluster.engine.client import open_engine


def test_bfloat16_logits_and_greedy_tokens_agree_with_float32(tiny):
    bf16 = open_engine(tiny, dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in bf16.runtime.model.module.parameters())
    found = check_bfloat16_against_float32(bf16, tiny)
    print(f"bfloat16: largest logit error {found['largest_error']:.2%} of the largest logit, "
          f"{found['compared_steps']} greedy steps compared")

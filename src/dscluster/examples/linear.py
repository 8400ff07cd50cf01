"""Example models for import specs: `dscluster serve dscluster.examples.linear:build --nproc 2`.

`build` is the seeds' `Linear(10, 1)`; `build_mlp` a small MLP. Weights come from a fixed seed,
so every rank builds the same model without a checkpoint (pass `--checkpoint` to load real ones).
"""

from __future__ import annotations

import torch
from torch import nn


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(module: nn.Module, seed: int) -> nn.Module:
    generator = _seeded(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return module.eval()


def build() -> nn.Module:
    """The seeds' model: one example is 10 floats, the output one float."""
    return _init(nn.Linear(10, 1), seed=0)


def build_mlp() -> nn.Module:
    """A small MLP: 10 floats in, 4 out."""
    return _init(nn.Sequential(nn.Linear(10, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)),
                 seed=1)

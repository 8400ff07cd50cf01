"""The pipeline's stage layout and how a model is cut, without processes (engine/pipeline.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dscluster.engine.pipeline import SkippedLayer, StageInput, cut, plan_layout, stage_bounds
from dscluster.errors import UsageError


def test_stages_are_contiguous_and_balanced_by_layer_count():
    assert stage_bounds(3, 2) == [(0, 2), (2, 3)]
    assert stage_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    layout = plan_layout(8, 2, 5, 10)   # rank 5 of 8 in 2 stages: stage 1, its tp rank 1 of 4
    assert (layout.stage, layout.tp_size, layout.tp_rank, layout.first_layer, layout.end_layer) == (1, 4, 1, 5, 10)
    assert layout.stage_ranks(1) == [4, 5, 6, 7] and layout.rank_of(0) == 1


@pytest.mark.parametrize("world, stages, layers, message", [
    (3, 2, 4, "does not divide into 2 stages"),
    (4, 4, 3, "fewer than the stages"),
])
def test_layouts_that_cannot_be_made(world, stages, layers, message):
    with pytest.raises(UsageError, match=message):
        plan_layout(world, stages, 0, layers)


@pytest.mark.parametrize("rank", [0, 1])
def test_cut_keeps_only_the_stage(rank):
    """Stage 0 keeps the embedding and layers 0-1; stage 1 layer 2, the norm and the head."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    cut(model, plan_layout(2, 2, rank, 3), "tiny")
    names = {n.split(".weight")[0] for n, _ in model.named_parameters()}
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert layers == ({0, 1} if rank == 0 else {2})
    assert ("model.embed_tokens" in names) == (rank == 0)
    assert ("lm_head" in names) == ("model.norm" in names) == (rank == 1)
    skipped = [i for i, layer in enumerate(model.model.layers) if isinstance(layer, SkippedLayer)]
    assert skipped == ([2] if rank == 0 else [0, 1])
    assert isinstance(model.model.embed_tokens, StageInput) == (rank == 1)

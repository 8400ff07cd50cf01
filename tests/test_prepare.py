"""What every rank checks before any collective (engine/parallel.py `prepare`), in this process:
no rank, no collective. The models are written by `dscluster tiny-model` and by transformers."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from dscluster.engine.loading import build_on_meta, model_tensors, open_model
from dscluster.engine.parallel import prepare


def test_prepare_maps_every_parameter_to_its_checkpoint_tensor(tiny):
    source = open_model(tiny, "float32")
    prepared = prepare(source, "tp", 2)
    stored = load_file(f"{tiny}/model.safetensors")
    assert prepared.meta_module is not None and all(p.is_meta for p in prepared.meta_module.parameters())
    assert set(prepared.keys) >= {n for n, _ in prepared.meta_module.named_parameters()}
    assert all(tuple(stored[k].shape) == prepared.checkpoint.tensors[k].shape for k in prepared.keys.values())
    assert prepare(source, "replicated", 2).meta_module is None  # only tp splits the meta structure


def test_buffers_on_the_meta_model_are_the_constructors(tiny):
    """Rotary inv_freq is computed, not stored: the meta build must compute it as from_pretrained does."""
    from transformers import AutoModelForCausalLM

    meta = build_on_meta(open_model(tiny, "float32"))
    real = AutoModelForCausalLM.from_pretrained(tiny)
    for (name, buf), (_, want) in zip(meta.named_buffers(), real.named_buffers(), strict=True):
        assert not buf.is_meta and torch.equal(buf, want), name
    assert meta.generation_config.eos_token_id == real.generation_config.eos_token_id


def test_tied_lm_head_reads_the_embedding(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    source = open_model(str(tmp_path / "tied"), "float32")
    tensors = model_tensors(build_on_meta(source))
    assert "model.embed_tokens.weight" in tensors.aliases["lm_head.weight"]
    keys = prepare(source, "tp", 2).keys
    assert keys["lm_head.weight"] == "model.embed_tokens.weight"


def test_without_safetensors_every_rank_reads_the_whole_checkpoint(tiny, tmp_path, caplog):
    copy = tmp_path / "bin"
    shutil.copytree(tiny, copy)
    torch.save(load_file(str(copy / "model.safetensors")), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    prepared = prepare(open_model(str(copy), "float32"), "tp", 2)
    assert prepared.checkpoint is None and prepared.meta_module is None
    assert "no safetensors weights: every rank reads the whole checkpoint" in caplog.text


def test_import_spec_models_are_not_checked_against_a_directory():
    prepared = prepare(open_model("dscluster.examples.linear:build_mlp"), "zero3", 2)
    assert prepared.checkpoint is None and not prepared.source.hf


@pytest.mark.parametrize("tp", [3, 4])
def test_heads_that_do_not_divide_are_named(tiny, tp):
    from dscluster.errors import UsageError

    with pytest.raises(UsageError, match=f"num_attention_heads 2 does not divide by {tp}"):
        prepare(open_model(tiny, "float32"), "tp", tp)

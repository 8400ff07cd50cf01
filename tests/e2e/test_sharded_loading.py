"""Each rank loads only its own shard, and the split model still answers exactly like the whole one.

tp=4 on a grouped-query-attention model stored as many files; tied embeddings (no lm_head in the
checkpoint: AutoTP splits a copy of the embedding); and bad checkpoints, which every rank names on
its own and exits 2 before any collective. The references are the unsharded model loaded
by transformers' own `from_pretrained` (`open_engine`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dscluster.cluster.launch import free_port
from dscluster.engine.client import open_engine
from test_engine import WORK, reference, run_ranks  # tests/e2e/test_engine.py
from servers import assert_every_rank_exits_2  # tests/e2e/servers.py
from test_launchers import clean_env  # tests/e2e/test_launchers.py


def assert_same_answers(got: dict, want: dict, tolerance: float = 1e-5) -> None:
    for sharded, single in zip(got["predict"], want["predict"], strict=True):
        diff = (torch.tensor(sharded) - torch.tensor(single)).abs().max().item()
        assert diff < tolerance, f"logits differ from the unsharded model by {diff}"
    tokens = [g["token_ids"] for g in got["generate"]]
    assert tokens == want["generate"]  # greedy and seeded sampling, batched
    greedy = sum(1 for g in WORK["generate"] if g["params"]["temperature"] == 0)
    assert tokens[:greedy] == want["generate_alone"][:greedy] and all(tokens)


def test_tp4_on_a_multi_file_gqa_checkpoint_equals_unsharded(tmp_path, gqa):
    """8 query heads in 2 key/value groups over 4 ranks: AutoTP gives ranks 0 and 1 one group
    each and ranks 2 and 3 none; the output must not notice."""
    assert len(list(Path(gqa).glob("model-*.safetensors"))) > 4
    got = run_ranks(tmp_path, {"model": gqa, "engine": "tp"}, WORK, nproc=4, timeout=400)
    assert got["engine"] == "tp" and got["world_size"] == 4
    full = sum(p.numel() for p in open_engine(gqa).runtime.model.module.parameters())
    # A quarter of every split weight, plus the embedding AutoTP leaves whole.
    assert got["local_params"] < 0.4 * full, f"rank 0 holds {got['local_params']} of {full}"
    assert_same_answers(got, reference(gqa, WORK))


def write_tied_llama(directory: Path) -> str:
    """A random Llama whose lm_head is its embedding, saved by transformers (which then stores
    only model.embed_tokens.weight)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(8)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=2, pad_token_id=3, bos_token_id=1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape) * 0.08)
    model.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("engine", ["tp", "zero3"])
def test_tied_embeddings_split_equal_unsharded(tmp_path, engine):
    model = write_tied_llama(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(Path(model) / "model.safetensors"))
    got = run_ranks(tmp_path, {"model": model, "engine": engine}, WORK)
    assert got["engine"] == engine
    assert_same_answers(got, reference(model, WORK))


def _drop_tensor(model: Path, key: str) -> None:
    state = load_file(str(model / "model.safetensors"))
    del state[key]
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


BAD = {
    "missing tensor": (lambda m: _drop_tensor(m, "model.layers.1.mlp.up_proj.weight"),
                       "tensor model.layers.1.mlp.up_proj.weight is missing"),
    "shape": (lambda m: _edit_config(m, intermediate_size=256),
              "tensor model.layers.0.mlp.gate_proj.weight is [512, 128] in model.safetensors, but config.json "
              "makes it [256, 128]"),
    "heads": (lambda m: _edit_config(m, num_attention_heads=1, num_key_value_heads=1),
              "config.json's num_attention_heads 1 does not divide by 2"),
    "intermediate": (lambda m: _edit_config(m, intermediate_size=511),
                     "config.json's intermediate_size 511 does not divide by 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_exits_2_on_every_rank_before_any_collective(tmp_path, tiny, case):
    """Both ranks of a tp=2 group, each its own process (as on two nodes), form the group; each must
    name the problem in one line and exit 2 at once. A rank that went on to its first collective
    would wait there for the other, which is gone, until the liveness timeout: exit 3."""
    model = tmp_path / "bad"
    shutil.copytree(tiny, model)
    damage, message = BAD[case]
    damage(model)
    master = str(free_port())
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "dscluster", "serve", str(model), "--engine", "tp",
                               "--port", str(free_port()), "--heartbeat-timeout", "60"],
                              env=clean_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="1",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=master),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    assert_every_rank_exits_2(procs, message)
    assert time.monotonic() - started < 55  # well inside the 60 s a rank waits for a silent peer

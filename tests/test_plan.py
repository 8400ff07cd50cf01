"""`dscluster plan`: the memory arithmetic on known model sizes, a real model directory, bad input."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from pathlib import Path


from cli_in_process import run_dscluster  # tests/cli_in_process.py


def plan(*args: str, in_a_process: bool = False) -> tuple[int, dict | str, str]:
    """`dscluster plan ARGS` in this process, or with in_a_process through `python -m dscluster` (the
    entry point itself, which test_config_with_a_bad_value and test_nothing_fits_says_what_is_missing use)."""
    if in_a_process:
        proc = subprocess.run([sys.executable, "-m", "dscluster", "plan", *args], capture_output=True, text=True,
                              timeout=60)
    else:
        proc = run_dscluster("plan", *args)
    out = json.loads(proc.stdout) if "--json" in args and proc.stdout.strip() else proc.stdout
    return proc.returncode, out, proc.stderr


def test_7b_bf16_fits_one_80gib_gpu():
    code, p, _ = plan("--params", "7e9", "--dtype", "bfloat16", "--gpu-mem-gib", "80", "--json")
    assert code == 0 and p["fits"]
    assert (p["tensor_parallel"], p["nodes"], p["recommendation"]) == (1, 1, "single-node")
    assert 13 < p["candidates"][0]["weights_gib"] < 14  # 7e9 x 2 bytes = 13.04 GiB
    assert p["per_gpu_gib"] < 80


def test_70b_bf16_needs_several_gpus_but_one_node():
    code, p, _ = plan("--params", "70e9", "--dtype", "bfloat16", "--gpu-mem-gib", "80", "--gpus-per-node", "8",
                      "--json")
    assert code == 0 and p["fits"]
    assert p["tensor_parallel"] > 1 and p["nodes"] == 1 and p["recommendation"] == "single-node"
    assert not p["candidates"][0]["fits"]  # tp=1: 130 GiB of weights alone
    assert "k8s render" in p["render_command"] and "--nodes 1" in p["render_command"]


def test_405b_bf16_needs_more_than_one_node_of_8x80():
    code, p, _ = plan("--params", "405e9", "--dtype", "bfloat16", "--gpu-mem-gib", "80", "--gpus-per-node", "8",
                      "--json")
    assert code == 0 and p["fits"] and p["recommendation"] == "multi-node"
    # 405e9 x 2 bytes = 754 GiB > 8 x 80 GiB: two nodes, tensor parallelism over all 16 GPUs.
    assert (p["tensor_parallel"], p["nodes"], p["gpus_per_node"]) == (16, 2, 8)
    assert not [c for c in p["candidates"] if c["tensor_parallel"] == 8][0]["fits"]
    assert "mpijob" in p["render_command"] and f"--nodes {p['nodes']}" in p["render_command"]
    # across the nodes a pipeline stage per node, tensor parallel 8 inside each
    assert p["pipeline_parallel"] == 2 and p["render_command"].endswith("--pp 2")


def test_float32_doubles_the_weights():
    _, bf16, _ = plan("--params", "7e9", "--dtype", "bfloat16", "--json")
    _, fp32, _ = plan("--params", "7e9", "--dtype", "float32", "--json")
    assert fp32["candidates"][0]["weights_gib"] == pytest.approx(2 * bf16["candidates"][0]["weights_gib"], rel=0.01)


def test_nothing_fits_says_what_is_missing():
    code, p, _ = plan("--params", "405e9", "--gpu-mem-gib", "24", "--gpus-per-node", "8", "--max-nodes", "1",
                      "--json", in_a_process=True)
    assert code == 1 and not p["fits"] and "--max-nodes" in p["missing"]
    code, text, _ = plan("--params", "405e9", "--gpu-mem-gib", "24", "--gpus-per-node", "8", "--max-nodes", "1")
    assert code == 1 and "does not fit" in text


def test_tiny_model_directory(tiny):
    code, p, _ = plan("--model", tiny, "--json")
    assert code == 0 and p["tensor_parallel"] == 1 and p["recommendation"] == "single-node"
    assert 0.5e6 < p["params"] < 2e6  # measured from the weight file: 0.8M parameters
    assert {c["tensor_parallel"] for c in p["candidates"]} == {1, 2}  # divisors of its 2 heads
    code, text, _ = plan("--model", tiny)
    assert code == 0 and "fits on one node" in text and "dscluster k8s render" in text


@pytest.mark.parametrize("args, message", [
    (["--params", "lots"], "--params"),
    (["--params", "-5"], "--params"),
    (["--params", "7e9", "--gpu-mem-gib", "0"], "--gpu-mem-gib"),
    (["--model", "/nonexistent/model"], "config.json"),
    ([], "--model"),
])
def test_bad_input_exits_2_naming_it(args, message):
    code, _, err = plan(*args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_config_without_shape_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = plan("--model", str(tmp_path))
    assert code == 2 and "num_hidden_layers" in err


def run_render(command: str):
    argv = shlex.split(command)
    assert argv[:3] == ["dscluster", "k8s", "render"]
    return run_dscluster(*argv[1:])


@pytest.mark.parametrize("params, kind, nodes", [("70e9", "deployment", 1), ("7e9", "deployment", 1),
                                                 ("405e9", "mpijob", 2)])
def test_render_command_renders(params, kind, nodes):
    _, p, _ = plan("--params", params, "--json")
    assert p["render_command"].startswith(f"dscluster k8s render {kind} --nodes {nodes} ")
    assert f"--engine {'tp' if p['tensor_parallel'] > 1 else 'replicated'}" in p["render_command"]
    proc = run_render(p["render_command"])
    assert proc.returncode == 0, proc.stderr
    assert "kind: " in proc.stdout and "nvidia.com/gpu" in proc.stdout
    workload = next(yaml.safe_load_all(proc.stdout))
    assert workload["kind"] == {"deployment": "Deployment", "mpijob": "MPIJob"}[kind]
    # the rendered GPUs are the plan's: one rank per GPU, tensor parallel over all of them
    assert f"nvidia.com/gpu: '{p['gpus_per_node']}'" in proc.stdout
    if kind == "deployment":
        command = workload["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--nproc") + 1] == str(p["tensor_parallel"])


def test_render_command_for_a_local_directory_uses_the_pod_path(tiny, tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(tiny, copy)
    proc = run_dscluster("plan", "--model", "my-model", "--json", cwd=tmp_path)
    p = json.loads(proc.stdout)
    assert "--model /mnt/checkpoints/my-model " in p["render_command"] and "--engine replicated" in p["render_command"]
    assert run_render(p["render_command"]).returncode == 0


def test_weights_rescaled_from_the_stored_dtype(tiny):
    size = sum(f.stat().st_size for f in __import__("pathlib").Path(tiny).glob("*.safetensors"))
    _, bf16, _ = plan("--model", tiny, "--dtype", "bfloat16", "--json")  # stored as float32 (config "dtype")
    _, fp32, _ = plan("--model", tiny, "--dtype", "float32", "--json")
    assert fp32["params"] == pytest.approx(size / 4) and bf16["params"] == pytest.approx(size / 4)
    assert fp32["candidates"][0]["weights_gib"] == pytest.approx(size / 2**30, abs=0.01)


def test_same_weights_in_two_formats_count_once(tiny, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny, copy)
    shutil.copy(copy / "model.safetensors", copy / "pytorch_model.bin")
    _, one, _ = plan("--model", tiny, "--json")
    _, two, _ = plan("--model", str(copy), "--json")
    assert two["params"] == one["params"]


def test_kv_cache_grows_with_context_and_batch():
    """--context-len and --batch-size, the older names of --max-model-len and --max-num-seqs, still work."""
    def kv(*extra):
        return plan("--params", "70e9", "--json", *extra)[1]["candidates"][0]["kv_cache_gib"]
    base = kv("--context-len", "4096", "--batch-size", "1")
    # 2 x 80 layers x 8 KV heads x 128 x 4096 x 2 bytes = 1.25 GiB
    assert base == pytest.approx(1.25, abs=0.01)
    assert kv("--context-len", "32768", "--batch-size", "1") == pytest.approx(8 * base, rel=0.01)
    assert kv("--context-len", "4096", "--batch-size", "4") == pytest.approx(4 * base, rel=0.01)
    _, old, _ = plan("--params", "70e9", "--context-len", "2000", "--batch-size", "3", "--json")
    _, new, _ = plan("--params", "70e9", "--max-model-len", "2000", "--max-num-seqs", "3", "--json")
    assert old == new and (new["max_model_len"], new["max_num_seqs"]) == (2000, 3)
    assert (new["context_len"], new["batch_size"]) == (2000, 3)


def test_nothing_fits_names_the_node_count_that_would():
    code, p, _ = plan("--params", "405e9", "--gpu-mem-gib", "24", "--max-nodes", "1", "--json")
    assert code == 1 and p["recommendation"] is None and "pass --max-nodes" in p["missing"]
    code, p, _ = plan("--params", "405e9", "--gpu-mem-gib", "1", "--json")
    assert code == 1 and "no more nodes help" in p["missing"] and "128 attention heads" in p["missing"]


def test_other_config_key_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}))
    code, p, _ = plan("--model", str(tmp_path), "--json")
    assert code == 0 and p["tensor_parallel"] == 1
    assert 100e6 < p["params"] < 200e6  # no weight files: estimated from the shape, Llama-style MLP
    # divisors of 12 heads up to one node of 8 (12 would span part of a second node)
    assert {c["tensor_parallel"] for c in p["candidates"]} == {1, 2, 3, 4, 6}


def test_config_with_a_bad_value(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 2, "hidden_size": "big", "num_attention_heads": 2}))
    code, _, err = plan("--model", str(tmp_path), in_a_process=True)
    assert code == 2 and "hidden_size" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 2, "hidden_size": 4, "num_attention_heads": 8}))  # no width left per head
    code, _, err = plan("--model", str(tmp_path))
    assert code == 2 and "hidden_size 4 is smaller than its num_attention_heads 8" in err


def test_host_memory_per_node_with_shard_only_loading():
    """Each GPU rank holds its fixed cost in host memory at load (its shards go straight to its
    GPU), so a node's host memory bounds how many of its GPUs can run ranks, not the model."""
    _, p, _ = plan("--params", "70e9", "--json")
    assert p["shard_only_loading"] and p["host_per_rank_gib"] == 2.0 and p["host_mem_gib"] is None
    assert [c["host_per_node_gib"] for c in p["candidates"]] == [2.0 * c["gpus_per_node"] for c in p["candidates"]]
    code, p, _ = plan("--params", "70e9", "--host-mem-gib", "8", "--json")
    assert code == 0 and p["tensor_parallel"] == 4
    assert [c["fits"] for c in p["candidates"] if c["tensor_parallel"] >= 8] == [False] * 4
    assert "16 GiB of host memory per node at load, more than --host-mem-gib 8" in p["candidates"][3]["why_not"]
    code, text, _ = plan("--params", "70e9", "--host-mem-gib", "8")
    assert "host memory at load: 2 GiB per rank (each rank reads only its own shards" in text
    assert "8 GiB per node (--host-mem-gib 8)" in text


def test_a_checkpoint_without_safetensors_costs_the_whole_model_per_rank(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    copy = tmp_path / "bin-only"
    shutil.copytree(tiny, copy)
    torch.save(load_file(str(copy / "model.safetensors")), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    _, p, _ = plan("--model", str(copy), "--dtype", "float32", "--json")
    weights = p["candidates"][0]["weights_gib"]
    assert not p["shard_only_loading"] and p["host_per_rank_gib"] == pytest.approx(2.0 + weights, abs=0.01)
    code, p, _ = plan("--model", str(copy), "--host-mem-gib", "2", "--json")
    assert code == 1 and not p["fits"] and "no safetensors files: every rank reads the whole checkpoint" in p["missing"]


def test_host_memory_must_be_positive():
    code, _, err = plan("--params", "7e9", "--host-mem-gib", "0")
    assert code == 2 and "--host-mem-gib" in err and len(err.strip().splitlines()) == 1


# A Llama-3-8B-like config.json without weight files: the parameters come from the shape (per layer
# the query and output projections 2 x 4096^2, the key and value projections of the 8 key/value heads
# 2 x 4096 x 1024, the gated MLP 3 x 4096 x 14336, two norms; the final norm; untied embeddings and
# head 2 x 128256 x 4096: 8.03e9), every other number below by hand.
LLAMA_8B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
            "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
GIB = 2**30


def llama_8b(tmp_path, **overrides) -> str:
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_8B, **overrides}))
    return str(tmp_path)


def pool_tokens_by_hand(tp: int, gpu_gib: float, utilization: float = 0.9, seqs: int = 32,
                        batched: int = 256) -> int:
    """What is left of gpu_gib x utilization after the weights and a step's activations (with the
    10 % margin and 1 GiB of runtime), in whole blocks of 16 tokens of this config's keys and
    values on one rank (8 KV heads, at most 8 ranks share them)."""
    params = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096 + 2 * 128256 * 4096
    weights = params * 2 / tp
    activations = batched * (2 * 4096 + 14336 / tp) * 2 + seqs * 128256 * 4
    left = gpu_gib * utilization * GIB - (weights + activations) * 1.1 - GIB
    per_token = 2 * 32 * (8 // min(tp, 8)) * 128 * 2
    return max(0, int(left // (16 * per_token))) * 16


def test_kv_bytes_per_token_and_the_pool_of_each_layout(tmp_path):
    code, p, _ = plan("--model", llama_8b(tmp_path), "--max-model-len", "8192", "--gpu-mem-gib", "19", "--json")
    assert code == 0 and (p["max_model_len"], p["max_num_seqs"], p["gpu_memory_utilization"]) == (8192, 32, 0.9)
    assert p["usable_gib"] == 17.1 and p["block_size"] == 16
    by_tp = {c["tensor_parallel"]: c for c in p["candidates"]}
    # 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 bytes; tp splits the 8 heads, then every rank keeps one
    assert {tp: c["kv_bytes_per_token"] for tp, c in by_tp.items()} == {
        1: 131072, 2: 65536, 4: 32768, 8: 16384, 16: 16384, 32: 16384}
    for tp, c in by_tp.items():
        tokens = pool_tokens_by_hand(tp, 19)
        assert c["kv_pool_tokens"] == tokens, tp
        assert c["kv_pool_gib"] == pytest.approx(tokens * c["kv_bytes_per_token"] / GIB, abs=0.005)
        # 8192 tokens are 512 blocks; the floor keeps a pool one block short from reading as enough
        assert c["max_concurrency"] == math.floor(tokens / 8192 * 100) / 100
        # the cache of 32 requests of 8192 tokens is part of what each rank needs
        assert c["kv_cache_gib"] == pytest.approx(32 * 8192 * c["kv_bytes_per_token"] / GIB, abs=0.005)
        assert c["fits"] == (tokens >= 32 * 8192) and (c["why_not"] is None) == c["fits"]
    # tp=1: 15.0 GiB of weights x 1.1 + 1 GiB leave nothing of 17.1 GiB; tp=2: 15.7 requests of 8192 < 32
    assert not by_tp[1]["fits"] and "no room for a KV cache" in by_tp[1]["why_not"]
    assert by_tp[1]["kv_pool_tokens"] == 0 and by_tp[1]["max_concurrency"] == 0
    assert not by_tp[2]["fits"] and 15 < by_tp[2]["max_concurrency"] < 16
    assert f"holds {by_tp[2]['max_concurrency']:.2f} requests of 8,192 tokens, fewer than --max-num-seqs 32" \
        in by_tp[2]["why_not"]
    assert p["tensor_parallel"] == 4 and by_tp[4]["fits"]


def test_requests_hold_whole_blocks(tmp_path):
    """1000 tokens are 63 blocks of 16 (1008 tokens) in the cache, and a request's share of the pool."""
    _, p, _ = plan("--model", llama_8b(tmp_path), "--max-model-len", "1000", "--max-num-seqs", "4", "--json")
    tp1 = p["candidates"][0]
    assert tp1["kv_cache_gib"] == pytest.approx(4 * 1008 * 131072 / GIB, abs=0.005)  # 0.49 GiB, not 0.488
    tokens = pool_tokens_by_hand(1, 80, seqs=4)
    assert tp1["kv_pool_tokens"] == tokens and tp1["max_concurrency"] == math.floor(tokens / 1008 * 100) / 100


def test_a_layout_whose_pool_cannot_hold_one_request_does_not_fit(tmp_path):
    """At tp=2 on 19 GiB the pool has about 7.85 GiB: 128K tokens of 64 KiB, one request of the
    model's 131072 tokens takes 8 GiB. Even with --max-num-seqs 1 that layout does not fit."""
    model = llama_8b(tmp_path)
    code, p, _ = plan("--model", model, "--gpu-mem-gib", "19", "--max-num-seqs", "1", "--json")
    assert code == 0 and p["max_model_len"] == 131072  # the model's context, by default
    tp2 = p["candidates"][1]
    assert tp2["tensor_parallel"] == 2 and tp2["kv_pool_tokens"] == pool_tokens_by_hand(2, 19, seqs=1) < 131072
    assert not tp2["fits"] and tp2["max_concurrency"] < 1
    assert tp2["why_not"] == (f"the KV pool of {tp2['kv_pool_tokens']:,} tokens cannot hold one request of "
                              "131,072 tokens")
    assert p["tensor_parallel"] == 4  # 12 GiB of 32 KiB tokens: almost 3 requests
    code, text, _ = plan("--model", model, "--gpu-mem-gib", "19", "--max-num-seqs", "1")
    assert f"no: the KV pool of {tp2['kv_pool_tokens']:,} tokens cannot hold one request of 131,072 tokens" in text
    # with no more GPUs than 2, nothing fits, and the answer says why
    code, p, _ = plan("--model", model, "--gpu-mem-gib", "19", "--max-num-seqs", "1", "--gpus-per-node", "2",
                      "--max-nodes", "1", "--json")
    assert code == 1 and not p["fits"]
    assert "cannot hold one request of 131,072 tokens" in p["missing"] and "pass --max-nodes 2" in p["missing"]


def test_the_human_answer_carries_the_pool_and_the_concurrency(tmp_path):
    code, text, _ = plan("--model", llama_8b(tmp_path), "--max-model-len", "8192", "--gpu-mem-gib", "20")
    tokens = pool_tokens_by_hand(4, 20)
    assert code == 0 and "18 GiB usable (--gpu-memory-utilization 0.9)" in text
    assert "32 request(s) of 8,192 tokens at once" in text
    assert (f"KV cache per rank at tensor parallel 4: 32 KiB per token; pool {round(tokens * 32768 / GIB, 2):g} GiB, "
            f"{tokens:,} tokens; maximum concurrency for 8,192 tokens per request: "
            f"{math.floor(tokens / 8192 * 100) / 100:.2f}x") in text
    row = next(line for line in text.splitlines() if line.split()[:2] == ["2", "1"])
    assert "64 KiB" in row and f"{pool_tokens_by_hand(2, 20):,}" in row and "no: the KV pool holds" in row


def test_gpu_memory_utilization_sizes_the_pool(tmp_path):
    model = llama_8b(tmp_path)
    _, p, _ = plan("--model", model, "--max-model-len", "8192", "--gpu-memory-utilization", "0.5", "--json")
    assert p["usable_gib"] == 40
    assert [c["kv_pool_tokens"] for c in p["candidates"]] == [
        pool_tokens_by_hand(c["tensor_parallel"], 80, utilization=0.5) for c in p["candidates"]]
    _, full, _ = plan("--model", model, "--max-model-len", "8192", "--gpu-memory-utilization", "1", "--json")
    # 40 GiB more per rank, in whole blocks of 128 KiB tokens at tp=1
    extra = full["candidates"][0]["kv_pool_tokens"] - p["candidates"][0]["kv_pool_tokens"]
    assert abs(extra - 40 * GIB // 131072) <= 16


def test_activations_follow_the_tokens_per_step(tmp_path):
    """A step computes at most --max-num-batched-tokens tokens (default: the larger of 256 and
    --max-num-seqs), and one row of float32 logits per running request."""
    model = llama_8b(tmp_path)
    def activations(*extra):
        return plan("--model", model, "--max-model-len", "4096", "--json", *extra)[1]["candidates"][0]
    default = activations()
    assert default["activation_gib"] == pytest.approx((256 * (2 * 4096 + 14336) * 2 + 32 * 128256 * 4) / GIB,
                                                      abs=0.005)
    big = activations("--max-num-batched-tokens", "8192")
    assert big["activation_gib"] == pytest.approx((8192 * (2 * 4096 + 14336) * 2 + 32 * 128256 * 4) / GIB,
                                                  abs=0.005)
    assert big["kv_pool_tokens"] < default["kv_pool_tokens"]
    assert activations("--max-num-seqs", "512")["activation_gib"] == pytest.approx(
        (512 * (2 * 4096 + 14336) * 2 + 512 * 128256 * 4) / GIB, abs=0.005)


def test_gpt2_context_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}))
    _, p, _ = plan("--model", str(tmp_path), "--json")
    # 2 x 12 layers x 12 heads x 64 x 2 bytes per token; 1024 tokens per request, the model's context
    assert p["max_model_len"] == 1024 and p["candidates"][0]["kv_bytes_per_token"] == 36864


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--max-model-len", "200000"], "exceeds the model's context of 131072 tokens"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-num-seqs", "64", "--max-num-batched-tokens", "32"], "--max-num-batched-tokens 32 must be at least"),
])
def test_bad_serving_flags_exit_2_naming_them(tmp_path, args, message):
    code, _, err = plan("--model", llama_8b(tmp_path), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# Published config.json values of models whose parameter counts are known (from their safetensors
# headers, as the Hub reports them): grouped-query attention (fewer key/value heads), untied and
# tied embeddings, a 152k vocabulary with query/key/value biases.
KNOWN_CONFIGS = {
    "Meta-Llama-3-8B": (8.03e9, {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}),
    "Meta-Llama-3-70B": (70.55e9, {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}),
    "Mistral-7B-v0.1": (7.24e9, {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 32768, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}),
    "Qwen2-7B": (7.62e9, {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}),
    "Llama-3.2-1B": (1.24e9, {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "head_dim": 64,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16"}),
    "Llama-2-7b (no GQA)": (6.74e9, {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "torch_dtype": "float16"}),
}


def config_dir(tmp_path, name: str) -> str:
    d = tmp_path / name.split()[0]
    d.mkdir()
    (d / "config.json").write_text(json.dumps(KNOWN_CONFIGS[name][1]))
    return str(d)


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_parameters_counted_from_a_config_within_2_percent(name, tmp_path):
    code, p, err = plan("--model", config_dir(tmp_path, name), "--json")
    known = KNOWN_CONFIGS[name][0]
    assert abs(p["params"] / known - 1) < 0.02, (name, p["params"], known)


def test_llama_3_70b_layout_follows_the_real_size(tmp_path):
    """79.9B counted (GQA ignored: 74.4 GiB of weights per GPU at tp=2, 92.9 GiB needed) asked for
    tp=4 where the real 70.6B fits at tp=2: on 94 GiB GPUs (H100 NVL), 16 requests of 4,096 tokens,
    tp=2 holds the weights (65.7 GiB), the activations and the cache in 83.3 of 84.6 usable GiB."""
    code, p, _ = plan("--model", config_dir(tmp_path, "Meta-Llama-3-70B"), "--max-model-len", "4096",
                      "--max-num-seqs", "16", "--gpu-mem-gib", "94", "--json")
    assert code == 0 and p["tensor_parallel"] == 2, p["candidates"][:2]
    assert 65 < p["candidates"][1]["weights_gib"] < 66.5


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1].parent / "shared" / "schemas").is_dir(),
                    reason="CRD schemas not found")
def test_the_printed_command_renders_valid_manifests_whose_pvc_holds_the_weights(tmp_path):
    from dscluster.k8s.common import _gib
    from dscluster.k8s.validate import run_validate

    schemas = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
    for name, args in (("Meta-Llama-3-70B", ()), ("Meta-Llama-3-8B", ("--gpus-per-node", "8"))):
        code, p, _ = plan("--model", config_dir(tmp_path, name), "--image", "registry.example/dscluster:0.1.0",
                          *args, "--json")
        assert code == 0
        command = p["render_command"]
        assert "--image registry.example/dscluster:0.1.0" in command
        proc = run_render(command)
        assert proc.returncode == 0, proc.stderr
        f = tmp_path / f"{name}.yaml"
        f.write_text(proc.stdout)
        assert run_validate([str(f)], crds_dir=str(schemas)) == 0
        pvc = next(d for d in yaml.safe_load_all(proc.stdout) if d["kind"] == "PersistentVolumeClaim")
        weights_gib = KNOWN_CONFIGS[name][0] * 2 / 2**30
        assert _gib(pvc["spec"]["resources"]["requests"]["storage"]) > weights_gib * 1.05
        if p["tensor_parallel"] < 8:  # the other GPUs of the node: more copies
            assert f"--replicas {8 // p['tensor_parallel']}" in command


def test_describe_says_how_to_use_the_other_gpus(tmp_path):
    code, out, _ = plan("--model", config_dir(tmp_path, "Meta-Llama-3-8B"))
    assert "a node of 8 GPUs holds 8 copies, one pod of 1 GPU(s) each: --replicas 8" in out
    assert "--pvc-size 20Gi" in out

"""`dscluster plan`: the memory arithmetic on known model sizes, a real model directory, bad input."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml


def plan(*args: str) -> tuple[int, dict | str, str]:
    proc = subprocess.run([sys.executable, "-m", "dscluster", "plan", *args], capture_output=True, text=True,
                          timeout=60)
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


def test_float32_doubles_the_weights():
    _, bf16, _ = plan("--params", "7e9", "--dtype", "bfloat16", "--json")
    _, fp32, _ = plan("--params", "7e9", "--dtype", "float32", "--json")
    assert fp32["candidates"][0]["weights_gib"] == pytest.approx(2 * bf16["candidates"][0]["weights_gib"], rel=0.01)


def test_nothing_fits_says_what_is_missing():
    code, p, _ = plan("--params", "405e9", "--gpu-mem-gib", "24", "--gpus-per-node", "8", "--max-nodes", "1",
                      "--json")
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


def run_render(command: str) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[:3] == ["dscluster", "k8s", "render"]
    return subprocess.run([sys.executable, "-m", "dscluster", *argv[1:]], capture_output=True, text=True, timeout=60)


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
    proc = subprocess.run([sys.executable, "-m", "dscluster", "plan", "--model", "my-model", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
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
    def kv(*extra):
        return plan("--params", "70e9", "--json", *extra)[1]["candidates"][0]["kv_cache_gib"]
    base = kv("--context-len", "4096")
    # 2 x 80 layers x 8 KV heads x 128 x 4096 x 2 bytes = 1.25 GiB
    assert base == pytest.approx(1.25, abs=0.01)
    assert kv("--context-len", "32768") == pytest.approx(8 * base, rel=0.01)
    assert kv("--context-len", "4096", "--batch-size", "4") == pytest.approx(4 * base, rel=0.01)


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
    code, _, err = plan("--model", str(tmp_path))
    assert code == 2 and "hidden_size" in err and len(err.strip().splitlines()) == 1


def test_host_memory_per_node_with_shard_only_loading():
    """Each GPU rank holds its fixed cost in host memory at load (its shards go straight to its
    GPU), so a node's host memory bounds how many of its GPUs can run ranks, not the model."""
    _, p, _ = plan("--params", "70e9", "--json")
    assert p["shard_only_loading"] and p["host_per_rank_gib"] == 2.0 and p["host_mem_gib"] is None
    assert [c["host_per_node_gib"] for c in p["candidates"]] == [2.0 * c["gpus_per_node"] for c in p["candidates"]]
    code, p, _ = plan("--params", "70e9", "--host-mem-gib", "8", "--json")
    assert code == 0 and p["tensor_parallel"] == 2
    assert [c["fits"] for c in p["candidates"] if c["tensor_parallel"] >= 8] == [False] * 4
    code, text, _ = plan("--params", "70e9", "--host-mem-gib", "8")
    assert "host memory at load: 2 GiB per rank (each rank reads only its own shards" in text
    assert "4 GiB per node (--host-mem-gib 8)" in text


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

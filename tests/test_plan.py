"""`dscluster plan`: the memory arithmetic on known model sizes, a real model directory, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
    assert code == 0 and p["fits"] and p["nodes"] >= 2 and p["recommendation"] == "multi-node"
    assert p["tensor_parallel"] % 8 == 0  # tensor parallelism over whole nodes
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

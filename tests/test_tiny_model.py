"""`dscluster tiny-model`: grouped-query attention and multi-file checkpoints, still deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_in_process import run_dscluster, write_tiny_model  # tests/cli_in_process.py


def tiny_model(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(path), "--seed", "5", *args],
                          capture_output=True, text=True, timeout=180)


def weights(directory: Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_gqa_heads_and_a_multi_file_checkpoint_hold_the_same_weights(tmp_path):
    shape = ["--hidden", "256", "--heads", "8", "--kv-heads", "2"]
    assert tiny_model(tmp_path / "one", *shape).returncode == 0  # through `python -m dscluster`
    write_tiny_model(tmp_path / "many", "--seed", "5", *shape, "--max-shard-size", "500KB")  # in this process
    config = json.loads((tmp_path / "many" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]) == (8, 2, 256)
    files = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(files) > 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    assert all(p.stat().st_size <= 500_000 + 1024 for p in (tmp_path / "many").glob("model-*.safetensors")
               if len(load_file(str(p))) > 1)  # a file over the size holds one tensor larger than it
    one, many = weights(tmp_path / "one"), weights(tmp_path / "many")
    assert one.keys() == many.keys() and all((one[k] == many[k]).all() for k in one)
    assert one["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 256)  # 2 kv heads of 32


@pytest.mark.parametrize("args, message", [
    (["--heads", "8", "--kv-heads", "3"], "--kv-heads 3 must divide --heads 8"),
    (["--hidden", "200", "--heads", "3"], "--hidden 200 must be --heads 3 times an even head width"),
    (["--max-shard-size", "lots"], "--max-shard-size: 'lots' is not a size"),
    (["--hidden", "100"], "--hidden 100 must be a multiple of 64"),
])
def test_bad_shapes_exit_2_naming_the_flag(tmp_path, args, message):
    if args[0] == "--max-shard-size":  # through `python -m dscluster`, the entry point itself
        proc = tiny_model(tmp_path / "m", *args)
    else:  # the same parser and handler, in this process (each refuses the shape before writing anything)
        proc = run_dscluster("tiny-model", str(tmp_path / "m"), "--seed", "5", *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

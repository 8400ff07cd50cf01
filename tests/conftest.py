"""Fixtures shared by the test suite: models written by `dscluster tiny-model` (nothing downloaded).

The suite runs on the CPU whatever the host has: its servers, launches and in-process references
must agree on the device (a sampled token on a GPU is not the CPU's), so GPUs are hidden from this
process and every process it starts. `DSCLUSTER_GPU_TESTS=1` (which `make gpu-check` sets) leaves
them visible for tests/test_gpu.py, the tests that run on GPUs.
"""

from __future__ import annotations

import os

import pytest

from cli_in_process import write_tiny_model  # tests/cli_in_process.py

GPU_TESTS = os.environ.get("DSCLUSTER_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """A 2-layer random Llama with its tokenizer and chat template (seed 3)."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "--seed", "3")


@pytest.fixture(scope="session")
def gqa(tmp_path_factory) -> str:
    """Grouped-query attention (8 heads in 2 key/value groups, width 256) stored as a multi-file
    checkpoint with its index json, as real checkpoints are."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "gqa", "--seed", "4", "--hidden", "256",
                            "--heads", "8", "--kv-heads", "2", "--max-shard-size", "1MB")

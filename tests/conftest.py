"""Fixtures shared by the test suite: models written by `dscluster tiny-model` (nothing downloaded)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def write_tiny_model(path, seed: int = 3) -> str:
    subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(path), "--seed", str(seed)],
                   check=True, capture_output=True, timeout=180)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """A 2-layer random Llama with its tokenizer and chat template (seed 3)."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def gqa(tmp_path_factory) -> str:
    """Grouped-query attention (8 heads in 2 key/value groups, width 256) stored as a multi-file
    checkpoint with its index json, as real checkpoints are."""
    path = tmp_path_factory.mktemp("model") / "gqa"
    subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(path), "--seed", "4", "--hidden", "256",
                    "--heads", "8", "--kv-heads", "2", "--max-shard-size", "1MB"],
                   check=True, capture_output=True, timeout=180)
    return str(path)

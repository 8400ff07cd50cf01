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

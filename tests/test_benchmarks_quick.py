"""The benchmark harness must keep working: quick runs write sane JSON, and the memory
benchmark's cgroup reads what the kernel says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_control_message_benchmark_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "control_message", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "control_message.json").read_text())
    assert result["benchmark"] == "control_message" and result["quick"] is True
    assert result["repetitions"] > 0
    assert set(result["cases"]) == {"heartbeat", "decode_step_8", "join_8x64", "predict_1x10", "predict_32x10"}
    timings = [(name, key, case[key]) for name, case in result["cases"].items()
               for key in ("gloo_us", "socket_us", "encode_us", "decode_us") if key in case]
    timings += [(name, "us", p["us"]) for name, p in result["primitives"].items()]
    assert len(timings) == 2 * 5 + 2 * 3 + 3
    for name, key, s in timings:
        assert s["n"] == result["repetitions"], (name, key)
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], (name, key, s)
    assert result["cases"]["join_8x64"]["encoded_bytes"] > 0
    assert (tmp_path / "control_message.png").stat().st_size > 0
    assert "sockets (now)" in (tmp_path / "summary.md").read_text()


def test_prefix_cache_benchmark_quick(tmp_path):
    """Every peer answers every request of the shared-prefix workload in full, and the JSON carries
    the ratios; a peer whose flag the server does not know is skipped, not failed."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "prefix_cache", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "prefix_cache.json").read_text())
    assert result["prefix_tokens"] >= 1000 and result["prompts_start_with_prefix_tokens"] == result["requests"]
    measured = [p for p in result["peers"] if "skipped" not in p]
    assert [p["kind"] for p in measured][:2] == ["transformers-cb", "dscluster"]
    for peer in measured:
        assert peer["answered"] == peer["exact_token_counts"] == result["requests"], peer["errors"]
        assert peer["requests_per_s"] > 0 and 0 < peer["ttft_ms"]["p50"] <= peer["ttft_ms"]["p90"]
        assert peer["requests_per_s_vs_reference"] > 0
    ours = [p for p in measured if p["kind"] == "dscluster"]
    if len(ours) == 2:  # prefix caching on and off: greedy, so the same text for every request
        assert ours[0]["same_text_as"][ours[1]["name"]] == result["requests"]
    assert (tmp_path / "prefix_cache.png").stat().st_size > 0
    assert "x transformers" in (tmp_path / "summary.md").read_text()


def test_memory_cgroup_reports_the_kernels_oom_kill():
    """The memory benchmark's cgroup helper against the kernel: a process that allocates past the
    limit is killed, and the kill, the exit status and the peak are what the kernel says."""
    from benchmarks.memory_cgroup import MemoryCgroup, kernel_log_lines, oom_lines, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    limit = 64 * 1024 * 1024
    with MemoryCgroup("test") as cgroup:
        assert cgroup.set_limit(limit) == limit
        hog = subprocess.Popen(cgroup.command([sys.executable, "-c", "x = b'x' * (256 * 1024 * 1024)"]))
        assert hog.wait(timeout=60) == -9
        assert cgroup.oom_kills() == 1
        assert 0 < cgroup.peak() <= limit
        lines = kernel_log_lines()
        if lines is not None:
            assert any(f"process {hog.pid} " in line for line in oom_lines(lines, cgroup, [hog.pid]))

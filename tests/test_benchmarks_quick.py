"""The benchmark harness must keep working: a quick control-message run writes sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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

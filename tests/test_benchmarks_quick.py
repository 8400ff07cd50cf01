"""The benchmark harness must keep working: a quick control-message run writes sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_control_message_benchmark_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "control_message", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "control_message.json").read_text())
    assert result["benchmark"] == "control_message" and result["quick"] is True
    assert result["repetitions"] > 0
    expected = {"heartbeat", "predict_1x10", "predict_32x10", "join_8x64", "decode_step_8", "decode_step_32"}
    assert set(result["cases"]) == expected
    for name, case in result["cases"].items():
        for key in ("channel_us", "object_list_us", "encode_us", "decode_us"):
            if key in case:
                assert case[key]["n"] == result["repetitions"], (name, key)
                assert 0 < case[key]["p50"] <= case[key]["p90"] <= case[key]["p99"], (name, key, case[key])
        assert "channel_us" in case
    assert "object_list_us" in result["cases"]["heartbeat"]
    assert result["cases"]["join_8x64"]["encoded_bytes"] > 0
    assert result["cases"]["decode_step_8"]["wire_bytes"] == 8 * (3 + 8)  # the header alone
    assert (tmp_path / "control_message.png").stat().st_size > 0
    assert "ControlChannel" in (tmp_path / "summary.md").read_text()

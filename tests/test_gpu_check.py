"""`make gpu-check` where no GPU is: its one line and exit 0, what it would do on a GPU machine
(its commands, with the NVIDIA driver and a CUDA torch faked, since neither can exist here), and
its check runner run for real with the CPU standing in for the GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def gpu_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_runs_nothing(tmp_path):
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-s", "gpu-check"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "GPU_CHECK_VENV": str(venv), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu-check: no NVIDIA GPU on this machine (no driver, nvidia-smi lists none): nothing to check"]
    assert not venv.exists()


def fake_gpu_host(tmp_path: Path, torch_version: str | None) -> dict[str, str]:
    """An nvidia-smi that lists one H200, and (unless None) a `torch` module that says it is a CUDA
    build seeing one GPU: the driver and CUDA cannot exist on this machine, so they are faked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GPU_CHECK_VENV": str(tmp_path / "venv"), "GPU_CHECK_PYTHON": "python3"}
    if torch_version is not None:
        (tmp_path / "torch").mkdir()
        (tmp_path / "torch" / "__init__.py").write_text(
            f"__version__ = {torch_version!r}\nclass version:\n    cuda = '12.8'\n"
            "class cuda:\n    device_count = staticmethod(lambda: 1)\n")
        env["PYTHONPATH"] = str(tmp_path)
    return env


def test_on_a_gpu_machine_it_installs_around_the_system_torch_from_the_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = fake_gpu_host(tmp_path, "2.11.0+cu128")
    proc = gpu_check("--dry-run", "--wheels", str(wheels), env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "using the system's torch 2.11.0+cu128 (CUDA 12.8)" in out
    assert "constraint: torch==2.11.0+cu128" in out   # dependencies resolve around it, never replace it
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert commands[0] == f"python3 -m venv --system-site-packages {tmp_path / 'venv'}"
    installs = [c for c in commands if " -m pip install " in c]
    assert installs and all(f"--no-index --find-links {wheels}" in c for c in installs)
    requirements = next(c for c in installs if " -r " in c)
    assert requirements.startswith("env DS_BUILD_OPS=0 ") and "--no-build-isolation" in requirements
    assert not any(" torch" in c.split(" -c ")[1].split(" ", 1)[1] for c in installs)  # torch is never installed
    assert any(c.endswith(f"--no-deps --no-build-isolation -e {ROOT}") for c in installs)
    assert commands[-1].endswith("-m benchmarks.gpu_check") and "DSCLUSTER_GPU_TESTS=1" in commands[-1]
    assert not (tmp_path / "venv").exists()


def test_without_a_cuda_torch_it_needs_one(tmp_path):
    env = fake_gpu_host(tmp_path, None)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = gpu_check("--dry-run", "--wheels", str(wheels), env=env)
    assert proc.returncode == 1
    assert "python3 has no torch" in proc.stderr and "holds no torch wheel" in proc.stderr
    online = gpu_check("--dry-run", env=env)   # with network: the pinned torch, which PyPI serves with CUDA
    assert online.returncode == 0, online.stderr
    assert any("--ignore-installed torch==" in line for line in online.stdout.splitlines())


def test_the_check_runner_with_the_cpu_standing_in_for_the_gpus(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out),
                           "--timed-runs", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["device"] == "cpu" and result["pytest"] is None
    checks = {c["name"]: c for c in result["checks"]}
    for name in ("float32 greedy = cpu", "tp=2 float32 greedy = cpu", "pp=2 float32 greedy = cpu",
                 "cpu float32: seeded sampling",
                 "cpu import spec: /v1/predict", "cpu bfloat16: greedy streams"):
        assert checks[name]["ok"], checks[name]
    assert checks["cpu import spec: /v1/predict"]["max_abs_error"] < 1e-4
    # Reported, not judged here: tests/test_bfloat16.py and test_gpu.py hold bfloat16 to float32.
    assert isinstance(result["bfloat16_greedy_agreement"], float)
    assert {t["server"] for t in result["timings"]} == {
        "cpu float32 (reference)", "cpu float32", "cpu bfloat16", "2 cpu ranks tp float32", "2 cpu ranks pp float32"}
    assert all(t["tpot_ms"] > 0 and t["ttft_ms"] > 0 and t["runs"] == 1 for t in result["timings"])
    assert "| check | result | detail |" in proc.stdout and "per output token (ms)" in proc.stdout

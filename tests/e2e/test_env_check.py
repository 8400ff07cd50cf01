"""`dscluster env --check`: every rank joins a real gloo group and all-reduces (rank + 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dscluster.cluster.launch import free_port

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "DSCLUSTER_LAUNCHER")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


def reports(stdout: str) -> list[dict]:
    found = []
    for line in stdout.splitlines():
        start = line.find("{")
        if start != -1:
            found.append(json.loads(line[start:]))
    return sorted(found, key=lambda r: r["rank"])


def test_env_check_under_local_launcher():
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--",
                           sys.executable, "-m", "dscluster", "env", "--check"],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = reports(proc.stdout)
    assert [r["rank"] for r in got] == [0, 1]
    assert all(r["all_reduce"] == 3 and r["backend"] == "gloo" and r["launcher"] == "local" for r in got)


def test_env_check_single_process():
    proc = subprocess.run([sys.executable, "-m", "dscluster", "env", "--check"], capture_output=True, text=True,
                          timeout=60, env={**clean_env(), "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = reports(proc.stdout)
    assert report["world_size"] == 1 and report["all_reduce"] == 1 and report["launcher"] == "none"

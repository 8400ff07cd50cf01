"""`dscluster doctor`: each check passing and failing, through the real CLI with a controlled
environment and real sockets, interfaces and files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from dscluster.cluster.launch import free_port
from dscluster.doctor import interface_matches

LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_", "SLURM_", "PET_", "LWS_",
                     "TORCHELASTIC", "CROSS_", "DSCLUSTER_", "NCCL_", "GLOO_")


def doctor(*args: str, **env: str) -> tuple[int, dict]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    proc = subprocess.run([sys.executable, "-m", "dscluster", "doctor", "--json", "--timeout", "1", *args],
                          capture_output=True, text=True, timeout=60, env={**base, **env})
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report["ok"] else 1), proc.stderr
    return proc.returncode, {c["name"]: c for c in report["checks"]}


def test_single_process_passes(tiny):
    code, checks = doctor("--model", tiny)
    assert code == 0
    assert checks["rendezvous"]["status"] == "PASS" and "launcher none" in checks["rendezvous"]["message"]
    assert checks["model"]["status"] == "PASS" and checks["shm"]["status"] in ("PASS", "WARN")


def test_unresolvable_master_fails():
    code, checks = doctor(RANK="1", WORLD_SIZE="2", MASTER_ADDR="no-such-host.invalid", MASTER_PORT="29511")
    assert code == 1 and checks["master"]["status"] == "FAIL"
    assert "no-such-host.invalid does not resolve" in checks["master"]["message"] and checks["master"]["fix"]


def test_reachable_master_passes_and_closed_port_warns():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code, checks = doctor(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert code == 0 and checks["master"]["status"] == "PASS" and "accepts connections" in checks["master"]["message"]
    code, checks = doctor(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert code == 0 and checks["master"]["status"] == "WARN" and "not listening yet" in checks["master"]["message"]


def test_rank0_with_master_port_taken_fails():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, checks = doctor(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert code == 1 and checks["master"]["status"] == "FAIL" and f"MASTER_PORT {port}" in checks["master"]["message"]
    code, checks = doctor(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert checks["master"]["status"] == "PASS"


def test_bad_rendezvous_fails_naming_the_variable():
    code, checks = doctor(OMPI_COMM_WORLD_RANK="0")
    assert code == 1 and checks["rendezvous"]["status"] == "FAIL"
    assert "OMPI_COMM_WORLD_SIZE" in checks["rendezvous"]["message"]


def test_interfaces():
    code, checks = doctor(NCCL_SOCKET_IFNAME="nope0", GLOO_SOCKET_IFNAME="lo")
    assert code == 1 and checks["NCCL_SOCKET_IFNAME"]["status"] == "FAIL"
    assert "nope0" in checks["NCCL_SOCKET_IFNAME"]["message"] and "lo" in checks["NCCL_SOCKET_IFNAME"]["message"]
    assert checks["GLOO_SOCKET_IFNAME"]["status"] == "PASS"
    code, checks = doctor(NCCL_SOCKET_IFNAME="^lo", GLOO_SOCKET_IFNAME="nope1")
    assert checks["GLOO_SOCKET_IFNAME"]["status"] == "FAIL"


def test_nccl_interface_syntax():
    names = ["lo", "eth0", "eth1", "ib0"]
    assert interface_matches("eth", names, True)[0] == ["eth0", "eth1"]
    assert interface_matches("=eth", names, True)[1] is not None
    assert interface_matches("^lo,ib", names, True)[0] == ["eth0", "eth1"]
    assert interface_matches("eth", names, False)[1] is not None  # gloo takes exact names


@pytest.mark.parametrize("damage, message", [
    ("config.json", "config.json is missing"),
    ("model.safetensors", "no weight files"),
    ("dir", "does not exist"),
])
def test_incomplete_model_fails(tiny, tmp_path, damage, message):
    copy = tmp_path / "model"
    shutil.copytree(tiny, copy)
    if damage == "dir":
        shutil.rmtree(copy)
    else:
        (copy / damage).unlink()
    code, checks = doctor("--model", str(copy))
    assert code == 1 and checks["model"]["status"] == "FAIL" and message in checks["model"]["message"]


def test_missing_shard_named_by_the_index(tiny, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny, copy)
    (copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    code, checks = doctor("--model", str(copy))
    assert code == 1 and "model-00002-of-00002.safetensors" in checks["model"]["message"]


def test_missing_tokenizer_warns(tiny, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny, copy)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    code, checks = doctor("--model", str(copy))
    assert code == 0 and checks["tokenizer"]["status"] == "WARN"


def test_human_output_lists_fixes():
    proc = subprocess.run([sys.executable, "-m", "dscluster", "doctor"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NCCL_SOCKET_IFNAME": "nope0"})
    assert proc.returncode == 1
    assert "FAIL  NCCL_SOCKET_IFNAME" in proc.stdout and "fix: set NCCL_SOCKET_IFNAME" in proc.stdout

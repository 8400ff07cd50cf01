"""`dscluster doctor`: each check passing and failing, through the real CLI with a controlled
environment and real sockets, interfaces and files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dscluster.cluster.launch import free_port
from dscluster.cluster.rendezvous import discover
from dscluster.doctor import check_disk, check_gpus, check_shm, interface_matches

from cli_in_process import run_dscluster  # tests/cli_in_process.py

LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_", "SLURM_", "PET_", "LWS_",
                     "TORCHELASTIC", "CROSS_", "DSCLUSTER_", "NCCL_", "GLOO_")


def clean_env() -> dict[str, str]:
    """This process's environment without any launcher, rendezvous or NCCL/gloo variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}


def doctor(*args: str, in_a_process: bool = False, **env: str) -> tuple[int, dict]:
    """`dscluster doctor --json ARGS` with exactly this environment: in this process (the same parser and
    handler), or with in_a_process through `python -m dscluster`, the entry point itself."""
    argv = ["doctor", "--json", "--timeout", "1", *args]
    if in_a_process:
        proc = subprocess.run([sys.executable, "-m", "dscluster", *argv], capture_output=True, text=True, timeout=60,
                              env={**clean_env(), **env})
    else:
        proc = run_dscluster(*argv, env={**clean_env(), **env})
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
    assert interface_matches("=eth0,ib0", names, True)[0] == ["eth0", "ib0"]  # = makes the whole list exact
    assert interface_matches("^=eth0", names, True)[0] == ["lo", "eth1", "ib0"]
    assert interface_matches("eth0,eth1", names, False)[0] == ["eth0", "eth1"]
    assert "gloo takes exact" in interface_matches("^lo", names, False)[1]


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
    proc = run_dscluster("doctor", env={**clean_env(), "NCCL_SOCKET_IFNAME": "nope0"})
    assert proc.returncode == 1
    assert "FAIL  NCCL_SOCKET_IFNAME" in proc.stdout and "fix: set NCCL_SOCKET_IFNAME" in proc.stdout


def test_interface_exact_and_excluded_forms_against_this_host():
    code, checks = doctor(NCCL_SOCKET_IFNAME="=lo", GLOO_SOCKET_IFNAME="lo")
    assert code == 0 and checks["NCCL_SOCKET_IFNAME"]["message"].endswith("selects lo")
    code, checks = doctor(GLOO_SOCKET_IFNAME="^lo")
    assert code == 1 and "gloo takes exact interface names" in checks["GLOO_SOCKET_IFNAME"]["message"]


def test_master_that_never_answers_fails_within_the_timeout():
    # A listener that never accepts, with its backlog of 0 already taken by one connection: the
    # kernel drops further SYNs, so the probe's connect times out as with a firewalled master.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        start = time.monotonic()
        code, checks = doctor(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        elapsed = time.monotonic() - start
    assert code == 1 and checks["master"]["status"] == "FAIL"
    assert checks["master"]["message"] == f"127.0.0.1:{port} did not answer within 1 s"
    assert 1 <= elapsed < 15


def test_rank0_master_addr_of_another_host_warns():
    code, checks = doctor(RANK="0", WORLD_SIZE="2", MASTER_ADDR="192.0.2.1", MASTER_PORT=str(free_port()))
    assert code == 0 and checks["master"]["status"] == "WARN"
    assert "not an address of this host" in checks["master"]["message"] and "headless" in checks["master"]["fix"]


def test_no_gpu_warns_and_fails_when_required():
    # No GPU visible (CUDA_VISIBLE_DEVICES empty hides any this host has): both outcomes are real.
    # New processes, as CUDA reads the variable once per process (and `python -m dscluster` is tested here).
    code, checks = doctor(CUDA_VISIBLE_DEVICES="", in_a_process=True)
    assert code == 0 and checks["gpus"]["status"] == "WARN" and "no GPU: gloo backend" in checks["gpus"]["message"]
    code, checks = doctor("--require-gpu", CUDA_VISIBLE_DEVICES="", in_a_process=True)
    assert code == 1 and checks["gpus"]["status"] == "FAIL" and "a GPU is required" in checks["gpus"]["message"]


def test_gpus_this_host_has_are_counted():
    """Whatever this host has: none (a warning), or its GPUs for the one local rank (a pass)."""
    from dscluster.doctor import gpu_count

    count = gpu_count()
    code, checks = doctor("--require-gpu")
    if count == 0:
        assert code == 1 and checks["gpus"]["status"] == "FAIL"
    else:
        assert checks["gpus"]["status"] == "PASS" and checks["gpus"]["message"] == f"{count} GPU(s) visible for 1 local rank(s)"


def test_gpu_count_against_local_ranks():
    # GPUs cannot exist on this machine: the device count is passed in instead of read from torch.
    rdzv = discover({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert rdzv.local_world_size == 4
    short = check_gpus(rdzv, count=2)
    assert short.status == "FAIL" and short.message == "4 local ranks but 2 GPU(s) visible"
    assert check_gpus(rdzv, count=8).status == "PASS"
    assert check_gpus(rdzv, require_gpu=True, count=0).status == "FAIL"


def test_shm_size(tmp_path):
    assert check_shm().status == "PASS" or os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize < 2**30
    size = os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    small = check_shm(str(tmp_path), minimum=size + 1)  # a real filesystem, held to a bar above its size
    assert small.status == "WARN" and "NCCL and DeepSpeed need more" in small.message and "emptyDir" in small.fix
    missing = check_shm(str(tmp_path / "absent"))
    assert missing.status == "WARN" and "is missing" in missing.message


def test_free_disk(tmp_path):
    assert check_disk(str(tmp_path)).status == "PASS"
    free = shutil.disk_usage(tmp_path).free
    low = check_disk(str(tmp_path), minimum=free * 4)
    assert low.status == "WARN" and "MiB free" in low.message and low.fix


def test_bad_timeout_is_a_usage_error():
    proc = run_dscluster("doctor", "--timeout", "0")
    assert proc.returncode == 2 and "--timeout" in proc.stderr


def lws_env(index: int, size: int = 2) -> dict[str, str]:
    return {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(index),
            "MASTER_PORT": str(free_port())}


def wait_exec_named(pid: int, argv0: bytes, timeout: float = 10.0) -> None:
    """Until `bash -c "exec -a NAME ..."` has become NAME: its command line starts with NAME and its
    environment is there. bash's own command line holds NAME too, inside the -c string, and for an
    instant during exec the new command line is readable while the environment is still empty."""
    deadline = time.monotonic() + timeout
    while not (Path(f"/proc/{pid}/cmdline").read_bytes().startswith(argv0)
               and b"LWS_WORKER_INDEX=" in Path(f"/proc/{pid}/environ").read_bytes()):
        assert time.monotonic() < deadline, f"{argv0!r} never started"
        time.sleep(0.01)


def test_lws_worker_without_nproc_counts_the_ranks_of_the_server_in_the_pod():
    """An LWS worker pod of a 2-pod group whose server runs 8 ranks per pod: rank 8 of 16, not 1 of 2.
    The pod's `dscluster serve --nproc 8` is a real process here, with the pod's LWS variables (its
    command line and environment are what doctor reads; servers of other groups on this host are not
    this pod's: another group's worker 1, with the same LWS variables but its own MASTER_PORT, is
    started first, so that a scan in process order meets it before this pod's)."""
    env = lws_env(1)
    another_group = subprocess.Popen(["bash", "-c", "exec -a 'dscluster serve /m --nproc 5' sleep 60"],
                                     env={**clean_env(), **lws_env(1)})
    server = subprocess.Popen(["bash", "-c", "exec -a 'dscluster serve /mnt/checkpoints/model --nproc 8' sleep 60"],
                              env={**clean_env(), **env})
    other = subprocess.Popen(["bash", "-c", "exec -a 'dscluster serve /m --nproc 3' sleep 60"],
                             env={**clean_env(), **lws_env(0)})  # the leader's: another member of the group
    try:
        for proc in (another_group, server, other):
            wait_exec_named(proc.pid, b"dscluster serve")
        code, checks = doctor(**env)
        message = checks["rendezvous"]["message"]
        assert message.startswith("rank 8 of 16 (local 0 of 8)"), message
        assert "--nproc 8, from the dscluster serve running in this pod" in message
        _, checks = doctor("--nproc", "4", **lws_env(1))  # an explicit --nproc wins
        assert checks["rendezvous"]["message"].startswith("rank 4 of 8")
    finally:
        for proc in (another_group, server, other):
            proc.kill()
            proc.wait()


def test_lws_without_a_server_or_gpus_says_what_it_assumed():
    _, checks = doctor(**lws_env(1))
    assert "one rank per pod; pass --nproc" in checks["rendezvous"]["message"]


def test_attention_heads_must_divide_by_the_group(tiny):
    """The tiny model has 2 attention heads: a group of 2 pods x 3 ranks cannot split them; 2 x 1 can."""
    code, checks = doctor("--model", tiny, "--nproc", "3", **lws_env(1))
    assert code == 1 and checks["heads"]["status"] == "FAIL"
    assert "2 attention heads do not divide by the group's 6 ranks" in checks["heads"]["message"]
    assert "--engine zero3" in checks["heads"]["fix"]
    code, checks = doctor("--model", tiny, "--nproc", "1", **lws_env(1))
    assert checks["heads"]["status"] == "PASS" and "1 per rank over 2 ranks" in checks["heads"]["message"]
    _, checks = doctor("--model", tiny)  # one process: nothing to split
    assert "heads" not in checks

"""The GPU paths, which this machine (no GPU) cannot run: backend choice, one device per rank,
CUDA_VISIBLE_DEVICES per local rank. CUDA and the process group are mocked here, and only here,
because no GPU exists; everything else is the real code."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from dscluster.cluster import group
from dscluster.cluster import launch as launch_mod
from dscluster.cluster.launch import rank_env, visible_gpus
from dscluster.cluster.rendezvous import Rendezvous, RendezvousError, discover
from dscluster.errors import UsageError


def test_auto_backend_is_nccl_with_cuda_and_gloo_without():
    assert group.resolve_backend("auto", cuda_available=True) == "nccl"
    assert group.resolve_backend("auto", cuda_available=False) == "gloo"
    assert group.resolve_backend("gloo", cuda_available=True) == "gloo"
    with pytest.raises(UsageError, match="--backend nccl needs CUDA"):
        group.resolve_backend("nccl", cuda_available=False)


@pytest.mark.parametrize("local_rank, visible, device", [(0, 1, 0), (3, 1, 0), (3, 8, 3), (0, 8, 0)])
def test_cuda_device_per_rank(local_rank, visible, device):
    assert group.cuda_device_index(local_rank, visible) == device


def test_cuda_device_errors():
    with pytest.raises(UsageError, match="no CUDA device"):
        group.cuda_device_index(0, 0)
    with pytest.raises(UsageError, match="local rank 4 has no GPU"):
        group.cuda_device_index(4, 2)


def test_nccl_group_pins_the_rank_to_its_gpu():
    rdzv = Rendezvous(rank=5, local_rank=1, world_size=8, local_world_size=4, master_addr="m", master_port=29500,
                      launcher="torchrun")
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
         mock.patch.object(torch.cuda, "device_count", return_value=4), \
         mock.patch.object(torch.cuda, "set_device") as set_device, \
         mock.patch.dict(os.environ), \
         mock.patch.object(group, "join_store") as join_store, \
         mock.patch.object(group.dist, "is_initialized", return_value=False), \
         mock.patch.object(group.dist, "init_process_group") as init, \
         mock.patch.object(group.dist, "new_group", return_value="control") as new_group:
        groups = group.init_groups(rdzv, "auto", timeout_s=60, control_timeout_s=10)
    assert groups.backend == "nccl" and groups.device == torch.device("cuda", 1)
    set_device.assert_called_once_with(torch.device("cuda", 1))
    assert init.call_args.kwargs["backend"] == "nccl" and init.call_args.kwargs["store"] is join_store.return_value
    # The control group is gloo even on GPUs: an idle NCCL collective would trip NCCL's watchdog.
    assert new_group.call_args.kwargs["backend"] == "gloo" and groups.control == "control"


def test_visible_gpus():
    assert visible_gpus({}, 4) == ["0", "1", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}, 8) == ["2", "5"]
    assert visible_gpus({}, 0) == []


def test_each_local_rank_sees_its_own_gpu():
    node = Rendezvous(rank=4, local_rank=0, world_size=8, local_world_size=4, master_addr="m", master_port=1,
                      launcher="lws", node_rank=1, spawn_local=4)
    envs = [rank_env({}, node, i, ["0", "1", "2", "3"]) for i in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["RANK"] for e in envs] == ["4", "5", "6", "7"] and {e["LOCAL_SIZE"] for e in envs} == {"4"}
    # Fewer GPUs than ranks: every rank sees all of them (and picks by local rank).
    assert rank_env({}, node, 2, ["0", "1"])["CUDA_VISIBLE_DEVICES"] == "0,1"
    # No GPU: nothing is set, and threads are split between the local ranks.
    cpu = rank_env({}, node, 0, [])
    assert "CUDA_VISIBLE_DEVICES" not in cpu and int(cpu["OMP_NUM_THREADS"]) >= 1
    assert rank_env({"OMP_NUM_THREADS": "3"}, node, 0, [])["OMP_NUM_THREADS"] == "3"


# CUDA is mocked below only because this machine has no GPU.
def _cuda(count: int):
    return (mock.patch.object(torch.cuda, "is_available", return_value=count > 0),
            mock.patch.object(torch.cuda, "device_count", return_value=count))


def test_auto_backend_asks_torch_when_not_told():
    avail, count = _cuda(2)
    with avail, count:
        assert group.resolve_backend("auto") == "nccl"
        assert group.resolve_backend("nccl") == "nccl"
    avail, count = _cuda(0)
    with avail, count:
        assert group.resolve_backend("auto") == "gloo"
        with pytest.raises(UsageError, match="--backend nccl"):
            group.resolve_backend("nccl")
    with pytest.raises(UsageError, match="'mpi'"):
        group.resolve_backend("mpi", cuda_available=True)


def test_nccl_with_one_pinned_gpu_uses_cuda_0():
    """The local launcher pins CUDA_VISIBLE_DEVICES to one GPU per rank: local rank 3 sees one device."""
    rdzv = Rendezvous(rank=3, local_rank=3, world_size=4, local_world_size=4, master_addr="m", master_port=29500,
                      launcher="local")
    avail, count = _cuda(1)
    # No GPU and no peers here: the device switch and the process group are mocked, nothing else.
    with avail, count, mock.patch.object(torch.cuda, "set_device") as set_device, mock.patch.dict(os.environ), \
         mock.patch.object(group, "join_store"), \
         mock.patch.object(group.dist, "is_initialized", return_value=False), \
         mock.patch.object(group.dist, "init_process_group") as init, \
         mock.patch.object(group.dist, "new_group", return_value="control"):
        groups = group.init_groups(rdzv, "nccl", timeout_s=30)
        assert os.environ["LOCAL_SIZE"] == "4" and os.environ["RANK"] == "3"
    set_device.assert_called_once_with(torch.device("cuda", 0))
    assert groups.device == torch.device("cuda", 0)
    assert init.call_args.kwargs["rank"] == 3 and init.call_args.kwargs["world_size"] == 4


def test_nccl_rank_without_a_gpu_of_its_own_is_a_usage_error():
    rdzv = Rendezvous(rank=2, local_rank=2, world_size=4, local_world_size=4, master_addr="m", master_port=1,
                      launcher="torchrun")
    avail, count = _cuda(2)
    with avail, count, mock.patch.object(torch.cuda, "set_device") as set_device, mock.patch.dict(os.environ), \
         mock.patch.object(group.dist, "init_process_group") as init:
        with pytest.raises(UsageError, match="local rank 2 has no GPU: only 2 visible"):
            group.init_groups(rdzv, "nccl")
    set_device.assert_not_called()
    init.assert_not_called()


def test_nccl_without_cuda_fails_before_joining_any_group():
    rdzv = Rendezvous(0, 0, 1, 1, "127.0.0.1", 29500, "none")
    with mock.patch.dict(os.environ), mock.patch.object(group.dist, "init_process_group") as init:
        with pytest.raises(UsageError, match="--backend nccl needs CUDA"):
            group.init_groups(rdzv, "nccl")
    init.assert_not_called()


def test_env_check_with_nccl_on_this_gpu_less_machine_exits_2():
    """Real, nothing mocked: this machine has no GPU, so --backend nccl is refused in one line."""
    prefixes = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_LOCAL", "SLURM_", "PET_", "LWS_",
                "TORCHELASTIC", "CROSS_", "DSCLUSTER_", "GROUP_RANK", "PRTE_", "PMIX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}  # no outer launcher leaks in
    proc = subprocess.run([sys.executable, "-m", "dscluster", "env", "--check", "--backend", "nccl"],
                          capture_output=True, text=True, timeout=120, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "--backend nccl" in line


@pytest.mark.parametrize("value, gpus, expected", [("gpu", 4, 4), ("auto", 2, 2), ("auto", 0, 1), ("3", 8, 3)])
def test_trainer_nproc_per_node_counts_gpus(value, gpus, expected):
    env = dict(PET_NNODES="2", PET_NODE_RANK="1", PET_NPROC_PER_NODE=value, PET_MASTER_ADDR="m",
               PET_MASTER_PORT="29400")
    avail, count = _cuda(gpus)
    with avail, count:
        rdzv = discover(env)
    assert (rdzv.rank, rdzv.world_size, rdzv.local_world_size, rdzv.spawn_local) == (
        expected, 2 * expected, expected, expected)


def test_trainer_nproc_gpu_without_gpus_names_the_variable():
    avail, count = _cuda(0)
    with avail, count, pytest.raises(RendezvousError, match="PET_NPROC_PER_NODE=gpu"):
        discover(dict(PET_NNODES="2", PET_NODE_RANK="0", PET_NPROC_PER_NODE="gpu", PET_MASTER_ADDR="m"))


def test_the_launcher_hands_each_local_rank_one_of_the_visible_gpus():
    """What `dscluster launch` computes per rank, with CUDA's device count mocked (no GPU here)."""
    node = Rendezvous(0, 0, 2, 2, "127.0.0.1", 29500, "local", spawn_local=2)
    avail, count = _cuda(4)
    with avail, count:
        gpus = launch_mod._gpus({"CUDA_VISIBLE_DEVICES": "1,3"})
        assert launch_mod._gpus({}) == ["0", "1", "2", "3"]
    assert gpus == ["1", "3"]
    envs = [rank_env({"CUDA_VISIBLE_DEVICES": "1,3"}, node, i, gpus) for i in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"] and {e["DSCLUSTER_LAUNCHER"] for e in envs} == {"local"}
    avail, count = _cuda(0)
    with avail, count:
        assert launch_mod._gpus({"CUDA_VISIBLE_DEVICES": "0"}) == []

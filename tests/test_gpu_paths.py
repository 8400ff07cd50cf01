"""The GPU paths, which this machine (no GPU) cannot run: backend choice, one device per rank,
CUDA_VISIBLE_DEVICES per local rank. CUDA and the process group are mocked here, and only here,
because no GPU exists; everything else is the real code."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from dscluster.cluster import group
from dscluster.cluster.launch import rank_env, visible_gpus
from dscluster.cluster.rendezvous import Rendezvous
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

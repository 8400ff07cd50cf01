"""The GPU paths, which this machine (no GPU) cannot run: backend choice, one device per rank,
CUDA_VISIBLE_DEVICES per local rank, the device every engine loads onto at every world size, two
ranks on one GPU. CUDA (and where needed the process group) is mocked here, and only here,
because no GPU exists; everything else is the real code, stores included. tests/test_gpu.py runs
the same paths for real where a GPU is visible."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from dscluster.cluster import gpus as gpus_mod
from dscluster.cluster import group
from dscluster.cluster import launch as launch_mod
from dscluster.cluster.launch import free_port, rank_env, visible_gpus
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


def _gpu_properties(device):
    """What torch.cuda.get_device_properties says of a GPU: each index a different physical GPU."""
    index = torch.device(device).index or 0
    return SimpleNamespace(name="NVIDIA H200", uuid=f"GPU-0000000{index}")


def _store_with_peers(world_size: int, rank: int, held: dict[int, str] | None = None) -> dist.HashStore:
    """A real in-process store in which every other rank already said which GPU it holds (by
    default each its own), as peers do before NCCL is joined."""
    store = dist.HashStore()
    for r in range(world_size):
        if r != rank:
            where = (held or {}).get(r, f"{socket.gethostname()}\tNVIDIA H200 GPU-peer-{r}")
            store.set(f"{group.store_prefix()}/gpu/{r}", where)
            store.add(f"{group.store_prefix()}/gpu/read", 1)
    return store


def test_nccl_group_pins_the_rank_to_its_gpu_before_any_collective():
    rdzv = Rendezvous(rank=5, local_rank=1, world_size=8, local_world_size=4, master_addr="m", master_port=29500,
                      launcher="torchrun")
    order = mock.Mock()
    store = _store_with_peers(8, 5)
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
         mock.patch.object(torch.cuda, "device_count", return_value=4), \
         mock.patch.object(torch.cuda, "get_device_properties", side_effect=_gpu_properties), \
         mock.patch.object(torch.cuda, "set_device", side_effect=lambda d: order.set_device(d)) as set_device, \
         mock.patch.dict(os.environ), \
         mock.patch.object(group, "join_store", return_value=store), \
         mock.patch.object(group.dist, "is_initialized", return_value=False), \
         mock.patch.object(group.dist, "init_process_group", side_effect=lambda **kw: order.init(**kw)):
        groups = group.init_groups(rdzv, "auto", timeout_s=60)
    assert groups.backend == "nccl" and groups.device == torch.device("cuda", 1)
    set_device.assert_called_once_with(torch.device("cuda", 1))
    # The device is set first; NCCL is joined bound to it (device_id: its communicator is made on
    # this GPU at once, not at the first collective), after the one-GPU-per-rank check.
    assert [c[0] for c in order.mock_calls] == ["set_device", "init"]
    init = order.mock_calls[1].kwargs
    assert init["backend"] == "nccl" and init["store"] is store and init["device_id"] == torch.device("cuda", 1)
    assert store.get(f"{group.store_prefix()}/gpu/5").decode().endswith("NVIDIA H200 GPU-00000001")
    # The store stays with the groups: the control channel's sockets find rank 0 through it.
    assert groups.store is store


def test_gloo_group_joins_without_a_device_or_gpu_check():
    rdzv = Rendezvous(rank=0, local_rank=0, world_size=2, local_world_size=2, master_addr="m", master_port=1,
                      launcher="torchrun")
    avail, count = _cuda(2)
    with avail, count, mock.patch.object(torch.cuda, "set_device") as set_device, mock.patch.dict(os.environ), \
         mock.patch.object(group, "join_store", return_value=dist.HashStore()), \
         mock.patch.object(group.dist, "is_initialized", return_value=False), \
         mock.patch.object(group.dist, "init_process_group") as init:
        groups = group.init_groups(rdzv, "gloo", timeout_s=30)
    assert groups.device == torch.device("cpu") and "device_id" not in init.call_args.kwargs
    set_device.assert_not_called()


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
    # Each rank's only visible GPU is another physical one (the launcher pinned them).
    held = {r: f"{socket.gethostname()}\tNVIDIA H200 GPU-pinned-{r}" for r in range(4)}
    with avail, count, mock.patch.object(torch.cuda, "set_device") as set_device, mock.patch.dict(os.environ), \
         mock.patch.object(torch.cuda, "get_device_properties",
                           return_value=SimpleNamespace(name="NVIDIA H200", uuid="GPU-pinned-3")), \
         mock.patch.object(group, "join_store", return_value=_store_with_peers(4, 3, held)), \
         mock.patch.object(group.dist, "is_initialized", return_value=False), \
         mock.patch.object(group.dist, "init_process_group") as init:
        groups = group.init_groups(rdzv, "nccl", timeout_s=30)
        assert os.environ["LOCAL_SIZE"] == "4" and os.environ["RANK"] == "3"
    set_device.assert_called_once_with(torch.device("cuda", 0))
    assert groups.device == torch.device("cuda", 0)
    assert init.call_args.kwargs["rank"] == 3 and init.call_args.kwargs["world_size"] == 4
    assert init.call_args.kwargs["device_id"] == torch.device("cuda", 0)


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
    with avail, count, mock.patch.object(gpus_mod, "driver_present", return_value=True):
        gpus = launch_mod._gpus({"CUDA_VISIBLE_DEVICES": "1,3"})
        assert launch_mod._gpus({}) == ["0", "1", "2", "3"]
    assert gpus == ["1", "3"]
    envs = [rank_env({"CUDA_VISIBLE_DEVICES": "1,3"}, node, i, gpus) for i in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"] and {e["DSCLUSTER_LAUNCHER"] for e in envs} == {"local"}
    avail, count = _cuda(0)
    with avail, count, mock.patch.object(gpus_mod, "driver_present", return_value=True):
        assert launch_mod._gpus({"CUDA_VISIBLE_DEVICES": "0"}) == []


@pytest.mark.skipif(gpus_mod.driver_present(), reason="this host has a GPU driver: the launcher asks torch")
def test_the_node_agent_does_not_import_torch_where_no_gpu_driver_is(tiny):
    """`serve --nproc 2` only checks the model and supervises the ranks: importing torch there
    would cost every start about a second of CPU. Its ranks are stubbed out (`true`)."""
    script = ("import sys\n"
              "from dscluster import runner\n"
              "real = runner.launch\n"
              "runner.launch = lambda cmd, **kw: real(['true'], **kw)\n"
              "from dscluster.cli import run_command\n"
              f"code = run_command(['serve', {tiny!r}, '--nproc', '2', '--port', '{free_port()}'])\n"
              "print(code, sorted(m for m in ('torch', 'deepspeed', 'transformers', 'fastapi') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "0 []", proc.stdout + proc.stderr[-3000:]


# -- the device of a lone rank, and of every engine at every world size ------------------------
# CUDA is mocked below because no GPU exists here.


@pytest.mark.parametrize("backend, visible, expected", [
    ("auto", 1, "cuda:0"), ("auto", 8, "cuda:0"), ("nccl", 2, "cuda:0"), ("gloo", 2, "cpu"), ("auto", 0, "cpu")])
def test_a_lone_rank_runs_on_the_first_gpu_unless_told_gloo(backend, visible, expected):
    avail, count = _cuda(visible)
    with avail, count, mock.patch.object(torch.cuda, "set_device") as set_device:
        device = group.single_rank_device(backend)
    assert device == torch.device(expected)
    assert set_device.call_count == (1 if device.type == "cuda" else 0)


class _Loaded(Exception):
    """Stops build_runtime where the weights would be read: the device is what is checked."""


def _device_chosen(model: str, engine: str, world_size: int, local_rank: int, visible: int, backend: str = "auto"):
    """build_runtime up to load_split on a rank of `world_size` with `visible` GPUs (mocked), the
    rest real: the device it loads onto, the dtype --dtype auto gave, and DeepSpeed's accelerator.
    With several ranks the process group is mocked too, its device chosen by the real rank_device."""
    from deepspeed.accelerator import real_accelerator

    from dscluster.engine import runtime as rt

    rdzv = Rendezvous(rank=local_rank, local_rank=local_rank, world_size=world_size, local_world_size=world_size,
                      master_addr="127.0.0.1", master_port=1, launcher="torchrun")
    seen = {}

    def fake_groups(rdzv, backend, **kwargs):
        resolved = group.resolve_backend(backend)
        return group.Groups(rdzv, resolved, None, group.rank_device(resolved, rdzv.local_rank))

    def fake_load(prepared, device, *args, **kwargs):
        seen.update(device=device, dtype=prepared.source.dtype, engine=prepared.engine,
                    accelerator=os.environ.get("DS_ACCELERATOR"))
        raise _Loaded

    avail, count = _cuda(visible)
    with avail, count, mock.patch.object(torch.cuda, "set_device"), mock.patch.dict(os.environ), \
         mock.patch.object(real_accelerator, "ds_accelerator", None), \
         mock.patch.object(rt, "init_groups", side_effect=fake_groups), \
         mock.patch("dscluster.engine.liveness.LivenessMonitor"), \
         mock.patch.object(rt, "load_split", side_effect=fake_load), \
         mock.patch.object(torch, "set_num_threads"):
        with pytest.raises(_Loaded):
            rt.build_runtime(rt.RuntimeOptions(model=model, engine=engine, backend=backend), rdzv)
    return seen


@pytest.mark.parametrize("engine", ["tp", "zero3", "replicated"])
@pytest.mark.parametrize("world_size, local_rank, visible, expected", [
    (1, 0, 1, 0), (1, 0, 4, 0),          # one rank: the first GPU
    (2, 1, 2, 1), (4, 3, 4, 3),          # a GPU per local rank, all visible: cuda:LOCAL_RANK
    (2, 1, 1, 0), (4, 3, 1, 0),          # the launcher pinned one GPU per rank: cuda:0
])
def test_every_engine_loads_onto_the_ranks_gpu(gqa, engine, world_size, local_rank, visible, expected):
    seen = _device_chosen(gqa, engine, world_size, local_rank, visible)
    assert seen["device"] == torch.device("cuda", expected)
    assert seen["engine"] == (engine if world_size > 1 else "replicated")
    # DeepSpeed allocates AutoTP's shards and ZeRO-3's partitions on its accelerator; a lone rank never uses it
    assert seen["accelerator"] == ("cuda" if world_size > 1 else None)
    assert seen["dtype"] == torch.float32     # --dtype auto: the checkpoint's dtype on a GPU (float32 here)


@pytest.mark.parametrize("world_size", [1, 2])
def test_gloo_on_a_gpu_host_keeps_the_model_and_deepspeed_on_the_cpu(gqa, tmp_path, world_size):
    bf16 = tmp_path / "bf16"
    shutil.copytree(gqa, bf16)
    config = json.loads((bf16 / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    on_gpu = _device_chosen(str(bf16), "tp", world_size, 0, 2)
    assert on_gpu["device"] == torch.device("cuda", 0) and on_gpu["dtype"] == torch.bfloat16
    on_cpu = _device_chosen(str(bf16), "tp", world_size, 0, 2, backend="gloo")
    # float32 on the CPU, where half-precision matmuls are slow; DeepSpeed on the CPU as well
    assert on_cpu == {"device": torch.device("cpu"), "dtype": torch.float32,
                      "accelerator": "cpu" if world_size > 1 else None,
                      "engine": "tp" if world_size > 1 else "replicated"}


def test_deepspeed_bound_to_another_accelerator_is_refused():
    from deepspeed.accelerator import real_accelerator

    from dscluster.engine.parallel import use_accelerator

    chosen = SimpleNamespace(device_name=lambda: "cpu")
    with mock.patch.dict(os.environ), mock.patch.object(real_accelerator, "ds_accelerator", chosen):
        use_accelerator(torch.device("cpu"))
        assert os.environ["DS_ACCELERATOR"] == "cpu"
        with pytest.raises(RuntimeError, match="DeepSpeed already chose the cpu accelerator"):
            use_accelerator(torch.device("cuda", 0))


# -- two ranks on one GPU ------------------------------------------------------------------------


def _check_ranks(world_size: int, gpu_of_rank: dict[int, int]) -> dict[int, BaseException | None]:
    """check_one_gpu_per_rank on every rank at once (a thread each) against one real store, with
    the ranks' GPU properties mocked (no GPU here): what each rank raised."""
    store = dist.HashStore()
    outcome: dict[int, BaseException | None] = {}

    def properties(device):
        return SimpleNamespace(name="NVIDIA H200", uuid=f"GPU-{torch.device(device).index}")

    def rank(r: int) -> None:
        rdzv = Rendezvous(rank=r, local_rank=r, world_size=world_size, local_world_size=world_size,
                          master_addr="m", master_port=1, launcher="local")
        try:
            group.check_one_gpu_per_rank(store, rdzv, torch.device("cuda", gpu_of_rank[r]), timeout_s=30)
            outcome[r] = None
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            outcome[r] = exc

    with mock.patch.object(torch.cuda, "get_device_properties", side_effect=properties):
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    return outcome


def test_two_ranks_on_one_gpu_stop_every_rank_with_one_line():
    outcome = _check_ranks(3, {0: 0, 1: 1, 2: 1})
    messages = {str(e) for e in outcome.values()}
    assert all(isinstance(e, UsageError) for e in outcome.values()) and len(messages) == 1
    (line,) = messages
    assert line.startswith("ranks 1 and 2 share one GPU (NVIDIA H200 GPU-1 on ") and "NCCL needs a GPU per rank" in line
    assert "--backend gloo" in line and "\n" not in line


def test_ranks_on_distinct_gpus_pass_the_check():
    assert _check_ranks(4, {0: 0, 1: 1, 2: 2, 3: 3}) == {0: None, 1: None, 2: None, 3: None}


def test_two_ranks_on_one_gpu_never_join_nccl():
    rdzv = Rendezvous(rank=1, local_rank=1, world_size=2, local_world_size=2, master_addr="m", master_port=1,
                      launcher="torchrun")
    store = dist.HashStore()
    store.set(f"{group.store_prefix()}/gpu/0", f"{socket.gethostname()}\tNVIDIA H200 GPU-only")
    avail, count = _cuda(1)
    with avail, count, mock.patch.object(torch.cuda, "set_device"), mock.patch.dict(os.environ), \
         mock.patch.object(torch.cuda, "get_device_properties",
                           return_value=SimpleNamespace(name="NVIDIA H200", uuid="GPU-only")), \
         mock.patch.object(group, "join_store", return_value=store), \
         mock.patch.object(group.dist, "is_initialized", return_value=False), \
         mock.patch.object(group.dist, "init_process_group") as init:
        with pytest.raises(UsageError, match="ranks 0 and 1 share one GPU"):
            group.init_groups(rdzv, "auto", timeout_s=30)
    init.assert_not_called()

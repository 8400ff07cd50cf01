"""Reading checkpoints slice by slice (engine/checkpoint.py). The files are written by the
safetensors library itself, and every slice is compared with the same slice taken by torch from
the tensor that was written: the reference is not our reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dscluster.engine.checkpoint import INDEX, SafetensorsCheckpoint, TensorRead
from dscluster.engine.host_memory import UNLIMITED, HostMemory, check_host_memory, host_memory
from dscluster.errors import UsageError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(37, 12, generator=g),
        "model.layer.q.weight": torch.randn(24, 12, generator=g),
        "model.layer.o.weight": torch.randn(12, 24, generator=g),
        "model.layer.o.bias": torch.randn(12, generator=g),
        "model.norm.weight": torch.randn(12, generator=g).to(torch.bfloat16),
        "model.conv.weight": torch.randn(6, 5, 4, generator=g),
        "model.scale": torch.tensor(3.5),
        "model.steps": torch.arange(10, dtype=torch.int64),
    }


def write_sharded(directory: Path, parts: list[list[str]]) -> dict[str, torch.Tensor]:
    """The tensors split over files as transformers names them, with the index json."""
    data = tensors()
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: data[k] for k in names}, str(directory / name))
        weight_map.update({k: name for k in names})
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return data


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    names = list(tensors())
    return tmp_path / "ckpt", write_sharded(tmp_path / "ckpt", [names[:3], names[3:6], names[6:]])


def test_headers_give_every_tensor_its_file_shape_and_dtype(sharded):
    directory, data = sharded
    ckpt = SafetensorsCheckpoint.open(directory)
    assert set(ckpt.tensors) == set(data) and len(ckpt.files) == 3
    for key, t in data.items():
        assert ckpt.tensors[key].shape == tuple(t.shape)
    assert ckpt.tensors["model.norm.weight"].dtype == "BF16"
    assert ckpt.tensors["model.layer.o.bias"].file.name == "model-00002-of-00003.safetensors"


@pytest.mark.parametrize("key, dim, start, length", [
    ("model.embed.weight", None, 0, 0),      # whole
    ("model.layer.q.weight", 0, 6, 12),      # rows (a column-parallel shard)
    ("model.layer.o.weight", 1, 12, 12),     # columns (a row-parallel shard)
    ("model.layer.o.weight", 1, 0, 5),
    ("model.conv.weight", 2, 1, 2),          # an inner dimension of a 3-d tensor
    ("model.conv.weight", 1, 3, 2),
    ("model.layer.o.bias", 0, 4, 8),
    ("model.scale", None, 0, 0),             # a scalar
])
def test_slices_equal_torch_slicing_of_what_was_written(sharded, key, dim, start, length, monkeypatch):
    directory, data = sharded
    monkeypatch.setattr("dscluster.engine.checkpoint.STAGING_BYTES", 64)  # many small blocks
    want = data[key] if dim is None else data[key].narrow(dim, start, length)
    for dtype in (data[key].dtype, torch.float64):  # as stored (straight into the tensor), and converted
        target = torch.full(want.shape, float("nan"), dtype=dtype)
        copied = SafetensorsCheckpoint.open(directory).read([TensorRead(key, target, dim, start, length)])
        assert torch.equal(target, want.to(dtype)), (key, dim, start, length, dtype)
        assert copied == target.numel() * target.element_size()


@pytest.mark.parametrize("start, length", [(0, 100), (5, 30), (30, 150), (288 - 7, 7), (100, 0)])
def test_flat_ranges_as_zero3_partitions_them(sharded, start, length, monkeypatch):
    directory, data = sharded
    monkeypatch.setattr("dscluster.engine.checkpoint.STAGING_BYTES", 100)
    target = torch.zeros(length)
    SafetensorsCheckpoint.open(directory).read([TensorRead("model.embed.weight", target, start=start,
                                                           length=length, flat=True)])
    assert torch.equal(target, data["model.embed.weight"].reshape(-1)[start:start + length])


def test_bfloat16_read_into_float32(sharded):
    directory, data = sharded
    target = torch.empty(12)
    SafetensorsCheckpoint.open(directory).read([TensorRead("model.norm.weight", target)])
    assert torch.equal(target, data["model.norm.weight"].float())


def test_single_file_and_no_safetensors(tmp_path):
    save_file(tensors(), str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    assert ckpt.index is None and len(ckpt.tensors) == len(tensors())
    empty = tmp_path / "bin"
    empty.mkdir()
    torch.save(tensors(), empty / "pytorch_model.bin")
    assert SafetensorsCheckpoint.open(empty) is None


def test_locate_finds_tied_and_prefixed_names_and_names_what_is_missing(sharded):
    directory, _ = sharded
    ckpt = SafetensorsCheckpoint.open(directory)
    needed = {"model.embed.weight": (37, 12), "lm_head.weight": (37, 12), "layer.q.weight": (24, 12)}
    keys = ckpt.locate(needed, aliases={"lm_head.weight": ["model.embed.weight"]}, prefix="model",
                       optional={"model.steps": (10,), "model.not_saved": (3,)})
    assert keys == {"model.embed.weight": "model.embed.weight", "lm_head.weight": "model.embed.weight",
                    "layer.q.weight": "model.layer.q.weight", "model.steps": "model.steps"}
    with pytest.raises(UsageError, match=r"tensor model\.layer\.k\.weight is missing"):
        ckpt.locate({"model.layer.k.weight": (24, 12)})
    with pytest.raises(UsageError, match=r"tensor model\.layer\.q\.weight is \[24, 12\] in model-00001-of-00003"
                                         r"\.safetensors, but config\.json makes it \[48, 12\]"):
        ckpt.locate({"model.layer.q.weight": (48, 12)})


def test_bad_index_and_bad_files_are_named(sharded):
    directory, _ = sharded
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UsageError, match="names model-00002-of-00003.safetensors, which is not there"):
        SafetensorsCheckpoint.open(directory)
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "00002" not in v}
    index["weight_map"]["model.ghost"] = "model-00001-of-00003.safetensors"
    (directory / INDEX).write_text(json.dumps(index))
    with pytest.raises(UsageError, match="puts tensor model.ghost in model-00001-of-00003.safetensors, which does "
                                         "not hold it"):
        SafetensorsCheckpoint.open(directory)
    (directory / INDEX).write_text("{not json")
    with pytest.raises(UsageError, match="is not a safetensors index"):
        SafetensorsCheckpoint.open(directory)
    (directory / INDEX).unlink()
    (directory / "model-00003-of-00003.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(UsageError, match="model-00003-of-00003.safetensors is not readable safetensors"):
        SafetensorsCheckpoint.open(directory)


def test_truncated_file_is_named(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(UsageError, match=r"model\.safetensors is not readable safetensors: tensor w's bytes "
                                         r"0\.\.16384 do not hold F32 \[64, 64\]"):
        SafetensorsCheckpoint.open(tmp_path)


# -- host memory ------------------------------------------------------------------------------------


def fake_cgroup_v1(root: Path, proc: Path, limit: int, usage: int, cache: int) -> None:
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("4:memory:/pod/rank\n0::/\n")
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    group = root / "memory" / "pod" / "rank"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (group / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (group / "memory.stat").write_text(f"total_active_file {cache}\ntotal_inactive_file 0\n"
                                       f"hierarchical_memory_limit {limit}\n")


def test_host_memory_reads_the_cgroup_limit_less_what_cannot_be_reclaimed(tmp_path, monkeypatch):
    """A cgroup tree written by the test: the files and formats are the kernel's (v1)."""
    monkeypatch.setenv("LOCAL_SIZE", "1")
    gib = 2**30
    fake_cgroup_v1(tmp_path / "cg", tmp_path / "proc", limit=2 * gib, usage=gib, cache=gib // 2)
    memory = host_memory(tmp_path / "cg", tmp_path / "proc")
    assert memory.limit == 2 * gib and memory.room == 2 * gib - gib // 2
    assert "memory.limit_in_bytes" in memory.source
    monkeypatch.setenv("LOCAL_SIZE", "2")  # two ranks in one pod share it
    assert host_memory(tmp_path / "cg", tmp_path / "proc").room == (2 * gib - gib // 2) // 2


# cgroup v2 as a Kubernetes node with the systemd cgroup driver lays it out: a container's scope in
# its pod's slice in its QoS class's slice. The files and formats are the kernel's (cgroup-v2.rst):
# `memory.max` is a byte count or "max" (no limit), `memory.current` is absent at the root, and
# `memory.stat` lists `anon`, `file`, ..., `active_file`, `inactive_file`. (This machine can mount a
# cgroup2 hierarchy, but its memory controller is bound to the v1 hierarchy, so a real v2
# `memory.max` cannot be made here: the tree is written by the test.)
V2_CONTAINER = ("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e.slice/"
                "cri-containerd-7c2a.scope")


def fake_cgroup_v2(root: Path, proc: Path, cgroup_path: str, groups: dict[str, tuple[str, int, int]],
                   mem_available_kib: int | None = 20_000_000) -> None:
    """`groups`: path under the root ("" for the root itself) -> (memory.max, memory.current,
    reclaimable file bytes, split between active_file and inactive_file)."""
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(f"0::/{cgroup_path}\n")
    if mem_available_kib is not None:
        (proc / "meminfo").write_text(f"MemTotal:       24000000 kB\nMemFree:        1000000 kB\n"
                                      f"MemAvailable:   {mem_available_kib} kB\n")
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "memory.stat").write_text("anon 0\nfile 0\n")
    for path, (maximum, current, file) in groups.items():
        group = root / path
        group.mkdir(parents=True, exist_ok=True)
        (group / "memory.max").write_text(f"{maximum}\n")
        (group / "memory.current").write_text(f"{current}\n")
        (group / "memory.stat").write_text(
            f"anon {current - file}\nfile {file}\nkernel 4194304\nshmem 0\ninactive_anon 0\n"
            f"active_anon {current - file}\ninactive_file {file // 4}\nactive_file {file - file // 4}\n"
            "unevictable 0\n")


def v2_tree(container_max: str, pod_max: str, current: int, file: int) -> dict[str, tuple[str, int, int]]:
    pod = V2_CONTAINER.rpartition("/")[0]
    pause = 2 * 2**20  # the pod's sandbox ("pause") container
    return {"kubepods.slice": ("max", current + pause, file), "kubepods.slice/kubepods-burstable.slice":
            ("max", current + pause, file), pod: (pod_max, current + pause, file), V2_CONTAINER:
            (container_max, current, file)}


def test_host_memory_reads_cgroup_v2_memory_max_less_what_cannot_be_reclaimed(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_SIZE", "1")
    gib = 2**30
    # The container's limit (2 GiB) is the tightest; its pod and the slices above say "max".
    fake_cgroup_v2(tmp_path / "cg", tmp_path / "proc", V2_CONTAINER,
                   v2_tree(container_max=str(2 * gib), pod_max="max", current=gib, file=gib // 2))
    memory = host_memory(tmp_path / "cg", tmp_path / "proc")
    assert memory.limit == 2 * gib and memory.room == 2 * gib - gib // 2
    assert memory.source == "memory cgroup (v2) memory.max"
    with pytest.raises(UsageError, match=r"needs 2\.00 GiB .* only 1\.50 GiB is left under its limit of 2\.00 GiB "
                                         r"\(memory cgroup \(v2\) memory\.max\)"):
        check_host_memory(2 * gib, "the whole model (float32)", memory)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # two ranks in one container share it
    assert host_memory(tmp_path / "cg", tmp_path / "proc").room == (2 * gib - gib // 2) // 2


def test_cgroup_v2_limit_of_a_parent_bounds_a_container_without_one(tmp_path, monkeypatch):
    """A pod-level limit (the pod slice's memory.max) holds every container of the pod, whose own
    memory.max says "max"; what the pod's other container uses counts against it."""
    monkeypatch.setenv("LOCAL_SIZE", "1")
    gib = 2**30
    fake_cgroup_v2(tmp_path / "cg", tmp_path / "proc", V2_CONTAINER,
                   v2_tree(container_max="max", pod_max=str(3 * gib // 2), current=gib, file=0))
    memory = host_memory(tmp_path / "cg", tmp_path / "proc")
    assert memory.limit == 3 * gib // 2 and memory.room == 3 * gib // 2 - gib - 2 * 2**20


def test_cgroup_v2_namespace_shows_the_container_as_the_root(tmp_path, monkeypatch):
    """With a cgroup namespace (containerd's default on v2) the container sees its own cgroup as
    "/" and the mount's root holds its memory.max."""
    monkeypatch.setenv("LOCAL_SIZE", "1")
    gib = 2**30
    fake_cgroup_v2(tmp_path / "cg", tmp_path / "proc", "", {"": (str(gib), gib // 4, 0)})
    memory = host_memory(tmp_path / "cg", tmp_path / "proc")
    assert (memory.limit, memory.room, memory.source) == (gib, gib - gib // 4, "memory cgroup (v2) memory.max")


def test_cgroup_v2_max_means_no_limit(tmp_path, monkeypatch):
    """"max" all the way up: no cgroup limit; the node's MemAvailable bounds the rank, or, without
    /proc/meminfo, nothing does."""
    monkeypatch.setenv("LOCAL_SIZE", "1")
    fake_cgroup_v2(tmp_path / "cg", tmp_path / "proc", V2_CONTAINER,
                   v2_tree(container_max="max", pod_max="max", current=2**30, file=0))
    memory = host_memory(tmp_path / "cg", tmp_path / "proc")
    assert (memory.limit, memory.room) == (20_000_000 * 1024, 20_000_000 * 1024)
    assert memory.source == "MemAvailable in /proc/meminfo"
    fake_cgroup_v2(tmp_path / "cg2", tmp_path / "proc2", V2_CONTAINER,
                   v2_tree(container_max="max", pod_max="max", current=2**30, file=0), mem_available_kib=None)
    memory = host_memory(tmp_path / "cg2", tmp_path / "proc2")
    assert (memory.limit, memory.room, memory.source) == (UNLIMITED, UNLIMITED, "no limit found")
    check_host_memory(10**15, "a petabyte", memory)  # nothing to check against: no error


def test_check_host_memory_names_need_room_and_way_out(monkeypatch):
    memory = HostMemory(room=2**30, limit=2 * 2**30, source="memory cgroup (v1) memory.limit_in_bytes")
    check_host_memory(2**30, "x", memory)
    with pytest.raises(UsageError) as err:
        check_host_memory(3 * 2**30, "the whole model (float32)", memory)
    message = str(err.value)
    assert "needs 3.00 GiB of host memory for the whole model (float32)" in message
    assert "only 1.00 GiB is left under its limit of 2.00 GiB" in message and "dscluster plan" in message
    monkeypatch.setenv("DSCLUSTER_MEMORY_CHECK", "0")
    check_host_memory(3 * 2**30, "x", memory)

"""A model directory's safetensors weights, read tensor by tensor and slice by slice.

Real checkpoints are many files, `model-0000k-of-0000n.safetensors`, with
`model.safetensors.index.json` mapping every tensor to its file; small ones are one
`model.safetensors`. `SafetensorsCheckpoint` knows every tensor's file, shape and dtype from the
headers alone (no weight is read to open it), checks them against the tensors a model needs, and
copies slices of them into tensors that already exist on the rank's device.

Reads go straight from the file into the target tensors, only the bytes each rank needs (a run
per row when columns are cut), through one bounded staging buffer when the dtype is converted or
the target is on a GPU: nothing is memory-mapped and no full-size temporary is made.
`safe_open(...).get_slice(...)` maps the file and returns a new tensor per slice; the pages a
slice touches then count in the rank's resident memory until the file is closed, so a tp=2 rank
reading a single-file 2 GiB checkpoint peaked above one unsharded process (docs/loading.md has
the numbers). The format is simple and
documented: an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dscluster.errors import UsageError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
STAGING_BYTES = 16 * 2**20   # the most read at once through the staging buffer (one row at least)
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str            # safetensors' name: F32, BF16, F16, ...
    offset: int = 0       # of the first byte, from the start of the file


@dataclass
class TensorRead:
    """Copy `length` entries of checkpoint tensor `key` from `start` along `dim` (the whole tensor
    when `dim` is None; with `flat`, entries of the flattened tensor, as ZeRO-3 partitions it)
    into `target`, converting dtype and device on the way."""

    key: str
    target: torch.Tensor
    dim: int | None = None
    start: int = 0
    length: int = 0
    flat: bool = False


class SafetensorsCheckpoint:
    def __init__(self, directory: Path, tensors: dict[str, TensorInfo], index: Path | None):
        self.directory = directory
        self.tensors = tensors
        self.index = index

    @classmethod
    def open(cls, directory: str | Path) -> SafetensorsCheckpoint | None:
        """The directory's safetensors weights (the index json if there is one, else every
        `*.safetensors` file); None when it has none (a PyTorch .bin checkpoint)."""
        directory = Path(directory)
        index = directory / INDEX
        weight_map: dict[str, str] = {}
        if index.is_file():
            weight_map = _weight_map(directory, index)
            files = [directory / name for name in sorted(set(weight_map.values()))]
        else:
            index = None
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                return None
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for key, info in _read_header(file).items():
                if key in tensors:
                    raise UsageError(f"checkpoint {directory}: tensor {key} is in both {tensors[key].file.name} "
                                     f"and {file.name}")
                tensors[key] = info
        for key, name in weight_map.items():
            if key not in tensors or tensors[key].file.name != name:
                raise UsageError(f"checkpoint {directory}: {INDEX} puts tensor {key} in {name}, which does not hold it")
        return cls(directory, tensors, index)

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def locate(self, needed: dict[str, tuple[int, ...]], aliases: dict[str, list[str]] | None = None,
               prefix: str | None = None, optional: dict[str, tuple[int, ...]] | None = None) -> dict[str, str]:
        """For every tensor the model needs (name -> full shape), the checkpoint key holding it;
        `optional` ones (persistent buffers the constructor already computed) only when present.

        A tensor may be stored under another name: a tied weight's source (`lm_head.weight` is
        `model.embed_tokens.weight` when embeddings are tied), or with or without the model's base
        prefix (`bert.` in a head model's names, absent from a base model's checkpoint). Raises a
        UsageError naming the first tensor that is missing or whose shape the config contradicts."""
        aliases = aliases or {}
        keys: dict[str, str] = {}
        for name, shape in [*needed.items(), *(optional or {}).items()]:
            key = next((k for k in _candidates(name, aliases.get(name, ()), prefix) if k in self.tensors), None)
            if key is None:
                if name in needed:
                    raise UsageError(f"checkpoint {self.directory}: tensor {name} is missing "
                                     f"({len(self.tensors)} tensors in {len(self.files)} file(s))")
                continue
            stored = self.tensors[key]
            if stored.shape != tuple(shape):
                raise UsageError(f"checkpoint {self.directory}: tensor {key} is {list(stored.shape)} in "
                                 f"{stored.file.name}, but config.json makes it {list(shape)}")
            keys[name] = key
        return keys

    def read(self, reads: Iterable[TensorRead]) -> int:
        """Do every read, file by file, in file order. Returns the bytes copied into the targets."""
        by_file: dict[Path, list[TensorRead]] = {}
        for r in reads:
            by_file.setdefault(self.tensors[r.key].file, []).append(r)
        staging: dict[bool, torch.Tensor] = {}
        copied = 0
        for file in sorted(by_file):
            with open(file, "rb", buffering=0) as fh:
                for r in sorted(by_file[file], key=lambda r: self.tensors[r.key].offset):
                    _read_into(fh, self.tensors[r.key], r, staging)
                    copied += r.target.numel() * r.target.element_size()
        return copied


def _read_into(fh, info: TensorInfo, r: TensorRead, staging: dict[bool, torch.Tensor]) -> None:
    """Copy the part of one stored tensor that `r` asks for into `r.target`, reading only its bytes.

    The part is `outer` runs of `run` contiguous elements, `stride` elements apart in the file
    (one run when dim 0 is split, the tensor is whole or the range is flat; a run per row when a
    later dimension is cut, as for a row-parallel weight's columns). In the stored dtype on the
    CPU the runs are read straight into the target; otherwise they are packed into the staging
    buffer, a block at a time, and copied over (converting the dtype, or to the GPU)."""
    dtype = DTYPES[info.dtype]
    shape = (math.prod(info.shape),) if r.flat else (info.shape or (1,))
    dim, start, length = (0, 0, shape[0]) if r.dim is None and not r.flat else (r.dim or 0, r.start, r.length)
    inner = math.prod(shape[dim + 1:])
    outer, run, stride = math.prod(shape[:dim]), length * inner, shape[dim] * inner
    if not r.target.is_contiguous() or r.target.numel() != outer * run:
        raise RuntimeError(f"{r.key}: cannot read {outer} x {run} entries into a tensor of {list(r.target.shape)}")
    if not r.target.numel():
        return
    target = r.target.view(outer, run)
    size = dtype.itemsize
    offset = info.offset + start * inner * size
    if stride == run:  # one contiguous range: read as one run
        outer, run = 1, outer * run
        target = target.view(1, run)
    nbytes = run * size
    if target.device.type == "cpu" and target.dtype == dtype:
        into = memoryview(target.view(torch.uint8).numpy()).cast("B")
        for o in range(outer):
            _read_exactly(fh, offset + o * stride * size, into[o * nbytes:(o + 1) * nbytes], info, r)
        return
    pinned = target.device.type == "cuda"  # host-to-device copies from page-locked memory
    buffer = staging.get(pinned)
    if buffer is None or buffer.numel() < run * size:
        buffer = staging[pinned] = torch.empty(max(STAGING_BYTES, run * size), dtype=torch.uint8,
                                               pin_memory=pinned)
    per_block = buffer.numel() // nbytes
    packed = buffer[:per_block * nbytes].view(per_block, nbytes)
    into = memoryview(packed.numpy()).cast("B")
    for first in range(0, outer, per_block):
        rows = min(per_block, outer - first)
        for o in range(rows):
            _read_exactly(fh, offset + (first + o) * stride * size, into[o * nbytes:(o + 1) * nbytes], info, r)
        target.narrow(0, first, rows).copy_(packed[:rows].view(dtype))


def _read_exactly(fh, offset: int, into: memoryview, info: TensorInfo, r: TensorRead) -> None:
    fd = fh.fileno()
    while into:
        got = os.preadv(fd, [into], offset)
        if not got:
            raise UsageError(f"checkpoint file {info.file} ends inside tensor {r.key}")
        into, offset = into[got:], offset + got


def _candidates(name: str, aliases: Iterable[str], prefix: str | None) -> list[str]:
    names = [name, *aliases]
    if prefix:
        lead = prefix + "."
        names += [n[len(lead):] if n.startswith(lead) else lead + n for n in list(names)]
    return names


def _weight_map(directory: Path, index: Path) -> dict[str, str]:
    """The index's tensor -> file map, every file it names present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"checkpoint {directory}: {INDEX} is not a safetensors index ({exc})") from None
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise UsageError(f"checkpoint {directory}: {INDEX} names {missing[0]}, which is not there "
                         f"({len(missing)} of {len(names)} files missing)")
    return weight_map


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Names, shapes, dtypes and byte offsets from a safetensors header; no tensor data is read."""
    try:
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= MAX_HEADER:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(fh.read(size))
            data_start, file_size = 8 + size, fh.seek(0, 2)
        out = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"tensor {key} has dtype {entry['dtype']}, which this reader does not know")
            if end - begin != math.prod(shape) * DTYPES[entry["dtype"]].itemsize or data_start + end > file_size:
                raise ValueError(f"tensor {key}'s bytes {begin}..{end} do not hold {entry['dtype']} {list(shape)}")
            out[key] = TensorInfo(file, shape, entry["dtype"], data_start + begin)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"checkpoint file {file} is not readable safetensors: {exc}") from None

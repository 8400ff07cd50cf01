"""A model directory's safetensors weights, read tensor by tensor and slice by slice.

Real checkpoints are many files, `model-0000k-of-0000n.safetensors`, with
`model.safetensors.index.json` mapping every tensor to its file; small ones are one
`model.safetensors`. `SafetensorsCheckpoint` knows every tensor's file, shape and dtype from the
headers alone (no weight is read to open it), checks them against the tensors a model needs, and
copies slices of them into tensors that already exist on the rank's device.

Files are read one at a time and closed before the next is opened: safetensors maps a file into
memory, and the pages a slice touches count in the process's resident memory while the file is
mapped. One file at a time bounds that to the largest file, on top of the rank's own shards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dscluster.errors import UsageError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str            # safetensors' name: F32, BF16, F16, ...


@dataclass
class TensorRead:
    """Copy `length` entries of checkpoint tensor `key` from `start` along `dim` (the whole tensor
    when `dim` is None) into `target`, converting dtype and device on the way."""

    key: str
    target: torch.Tensor
    dim: int | None = None
    start: int = 0
    length: int = 0


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
        """Do every read, file by file (each file mapped only while its tensors are read).
        Returns the bytes copied into the targets."""
        from safetensors import safe_open

        by_file: dict[Path, list[TensorRead]] = {}
        for r in reads:
            by_file.setdefault(self.tensors[r.key].file, []).append(r)
        copied = 0
        for file in sorted(by_file):
            with safe_open(str(file), framework="pt") as f:
                for r in by_file[file]:
                    part = _read_slice(f, r)
                    if tuple(part.shape) != tuple(r.target.shape):
                        raise RuntimeError(f"read {tuple(part.shape)} of {r.key} for a tensor of {tuple(r.target.shape)}")
                    with torch.no_grad():
                        r.target.copy_(part)
                    copied += r.target.numel() * r.target.element_size()
                    del part
        return copied


def _read_slice(f, r: TensorRead) -> torch.Tensor:
    if r.dim is None:
        return f.get_tensor(r.key)
    piece = f.get_slice(r.key)
    index = [slice(None)] * len(piece.get_shape())
    index[r.dim] = slice(r.start, r.start + r.length)
    return piece[tuple(index)]


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
    """Names, shapes and dtypes from a safetensors header; no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = TensorInfo(file, tuple(int(d) for d in piece.get_shape()), piece.get_dtype())
            return out
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"checkpoint file {file} is not readable safetensors: {exc}") from None

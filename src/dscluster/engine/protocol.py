"""Control messages from rank 0 to every rank, over the gloo control group.

A message is a 2-int header (opcode, payload length) followed, when the length is not zero, by the
payload bytes. The header goes by all-reduce rather than broadcast: an all-reduce completes only
when every rank takes part, so rank 0 learns at each message (heartbeats included) that every rank
is alive and in step, and a missing rank shows up as a timeout of the control group.

Payloads are pickled Python values (tensors as numpy arrays). The channel is internal to the
group, between processes of the same program; it is never reachable from HTTP, and nothing a
client sends is unpickled: clients' input is validated and converted on rank 0 first.
"""

from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class Op(enum.IntEnum):
    HEARTBEAT = 1
    PREDICT = 2
    GENERATE = 3
    STOP = 4


@dataclass
class Message:
    op: Op
    payload: object = None


def encode(value: object) -> bytes:
    return pickle.dumps(_to_wire(value), protocol=5)


def decode(data: bytes) -> object:
    return _from_wire(pickle.loads(data))


def _to_wire(value):
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return ("tensor-bf16", t.view(torch.int16).numpy())
        return ("tensor", t.numpy())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_wire(v) for v in value)
    return value


def _from_wire(value):
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("tensor", "tensor-bf16"):
        t = torch.from_numpy(np.array(value[1]))
        return t.view(torch.bfloat16) if value[0] == "tensor-bf16" else t
    if isinstance(value, (list, tuple)):
        return type(value)(_from_wire(v) for v in value)
    return value


class ControlChannel:
    """Rank 0 sends, every other rank receives; all of them block until all take part."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int):
        self.group = group
        self.rank = rank

    def send(self, op: Op, payload: object = None) -> None:
        data = b"" if payload is None else encode(payload)
        header = torch.tensor([int(op), len(data)], dtype=torch.int64)
        dist.all_reduce(header, group=self.group)
        if data:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group)

    def recv(self) -> Message:
        header = torch.zeros(2, dtype=torch.int64)
        dist.all_reduce(header, group=self.group)
        op, size = Op(int(header[0])), int(header[1])
        payload = None
        if size:
            buf = torch.empty(size, dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group)
            payload = decode(buf.numpy().tobytes())
        return Message(op, payload)

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor to all ranks (same shape and dtype everywhere), in place."""
        dist.broadcast(tensor, src=0, group=self.group)
        return tensor

    def agree_ok(self, ok: bool) -> int:
        """End of a unit of work: every rank reports whether it succeeded. Returns the number of
        ranks that failed, so that all ranks agree on the outcome and stay in step."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.group)
        return int(flag.item())

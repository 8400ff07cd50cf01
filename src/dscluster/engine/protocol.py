"""Control messages from rank 0 to every rank, over the gloo control group.

A message is a header of int64, all-reduced, followed (when its payload length is not zero) by
the payload bytes, broadcast from rank 0. The header is

    [opcode, payload length, failed steps, action for row 0, ..., action for row R-1]

R is the number of rows of the running generation batch, which every rank holds identically (each
applies the same steps in the same order), so every rank knows the header's size before it
arrives. Rank 0 writes the opcode, the length and the actions; each rank adds 1 to "failed steps"
when its own last generation step raised (each reports that once), so every rank learns of a
failed step at the next message, at no extra cost, and drops the batch together.

The header goes by all-reduce rather than broadcast: an all-reduce completes only when every rank
takes part, so rank 0 learns at each message (heartbeats included) that every rank is alive and in
step, and a missing rank shows up as a timeout of the control group.

A generation step is one message (`Op.STEP`): the actions say, per running row, which token to
feed it (the one rank 0 sampled at the previous step), how many prompt tokens to prefill, to wait
this step, or that it leaves; the payload, only when requests join, carries their prompts. A step
in which every request just decodes is a header of R + 3 integers and nothing else: the cheapest
message there is.

Payloads are pickled Python values (tensors as numpy arrays). The channel is internal to the
group, between processes of the same program; it is never reachable from HTTP, and nothing a
client sends is unpickled: clients' input is validated and converted on rank 0 first.
"""

from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from dscluster.engine.api import SamplingParams


class Op(enum.IntEnum):
    HEARTBEAT = 1
    PREDICT = 2
    STEP = 3
    STOP = 4


HEADER = 3  # opcode, payload length, failed steps; then one action per running row

# A row's action in a step: a token id (>= 0) to feed it, LEAVE, prefill(n) for n prompt tokens, or WAIT.
LEAVE = -1


def prefill(n: int) -> int:
    """The action "compute the next n prompt tokens" (n >= 0; 0 waits a step for token budget)."""
    return -2 - n


def prefill_count(action: int) -> int:
    """The n of a prefill action."""
    return -2 - action


# "Nothing this step", for any row: a prompt waiting for token budget, or a decoding row waiting
# while newcomers' prompts are computed (its due token is fed at a later step).
WAIT = prefill(0)


@dataclass(frozen=True)
class Join:
    """A request joining the batch: all a rank needs to hold its row. Rows join at the end, in order.
    `params` travel with it so every rank knows the request whole (only rank 0 samples today)."""

    request_id: int
    prompt_ids: tuple[int, ...]
    first_chunk: int                    # prompt tokens computed in the step it joins
    params: SamplingParams = SamplingParams()


@dataclass
class StepPlan:
    """One generation step: an action per current row (applied first, leaves included), then joins."""

    actions: list[int] = field(default_factory=list)
    joins: list[Join] = field(default_factory=list)


@dataclass
class Message:
    op: Op
    payload: object = None
    actions: list[int] = field(default_factory=list)
    failed: int = 0                     # ranks whose last generation step failed


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
    """Rank 0 sends, every other rank receives; all of them block until all take part.

    `rows` is the running batch's row count, kept equal on every rank by the runtime; it sizes the
    header. `step_failed` is set by the runtime when this rank's last generation step raised."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int):
        self.group = group
        self.rank = rank
        self.rows = 0
        self.step_failed = False

    def _header(self, op: int = 0, size: int = 0, actions: list[int] | None = None) -> torch.Tensor:
        header = torch.zeros(HEADER + self.rows, dtype=torch.int64)
        header[0], header[1], header[2] = op, size, int(self.step_failed)
        if actions:
            if len(actions) != self.rows:
                raise ValueError(f"{len(actions)} actions for {self.rows} running rows")
            header[HEADER:] = torch.tensor(actions, dtype=torch.int64)
        self.step_failed = False
        return header

    def send(self, op: Op, payload: object = None, actions: list[int] | None = None) -> Message:
        """Send a message; returns it as every rank sees it (with the failed-step count)."""
        data = b"" if payload is None else encode(payload)
        header = self._header(int(op), len(data), actions)
        dist.all_reduce(header, group=self.group)
        if data:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group)
        return Message(op, payload, list(actions or []), int(header[2]))

    def recv(self) -> Message:
        header = self._header()
        dist.all_reduce(header, group=self.group)
        values = header.tolist()
        op, size, failed = Op(values[0]), values[1], values[2]
        payload = None
        if size:
            buf = torch.empty(size, dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group)
            payload = decode(buf.numpy().tobytes())
        return Message(op, payload, values[HEADER:], failed)

    def agree_ok(self, ok: bool) -> int:
        """End of a unit of work: every rank reports whether it succeeded. Returns the number of
        ranks that failed, so that all ranks agree on the outcome and stay in step."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.group)
        return int(flag.item())

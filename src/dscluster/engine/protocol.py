"""Control messages from rank 0 to every rank, over TCP sockets in a star around rank 0
(engine/control_socket.py: the transport, and why it is not a gloo group).

A message is a header of int64 followed by the payload bytes (when its length is not zero). The
header is

    [opcode, payload length, failed steps, micro-batch, action for row 0, ..., action for row R-1]

R is the number of rows of the step's micro-batch, which every rank holds identically (each
applies the same steps in the same order), so every rank knows the header's size when it arrives;
a worker that receives another size is out of step and stops. There is one micro-batch (0) except
under pipeline parallelism, where up to one per stage is in flight (engine/pipeline.py).

Lockstep: every worker answers every message it handled (all but STOP) with a report, a single
flag: after a generation step, whether its step raised; after a heartbeat, at once (no failure);
after a predict unit, whether it failed (`agree_ok`). Rank 0 reads every report on a message
before it sends the next one, so it learns at each message (heartbeats included) that every rank
finished the last unit and is alive, and a missing rank shows up as a closed socket or a timeout.
The one exception is a pipeline's window of steps in flight (`send(..., window=N)`): a step may
be sent while the reports on the N - 1 steps before it are still to come (later stages are still
computing them); they are read, in order, before any message beyond the window.
The failed-step flags of those reports, and rank 0's own, add up to the next header's "failed
steps", so every rank learns of a failed step at the next message and drops the batch together.
A predict unit ends with `agree_ok`: rank 0 reads the workers' outcomes and sends every worker
the number of ranks that failed, so all of them agree on it before the next unit.

A generation step is one message (`Op.STEP`): the actions say, per running row, which token to
feed it (the one rank 0 sampled at the previous step), how many prompt tokens to prefill, to wait
this step, or that it leaves; the payload, only when requests join or runs of the key/value pool
change, carries the joining prompts with their places in the pool and the runs that move. A step
in which every request just decodes is a header of R + 3 integers and nothing else: the cheapest
message there is.

Payloads are pickled Python values (tensors as numpy arrays). The channel is internal to the
group, between processes of the same program that proved it with a secret from the rendezvous
store; it is never reachable from HTTP, and nothing a client sends is unpickled: clients' input
is validated and converted on rank 0 first. Rank 0 unpickles nothing: reports are integers.
"""

from __future__ import annotations

import enum
import pickle
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from dscluster.engine.api import SamplingParams
from dscluster.engine.control_socket import Rank0Link, WorkerLink


class Op(enum.IntEnum):
    HEARTBEAT = 1
    PREDICT = 2
    STEP = 3
    STOP = 4


HEADER = 4  # opcode, payload length, failed steps, micro-batch; then one action per row of that micro-batch

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
    `params` travel with it so every rank knows the request whole (only rank 0 samples them).

    Its place in the key/value pool (engine/kv_blocks.py): the run of `blocks` blocks from block
    `start`; its first `cached` prompt tokens are already in the pool (a prefix cache hit), either
    in the run's own blocks or copied into them first: `copies` are (source block, destination
    block, count).

    `argmax_only`: rank 0 uses nothing of the request's logits but their argmax (greedy, nothing
    changes the logits, no logprobs, no grammar; only rank 0 knows the grammar). Under pipeline
    parallelism a step whose sampled rows are all such is drawn by the last stage, which sends
    rank 0 a token per row instead of a row of logits (engine/pipeline.py)."""

    request_id: int
    prompt_ids: tuple[int, ...]
    first_chunk: int                    # prompt tokens computed in the step it joins
    params: SamplingParams = SamplingParams()
    start: int = 0
    blocks: int = 0
    cached: int = 0
    copies: tuple[tuple[int, int, int], ...] = ()
    argmax_only: bool = False


@dataclass
class StepPlan:
    """One generation step of one micro-batch: an action per current row of that micro-batch
    (applied first, leaves included), then the runs that change (request id, start block, block
    count: a run that grows, shrinks or moves, of a row in any micro-batch; a moved run's contents
    are copied, in this order), then joins."""

    actions: list[int] = field(default_factory=list)
    joins: list[Join] = field(default_factory=list)
    placements: list[tuple[int, int, int]] = field(default_factory=list)
    micro_batch: int = 0

    def payload(self) -> object:
        """What the step's message carries besides the actions (None when nothing joins or moves)."""
        if not self.joins and not self.placements:
            return None
        return (self.placements, self.joins)

    @classmethod
    def received(cls, message: Message) -> StepPlan:
        placements, joins = message.payload if message.payload is not None else ([], [])
        return cls(actions=message.actions, joins=list(joins), placements=list(placements),
                   micro_batch=message.micro_batch)


@dataclass
class Message:
    op: Op
    payload: object = None
    actions: list[int] = field(default_factory=list)
    failed: int = 0                     # ranks whose last generation step failed
    micro_batch: int = 0


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
    """Rank 0 sends, every other rank receives and reports back; see the module's docstring.

    `link` is this rank's end of the star (control_socket.open_link). `rows` holds each
    micro-batch's row count, kept equal on every rank by the runtime; it sizes the header.
    `step_failed` is set by the runtime when this rank's last generation step raised."""

    def __init__(self, link: Rank0Link | WorkerLink, rank: int, micro_batches: int = 1):
        self.link = link
        self.rank = rank
        self.rows = [0] * micro_batches
        self.step_failed = False
        self._unreported: deque[Op] = deque()  # rank 0: messages sent whose reports are still to read
        self._owes_report = False           # a worker: it has not reported on the last message yet
        self._stopped = False

    def _header(self, op: int = 0, size: int = 0, actions: list[int] | None = None,
                micro_batch: int = 0) -> np.ndarray:
        rows = self.rows[micro_batch]
        header = np.zeros(HEADER + rows, dtype=np.int64)
        header[0], header[1], header[3] = op, size, micro_batch
        if actions:
            if len(actions) != rows:
                raise ValueError(f"{len(actions)} actions for {rows} rows of micro-batch {micro_batch}")
            header[HEADER:] = actions
        return header

    @property
    def steps_unreported(self) -> int:
        """Rank 0: messages sent whose reports are not read yet (steps still in later stages)."""
        return len(self._unreported)

    def _read_reports(self, keep: int = 0) -> int:
        """Rank 0: read the workers' reports, oldest message first, until at most `keep` messages
        are unreported; the number of reports that said "failed"."""
        failed = 0
        while len(self._unreported) > keep:
            failed += sum(int(values[0]) for values in self.link.gather())
            self._unreported.popleft()
        return failed

    def send(self, op: Op, payload: object = None, actions: list[int] | None = None, micro_batch: int = 0,
             window: int = 1) -> Message:
        """Send a message; returns it as every rank sees it (with the failed-step count). A step
        sent with `window` N may leave the reports on the N - 1 messages before it unread."""
        if self._unreported and self._unreported[-1] is Op.PREDICT:
            raise RuntimeError("a predict unit ends with agree_ok before the next message")
        data = b"" if payload is None else encode(payload)
        header = self._header(int(op), len(data), actions, micro_batch)
        keep = window - 1 if op is Op.STEP else 0
        header[2] = int(self.step_failed) + self._read_reports(keep)
        self.step_failed = False
        self.link.broadcast(header, data, owed=bool(self._unreported))
        if op is not Op.STOP:
            self._unreported.append(op)
        self._stopped = op is Op.STOP
        return Message(op, payload, list(actions or []), int(header[2]), micro_batch)

    def recv(self) -> Message:
        """Report on the last message (this rank's failed-step flag), then wait for the next one."""
        if self._owes_report:
            self.link.send([int(self.step_failed)])
            self.step_failed = self._owes_report = False
        values, data = self.link.receive()
        micro_batch = int(values[3]) if len(values) >= HEADER else -1
        if not 0 <= micro_batch < len(self.rows) or len(values) != HEADER + self.rows[micro_batch]:
            expected = self.rows[micro_batch] if 0 <= micro_batch < len(self.rows) else 0
            raise RuntimeError(f"out of step: a header of {len(values)} values for micro-batch {micro_batch}, "
                               f"expected {HEADER + expected} for {expected} running rows")
        op, size, failed = Op(int(values[0])), int(values[1]), int(values[2])
        self._owes_report = op is not Op.STOP
        return Message(op, decode(data) if size else None, values[HEADER:].tolist(), failed, micro_batch)

    def agree_ok(self, ok: bool) -> int:
        """End of a predict unit: every rank reports whether it succeeded. Returns the number of
        ranks that failed, on every rank, so that all ranks agree on the outcome and stay in step."""
        if self.rank != 0:
            self.link.send([0 if ok else 1])
            self._owes_report = False
            return int(self.link.receive()[0][0])
        if not self._unreported or self._unreported[-1] is not Op.PREDICT:
            raise RuntimeError("agree_ok ends a predict unit, and none is open")
        failed = (0 if ok else 1) + self._read_reports()
        self.link.broadcast([failed])
        return failed

    def close(self) -> None:
        """Rank 0, after STOP: wait (bounded) until every worker has closed its end, that is, has
        read the STOP. A worker: close its end."""
        self.link.close(drain=self._stopped)

"""Pipeline parallelism: which layers a rank holds, and the hand-over of hidden states between stages.

With `--pp N` the decoder layers are cut into N contiguous stages, balanced by layer count (the
first `layers % N` stages hold one more); the embedding goes with the first stage, the final norm
and the head with the last. The ranks of a stage are consecutive (ranks s*T ... s*T + T - 1 for
T = world / N), so a launcher that starts a node's ranks together puts a stage on one node, and
inside each stage DeepSpeed AutoTP splits the stage's layers over those T ranks (a process group
of their own; engine/parallel.py). Across nodes only one tensor per step goes over the link: the
hidden states at the stage's end, where tensor parallelism would all-reduce twice in every layer.

How a stage runs: the model keeps its own forward (transformers' decoder loop, rotary embeddings,
masks), cut in place. Layers of other stages become `SkippedLayer`s (no parameters; they pass the
hidden states through), a later stage's embedding becomes `StageInput` (no parameters; zeros of
the right shape, replaced by the received hidden states at the stage's first layer), and an
earlier stage's final norm an identity and its head gone (the stage runs the base model and
returns its hidden states). Position ids are every rank's already (the step's plan reaches every
rank), so the only thing handed over is the hidden states tensor; transformers' decoder layers
take the residual stream as that one tensor.

The hand-over is torch.distributed point-to-point in the data group (gloo on CPUs, NCCL on GPUs),
never the control channel: tp rank j of stage s sends to tp rank j of stage s + 1 (each holds the
whole hidden states after its stage's last all-reduce), and tp rank 0 of the last stage sends the
logits the step keeps to rank 0, which samples as with any other layout; or, when rank 0 would only
take each sampled row's argmax (greedy requests, nothing else asked of the logits; `launch`'s
`argmax`), that argmax, a token per row, in their place. Every message carries one
more element, a flag: a stage whose forward raised sends its successor the flag instead of hidden
states, so later stages skip the step, rank 0 learns of it, and nobody waits for a tensor that
never comes; the step then fails on those ranks and every rank drops the batch at the next message
(engine/client.py), as for any failed step. A rank that dies or hangs mid-step is the liveness
path (a broken group), exactly as for a tensor-parallel rank.

Stages kept busy: a step runs on one micro-batch of the running rows, and up to one step per
stage is in flight (engine/client.py launches and collects them, engine/batch.py holds the
micro-batches). Hand-overs are sent without waiting for the receiver, so a stage goes on to the
next step while the next stage computes this one; rank 0 collects a step's logits only when it
needs them, to plan that micro-batch's next step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dscluster.engine.sampling import greedy_tokens
from dscluster.errors import UsageError


@dataclass(frozen=True)
class StageLayout:
    """Where a rank stands in a pipeline of `stages` stages of `tp_size` ranks each."""

    stages: int
    tp_size: int
    stage: int
    tp_rank: int
    num_layers: int
    first_layer: int              # this stage's decoder layers: [first_layer, end_layer)
    end_layer: int

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def rank_of(self, stage: int, tp_rank: int | None = None) -> int:
        return stage * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.tp_size, (stage + 1) * self.tp_size))

    def describe(self) -> str:
        return (f"pipeline stage {self.stage + 1} of {self.stages} (decoder layers {self.first_layer}-"
                f"{self.end_layer - 1} of {self.num_layers}), tensor parallel rank {self.tp_rank} of {self.tp_size}")


def stage_bounds(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) per stage, balanced by count: the first num_layers % stages hold one more."""
    base, extra = divmod(num_layers, stages)
    bounds, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def plan_layout(world_size: int, stages: int, rank: int, num_layers: int) -> StageLayout:
    """This rank's stage; a UsageError when the world does not split into `stages` equal stages."""
    if world_size % stages:
        raise UsageError(f"--pp {stages}: the world of {world_size} ranks does not divide into {stages} stages "
                         "of equal size; start a multiple of --pp ranks")
    if num_layers < stages:
        raise UsageError(f"--pp {stages}: the model has only {num_layers} decoder layers, fewer than the stages")
    tp_size = world_size // stages
    stage = rank // tp_size
    start, end = stage_bounds(num_layers, stages)[stage]
    return StageLayout(stages, tp_size, stage, rank % tp_size, num_layers, start, end)


# -- cutting the model ------------------------------------------------------------------------
@dataclass
class DecoderParts:
    """The parts of a transformers causal LM a pipeline cuts."""

    base: nn.Module               # the decoder (LlamaModel): embeddings, layers, final norm
    layers: nn.ModuleList
    embed_attr: str
    norm_attr: str | None
    head_attr: str


def decoder_parts(module: nn.Module, name: str) -> DecoderParts:
    """The decoder of `module`, or a UsageError saying why it cannot be cut into stages."""
    why = f"--pp: {name} cannot be cut into pipeline stages"
    prefix = getattr(module, "base_model_prefix", None)
    base = getattr(module, prefix, None) if prefix else None
    if base is None or base is module:
        raise UsageError(f"{why}: it is not a transformers causal language model with a base decoder")
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UsageError(f"{why}: its decoder {type(base).__name__} has no `layers` ModuleList of decoder layers")
    embed = next((a for a in ("embed_tokens", "wte", "word_embeddings") if isinstance(getattr(base, a, None),
                                                                                 nn.Module)), None)
    if embed is None or getattr(base, embed) is not module.get_input_embeddings():
        raise UsageError(f"{why}: its decoder {type(base).__name__} has no token embedding it calls itself")
    head = "lm_head" if isinstance(getattr(module, "lm_head", None), nn.Module) else None
    if head is None:
        raise UsageError(f"{why}: it has no `lm_head`")
    norm = next((a for a in ("norm", "final_layernorm", "ln_f") if isinstance(getattr(base, a, None), nn.Module)),
                None)
    return DecoderParts(base, layers, embed, norm, head)


class SkippedLayer(nn.Module):
    """A decoder layer held by another stage: passes the hidden states through."""

    def __init__(self, index: int):
        super().__init__()
        self.layer_idx = index

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class StageInput(nn.Module):
    """A later stage's token embedding: no parameters, zeros of the embedding's shape and dtype (the
    stage's first layer takes the received hidden states instead; transformers' own forward still
    derives the rotary embeddings, positions and masks from it)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=self.dtype, device=input_ids.device).expand(*input_ids.shape, self.hidden_size)


def cut(module: nn.Module, layout: StageLayout, name: str) -> DecoderParts:
    """Cut `module` (on the meta device, before any weight is read) down to this rank's stage, in place."""
    parts = decoder_parts(module, name)
    for i in range(len(parts.layers)):
        if not layout.first_layer <= i < layout.end_layer:
            parts.layers[i] = SkippedLayer(i)
    if not layout.first:
        embed = getattr(parts.base, parts.embed_attr)
        setattr(parts.base, parts.embed_attr, StageInput(embed.weight.shape[1], embed.weight.dtype))
    if not layout.last:
        if parts.norm_attr is not None:
            setattr(parts.base, parts.norm_attr, nn.Identity())
        setattr(module, parts.head_attr, nn.Identity())
    # transformers would tie the head to the embedding again; a stage holds one or the other
    if hasattr(module.config, "tie_word_embeddings") and not (layout.first and layout.last):
        module.config.tie_word_embeddings = False
    return parts


# -- running a stage ----------------------------------------------------------------------------
class StageGroup:
    """The stage's ranks as DeepSpeed's model-parallel unit (`tensor_parallel={"mpu": ...}`): given
    only `tp_group`, DeepSpeed 0.19's inference engine makes its own group of ranks 0..tp-1 anyway."""

    def __init__(self, group):
        self.group = group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.group)

    def get_data_parallel_group(self):
        return None

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1


def stage_groups(layout: StageLayout):
    """The process groups a pipeline uses (every rank makes every group, in order, as torch
    requires): this rank's stage group (None when stages are single ranks), and the group of rank 0
    and the last stage's first rank, which carries the logits back. The logits have a group of
    their own so that, with steps in flight, they never queue behind hidden states on one NCCL
    stream (rank 0 sends the next step's hidden states to stage 2 before it receives the last
    step's logits; on one stream each side's first operation would wait for the other's second)."""
    mine = None
    if layout.tp_size > 1:
        for stage in range(layout.stages):
            group = dist.new_group(layout.stage_ranks(stage))
            if stage == layout.stage:
                mine = group
    logits = dist.new_group(sorted({0, layout.rank_of(layout.stages - 1, 0)}))
    return mine, logits


class StageFailed(RuntimeError):
    """An earlier stage's forward failed in this step (its flag came instead of hidden states)."""


@dataclass
class PostedReceive:
    """A hand-over's receive, posted (`Pipeline._post_recv`) and not yet waited for."""

    work: dist.Work
    message: torch.Tensor                # the tensor, flattened, and the flag
    shape: tuple[int, ...]
    src: int


@dataclass
class LaunchedStage:
    """A step this rank has run its stage of and handed on. On rank 0 the logits are still to
    come from the last stage (`Pipeline.collect`), while this rank computes other steps."""

    logits: torch.Tensor | None          # the last stage's own logits (its tokens, under `argmax`)
    failure: BaseException | None        # this stage's, or an earlier stage's flag
    receiving: PostedReceive | None = None   # rank 0: the logits' receive, posted at launch
    argmax: bool = False                 # the last stage sends a greedy token per kept row, not logits


class Pipeline:
    """The running stage of one rank: its forward pass and the hand-over of its output.

    Hand-overs are sent without waiting for the receiver (`isend`): a stage that sent step k's
    hidden states goes on with step k + 1 while the next stage still computes step k, which is
    what keeps every stage busy when several micro-batches are in flight. At most `in_flight`
    sends are outstanding per rank; the oldest is waited for before another is sent (its tensor
    must stay alive until then)."""

    def __init__(self, module: nn.Module, parts: DecoderParts, layout: StageLayout, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, logits_group=None):
        self.module = module
        self.base = parts.base
        self.layout = layout
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.logits_group = logits_group
        self.in_flight = layout.stages
        # Rank 0 (stage 0's first rank) samples: it receives the last stage's logits, later.
        self.collects_logits = layout.first and layout.tp_rank == 0 and not layout.last
        # Rank 0: steps whose last stage sent a token per row (argmax), and those that sent logits.
        self.handed_back = {"tokens": 0, "logits": 0}
        self._received: torch.Tensor | None = None
        self._sending: deque[tuple[dist.Work, torch.Tensor]] = deque()
        if not layout.first:
            parts.layers[layout.first_layer].register_forward_pre_hook(self._take_received, with_kwargs=True)

    def _take_received(self, layer, args, kwargs):
        """The stage's first layer computes on the hidden states received, not on StageInput's zeros."""
        received, self._received = self._received, None
        if received is None:
            return None
        if args:
            return (received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": received}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                logits_to_keep=None, communicate: bool = True, argmax: bool = False) -> torch.Tensor | None:
        """The whole step at once: `launch`, then `collect`. Returns the logits (under `argmax`, the
        tokens) on rank 0 and on the last stage, None elsewhere. `communicate=False` runs the stage
        alone on zeros (sizing the key/value pool)."""
        return self.collect(self.launch(input_ids, position_ids, logits_to_keep, communicate, argmax))

    def launch(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               logits_to_keep=None, communicate: bool = True, argmax: bool = False) -> LaunchedStage:
        """Run this stage for `input_ids` [B, S]: receive the previous stage's hidden states, run
        the stage's layers, hand over the result (the last stage's first rank hands the logits the
        step keeps, `logits_to_keep`, to rank 0).

        `argmax` (every rank passes the same; B must be 1): rank 0 would use nothing of the kept
        logits but each row's argmax, so the last stage sends that instead, a token per row (-1 for
        a row with a non-finite logit, which rank 0 fails as sampling would): a few bytes instead of
        a vocabulary of floats per row over the link, which on a GPU cluster is most of the step's
        traffic (128k vocabulary x 256 rows in float32 is 128 MiB). The argmax is the one rank 0's
        greedy sampling takes (the first of equal maxima, of the logits in float32), so the tokens
        are the same. vLLM's last pipeline stage samples for the same reason.

        Every message of the step is sent and received whatever failed, so that no rank waits for
        a tensor that never comes and the next step's messages pair up: a failure (this stage's, or
        an earlier one's flag) travels on as the flag and is raised by `collect`."""
        layout = self.layout
        batch, length = input_ids.shape
        hidden_shape = (batch, length, self.hidden_size)
        logits_shape = self._logits_shape(batch, length, logits_to_keep)
        # What the last stage hands rank 0: the logits, or (argmax) a token per kept row.
        result_shape, result_dtype = ((logits_shape[1],), torch.long) if argmax else (logits_shape, self.dtype)
        kwargs = {"position_ids": position_ids, "use_cache": False}
        failure: BaseException | None = None
        # Rank 0 posts the logits' receive now, not when it collects them: the transfer does not
        # run ahead of its receive (measured with gloo over 200 Mbit/s: rank 0 collecting after
        # the last stage had sent still waited 4.2 ms, the logits' wire time; 1.7 ms posted early;
        # NCCL matches a send to a posted receive too).
        receiving = None
        if communicate and self.collects_logits:
            receiving = self._post_recv(result_shape, layout.rank_of(layout.stages - 1, 0), self.logits_group,
                                        result_dtype)
            self.handed_back["tokens" if argmax else "logits"] += 1
        if not layout.first:
            if not communicate:
                self._received = torch.zeros(hidden_shape, dtype=self.dtype, device=self.device)
            else:
                try:
                    self._received = self._recv(hidden_shape, layout.rank_of(layout.stage - 1))
                except StageFailed as exc:
                    failure = exc
        out = None
        if failure is None:
            try:
                if layout.last:
                    if logits_to_keep is not None:
                        kwargs["logits_to_keep"] = logits_to_keep
                    out = self.module(input_ids=input_ids, **kwargs).logits
                    if argmax:
                        out = greedy_tokens(out[0])
                else:
                    out = self.base(input_ids=input_ids, **kwargs).last_hidden_state
            except Exception as exc:  # noqa: BLE001 - handed on as the flag below, then raised
                failure = exc
        self._received = None
        if communicate:
            if not layout.last:
                self._send(out, hidden_shape, layout.rank_of(layout.stage + 1), failure)
            elif layout.tp_rank == 0 and layout.stages > 1:
                self._send(out, result_shape, 0, failure, self.logits_group, result_dtype)
        return LaunchedStage(out if layout.last else None, failure, receiving, argmax)

    def collect(self, launched: LaunchedStage) -> torch.Tensor | None:
        """The step's logits (under `argmax`, its tokens): on rank 0 received from the last stage
        (waiting for it to finish the step), on the last stage its own; None elsewhere. Raises the
        step's failure."""
        failure, logits = launched.failure, launched.logits
        if launched.receiving is not None:
            try:
                logits = self._wait_recv(launched.receiving)
            except StageFailed as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return logits

    def _logits_shape(self, batch: int, length: int, keep) -> tuple[int, int, int]:
        kept = length if keep is None or (isinstance(keep, int) and keep == 0) else \
            (keep if isinstance(keep, int) else int(keep.numel()))
        return batch, kept, int(self.module.config.vocab_size)

    def _send(self, tensor: torch.Tensor | None, shape, dst: int, failure: BaseException | None,
              group=None, dtype: torch.dtype | None = None) -> None:
        """Send `tensor` and the flag (0: fine) in one message of `dtype` (default: the model's);
        on a failure, zeros and the flag 1."""
        dtype = dtype or self.dtype
        if failure is not None or tensor is None:
            message = torch.zeros(math.prod(shape) + 1, dtype=dtype, device=self.device)
            message[-1] = 1
        else:
            flat = tensor.reshape(-1).to(dtype)
            message = torch.cat([flat, flat.new_zeros(1)])
        while len(self._sending) >= self.in_flight:
            self._sending.popleft()[0].wait()
        self._sending.append((dist.isend(message, dst, group=group), message))

    def _recv(self, shape, src: int, group=None) -> torch.Tensor:
        return self._wait_recv(self._post_recv(shape, src, group))

    def _post_recv(self, shape, src: int, group=None, dtype: torch.dtype | None = None) -> PostedReceive:
        """Post the receive of a message of `shape` (and the flag) from `src`; `_wait_recv` finishes it.
        Receives from one rank in one group complete in the order they were posted."""
        message = torch.empty(math.prod(shape) + 1, dtype=dtype or self.dtype, device=self.device)
        return PostedReceive(dist.irecv(message, src, group=group), message, tuple(shape), src)

    def _wait_recv(self, receiving: PostedReceive) -> torch.Tensor:
        receiving.work.wait()
        message = receiving.message
        if message[-1].item() != 0:
            raise StageFailed(f"pipeline stage of rank {receiving.src} failed this step")
        return message[:-1].view(receiving.shape)


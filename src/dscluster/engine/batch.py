"""Every rank: the running generation batch (its rows and their key/value cache) and one step.

Every rank holds a `RunningBatch` and applies the same `StepPlan`s in the same order, so the rows,
the cache's shape and every forward pass's inputs are identical on all ranks, as a split model
needs (tensor parallel and ZeRO-3 collectives run inside the forward pass). Applying a plan:

1. each current row's action is read: a token to feed, a prompt chunk to compute, wait, or leave;
2. leaving rows go (the others keep their order; their blocks in the pool are rank 0's to reuse);
3. runs that change are applied in order (a run that moves has its computed blocks copied);
4. joining rows are appended, each with its run, after the cached blocks of its prefix are copied
   into it (a prefix cache hit: those positions count as computed);
5. the step's new tokens (one per decoding row, a chunk per prefilling row) go through the model as
   one packed sequence; the logits come back for the rows whose next token is sampled now (every
   decoding row, and a prefilling row whose chunk ends its prompt), and, for a request that asked
   for prompt logprobs, at every position of its chunk (they score the prompt's next tokens). So
   prompt logprobs come from the same chunked prefill, one chunk per step, never a separate pass;
   and since a row's `prompt_logprobs` travels in its join, every rank keeps the same positions
   through the split last projection.

Only rank 0 looks at the logits; the other ranks compute them too because the last projection
is split (and gathered) like every other layer. Under pipeline parallelism (engine/pipeline.py)
each rank runs only its stage's layers in the forward pass, between receiving the previous
stage's hidden states and handing its own on; the logits reach rank 0 from the last stage, or,
in a step whose sampled rows are all `argmax_only` (protocol.Join), only their greedy tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from dscluster.engine import kv_cache
from dscluster.engine.kv_cache import KVPool, ShapeProbe, StepLayout
from dscluster.engine.pipeline import Pipeline
from dscluster.engine.protocol import LEAVE, StepPlan, prefill_count


@dataclass
class Row:
    request_id: int
    prompt: tuple[int, ...]
    computed: int = 0               # positions whose keys and values are in the cache
    prompt_logits: bool = False     # keep the logits of every prompt position (prompt logprobs)
    argmax_only: bool = False       # only the argmax of its logits is used (protocol.Join)
    start: int = 0                  # its run in the pool: first block
    blocks: int = 0                 # and length in blocks

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


@dataclass
class StepOutput:
    sampled_rows: list[int]         # rows of the micro-batch (after the step's changes) whose next token is drawn now
    logits: torch.Tensor | None     # [len(sampled_rows), vocab], on this rank's device
    # Rows keeping prompt logits: (row, first position p, logits [count, vocab]); the logits at
    # position p + i give the distribution of prompt token p + i + 1.
    prompt_logits: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    micro_batch: int = 0
    # Under pipeline parallelism, a step whose sampled rows are all argmax-only: the last stage's
    # greedy token per sampled row (-1: non-finite logits) in place of the logits, on rank 0.
    tokens: list[int] | None = None
    # Under pipeline parallelism, on rank 0: the logits are still in later stages. `collect()`
    # waits for them (every other rank's output is complete when the step returns).
    _pending: tuple | None = None

    def collect(self) -> StepOutput:
        """This output with its logits: on rank 0 of a pipeline, received from the last stage
        (raising the step's failure); otherwise itself."""
        if self._pending is None:
            return self
        pipeline, launched, keep, prompt_rows, sliced = self._pending
        self._pending = None
        out = pipeline.collect(launched)
        if out is None:
            return self
        if launched.argmax:
            tokens = out.tolist()[:len(self.sampled_rows)]
            return StepOutput(self.sampled_rows, None, micro_batch=self.micro_batch, tokens=tokens)
        return _sliced_output(self, out[0] if sliced else out[0, keep], prompt_rows)


class RunningBatch:
    """The running rows and the key/value pool (allocated by `allocate_pool` once its size is known).

    The rows are held in `micro_batches` lists (one but under pipeline parallelism, where each
    stage can work on another micro-batch, engine/pipeline.py); a step runs one micro-batch. The
    micro-batches share the pool: a step's placements may move the run of a row of any of them
    (every rank applies the steps in one order, so a run moves after its last step is computed)."""

    def __init__(self, module: nn.Module, device: torch.device, max_len: int, pipeline: Pipeline | None = None,
                 micro_batches: int = 1):
        self.module = module
        self.pipeline = pipeline
        self.device = device
        self.max_len = max_len
        self.micro: list[list[Row]] = [[] for _ in range(micro_batches)]
        self.pool: KVPool | None = None
        self.unsupported = kv_cache.install(module)
        params = inspect.signature(module.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params

    @torch.no_grad()
    def probe(self, tokens: int) -> int:
        """Run one prompt chunk of `tokens` tokens through the model without storing anything, and
        return what one token costs in this rank's pool (bytes over every layer). Every rank runs
        it at the same point (its collectives are the forward pass's); it also reaches the
        activation peak of the largest step before the pool is sized."""
        probe = ShapeProbe()
        ids = torch.zeros(1, tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(tokens, device=self.device)[None]
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with kv_cache.active_step(probe):
            if self.pipeline is not None:   # this stage alone, on zeros: no hand-over
                self.pipeline.forward(ids, positions, kwargs.get("logits_to_keep"), communicate=False)
            else:
                self.module(input_ids=ids, position_ids=positions, use_cache=False, **kwargs)
        if not probe.layers:
            raise RuntimeError("the model's attention never ran through dscluster's attention function")
        return probe.bytes_per_token()

    def allocate_pool(self, num_blocks: int, block_size: int) -> None:
        self.pool = KVPool(self.device, num_blocks, block_size)

    @property
    def rows(self) -> list[Row]:
        """Every running row, of every micro-batch."""
        return [row for rows in self.micro for row in rows]

    def rows_after(self, plan: StepPlan) -> int:
        """How many rows the plan's micro-batch holds once `plan` is applied (known before anything
        can fail): what the next header for that micro-batch is sized by. If the plan does not fit
        the micro-batch, the step fails and it then holds only the plan's joins."""
        rows = self.micro[plan.micro_batch] if 0 <= plan.micro_batch < len(self.micro) else None
        if rows is None or len(plan.actions) != len(rows):
            return len(plan.joins)
        return len(rows) - sum(1 for a in plan.actions if a == LEAVE) + len(plan.joins)

    def reset(self) -> None:
        """Drop every row (after a failed step, on every rank together); rank 0 frees their blocks."""
        for rows in self.micro:
            rows.clear()

    @torch.no_grad()
    def step(self, plan: StepPlan) -> StepOutput:
        if not 0 <= plan.micro_batch < len(self.micro):
            raise ValueError(f"step plan for micro-batch {plan.micro_batch} of {len(self.micro)}")
        rows = self.micro[plan.micro_batch]
        if len(plan.actions) != len(rows):
            raise ValueError(f"step plan has {len(plan.actions)} actions for {len(rows)} rows")
        if self.unsupported and (rows or plan.joins):
            raise RuntimeError(f"generation is not supported for this model: {self.unsupported}")
        if self.pool is None and (rows or plan.joins):
            raise RuntimeError("the key/value pool is not allocated")
        # What each surviving row computes, keyed by the row object.
        feed: dict[int, int] = {}
        chunk: dict[int, int] = {}
        for row, action in zip(rows, plan.actions, strict=True):
            if action >= 0:
                if row.prefilling:
                    raise ValueError(f"request {row.request_id}: a token fed before its prompt is done")
                feed[id(row)] = action
            elif action != LEAVE:
                n = prefill_count(action)
                if n and (not row.prefilling or row.computed + n > len(row.prompt)):
                    raise ValueError(f"request {row.request_id}: a prompt chunk of {n} past its prompt")
                chunk[id(row)] = n
        rows[:] = [row for row, action in zip(rows, plan.actions) if action != LEAVE]
        size = self.pool.block_size if self.pool is not None else 1
        by_id = {row.request_id: row for row in self.rows}
        for request_id, start, length in plan.placements:
            row = by_id[request_id]
            if start != row.start:
                self.pool.copy_blocks(row.start, start, min(-(-row.computed // size), length))
            row.start, row.blocks = start, length
        for join in plan.joins:
            row = Row(join.request_id, tuple(join.prompt_ids), computed=join.cached,
                      prompt_logits=join.params.prompt_logprobs is not None, start=join.start, blocks=join.blocks,
                      argmax_only=join.argmax_only)
            if not 0 < len(row.prompt) <= self.max_len or join.cached + join.first_chunk > len(row.prompt) \
                    or join.cached >= len(row.prompt):
                raise ValueError(f"request {join.request_id}: a prompt of {len(row.prompt)} tokens "
                                 f"(limit {self.max_len}), {join.cached} cached, first chunk {join.first_chunk}")
            for src, dst, count in join.copies:
                self.pool.copy_blocks(src, dst, count)
            rows.append(row)
            chunk[id(row)] = join.first_chunk
        if not rows:
            return StepOutput([], None, micro_batch=plan.micro_batch)
        return self._forward(rows, feed, chunk, plan.micro_batch)

    def _forward(self, rows: list[Row], feed: dict[int, int], chunk: dict[int, int], micro_batch: int) -> StepOutput:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []                              # each token's slot in the pool
        spans: list[tuple[int, int, int, int]] = []        # packed start, count, base slot, first position
        sampled_rows: list[int] = []
        argmax = self.pipeline is not None and self._logits_to_keep   # every sampled row argmax-only
        keep: list[int] = []                              # packed index of each sampled row's last token
        prompt_keep: list[int] = []                       # packed indices of prompt positions kept
        prompt_rows: list[tuple[int, int, int]] = []      # row, first position, count
        size = self.pool.block_size
        for r, row in enumerate(rows):
            start, first = len(ids), row.computed
            if id(row) in feed:
                new = [feed[id(row)]]
            else:
                n = chunk.get(id(row), 0)
                new = list(row.prompt[first:first + n])
            if not new:
                continue
            count = len(new)
            if first + count > self.max_len:
                raise ValueError(f"request {row.request_id} would pass {self.max_len} tokens")
            if first + count > row.blocks * size or row.start + row.blocks > self.pool.num_blocks:
                raise ValueError(f"request {row.request_id}: {first + count} positions in a run of "
                                 f"{row.blocks} blocks at block {row.start}")
            base = row.start * size
            ids += new
            positions += range(first, first + count)
            slots += range(base + first, base + first + count)
            spans.append((start, count, base, first))
            row.computed = first + count
            if row.prompt_logits and id(row) in chunk:
                scored = min(count, len(row.prompt) - 1 - first)  # the last prompt position is sampled
                if scored > 0:
                    prompt_rows.append((r, first, scored))
                    prompt_keep += range(start, start + scored)
            if not row.prefilling:
                sampled_rows.append(r)
                keep.append(len(ids) - 1)
                argmax = argmax and row.argmax_only
        if not ids:
            return StepOutput([], None, micro_batch=micro_batch)
        # At least one row of logits: a step that samples nothing (prompt chunks only) still runs
        # the last projection the same way on every rank.
        wanted = (keep + prompt_keep) or [len(ids) - 1]
        # Every index the step needs goes to the device in one copy (on a GPU each copy is a
        # transfer of its own), then is cut into views.
        lists = (ids, positions, slots, wanted)
        packed = torch.tensor([v for values in lists for v in values], dtype=torch.long).to(self.device)
        ids_t, pos_t, slots_t, wanted_t = packed.split([len(v) for v in lists])
        layout = StepLayout(pool=self.pool, token_slots=slots_t, rows=spans)
        kwargs = {"logits_to_keep": wanted_t} if self._logits_to_keep else {}
        output = StepOutput(sampled_rows, None, micro_batch=micro_batch)
        with kv_cache.active_step(layout):
            if self.pipeline is not None:       # this stage, handed on; rank 0 collects the logits later
                launched = self.pipeline.launch(ids_t[None], pos_t[None], kwargs.get("logits_to_keep"),
                                                argmax=argmax and not prompt_keep)
                output._pending = (self.pipeline, launched, wanted_t, prompt_rows, self._logits_to_keep)
                return output if self.pipeline.collects_logits else output.collect()
            out = self.module(input_ids=ids_t[None], position_ids=pos_t[None], use_cache=False, **kwargs).logits
        return _sliced_output(output, out[0] if self._logits_to_keep else out[0, wanted_t], prompt_rows)


def _sliced_output(output: StepOutput, logits: torch.Tensor, prompt_rows: list[tuple[int, int, int]]) -> StepOutput:
    """The step's output with its kept logits [sampled rows, then prompt positions kept, vocab] cut
    into the sampled rows' logits and each prompt-logprobs row's."""
    sampled = len(output.sampled_rows)
    scored, at = [], sampled
    for r, first, count in prompt_rows:
        scored.append((r, first, logits[at:at + count]))
        at += count
    return StepOutput(output.sampled_rows, logits[:sampled] if sampled else None, scored, output.micro_batch)

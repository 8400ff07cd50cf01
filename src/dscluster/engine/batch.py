"""Every rank: the running generation batch (its rows and their key/value cache) and one step.

Every rank holds a `RunningBatch` and applies the same `StepPlan`s in the same order, so the rows,
the cache's shape and every forward pass's inputs are identical on all ranks, as a split model
needs (tensor parallel and ZeRO-3 collectives run inside the forward pass). Applying a plan:

1. each current row's action is read: a token to feed, a prompt chunk to compute, wait, or leave;
2. leaving rows go, highest index first, each replaced by the last row (one row of cache copied);
3. joining rows are appended;
4. the step's new tokens (one per decoding row, a chunk per prefilling row) go through the model as
   one packed sequence; the logits come back for the rows whose next token is sampled now (every
   decoding row, and a prefilling row whose chunk ends its prompt), and, for a request that asked
   for prompt logprobs, at every position of its chunk (they score the prompt's next tokens). So
   prompt logprobs come from the same chunked prefill, one chunk per step, never a separate pass;
   and since a row's `prompt_logprobs` travels in its join, every rank keeps the same positions
   through the split last projection.

Only rank 0 looks at the logits; the other ranks compute them too because the last projection
is split (and gathered) like every other layer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from dscluster.engine import kv_cache
from dscluster.engine.kv_cache import KVCache, StepLayout
from dscluster.engine.protocol import LEAVE, StepPlan, prefill_count


@dataclass
class Row:
    request_id: int
    prompt: tuple[int, ...]
    computed: int = 0               # positions whose keys and values are in the cache
    prompt_logits: bool = False     # keep the logits of every prompt position (prompt logprobs)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


@dataclass
class StepOutput:
    sampled_rows: list[int]         # rows (after the step's changes) whose next token is drawn now
    logits: torch.Tensor | None     # [len(sampled_rows), vocab], on this rank's device
    # Rows keeping prompt logits: (row, first position p, logits [count, vocab]); the logits at
    # position p + i give the distribution of prompt token p + i + 1.
    prompt_logits: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)


class RunningBatch:
    def __init__(self, module: nn.Module, device: torch.device, max_rows: int, max_len: int):
        self.module = module
        self.device = device
        self.max_len = max_len
        self.rows: list[Row] = []
        self.cache = KVCache(device, max_rows, max_len)
        self.unsupported = kv_cache.install(module)
        params = inspect.signature(module.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params

    def rows_after(self, plan: StepPlan) -> int:
        """How many rows the batch holds once `plan` is applied (known before anything can fail)."""
        return len(self.rows) - sum(1 for a in plan.actions if a == LEAVE) + len(plan.joins)

    def reset(self) -> None:
        """Drop every row and free the cache (after a failed step, on every rank together)."""
        self.rows.clear()
        self.cache.clear()

    def used_positions(self) -> int:
        return sum(row.computed for row in self.rows)

    @torch.no_grad()
    def step(self, plan: StepPlan) -> StepOutput:
        if len(plan.actions) != len(self.rows):
            raise ValueError(f"step plan has {len(plan.actions)} actions for {len(self.rows)} rows")
        if self.unsupported and (self.rows or plan.joins):
            raise RuntimeError(f"generation is not supported for this model: {self.unsupported}")
        # What each surviving row computes, keyed by the row object (rows move when others leave).
        feed: dict[int, int] = {}
        chunk: dict[int, int] = {}
        for row, action in zip(self.rows, plan.actions, strict=True):
            if action >= 0:
                if row.prefilling:
                    raise ValueError(f"request {row.request_id}: a token fed before its prompt is done")
                feed[id(row)] = action
            elif action != LEAVE:
                n = prefill_count(action)
                if n and (not row.prefilling or row.computed + n > len(row.prompt)):
                    raise ValueError(f"request {row.request_id}: a prompt chunk of {n} past its prompt")
                chunk[id(row)] = n
        leaving = [i for i, action in enumerate(plan.actions) if action == LEAVE]
        for i in reversed(leaving):
            last = len(self.rows) - 1
            if i != last:
                self.cache.move_row(last, i, self.rows[last].computed)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        for join in plan.joins:
            row = Row(join.request_id, tuple(join.prompt_ids),
                      prompt_logits=join.params.prompt_logprobs is not None)
            if not 0 < len(row.prompt) <= self.max_len or join.first_chunk > len(row.prompt):
                raise ValueError(f"request {join.request_id}: a prompt of {len(row.prompt)} tokens "
                                 f"(limit {self.max_len}), first chunk {join.first_chunk}")
            self.rows.append(row)
            chunk[id(row)] = join.first_chunk
        if not self.rows:
            self.cache.clear()
            return StepOutput([], None)
        return self._forward(feed, chunk)

    def _forward(self, feed: dict[int, int], chunk: dict[int, int]) -> StepOutput:
        ids: list[int] = []
        rows: list[int] = []
        positions: list[int] = []
        singles: list[tuple[int, int, int]] = []        # packed index, row, position
        chunks: list[tuple[int, int, int, int]] = []     # row, packed start, count, first position
        sampled_rows: list[int] = []
        keep: list[int] = []                              # packed index of each sampled row's last token
        prompt_keep: list[int] = []                       # packed indices of prompt positions kept
        prompt_rows: list[tuple[int, int, int]] = []      # row, first position, count
        longest = 0
        for r, row in enumerate(self.rows):
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
            ids += new
            rows += [r] * count
            positions += range(first, first + count)
            if count == 1:
                singles.append((start, r, first))
            else:
                chunks.append((r, start, count, first))
            row.computed = first + count
            longest = max(longest, row.computed)
            if row.prompt_logits and id(row) in chunk:
                scored = min(count, len(row.prompt) - 1 - first)  # the last prompt position is sampled
                if scored > 0:
                    prompt_rows.append((r, first, scored))
                    prompt_keep += range(start, start + scored)
            if not row.prefilling:
                sampled_rows.append(r)
                keep.append(len(ids) - 1)
        if not ids:
            return StepOutput([], None)
        self.cache.reserve(len(self.rows), longest)
        # At least one row of logits: a step that samples nothing (prompt chunks only) still runs
        # the last projection the same way on every rank.
        wanted = (keep + prompt_keep) or [len(ids) - 1]
        # Every index the step needs goes to the device in one copy (on a GPU each copy is a
        # transfer of its own), then is cut into views.
        lists = (ids, positions, rows, [s[0] for s in singles], [s[1] for s in singles], [s[2] for s in singles],
                 wanted)
        packed = torch.tensor([v for values in lists for v in values], dtype=torch.long).to(self.device)
        ids_t, pos_t, rows_t, single_index, single_rows, single_pos, wanted_t = packed.split([len(v) for v in lists])
        layout = StepLayout(
            cache=self.cache, token_rows=rows_t, token_pos=pos_t, single_index=single_index,
            single_rows=single_rows, single_pos=single_pos,
            single_span=max((s[1] for s in singles), default=-1) + 1,
            single_longest=max((s[2] for s in singles), default=0) + 1, chunks=chunks)
        kwargs = {"logits_to_keep": wanted_t} if self._logits_to_keep else {}
        with kv_cache.active_step(layout):
            out = self.module(input_ids=ids_t[None], position_ids=pos_t[None], use_cache=False, **kwargs)
        logits = out.logits[0] if self._logits_to_keep else out.logits[0, wanted_t]
        scored, at = [], len(keep)
        for r, first, count in prompt_rows:
            scored.append((r, first, logits[at:at + count]))
            at += count
        return StepOutput(sampled_rows, logits[:len(keep)] if keep else None, scored)

"""Rank 0 only: which requests wait and run, and the plan of every generation step.

Before a step is sent, `schedule` decides, within the user's limits (`--max-num-seqs` rows,
`--max-num-batched-tokens` tokens per step):

- running requests that ended (finished, failed, cancelled) leave;
- every decoding request computes one token: the one sampled for it at the previous step;
- waiting requests join, oldest first, while there are rows and tokens left;
- the tokens left go to prompts, the fewest tokens left first: a long prompt is computed in chunks
  over several steps, so it never stalls the decoding requests, and a short request that arrives
  behind it is not kept waiting by it either;
- prompts first: when requests whose whole prompt fits in one step wait, the step computes those
  prompts alone, and every running row waits (its next token stays due). A newcomer's first
  token then costs the step in flight plus a step of its own prompt, not a step shared with every
  decoding row (on a CPU a step costs about the sum of its tokens, so that shared step is several
  times an idle one). Running rows never wait two steps in a row, so a stream of newcomers cannot
  stall them: at worst every other step is theirs.

Memory (engine/kv_blocks.py holds the accounting of the key/value pool's blocks):

- a waiting request joins only when a run of blocks for its whole prompt (and one token) is free;
  while the pool has room its run also covers the tokens it may generate. Its longest cached
  prefix (full blocks, keyed by a hash chain) is taken from the prefix cache and not computed
  again, unless it asked for prompt logprobs (those need every position's logits). A request
  whose next uncached block is being computed right now by a running request waits for it
  rather than computing it too (requests arriving together with one system prompt compute it once);
- a decoding request whose run is full grows it (in place, or moved and copied); when the pool has
  no room, spare blocks are taken back from every run, then the runs are packed, and only then the
  most recently joined request is preempted: its blocks are freed and it goes back to the front
  of the queue, to be recomputed (its prompt and the tokens it already produced, as one prompt)
  when it joins again. Its sampler keeps its state, so its stream goes on with exactly the tokens
  it would have had;
- after every step, the blocks that became full are registered in the prefix cache.

After the step's forward pass, `after_step` scores the prompt chunks of requests that asked for
prompt logprobs, samples every row that is due a token, checks stop tokens and lengths, and hands
each token to the request's sink (a request with a grammar, engine/grammar.py, is sampled under its
mask, and ends with `stop` once its grammar allows nothing more). A request with max_tokens 0 (its prompt's logprobs only) ends
when its prompt is computed, without a token drawn. All of this is rank-0-only work
between two broadcasts: whatever fails in it for one request (its sampling, its sink) ends that
request with the error, and the step goes on for the others.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

from dscluster.engine.api import (
    FinishReason,
    GenerationLimits,
    GenerationRequest,
    GenerationResult,
    GenerationSink,
    GenerationStats,
    TokenLogprobs,
)
from dscluster.engine.batch import RunningBatch, StepOutput
from dscluster.engine.kv_blocks import ROOT_KEY, BlockPool, block_key
from dscluster.engine.protocol import LEAVE, WAIT, Join, StepPlan, prefill
from dscluster.engine.sampling import NON_FINITE, RequestSampler, sample, token_logprobs

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    id: int
    request: GenerationRequest
    sink: GenerationSink
    sampler: RequestSampler
    stops: frozenset[int]
    arrived: float = field(default_factory=time.monotonic)
    next_token: int | None = None       # sampled at the last step, fed at the next
    done: bool = False
    logprobs: list[TokenLogprobs] = field(default_factory=list)          # per generated token, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None          # per prompt token, when asked
    prompt_done: bool = False           # its prompt is computed (its prompt logprobs delivered)
    joined_at: float | None = None
    keys: list[int] = field(default_factory=list)   # prefix-cache keys of its full blocks so far
    registered: int = 0                 # its run's first blocks already in the prefix cache
    pending: list[int] = field(default_factory=list)  # keys of prompt blocks it is computing now
    preemptions: int = 0

    @property
    def output(self) -> list[int]:
        return self.sampler.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """Its tokens at positions [start, end): the prompt, then what it generated."""
        prompt = self.request.prompt_ids
        part = list(prompt[start:end])
        if end > len(prompt):
            part += self.output[max(0, start - len(prompt)):end - len(prompt)]
        return part

    def block_keys(self, count: int, size: int) -> list[int]:
        """The keys of its first `count` full blocks (a hash chain over its tokens)."""
        while len(self.keys) < count:
            i = len(self.keys)
            self.keys.append(block_key(self.keys[-1] if i else ROOT_KEY, self.tokens(i * size, (i + 1) * size)))
        return self.keys[:count]


class Scheduler:
    def __init__(self, batch: RunningBatch, limits: GenerationLimits, eos_ids: tuple[int, ...],
                 pool: BlockPool, block_bytes: int = 0):
        self.batch = batch
        self.limits = limits
        self.max_model_len = limits.max_model_len
        self.eos_ids = eos_ids
        self.pool = pool
        self.block_size = self.pool.block_size
        self.block_bytes = block_bytes
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}    # by request id: every request that holds a row
        self.pending: dict[int, int] = {}        # prompt block key -> request computing it now
        self._ids = itertools.count()
        self._planning = 0                       # the micro-batch being planned
        self._row_cap = limits.max_num_seqs      # and the rows it may hold
        self.last_step = (0, 0)                  # rows and tokens of the last step
        # per micro-batch: its last step was prompts only (its running rows waited)
        self._rows_waited = [False] * len(batch.micro)
        self.preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- requests ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: GenerationSink) -> None:
        prompt, params = request.prompt_ids, request.params
        if not prompt or params.max_tokens < 0 or len(prompt) + params.max_tokens > self.max_model_len:
            _safe(sink.on_error, ValueError(
                f"a prompt of {len(prompt)} tokens with max_tokens {params.max_tokens} does not fit "
                f"--max-model-len {self.max_model_len}"))
            return
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        req = Request(next(self._ids), request, sink, RequestSampler(params, prompt, stops, request.grammar), stops)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            self._finish(req, "length")         # nothing to compute
            return
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or any(self.batch.micro))

    def has_work_for(self, micro_batch: int) -> bool:
        """A step of this micro-batch would do something: it has rows, or requests wait to join."""
        return bool(self.waiting or self.batch.micro[micro_batch])

    def stats(self) -> GenerationStats:
        rows, tokens = self.last_step
        pool, size = self.pool, self.block_size
        used = sum(-(-row.computed // size) for row in list(self.batch.rows))
        return GenerationStats(waiting=len(self.waiting), running=len(self.running), step_rows=rows,
                               step_tokens=tokens, kv_bytes=pool.num_blocks * self.block_bytes,
                               kv_used_bytes=used * self.block_bytes, kv_usage=used / pool.num_blocks,
                               block_size=size, num_blocks=pool.num_blocks, prefix_caching=pool.prefix_caching,
                               preemptions=self.preemptions, prefix_queries=self.prefix_queries,
                               prefix_hits=self.prefix_hits)

    # -- before the step ----------------------------------------------------------------------
    def schedule(self, micro_batch: int = 0) -> StepPlan:
        """The next step of `micro_batch` (of the batch's micro-batches, engine/batch.py: one but
        under pipeline parallelism, where the others may be in flight meanwhile). Newcomers join
        the micro-batch planned; its share of --max-num-seqs, and of the requests there are, keeps
        the micro-batches even."""
        self._planning = micro_batch
        count, limit = len(self.batch.micro), self.limits.max_num_seqs
        # With several micro-batches, each takes its share of --max-num-seqs and of the requests
        # there are (running and waiting), so that they fill evenly.
        self._row_cap = limit if count == 1 else \
            min(-(-limit // count), -(-(len(self.running) + len(self.waiting)) // count))
        batch_rows = self.batch.micro[micro_batch]
        actions: list[int | None] = []
        for row in batch_rows:
            req = self.running[row.request_id]
            if not req.done and _cancelled(req):
                self._finish(req, "cancelled")
            if req.done:
                actions.append(LEAVE)
                self._release(req)
            elif row.prefilling:
                actions.append(None)                 # a prompt chunk, decided below
            else:
                actions.append(req.next_token)
        placements: list[tuple[int, int, int]] = []
        rows = sum(1 for a in actions if a != LEAVE)
        if rows and not self._rows_waited[micro_batch]:
            plan = self._prompts_first(actions, rows, placements)
            if plan is not None:
                return plan
        self._rows_waited[micro_batch] = False
        for i, row in enumerate(batch_rows):
            if actions[i] is not None and actions[i] >= 0:
                self._room_for(row, row.computed + 1, actions, placements)
        # One token per decoding row (those preempted just now compute nothing).
        budget = self.limits.max_num_batched_tokens - sum(1 for a in actions if a is not None and a >= 0)
        rows = sum(1 for a in actions if a != LEAVE)
        joining: list[tuple[Request, Join]] = []
        kept: deque[Request] = deque()
        while self.waiting and budget > 0 and self._row_free(rows):
            req = self.waiting.popleft()
            if _cancelled(req):
                self._finish(req, "cancelled")
                continue
            verdict = self._admit(req, None, placements)
            if verdict == "later":
                kept.append(req)
                continue
            if verdict is None:
                self.waiting.appendleft(req)
                break
            joining.append((req, verdict))
            rows += 1
        self.waiting.extendleft(reversed(kept))
        # Prompt tokens go to the prompts with the fewest tokens left first (oldest first among
        # equals): a short request that arrives behind a long prompt gets its first token at the
        # next step, and the long prompt takes the rest of every step until it is done.
        wanted = [(len(row.prompt) - row.computed, self.running[row.request_id].arrived, i)
                  for i, (row, action) in enumerate(zip(batch_rows, actions)) if action is None]
        wanted += [(len(join.prompt_ids) - join.cached, req.arrived, -1 - j)
                   for j, (req, join) in enumerate(joining)]
        chunks: dict[int, int] = {}
        for left, _, key in sorted(wanted):
            chunks[key] = n = min(budget, left)
            budget -= n
        for i, action in enumerate(actions):
            if action is None:
                actions[i] = prefill(chunks[i])
        joins = [replace(join, first_chunk=chunks[-1 - j]) for j, (_, join) in enumerate(joining)]
        self.last_step = (rows, self.limits.max_num_batched_tokens - budget)
        return StepPlan(actions=actions, joins=joins, placements=placements, micro_batch=micro_batch)

    def _row_free(self, rows: int) -> bool:
        """Room for one more row in the micro-batch planned, which holds `rows`: within
        --max-num-seqs over all micro-batches, and within the micro-batch's share (`_row_cap`)."""
        return len(self.running) < self.limits.max_num_seqs and rows < self._row_cap

    def _prompts_first(self, actions: list[int | None], rows: int,
                       placements: list[tuple[int, int, int]]) -> StepPlan | None:
        """A step of newcomers' whole prompts alone (those that fit in one step, oldest first),
        every running row waiting; None when no waiting request's prompt fits."""
        limit = self.limits.max_num_batched_tokens
        budget = limit
        joins: list[Join] = []
        kept: deque[Request] = deque()
        while self.waiting:
            req = self.waiting.popleft()
            if _cancelled(req):
                self._finish(req, "cancelled")
                continue
            join = self._admit(req, budget, placements) if self._row_free(rows) else None
            if isinstance(join, Join):
                joins.append(join)
                budget -= join.first_chunk
                rows += 1
            else:
                kept.append(req)
        self.waiting = kept
        if not joins:
            return None
        self._rows_waited[self._planning] = True
        self.last_step = (rows, limit - budget)
        return StepPlan(actions=[LEAVE if a == LEAVE else WAIT for a in actions], joins=joins,
                        placements=placements, micro_batch=self._planning)

    # -- the pool -------------------------------------------------------------------------------
    def _admit(self, req: Request, whole_within: int | None,
               placements: list[tuple[int, int, int]]) -> Join | str | None:
        """A place in the pool for a waiting request: its Join (first chunk: its whole uncached
        prompt), "later" when a running request is computing its prompt's next block right now,
        or None when the pool has no room (or, with `whole_within`, its prompt does not fit that
        many tokens)."""
        size, params = self.block_size, req.request.params
        prompt = tuple(req.request.prompt_ids) + tuple(req.output)   # a preempted request: its tokens so far
        wants_logprobs = params.prompt_logprobs is not None and not req.prompt_done
        keys = req.block_keys((len(prompt) - 1) // size, size)         # the last token is always computed
        hits = [] if wants_logprobs else self.pool.lookup(keys, prompt)
        if self.pool.prefix_caching and not wants_logprobs and len(hits) < len(keys) \
                and self.pending.get(keys[len(hits)], req.id) != req.id:
            return "later"
        cached = len(hits) * size
        if whole_within is not None and len(prompt) - cached > whole_within:
            return None
        minimum = -(-(len(prompt) + 1) // size)
        life = -(-min(len(req.request.prompt_ids) + params.max_tokens, self.max_model_len) // size)
        placement = self.pool.place(req.id, max(life, minimum), minimum, hits)
        # Room made for a newcomer leaves a block of growth for every running request.
        if placement is None and self._free_up(minimum, placements, reserve=len(self.running)):
            placement = self.pool.place(req.id, max(life, minimum), minimum,
                                        self.pool.lookup(keys, prompt) if hits else [])
        if placement is None:
            return None
        if self.pool.prefix_caching and not wants_logprobs:
            self.prefix_queries += len(prompt)
            self.prefix_hits += placement.cached_blocks * size
        cached = placement.cached_blocks * size
        req.registered = placement.cached_blocks
        req.pending = [k for k in keys[placement.cached_blocks:] if k not in self.pending]
        for key in req.pending:
            self.pending[key] = req.id
        req.joined_at = time.monotonic()
        self.running[req.id] = req
        join_params = params if wants_logprobs or params.prompt_logprobs is None else \
            replace(params, prompt_logprobs=None)
        argmax_only = req.sampler.argmax_only and join_params.prompt_logprobs is None
        return Join(req.id, prompt, len(prompt) - cached, join_params, start=placement.start,
                    blocks=placement.length, cached=cached, copies=tuple(placement.copies),
                    argmax_only=argmax_only)

    def _room_for(self, row, positions: int, actions: list[int | None],
                  placements: list[tuple[int, int, int]]) -> bool:
        """Make the row's run hold `positions` positions: grow it; else take back spare blocks, pack
        the runs (this one last, so it can grow in place) and grow it; else preempt the most
        recently joined request and try again. False if the row itself was preempted."""
        blocks = -(-positions // self.block_size)
        freed = False
        while True:
            req = self.running.get(row.request_id)
            if req is None:
                return False                           # preempted to make room
            run = self.pool.runs[req.id]
            if run.length >= blocks:
                return True
            moved = self.pool.grow(req.id, blocks)
            if moved is not None:
                placements.append((req.id, *moved))
                return True
            if not freed and self._free_up(blocks - run.length, placements, last=req.id):
                freed = True
                continue
            self._preempt(self._latest_running(), actions, placements)
            freed = False

    def _free_up(self, blocks: int, placements: list[tuple[int, int, int]], last: int | None = None,
                 reserve: int = 0) -> bool:
        """Room for `blocks` more blocks without preempting anyone: every run gives back its spare
        blocks, then the runs are packed towards the start of the pool (`last`'s run placed last,
        so it can grow in place), leaving every free block in one stretch. False, with nothing
        changed, when even that would not leave `blocks` + `reserve` free blocks."""
        needed = {req_id: self._needed_now(row) for row in self.batch.rows
                  if (req_id := row.request_id) in self.running}
        spare = sum(self.pool.runs[i].length - n for i, n in needed.items())
        if self.pool.free_blocks() + spare < blocks + reserve:
            return False
        for request_id, n in needed.items():
            run = self.pool.runs[request_id]
            if run.length > n:
                self.pool.trim(request_id, n)
                placements.append((request_id, run.start, run.length))
        for request_id, start in self.pool.compact(last=last):
            placements.append((request_id, start, self.pool.runs[request_id].length))
        return True

    def _needed_now(self, row) -> int:
        """Blocks a running row needs for this step: its whole prompt (and its first token) while
        prefilling, else its tokens so far and the one computed now."""
        size = self.block_size
        if row.prefilling:
            return -(-(len(row.prompt) + 1) // size)
        return -(-(row.computed + 1) // size)

    def _latest_running(self) -> Request:
        """The most recently joined request of the micro-batch planned (a request of another
        micro-batch cannot leave in this step's plan)."""
        others = {row.request_id for m, rows in enumerate(self.batch.micro) if m != self._planning for row in rows}
        return max((r for r in self.running.values() if r.id not in others), key=lambda r: (r.joined_at or 0.0, r.id))

    def _preempt(self, req: Request, actions: list[int | None], placements: list[tuple[int, int, int]]) -> None:
        """Send a running request back to the front of the queue: its blocks are freed and it is
        recomputed when it joins again. A request that has not joined yet this step just goes back."""
        log.info("request %d preempted: the key/value pool is full", req.id)
        self.preemptions += 1
        req.preemptions += 1
        for i, row in enumerate(self.batch.micro[self._planning]):
            if row.request_id == req.id:
                actions[i] = LEAVE
        placements[:] = [p for p in placements if p[0] != req.id]
        self._release(req)
        req.next_token = None
        if not req.prompt_done and req.prompt_logprobs is not None:
            req.prompt_logprobs = [None]      # scored again from the start
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        """The request's row leaves: its blocks go back to the pool (full ones stay cached)."""
        self.running.pop(req.id, None)
        self.pool.free(req.id)
        for key in req.pending:
            if self.pending.get(key) == req.id:
                del self.pending[key]
        req.pending = []

    def _register_full_blocks(self) -> None:
        """After a step: every block that became full is keyed in the prefix cache."""
        size = self.block_size
        for row in self.batch.rows:
            req = self.running.get(row.request_id)
            full = row.computed // size
            if req is None or full <= req.registered:
                continue
            keys = req.block_keys(full, size)
            run = self.pool.runs[req.id]
            for i in range(req.registered, full):
                self.pool.register(run.start + i, keys[i], keys[i - 1] if i else ROOT_KEY,
                                   req.tokens(i * size, (i + 1) * size))
                if self.pending.get(keys[i]) == req.id:
                    del self.pending[keys[i]]
            req.registered = full

    # -- after the step -----------------------------------------------------------------------
    def after_step(self, out: StepOutput) -> None:
        self._register_full_blocks()
        batch_rows = self.batch.micro[out.micro_batch]
        for r, first, logits in out.prompt_logits:
            self._score_prompt(self.running[batch_rows[r].request_id], first, logits)
        if out.logits is None and out.tokens is None:
            return
        rows, reqs = [], []
        for i, r in enumerate(out.sampled_rows):
            req = self.running[batch_rows[r].request_id]
            if not req.prompt_done:
                self._prompt_done(req)
            if not req.done:
                rows.append(i)
                reqs.append(req)
        if not reqs:
            return
        if out.tokens is not None:      # the last pipeline stage drew them: argmax-only rows
            for i, req in zip(rows, reqs, strict=True):
                if out.tokens[i] < 0:
                    self._fail(req, FloatingPointError(NON_FINITE))
                else:
                    self._take(req, out.tokens[i])
            return
        logits = out.logits if len(rows) == len(out.sampled_rows) else out.logits[rows]
        for req, drawn in zip(reqs, sample(logits, [r.sampler for r in reqs]), strict=True):
            if drawn.error is not None:
                self._fail(req, drawn.error)
                continue
            self._take(req, drawn.token, drawn.logprobs)

    def _score_prompt(self, req: Request, first: int, logits) -> None:
        """Logprobs of prompt tokens first + 1 ... from the logits at positions first ... (rank 0
        only, after the step: a failure ends this request alone)."""
        if req.done:
            return
        try:
            following = list(req.request.prompt_ids[first + 1:first + 1 + logits.shape[0]])
            req.prompt_logprobs += token_logprobs(logits, following, req.request.params.prompt_logprobs)
        except Exception as exc:  # noqa: BLE001 - this request's problem, not the step's
            self._fail(req, exc)

    def _prompt_done(self, req: Request) -> None:
        """The whole prompt is computed: its prompt logprobs go to the sink; a request that wanted
        no tokens (max_tokens 0) ends here."""
        req.prompt_done = True
        if req.done:
            return
        if req.prompt_logprobs is not None:
            if len(req.prompt_logprobs) != len(req.request.prompt_ids):
                self._fail(req, RuntimeError(f"{len(req.prompt_logprobs)} prompt logprobs for "
                                             f"{len(req.request.prompt_ids)} prompt tokens"))
                return
            try:
                req.sink.on_prompt_logprobs(req.prompt_logprobs)
            except Exception as exc:  # noqa: BLE001 - the sink's problem: this request only
                self._fail(req, exc)
                return
        if req.request.params.max_tokens == 0:
            self._finish(req, "length")

    def _take(self, req: Request, token: int, logprobs: TokenLogprobs | None = None) -> None:
        if token in req.stops:          # a stop token ends the request and is not part of its text
            self._finish(req, "stop")
            return
        if logprobs is not None:
            req.logprobs.append(logprobs)
        try:
            req.sampler.accept(token)
            keep = req.sink.on_token(token, logprobs)
        except Exception as exc:  # noqa: BLE001 - its grammar's or its sink's problem (detokenising, a stream): this request only
            self._fail(req, exc)
            return
        if keep is False:
            self._finish(req, "cancelled")
        elif req.sampler.grammar is not None and req.sampler.grammar.complete:
            self._finish(req, "stop")           # the grammar allows nothing more: the reply is whole
        elif len(req.output) >= req.request.params.max_tokens or \
                len(req.request.prompt_ids) + len(req.output) >= self.max_model_len:
            self._finish(req, "length")
        else:
            req.next_token = token

    def fail_running(self, error: BaseException) -> None:
        """The step failed: every request in it ends with the error (their rows leave)."""
        for req in self.running.values():
            self._fail(req, error)

    def reset(self, reason: str, requeue: list[Join] | tuple = ()) -> None:
        """Every rank dropped the batch (a step failed somewhere): its requests end with `reason`,
        and the pool is emptied, its cached blocks untrusted. Requests that were joining in this
        very step (`requeue`) computed nothing yet: they go back to the front of the queue."""
        again = [self.running[j.request_id] for j in requeue if j.request_id in self.running]
        for req in list(self.running.values()):
            if req not in again:
                self._fail(req, RuntimeError(reason))
        self.running.clear()
        self.pending.clear()
        self.pool.reset()
        for req in reversed(again):
            req.pending, req.registered, req.next_token = [], 0, None
            self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.done:
            return
        req.done = True
        params = req.request.params
        result = GenerationResult(token_ids=list(req.output), finish_reason=reason,
                                  prompt_tokens=len(req.request.prompt_ids),
                                  logprobs=list(req.logprobs) if params.logprobs is not None else None,
                                  prompt_logprobs=req.prompt_logprobs, joined_at=req.joined_at)
        _safe(req.sink.on_finish, result)

    def _fail(self, req: Request, error: BaseException) -> None:
        if req.done:
            return
        req.done = True
        _safe(req.sink.on_error, error)


def _cancelled(req: Request) -> bool:
    try:
        return bool(req.sink.cancelled)
    except Exception:  # noqa: BLE001 - a sink that cannot say is treated as gone
        log.exception("request %d: sink.cancelled failed", req.id)
        return True


def _safe(call, arg) -> None:
    try:
        call(arg)
    except Exception:  # noqa: BLE001 - a sink failing at the end harms nobody else
        log.exception("a request's sink failed")

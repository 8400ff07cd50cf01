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

After the step's forward pass, `after_step` scores the prompt chunks of requests that asked for
prompt logprobs, samples every row that is due a token, checks stop tokens and lengths, and hands
each token to the request's sink. A request with max_tokens 0 (its prompt's logprobs only) ends
when its prompt is computed, without a token drawn. All of this is rank-0-only work
between two broadcasts: whatever fails in it for one request (its sampling, its sink) ends that
request with the error, and the step goes on for the others.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

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
from dscluster.engine.protocol import LEAVE, WAIT, Join, StepPlan, prefill
from dscluster.engine.sampling import RequestSampler, sample, token_logprobs

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

    @property
    def output(self) -> list[int]:
        return self.sampler.output_ids


class Scheduler:
    def __init__(self, batch: RunningBatch, limits: GenerationLimits, eos_ids: tuple[int, ...] = ()):
        self.batch = batch
        self.limits = limits
        self.max_model_len = limits.max_model_len
        self.eos_ids = eos_ids
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}    # by request id: every request that holds a row
        self._ids = itertools.count()
        self.last_step = (0, 0)                  # rows and tokens of the last step
        self._rows_waited = False                # the last step was prompts only (running rows waited)

    # -- requests ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: GenerationSink) -> None:
        prompt, params = request.prompt_ids, request.params
        if not prompt or params.max_tokens < 0 or len(prompt) + params.max_tokens > self.max_model_len:
            _safe(sink.on_error, ValueError(
                f"a prompt of {len(prompt)} tokens with max_tokens {params.max_tokens} does not fit "
                f"--max-model-len {self.max_model_len}"))
            return
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        req = Request(next(self._ids), request, sink, RequestSampler(params, prompt, stops), stops)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            self._finish(req, "length")         # nothing to compute
            return
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.batch.rows)

    def stats(self) -> GenerationStats:
        rows, tokens = self.last_step
        cache = self.batch.cache
        per_position = cache.nbytes() // max(1, cache.rows * cache.length)
        used = self.batch.used_positions()
        return GenerationStats(waiting=len(self.waiting), running=len(self.running), step_rows=rows,
                               step_tokens=tokens, kv_bytes=cache.nbytes(), kv_used_bytes=per_position * used,
                               kv_usage=used / (self.limits.max_num_seqs * self.max_model_len))

    # -- before the step ----------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.limits.max_num_batched_tokens
        actions: list[int | None] = []
        for row in self.batch.rows:
            req = self.running[row.request_id]
            if not req.done and _cancelled(req):
                self._finish(req, "cancelled")
            if req.done:
                actions.append(LEAVE)
                del self.running[req.id]
            elif row.prefilling:
                actions.append(None)                 # a prompt chunk, decided below
            else:
                actions.append(req.next_token)
                budget -= 1
        rows = sum(1 for a in actions if a != LEAVE)
        if rows and not self._rows_waited:
            plan = self._prompts_first(actions, rows)
            if plan is not None:
                return plan
        self._rows_waited = False
        joining: list[Request] = []
        while self.waiting and budget > 0 and rows < self.limits.max_num_seqs:
            req = self.waiting.popleft()
            if _cancelled(req):
                self._finish(req, "cancelled")
                continue
            joining.append(req)
            req.joined_at = time.monotonic()
            self.running[req.id] = req
            rows += 1
        # Prompt tokens go to the prompts with the fewest tokens left first (oldest first among
        # equals): a short request that arrives behind a long prompt gets its first token at the
        # next step, and the long prompt takes the rest of every step until it is done.
        wanted = [(len(row.prompt) - row.computed, self.running[row.request_id].arrived, i)
                  for i, (row, action) in enumerate(zip(self.batch.rows, actions)) if action is None]
        wanted += [(len(req.request.prompt_ids), req.arrived, -1 - j) for j, req in enumerate(joining)]
        chunks: dict[int, int] = {}
        for left, _, key in sorted(wanted):
            chunks[key] = n = min(budget, left)
            budget -= n
        for i, action in enumerate(actions):
            if action is None:
                actions[i] = prefill(chunks[i])
        joins = [Join(req.id, req.request.prompt_ids, chunks[-1 - j], req.request.params)
                 for j, req in enumerate(joining)]
        self.last_step = (rows, self.limits.max_num_batched_tokens - budget)
        return StepPlan(actions=actions, joins=joins)

    def _prompts_first(self, actions: list[int | None], rows: int) -> StepPlan | None:
        """A step of newcomers' whole prompts alone (those that fit in one step, oldest first),
        every running row waiting; None when no waiting request's prompt fits."""
        limit = self.limits.max_num_batched_tokens
        budget = limit
        joining: list[Request] = []
        kept: deque[Request] = deque()
        while self.waiting:
            req = self.waiting.popleft()
            if _cancelled(req):
                self._finish(req, "cancelled")
                continue
            size = len(req.request.prompt_ids)
            if size <= budget and rows < self.limits.max_num_seqs:
                joining.append(req)
                budget -= size
                rows += 1
            else:
                kept.append(req)
        self.waiting = kept
        if not joining:
            return None
        now = time.monotonic()
        for req in joining:
            req.joined_at = now
            self.running[req.id] = req
        self._rows_waited = True
        self.last_step = (rows, limit - budget)
        return StepPlan(actions=[LEAVE if a == LEAVE else WAIT for a in actions],
                        joins=[Join(req.id, req.request.prompt_ids, len(req.request.prompt_ids), req.request.params)
                               for req in joining])

    # -- after the step -----------------------------------------------------------------------
    def after_step(self, out: StepOutput) -> None:
        for r, first, logits in out.prompt_logits:
            self._score_prompt(self.running[self.batch.rows[r].request_id], first, logits)
        if out.logits is None:
            return
        rows, reqs = [], []
        for i, r in enumerate(out.sampled_rows):
            req = self.running[self.batch.rows[r].request_id]
            if not req.prompt_done:
                self._prompt_done(req)
            if not req.done:
                rows.append(i)
                reqs.append(req)
        if not reqs:
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
        req.sampler.accept(token)
        if logprobs is not None:
            req.logprobs.append(logprobs)
        try:
            keep = req.sink.on_token(token, logprobs)
        except Exception as exc:  # noqa: BLE001 - the sink's problem (detokenising, a stream): this request only
            self._fail(req, exc)
            return
        if keep is False:
            self._finish(req, "cancelled")
        elif len(req.output) >= req.request.params.max_tokens or \
                len(req.request.prompt_ids) + len(req.output) >= self.max_model_len:
            self._finish(req, "length")
        else:
            req.next_token = token

    def fail_running(self, error: BaseException) -> None:
        """The step failed: every request in it ends with the error (their rows leave)."""
        for req in self.running.values():
            self._fail(req, error)

    def reset(self, reason: str, keep: list[Join] | tuple = ()) -> None:
        """Every rank dropped the batch: its requests end (those not already ended, with `reason`).
        Requests joining in this very step (`keep`) start afresh in the empty batch."""
        joining = {j.request_id for j in keep}
        for req in list(self.running.values()):
            if req.id not in joining:
                self._fail(req, RuntimeError(reason))
                del self.running[req.id]

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

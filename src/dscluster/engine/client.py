"""Rank 0's handle on the group: the `Engine` (implements `dscluster.engine.api.EngineClient`).

Rank 0's `Engine` sends each unit of work over the control channel and runs it itself; every other
rank sits in `engine/worker.py`'s loop, receiving and running the same unit. The units:

- a predict batch, which ends with every rank's success flag sent to rank 0 and the count of
  failures sent back, so every rank agrees on the outcome before the next unit;
- a generation step (continuous batching): the step's plan (requests joining and leaving, the
  tokens sampled at the previous step) in one message; every rank applies it to its copy of the
  running batch and runs the forward pass. Rank 0 alone then samples and runs the requests'
  callbacks, before it sends the next step: a failure there ends one request, not the group. A
  step that raised on some rank is reported in the next message's header, and every rank drops
  the batch together (its requests fail; the group is intact);
- a heartbeat, sent by rank 0 when no other unit has gone for an interval.

Every worker reports on each message, and rank 0 reads the reports before it sends the next one
(engine/protocol.py), so rank 0 knows at every message that every rank is alive and in step. Under
pipeline parallelism up to one step per stage is in flight (`step`): their reports, and their
logits, are read in order as each step's micro-batch comes round again.

A broken group (a failed collective, a lost control connection, a silent rank) ends the process
with exit code 3 after a short grace (engine/exits.py), so launchers and Kubernetes restart the group.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque

import torch

from dscluster.cluster.group import single_rank_device
from dscluster.engine.api import (
    GenerationRequest,
    GenerationResult,
    GenerationSink,
    GenerationStats,
    TokenCallback,
)
from dscluster.engine.batch import StepOutput
from dscluster.engine.exits import EngineError, exit_group_broken, first_line
from dscluster.engine.kv_blocks import BlockPool
from dscluster.engine.loading import open_model
from dscluster.engine.options import RuntimeOptions
from dscluster.engine.parallel import choose_engine, load_split, prepare
from dscluster.engine.protocol import WAIT, Op, StepPlan
from dscluster.engine.runtime import Runtime
from dscluster.engine.scheduler import Scheduler
from dscluster.errors import PeerFailure

log = logging.getLogger(__name__)


class Engine:
    """Rank 0's handle on the group (implements `dscluster.engine.api.EngineClient`).

    Thread-safe through one lock: the batcher thread, batch mode and the heartbeat thread take turns.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.info = runtime.info()
        self.limits = runtime.limits
        self.heartbeat_interval = runtime.options.heartbeat_interval
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._last_unit = time.monotonic()
        self._closed = False
        self._alive = runtime.world_size
        # Pipeline parallelism: steps whose later stages are still computing (oldest first), one
        # per micro-batch at most; their logits are collected in order.
        self._in_flight: deque[StepOutput] = deque()
        self.most_steps_in_flight = 0   # the most at once so far (above one: micro-batches overlapped)
        self.scheduler: Scheduler | None = None
        if runtime.batch is not None and runtime.batch.pool is not None:
            pool = BlockPool(runtime.batch.pool.num_blocks, runtime.batch.pool.block_size,
                             prefix_caching=runtime.options.enable_prefix_caching)
            self.scheduler = Scheduler(runtime.batch, runtime.limits, runtime.eos_ids, pool, runtime.block_bytes)
        if runtime.channel is not None:
            threading.Thread(target=self._heartbeats, name="dscluster-heartbeat", daemon=True).start()

    # -- EngineClient ----------------------------------------------------------------------
    def ranks_alive(self) -> int:
        return 0 if self.failure else self._alive

    def predict(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        batch = torch.stack(inputs)
        with self._unit(Op.PREDICT, batch):
            out = self.runtime.run_predict(batch)
        return list(out.unbind(0))

    def submit(self, request: GenerationRequest, sink: GenerationSink) -> None:
        if self.scheduler is None or self.info.generation_unsupported:
            reason = self.info.generation_unsupported or f"{self.info.name} is not a causal language model"
            sink.on_error(RuntimeError(f"generation is not available: {reason}"))
            return
        self.scheduler.submit(request, sink)

    def has_generation_work(self) -> bool:
        return self.scheduler is not None and (self.scheduler.has_work() or bool(self._in_flight))

    def generation_stats(self) -> GenerationStats:
        return self.scheduler.stats() if self.scheduler is not None else GenerationStats()

    def step(self) -> None:
        """One generation step. Rank-0-only work (planning before, sampling and the requests'
        callbacks after) never breaks the group: a failure ends the requests it concerns.

        Under pipeline parallelism a step is launched (planned, sent, run through this rank's
        stage) and its logits collected later: up to one step per micro-batch is in flight, so
        while later stages compute one micro-batch, this rank plans and computes the next. A
        call launches a step of a micro-batch not in flight if one has work, and collects the
        oldest step when every micro-batch is in flight or none has work."""
        with self._lock:
            self._check()
            micro_batch = self._idle_micro_batch()
            launched = micro_batch is not None and self._launch(micro_batch)
            if self._in_flight and (not launched or len(self._in_flight) >= self.runtime.micro_batches):
                self._collect_oldest()

    def _idle_micro_batch(self) -> int | None:
        """The first micro-batch not in flight whose step would do something, if any."""
        busy = {out.micro_batch for out in self._in_flight}
        return next((m for m in range(self.runtime.micro_batches)
                     if m not in busy and self.scheduler.has_work_for(m)), None)

    def _launch(self, micro_batch: int) -> bool:
        """Plan, send and run this rank's part of a step of `micro_batch`. False if there was
        nothing to send while other steps are in flight."""
        scheduler = self.scheduler
        try:
            plan = scheduler.schedule(micro_batch)
        except Exception as exc:  # noqa: BLE001 - a planning bug: drop the batch on every rank
            log.exception("planning a generation step failed")
            scheduler.fail_running(exc)
            self.runtime.step_failed = True
            plan = StepPlan(actions=[WAIT] * len(self.runtime.batch.micro[micro_batch]), micro_batch=micro_batch)
        if self._in_flight and not (plan.actions or plan.joins or plan.placements):
            return False                # nothing to send for it now (requests wait for room)
        reset = self._send_step(plan)
        if reset:   # every rank drops the batch and this plan; its newcomers wait for the next
            scheduler.reset(f"a generation step failed on {reset} rank(s)", requeue=plan.joins)
            plan = StepPlan(micro_batch=micro_batch)
        try:
            out = self.runtime.run_step(plan)
        except Exception as exc:  # noqa: BLE001 - every rank drops the batch at the next message
            log.exception("generation step failed")
            self._step_failed_here(exc)
            return True
        self._in_flight.append(out)
        self.most_steps_in_flight = max(self.most_steps_in_flight, len(self._in_flight))
        return True

    def _collect_oldest(self) -> None:
        """Finish the oldest step in flight: its logits (from the last stage, under pipeline
        parallelism), then sampling and the requests' callbacks."""
        out = self._in_flight.popleft()
        try:
            out = out.collect()
        except Exception as exc:  # noqa: BLE001 - every rank drops the batch at the next message
            log.exception("generation step failed")
            self.runtime.step_failed = True
            self._step_failed_here(exc)
            return
        try:
            self.scheduler.after_step(out)
        except Exception as exc:  # noqa: BLE001 - a bug after the step: its requests end, the group goes on
            log.exception("finishing a generation step failed")
            self.scheduler.fail_running(exc)
            self.runtime.step_failed = True

    def _collect_all(self) -> None:
        """Finish every step in flight (before any message that is not a step)."""
        while self._in_flight:
            self._collect_oldest()

    def _discard_in_flight(self) -> None:
        """Every rank dropped the batch: the steps in flight are received and thrown away (their
        messages must still be read, so that the next step's pair up)."""
        while self._in_flight:
            with contextlib.suppress(Exception):
                self._in_flight.popleft().collect()

    def generate(self, requests: list[GenerationRequest], on_token: TokenCallback | None = None
                 ) -> list[GenerationResult]:
        sinks = [_CollectingSink(i, on_token) for i in range(len(requests))]
        for request, sink in zip(requests, sinks, strict=True):
            self.submit(request, sink)
        while not all(s.done for s in sinks):
            if not self.has_generation_work():
                raise EngineError("generation stopped with requests unfinished")
            self.step()
        errors = [s.error for s in sinks if s.error is not None]
        if errors:
            raise EngineError(f"generate failed: {first_line(errors[0])}") from errors[0]
        return [s.result for s in sinks]

    def heartbeat(self) -> None:
        with self._lock:
            self._check()
            self._send(Op.HEARTBEAT)

    def shutdown(self) -> None:
        """Tell every rank to exit 0. Safe to call twice, and after a failure (then it does nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.failure is None and self.runtime.channel is not None:
                with contextlib.suppress(PeerFailure):
                    self._send(Op.STOP)
            self.runtime.close()

    # -- internals -------------------------------------------------------------------------
    def _check(self) -> None:
        if self.failure is not None:
            raise PeerFailure(self.failure)
        if self._closed:
            raise PeerFailure("the engine is shut down")

    def _send(self, op: Op, payload=None, actions: list[int] | None = None, settle=None,
              why: str | None = None, micro_batch: int = 0) -> int:
        """Send a message; returns how many ranks reported a failed generation step (then every
        rank, this one included, has dropped the running batch). `settle` runs once the message
        went through, before any dropped request is ended; `why` it is sent, for the error if not.
        Any message but a step first finishes the steps in flight."""
        if op is not Op.STEP:
            self._collect_all()
        self.runtime.before_message()
        try:
            message = self.runtime.channel.send(op, payload, actions, micro_batch=micro_batch,
                                                window=self.runtime.micro_batches)
        except Exception as exc:  # noqa: BLE001 - any failure of the control channel breaks the group
            self._channel_failed(exc, why or f"sending {op.name.lower()}")
        self._last_unit = time.monotonic()
        if settle is not None:
            settle()
        if self.runtime.after_message(message):
            self._discard_in_flight()
            if op is not Op.STEP and self.scheduler is not None:
                self.scheduler.reset(f"a generation step failed on {message.failed} rank(s)")
            return message.failed
        return 0

    def _step_failed_here(self, error: BaseException) -> None:
        """This rank's step raised. A peer lost in the middle of the step's collectives makes the
        step fail here first (gloo raises on the closed socket), so the failure is said to every
        rank at once, before any request is answered: if that message fails the group is broken
        (PeerFailure: every request 503, exit 3); if it goes through, the step alone failed, its
        requests end with its error (a 500 each) and every rank drops the batch."""
        if self.runtime.channel is None:
            self.scheduler.fail_running(error)  # the next step's plan drops the batch
            return
        self._discard_in_flight()           # every rank drops them with the batch
        self._send(Op.HEARTBEAT, settle=lambda: self.scheduler.fail_running(error),
                   why=f"after a generation step failed: {first_line(error)}")

    def _send_step(self, plan: StepPlan) -> int:
        if self.runtime.channel is None:  # one rank: a failed step is dropped here alone
            failed, self.runtime.step_failed = self.runtime.step_failed, False
            if failed:
                self.runtime.reset_generation()
            return int(failed)
        return self._send(Op.STEP, plan.payload(), plan.actions, micro_batch=plan.micro_batch)

    @contextlib.contextmanager
    def _unit(self, op: Op, payload):
        """Send a unit to every rank, run it here, then agree with every rank on the outcome."""
        with self._lock:
            self._check()
            if self.runtime.channel is None:
                yield
                return
            self._send(op, payload)
            error: BaseException | None = None
            try:
                yield
            except Exception as exc:  # noqa: BLE001 - decided below: the unit failed or the group did
                error = exc
            try:
                failed = self.runtime.channel.agree_ok(error is None)
            except Exception as exc:  # noqa: BLE001
                during = f"during {op.name.lower()}" + (f": {first_line(error)}" if error is not None else "")
                self._channel_failed(exc, during)
            self._last_unit = time.monotonic()
            if error is not None:
                raise EngineError(f"{op.name.lower()} failed: {first_line(error)}") from error
            if failed:
                raise EngineError(f"{op.name.lower()} failed on {failed} other rank(s); see their logs")

    def _heartbeats(self) -> None:
        while not self._closed and self.failure is None:
            time.sleep(self.heartbeat_interval / 2)
            if time.monotonic() - self._last_unit < self.heartbeat_interval:
                continue
            if self._lock.acquire(timeout=self.heartbeat_interval):
                try:
                    if not self._closed and self.failure is None:
                        self._send(Op.HEARTBEAT)
                except PeerFailure:
                    return
                finally:
                    self._lock.release()

    def _channel_failed(self, exc: BaseException, during: str) -> None:
        """The control channel failed: the group is broken. The channel names the ranks it lost (a
        closed connection, a peer silent past the timeout); otherwise the liveness monitor is given
        time to name them."""
        ranks = getattr(exc, "ranks", None)
        if ranks:
            monitor = self.runtime.monitor
            who = ", ".join(monitor.describe(r) if monitor is not None else f"rank {r}" for r in ranks)
            self._broken(f"{who} {exc.detail} ({during})", named=True)
        self._broken(f"control channel failed {during} ({first_line(exc)})")

    def on_liveness_failure(self, reason: str) -> None:
        with contextlib.suppress(PeerFailure):
            self._broken(reason, named=True)

    def _broken(self, reason: str, named: bool = False) -> None:
        """Mark the group broken (readiness turns 503, calls raise PeerFailure) and exit 3 soon.

        A failed collective says only that some peer is gone; the liveness monitor says which one
        within the heartbeat timeout, so the exit waits (that long at most) to name the rank."""
        if self.failure is None:
            self.failure = reason
            log.error("group broken: %s", reason)
            threading.Thread(target=self._exit_after_naming, args=(reason, named), daemon=True).start()
        raise PeerFailure(self.failure)

    def _exit_after_naming(self, reason: str, named: bool) -> None:
        options, monitor = self.runtime.options, self.runtime.monitor
        time.sleep(options.failure_grace)
        deadline = time.monotonic() + options.heartbeat_timeout + options.heartbeat_interval
        while not named and monitor is not None and time.monotonic() < deadline:
            stale = monitor.stale_ranks()
            if stale:
                reason = f"{', '.join(monitor.describe(r) for r in stale)} stopped answering; {reason}"
                break
            time.sleep(options.heartbeat_interval / 2)
        exit_group_broken(reason, 0)


class _CollectingSink:
    """`Engine.generate`'s sink: keeps the result, passes tokens to an optional callback."""

    def __init__(self, index: int, on_token: TokenCallback | None):
        self.index = index
        self.callback = on_token
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False

    def on_token(self, token: int, logprobs=None) -> bool:
        return self.callback is None or self.callback(self.index, token) is not False

    def on_prompt_logprobs(self, logprobs) -> None:
        pass                            # they are in the result

    def on_finish(self, result: GenerationResult) -> None:
        self.result, self.done = result, True

    def on_error(self, error: BaseException) -> None:
        self.error, self.done = error, True


def make_engine(runtime: Runtime) -> Engine:
    engine = Engine(runtime)
    getattr(runtime, "engine_ref", {})["engine"] = engine
    return engine


def open_engine(model: str, *, engine: str | None = None, dtype: str = "auto", checkpoint: str | None = None,
                served_model_name: str | None = None, device: str | torch.device | None = None,
                **limits) -> Engine:
    """A single-rank engine in this process (no process group): the unsharded reference, and the
    engine for a model that fits one device. `device`: where it runs (default: as `dscluster
    serve` with one rank, the first GPU if there is one, else the CPU). `limits`: max_num_seqs,
    max_num_batched_tokens, max_model_len, and the key/value pool's kv_cache_memory,
    gpu_memory_utilization, enable_prefix_caching (RuntimeOptions)."""
    options = RuntimeOptions(model=model, engine=engine, dtype=dtype, checkpoint=checkpoint,
                             served_model_name=served_model_name, **limits)
    device = single_rank_device() if device is None else torch.device(device)
    source = open_model(model, dtype, checkpoint, device=device)
    loaded, parallel = load_split(prepare(source, choose_engine(engine, source, 1), 1), device)
    return Engine(Runtime(options, loaded, parallel, None, device=device))

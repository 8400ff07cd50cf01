"""The lockstep runtime: every rank holds a `Runtime`; rank 0 drives it through an `Engine`.

Rank 0's `Engine` sends each unit of work over the control channel and runs it itself; every other
rank sits in `run_worker`, receiving and running the same unit. The units:

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
(engine/protocol.py), so rank 0 knows at every message that every rank is alive and in step.

A broken group (a failed collective, a lost control connection, a silent rank) ends the process
with exit code 3 after a short grace, so launchers and Kubernetes restart the group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from dscluster.cluster.group import Groups, init_groups, single_rank_device, store_prefix
from dscluster.cluster.rendezvous import Rendezvous
from dscluster.engine.api import (
    GenerationLimits,
    GenerationRequest,
    GenerationResult,
    GenerationSink,
    GenerationStats,
    ModelInfo,
    TokenCallback,
)
from dscluster.engine.batch import RunningBatch, StepOutput
from dscluster.engine.control_socket import open_link
from dscluster.engine.loading import LoadedModel, open_model
from dscluster.engine.parallel import (
    ParallelModel,
    choose_engine,
    load_split,
    prepare,
    release_shared_memory,
    use_accelerator,
)
from dscluster.engine.kv_blocks import BLOCK_SIZE, BlockPool
from dscluster.engine.kv_budget import activation_estimate, kv_cache_budget
from dscluster.engine.protocol import WAIT, ControlChannel, Message, Op, StepPlan
from dscluster.engine.scheduler import Scheduler
from dscluster.engine.threads import openmp_wait, torch_threads
from dscluster.errors import EXIT_PEER_FAILED, PeerFailure, UsageError

log = logging.getLogger(__name__)


@dataclass
class RuntimeOptions:
    model: str
    engine: str | None = None
    dtype: str = "auto"
    backend: str = "auto"
    checkpoint: str | None = None
    served_model_name: str | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    collective_timeout: float = 600.0
    rendezvous_timeout: float = 300.0   # forming the group: every rank must arrive by then
    failure_grace: float = 1.0           # rank 0 answers in-flight requests 503 before it exits
    zero3_persistence_threshold: int = 0  # 0: partition every parameter, however small
    max_num_seqs: int = GenerationLimits.max_num_seqs
    max_num_batched_tokens: int = GenerationLimits.max_num_batched_tokens
    max_model_len: int | None = None     # None: the model's context
    kv_cache_memory: int | None = None   # bytes of key/value pool per rank (None: from the memory it runs in)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None     # the pool's block count, whatever the memory (tests, benchmarks)

    @classmethod
    def from_args(cls, args) -> RuntimeOptions:
        fields = cls.__dataclass_fields__
        return cls(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})


class EngineError(RuntimeError):
    """A unit of work failed on some rank, but the group is intact and in step."""


def exit_group_broken(reason: str, rank: int) -> None:
    """Leave at once: threads may be stuck inside a collective that will never return."""
    sys.stderr.write(f"dscluster: rank {rank}: group broken: {reason}; exiting {EXIT_PEER_FAILED}\n")
    sys.stderr.flush()
    logging.shutdown()
    os._exit(EXIT_PEER_FAILED)


def resolve_limits(options: RuntimeOptions, context: int | None) -> GenerationLimits:
    """The generation limits; the longest request (prompt + output) is --max-model-len, which may
    not exceed the model's context, else the context itself."""
    if options.max_num_batched_tokens < options.max_num_seqs:
        raise UsageError(f"--max-num-batched-tokens {options.max_num_batched_tokens} must be at least "
                         f"--max-num-seqs {options.max_num_seqs} (every running request computes a token per step)")
    length = options.max_model_len or context
    if context is not None and length > context:
        raise UsageError(f"--max-model-len {length} exceeds the model's context of {context} tokens")
    if length is None:
        raise UsageError("the model does not say its context length: set --max-model-len")
    return GenerationLimits(options.max_num_seqs, options.max_num_batched_tokens, length)


class Runtime:
    """What every rank holds: the split model, the running generation batch, the control channel
    and the liveness monitor."""

    def __init__(self, options: RuntimeOptions, loaded: LoadedModel, model: ParallelModel,
                 groups: Groups | None, monitor=None, device: torch.device | None = None,
                 channel: ControlChannel | None = None):
        self.options = options
        self.loaded = loaded
        self.model = model
        self.groups = groups
        self.monitor = monitor
        self.rank = groups.rank if groups else 0
        self.world_size = groups.world_size if groups else 1
        # where the model's parameters, the key/value cache and every step's inputs live
        self.device = device or (groups.device if groups else torch.device("cpu"))
        self.channel = channel          # None on a lone rank
        tok = loaded.tokenizer
        self.pad_id = 0
        self.eos_ids: tuple[int, ...] = ()
        if tok is not None:
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        eos = getattr(getattr(loaded.module, "generation_config", None), "eos_token_id", None)
        if eos is None and tok is not None:
            eos = tok.eos_token_id
        if eos is not None:
            self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        self.batch: RunningBatch | None = None
        self.limits = GenerationLimits(options.max_num_seqs, options.max_num_batched_tokens, None)
        self.block_bytes = 0            # one block of the key/value pool, over every layer, on this rank
        if loaded.kind == "causal-lm":
            self.limits = resolve_limits(options, loaded.max_context)
            self.batch = RunningBatch(model.module, self.device, self.limits.max_model_len)
            if self.batch.unsupported:
                log.warning("generation is off for this model: %s", self.batch.unsupported)
            else:
                self._allocate_pool()
        self.step_failed = False        # this rank's last generation step raised (said in the next header)
        # Torch threads for predict units and for generation steps (engine/threads.py): rank 0
        # leaves a core to its front end for the first, and gives generation every core.
        self.threads: tuple[int, int] | None = None

    def _allocate_pool(self) -> None:
        """Size this rank's key/value pool from the memory it runs in (engine/kv_budget.py) after one
        step of the largest size has run (its activations and what a token costs here are then
        known), agree with every rank on the smallest block count, and allocate it. Exits 2 on
        every rank when the pool cannot hold one request of --max-model-len."""
        options, limits = self.options, self.limits
        tokens = min(limits.max_num_batched_tokens, limits.max_model_len)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        per_token = self.batch.probe(tokens)
        if self.device.type == "cuda":
            activation = torch.cuda.max_memory_allocated(self.device) - before
            torch.cuda.empty_cache()
        else:
            activation = activation_estimate(getattr(self.loaded.module, "config", None), tokens, self.loaded.dtype)
        budget, source = kv_cache_budget(self.device, kv_cache_memory=options.kv_cache_memory,
                                         gpu_memory_utilization=options.gpu_memory_utilization,
                                         activation=activation)
        self.block_bytes = per_token * BLOCK_SIZE
        # A rank may hold no key/value heads at all (AutoTP over more ranks than heads): its pool
        # costs nothing and the other ranks' decide.
        blocks = budget // self.block_bytes if self.block_bytes else 2**40
        if options.num_kv_blocks is not None:
            blocks, source = options.num_kv_blocks, "--num-kv-blocks"
        if self.groups is not None and self.world_size > 1:
            agreed = torch.tensor([blocks], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            blocks = int(agreed.item())
        needed = -(-limits.max_model_len // BLOCK_SIZE)
        if blocks < needed:
            raise UsageError(
                f"the key/value cache holds {blocks * BLOCK_SIZE} tokens ({blocks} blocks of {BLOCK_SIZE}) on the "
                f"smallest rank, fewer than one request of --max-model-len {limits.max_model_len} needs: lower "
                "--max-model-len, give each rank more memory (--kv-cache-memory, --gpu-memory-utilization, the "
                "memory limit) or split the model over more ranks")
        self.batch.allocate_pool(blocks, BLOCK_SIZE)
        log.info("rank %d: KV cache: %d tokens (%d blocks of %d, %.2f GiB; %s, %d bytes per token); maximum "
                 "concurrency for %d tokens per request: %.2fx", self.rank, blocks * BLOCK_SIZE, blocks, BLOCK_SIZE,
                 blocks * self.block_bytes / 2**30, source, per_token, limits.max_model_len,
                 blocks * BLOCK_SIZE / limits.max_model_len)

    def info(self) -> ModelInfo:
        lm = self.loaded
        return ModelInfo(name=self.options.served_model_name or lm.name, kind=lm.kind, engine=self.model.engine,
                         world_size=self.world_size, dtype=lm.dtype,
                         max_context=self.limits.max_model_len or lm.max_context,
                         vocab_size=lm.vocab_size, input_dtype=lm.input_dtype, input_shape=lm.input_shape,
                         tokenizer=lm.tokenizer, eos_ids=self.eos_ids,
                         generation_unsupported=self.batch.unsupported if self.batch else None,
                         extra={"description": self.model.description})

    # -- the units of work, identical on every rank ----------------------------------------
    def _use_threads(self, generating: bool) -> None:
        if self.threads is not None and torch.get_num_threads() != self.threads[generating]:
            torch.set_num_threads(self.threads[generating])

    @torch.no_grad()
    def run_predict(self, batch: torch.Tensor) -> torch.Tensor:
        self._use_threads(False)
        x = batch.to(self.device)
        if self.loaded.kind == "causal-lm":
            out = self.model.module(input_ids=x).logits
        elif self.loaded.hf:
            out = self.model.module(**{self.loaded.input_name: x})
            logits = getattr(out, "logits", None)  # a head's output, else the first (hidden states)
            out = logits if logits is not None else out[0]
        else:
            out = self.model.module(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
        return out.detach().to("cpu")

    def run_step(self, plan: StepPlan) -> StepOutput:
        """Apply one generation step to the running batch and run its forward pass. The row count
        the next header is sized by is settled before anything can fail; a failure is remembered
        for the next header, and re-raised."""
        if self.batch is None:
            raise RuntimeError(f"{self.loaded.name} is not a causal language model")
        rows = self.batch.rows_after(plan) if len(plan.actions) == len(self.batch.rows) else len(plan.joins)
        if self.channel is not None:
            self.channel.rows = rows
        self._use_threads(True)
        try:
            return self.batch.step(plan)
        except Exception:
            self.step_failed = True
            raise

    def before_message(self) -> None:
        """Put this rank's failed-step flag into the next header (said once)."""
        if self.channel is not None:
            self.channel.step_failed, self.step_failed = self.step_failed, False

    def after_message(self, message: Message) -> bool:
        """A generation step failed somewhere: every rank drops the running batch now. True if so."""
        if not message.failed:
            return False
        log.warning("rank %d: a generation step failed on %d rank(s); dropping the running batch",
                    self.rank, message.failed)
        self.reset_generation()
        return True

    def reset_generation(self) -> None:
        if self.batch is not None:
            self.batch.reset()
        if self.channel is not None:
            self.channel.rows = 0

    def close(self) -> None:
        """Stop watching the peers, then close the control channel (after STOP, rank 0 waits until
        every worker closed its end, so no worker sees rank 0 go before it read the STOP)."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.channel is not None:
            self.channel.close()


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
        return self.scheduler is not None and self.scheduler.has_work()

    def generation_stats(self) -> GenerationStats:
        return self.scheduler.stats() if self.scheduler is not None else GenerationStats()

    def step(self) -> None:
        """One generation step. Rank-0-only work (planning before, sampling and the requests'
        callbacks after) never breaks the group: a failure ends the requests it concerns."""
        scheduler = self.scheduler
        with self._lock:
            self._check()
            try:
                plan = scheduler.schedule()
            except Exception as exc:  # noqa: BLE001 - a planning bug: drop the batch on every rank
                log.exception("planning a generation step failed")
                scheduler.fail_running(exc)
                self.runtime.step_failed = True
                plan = StepPlan(actions=[WAIT] * len(self.runtime.batch.rows))
            reset = self._send_step(plan)
            if reset:   # every rank drops the batch and this plan; its newcomers wait for the next
                scheduler.reset(f"a generation step failed on {reset} rank(s)", requeue=plan.joins)
                plan = StepPlan()
            try:
                out = self.runtime.run_step(plan)
            except Exception as exc:  # noqa: BLE001 - every rank drops the batch at the next message
                log.exception("generation step failed")
                self._step_failed_here(exc)
                return
            try:
                scheduler.after_step(out)
            except Exception as exc:  # noqa: BLE001 - a bug after the step: its requests end, the group goes on
                log.exception("finishing a generation step failed")
                scheduler.fail_running(exc)
                self.runtime.step_failed = True

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
            raise EngineError(f"generate failed: {_first_line(errors[0])}") from errors[0]
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
              why: str | None = None) -> int:
        """Send a message; returns how many ranks reported a failed generation step (then every
        rank, this one included, has dropped the running batch). `settle` runs once the message
        went through, before any dropped request is ended; `why` it is sent, for the error if not."""
        self.runtime.before_message()
        try:
            message = self.runtime.channel.send(op, payload, actions)
        except Exception as exc:  # noqa: BLE001 - any failure of the control channel breaks the group
            self._channel_failed(exc, why or f"sending {op.name.lower()}")
        self._last_unit = time.monotonic()
        if settle is not None:
            settle()
        if self.runtime.after_message(message):
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
        self._send(Op.HEARTBEAT, settle=lambda: self.scheduler.fail_running(error),
                   why=f"after a generation step failed: {_first_line(error)}")

    def _send_step(self, plan: StepPlan) -> int:
        if self.runtime.channel is None:  # one rank: a failed step is dropped here alone
            failed, self.runtime.step_failed = self.runtime.step_failed, False
            if failed:
                self.runtime.reset_generation()
            return int(failed)
        return self._send(Op.STEP, plan.payload(), plan.actions)

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
                during = f"during {op.name.lower()}" + (f": {_first_line(error)}" if error is not None else "")
                self._channel_failed(exc, during)
            self._last_unit = time.monotonic()
            if error is not None:
                raise EngineError(f"{op.name.lower()} failed: {_first_line(error)}") from error
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
        self._broken(f"control channel failed {during} ({_first_line(exc)})")

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


def _first_line(exc: BaseException | None) -> str:
    """A collective error in one readable line: gloo's source location and advice removed."""
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0]
    return text[:300]


# ------------------------------------------------------------------------------------------
# Worker ranks


def run_worker(runtime: Runtime) -> int:
    """Receive and run every unit rank 0 sends, until it says stop. Returns 0; exits 3 if the group breaks."""
    channel = runtime.channel
    # A stop (SIGTERM, or SIGINT: Ctrl-C reaches every rank through the launcher) is rank 0's to
    # carry out: it drains, then sends STOP. A worker that left at once would break the group.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda signum, _: log.info("%s: waiting for rank 0 to stop the group",
                                                       signal.Signals(signum).name))
    while True:
        runtime.before_message()
        try:
            message = channel.recv()
        except Exception as exc:  # noqa: BLE001
            exit_group_broken(f"lost rank 0 ({_first_line(exc)})", runtime.rank)
        reset = runtime.after_message(message)
        if message.op is Op.STOP:
            log.info("rank %d: stop received", runtime.rank)
            runtime.close()
            return 0
        if message.op is Op.HEARTBEAT:
            continue
        if message.op is Op.STEP:
            plan = StepPlan() if reset else StepPlan.received(message.actions, message.payload)
            try:
                runtime.run_step(plan)
            except Exception:  # noqa: BLE001 - reported to every rank in the next header
                log.exception("rank %d: generation step failed", runtime.rank)
            continue
        ok = True
        try:
            runtime.run_predict(message.payload)
        except Exception:  # noqa: BLE001 - reported to rank 0 through the agreement below
            log.exception("rank %d: %s failed", runtime.rank, message.op.name.lower())
            ok = False
        try:
            channel.agree_ok(ok)
        except Exception as exc:  # noqa: BLE001
            exit_group_broken(f"lost rank 0 during {message.op.name.lower()} ({_first_line(exc)})", runtime.rank)


# ------------------------------------------------------------------------------------------
# Building it


def set_threads(local_world_size: int, runs_front_end: bool = False) -> int:
    """Torch threads per rank (engine/threads.py: the policy and why): OMP_NUM_THREADS if a launcher
    set it, else the cores split evenly, less one for rank 0's front end."""
    threads = torch_threads(local_world_size, runs_front_end)
    torch.set_num_threads(threads)
    return threads


def build_runtime(options: RuntimeOptions, rdzv: Rendezvous) -> Runtime:
    """Join the group, check the model, load this rank's share of it onto its device, and wait
    until every rank has done the same.

    The model and its checkpoint are checked once the group has formed and before any collective:
    every rank reads the same files, so a bad checkpoint makes every rank exit 2 with the same
    message at once (a rank alone with a bad copy exits 2 and the others notice it is gone). The
    check comes after the rendezvous so that it never delays noticing a rank that never arrives,
    and a peer lost while this rank is still checking is acted on only after its own verdict: a
    rank whose model is bad says so, rather than that rank 0 (which hosts the store) left first."""
    threads = set_threads(rdzv.local_world_size, runs_front_end=rdzv.rank == 0)
    generation_threads = torch_threads(rdzv.local_world_size, runs_front_end=False)
    if rdzv.rank == 0:
        # Rank 0 computes on its front end's engine thread from now on (Runtime._use_threads sets
        # the counts there). OpenMP work done on this thread with more threads would leave a second
        # thread team behind, and libgomp then throttles every team's spinning: measured, a step
        # took 120 ms on two threads instead of 66 ms. So this thread loads on one.
        torch.set_num_threads(1)
    log.info("rank %d: %d torch thread(s) (%d while generating), %s", rdzv.rank, threads, generation_threads,
             openmp_wait())
    groups = monitor = None
    engine_ref: dict[str, Engine] = {}
    checking: dict = {"active": True, "failure": None}
    if rdzv.world_size == 1:
        device = single_rank_device(options.backend)
    else:
        from dscluster.engine.liveness import LivenessMonitor

        groups = init_groups(rdzv, options.backend, timeout_s=options.collective_timeout,
                             rendezvous_timeout_s=options.rendezvous_timeout)
        device = groups.device

        def on_failure(reason: str) -> None:
            if checking["active"]:
                checking["failure"] = checking["failure"] or reason
                return
            if rdzv.rank == 0 and "engine" in engine_ref:
                engine_ref["engine"].on_liveness_failure(reason)
            else:
                exit_group_broken(reason, rdzv.rank)

        monitor = LivenessMonitor(rdzv.master_addr, rdzv.master_port, rdzv.rank, rdzv.world_size,
                                  options.heartbeat_interval, options.heartbeat_timeout, on_failure,
                                  prefix=store_prefix())
        monitor.start()
        use_accelerator(device)  # before `prepare` first imports DeepSpeed (a lone rank never uses it)
    source = open_model(options.model, options.dtype, options.checkpoint, device=device)
    prepared = prepare(source, choose_engine(options.engine, source, rdzv.world_size), rdzv.world_size)
    checking["active"] = False
    if checking["failure"]:
        exit_group_broken(checking["failure"], rdzv.rank)
    loaded, model = load_split(prepared, device, options.zero3_persistence_threshold)
    channel = None
    if monitor is not None:
        monitor.mark_ready()
        monitor.wait_all_ready()
        release_shared_memory(rdzv.rank)
        channel = open_channel(groups, options)
    runtime = Runtime(options, loaded, model, groups, monitor, device=device, channel=channel)
    runtime.threads = (threads, generation_threads)
    runtime.engine_ref = engine_ref
    log.info("rank %d ready: %s", rdzv.rank, model.description)
    return runtime


def open_channel(groups: Groups, options: RuntimeOptions) -> ControlChannel:
    """Connect the control channel's sockets (engine/control_socket.py). Done once every rank has
    loaded, so that the liveness monitor watches the peers meanwhile and the connections never sit
    idle through a long load; bounded by the rendezvous timeout. Waits for a peer are bounded by the
    heartbeat timeout, as the heartbeats keep an idle group talking."""
    rdzv = groups.rdzv
    link = open_link(groups.store, f"{store_prefix()}/control", rdzv.rank, rdzv.world_size, rdzv.master_addr,
                     timeout=options.heartbeat_timeout, setup_timeout=options.rendezvous_timeout)
    return ControlChannel(link, rdzv.rank)


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

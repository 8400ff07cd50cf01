"""The engine's one thread: predict batches and generation steps, taking turns.

The event loop (HTTP handlers) puts work items in a bounded queue; one thread owns the engine.

- Predict items are batched here: the thread waits up to `max_wait` after the oldest item for up
  to `max_batch_size` items of the same key (same example shape), then runs them as one unit.
- Generation items go to the engine's scheduler through `GenerationFeed`
  (serving/generation_feed.py), and the thread runs one generation step after another while any
  request waits or runs (continuous batching). A predict batch that is ready runs between two
  steps, so neither kind starves the other.

Results go back to each handler's future on the event loop. Engine calls block (they are
collectives on every rank), so they never run on the event loop: the loop stays free to accept,
validate and stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dscluster.engine.api import EngineClient, GenerationRequest, TokenLogprobs
from dscluster.errors import PeerFailure
from dscluster.serving.generation_feed import GenerationFeed
from dscluster.serving.metrics import Metrics
from dscluster.serving.protocol import APIError

log = logging.getLogger(__name__)


class QueueFull(APIError):
    def __init__(self, max_queue: int):
        super().__init__(429, f"server busy: {max_queue} requests already queued; retry shortly",
                         type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


def unavailable(reason: str) -> APIError:
    return APIError(503, f"service unavailable: {reason}", type="server_error", code="unavailable")


@dataclass(eq=False)
class WorkItem:
    """One example to predict or one prompt to decode, and where its answer goes."""

    key: tuple                                   # items batch together only when keys are equal
    payload: np.ndarray | torch.Tensor | GenerationRequest  # an example: numpy where it can hold the dtype
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    # Called in the batcher thread with each new token (and its logprobs, when asked); returns
    # False to stop this item.
    on_token: Callable[[int, TokenLogprobs | None], bool] | None = None
    # Called in the batcher thread with the prompt's logprobs, when asked, once it is computed.
    on_prompt_logprobs: Callable[[list[TokenLogprobs | None]], None] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    request_id: str | None = None                # X-Request-Id, for the logs
    cancelled: bool = False                      # set by the handler: client gone or deadline passed

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def predict_key(example: np.ndarray | torch.Tensor) -> tuple:
    return ("predict", tuple(example.shape), example.dtype)


GENERATE_KEY = ("generate",)


def _tensors(examples: list) -> list[torch.Tensor]:
    """A batch's examples as tensors: numpy ones (one key, one dtype) stacked once and shared."""
    if isinstance(examples[0], np.ndarray):
        return list(torch.from_numpy(np.stack(examples)).unbind(0))
    return examples


def numpy_rows(outputs: list[torch.Tensor]) -> list[np.ndarray]:
    """One batch's outputs as numpy rows, which orjson writes without a Python float per number.
    Converted here, once per batch, rather than once per request on the event loop; half precision
    goes out as float32 (numpy has no bfloat16)."""
    batch = torch.stack(outputs)
    if batch.is_floating_point() and batch.dtype != torch.float64:
        batch = batch.float()
    return list(batch.numpy())


class Batcher:
    def __init__(self, engine: EngineClient, metrics: Metrics, max_batch_size: int, max_wait_s: float,
                 max_queue: int):
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._items: deque[WorkItem] = deque()   # predict items
        self._cond = threading.Condition()
        self.generation = GenerationFeed(engine, metrics, self._cond)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dscluster-batcher", daemon=True)
        self._running: list[WorkItem] = []       # the predict batch the batcher thread is executing
        self.batches = 0                         # executed predict units (tests and benchmarks read it)

    # -- event-loop side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._watch_failure, name="dscluster-batcher-watch", daemon=True).start()

    def _watch_failure(self) -> None:
        """The batcher thread can be stuck in a collective that a lost node never answers (a cut
        link). When the engine reports the group broken, answer that batch 503 now, rather than
        dropping the connections when the process exits."""
        while not (self._stopping and not self._thread.is_alive()):
            failure = self.engine.failure
            if failure:
                self._fail_all(list(self._running), unavailable(f"the group is broken ({failure})"))
                return
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._stopping

    def submit(self, items: list[WorkItem]) -> None:
        """Queue all of `items` or none: 429 when the queue cannot take them, 503 when stopping."""
        with self._cond:
            if self.engine.failure:
                raise unavailable(f"the group is broken ({self.engine.failure})")
            if self._stopping or not self.alive:
                raise unavailable("the server is shutting down")
            if self.queued() + len(items) > self.max_queue:
                raise QueueFull(self.max_queue)
            for item in items:
                if item.key == GENERATE_KEY:
                    self.generation.add(item)
                else:
                    self._items.append(item)
            self.metrics.queue_depth.set(len(self._items))
            self._cond.notify()

    def queued(self) -> int:
        """Requests not yet running: predict items, and generation requests not yet in the batch."""
        return len(self._items) + self.generation.waiting()

    def stop(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the thread (the engine itself is shut down by its owner)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- batcher thread ------------------------------------------------------------------------
    def _next_batch(self, block: bool = True) -> list[WorkItem] | None:
        """The next predict batch; None when stopping and nothing is left. With block=False (while
        generation runs) it returns at once: a batch if one is ready (full, or its wait is over),
        else an empty list."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._items:
                    break
                if not block or self.generation.has_arrivals():
                    return []
                if self._stopping:
                    return None
                self._cond.wait()
            key = self._items[0].key
            deadline = self._items[0].enqueued + self.max_wait_s
            while not self._stopping and self._count(key) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not block:
                    return []
                self._cond.wait(remaining)
            self._drop_cancelled()
            batch, rest = [], deque()
            while self._items:
                item = self._items.popleft()
                (batch if item.key == key and len(batch) < self.max_batch_size else rest).append(item)
            self._items = rest
            self.metrics.queue_depth.set(len(self._items))
            return batch

    def _count(self, key: tuple) -> int:
        return sum(1 for item in self._items if item.key == key and not item.cancelled)

    def _drop_cancelled(self) -> None:
        if any(item.cancelled for item in self._items):
            self._items = deque(item for item in self._items if not item.cancelled)

    def _run(self) -> None:
        while True:
            self.generation.hand_over()
            generating = self.engine.has_generation_work()
            batch = self._next_batch(block=not generating)
            if batch is None:
                return
            if batch and not self._run_predict(batch):
                return
            if generating and not self._run_step():
                return

    def _run_predict(self, batch: list[WorkItem]) -> bool:
        """One predict unit. False when the group broke (every item has been answered 503)."""
        now = time.monotonic()
        for item in batch:
            self.metrics.queue_time.observe(now - item.enqueued)
        self.metrics.batch_size.labels("predict").observe(len(batch))
        self._running = batch
        try:
            with self.metrics.forward_time.labels("predict").time():
                results = numpy_rows(self.engine.predict(_tensors([item.payload for item in batch])))
        except PeerFailure as exc:
            self._fail_all(batch, unavailable(f"the group is broken ({exc})"))
            return False
        except Exception as exc:  # noqa: BLE001 - the unit failed; the group is still in step
            log.exception("predict batch of %d failed", len(batch))
            error = APIError(500, f"predict failed: {exc}", type="server_error", code="engine_error")
            for item in batch:
                item.resolve(error=error)
            return True
        finally:
            self._running = []
        self.batches += 1
        for item, result in zip(batch, results):
            item.resolve(result)
        return True

    def _run_step(self) -> bool:
        """One generation step. False when the group broke (every request has been answered 503)."""
        try:
            self.generation.step()
        except PeerFailure as exc:
            self._fail_all([], unavailable(f"the group is broken ({exc})"))
            return False
        return True

    def _fail_all(self, batch: list[WorkItem], error: APIError) -> None:
        generating = self.generation.take_all()
        with self._cond:
            pending = list(self._items) + generating
            self._items.clear()
            self._stopping = True
            self.metrics.queue_depth.set(0)
        for item in batch + pending:
            item.resolve(error=error)

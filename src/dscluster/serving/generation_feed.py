"""Generation requests from the HTTP handlers to the engine's scheduler (continuous batching).

Handlers put generation items here; the batcher thread hands them to the engine (`submit`) and runs
generation steps while any request waits or runs. Each item gets a sink through which the engine
reports its tokens (to the item's `on_token`: detokenising, stop strings, the stream) and its end.
The engine calls the sink between steps on the batcher thread: if it raises, that request ends with
a 500 and the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from dscluster.engine.api import EngineClient, GenerationResult, TokenLogprobs
from dscluster.serving.metrics import Metrics
from dscluster.serving.protocol import APIError

if TYPE_CHECKING:
    from dscluster.serving.batcher import WorkItem

log = logging.getLogger(__name__)


class _Sink:
    """The engine's view of one generation item (`dscluster.engine.api.GenerationSink`)."""

    def __init__(self, item: WorkItem, feed: GenerationFeed):
        self.item = item
        self.feed = feed
        self.last_token: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.item.cancelled

    def on_token(self, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        now = time.monotonic()
        metrics = self.feed.metrics
        if self.last_token is None:
            metrics.time_to_first_token.observe(now - self.item.enqueued)
            metrics.vllm.time_to_first_token.observe(now - self.item.enqueued)
        else:
            metrics.vllm.inter_token_latency.observe(now - self.last_token)
        self.last_token = now
        if self.item.cancelled:
            return False
        return self.item.on_token is None or self.item.on_token(token, logprobs) is not False

    def on_prompt_logprobs(self, logprobs: list[TokenLogprobs | None]) -> None:
        if self.item.on_prompt_logprobs is not None:
            self.item.on_prompt_logprobs(logprobs)

    def on_finish(self, result: GenerationResult) -> None:
        metrics = self.feed.metrics
        metrics.prompt_tokens.inc(result.prompt_tokens)
        metrics.generated_tokens.inc(len(result.token_ids))
        vllm = metrics.vllm
        vllm.prompt_tokens.inc(result.prompt_tokens)
        vllm.generation_tokens.inc(len(result.token_ids))
        vllm.e2e_request_latency.observe(time.monotonic() - self.item.enqueued)
        if result.joined_at is not None:
            vllm.request_queue_time.observe(max(0.0, result.joined_at - self.item.enqueued))
        # "cancelled" is either the client gone (vLLM's abort) or a stop string found (a stop).
        reason = result.finish_reason
        if reason == "cancelled":
            reason = "abort" if self.item.cancelled else "stop"
        vllm.success(reason).inc()
        self.feed.done(self.item)
        self.item.resolve(result)

    def on_error(self, error: BaseException) -> None:
        log.error("request %s failed: %s: %s", self.item.request_id or "-", type(error).__name__, error)
        self.feed.done(self.item)
        self.item.resolve(error=APIError(500, f"generation failed: {type(error).__name__}: {error}",
                                         type="server_error", code="engine_error"))


class GenerationFeed:
    """Generation items between the handlers and the engine. `lock` is the batcher's condition, so
    that an arriving item wakes the batcher thread."""

    def __init__(self, engine: EngineClient, metrics: Metrics, lock: threading.Condition):
        self.engine = engine
        self.metrics = metrics
        self._lock = lock
        self._inbox: deque[WorkItem] = deque()   # not yet handed to the engine
        self._held: set[WorkItem] = set()        # handed to the engine, not yet answered

    def add(self, item: WorkItem) -> None:
        """Called with the lock held."""
        self._inbox.append(item)

    def waiting(self) -> int:
        """Requests not yet running (called with the lock held)."""
        return len(self._inbox) + self.engine.generation_stats().waiting

    def has_arrivals(self) -> bool:
        return bool(self._inbox)

    def hand_over(self) -> None:
        """Batcher thread: give new items to the engine's scheduler (they join at a coming step)."""
        with self._lock:
            items = [item for item in self._inbox if not item.cancelled]
            self._inbox.clear()
            self._held.update(items)
        for item in items:
            self.engine.submit(item.payload, _Sink(item, self))

    def step(self) -> None:
        """Batcher thread: one generation step (raises PeerFailure when the group broke)."""
        with self.metrics.forward_time.labels("generate").time():
            self.engine.step()
        stats = self.engine.generation_stats()
        if stats.step_rows:
            self.metrics.batch_size.labels("generate").observe(stats.step_rows)

    def done(self, item: WorkItem) -> None:
        with self._lock:
            self._held.discard(item)

    def take_all(self) -> list[WorkItem]:
        """Every item not yet answered, forgotten here (to answer them when the group broke)."""
        with self._lock:
            items = list(self._inbox) + list(self._held)
            self._inbox.clear()
            self._held.clear()
            return items

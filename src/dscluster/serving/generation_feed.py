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

from dscluster.engine.api import EngineClient, GenerationResult
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
        self.first_token = True

    @property
    def cancelled(self) -> bool:
        return self.item.cancelled

    def on_token(self, token: int) -> bool:
        if self.first_token:
            self.first_token = False
            self.feed.metrics.time_to_first_token.observe(time.monotonic() - self.item.enqueued)
        if self.item.cancelled:
            return False
        return self.item.on_token is None or self.item.on_token(token) is not False

    def on_finish(self, result: GenerationResult) -> None:
        self.feed.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.feed.metrics.generated_tokens.inc(len(result.token_ids))
        self.feed.done(self.item)
        self.item.resolve(result)

    def on_error(self, error: BaseException) -> None:
        log.error("a generation request failed: %s: %s", type(error).__name__, error)
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

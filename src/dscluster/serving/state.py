"""What every route needs: the server's configuration, the engine, the batcher and the metrics,
and how a handler waits for its results (deadline, client gone)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import Receive

from dscluster.engine.api import EngineClient
from dscluster.serving.batcher import Batcher, WorkItem
from dscluster.serving.metrics import Metrics
from dscluster.serving.protocol import APIError, ClientGone
from dscluster.serving.structured_output import Grammars


@dataclass(frozen=True)
class ServerConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 256
    request_timeout: float | None = 60.0     # None: no deadline (batch mode)
    api_key: str | None = None
    metrics_without_api_key: bool = False    # /metrics readable without the API key (Prometheus scrapes)
    max_body_bytes: int = 8 * 1024 * 1024
    tool_call_parser: str = "hermes"          # how tool_choice auto replies are read (serving/tool_calls.py)


@dataclass
class ServerState:
    config: ServerConfig
    engine: EngineClient
    metrics: Metrics
    batcher: Batcher
    grammars: Grammars | None = None          # structured outputs, for models with a tokenizer
    started: int = field(default_factory=lambda: int(time.time()))
    serving: bool = False                     # between startup and the start of shutdown

    def ready(self) -> tuple[bool, str]:
        """Readiness: every rank loaded and answered the last heartbeat, and we are not draining."""
        if self.engine.failure:
            return False, f"group broken: {self.engine.failure}"
        if not self.serving or self.batcher.draining:
            return False, "not serving (starting or shutting down)"
        if not self.batcher.alive:
            return False, "the batcher stopped"
        alive, world = self.engine.ranks_alive(), self.engine.info.world_size
        if alive < world:
            return False, f"{alive} of {world} ranks alive"
        return True, "ready"


def get_state(request: Request) -> ServerState:
    return request.app.state.dscluster


async def wait_results(items: list[WorkItem], request: Request, timeout: float | None) -> list:
    """Results of `items` in order. A deadline answers 504 and a departed client ends the wait;
    in both cases the items are cancelled, so the batcher drops them or stops decoding them."""
    return await wait_items(items, request.receive, timeout)


async def wait_items(items: list[WorkItem], receive: Receive, timeout: float | None) -> list:
    """`wait_results` on the ASGI `receive`. Whichever comes first settles one future (the item's
    own, or a gather of several): the results, the client leaving (a task watching `receive`) or the
    deadline (a timer)."""
    loop = asyncio.get_running_loop()
    outcome = items[0].future if len(items) == 1 else asyncio.gather(*(item.future for item in items))
    watcher = loop.create_task(_end_when_client_leaves(receive, items, outcome))
    deadline = loop.call_later(timeout, _end, items, outcome, _PastDeadline) if timeout is not None else None
    try:
        result = await outcome
    except _PastDeadline:
        raise APIError(504, f"request not answered within --request-timeout {timeout:g} s",
                       type="timeout", code="timeout") from None
    finally:
        watcher.cancel()
        if deadline is not None:
            deadline.cancel()
    return [result] if len(items) == 1 else result


class _PastDeadline(Exception):
    pass


def _end(items: list[WorkItem], outcome: asyncio.Future, error: type[Exception]) -> None:
    """Cancel the items (the batcher drops them or stops decoding them) and end the wait."""
    for item in items:
        item.cancelled = True
    if not outcome.done():
        outcome.set_exception(error)


async def _end_when_client_leaves(receive: Receive, items: list[WorkItem], outcome: asyncio.Future) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    _end(items, outcome, ClientGone)

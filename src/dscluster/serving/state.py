"""What every route needs: the server's configuration, the engine, the batcher and the metrics,
and how a handler waits for its results (deadline, client gone)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from starlette.requests import Request

from dscluster.engine.api import EngineClient
from dscluster.serving.batcher import Batcher, WorkItem
from dscluster.serving.metrics import Metrics
from dscluster.serving.protocol import APIError


@dataclass(frozen=True)
class ServerConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 256
    request_timeout: float | None = 60.0     # None: no deadline (batch mode)
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024


@dataclass
class ServerState:
    config: ServerConfig
    engine: EngineClient
    metrics: Metrics
    batcher: Batcher
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


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_results(items: list[WorkItem], request: Request, timeout: float | None) -> list:
    """Results of `items` in order. A deadline answers 504 and a departed client ends the wait;
    in both cases the items are cancelled, so the batcher drops them or stops decoding them."""
    gathered = asyncio.gather(*(item.future for item in items))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({gathered, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return gathered.result()
        for item in items:
            item.cancelled = True
        if watcher in done:
            raise ClientGone()
        raise APIError(504, f"request not answered within --request-timeout {timeout:g} s",
                       type="timeout", code="timeout")
    finally:
        watcher.cancel()
        if not gathered.done():
            gathered.cancel()
            # A cancelled gather ends holding a CancelledError; read it, or asyncio logs
            # "exception was never retrieved" for every 504.
            gathered.add_done_callback(lambda f: f.cancelled() or f.exception())

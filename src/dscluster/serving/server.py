"""Rank 0's HTTP server: Uvicorn running the application, and a graceful stop on SIGTERM.

SIGTERM (Kubernetes deleting the pod, the local launcher forwarding it): readiness answers 503 at
once; for `--drain-delay` seconds requests are still accepted and answered (endpoints, load
balancers and gateways take that long to stop sending new ones); then Uvicorn stops accepting,
requests in flight finish, the caller shuts the engine down, which tells every rank to stop, and
all exit 0. A SIGINT during the delay (a second Ctrl-C) ends it at once; another SIGTERM does not
(under MPI the pod's SIGTERM and the launcher's SIGUSR1 may both arrive).
"""

from __future__ import annotations

import argparse
import logging
import signal
import time

from dscluster.engine.api import EngineClient
from dscluster.errors import EXIT_RUNTIME
from dscluster.serving.state import ServerConfig

log = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Server settings from `serve`'s flags; `batch` has fewer flags and no deadline."""
    defaults = ServerConfig()
    batch = not hasattr(args, "port")
    return ServerConfig(
        max_batch_size=getattr(args, "max_batch_size", defaults.max_batch_size),
        max_wait_ms=getattr(args, "max_wait_ms", defaults.max_wait_ms),
        max_queue=getattr(args, "max_queue", None) or max(defaults.max_queue, 4 * args.max_batch_size),
        request_timeout=None if batch or not args.request_timeout else args.request_timeout,
        api_key=getattr(args, "api_key", None) or None,
        metrics_without_api_key=bool(getattr(args, "metrics_without_api_key", False)),
        max_body_bytes=getattr(args, "max_body_bytes", defaults.max_body_bytes),
        tool_call_parser=getattr(args, "tool_call_parser", defaults.tool_call_parser),
    )


def run_server(engine: EngineClient, args: argparse.Namespace) -> int:
    import uvicorn

    from dscluster.serving.app import create_app
    from dscluster.serving.placeholder import PlaceholderServer

    config = config_from_args(args)
    app = create_app(engine, config)
    drain = (config.request_timeout or 60.0) + 5.0
    drain_delay = getattr(args, "drain_delay", 0.0) or 0.0

    class Server(uvicorn.Server):
        stop_at: float | None = None  # when the drain delay ends

        def handle_exit(self, sig, frame) -> None:
            app.state.dscluster.serving = False  # readiness answers 503 from the first signal on
            if drain_delay > 0 and self.stop_at is None:
                self.stop_at = time.monotonic() + drain_delay
                log.info("signal %d: not ready; still answering for %g s (--drain-delay), then draining",
                         sig, drain_delay)
                return
            if self.stop_at is not None and not self.should_exit and sig != signal.SIGINT:
                return  # the delay runs on
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.stop_at is not None and not self.should_exit and time.monotonic() >= self.stop_at:
                self.should_exit = True
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None) -> None:
            # Uvicorn stops listening first; answer 503 on the port while requests in flight drain.
            for listener in self.servers:
                listener.close()
            with PlaceholderServer(args.host, args.port, "draining: the server is shutting down"):
                await super().shutdown(sockets)

    # uvloop and httptools (C) rather than asyncio's loop and h11 (pure Python): the event loop
    # parses, checks and answers every request, so its cost per request bounds throughput.
    server = Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
        timeout_graceful_shutdown=drain, lifespan="on", loop="uvloop", http="httptools"))
    # Uvicorn re-raises the signal it stopped for once it is done; a no-op handler keeps that
    # from killing the process before the engine tells the other ranks to stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("signal %d: shutting down", signum))
    log.info("HTTP on http://%s:%d", args.host, args.port)
    try:
        server.run()
    except SystemExit:  # Uvicorn exits 3 when it cannot start; 3 means "a peer failed" here
        return EXIT_RUNTIME
    return 0 if server.started else EXIT_RUNTIME

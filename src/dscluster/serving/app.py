"""The FastAPI application rank 0 serves: routes, errors in the OpenAI shape, API key, metrics.

`create_app(engine, config)` needs only an `EngineClient`, so the HTTP layer never sees DeepSpeed
or the process group; batch mode runs the same application in-process.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dscluster.engine.api import EngineClient
from dscluster.serving import openai, predict, request_id, tokenize
from dscluster.serving.batcher import Batcher
from dscluster.serving.metrics import Metrics
from dscluster.serving.protocol import APIError, ClientGone, error_body
from dscluster.serving.state import ServerConfig, ServerState, get_state
from dscluster.serving.structured_output import Grammars

log = logging.getLogger(__name__)

ROUTES = ("/v1/predict", "/predict", "/v1/completions", "/v1/chat/completions", "/v1/models",
          "/tokenize", "/detokenize", "/health/live", "/health/ready", "/health", "/metrics")
OPEN_ROUTES = ("/health/live", "/health/ready", "/health")   # reachable without the API key (probes)


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    metrics = Metrics(engine.ranks_alive, engine.info.world_size, engine.generation_stats, engine.info.name)
    batcher = Batcher(engine, metrics, config.max_batch_size, config.max_wait_ms / 1000.0, config.max_queue)
    info = engine.info
    grammars = Grammars(info.tokenizer, info.vocab_size, info.eos_ids) if info.tokenizer and info.vocab_size else None
    state = ServerState(config=config, engine=engine, metrics=metrics, batcher=batcher, grammars=grammars)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        state.serving = True
        info = engine.info
        layout = info.engine if info.pipeline_parallel == 1 else \
            f"{info.pipeline_parallel} pipeline stages of {info.world_size // info.pipeline_parallel} {info.engine} rank(s)"
        log.info("serving %s (%s, %d rank(s))", info.name, layout, info.world_size)
        try:
            yield
        finally:
            state.serving = False          # readiness turns 503 first
            batcher.stop(timeout=config.request_timeout)

    # FastAPI's own OpenTelemetry hooks look up the global providers on every request; off.
    app = ServingApp(title="dscluster", lifespan=lifespan, docs_url=None, redoc_url=None,
                     telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.dscluster = state
    app.tensor_routes = predict.routes(state)
    for path, route in app.tensor_routes.items():
        app.add_route(path, route, methods=["POST"], include_in_schema=False)
    app.include_router(openai.router)
    app.include_router(tokenize.router)
    _add_health_routes(app)
    _add_error_handlers(app)
    app.gate = _Gate(state)
    return app


class ServingApp(FastAPI):
    """FastAPI, with the gate (API key, request metrics) in front of every HTTP request, and the
    tensor routes' POSTs sent straight to their handlers: on a small model FastAPI's middleware
    stack and routing cost more than the forward pass, and these routes carry every request of a
    tensor model. Everything else goes through FastAPI as usual."""

    tensor_routes: dict[str, predict.TensorRoute]
    gate: _Gate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        route = self.tensor_routes.get(scope["path"]) if scope["method"] == "POST" else None
        await self.gate(scope, receive, send, route or self._through_fastapi)

    async def _through_fastapi(self, scope, receive, send) -> int:
        status = 500

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await super().__call__(scope, receive, send_with_status)
        return status


def _add_health_routes(app: FastAPI) -> None:
    @app.get("/health/live")
    async def live(request: Request) -> JSONResponse:
        state = get_state(request)
        if state.engine.failure:
            return JSONResponse({"status": "group broken", "reason": state.engine.failure}, 503)
        if state.serving and not state.batcher.alive:
            return JSONResponse({"status": "batcher stopped"}, 503)
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready")
    @app.get("/health")          # vLLM's name for it: benchmark clients (guidellm) check it first
    async def ready(request: Request) -> JSONResponse:
        state = get_state(request)
        ok, reason = state.ready()
        body = {"status": "ready" if ok else "not ready", "reason": reason,
                "ranks_alive": state.engine.ranks_alive(), "world_size": state.engine.info.world_size}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = get_state(request)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += f"; routes: {', '.join(ROUTES)}"
        return JSONResponse(error_body(message, "invalid_request_error", code), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error", "invalid_request"), 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, and Uvicorn logs the traceback.
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


class _Gate:
    """API key, X-Request-Id and request metrics, for every HTTP request. `handler` answers and
    returns the status. With --metrics-without-api-key, /metrics is open too (a Prometheus scrape
    then needs no secret; it shows counts and latencies, no request content)."""

    def __init__(self, state: ServerState):
        self.metrics = state.metrics
        self.key = state.config.api_key.encode() if state.config.api_key else None
        self.open_routes = OPEN_ROUTES + (("/metrics",) if state.config.metrics_without_api_key else ())
        self._children: dict[tuple[str, int], tuple] = {}  # prometheus children by (route, status)

    async def __call__(self, scope, receive, send, handler) -> None:
        path = scope["path"]
        started = time.monotonic()
        status = 500
        send = request_id.echoing(send, request_id.take(scope))
        try:
            if self.key is not None and path not in self.open_routes and not self._authorized(scope):
                status = await predict.send_json(send, 401, error_body(
                    "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                    "invalid_api_key"), {"www-authenticate": "Bearer"})
                return
            status = await handler(scope, receive, send)
        finally:
            count, latency = self._metric_children(path if path in ROUTES else "other", status)
            count.inc()
            latency.observe(time.monotonic() - started)

    def _metric_children(self, route: str, status: int) -> tuple:
        children = self._children.get((route, status))
        if children is None:
            children = (self.metrics.requests.labels(route, str(status)), self.metrics.latency.labels(route))
            self._children[(route, status)] = children
        return children

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

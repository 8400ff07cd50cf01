"""The FastAPI application rank 0 serves: routes, errors in the OpenAI shape, API key, metrics.

`create_app(engine, config)` needs only an `EngineClient`, so the HTTP layer never sees DeepSpeed
or the process group; batch mode runs the same application in-process.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dscluster.engine.api import EngineClient
from dscluster.serving import openai, predict
from dscluster.serving.batcher import Batcher
from dscluster.serving.metrics import Metrics
from dscluster.serving.protocol import APIError, error_body
from dscluster.serving.state import ClientGone, ServerConfig, ServerState, get_state

log = logging.getLogger(__name__)

ROUTES = ("/v1/predict", "/predict", "/v1/completions", "/v1/chat/completions", "/v1/models",
          "/health/live", "/health/ready", "/metrics")
OPEN_ROUTES = ("/health/live", "/health/ready")   # reachable without the API key (probes)


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    metrics = Metrics(engine.ranks_alive, engine.info.world_size, engine.generation_stats)
    batcher = Batcher(engine, metrics, config.max_batch_size, config.max_wait_ms / 1000.0, config.max_queue)
    state = ServerState(config=config, engine=engine, metrics=metrics, batcher=batcher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        state.serving = True
        log.info("serving %s (%s, %d rank(s))", engine.info.name, engine.info.engine, engine.info.world_size)
        try:
            yield
        finally:
            state.serving = False          # readiness turns 503 first
            batcher.stop(timeout=config.request_timeout)

    app = FastAPI(title="dscluster", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.dscluster = state
    app.include_router(predict.router)
    app.include_router(openai.router)
    _add_health_routes(app)
    _add_error_handlers(app)
    app.add_middleware(_Gate, state=state)
    return app


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
    """Pure ASGI middleware (it must not buffer streams): API key, request counts and latency."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        self.key = state.config.api_key.encode() if state.config.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        started = time.monotonic()
        status = 500

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                await _send_json(send_with_status, 401, error_body(
                    "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                    "invalid_api_key"), {"www-authenticate": "Bearer"})
                return
            await self.app(scope, receive, send_with_status)
        finally:
            metrics = self.state.metrics
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.monotonic() - started)

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False


async def _send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})

"""Answers on the HTTP port while the application cannot: before it starts (the group forms and
the model loads, which can take minutes) and after Uvicorn closes its listener (in-flight requests
drain). Probes and clients polling readiness then get 503 with a reason, not a refused connection.

`/health/live` is 200 (the process is fine, just not serving), `/health/ready` 503, every other
route 503 in the OpenAI error shape with `Retry-After`. A few threads of the standard library's
HTTP server: it must not need the event loop that is either not running yet or shutting down.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dscluster.serving.protocol import error_body

log = logging.getLogger(__name__)

MAX_DRAINED_BODY = 1 << 20  # read (and drop) at most this much of a request body before answering


class PlaceholderServer:
    def __init__(self, host: str, port: int, reason: str):
        self.host, self.port, self.reason = host, port, reason
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> bool:
        """Listen in a background thread; False (and a log line) when the port cannot be bound."""
        reason = self.reason

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = self.headers.get("Content-Length", "")
                length = int(length) if length.isdigit() else 0
                if 0 < length <= MAX_DRAINED_BODY:
                    self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                if path == "/health/live":
                    status, body = 200, {"status": "alive", "reason": reason}
                elif path == "/health/ready":
                    status, body = 503, {"status": "not ready", "reason": reason}
                else:
                    status, body = 503, error_body(f"service unavailable: {reason}; retry when /health/ready "
                                                   "answers 200", "server_error", "unavailable")
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                if status == 503:
                    self.send_header("Retry-After", "5")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

            def log_message(self, *args) -> None:  # probes every few seconds: not worth a line each
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            allow_reuse_address = True
            daemon_threads = True

        try:
            self._httpd = Server((self.host, self.port), Handler)
        except OSError as exc:
            log.warning("cannot answer on %s:%d while %s: %s", self.host, self.port, reason, exc)
            return False
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         name="dscluster-placeholder-http", daemon=True).start()
        return True

    def stop(self) -> None:
        """Stop answering and release the port (the real server binds it next)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> PlaceholderServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

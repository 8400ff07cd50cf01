"""X-Request-Id, as vLLM handles it: taken from the request (or made up), echoed on the response,
used in the completion's id and named in the log lines about the request.

The gate (serving/app.py) calls `take` for every HTTP request and sends the response through
`echoing`; handlers read the id from the ASGI scope under `REQUEST_ID_KEY`."""

from __future__ import annotations

import re
import uuid

REQUEST_ID_KEY = "dscluster.request_id"
HEADER = b"x-request-id"
_SAFE = re.compile(r"[\x21-\x7e]{1,200}")   # visible ASCII, a bounded length: safe to log and echo


def take(scope) -> str:
    """The client's X-Request-Id if it is a sensible one, else a new one; kept in the scope."""
    rid = None
    for name, value in scope["headers"]:
        if name == HEADER:
            text = value.decode("latin-1").strip()
            if _SAFE.fullmatch(text):
                rid = text
            break
    rid = rid or uuid.uuid4().hex
    scope[REQUEST_ID_KEY] = rid
    return rid


def echoing(send, rid: str):
    """`send` with X-Request-Id added to the response's headers."""
    header = (HEADER, rid.encode("latin-1"))

    async def send_with_id(message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return send_with_id

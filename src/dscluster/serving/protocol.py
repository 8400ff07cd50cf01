"""What goes over HTTP: request schemas (pydantic), the OpenAI error shape, and body parsing.

Bodies are read and parsed here, not by FastAPI, for three reasons: the size limit is enforced
while reading (a chunked body has no Content-Length), JSON's non-standard NaN and Infinity are
rejected (Python's json accepts them), and every problem becomes a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.types import Receive


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, code=code, param=param)


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not a finite number")


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 past `limit` bytes, 400 for malformed or non-finite JSON."""
    return parse_json(await read_body(request.receive, request.headers.get("content-length"), limit))


async def read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    """The whole body from the ASGI `receive`: 413 past `limit` bytes (checked while reading: a
    chunked body has no Content-Length); ClientGone when the client leaves before it is sent."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise APIError(413, f"request body is {int(content_length)} bytes; the limit is {limit}",
                       code="body_too_large")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        if not message.get("more_body", False):
            return chunk if not chunks else b"".join(chunks) + chunk
        chunks.append(chunk)


def parse_json(raw: bytes) -> Any:
    """orjson for speed; what it refuses (NaN, integers past 64 bits, lone surrogates, errors) goes
    to the standard parser, which accepts what it always accepted and names every problem."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    if not raw.strip():
        raise bad_request("request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except _NonFinite as exc:
        raise bad_request(f"body is not valid JSON: {exc}", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("body is not valid JSON: nested too deeply", code="invalid_json") from None


def parse_model(schema: type[BaseModel], data: Any) -> BaseModel:
    """Validate `data` against `schema`; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise bad_request(f"body must be a JSON object, not {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field (not supported by this server)"
        extra = f" ({len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise bad_request(f"{where}: {message}{extra}", param=where) from None


# ------------------------------------------------------------------------------------------
# OpenAI-compatible requests. Parameters the engine does not implement are accepted only at
# their neutral value, so a client never silently gets something other than what it asked for.


class _Strict(BaseModel):
    # strict: "16" is not a number and true is not 1; extra: a misspelt parameter is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False    # vLLM's: usage so far in every chunk (guidellm asks for it)


MAX_LOGPROBS = 20       # top logprobs per token, vLLM's default --max-logprobs
MAX_CHOICES = 128       # n


class _SamplingFields(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    # vLLM's extensions: stop on these token ids too; or do not stop at end-of-sequence; penalise
    # tokens of the prompt and output (CTRL's repetition penalty); draw no stop token before
    # min_tokens tokens; top_k and min_p filters.
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    top_k: int = Field(0, ge=-1)                # 0 or -1: every token
    min_p: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias for token {key} is {bias}; it must be within -100 and 100")
        return value

    def bias_pairs(self) -> list[tuple[int, float]]:
        """logit_bias as (token id, bias) pairs."""
        return [(int(k), float(b)) for k, b in (self.logit_bias or {}).items()]



# ------------------------------------------------------------------------------------------
# Structured outputs and tools (serving/structured_output.py and tool_calls.py give them meaning)

MAX_GRAMMAR_CHOICES = 1024          # structured_outputs.choice entries


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)   # "schema" is its JSON name
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None      # enforcement is always strict: the grammar allows nothing else


class ResponseFormat(_Strict):
    """OpenAI's response_format."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHOICES)
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's: no whitespace between JSON tokens. This server's default already is none (a model
    # cannot pad a reply with whitespace until it runs out of tokens); false allows any.
    disable_any_whitespace: bool | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)        # 0 only with echo: the prompt (and its logprobs)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int = Field(1, ge=1, le=1)
    suffix: None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id and friends pass through to the template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a combination this server does not take."""
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None      # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[Tool] | None = None             # messages only: rendered by the chat template, as a chat request would


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class PredictRequest(_Strict):
    inputs: list[Any] = Field(description="one example or a batch, as nested lists of numbers")

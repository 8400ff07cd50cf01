"""OpenAI-compatible text routes: /v1/completions, /v1/chat/completions, /v1/models.

A request becomes one work item per prompt. Each item decodes its tokens as they are generated
(in the batcher thread), cuts the text at a stop string and then tells the engine to stop that
item; a streamed request also pushes every new piece of text to its event queue.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dscluster.engine.api import GenerationRequest, GenerationResult, SamplingParams
from dscluster.serving.batcher import GENERATE_KEY, WorkItem
from dscluster.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    parse_model,
    read_json,
)
from dscluster.serving.state import ServerState, get_state, wait_results

router = APIRouter()

DEFAULT_CHAT_MAX_TOKENS = 256  # chat requests without max_tokens: up to this, within the context


class TextTracker:
    """Incremental detokenization with stop strings.

    Each token is decoded with a few tokens before it as context (a token may complete a multi-byte
    character, or a tokenizer may render a word's leading space only next to its neighbour), so a
    step costs the same however long the text is: this runs on the engine's thread, inside the
    step. Text that could still turn out to start a stop string is held back.
    """

    def __init__(self, tokenizer: Any, stops: list[str] | None):
        self.tokenizer = tokenizer
        self.stops = stops or []
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._prefix = 0          # ids[_prefix:_read] were decoded last time: context for the next piece
        self._read = 0
        self._prefix_text = ""
        self._finished = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one token; return the text that is now safe to send."""
        self.ids.append(token)
        if self.stopped:
            return ""
        current = self._decode(self.ids[self._prefix:])
        if len(current) <= len(self._prefix_text) or current.endswith("\ufffd"):
            return ""  # nothing new yet (an incomplete UTF-8 sequence, a special token)
        piece = current[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        searched = len(self.text)
        self.text += piece
        for stop in self.stops:
            at = self.text.find(stop, max(0, searched - len(stop) + 1))
            if at != -1:
                self.stopped = True
                self.text = self.text[:at]
        if self.stopped:
            return self.flush()
        safe = max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:safe], safe
        return delta

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def finish(self) -> str:
        """The request ended: the text is all its tokens decoded at once (a last incomplete
        character included, as a whole decode shows it), cut at a stop string; returns what is
        left to send."""
        if not self.stopped and not self._finished:
            whole = self._decode(self.ids)
            if whole.startswith(self.text):
                self.text = whole
        self._finished = True
        return self.flush()


class Choice:
    """One prompt of a request: its work item, text tracker and (when streaming) event queue."""

    def __init__(self, state: ServerState, index: int, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str] | None, events: asyncio.Queue | None):
        self.index = index
        self.tracker = TextTracker(state.engine.info.tokenizer, stops)
        self.events = events
        loop = asyncio.get_running_loop()
        self.item = WorkItem(GENERATE_KEY, GenerationRequest(tuple(prompt_ids), params), loop,
                             loop.create_future(), on_token=self._on_token)
        if events is not None:
            self.item.future.add_done_callback(lambda _: events.put_nowait((self.index, None)))

    def _on_token(self, token: int) -> bool:
        delta = self.tracker.add(token)
        if delta and self.events is not None:
            self.item.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, delta))
        return not self.tracker.stopped

    def finish_reason(self, result: GenerationResult) -> str:
        return "stop" if self.tracker.stopped or result.finish_reason == "stop" else "length"

    def final_text(self) -> str:
        self.tracker.finish()
        return self.tracker.text


# ------------------------------------------------------------------------------------------
# Validation shared by both routes


def _check_model(state: ServerState, requested: str | None) -> None:
    info = state.engine.info
    if requested is not None and requested != info.name:
        raise APIError(404, f"model {requested!r} does not exist; this server serves {info.name!r}",
                       code="model_not_found", param="model")
    if info.kind != "causal-lm" or info.tokenizer is None:
        raise APIError(400, f"model {info.name!r} is not a text-generation model with a tokenizer; "
                       "use POST /v1/predict", code="unsupported_model")
    if info.generation_unsupported:
        raise APIError(400, f"model {info.name!r} cannot generate on this server ({info.generation_unsupported}); "
                       "use POST /v1/predict", code="unsupported_model")


def _check_in_vocabulary(state: ServerState, ids: list[int], where: str) -> None:
    vocab = state.engine.info.vocab_size
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise bad_request(f"{where}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=where)


def _check_prompt(state: ServerState, ids: list[int], max_tokens: int | None, where: str,
                  default_max: int | None = None) -> int:
    """Returns max_tokens, after checking the prompt and the context length."""
    info = state.engine.info
    if not ids:
        raise bad_request(f"{where} is empty", param=where)
    _check_in_vocabulary(state, ids, where)
    context = info.max_context
    if context is not None and len(ids) >= context:
        raise bad_request(f"{where} has {len(ids)} tokens; the model's context is {context} tokens",
                          param=where, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = default_max or DEFAULT_CHAT_MAX_TOKENS
        return min(max_tokens, context - len(ids)) if context is not None else max_tokens
    if context is not None and len(ids) + max_tokens > context:
        raise bad_request(f"{where} ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                          f"{context} tokens", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _params(state: ServerState, req, max_tokens: int) -> SamplingParams:
    _check_in_vocabulary(state, req.stop_token_ids, "stop_token_ids")
    # Without a seed, draw one here: rank 0 samples, and a fixed default would make every
    # unseeded request with the same prompt return the same text.
    seed = req.seed if req.seed is not None else random.randrange(2**63)
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed,
                          stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos)


def _prompts(state: ServerState, prompt) -> list[tuple[str, list[int]]]:
    """(where, token ids) per prompt: a string, a list of token ids, or a list of either."""
    tok = state.engine.info.tokenizer
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is an empty list", param="prompt")
    if len(prompt) > state.config.max_queue:
        raise bad_request(f"prompt has {len(prompt)} prompts; at most {state.config.max_queue} per request",
                          param="prompt")
    out = []
    for i, p in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if p == "":
            raise bad_request(f"{where} is an empty string", param="prompt")
        out.append((where, tok(p)["input_ids"] if isinstance(p, str) else list(p)))
    return out


def _usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ------------------------------------------------------------------------------------------
# Routes


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = get_state(request)
    info = state.engine.info
    return {"object": "list", "data": [{
        "id": info.name, "object": "model", "created": state.started, "owned_by": "dscluster",
        "max_model_len": info.max_context, "engine": info.engine, "world_size": info.world_size,
        "kind": info.kind,
    }]}


@router.post("/v1/completions")
async def completions(request: Request):
    state = get_state(request)
    req: CompletionRequest = parse_model(CompletionRequest, await read_json(request, state.config.max_body_bytes))
    _check_model(state, req.model)
    prompts = _prompts(state, req.prompt)
    budgets = [_check_prompt(state, ids, req.max_tokens, where) for where, ids in prompts]
    events = asyncio.Queue() if req.stream else None
    choices = [Choice(state, i, ids, _params(state, req, budget), req.stop, events)
               for i, ((_, ids), budget) in enumerate(zip(prompts, budgets))]
    reply = _Reply("cmpl", "text_completion", state.engine.info.name)
    state.batcher.submit([c.item for c in choices])
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_stream(state, request, choices, events, reply, include_usage, chat=False))
    results = await wait_results([c.item for c in choices], request, state.config.request_timeout)
    return reply.body(
        choices=[{"index": c.index, "text": c.final_text(), "logprobs": None,
                  "finish_reason": c.finish_reason(r)} for c, r in zip(choices, results)],
        usage=_usage(results))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = get_state(request)
    req: ChatCompletionRequest = parse_model(ChatCompletionRequest,
                                             await read_json(request, state.config.max_body_bytes))
    _check_model(state, req.model)
    tok = state.engine.info.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, f"model {state.engine.info.name!r} has no chat template; use /v1/completions",
                       code="no_chat_template")
    try:
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
    except ValueError as exc:
        raise bad_request(f"messages: {exc}", param="messages") from None
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - templates raise for roles or orders they do not allow
        raise bad_request(f"messages: the chat template rejected them: {exc}", param="messages") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    budget = _check_prompt(state, ids, req.max_completion_tokens or req.max_tokens, "messages")
    events = asyncio.Queue() if req.stream else None
    choice = Choice(state, 0, ids, _params(state, req, budget), req.stop, events)
    reply = _Reply("chatcmpl", "chat.completion", state.engine.info.name)
    state.batcher.submit([choice.item])
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_stream(state, request, [choice], events, reply, include_usage, chat=True))
    (result,) = await wait_results([choice.item], request, state.config.request_timeout)
    return reply.body(
        choices=[{"index": 0, "message": {"role": "assistant", "content": choice.final_text()},
                  "logprobs": None, "finish_reason": choice.finish_reason(result)}],
        usage=_usage([result]))


# ------------------------------------------------------------------------------------------
# Responses and server-sent events


class _Reply:
    def __init__(self, prefix: str, obj: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.object = obj
        self.model = model
        self.created = int(time.time())

    def body(self, **fields) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, **fields}

    def chunk(self, **fields) -> dict:
        obj = self.object + ".chunk" if self.object == "chat.completion" else self.object
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, **fields}


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def encode() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(state: ServerState, request: Request, choices: list[Choice], events: asyncio.Queue,
                  reply: _Reply, include_usage: bool, chat: bool) -> AsyncIterator[dict | str]:
    """Chunks as tokens arrive; the request timeout applies until the first token."""

    def piece(index: int, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return reply.chunk(choices=[{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return reply.chunk(choices=[{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}])

    pending = {c.index: c for c in choices}
    results: list[GenerationResult] = []
    deadline = time.monotonic() + state.config.request_timeout if state.config.request_timeout else None
    try:
        if chat:
            yield piece(0, "", role=True)
        while pending:
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                index, delta = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                yield {"error": {"message": f"no token within {state.config.request_timeout:g} s",
                                 "type": "timeout", "param": None, "code": "timeout"}}
                break
            deadline = None
            if delta is not None:
                yield piece(index, delta)
                continue
            choice = pending.pop(index)
            error = choice.item.future.exception()
            if error is not None:
                body = error.body() if isinstance(error, APIError) else {
                    "error": {"message": str(error), "type": "server_error", "param": None, "code": None}}
                yield body
                break
            result = choice.item.future.result()
            results.append(result)
            tail = choice.tracker.finish()
            if tail:
                yield piece(index, tail)
            yield piece(index, None if chat else "", finish=choice.finish_reason(result))
        else:
            if include_usage:
                yield reply.chunk(choices=[], usage=_usage(results))
        yield "[DONE]"
    finally:
        for choice in choices:  # the client went away, or an error ended the stream early
            choice.item.cancelled = True

"""OpenAI-compatible text routes: /v1/completions, /v1/chat/completions, /v1/models.

A request becomes one work item per prompt. Each item decodes its tokens as they are generated
(in the batcher thread), cuts the text at a stop string and then tells the engine to stop that
item; a streamed request also pushes every new piece of text to its event queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dscluster.engine.api import GenerationRequest, GenerationResult, SamplingParams, TokenLogprobs
from dscluster.engine.grammar import GrammarSpec, GrammarState
from dscluster.serving.batcher import GENERATE_KEY, WorkItem
from dscluster.serving.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs
from dscluster.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    StreamOptions,
    bad_request,
    parse_model,
    read_json,
)
from dscluster.serving.request_id import REQUEST_ID_KEY
from dscluster.serving.state import ServerState, get_state, wait_results
from dscluster.serving.structured_output import response_format_spec, structured_outputs_spec
from dscluster.serving.tool_calls import ToolPlan, ToolReply, history_for_template

router = APIRouter()
log = logging.getLogger(__name__)

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
    """One choice of a request (a prompt, or one of its n samples): its work item, text tracker,
    logprobs, and (when streaming) the event queue it shares with the other choices.

    The engine's thread calls `_on_token` and `_on_prompt_logprobs`; a streamed choice pushes
    (index, text or PROMPT, tokens generated so far) to the queue, and None when it is done. A
    request that asked for logprobs has one per token, so the count also says which logprobs
    belong to the text pushed."""

    def __init__(self, state: ServerState, index: int, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str] | None, events: asyncio.Queue | None, echo: str | None = None,
                 counts_prompt: bool = True, request_id: str | None = None, grammar: GrammarState | None = None,
                 reply: ToolReply | None = None):
        self.index = index
        self.reply = reply or ToolReply("text")   # chat: the text as a message, or as tool calls
        self.prompt_ids = prompt_ids
        self.params = params
        self.echo = echo                          # the prompt's text, sent before the completion
        self.counts_prompt = counts_prompt        # the first choice of its prompt counts its tokens
        self.tracker = TextTracker(state.engine.info.tokenizer, stops)
        self.logprobs: list[TokenLogprobs] = []   # one per generated token, when asked
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.sent_logprobs = 0                    # stream: logprobs already in a chunk
        self.tokens = 0                           # generated so far (the engine's thread counts)
        self.events = events
        loop = asyncio.get_running_loop()
        self.item = WorkItem(GENERATE_KEY, GenerationRequest(tuple(prompt_ids), params, grammar), loop,
                             loop.create_future(), on_token=self._on_token,
                             on_prompt_logprobs=self._on_prompt_logprobs, request_id=request_id)
        if events is not None:
            self.item.future.add_done_callback(lambda _: events.put_nowait((self.index, None, 0)))

    def _push(self, what: str) -> None:
        self.item.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, what, self.tokens))

    def _on_token(self, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        self.tokens += 1
        if logprobs is not None:
            self.logprobs.append(logprobs)
        delta = self.tracker.add(token)
        if delta and self.events is not None:
            self._push(delta)
        return not self.tracker.stopped

    def _on_prompt_logprobs(self, logprobs: list[TokenLogprobs | None]) -> None:
        self.prompt_logprobs = logprobs
        if self.events is not None and self.echo is not None:
            self._push(PROMPT)

    def finish_reason(self, result: GenerationResult) -> str:
        return "stop" if self.tracker.stopped or result.finish_reason == "stop" else "length"

    def final_text(self) -> str:
        self.tracker.finish()
        return self.tracker.text

    def unsent_logprobs(self, upto: int | None = None) -> list[TokenLogprobs]:
        upto = len(self.logprobs) if upto is None else upto
        entries, self.sent_logprobs = self.logprobs[self.sent_logprobs:upto], max(self.sent_logprobs, upto)
        return entries


PROMPT = "\0prompt"    # stream event: the echoed prompt (and its logprobs) are ready


# ------------------------------------------------------------------------------------------
# Validation shared by both routes


def check_model(state: ServerState, requested: str | None) -> None:
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


def check_in_vocabulary(state: ServerState, ids: list[int], where: str) -> None:
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
    check_in_vocabulary(state, ids, where)
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


def _params(state: ServerState, req, max_tokens: int, logprobs: int | None = None,
            prompt_logprobs: int | None = None) -> SamplingParams:
    check_in_vocabulary(state, req.stop_token_ids, "stop_token_ids")
    bias = req.bias_pairs()
    check_in_vocabulary(state, [t for t, _ in bias], "logit_bias")
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({req.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens")
    # Without a seed, draw one here: rank 0 samples, and a fixed default would make every
    # unseeded request with the same prompt return the same text.
    seed = req.seed if req.seed is not None else random.randrange(2**63)
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=max(0, req.top_k), min_p=req.min_p, seed=seed,
                          stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
                          min_tokens=req.min_tokens, presence_penalty=req.presence_penalty,
                          frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                          logit_bias=tuple(bias), logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _one_spec(req, tools: ToolPlan | None = None) -> tuple[str, GrammarSpec] | None:
    """The grammar a request asks for: by response_format, structured_outputs or a forced tool
    call; at most one of them."""
    asked = [(name, spec) for name, spec in (
        ("response_format", response_format_spec(getattr(req, "response_format", None))),
        ("structured_outputs", structured_outputs_spec(getattr(req, "structured_outputs", None))),
        ("tool_choice", tools.grammar() if tools is not None else None)) if spec is not None]
    if len(asked) > 1:
        raise bad_request(f"{asked[0][0]} and {asked[1][0]} both constrain the reply; give one",
                          param=asked[1][0])
    return asked[0] if asked else None


async def _grammar_states(state: ServerState, asked: tuple[str, GrammarSpec] | None,
                          count: int) -> list[GrammarState | None]:
    """One grammar state per choice (compiled off the event loop; a 400 if it cannot be)."""
    if asked is None:
        return [None] * count
    if state.grammars is None:
        raise bad_request("this model has no tokenizer to enforce structured outputs with", code="unsupported_model")
    return await state.grammars.states(asked[1], count, asked[0])


def _prompts(state: ServerState, prompt) -> list[tuple[str, list[int], str | None]]:
    """(where, token ids, text if given as text) per prompt: a string, a list of token ids, or a
    list of either."""
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
        if isinstance(p, str):
            out.append((where, tok(p)["input_ids"], p))
        else:
            out.append((where, list(p), None))
    return out


def _usage(choices: list[Choice], results: list[GenerationResult]) -> dict:
    """Prompt tokens once per prompt, however many choices it has (as OpenAI and vLLM count them);
    completion tokens of every choice."""
    prompt = sum(r.prompt_tokens for c, r in zip(choices, results) if c.counts_prompt)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_choices(state: ServerState, count: int) -> None:
    if count > state.config.max_queue:
        raise bad_request(f"the request asks for {count} choices (prompts x n); at most {state.config.max_queue} "
                          "per request", param="n")


# ------------------------------------------------------------------------------------------
# Routes


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = get_state(request)
    info = state.engine.info
    return {"object": "list", "data": [{
        "id": info.name, "object": "model", "created": state.started, "owned_by": "dscluster",
        "max_model_len": info.max_context, "engine": info.engine, "world_size": info.world_size,
        "pipeline_parallel_size": info.pipeline_parallel,
        "kind": info.kind,
    }]}


@router.post("/v1/completions")
async def completions(request: Request):
    state = get_state(request)
    req: CompletionRequest = parse_model(CompletionRequest, await read_json(request, state.config.max_body_bytes))
    check_model(state, req.model)
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens 0 asks for nothing: it is allowed only with echo (the prompt and, "
                          "with logprobs, its logprobs)", param="max_tokens")
    prompts = _prompts(state, req.prompt)
    _check_choices(state, len(prompts) * req.n)
    budgets = [_check_prompt(state, ids, req.max_tokens, where) for where, ids, _ in prompts]
    grammars = await _grammar_states(state, _one_spec(req), len(prompts) * req.n)
    tok = state.engine.info.tokenizer
    rid = request_id(request)
    events = asyncio.Queue() if req.stream else None
    choices = []
    for p, ((_, ids, text), budget) in enumerate(zip(prompts, budgets)):
        params = _params(state, req, budget, logprobs=req.logprobs,
                         prompt_logprobs=req.logprobs if req.echo else None)
        echo = (text if text is not None else tok.decode(ids)) if req.echo else None
        choices += [Choice(state, p * req.n + i, ids, params.for_choice(i), req.stop, events, echo, i == 0, rid,
                           grammars[p * req.n + i]) for i in range(req.n)]
    reply = _Reply("cmpl", "text_completion", state.engine.info.name, rid)
    log.info("request %s: completion, %d prompt(s) x n=%d, max_tokens %s%s", rid, len(prompts), req.n,
             req.max_tokens, ", streamed" if req.stream else "")
    state.batcher.submit([c.item for c in choices])
    texts = TokenTexts(tok)
    if req.stream:
        return _sse(_stream(state, request, choices, events, reply, req.stream_options, texts, chat=False))
    results = await wait_results([c.item for c in choices], request, state.config.request_timeout)
    body = []
    for c, r in zip(choices, results):
        text = c.final_text()
        logprobs = None
        if req.logprobs is not None:
            fmt = CompletionLogprobs(texts)
            blocks = []
            if c.echo is not None:
                blocks.append(fmt.block(c.prompt_ids, r.prompt_logprobs or [None] * len(c.prompt_ids)))
            blocks.append(fmt.block(r.token_ids, r.logprobs or []))
            logprobs = {key: [v for b in blocks for v in b[key]] for key in blocks[0]}
        body.append({"index": c.index, "text": (c.echo or "") + text, "logprobs": logprobs,
                     "finish_reason": c.finish_reason(r)})
    return reply.body(choices=body, usage=_usage(choices, results))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = get_state(request)
    req: ChatCompletionRequest = parse_model(ChatCompletionRequest,
                                             await read_json(request, state.config.max_body_bytes))
    check_model(state, req.model)
    problem = req.unsupported()
    if problem is not None:
        raise bad_request(f"{problem[0]}: {problem[1]}", param=problem[0], code="unsupported_parameter")
    tools = ToolPlan(req.tools, req.tool_choice, req.parallel_tool_calls, state.config.tool_call_parser)
    ids = chat_prompt_ids(state, req.messages, tools=tools.template_tools())
    _check_choices(state, req.n)
    budget = _check_prompt(state, ids, req.max_completion_tokens or req.max_tokens, "messages")
    grammars = await _grammar_states(state, _one_spec(req, tools), req.n)
    events = asyncio.Queue() if req.stream else None
    params = _params(state, req, budget, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    rid = request_id(request)
    choices = [Choice(state, i, ids, params.for_choice(i), req.stop, events, counts_prompt=i == 0, request_id=rid,
                      grammar=grammars[i], reply=tools.reply()) for i in range(req.n)]
    reply = _Reply("chatcmpl", "chat.completion", state.engine.info.name, rid)
    log.info("request %s: chat completion of %d prompt tokens, n=%d, max_tokens %d%s", rid, len(ids), req.n,
             budget, ", streamed" if req.stream else "")
    state.batcher.submit([c.item for c in choices])
    texts = TokenTexts(state.engine.info.tokenizer)
    if req.stream:
        return _sse(_stream(state, request, choices, events, reply, req.stream_options, texts, chat=True))
    results = await wait_results([c.item for c in choices], request, state.config.request_timeout)
    return reply.body(
        choices=[{"index": c.index, "message": c.reply.message(c.final_text()),
                  "logprobs": chat_logprobs(texts, r.logprobs or []) if req.logprobs else None,
                  "finish_reason": c.reply.finish_reason(c.finish_reason(r))} for c, r in zip(choices, results)],
        usage=_usage(choices, results))


def chat_prompt_ids(state: ServerState, messages: list, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
    """Chat messages (and the tools the model may call) rendered with the tokenizer's chat
    template, as token ids (400s for what the template or the content parts do not allow)."""
    tok = state.engine.info.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, f"model {state.engine.info.name!r} has no chat template; use /v1/completions",
                       code="no_chat_template")
    try:
        rendered = [history_for_template({**m.model_dump(exclude_none=True), "content": m.text()}) for m in messages]
    except ValueError as exc:
        raise bad_request(f"messages: {exc}", param="messages") from None
    try:
        text = tok.apply_chat_template(rendered, tools=tools, add_generation_prompt=add_generation_prompt,
                                       tokenize=False)
    except Exception as exc:  # noqa: BLE001 - templates raise for roles or orders they do not allow
        raise bad_request(f"messages: the chat template rejected them: {exc}", param="messages") from None
    return tok(text, add_special_tokens=False)["input_ids"]


def request_id(request: Request) -> str:
    """The request's id (X-Request-Id, or the one the gate made up)."""
    return request.scope.get(REQUEST_ID_KEY) or uuid.uuid4().hex


# ------------------------------------------------------------------------------------------
# Responses and server-sent events


class _Reply:
    def __init__(self, prefix: str, obj: str, model: str, rid: str):
        self.id = f"{prefix}-{rid}"
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
                  reply: _Reply, options: StreamOptions | None, texts: TokenTexts, chat: bool
                  ) -> AsyncIterator[dict | str]:
    """Chunks as tokens arrive, each with the logprobs of its tokens when asked; the request
    timeout applies until the first token. `include_usage`: a last chunk with the usage;
    `continuous_usage_stats` (vLLM's): each chunk also carries its choice's usage so far."""
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    by_index = {c.index: c for c in choices}
    formats = {c.index: CompletionLogprobs(texts) for c in choices}

    def logprobs_of(choice: Choice, upto: int | None) -> dict | None:
        if choice.params.logprobs is None:
            return None
        entries = choice.unsent_logprobs(upto)
        if chat:
            return chat_logprobs(texts, entries)
        return formats[choice.index].block([e.token for e in entries], entries)

    def piece(index: int, text: str | None = None, finish: str | None = None, role: bool = False,
              logprobs: dict | None = None, tokens: int = 0, delta: dict | None = None) -> dict:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {}) | \
                (delta or {})
            body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            body = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if not continuous:
            return reply.chunk(choices=[body])
        prompt = len(by_index[index].prompt_ids)
        return reply.chunk(choices=[body], usage={"prompt_tokens": prompt, "completion_tokens": tokens,
                                                  "total_tokens": prompt + tokens})

    def echoed(choice: Choice) -> dict:
        logprobs = None
        if choice.params.prompt_logprobs is not None:
            logprobs = formats[choice.index].block(choice.prompt_ids, choice.prompt_logprobs)
        return piece(choice.index, choice.echo, logprobs=logprobs)

    pending = dict(by_index)
    results: list[tuple[Choice, GenerationResult]] = []
    deadline = time.monotonic() + state.config.request_timeout if state.config.request_timeout else None
    try:
        for choice in choices:
            if chat:
                yield piece(choice.index, "", role=True)
            elif choice.echo is not None and choice.params.prompt_logprobs is None:
                yield echoed(choice)            # nothing to wait for
        while pending:
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                index, delta, known = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                yield {"error": {"message": f"no token within {state.config.request_timeout:g} s",
                                 "type": "timeout", "param": None, "code": "timeout"}}
                break
            deadline = None
            choice = by_index[index]
            if delta == PROMPT:
                yield echoed(choice)
                continue
            if delta is not None and chat:      # the reply's deltas: content, or tool calls
                for d in choice.reply.feed(delta):
                    yield piece(index, delta=d, logprobs=logprobs_of(choice, known), tokens=known)
                continue
            if delta is not None:
                yield piece(index, delta, logprobs=logprobs_of(choice, known), tokens=known)
                continue
            pending.pop(index)
            error = choice.item.future.exception()
            if error is not None:
                body = error.body() if isinstance(error, APIError) else {
                    "error": {"message": str(error), "type": "server_error", "param": None, "code": None}}
                yield body
                break
            result = choice.item.future.result()
            results.append((choice, result))
            tail = choice.tracker.finish()
            done = len(result.token_ids)
            if chat:
                deltas = choice.reply.feed(tail) + choice.reply.finish()
                if not deltas and choice.sent_logprobs < len(choice.logprobs):
                    deltas = [{"content": ""}]
                for d in deltas:
                    yield piece(index, delta=d, logprobs=logprobs_of(choice, None), tokens=done)
                yield piece(index, finish=choice.reply.finish_reason(choice.finish_reason(result)), tokens=done)
                continue
            if tail or choice.sent_logprobs < len(choice.logprobs):
                yield piece(index, tail, logprobs=logprobs_of(choice, None), tokens=done)
            yield piece(index, "", finish=choice.finish_reason(result), tokens=done)
        else:
            if include_usage:
                yield reply.chunk(choices=[], usage=_usage([c for c, _ in results], [r for _, r in results]))
        yield "[DONE]"
    finally:
        for choice in choices:  # the client went away, or an error ended the stream early
            choice.item.cancelled = True

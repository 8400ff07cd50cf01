"""Structured outputs over HTTP: what a request asks for (OpenAI's `response_format`, vLLM's
`structured_outputs`, a forced tool call) becomes a `GrammarSpec`, compiled off the event loop
before the request is queued, so a schema or grammar that cannot compile is a 400 that never
reaches the engine.

The enforcement itself is the engine's (engine/grammar.py, rank 0 only): a token mask per step.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from dscluster.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec, GrammarState
from dscluster.serving.protocol import ResponseFormat, StructuredOutputs, bad_request


def check_schema(schema: Any, where: str) -> dict | bool:
    """A JSON schema that is one (per the 2020-12 metaschema), or a 400 naming the problem."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad_request(f"{where}: not valid JSON: {exc}", param=where) from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{where}: a JSON schema is an object, not {type(schema).__name__}", param=where)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise bad_request(f"{where}: invalid JSON schema{' at ' + path if path else ''}: {exc.message}",
                          param=where) from None
    return schema


def response_format_spec(fmt: ResponseFormat | None) -> GrammarSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec.json_schema({"type": "object"})
    if fmt.json_schema is None:
        raise bad_request("response_format: type json_schema needs a json_schema object", param="response_format")
    schema = fmt.json_schema.schema_
    return GrammarSpec.json_schema(check_schema(schema if schema is not None else {"type": "object"},
                                                "response_format.json_schema.schema"))


def structured_outputs_spec(so: StructuredOutputs | None) -> GrammarSpec | None:
    if so is None:
        return None
    asked = [name for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                      ("grammar", so.grammar), ("json_object", so.json_object or None))
             if value is not None]
    if len(asked) != 1:
        raise bad_request("structured_outputs: give exactly one of json, regex, choice, grammar, json_object"
                          + (f" (got {', '.join(asked)})" if asked else ""), param="structured_outputs")
    flexible = so.disable_any_whitespace is False
    if so.json_ is not None:
        return GrammarSpec.json_schema(check_schema(so.json_, "structured_outputs.json"), flexible)
    if so.json_object:
        return GrammarSpec.json_schema({"type": "object"}, flexible)
    if so.regex is not None:
        return GrammarSpec("regex", so.regex)
    if so.choice is not None:
        return GrammarSpec.choice(so.choice)
    return GrammarSpec("grammar", so.grammar)


class Grammars:
    """The server's compiler (built on first use: the tokenizer's conversion takes a moment) and
    compilation off the event loop."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]):
        self._args = (tokenizer, vocab_size, eos_ids)
        self._compiler: GrammarCompiler | None = None

    def _compile(self, spec: GrammarSpec, count: int) -> list[GrammarState]:
        if self._compiler is None:
            try:
                self._compiler = GrammarCompiler(*self._args)
            except Exception as exc:  # noqa: BLE001 - e.g. a slow (Python) tokenizer llguidance cannot read
                raise GrammarError(f"this model's tokenizer cannot be used for structured outputs ({exc})") from None
        return [self._compiler.compile(spec) for _ in range(count)]

    async def states(self, spec: GrammarSpec, count: int, where: str) -> list[GrammarState]:
        """`count` fresh states of `spec` (one per choice), or a 400 when it cannot compile. A
        grammar compiled before is copied here; a new one is compiled on a worker thread."""
        first = self._compiler.cached(spec) if self._compiler is not None else None
        if first is not None:
            return [first] + [self._compiler.compile(spec) for _ in range(count - 1)]   # copies of the cached one
        try:
            return await asyncio.to_thread(self._compile, spec, count)
        except GrammarError as exc:
            raise bad_request(f"{where}: cannot be enforced: {exc}", param=where, code="invalid_grammar") from None

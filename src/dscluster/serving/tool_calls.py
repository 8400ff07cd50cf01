"""Tool calls: OpenAI's `tools` and `tool_choice` in, `message.tool_calls` out.

Tools reach the prompt through the model's own chat template (`apply_chat_template(tools=...)`).
What comes back depends on `tool_choice`, as in vLLM:

- `"auto"`: the model decides. Its output is parsed with the server's `--tool-call-parser`
  (`hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the form of Hermes, Qwen
  and the tiny model's template; `llama3_json`: the reply is `{"name": ..., "parameters": {...}}`,
  several separated by `;`, as Llama 3.1-3.3 write them); text outside the calls is the content.
- `"required"`: decoding is held to a JSON array of calls, `[{"name": ..., "parameters": {...}}]`,
  one of the tools each, with its parameters' schema (at most one call when parallel_tool_calls
  is false), so whatever the model, the reply is a valid call.
- a named function: decoding is held to that function's parameters schema; the output is its
  arguments.
- `"none"`: plain text, nothing parsed.

`ToolReply` turns one choice's text into the message (or the streamed deltas) and its finish
reason: `tool_calls` when it made calls and ended by itself.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Literal

from dscluster.engine.grammar import GrammarSpec
from dscluster.serving.protocol import NamedToolChoice, Tool, ToolChoice, bad_request
from dscluster.serving.structured_output import check_schema

DEFAULT_PARSER = "hermes"


Mode = Literal["text", "auto", "required", "named"]


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object", "properties": {}}


class ToolPlan:
    """What a chat request's tools mean for its prompt, its grammar and its reply."""

    def __init__(self, tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None, parser: str):
        self.tools = tools or []
        self.parallel = parallel is not False
        self.parser = parser
        self.named: str | None = None
        if choice is not None and not self.tools and choice != "none":
            raise bad_request("tool_choice needs tools", param="tool_choice")
        for i, tool in enumerate(self.tools):
            check_schema(_parameters(tool), f"tools[{i}].function.parameters")
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise bad_request("tools: two functions have the same name", param="tools")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise bad_request(f"tool_choice: function {choice.function.name!r} is not among the tools",
                                  param="tool_choice")
            self.named = choice.function.name
            self.mode: Mode = "named"
        elif not self.tools or choice == "none":
            self.mode = "text"
        elif choice == "required":
            self.mode = "required"
        else:                                   # "auto", the default when tools are given
            if parser == "none":
                raise bad_request('tool_choice "auto" needs the server started with --tool-call-parser '
                                  f"({', '.join(PARSERS)})", param="tool_choice")
            self.mode = "auto"

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template takes them."""
        return [t.model_dump(exclude_none=True) for t in self.tools] or None

    def grammar(self) -> GrammarSpec | None:
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.named)
            return GrammarSpec.json_schema(_parameters(tool))
        if self.mode == "required":
            call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                               "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)}}
                              for t in self.tools]}
            schema = {"type": "array", "minItems": 1, "items": call}
            if not self.parallel:
                schema["maxItems"] = 1
            return GrammarSpec.json_schema(schema)
        return None

    def reply(self) -> ToolReply:
        return ToolReply(self.mode, self.named, self.parser)


def history_for_template(message: dict) -> dict:
    """An assistant message's tool calls as templates read them: arguments as an object (OpenAI
    sends a JSON string), as vLLM passes them."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    fixed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function = {**function, "arguments": json.loads(function["arguments"])}
            except ValueError:
                pass
            call = {**call, "function": function}
        fixed.append(call)
    return {**message, "tool_calls": fixed}


def new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


def _call_from(parsed: object) -> dict | None:
    """A call from a parsed {"name", "arguments" (or "parameters")} object, else None."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    return new_call(parsed["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def _hermes_call(body: str) -> dict | None:
    try:
        return _call_from(json.loads(body))
    except ValueError:
        return None


def parse_hermes(text: str) -> tuple[str, list[dict]]:
    """(content outside the calls, the calls). A block that is not a call stays in the content."""
    calls, content, last = [], [], 0
    for match in _HERMES.finditer(text):
        call = _hermes_call(match.group(1))
        if call is None:
            continue
        content.append(text[last:match.start()])
        calls.append(call)
        last = match.end()
    content.append(text[last:])
    return "".join(content).strip() if calls else text, calls


def parse_llama3_json(text: str) -> tuple[str, list[dict]]:
    """Llama 3.x's JSON tool calls: the whole reply is `{"name": ..., "parameters": {...}}`, several
    separated by `;` (its `<|python_tag|>` is a special token, gone from the text). Anything else is
    content."""
    rest, calls, decoder = text.strip(), [], json.JSONDecoder()
    while rest.startswith("{"):
        try:
            parsed, end = decoder.raw_decode(rest)
        except ValueError:
            return text, []
        call = _call_from(parsed)
        if call is None:
            return text, []
        calls.append(call)
        rest = rest[end:].lstrip().removeprefix(";").lstrip()
    return (text, []) if rest or not calls else ("", calls)


class HermesStream:
    """`<tool_call>` blocks out of a streamed reply: text streams as it comes, holding back only
    what could be the start of the tag; a call is sent whole when its closing tag arrives."""

    def __init__(self):
        self.calls: list[dict] = []
        self._text = ""
        self._in_call = False

    def feed(self, text: str, final: bool = False) -> list[dict]:
        self._text += text
        deltas = []
        while self._text:
            if not self._in_call:
                at = self._text.find(HERMES_START)
                if at == -1:
                    keep = 0 if final else _partial_suffix(self._text, HERMES_START)
                    send, self._text = self._text[:len(self._text) - keep], self._text[len(self._text) - keep:]
                    if send:
                        deltas.append({"content": send})
                    break
                if at:
                    deltas.append({"content": self._text[:at]})
                self._text, self._in_call = self._text[at:], True
            end = self._text.find(HERMES_END)
            if end == -1:
                if final:               # never closed: it was text after all
                    deltas.append({"content": self._text})
                    self._text = ""
                break
            block, self._text = self._text[:end + len(HERMES_END)], self._text[end + len(HERMES_END):]
            self._in_call = False
            match = _HERMES.match(block)
            call = _hermes_call(match.group(1)) if match else None
            if call is None:
                deltas.append({"content": block})
            else:
                self.calls.append(call)
                deltas.append(_call_deltas([call], len(self.calls) - 1))
        return deltas


class Llama3JsonStream:
    """A reply that starts with `{` is held and parsed whole at the end; any other streams as text."""

    def __init__(self):
        self.calls: list[dict] = []
        self._text = ""
        self._held: bool | None = None      # undecided until the first non-blank character

    def feed(self, text: str, final: bool = False) -> list[dict]:
        self._text += text
        if self._held is None and self._text.strip():
            self._held = self._text.lstrip().startswith("{")
        if self._held is False or (self._held is None and final):
            out, self._text = self._text, ""
            return [{"content": out}] if out else []
        if not final:
            return []
        content, self.calls = parse_llama3_json(self._text)
        self._text = ""
        return [_call_deltas(self.calls, 0)] if self.calls else ([{"content": content}] if content else [])


PARSERS = {"hermes": (parse_hermes, HermesStream), "llama3_json": (parse_llama3_json, Llama3JsonStream)}
PARSER_NAMES = (*PARSERS, "none")


class ToolReply:
    """One choice's text -> its message, or its streamed deltas, and its finish reason."""

    def __init__(self, mode: Mode, named: str | None = None, parser: str = DEFAULT_PARSER):
        self.mode = mode
        self.named = named
        self.calls: list[dict] = []
        self._parse, stream = PARSERS.get(parser, PARSERS[DEFAULT_PARSER])
        self._stream = stream()
        self._text = ""             # what has not been sent yet (required)
        self._named_started = False

    # -- whole replies ----------------------------------------------------------------------
    def message(self, text: str) -> dict:
        if self.mode == "named":
            self.calls = [new_call(self.named, text)]
            return {"role": "assistant", "content": None, "tool_calls": self.calls}
        if self.mode == "required":
            self.calls = _required_calls(text)
            if self.calls:
                return {"role": "assistant", "content": None, "tool_calls": self.calls}
            return {"role": "assistant", "content": text}
        if self.mode == "auto":
            content, self.calls = self._parse(text)
            if self.calls:
                return {"role": "assistant", "content": content or None, "tool_calls": self.calls}
        return {"role": "assistant", "content": text}

    def finish_reason(self, reason: str) -> str:
        """`tool_calls` for a reply that made calls and ended by itself; a cut reply says length."""
        return "tool_calls" if self.calls and reason == "stop" else reason

    # -- streamed replies -------------------------------------------------------------------
    def feed(self, text: str) -> list[dict]:
        """The deltas to send for this new piece of text."""
        if self.mode == "text":
            return [{"content": text}] if text else []
        if self.mode == "named":
            deltas = []
            if not self._named_started:
                self._named_started = True
                self.calls = [new_call(self.named, "")]
                call = self.calls[0]
                deltas.append({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                               "function": {"name": self.named, "arguments": ""}}]})
            if text:
                self.calls[0]["function"]["arguments"] += text
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas
        if self.mode == "required":
            self._text += text
            return []                   # sent whole at the end: the array parses only then
        deltas = self._stream.feed(text)
        self.calls = self._stream.calls
        return deltas

    def finish(self) -> list[dict]:
        """The deltas still owed when the choice ends."""
        if self.mode == "named":
            return self.feed("") if not self._named_started else []
        if self.mode == "required":
            self.calls = _required_calls(self._text)
            if self.calls:
                return [_call_deltas(self.calls, 0)]
            text, self._text = self._text, ""
            return [{"content": text}] if text else []
        if self.mode == "auto":
            deltas = self._stream.feed("", final=True)
            self.calls = self._stream.calls
            return deltas
        return []


def _call_deltas(calls: list[dict], first_index: int) -> dict:
    return {"tool_calls": [{"index": first_index + i, **call} for i, call in enumerate(calls)]}


def _required_calls(text: str) -> list[dict]:
    try:
        parsed = json.loads(text)
    except ValueError:
        return []
    if not isinstance(parsed, list):
        return []
    return [new_call(c["name"], json.dumps(c.get("parameters", {}))) for c in parsed
            if isinstance(c, dict) and isinstance(c.get("name"), str)]


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

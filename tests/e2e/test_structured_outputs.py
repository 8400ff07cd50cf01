"""Structured outputs and tool calls against a real 2-rank server (DeepSpeed tensor parallel over
gloo) with the official `openai` client. The model has random weights, so only enforcement while
decoding can make a reply valid: every reply is checked with `json.loads` and `jsonschema` (or
Python's `re` for regular expressions), references that are not this server's code.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import openai
import pytest


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "member": {"type": "boolean"},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b", "c"]}}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
CLOCK = {"type": "object", "additionalProperties": False, "required": ["zone"],
         "properties": {"zone": {"type": "string", "maxLength": 8}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def _person_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def _check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_json_schema_replies_parse_validate_and_stop(client):
    for seed in range(3):
        reply = client.chat.completions.create(model="tiny", messages=ASK, n=2, seed=seed, max_tokens=120,
                                               response_format=_person_format())
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_replies_parse_and_a_cut_reply_says_length(client):
    stopped = 0
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=ASK, seed=seed, max_tokens=300,
                                               response_format={"type": "json_object"})
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(choice.message.content), dict)
        else:       # random weights may write a long object: cut, and honest about it
            assert choice.finish_reason == "length" and reply.usage.completion_tokens == 300
    assert stopped >= 1
    cut = client.chat.completions.create(model="tiny", messages=ASK, seed=0, max_tokens=4,
                                         response_format=_person_format())
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4
    with pytest.raises(ValueError):
        json.loads(cut.choices[0].message.content)


def test_streamed_json_schema_joins_into_valid_json(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, seed=5, max_tokens=120, stream=True,
                                            response_format=_person_format(), logprobs=True)
    text, finish, logprobs = "", None, 0
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            logprobs += len(choice.logprobs.content or []) if choice.logprobs else 0
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    assert logprobs > 0


def test_tool_choice_required_gives_valid_calls(client):
    for seed, parallel in ((1, True), (2, False), (3, None)):
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                               seed=seed, max_tokens=200, **extra)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and choice.message.tool_calls
        if parallel is False:
            assert len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            _check_call(call)


def test_named_tool_choice_gives_that_call_streamed_or_not(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, seed=4,
                                           max_tokens=60)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and reply.choices[0].finish_reason == "tool_calls"
    _check_call(call)
    # The streamed deltas, assembled by the openai client's own stream helper.
    with client.chat.completions.stream(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, seed=4,
                                        max_tokens=60) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls
    assert streamed.function.name == "get_weather" and streamed.function.arguments == call.function.arguments
    with client.chat.completions.stream(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=1,
                                        max_tokens=200) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    for call in final.choices[0].message.tool_calls:
        _check_call(call)


def test_auto_parses_the_models_tool_call_syntax_and_takes_tool_history(client):
    # Random weights never write a call by themselves: a regular expression holds the reply to the
    # Hermes form, and the parser (not the grammar) must find the call in it, streamed or not.
    form = r'Sure\. <tool_call>\{"name": "get_time", "arguments": \{"zone": "[a-z]{1,6}"\}\}</tool_call>'
    for stream in (False, True):
        kwargs = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="auto", seed=6, max_tokens=60,
                      extra_body={"structured_outputs": {"regex": form}})
        if stream:
            with client.chat.completions.stream(**kwargs) as s:
                reply = s.get_final_completion()
        else:
            reply = client.chat.completions.create(**kwargs)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content.strip() == "Sure."
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time"
        _check_call(call)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
                     {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    again = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5, seed=1)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice none: plain text, nothing parsed
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                           max_tokens=60, seed=6, extra_body={"structured_outputs": {"regex": form}})
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


def test_completions_structured_outputs_choice_regex_grammar_json(client):
    options = ["yes", "no", "maybe not"]
    for seed in range(3):
        reply = client.completions.create(model="tiny", prompt="Is it raining?", max_tokens=10, seed=seed, n=2,
                                          extra_body={"structured_outputs": {"choice": options}})
        for choice in reply.choices:
            assert choice.text in options and choice.finish_reason == "stop"
        reply = client.completions.create(model="tiny", prompt="Phone:", max_tokens=20, seed=seed,
                                          extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", reply.choices[0].text), reply.choices[0].text
        gbnf = 'root ::= "SELECT " col " FROM " tbl\ncol ::= "id" | "name"\ntbl ::= [a-z] [a-z]?'
        reply = client.completions.create(model="tiny", prompt="SQL:", max_tokens=20, seed=seed,
                                          extra_body={"structured_outputs": {"grammar": gbnf}})
        assert re.fullmatch(r"SELECT (id|name) FROM [a-z][a-z]?", reply.choices[0].text), reply.choices[0].text
        reply = client.completions.create(model="tiny", prompt="Person:", max_tokens=120, seed=seed,
                                          extra_body={"structured_outputs": {"json": PERSON}})
        jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_logprobs_under_a_grammar_are_those_it_allows(client):
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10, seed=3, logprobs=True,
                                           top_logprobs=5, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    choice = reply.choices[0]
    assert choice.message.content in ("yes", "no") and choice.finish_reason == "stop"
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0.0 and entry.top_logprobs and all(t.logprob > -1e30 for t in entry.top_logprobs)
    # the first token: only what starts "yes" or "no" has any probability, and it sums to one
    first = choice.logprobs.content[0].top_logprobs
    assert all("yes".startswith(t.token) or "no".startswith(t.token) for t in first)
    assert abs(sum(2.718281828 ** t.logprob for t in first) - 1.0) < 1e-3


def test_a_row_without_a_grammar_is_unchanged_by_one_beside_it(client):
    plain = dict(model="tiny", prompt="Once upon a time", max_tokens=40, seed=11, temperature=0.9)
    alone = client.completions.create(**plain).choices[0].text
    together: dict[str, object] = {}

    def constrained() -> None:
        together["json"] = client.completions.create(model="tiny", prompt="Person:", max_tokens=120, seed=12,
                                                     extra_body={"structured_outputs": {"json": PERSON}})

    thread = threading.Thread(target=constrained)
    thread.start()
    together["plain"] = client.completions.create(**plain).choices[0].text
    thread.join()
    assert together["plain"] == alone
    jsonschema.validate(json.loads(together["json"].choices[0].text), PERSON)


@pytest.mark.parametrize("body, names", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "("}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "exactly one"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "object"}}}, "response_format": {"type": "json_object"}},
     "both constrain"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]}, "tools[0]"),
])
def test_bad_requests_are_400_naming_the_problem(client, server, body, names):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, **body)
    assert names in err.value.message
    with server.client() as http:
        assert http.get("/health/ready").status_code == 200


def test_tools_reach_the_prompt_through_the_template(client, server, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    def ids(**tools) -> list[int]:
        text = tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False, **tools)
        return tok(text, add_special_tokens=False)["input_ids"]

    want = ids(tools=TOOLS)
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert reply.usage.prompt_tokens == len(want) > len(ids()) + 50     # the tools' schemas are in the prompt
    with server.client() as http:
        got = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()
    assert got["tokens"] == want

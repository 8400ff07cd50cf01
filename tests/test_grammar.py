"""Grammar masks (engine/grammar.py), sampling with them, and the tool-call reply shapes
(serving/tool_calls.py), in process. The reference for every mask is llguidance's own mask
(its bytes unpacked by numpy) and its token-by-token check (`validate_tokens`), not the bitmask
unpacking under test."""

from __future__ import annotations

import json
import random

import numpy
import pytest
import torch
from transformers import AutoTokenizer

from dscluster.engine.api import SamplingParams
from dscluster.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec, apply_masks
from dscluster.engine.sampling import RequestSampler, sample
from dscluster.serving.protocol import APIError, NamedToolChoice, Tool
from dscluster.serving.tool_calls import ToolPlan, ToolReply, parse_hermes
from dscluster.tiny_model import CHAT_TEMPLATE

SCHEMA = {"type": "object", "required": ["n", "s"], "additionalProperties": False,
          "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 5}}}


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    # 1024 + 64: ids past the tokenizer's vocabulary (a padded embedding) must never be allowed
    return GrammarCompiler(tokenizer, len(tokenizer) + 64, (tokenizer.eos_token_id,))


@pytest.mark.parametrize("spec", [GrammarSpec.json_schema(SCHEMA), GrammarSpec("regex", r"[a-c]{2,4}x"),
                                  GrammarSpec.choice(["alpha", "beta"])])
def test_masks_allow_exactly_what_the_grammar_accepts(compiler, spec):
    rng = random.Random(0)
    states = [compiler.compile(spec) for _ in range(2)]
    vocab, EOS = compiler.vocab_size, compiler.eos_ids[0]
    for _ in range(12):
        logits = torch.randn(3, vocab)
        before = logits.clone()
        apply_masks(logits, [(0, states[0]), (2, states[1])])
        assert torch.equal(logits[1], before[1])            # the row without a grammar is untouched
        for row, state in ((0, states[0]), (2, states[1])):
            allowed = torch.isfinite(logits[row])
            # llguidance's own mask as bytes, unpacked by numpy (little-endian bits)
            reference = numpy.unpackbits(numpy.frombuffer(state.matcher.compute_bitmask(), dtype=numpy.uint8),
                                         bitorder="little")[:vocab].astype(bool)
            assert allowed.tolist() == reference.tolist() and allowed.any()
            # and every token let through is one the grammar accepts, token by token (end-of-sequence
            # only where the text so far is complete)
            for t in allowed.nonzero().flatten().tolist():
                assert state.matcher.is_accepting() if t == EOS else state.matcher.deep_copy().validate_tokens([t]) == 1
            assert not allowed[-64:].any()              # past the tokenizer: never
            assert torch.equal(logits[row][allowed], before[row][allowed])
        for state in states:
            if state.complete:
                continue
            mask = numpy.unpackbits(numpy.frombuffer(state.matcher.compute_bitmask(), dtype=numpy.uint8),
                                    bitorder="little")[:vocab]
            state.accept(rng.choice(numpy.flatnonzero(mask).tolist()))


def test_sampling_with_a_grammar_row_and_a_free_row(compiler, tokenizer):
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=7)
    free_alone = RequestSampler(params)
    free_beside = RequestSampler(params)
    constrained = RequestSampler(SamplingParams(max_tokens=40, temperature=1.0, seed=8),
                                 grammar=compiler.compile(GrammarSpec.json_schema(SCHEMA)))
    torch.manual_seed(0)
    out = []
    for _ in range(40):
        logits = torch.randn(2, compiler.vocab_size)
        (alone,) = sample(logits[:1].clone(), [free_alone])
        beside, drawn = sample(logits.clone(), [free_beside, constrained])
        assert alone.token == beside.token and drawn.error is None
        for sampler, token in ((free_alone, alone.token), (free_beside, beside.token)):
            sampler.accept(token)
        constrained.accept(drawn.token)
        out.append(drawn.token)
        if constrained.grammar.complete:
            break
    reply = json.loads(tokenizer.decode(out))
    assert set(reply) == {"n", "s"} and len(reply["s"]) <= 5


def test_a_broken_grammar_ends_its_own_row_only(compiler):
    good, broken = RequestSampler(SamplingParams(temperature=0.0)), RequestSampler(
        SamplingParams(temperature=0.0), grammar=compiler.compile(GrammarSpec.choice(["ok"])))
    broken.grammar.matcher.consume_token(compiler.vocab_size - 1)      # never allowed: error state
    first, second = sample(torch.randn(2, compiler.vocab_size), [good, broken])
    assert first.error is None and second.error is not None and "grammar" in str(second.error)


def test_compiler_caches_and_reports_errors(compiler):
    spec = GrammarSpec("regex", "ab+")
    a, b = compiler.compile(spec), compiler.compile(spec)
    assert a.matcher is not b.matcher
    with pytest.raises(GrammarError, match="regex"):
        compiler.compile(GrammarSpec("regex", "("))
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("grammar", "root ::= undefined_rule"))


# -- tool calls ---------------------------------------------------------------------------------

TOOLS = [Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": SCHEMA}}),
         Tool.model_validate({"type": "function", "function": {"name": "g"}})]


def test_hermes_parsing_whole_and_streamed_in_any_pieces():
    text = 'Let me see. <tool_call>{"name": "f", "arguments": {"n": 1, "s": "x"}}</tool_call>\n' \
           '<tool_call>{"name": "g", "arguments": "{}"}</tool_call><tool_call>not json</tool_call> done <tool_'
    content, calls = parse_hermes(text)
    assert [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"n": 1, "s": "x"}
    assert content.startswith("Let me see.") and "not json" in content
    for seed in range(20):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), 12))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        reply = ToolReply("auto")
        deltas = [d for p in pieces for d in reply.feed(p)] + reply.finish()
        streamed = "".join(d.get("content", "") for d in deltas)
        calls_streamed = [c for d in deltas for c in d.get("tool_calls", [])]
        assert streamed.replace("\n", "").strip() == content.replace("\n", "").strip()
        assert [c["function"] for c in calls_streamed] == [c["function"] for c in calls]
        assert [c["index"] for c in calls_streamed] == [0, 1]
        assert reply.finish_reason("stop") == "tool_calls" and reply.finish_reason("length") == "length"
    assert parse_hermes("no calls here") == ("no calls here", [])


def test_tool_plans_grammars_and_replies():
    required = ToolPlan(TOOLS, "required", False, "hermes")
    schema = json.loads(required.grammar().source)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    message = required.reply().message('[{"name": "f", "parameters": {"n": 2, "s": ""}}]')
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "f"
    named = ToolPlan(TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "f"}}),
                     None, "hermes")
    assert json.loads(named.grammar().source) == SCHEMA
    reply = named.reply()
    first, second = reply.feed('{"n": 1'), reply.feed(', "s": ""}')
    assert second == [{"tool_calls": [{"index": 0, "function": {"arguments": ', "s": ""}'}}]}]
    assert first[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert first[1]["tool_calls"][0]["function"]["arguments"] == '{"n": 1'
    assert reply.calls[0]["function"]["arguments"] == '{"n": 1, "s": ""}' and not reply.finish()
    assert ToolPlan(TOOLS, "none", None, "hermes").mode == "text"
    assert ToolPlan(None, None, None, "none").mode == "text"
    with pytest.raises(APIError, match="tool-call-parser"):
        ToolPlan(TOOLS, "auto", None, "none")


def test_tiny_template_without_tools_is_the_old_one(tokenizer):
    old = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]]
    for chat in chats:
        for generation in (True, False):
            assert tokenizer.apply_chat_template(chat, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                 add_generation_prompt=generation) == \
                tokenizer.apply_chat_template(chat, chat_template=old, tokenize=False,
                                              add_generation_prompt=generation)


def test_llama3_json_parsing_whole_and_streamed():
    from dscluster.serving.tool_calls import parse_llama3_json

    text = '{"name": "f", "parameters": {"n": 1, "s": "x"}}; {"name": "g", "parameters": {}}'
    content, calls = parse_llama3_json(text)
    assert content == "" and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"n": 1, "s": "x"}
    assert parse_llama3_json("Hello {there}") == ("Hello {there}", [])
    assert parse_llama3_json('{"name": "f", "parameters": {}} and more')[1] == []
    for pieces, want_calls in (([" ", text[:10], text[10:]], 2), (["Hi", " there"], 0)):
        reply = ToolReply("auto", parser="llama3_json")
        streamed = [d for p in pieces for d in reply.feed(p)]
        if want_calls:
            assert streamed == []                       # a call is held until it parses
        streamed += reply.finish()
        calls = [c for d in streamed for c in d.get("tool_calls", [])]
        assert len(calls) == want_calls and reply.finish_reason("stop") == ("tool_calls" if want_calls else "stop")
        if not want_calls:
            assert "".join(d["content"] for d in streamed) == "Hi there"

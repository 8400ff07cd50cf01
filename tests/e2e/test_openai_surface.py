"""The OpenAI surface that evaluation and benchmark tools use, against a real 2-rank server
(DeepSpeed tensor parallel over gloo) with the `openai` package and httpx: logprobs and echo
(prompt logprobs, max_tokens 0), n, penalties, logit_bias, min_tokens, streaming usage, chat
logprobs, /tokenize and /detokenize, X-Request-Id, vLLM's metric names, /metrics without the key.

References that are not our serving code: the model's own log-softmax, computed unsharded by
transformers in this process, for every logprob; and the unsharded engine on one rank for sampled
tokens (same seed and parameters: same tokens, so every parameter reached the sampling intact).
The server computes prompts in chunks of at most 32 tokens, so prompt logprobs cross chunks.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.client import open_engine
from servers import RemoteServer  # tests/e2e/servers.py

KEY = "surface-key"
LONG = [1, *range(300, 360)]        # 61 tokens: two chunks of 32 and one of the rest
TOL = 2e-4                          # float32, split across ranks vs one process


@pytest.fixture(scope="module")
def server(tiny):
    with RemoteServer(tiny, "--max-num-batched-tokens", "32", "--api-key", KEY, "--metrics-without-api-key") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai(api_key=KEY)


@pytest.fixture(scope="module")
def http(server):
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def unsharded(tiny):
    return open_engine(tiny)


@pytest.fixture(scope="module")
def log_softmax(tiny):
    """Token ids -> [len, vocab] log-probabilities of the next token, by transformers, unsharded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return run


def one_rank(engine, prompt: list[int], **params) -> list[int]:
    (result,) = engine.generate([GenerationRequest(tuple(prompt), SamplingParams(**params))])
    return result.token_ids


# -- logprobs --------------------------------------------------------------------------------------


def test_echo_logprobs_equal_the_models_log_softmax(client, http, log_softmax, unsharded):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, the prompt as token ids."""
    got = client.completions.create(model="tiny", prompt=LONG, max_tokens=4, temperature=0, echo=True,
                                    logprobs=3, extra_body={"ignore_eos": True})
    choice = got.choices[0]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(LONG) + 4 == len(lp.tokens) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = LONG + one_rank(unsharded, LONG, max_tokens=4, temperature=0, ignore_eos=True)
    reference = log_softmax(ids)
    for i in range(1, len(ids)):
        want = reference[i - 1]
        assert abs(lp.token_logprobs[i] - want[ids[i]].item()) < TOL, f"position {i}"
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert abs(top[0] - want.max().item()) < TOL, f"position {i}: the most likely token"
    # Greedy: each generated token is the most likely one.
    for i in range(len(LONG), len(ids)):
        assert abs(lp.token_logprobs[i] - reference[i - 1].max().item()) < TOL
    assert choice.text.startswith(http.post("/detokenize", json={"tokens": LONG}).json()["prompt"])
    assert got.usage.prompt_tokens == len(LONG) and got.usage.completion_tokens == 4


def test_max_tokens_0_with_echo_scores_the_prompt_only(client, log_softmax):
    prompt = LONG[:40]
    got = client.completions.create(model="tiny", prompt=[prompt, prompt[:1]], max_tokens=0, echo=True, logprobs=0)
    reference = log_softmax(prompt)
    first, single = got.choices
    assert first.finish_reason == "length" and got.usage.completion_tokens == 0
    assert got.usage.prompt_tokens == len(prompt) + 1
    values = first.logprobs.token_logprobs
    assert len(values) == len(prompt) and values[0] is None
    assert max(abs(values[i] - reference[i - 1, prompt[i]].item()) for i in range(1, len(prompt))) < TOL
    assert single.logprobs.token_logprobs == [None]


def test_max_tokens_0_without_echo_is_refused_and_echo_alone_computes_nothing(http):
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]
    echoed = http.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 0, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "hello there" and echoed["choices"][0]["logprobs"] is None
    assert echoed["usage"]["completion_tokens"] == 0 and echoed["usage"]["prompt_tokens"] > 0


def test_generated_logprobs_of_a_sampled_request(client, http, log_softmax, unsharded):
    prompt = LONG[:10]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0.9, seed=5,
                                    logprobs=2, extra_body={"ignore_eos": True})
    tokens = one_rank(unsharded, prompt, max_tokens=6, temperature=0.9, seed=5, ignore_eos=True)
    reference = log_softmax(prompt + tokens)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == 6
    for i, token in enumerate(tokens):
        assert abs(lp.token_logprobs[i] - reference[len(prompt) - 1 + i, token].item()) < TOL
        assert len(lp.top_logprobs[i]) in (2, 3)   # the 2 most likely, and the drawn token if not among them
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


# -- n, seeds, penalties, biases: what one rank samples, two ranks sample -------------------------


def test_n_choices_have_derived_seeds_and_match_one_rank(client, unsharded):
    prompt = LONG[:6]
    got = client.completions.create(model="tiny", prompt=prompt, n=3, max_tokens=8, temperature=1.0, seed=40,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == [0, 1, 2]
    texts = [c.text for c in got.choices]
    assert len(set(texts)) > 1, "choices with distinct seeds should differ"
    tok = unsharded.info.tokenizer
    for i, text in enumerate(texts):
        tokens = one_rank(unsharded, prompt, max_tokens=8, temperature=1.0, seed=40 + i, ignore_eos=True)
        assert text == tok.decode(tokens, skip_special_tokens=True), f"choice {i}"
    alone = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=40,
                                      extra_body={"ignore_eos": True})
    assert alone.choices[0].text == texts[0]
    assert got.usage.prompt_tokens == len(prompt) and got.usage.completion_tokens == 24


@pytest.mark.parametrize("params", [
    dict(presence_penalty=1.5, frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(presence_penalty=-2.0, frequency_penalty=-1.0, repetition_penalty=0.3, temperature=0.9, seed=3),
])
def test_penalties_sample_as_one_rank_does(http, unsharded, params):
    prompt = [1, 20, 30, 20, 30, 20, 30]
    params = {"temperature": 0, **params}
    got = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "ignore_eos": True, **params})
    want = one_rank(unsharded, prompt, max_tokens=24, ignore_eos=True, **params)
    plain = one_rank(unsharded, prompt, max_tokens=24, ignore_eos=True, temperature=params["temperature"],
                     seed=params.get("seed"))
    assert want != plain, "the penalties must change these tokens, or the test shows nothing"
    assert got.json()["choices"][0]["text"] == unsharded.info.tokenizer.decode(want, skip_special_tokens=True)


def test_logit_bias_forces_and_bans_tokens(client, http, unsharded):
    prompt = LONG[:5]
    forced = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0.8, seed=1,
                                       logit_bias={"400": 100}, extra_body={"ignore_eos": True})
    assert http.post("/detokenize", json={"tokens": [400] * 5}).json()["prompt"] == forced.choices[0].text
    greedy = one_rank(unsharded, prompt, max_tokens=5, temperature=0, ignore_eos=True)
    banned = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                       logit_bias={str(greedy[0]): -100}, logprobs=1,
                                       extra_body={"ignore_eos": True})
    first = banned.choices[0].logprobs
    assert first.token_logprobs[0] < max(first.top_logprobs[0].values()), "the most likely token was banned"
    want = one_rank(unsharded, prompt, max_tokens=5, temperature=0, ignore_eos=True,
                    logit_bias=((greedy[0], -100.0),))
    assert banned.choices[0].text == unsharded.info.tokenizer.decode(want, skip_special_tokens=True)


def test_min_tokens_holds_back_stop_tokens(client, unsharded):
    prompt = LONG[:5]
    first = one_rank(unsharded, prompt, max_tokens=1, temperature=0)[0]
    stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"stop_token_ids": [first]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 0
    held = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"stop_token_ids": [first], "min_tokens": 3})
    assert held.usage.completion_tokens >= 3


# -- streaming -------------------------------------------------------------------------------------


def test_stream_usage_and_logprobs_equal_the_plain_answer(client):
    kwargs = dict(model="tiny", prompt=["the quick brown fox", "a model"], n=2, max_tokens=10, temperature=0.7,
                  seed=9, logprobs=1, echo=True)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    for choice in plain.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        streamed = [v for c in mine if c.logprobs for v in c.logprobs.token_logprobs]
        assert streamed == choice.logprobs.token_logprobs
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]


# -- chat ------------------------------------------------------------------------------------------


def test_chat_logprobs_n_and_content_parts(client, log_softmax, http, unsharded):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    got = client.chat.completions.create(model="tiny", messages=messages, n=2, max_completion_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2)
    as_string = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                               max_tokens=5, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].message.content == got.choices[1].message.content == as_string.choices[0].message.content
    prompt = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens // 2 and all(len(c.top_logprobs) == 2 for c in content)
    generated = one_rank(unsharded, prompt, max_tokens=5, temperature=0)
    assert len(generated) == len(content)
    reference = log_softmax(prompt + generated)
    for i, (entry, token) in enumerate(zip(content, generated)):
        want = reference[len(prompt) - 1 + i]
        assert abs(entry.logprob - want[token].item()) < TOL
        assert abs(entry.top_logprobs[0].logprob - want.max().item()) < TOL
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


# -- vLLM's extra routes, header and metrics ---------------------------------------------------------


def test_tokenize_and_detokenize(http, unsharded):
    tok = unsharded.info.tokenizer
    text = "once upon a time"
    got = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert got["tokens"] == tok(text)["input_ids"] and got["count"] == len(got["tokens"])
    assert got["token_strs"] == tok.convert_ids_to_tokens(got["tokens"]) and got["max_model_len"] > 0
    back = http.post("/detokenize", json={"tokens": got["tokens"]}).json()["prompt"]
    assert back == tok.decode(got["tokens"])
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert http.post("/tokenize", json={}).status_code == 400


def test_request_id_is_taken_or_made_and_echoed(http, server):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "cmpl-trace-42"
    made = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert len(made.headers["x-request-id"]) >= 16 and made.json()["id"] == f"cmpl-{made.headers['x-request-id']}"
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "nokey-1"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "nokey-1"
    assert "request trace-42" in server.output()


def vllm_metrics(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics").text      # no API key: --metrics-without-api-key
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("vllm:")}


def test_vllm_metric_names_count_what_was_served(server, http):
    label = (("model_name", "tiny"),)
    before = vllm_metrics(server)
    got = http.post("/v1/completions", json={"prompt": ["hello", "world wide"], "max_tokens": 5,
                                             "ignore_eos": True}).json()
    after = vllm_metrics(server)

    def grew(name: str, labels=label) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("vllm:prompt_tokens_total") == got["usage"]["prompt_tokens"]
    assert grew("vllm:generation_tokens_total") == got["usage"]["completion_tokens"] == 10
    assert grew("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "tiny"))) == 2
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count"):
        assert grew(name) == 2, name
    assert grew("vllm:inter_token_latency_seconds_count") == 8      # 4 gaps per request
    assert grew("vllm:num_preemptions_total") == 0                  # two short requests: no pressure
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_hits_total"):
        assert (name, label) in after, name
    # The gauges: idle again once the finished rows have left (at the step after they end).
    deadline = time.monotonic() + 30
    while vllm_metrics(server)[("vllm:num_requests_running", label)] and time.monotonic() < deadline:
        time.sleep(0.1)
    idle = vllm_metrics(server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):
        assert idle[(name, label)] == 0.0, name
    assert httpx.get(f"{server.url}/v1/models").status_code == 401, "only /metrics is open"


def test_cache_metrics_move_as_the_pool_fills_and_hits(server, http):
    """The key/value pool's gauges and counters under vLLM's names, on a real 2-rank server: usage
    rises while a long request runs, and the same long prompt sent again is a prefix-cache hit of
    every full block but its last token's (the answer is the same)."""
    label = (("model_name", "tiny"),)
    prompt = [1, *range(600, 700)]                         # 101 tokens: 6 full blocks of 16
    first = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0}).json()
    before = vllm_metrics(server)
    usage = []
    body = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
    lines = []
    with http.stream("POST", "/v1/completions", json=body) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if line.startswith("data: {") and len(usage) < 3:
                usage.append(vllm_metrics(server)[("vllm:kv_cache_usage_perc", label)])
    assert usage, lines[:5]
    after = vllm_metrics(server)
    assert max(usage) > 0, usage
    hits = after[("vllm:prefix_cache_hits_total", label)] - before[("vllm:prefix_cache_hits_total", label)]
    queries = after[("vllm:prefix_cache_queries_total", label)] - before[("vllm:prefix_cache_queries_total", label)]
    assert queries == len(prompt) and hits == 6 * 16, (queries, hits)
    again = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0}).json()
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    info = [k for k in after if k[0] == "vllm:cache_config_info"]
    assert info and dict(info[0][1])["block_size"] == "16" and dict(info[0][1])["enable_prefix_caching"] == "True"

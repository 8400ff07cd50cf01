"""Continuous batching in one process (the real engine on one rank, the tiny Llama): requests that
join mid-batch, prompts computed in chunks, rows that leave and are replaced, each giving exactly
what transformers' own `generate` gives for that prompt alone; limits kept; and failures that end
one request, or one step, while the engine goes on."""

from __future__ import annotations

import pytest
import torch

from dscluster.engine import batch as batch_mod
from dscluster.engine import sampling
from dscluster.engine.api import GenerationRequest, GenerationResult, SamplingParams
from dscluster.engine.client import open_engine

# Lengths 1 to 45 tokens, so a budget of 16 tokens per step chunks the long ones.
PROMPTS = [
    [1, 614, 15, 591, 4, 788, 366, 473],
    [1, 20, 30],
    [7],
    [1, *range(500, 544)],
    [1, 500, 501, 502, 503, 504],
    [1, *range(40, 70)],
    [2, 99, 98, 97],
]
NEW = [12, 5, 9, 7, 14, 3, 10]
ARRIVAL = [0, 0, 1, 1, 4, 6, 9]   # the step at which each request is submitted


class Sink:
    def __init__(self, stop_after: int | None = None, raise_at: int | None = None):
        self.tokens: list[int] = []
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.stop_after, self.raise_at = stop_after, raise_at

    def on_token(self, token: int, logprobs=None) -> bool:
        self.tokens.append(token)
        if self.raise_at is not None and len(self.tokens) == self.raise_at:
            raise RuntimeError("injected failure in a sink")
        return self.stop_after is None or len(self.tokens) < self.stop_after

    def on_prompt_logprobs(self, logprobs) -> None:
        pass                                        # in the result too

    def on_finish(self, result: GenerationResult) -> None:
        self.result = result

    def on_error(self, error: BaseException) -> None:
        self.error = error

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


def run_schedule(engine, requests, arrivals, sinks=None, on_step=None) -> list[Sink]:
    sinks = sinks or [Sink() for _ in requests]
    step = 0
    while not all(s.done for s in sinks):
        for request, arrival, sink in zip(requests, arrivals, sinks, strict=True):
            if arrival == step:
                engine.submit(request, sink)
        if engine.has_generation_work():
            engine.step()
            if on_step is not None:
                on_step(engine)
        step += 1
        assert step < 1000, "the schedule never finished"
    while engine.has_generation_work():  # the last rows leave
        engine.step()
    return sinks


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def transformers_greedy(model_dir: str, prompts: list[list[int]], new: list[int]) -> list[list[int]]:
    """transformers' `generate`, each prompt alone, exactly n new tokens: the reference, not our code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for prompt, n in zip(prompts, new, strict=True):
        ids = torch.tensor([prompt])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
        out.append(generated[0, len(prompt):].tolist())
    assert [len(o) for o in out] == list(new)
    return out


@pytest.fixture(scope="module")
def hf_greedy(tiny) -> list[list[int]]:
    return transformers_greedy(tiny, PROMPTS, NEW)


@pytest.fixture(scope="module")
def engine(tiny):
    return open_engine(tiny, max_num_seqs=3, max_num_batched_tokens=16)


def test_joins_chunks_and_leaves_equal_generate_alone(engine, hf_greedy):
    requests = [GenerationRequest(tuple(p), greedy(n)) for p, n in zip(PROMPTS, NEW, strict=True)]
    seen = []

    def on_step(e):
        stats = e.generation_stats()
        seen.append((stats.step_rows, stats.step_tokens))

    sinks = run_schedule(engine, requests, ARRIVAL, on_step=on_step)
    for i, sink in enumerate(sinks):
        assert sink.error is None, sink.error
        assert sink.result.token_ids == hf_greedy[i], f"request {i}"
        assert sink.tokens == hf_greedy[i] and len(sink.tokens) == NEW[i]
        assert sink.result.finish_reason == "length" and sink.result.prompt_tokens == len(PROMPTS[i])
    # Limits held, and the schedule really batched, chunked and refilled rows.
    assert max(rows for rows, _ in seen) == 3 and all(tokens <= 16 for _, tokens in seen)
    assert sum(1 for rows, _ in seen if rows > 1) > len(seen) // 2
    pool = engine.scheduler.pool
    assert engine.runtime.batch.rows == [] and pool.runs == {} and pool.free_blocks() == pool.num_blocks


def test_a_short_newcomer_is_computed_alone_and_running_rows_never_wait_twice(tiny, hf_greedy):
    """Prompts first: a newcomer whose prompt fits one step gets a step of its own (its first token
    right after it); the decoding rows wait that step, never two in a row, and every output still
    equals generate alone."""
    long_prompt = GenerationRequest(tuple(PROMPTS[3]), greedy(NEW[3]))    # 45 tokens: chunked
    decoding = GenerationRequest(tuple(PROMPTS[0]), greedy(NEW[0]))
    newcomers = [GenerationRequest(tuple(PROMPTS[i]), greedy(NEW[i])) for i in (4, 6)]
    steps: list[tuple[int, list[int]]] = []   # tokens computed, and each sink's token count after it
    sinks: list[Sink] = []

    def on_step(e):
        steps.append((e.generation_stats().step_tokens, [len(s.tokens) for s in sinks]))

    engine = open_engine(tiny, max_num_seqs=4, max_num_batched_tokens=16)
    sinks[:] = [Sink() for _ in range(4)]
    # The newcomers arrive at consecutive steps while one request decodes and one is mid-prompt.
    run_schedule(engine, [decoding, long_prompt, *newcomers], [0, 1, 2, 3], sinks=sinks, on_step=on_step)
    for sink, i in zip(sinks, (0, 3, 4, 6), strict=True):
        assert sink.error is None and sink.result.token_ids == hf_greedy[i] and len(sink.tokens) == NEW[i]
    # Step 2 (0-based) computes the first newcomer's 6-token prompt alone: it has its first token,
    # nobody else moved.
    tokens2, counts2 = steps[2]
    assert tokens2 == len(PROMPTS[4]) and counts2[2] == 1 and counts2[:2] == steps[1][1][:2]
    # The second newcomer arrives at step 3, but the running rows waited at step 2: step 3 is an
    # ordinary step (everyone decodes, the newcomer's prompt and the long prompt's next chunk fill
    # the budget), so the newcomer still has its first token at once.
    tokens3, counts3 = steps[3]
    assert counts3[0] == counts2[0] + 1 and counts3[2] == 2 and counts3[3] == 1 and tokens3 == 16


def test_one_step_per_token_when_all_arrive_together(engine, hf_greedy, monkeypatch):
    """Three prompts that fit one step's budget together (8 + 3 + 1 of 16 tokens) are all computed
    in the first step, which gives each its first token; every later step gives each request still
    running its next one. So after step k each request has min(k, its length) tokens, and the
    longest (12 tokens) takes 12 steps."""
    new = NEW[:3]
    requests = [GenerationRequest(tuple(p), greedy(n)) for p, n in zip(PROMPTS[:3], new, strict=True)]
    tokens = [0] * len(requests)
    after_each_step: list[list[int]] = []
    step = engine.step

    def counted_step() -> None:
        step()
        after_each_step.append(list(tokens))

    def on_token(index: int, token: int) -> bool:
        tokens[index] += 1
        return True

    monkeypatch.setattr(engine, "step", counted_step)
    results = engine.generate(requests, on_token=on_token)
    assert [r.token_ids for r in results] == hf_greedy[:3]
    assert after_each_step == [[min(k, n) for n in new] for k in range(1, max(new) + 1)]


def test_seeded_sampling_does_not_depend_on_neighbours(engine):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=21, ignore_eos=True)
    alone = engine.generate([GenerationRequest(tuple(PROMPTS[0]), params)])[0].token_ids
    crowd = [GenerationRequest(tuple(p), SamplingParams(max_tokens=8, temperature=1.0, seed=i))
             for i, p in enumerate(PROMPTS)]
    sinks = run_schedule(engine, [*crowd, GenerationRequest(tuple(PROMPTS[0]), params)], [*ARRIVAL, 3])
    assert sinks[-1].result.token_ids == alone and len(alone) == 10


def test_stop_tokens_and_a_sink_that_says_stop(engine, hf_greedy):
    expected = hf_greedy[0]
    stop = expected[4]
    cut = expected.index(stop)
    requests = [GenerationRequest(tuple(PROMPTS[0]), SamplingParams(max_tokens=12, temperature=0,
                                                                    stop_token_ids=(stop,))),
                GenerationRequest(tuple(PROMPTS[0]), greedy(12))]
    sinks = run_schedule(engine, requests, [0, 0], [Sink(), Sink(stop_after=3)])
    assert sinks[0].result.finish_reason == "stop" and sinks[0].result.token_ids == expected[:cut]
    assert sinks[1].result.token_ids == expected[:3]


def test_failed_sampling_ends_only_its_request(engine, hf_greedy, monkeypatch):
    original = sampling.RequestSampler.choose

    def choose(self, logits):
        if self.seed == 666 and len(self.output_ids) == 2:
            raise RuntimeError("injected sampling failure")
        return original(self, logits)

    monkeypatch.setattr(sampling.RequestSampler, "choose", choose)
    requests = [GenerationRequest(tuple(p), greedy(n)) for p, n in zip(PROMPTS, NEW, strict=True)]
    victim = GenerationRequest(tuple(PROMPTS[1]), SamplingParams(max_tokens=20, temperature=0.5, seed=666))
    sinks = run_schedule(engine, [*requests, victim], [*ARRIVAL, 1])
    assert "injected sampling failure" in str(sinks[-1].error) and len(sinks[-1].tokens) == 2
    assert [s.result.token_ids for s in sinks[:-1]] == hf_greedy


def test_failing_sink_ends_only_its_request(engine, hf_greedy):
    requests = [GenerationRequest(tuple(p), greedy(n)) for p, n in zip(PROMPTS, NEW, strict=True)]
    sinks = [Sink() for _ in requests]
    sinks[3] = Sink(raise_at=2)
    run_schedule(engine, requests, ARRIVAL, sinks)
    assert "injected failure in a sink" in str(sinks[3].error)
    assert [s.result.token_ids for i, s in enumerate(sinks) if i != 3] == [o for i, o in enumerate(hf_greedy) if i != 3]


def test_failed_step_ends_its_requests_and_the_engine_goes_on(engine, hf_greedy, monkeypatch):
    calls = {"n": 0}
    original = batch_mod.RunningBatch._forward

    def forward(self, rows, feed, chunk, micro_batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected forward failure")
        return original(self, rows, feed, chunk, micro_batch)

    monkeypatch.setattr(batch_mod.RunningBatch, "_forward", forward)
    requests = [GenerationRequest(tuple(p), greedy(n)) for p, n in zip(PROMPTS, NEW, strict=True)]
    sinks = run_schedule(engine, requests, ARRIVAL)
    failed = [i for i, s in enumerate(sinks) if s.error is not None]
    assert failed and all("injected forward failure" in str(sinks[i].error) for i in failed)
    assert set(failed) <= {0, 1, 2, 3}, "only requests in the batch at the failed step end"
    for i, sink in enumerate(sinks):
        if i not in failed:
            assert sink.result.token_ids == hf_greedy[i], f"request {i}"
    # And afterwards, as if nothing happened.
    assert engine.generate([GenerationRequest(tuple(PROMPTS[0]), greedy(12))])[0].token_ids == hf_greedy[0]


def test_cancelled_requests_leave(engine):
    sinks = [Sink(), Sink()]
    sinks[1].cancelled = True           # gone before it joined
    long = GenerationRequest(tuple(PROMPTS[0]), greedy(500))
    engine.submit(long, sinks[0])
    engine.submit(GenerationRequest(tuple(PROMPTS[1]), greedy(5)), sinks[1])
    for _ in range(5):
        engine.step()
    assert len(engine.runtime.batch.rows) == 1 and len(sinks[0].tokens) == 5
    sinks[0].cancelled = True           # the client went away mid-generation
    while engine.has_generation_work():
        engine.step()
    assert sinks[0].result.finish_reason == "cancelled" and len(sinks[0].tokens) == 5
    assert sinks[1].result.finish_reason == "cancelled" and sinks[1].tokens == []


def test_too_long_for_max_model_len_is_refused(tiny):
    engine = open_engine(tiny, max_model_len=32)
    assert engine.info.max_context == 32
    sink = Sink()
    engine.submit(GenerationRequest(tuple(range(1, 30)), greedy(5)), sink)
    assert isinstance(sink.error, ValueError) and "--max-model-len 32" in str(sink.error)
    # prompt + output exactly at the limit runs to its end
    (result,) = engine.generate([GenerationRequest(tuple(range(1, 28)), greedy(5))])
    assert len(result.token_ids) == 5


@pytest.mark.parametrize("stage", ["schedule", "after_step"])
def test_a_bug_in_rank0_planning_ends_the_running_requests_not_the_engine(engine, hf_greedy, monkeypatch, stage):
    """A safety net for bugs in rank 0's own step code (before the broadcast, after the forward
    pass): the requests of that step end with the error, the batch is dropped, the engine goes on."""
    from dscluster.engine.scheduler import Scheduler

    original = getattr(Scheduler, stage)
    calls = {"n": 0}

    def broken(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError(f"injected bug in {stage}")
        return original(self, *args)

    monkeypatch.setattr(Scheduler, stage, broken)
    requests = [GenerationRequest(tuple(p), greedy(n)) for p, n in zip(PROMPTS, NEW, strict=True)]
    sinks = run_schedule(engine, requests, ARRIVAL)
    failed = [i for i, s in enumerate(sinks) if s.error is not None]
    assert failed and all(f"injected bug in {stage}" in str(sinks[i].error) for i in failed)
    for i, sink in enumerate(sinks):
        if i not in failed:
            assert sink.result.token_ids == hf_greedy[i], f"request {i}"
    monkeypatch.setattr(Scheduler, stage, original)
    assert engine.generate([GenerationRequest(tuple(PROMPTS[2]), greedy(9))])[0].token_ids == hf_greedy[2]


def test_prompt_logprobs_come_from_the_chunked_prefill(engine, tiny):
    """A 45-token prompt computed in chunks of at most 16 tokens beside other requests: every prompt
    token's logprob and top-2 equal the model's own log-softmax over the whole prompt at once; a
    request with max_tokens 0 draws nothing and still gets them."""
    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[3]
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    requests = [GenerationRequest(tuple(prompt), SamplingParams(max_tokens=0, prompt_logprobs=2)),
                GenerationRequest(tuple(PROMPTS[0]), greedy(6)),
                GenerationRequest(tuple(prompt), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                                prompt_logprobs=2, logprobs=1))]
    sinks = run_schedule(engine, requests, [0, 0, 1])
    for sink in (sinks[0], sinks[2]):
        got = sink.result.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for i in range(1, len(prompt)):
            assert abs(got[i].logprob - reference[i - 1, prompt[i]].item()) < 1e-4, i
            assert [t for t, _ in got[i].top] == reference[i - 1].topk(2).indices.tolist(), i
    assert sinks[0].result.token_ids == [] and sinks[0].tokens == []
    assert sinks[0].result.finish_reason == "length"
    assert len(sinks[2].result.logprobs) == 3 and all(lp.rank == 1 for lp in sinks[2].result.logprobs)

"""The key/value pool in one process (the real engine on one rank, the tiny Llama): a pool too small
for everything at once makes requests wait, grow, move and be preempted; shared prefixes are found
in the prefix cache; and every request still gives exactly what transformers' own `generate` gives
for that prompt alone (greedy), or what it gives alone on a roomy engine (seeded sampling). Also
the block accounting itself (engine/kv_blocks.py) on its own, and start-up when the pool cannot
hold one request."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.kv_blocks import BlockPool, block_key
from dscluster.engine.client import open_engine
from dscluster.errors import UsageError

from test_generation import run_schedule, transformers_greedy

BLOCK = 16
BYTES_PER_TOKEN = 2048          # the tiny model: 2 layers x (k + v) x 4 heads x 64 x float32
SHARED = [1, *range(300, 340)]  # 41 tokens: two full blocks and a partial one
rng = random.Random(5)
PROMPTS = [SHARED + [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 30))] for _ in range(5)] + \
          [[1, *(rng.randrange(3, 1000) for _ in range(rng.randrange(5, 60)))] for _ in range(5)]
NEW = [rng.randrange(8, 40) for _ in PROMPTS]
ARRIVAL = [0, 0, 0, 1, 2, 2, 3, 5, 8, 13]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_greedy(tiny) -> list[list[int]]:
    return transformers_greedy(tiny, PROMPTS, NEW)


def small_engine(tiny, blocks: int, **options):
    """An engine whose pool has exactly `blocks` blocks."""
    return open_engine(tiny, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                       kv_cache_memory=blocks * BLOCK * BYTES_PER_TOKEN, **options)


def test_a_pool_too_small_for_all_preempts_and_every_answer_equals_generate_alone(tiny, hf_greedy):
    engine = small_engine(tiny, 14)
    assert engine.scheduler.pool.num_blocks == 14
    usage = []
    requests = [GenerationRequest(tuple(p), greedy(n)) for p, n in zip(PROMPTS, NEW, strict=True)]
    sinks = run_schedule(engine, requests, ARRIVAL,
                         on_step=lambda e: usage.append(e.generation_stats().kv_usage))
    for i, sink in enumerate(sinks):
        assert sink.error is None, sink.error
        assert sink.tokens == hf_greedy[i] == sink.result.token_ids, f"request {i}"
        assert sink.result.finish_reason == "length"
    stats = engine.generation_stats()
    assert stats.preemptions > 0, "the pool was big enough: this test no longer preempts"
    assert stats.prefix_hits > 0 and stats.prefix_queries >= sum(map(len, PROMPTS))
    assert max(usage) > 0.5 and all(0 <= u <= 1 for u in usage)
    pool = engine.scheduler.pool
    assert pool.runs == {} and pool.free_blocks() == pool.num_blocks and stats.kv_usage == 0


def test_seeded_sampling_is_the_same_through_preemption(tiny):
    params = [SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=i, ignore_eos=True,
                             frequency_penalty=0.3) for i, n in enumerate(NEW)]
    requests = [GenerationRequest(tuple(p), sp) for p, sp in zip(PROMPTS, params, strict=True)]
    roomy = open_engine(tiny, max_model_len=128)
    alone = [roomy.generate([r])[0].token_ids for r in requests]
    tight = small_engine(tiny, 12)
    sinks = run_schedule(tight, requests, ARRIVAL)
    assert tight.generation_stats().preemptions > 0
    assert [s.result.token_ids for s in sinks] == alone


def test_prefix_hits_full_blocks_and_a_partial_block_compute_only_the_rest(tiny):
    engine = open_engine(tiny, max_model_len=256)
    first = SHARED + [5, 6, 7]                       # 44 tokens: blocks 0 and 1 are full
    engine.generate([GenerationRequest(tuple(first), greedy(4))])
    before = engine.generation_stats()
    prompts = [SHARED + tail for tail in ([9, 9], [], list(range(700, 720)))]  # a partial block, 41 tokens, more
    for prompt, want in zip(prompts, transformers_greedy(tiny, prompts, [6] * 3), strict=True):
        got = engine.generate([GenerationRequest(tuple(prompt), greedy(6))])[0].token_ids
        assert got == want, len(prompt)
    after = engine.generation_stats()
    assert after.prefix_hits - before.prefix_hits == 3 * 2 * BLOCK   # two full blocks each time


def test_prompt_logprobs_are_exact_whatever_the_cache_holds(tiny):
    """A request that wants its prompt's logprobs computes every position (no cache hit), and they
    equal the model's own log-softmax."""
    from transformers import AutoModelForCausalLM

    engine = open_engine(tiny, max_model_len=256)
    engine.generate([GenerationRequest(tuple(SHARED + [4]), greedy(2))])
    prompt = SHARED + [8, 9]
    hits = engine.generation_stats().prefix_hits
    result = engine.generate([GenerationRequest(tuple(prompt), SamplingParams(max_tokens=0, prompt_logprobs=0))])[0]
    assert engine.generation_stats().prefix_hits == hits
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    want = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    got = [lp.logprob for lp in result.prompt_logprobs[1:]]
    assert np.allclose(got, want, atol=1e-4)


def test_requests_arriving_together_compute_a_shared_prefix_once(tiny):
    engine = open_engine(tiny, max_model_len=256, max_num_batched_tokens=32)
    prefix = [1, *range(100, 180)]                    # 81 tokens: 5 full blocks
    requests = [GenerationRequest(tuple(prefix + [200 + i]), greedy(3)) for i in range(4)]
    results = engine.generate(requests)
    alone = open_engine(tiny, max_model_len=256, enable_prefix_caching=False)
    assert [r.token_ids for r in results] == [alone.generate([r])[0].token_ids for r in requests]
    assert engine.generation_stats().prefix_hits == 3 * 5 * BLOCK
    assert alone.generation_stats().prefix_hits == 0 and alone.generation_stats().prefix_queries == 0


def test_a_pool_that_cannot_hold_one_request_is_a_usage_error(tiny):
    with pytest.raises(UsageError, match=r"holds 96 tokens .*--max-model-len 128"):
        small_engine(tiny, 6)


# -- the block accounting alone --------------------------------------------------------------


def check_invariants(pool: BlockPool) -> None:
    owned = np.full(pool.num_blocks, -1)
    for request_id, run in pool.runs.items():
        assert 0 <= run.start and run.start + run.length <= pool.num_blocks and run.length > 0
        assert (owned[run.start:run.start + run.length] == -1).all(), "two runs overlap"
        owned[run.start:run.start + run.length] = request_id
    assert (owned == pool.owner).all()
    for key, block in pool._block_of.items():
        assert pool._key_of[block] == key


def test_block_pool_places_grows_packs_and_frees_consistently():
    random.seed(11)
    pool = BlockPool(64, BLOCK)
    contents: dict[int, list[str]] = {}             # a model of what each block holds
    blocks = {i: f"empty{i}" for i in range(64)}
    live = {}
    for step in range(400):
        op = random.random()
        if op < 0.35 and len(live) < 10:
            rid = step
            want = random.randrange(1, 12)
            placed = pool.place(rid, want, max(1, want // 2))
            if placed is not None:
                live[rid] = placed.length
                contents[rid] = [f"r{rid}b{i}" for i in range(placed.length)]
                for i in range(placed.length):
                    blocks[placed.start + i] = contents[rid][i]
        elif op < 0.6 and live:
            rid = random.choice(list(live))
            old = pool.runs[rid].start
            grown = pool.grow(rid, pool.runs[rid].length + random.randrange(1, 6))
            if grown is not None:
                start, length = grown
                copied = [blocks[old + i] for i in range(live[rid])]
                for i, c in enumerate(copied):
                    blocks[start + i] = c
                live[rid] = length
                contents[rid] = copied + [f"r{rid}x{i}" for i in range(length - len(copied))]
                for i in range(len(copied), length):
                    blocks[start + i] = contents[rid][i]
        elif op < 0.75 and live:
            moves = pool.compact(last=random.choice([None, *live]))
            for rid, start in moves:   # copies made in order, as every rank makes them
                n = live[rid]
                src = [c for c in contents[rid]]
                for i in range(n):
                    blocks[start + i] = src[i]
        elif live:
            rid = random.choice(list(live))
            pool.free(rid)
            del live[rid], contents[rid]
        check_invariants(pool)
        for rid, run in pool.runs.items():
            assert [blocks[run.start + i] for i in range(run.length)] == contents[rid], f"step {step}"


def test_prefix_cache_keys_follow_contents_and_are_checked_on_hit():
    pool = BlockPool(16, 4)
    tokens = list(range(12))
    keys = [block_key(0x5D5C, tokens[0:4])]
    keys.append(block_key(keys[0], tokens[4:8]))
    placed = pool.place(1, 4, 4)
    pool.register(placed.start, keys[0], 0x5D5C, tokens[0:4])
    pool.register(placed.start + 1, keys[1], keys[0], tokens[4:8])
    assert pool.lookup(keys, tokens) == [placed.start, placed.start + 1]
    assert pool.lookup(keys, [0, 1, 2, 99, *tokens[4:]]) == []       # same key, other tokens: no hit
    pool.free(1)
    assert pool.lookup(keys, tokens) == [placed.start, placed.start + 1]   # freed blocks keep contents
    again = pool.place(2, 5, 4, pool.lookup(keys, tokens))
    assert again.start == placed.start and again.copies == []            # starts on them: nothing copied
    pool.free(2)
    pool.place(3, 16, 16)                                                # reuses every block
    assert pool.lookup(keys, tokens) == []


def test_cached_blocks_that_leave_no_room_beside_them_are_computed_again():
    # 6 blocks; a request's 3 cached prefix blocks end up in blocks 3-5 and it needs 4: starting on
    # them runs off the pool's end, and copying them needs 4 other free blocks (only 3). It must
    # still join (computing its prefix again), or it waits forever at the head of the queue.
    pool = BlockPool(6, 4)
    tokens = list(range(12))
    keys = [block_key(0x5D5C, tokens[0:4])]
    keys += [block_key(keys[0], tokens[4:8]), block_key(block_key(keys[0], tokens[4:8]), tokens[8:12])]
    pool.place(1, 3, 3)                                  # blocks 0-2, so the next run lands on 3-5
    placed = pool.place(2, 3, 3)
    assert placed.start == 3
    for i in range(3):
        pool.register(3 + i, keys[i], keys[i - 1] if i else 0x5D5C, tokens[4 * i:4 * i + 4])
    pool.free(1)
    pool.free(2)
    hits = pool.lookup(keys, tokens)
    assert hits == [3, 4, 5]
    again = pool.place(3, 4, 4, hits)
    assert again is not None and again.length == 4 and again.cached_blocks == 0 and again.copies == []
    check_invariants(pool)

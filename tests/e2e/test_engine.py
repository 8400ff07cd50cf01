"""The core promise: a model split across 2 real rank processes (gloo, DeepSpeed AutoTP or ZeRO-3)
gives the unsharded model's output. Ranks run `engine_probe.py` under the local launcher; the
unsharded reference runs in this process through `open_engine`, and transformers' own `generate`
is the reference for greedy decoding, each prompt alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dscluster.engine.api import GenerationRequest
from dscluster.engine.client import open_engine
from engine_probe import cache_stats, logprob_values, run_schedule, sampling_params  # tests/e2e/engine_probe.py

PROBE = Path(__file__).with_name("engine_probe.py")

PROMPTS = [
    [1, 614, 15, 591, 4, 788, 366, 473],
    [1, 20, 30],
    [1, 500, 501, 502, 503, 504],
]
# Requests joining a running batch at different steps; with 3 rows and 16 tokens per step at most,
# long prompts are computed in chunks and later requests wait for a row. A key/value pool of 6 blocks
# (96 tokens) cannot hold three rows of up to 55 tokens: runs grow, move and are preempted, and
# requests sharing a prefix find it cached, on every rank alike.
LIMITS = {"max_num_seqs": 3, "max_num_batched_tokens": 16, "max_model_len": 64, "num_kv_blocks": 6}
SCHEDULE = [
    {"arrive": arrive, "prompt_ids": prompt, "params": {"max_tokens": n, "temperature": 0, "ignore_eos": True}}
    for arrive, prompt, n in [(0, PROMPTS[0], 12), (0, PROMPTS[1], 5), (1, [1, *range(300, 340)], 9),
                              (2, PROMPTS[2], 14), (5, [9], 6), (7, [1, *range(700, 730)], 8),
                              (9, [1, *range(300, 340), 11], 4), (9, [1, *range(300, 340), 12, 13], 4)]
]
# Every per-request parameter travels in the join: penalties, biases, min_tokens, and logprobs
# (prompt logprobs change which logits every rank keeps, across prompt chunks of 16 tokens).
PROCESSED = [
    {"prompt_ids": [1, 20, 30, 20, 30], "params": {"max_tokens": 10, "temperature": 0.8, "seed": 5,
                                                   "presence_penalty": -2.0, "frequency_penalty": -1.0,
                                                   "repetition_penalty": 0.3, "logprobs": 2}},
    {"prompt_ids": [1, *range(300, 340)], "params": {"max_tokens": 4, "temperature": 0, "min_tokens": 2,
                                                     "logit_bias": [[400, 8.0]], "logprobs": 1, "prompt_logprobs": 1}},
    {"prompt_ids": PROMPTS[2], "params": {"max_tokens": 0, "prompt_logprobs": 0}},
]
WORK = {
    "predict": [PROMPTS[0], PROMPTS[0][::-1]],
    "generate": (
        [{"prompt_ids": p, "params": {"max_tokens": 12, "temperature": 0}} for p in PROMPTS]
        + [{"prompt_ids": p, "params": {"max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 11 + i}}
           for i, p in enumerate(PROMPTS)]
    ),
    "schedule": SCHEDULE,
}
WORK_ALL_PARAMS = {**WORK, "generate": WORK["generate"] + PROCESSED}


def run_ranks(tmp_path: Path, options: dict, work: dict, nproc: int = 2, timeout: float = 240, **extra) -> dict:
    out = tmp_path / f"out-{options.get('engine')}-{nproc}.json"
    spec = tmp_path / f"spec-{options.get('engine')}-{nproc}.json"
    spec.write_text(json.dumps({"options": options, "work": work, "output": str(out), **extra}))
    cmd = [sys.executable, "-m", "dscluster", "launch", "--nproc", str(nproc), "--",
           sys.executable, str(PROBE), str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def reference(model: str, work: dict, engine: str | None = None, **limits) -> dict:
    ref = open_engine(model, engine=engine, **limits)
    out: dict = {}
    if "predict" in work:
        outs = ref.predict([torch.tensor(x, dtype=ref.info.input_dtype) for x in work["predict"]])
        out["predict"] = [o.tolist() for o in outs]
    if "generate" in work:
        reqs = [GenerationRequest(tuple(g["prompt_ids"]), sampling_params(g["params"])) for g in work["generate"]]
        results = ref.generate(reqs)
        out["generate"] = [r.token_ids for r in results]
        out["logprobs"] = [(logprob_values(r.logprobs), logprob_values(r.prompt_logprobs)) for r in results]
        # Each prompt alone (on an engine of its own, so `ref` does exactly the ranks' work):
        # padding in a mixed-length batch must not change the tokens.
        alone = open_engine(model, engine=engine, **limits)
        out["generate_alone"] = [alone.generate([r])[0].token_ids for r in reqs]
    if "schedule" in work:
        out["schedule"] = run_schedule(ref, work["schedule"])
    out["cache"] = cache_stats(ref)
    return out


def transformers_greedy(model: str, schedule: list[dict]) -> list[list[int]]:
    """transformers' `generate`, each prompt alone, max_tokens new tokens (end-of-sequence ignored)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    out = []
    for entry in schedule:
        ids, n = torch.tensor([entry["prompt_ids"]]), entry["params"]["max_tokens"]
        generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)
        out.append(generated[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def tiny_reference(tiny) -> dict:
    return reference(tiny, WORK_ALL_PARAMS, **LIMITS)


@pytest.fixture(scope="module")
def schedule_expected(tiny) -> list[list[int]]:
    expected = transformers_greedy(tiny, SCHEDULE)
    assert [len(t) for t in expected] == [e["params"]["max_tokens"] for e in SCHEDULE]
    return expected


@pytest.mark.parametrize("blocks", [4, 5, 6])
def test_a_pool_barely_larger_than_one_request_finishes_the_schedule(tiny, schedule_expected, blocks):
    """Requests preempted and recomputed over and over, prefixes cached wherever they last were
    (once at the pool's end, where no run of a whole request fits beside them): every request still
    finishes, with transformers' tokens."""
    engine = open_engine(tiny, **{**LIMITS, "num_kv_blocks": blocks})
    outcomes = run_schedule(engine, SCHEDULE)
    assert [o["token_ids"] for o in outcomes] == schedule_expected
    assert engine.generation_stats().preemptions > 0 or blocks == 4    # 4 blocks: requests wait, none is preempted


@pytest.mark.parametrize("engine", ["tp", "zero3"])
def test_sharded_llama_equals_unsharded(tmp_path, tiny, tiny_reference, schedule_expected, engine):
    got = run_ranks(tmp_path, {"model": tiny, "engine": engine, **LIMITS}, WORK_ALL_PARAMS)
    assert got["engine"] == engine and got["world_size"] == 2
    full = sum(p.numel() for p in open_engine(tiny).runtime.model.module.parameters())
    assert got["local_params"] < 0.65 * full, f"{engine}: rank 0 holds {got['local_params']} of {full}"
    leaked = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{got['master_port']}_*")]
    assert not leaked, f"DeepSpeed shared-memory segments left behind: {leaked}"
    for sharded, single in zip(got["predict"], tiny_reference["predict"], strict=True):
        diff = (torch.tensor(sharded) - torch.tensor(single)).abs().max().item()
        assert diff < 1e-5, f"{engine} logits differ from the unsharded model by {diff}"
    tokens = [g["token_ids"] for g in got["generate"]]
    # Greedy (first three), seeded sampling (next three) and penalties, biases, min_tokens and
    # logprobs (the last three), batched with different prompt lengths.
    assert tokens == tiny_reference["generate"]
    assert tokens[-1] == [] and len(tokens[-2]) == 4
    for g, (want, want_prompt) in zip(got["generate"], tiny_reference["logprobs"], strict=True):
        for mine, ref in ((g["logprobs"], want), (g["prompt_logprobs"], want_prompt)):
            assert (mine is None) == (ref is None)
            for a, b in zip(mine or [], ref or [], strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) < 1e-4, (a, b)
    assert len(got["generate"][-2]["prompt_logprobs"]) == len(PROCESSED[1]["prompt_ids"])
    greedy = len(PROMPTS)
    assert tokens[:greedy] == tiny_reference["generate_alone"][:greedy]
    assert all(len(t) > 0 for t in tokens[:-1])
    # Joining mid-batch, prompts in chunks: every request as transformers generates it alone.
    assert [r.get("token_ids") for r in got["schedule"]] == schedule_expected
    assert tiny_reference["schedule"] == got["schedule"]
    # ... with the same pool decisions as the unsharded engine: preemptions and prefix hits happened.
    assert got["cache"] == tiny_reference["cache"]
    assert got["cache"]["preemptions"] > 0 and got["cache"]["prefix_hits"] > 0, got["cache"]


def test_failed_step_drops_the_batch_on_every_rank_and_the_group_goes_on(tmp_path, tiny, schedule_expected):
    """A step that raises (here: injected on both ranks, before the forward pass) ends the requests
    it computed; every rank drops the batch at the next message; requests after it, and the group,
    carry on, and every rank exits 0."""
    got = run_ranks(tmp_path, {"model": tiny, "engine": "tp", **LIMITS}, {"schedule": SCHEDULE},
                    fail_step_of_request=2)
    outcomes = got["schedule"]
    failed = [i for i, r in enumerate(outcomes) if "error" in r]
    assert 2 in failed and set(failed) <= {0, 1, 2}, outcomes
    assert all("injected step failure" in outcomes[i]["error"] for i in failed), outcomes
    for i, outcome in enumerate(outcomes):
        if i not in failed:
            assert outcome["token_ids"] == schedule_expected[i], f"request {i}"
    assert not {3, 4, 5} & set(failed), "requests arriving after the failed step run normally"


def test_greedy_matches_transformers_generate(tiny, tiny_reference):
    """Our decode loop agrees with Hugging Face's own greedy `generate` on the unsharded model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    for prompt, ours in zip(PROMPTS, tiny_reference["generate_alone"][:len(PROMPTS)], strict=True):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        # transformers runs past end-of-sequence here (eos_token_id=None); none of these prompts
        # reaches it within 12 tokens, so ours must be those 12 tokens, not a prefix of them.
        assert len(expected) == 12 and ours == expected, f"prompt {prompt}: ours {ours}, transformers {expected}"


@pytest.mark.parametrize("spec,engine", [
    ("dscluster.examples.linear:build", None),          # default: replicated (AutoTP can't split it)
    ("dscluster.examples.linear:build_mlp", "zero3"),   # parameters partitioned across the ranks
])
def test_import_spec_models_same_on_one_and_two_ranks(tmp_path, spec, engine):
    inputs = [[float(i) / 10 - j for i in range(10)] for j in range(3)]
    work = {"predict": inputs}
    two = run_ranks(tmp_path, {"model": spec, "engine": engine}, work)
    one = reference(spec, work)
    assert two["world_size"] == 2
    assert two["engine"] == (engine or "replicated")
    for a, b in zip(two["predict"], one["predict"], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)


def test_tp_refuses_a_module_autotp_cannot_split(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"options": {"model": "dscluster.examples.linear:build", "engine": "tp"},
                                "work": {}, "output": str(tmp_path / "o.json")}))
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--",
                           sys.executable, str(PROBE), str(spec)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--engine tp needs a transformers model" in proc.stderr


def test_env_threads_default(monkeypatch):
    from dscluster.engine.runtime import set_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads(2) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert set_threads(2) == max(1, (os.cpu_count() or 1) // 2)


@pytest.mark.parametrize("architecture", ["BertModel", "BertForSequenceClassification"])
def test_non_causal_transformers_model_loads_as_saved_and_splits(tmp_path, architecture):
    """A directory saved from any transformers class is served as that class: the saved weights
    (heads included), its own input (`input_ids` as integers), its own output (hidden states, or a
    head's logits); and split over 2 ranks with AutoTP it gives the unsharded output."""
    import transformers

    torch.manual_seed(5)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    saved = getattr(transformers, architecture)(config).eval()
    model_dir = tmp_path / architecture
    saved.save_pretrained(model_dir)
    ids = [[1, 5, 9, 42], [3, 4, 5, 6]]
    with torch.no_grad():
        out = saved(input_ids=torch.tensor(ids))
    want = out.logits if architecture.endswith("Classification") else out.last_hidden_state

    ref = open_engine(str(model_dir))
    assert ref.info.kind == "module" and ref.info.input_dtype == torch.long
    single = ref.predict([torch.tensor(x) for x in ids])
    assert torch.allclose(torch.stack(single), want, atol=1e-5), "the loaded model is not the saved one"
    two = run_ranks(tmp_path, {"model": str(model_dir), "engine": "tp"}, {"predict": ids})
    assert two["engine"] == "tp" and two["world_size"] == 2
    diff = (torch.tensor(two["predict"]) - want).abs().max().item()
    assert diff < 1e-5, f"tp over 2 ranks differs from the unsharded {architecture} by {diff}"

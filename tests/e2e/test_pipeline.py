"""Pipeline parallelism (`--pp`): a 3-layer Llama cut into 2 stages (layers 0-1 with the embedding,
layer 2 with the final norm and the head), on real rank processes.

- pp=2 on 2 local ranks (engine_probe.py under the local launcher): greedy tokens equal to
  transformers' own `generate`, each prompt alone, while requests join and leave a running batch
  (prompts in chunks, runs of the key/value pool growing, moving and preempted, prefix hits, the
  same pool decisions as the unsharded engine); logits within float tolerance of transformers'
  forward pass; each rank holds exactly its stage's parameters.
- pp=2 x tp=2 on 2 network-namespace nodes of 2 ranks each (Kubeflow Trainer variables, as the
  manifests start it): the same over HTTP, then a whole stage (node1) killed mid-step breaks the
  group within the heartbeat bound (503, exit 3 naming a rank of node1).
- a model that cannot be cut, and a world that does not divide by --pp: exit 2 with one line on
  every rank, before any collective.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch

from dscluster.cluster.launch import free_port
from netns import Cluster, unavailable_reason
from servers import assert_every_rank_exits_2  # tests/e2e/servers.py
from test_engine import SCHEDULE, WORK_ALL_PARAMS, reference, run_ranks, transformers_greedy

LIMITS = {"max_num_seqs": 3, "max_num_batched_tokens": 16, "max_model_len": 64, "num_kv_blocks": 6}
PROMPTS = [[1, 614, 15, 591, 4, 788], [1, 20, 30, 40, 50, 60]]   # a predict batch: equal lengths
ANSWER = {"type": "object", "required": ["ok"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}}}
SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny3"
    subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(path), "--seed", "3", "--layers", "3"],
                   check=True, capture_output=True, timeout=180)
    return str(path)


@pytest.fixture(scope="module")
def hf_model(tiny3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny3).eval()


def stage_share(hf_model, stage: int, tp: int) -> int:
    """Parameters a rank of `stage` holds, counted on the unsharded transformers model: stage 0 the
    embedding and layers 0-1, stage 1 layer 2, the final norm and the head; linear layers split
    over the stage's `tp` ranks, norms and the embedding whole."""
    def in_stage(name: str) -> bool:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer:
            return (int(layer.group(1)) < 2) == (stage == 0)
        return name.startswith("model.embed_tokens") if stage == 0 else not name.startswith("model.embed_tokens")

    return sum(p.numel() // (tp if any(s in name for s in SPLIT) else 1)
               for name, p in hf_model.named_parameters() if in_stage(name))


def hf_logits(hf_model, prompts) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf_model(input_ids=torch.tensor([p])).logits[0] for p in prompts]


def test_two_stages_equal_the_unsharded_model(tmp_path, tiny3, hf_model):
    work = {"predict": PROMPTS, "generate": WORK_ALL_PARAMS["generate"], "schedule": SCHEDULE}
    got = run_ranks(tmp_path, {"model": tiny3, "pp": 2, **LIMITS}, work)
    assert got["world_size"] == 2
    for sharded, want in zip(got["predict"], hf_logits(hf_model, PROMPTS), strict=True):
        diff = (torch.tensor(sharded) - want).abs().max().item()
        assert diff < 1e-5, f"pp=2 logits differ from transformers' by {diff}"
    assert [r.get("token_ids") for r in got["schedule"]] == transformers_greedy(tiny3, SCHEDULE)
    # Greedy, seeded and penalised requests all at once (3 rows, so they queue) equal the unsharded engine's.
    # Two micro-batches were in flight at once, and requests were preempted and hit the prefix cache (the two
    # micro-batches share the pool, so its decisions are not the unsharded engine's one by one).
    ref = reference(tiny3, {"generate": WORK_ALL_PARAMS["generate"], "schedule": SCHEDULE}, **LIMITS)
    assert [g["token_ids"] for g in got["generate"]] == ref["generate"]
    assert got["most_steps_in_flight"] == 2
    assert got["cache"]["preemptions"] > 0 and got["cache"]["prefix_hits"] > 0
    # Steps of greedy requests only (the schedule) came back as the last stage's tokens; steps with
    # a seeded, penalised or logprobs request among them as logits, sampled by rank 0.
    assert got["handed_back"]["tokens"] > 0 and got["handed_back"]["logits"] > 0, got["handed_back"]
    held = [json.loads(Path(f"{tmp_path}/out-None-2.json.rank{r}").read_text())["local_params"] for r in (0, 1)]
    assert held == [stage_share(hf_model, 0, 1), stage_share(hf_model, 1, 1)]
    assert sum(held) == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stage_that_raises_fails_the_step_not_the_group(tmp_path, tiny3, rank):
    """One stage's forward pass raises (rank 0: the first stage, before its hand-over; rank 1: the
    last, after receiving it): its flag travels on instead of a tensor, so nobody waits; the step's
    requests end with the error, every rank drops the batch, and later requests are transformers'
    tokens again on the same group (every rank exits 0)."""
    got = run_ranks(tmp_path, {"model": tiny3, "pp": 2, **LIMITS}, {"schedule": SCHEDULE}, fail_stage=[rank, 2])
    outcomes = got["schedule"]
    failed = [i for i, r in enumerate(outcomes) if "error" in r]
    assert 2 in failed and set(failed) <= {0, 1, 2}, outcomes
    expected = transformers_greedy(tiny3, SCHEDULE)
    for i, outcome in enumerate(outcomes):
        if i not in failed:
            assert outcome["token_ids"] == expected[i], f"request {i}"
    assert not {3, 4, 5} & set(failed), "requests arriving after the failed step run normally"


# ---------------------------------------------------------------------------------------------
# Models that cannot be cut, worlds that do not divide: exit 2 on every rank


def _gpt2(tmp_path: Path) -> str:
    """A transformers causal LM whose decoder layers are not a `layers` ModuleList (GPT-2's `h`)."""
    import transformers

    path = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


CANNOT = {
    "import-spec": (lambda tmp, tiny: "dscluster.examples.linear:build", "2",
                    "cannot be cut into pipeline stages: an import-spec model"),
    "unknown-layout": (lambda tmp, tiny: _gpt2(tmp), "2", "has no `layers` ModuleList of decoder layers"),
    "world-not-divisible": (lambda tmp, tiny: tiny, "3", "the world of 2 rank(s) does not divide into 3 stages"),
}


@pytest.mark.parametrize("case", list(CANNOT))
def test_what_cannot_be_cut_exits_2_on_every_rank(tmp_path, tiny3, case):
    """Each rank its own process (as on two nodes): both name the problem in one line, exit 2."""
    make, pp, message = CANNOT[case]
    model = make(tmp_path, tiny3)
    master = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-m", "dscluster", "serve", model, "--pp", pp,
                               "--port", str(free_port()), "--heartbeat-timeout", "60"],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    assert_every_rank_exits_2(procs, message)


# ---------------------------------------------------------------------------------------------
# pp=2 x tp=2 over two nodes of two ranks each


@pytest.fixture(scope="module")
def two_node_pipeline(tmp_path_factory, tiny3):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-node tests need network namespaces: {reason}")
    from test_multinode import Group, report, trainer_env

    logdir = tmp_path_factory.mktemp("pp-logs")
    with Cluster(2) as cluster:
        group = Group(cluster, tiny3, logdir)
        for i in range(2):
            # Rows and step tokens as small as above; the context whole, for the long request of the fault
            group.start(i, trainer_env(i, 2, 2), "--pp", "2", "--max-num-seqs", "3", "--max-num-batched-tokens", "16")
        report("startup-2x2-pp2-tp2", ready=group.wait_ready())
        yield group
    assert not cluster.leftovers()


def test_two_nodes_pp2_tp2_equal_the_unsharded_model(two_node_pipeline, tiny3, hf_model):
    """Requests arrive while others run (joining and leaving the batch, 3 rows at most), prompts in
    chunks of 16 tokens; every answer is transformers' greedy `generate` of its prompt alone."""
    group = two_node_pipeline
    held = {int(r): int(n) for r, n in re.findall(r"rank (\d) ready: .*holds (\d+) parameters",
                                                  group.log(0) + group.log(1))}
    assert held == {r: stage_share(hf_model, r // 2, 2) for r in range(4)}, held
    assert "pipeline stage 2 of 2 (decoder layers 2-2 of 3)" in group.log(1)
    assert "(2 pipeline stages of 2 tp rank(s), 4 rank(s))" in group.log(0)
    model = httpx.get(f"{group.url}/v1/models", timeout=30).json()["data"][0]
    assert (model["pipeline_parallel_size"], model["world_size"], model["engine"]) == (2, 4, "tp"), model

    predicted = httpx.post(f"{group.url}/v1/predict", json={"inputs": PROMPTS[:1]}, timeout=60)
    assert predicted.status_code == 200, predicted.text
    diff = (torch.tensor(predicted.json()["outputs"][0]) - hf_logits(hf_model, PROMPTS[:1])[0]).abs().max().item()
    assert diff < 1e-4, f"pp=2 x tp=2 logits differ from transformers' by {diff}"

    schedule = [e for e in SCHEDULE if e["arrive"] < 8]
    expected = transformers_greedy(tiny3, schedule)
    results: dict[int, str] = {}

    def ask(i: int, entry: dict) -> None:
        time.sleep(entry["arrive"] * 0.15)
        body = {"prompt": entry["prompt_ids"], "max_tokens": entry["params"]["max_tokens"], "temperature": 0,
                "ignore_eos": True}
        answer = httpx.post(f"{group.url}/v1/completions", json=body, timeout=120)
        results[i] = answer.json()["choices"][0]["text"] if answer.status_code == 200 else answer.text

    constrained: list = []

    def ask_constrained() -> None:
        """Greedy too, but the grammar needs the logits on rank 0 (not the last stage's argmax)."""
        time.sleep(0.3)
        body = {"messages": [{"role": "user", "content": "yes?"}], "temperature": 0, "max_tokens": 40,
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}}
        constrained.append(httpx.post(f"{group.url}/v1/chat/completions", json=body, timeout=120))

    threads = [threading.Thread(target=ask, args=(i, e)) for i, e in enumerate(schedule)]
    threads.append(threading.Thread(target=ask_constrained))
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny3)
    assert [results.get(i) for i in range(len(schedule))] == \
        [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
    assert constrained[0].status_code == 200, constrained[0].text
    choice = constrained[0].json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), ANSWER)


def test_a_stage_killed_mid_step_breaks_the_group(two_node_pipeline):
    """Every process of node1 (the second stage) SIGKILLed while a generation runs: readiness 503,
    the request 503, node0's ranks exit 3 naming a rank of node1, within the bounds of
    test_multinode's faults."""
    from test_multinode import _fault_and_measure

    group = two_node_pipeline
    codes = _fault_and_measure(group, "pp-stage-killed-mid-step", group.cluster.nodes[1].kill_all, True,
                               survivors=[0])
    assert codes[0] == 3, group.logs()
    assert "group broken" in group.log(0)
    assert re.search(r"rank [23] \(host node1\)", group.log(0)), group.logs()

"""The tools people point at a vLLM-compatible server, run as their users run them, against a real
2-rank server (DeepSpeed tensor parallel over gloo):

- lm-evaluation-harness, `local-completions`, on two tasks defined in `lm_eval_tasks/` (a YAML and
  a JSONL each, nothing downloaded): a loglikelihood task (echo + logprobs, prompts as token ids,
  batched 4 per request) and a generate-until task. Every loglikelihood it reports is checked
  against the model's own log-softmax (transformers, unsharded, in this process), and every
  generation against the unsharded engine's greedy tokens cut at the task's stop strings.
- guidellm: a short streaming load (a bounded number of requests on 2 concurrent streams); it
  finishes, and the tokens it counts are the tokens the server's vLLM-named metrics count.

aiperf is not used: its pins clash with ours (it needs an older prometheus-client and psutil) and
it brings a large tree of its own (Kubernetes operator, dashboards); guidellm covers the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.client import open_engine

TASKS = Path(__file__).with_name("lm_eval_tasks")
BIN = Path(sys.executable).parent
TOL = 2e-4


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No hub, no dataset download; caches under the test's own directory."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "TOKENIZERS_PARALLELISM": "false"}


def samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_local_completions(server, tiny, tmp_path):
    out = tmp_path / "lm-eval"
    cmd = [str(BIN / "lm-eval"), "run", "--model", "local-completions",
           "--model_args", f"model=tiny,base_url={server.url}/v1/completions,tokenizer={tiny},"
                           "tokenizer_backend=huggingface,max_retries=1",
           "--batch_size", "4", "--tasks", "dscluster_choice,dscluster_until", "--include_path", str(TASKS),
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=TASKS, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert 0.0 <= results["dscluster_choice"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["dscluster_until"]

    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM

    # lm-eval's own split of context and continuation into tokens; the numbers come from the model.
    encoder = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model="tiny", tokenizer=tiny,
                                  tokenizer_backend="huggingface")
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    choice_samples = samples(out, "dscluster_choice")
    assert len(choice_samples) == 4
    scored = 0
    for sample in choice_samples:
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = args["arg_0"], args["arg_1"]
            ctx, cont = encoder._encode_pair(context, continuation)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), dim=-1)
            steps = logprobs[len(ctx) - 1:-1]
            want = steps[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
            greedy = bool((steps.argmax(dim=-1) == torch.tensor(cont)).all())
            got, got_greedy = float(resp[0][0]), resp[0][1] == "True"
            assert abs(got - want) < TOL * len(cont), (context, continuation, got, want)
            assert got_greedy == greedy
            scored += 1
    assert scored == 10

    engine = open_engine(tiny)
    tok = engine.info.tokenizer
    for sample in samples(out, "dscluster_until"):
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        ids = encoder.tok_encode(context)
        (result,) = engine.generate([GenerationRequest(tuple(ids), SamplingParams(max_tokens=12, temperature=0))])
        want = tok.decode(result.token_ids, skip_special_tokens=True)
        for stop in ("\n", "."):
            want = want.split(stop)[0]
        assert sample["resps"][0][0] == want, context


def vllm_counts(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")}


def test_guidellm_streams_and_counts_tokens_as_the_server_does(server, tiny, tmp_path):
    before = vllm_counts(server)
    report = tmp_path / "guidellm.json"
    cmd = [str(BIN / "guidellm"), "run",
           "--backend", f"kind=openai_http,target={server.url},model=tiny,request_format=/v1/completions",
           "--profile", "kind=concurrent,streams=2",
           "--constraint", "kind=max_requests,count=8", "--constraint", "kind=max_duration,seconds=120",
           "--data", "kind=synthetic_text,prompt_tokens=24,output_tokens=12",
           "--tokenizer", f"kind=huggingface_auto,model={tiny}",
           "--output", f"kind=json,path={report}", "--disable-console-interactive"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = vllm_counts(server)
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    requests = benchmark["requests"]
    assert not requests["errored"] and not requests["incomplete"], requests["errored"][:1]
    done = requests["successful"]
    assert len(done) == 8
    prompt = sum(r["prompt_tokens"] for r in done)
    output = sum(r["output_tokens"] for r in done)
    assert output == 8 * 12, "guidellm asks for its output length with ignore_eos"
    assert after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0) == prompt
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == output

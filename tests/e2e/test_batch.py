"""`dscluster batch` end to end: 2 local ranks and `mpirun -np 2`, answers identical to the server's
and to the unsharded model's own, a run killed midway and resumed, bad lines reported in place."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dscluster.cluster.launch import free_port

BODIES = (
    [("/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0})
     for p in ("hello world", "the quick brown fox", "a", "once upon a time")]
    + [("/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 0.9, "top_p": 0.8, "seed": s})
       for s in range(4)]
    + [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6,
                                 "temperature": 0})]
    + [("/v1/predict", {"inputs": [[1, 2, 3], [4, 5, 6]]})]
)


# Structured outputs and tool calls take the same fields in batch mode (random weights: only
# enforcement makes these valid).
ANSWER = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
STRUCTURED = {
    "structured-json": {"messages": [{"role": "user", "content": "answer"}], "max_tokens": 40, "seed": 1,
                        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}},
    "structured-tool": {"messages": [{"role": "user", "content": "call it"}], "max_tokens": 60, "seed": 2,
                        "tools": [{"type": "function", "function": {"name": "f", "parameters": ANSWER}}],
                        "tool_choice": "required", "parallel_tool_calls": False},
}


def batch_lines(bodies=BODIES) -> list[str]:
    return [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
            for i, (url, body) in enumerate(bodies)]


def answer(body: dict):
    """What must be identical between runs: the model's output, not ids or timestamps."""
    if "outputs" in body:
        return body["outputs"]
    choices = [{k: v for k, v in c.items() if k in ("index", "text", "message", "finish_reason")}
               for c in body["choices"]]
    return choices, body["usage"]


def run_batch(cmd_prefix: list[str], model: str, src: Path, out: Path, *extra: str, env=None, timeout=300):
    cmd = [*cmd_prefix, sys.executable, "-m", "dscluster", "batch", model, "--input", str(src), "--output", str(out),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_results(out: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["custom_id"]: r for r in records}


@pytest.fixture(scope="module")
def local_results(tiny, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("batch")
    src = tmp / "in.jsonl"
    lines = batch_lines()
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"custom_id": "req-0", "url": "/v1/completions", "body": {"prompt": "x"}}))
    lines.append(json.dumps({"custom_id": "bad-body", "url": "/v1/completions", "body": {"prompt": ""}}))
    lines.append(json.dumps({"id": "plain-predict", "inputs": [7, 8, 9]}))
    lines += [json.dumps({"custom_id": name, "url": "/v1/chat/completions", "body": body})
              for name, body in STRUCTURED.items()]
    src.write_text("\n".join(lines) + "\n")
    proc = run_batch([], tiny, src, tmp / "out.jsonl", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch: " in proc.stderr and "ok" in proc.stderr  # the summary line
    return read_results(tmp / "out.jsonl")


def test_batch_equals_server(shared_server, local_results):
    with shared_server.client() as client:
        for i, (url, body) in enumerate(BODIES):
            reply = client.post(url, json=body)
            assert reply.status_code == 200, reply.text
            record = local_results[f"req-{i}"]
            assert record["error"] is None and record["response"]["status_code"] == 200
            assert answer(record["response"]["body"]) == answer(reply.json()), url


def test_batch_equals_the_unsharded_model(tiny, local_results):
    """Each answer of the 2-rank batch is the unsharded model's own, not only the server's (a bug
    the two share would pass that comparison): transformers' greedy `generate` and forward pass for
    the greedy completions, the chat and the predict line; for the seeded samples, which
    transformers' sampler does not reproduce, the single-rank engine in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dscluster.engine.api import GenerationRequest, SamplingParams
    from dscluster.engine.client import open_engine

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    single_rank = open_engine(tiny)

    def greedy_text(ids: list[int], max_tokens: int) -> str:
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    for i, (url, body) in enumerate(BODIES):
        got = local_results[f"req-{i}"]["response"]["body"]
        if url == "/v1/predict":
            with torch.no_grad():
                want = model(torch.tensor(body["inputs"])).logits
            diff = (torch.tensor(got["outputs"]) - want).abs().max().item()
            assert diff < 1e-4, f"req-{i}: logits differ from the unsharded model's by {diff}"
        elif url == "/v1/chat/completions":
            ids = tokenizer(tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"]
            assert got["choices"][0]["message"]["content"] == greedy_text(ids, body["max_tokens"]), f"req-{i}"
        elif body["temperature"] == 0:
            ids = tokenizer(body["prompt"])["input_ids"]
            assert got["choices"][0]["text"] == greedy_text(ids, body["max_tokens"]), f"req-{i}"
        else:
            ids = tokenizer(body["prompt"])["input_ids"]
            params = SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"],
                                    top_p=body["top_p"], seed=body["seed"])
            (result,) = single_rank.generate([GenerationRequest(tuple(ids), params)])
            assert got["choices"][0]["text"] == tokenizer.decode(result.token_ids, skip_special_tokens=True), \
                f"req-{i}"


def test_bad_lines_reported_with_line_numbers(local_results):
    assert local_results["line-4"]["error"]["code"] == "invalid_request_line"
    assert "line 4" in local_results["line-4"]["error"]["message"]
    duplicate = local_results["line-6"]["error"]["message"]
    assert "req-0" in duplicate and "line 1" in duplicate
    bad = local_results["bad-body"]
    assert bad["response"]["status_code"] == 400 and "empty" in bad["error"]["message"]
    assert local_results["plain-predict"]["response"]["status_code"] == 200
    assert len(local_results) == len(BODIES) + 4 + len(STRUCTURED)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed")
def test_batch_under_mpirun_equals_local(tiny, local_results, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(batch_lines()) + "\n")
    # No MASTER_ADDR and no hostfile: rank 0 broadcasts its address over MPI.
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", f"MASTER_PORT={free_port()}"]
    proc = run_batch(mpirun, tiny, src, out, env={"MASTER_ADDR": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_results(out)
    assert set(got) == {f"req-{i}" for i in range(len(BODIES))}
    for key, record in got.items():
        assert answer(record["response"]["body"]) == answer(local_results[key]["response"]["body"]), key


def test_killed_run_resumes_each_id_exactly_once(tiny, tmp_path):
    n = 24
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bodies = [("/v1/completions", {"prompt": f"number {i}", "max_tokens": 24, "temperature": 0}) for i in range(n)]
    src.write_text("\n".join(batch_lines(bodies)) + "\n")
    cmd = [sys.executable, "-m", "dscluster", "batch", tiny, "--nproc", "2", "--input", str(src),
           "--output", str(out), "--max-num-seqs", "1"]  # one request at a time: lines come one by one
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not out.exists() or len(out.read_text().splitlines()) < 4:
            assert proc.poll() is None, "the batch ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    partial = len(out.read_text().splitlines())
    assert 4 <= partial < n, partial
    resumed = run_batch([], tiny, src, out, "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{partial} already done" in resumed.stderr
    results = read_results(out)  # asserts no id twice
    assert set(results) == {f"req-{i}" for i in range(n)}
    assert all(r["response"]["status_code"] == 200 for r in results.values())


def test_bad_files_exit_2_before_loading(tiny, tmp_path):
    proc = run_batch([], tiny, tmp_path / "missing.jsonl", tmp_path / "out.jsonl", "--nproc", "2", timeout=60)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr and "no such file" in proc.stderr
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(batch_lines()) + "\n")
    proc = run_batch([], tiny, src, tmp_path / "no-dir" / "out.jsonl", "--nproc", "2", timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Loading" not in proc.stderr  # no rank started


def test_batch_takes_structured_outputs_and_tools(local_results):
    import jsonschema

    body = local_results["structured-json"]["response"]["body"]
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), ANSWER)
    choice = local_results["structured-tool"]["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    for call in choice["message"]["tool_calls"]:
        assert call["function"]["name"] == "f"
        jsonschema.validate(json.loads(call["function"]["arguments"]), ANSWER)

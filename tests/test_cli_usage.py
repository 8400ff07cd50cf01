"""Bad command lines exit 2 with one line naming the flag, before any rank starts or any model loads."""

import subprocess
import sys

import pytest

from cli_in_process import run_dscluster  # tests/cli_in_process.py


@pytest.mark.parametrize("args, named", [
    (["serve", "some-model", "--request-timeout", "-5"], "--request-timeout: -5 must be >= 0"),
    (["serve", "some-model", "--heartbeat-interval", "-1"], "--heartbeat-interval: -1 must be > 0"),
    (["serve", "some-model", "--heartbeat-timeout", "0"], "--heartbeat-timeout: 0 must be > 0"),
    (["serve", "some-model", "--rendezvous-timeout", "soon"], "--rendezvous-timeout: 'soon' is not a number"),
    (["serve", "some-model", "--max-batch-size", "0"], "--max-batch-size: 0 must be >= 1"),
    (["serve", "some-model", "--max-queue", "many"], "--max-queue: 'many' is not an integer"),
    (["serve", "some-model", "--max-wait-ms", "nan"], "--max-wait-ms: nan must be >= 0"),
    (["batch", "some-model", "--input", "in.jsonl", "--output", "out.jsonl", "--collective-timeout", "-1"],
     "--collective-timeout: -1 must be > 0"),
    (["launch", "--nproc", "2", "--grace", "-1", "--", "true"], "--grace: -1 must be >= 0"),
    (["serve", "some-model", "--max-num-seqs", "64", "--max-num-batched-tokens", "32"],
     "--max-num-batched-tokens 32 must be at least --max-num-seqs 64"),
    (["serve", "some-model", "--max-model-len", "0"], "--max-model-len: 0 must be >= 1"),
    (["env", "--check", "--timeout", "0"], "--timeout: 0 must be > 0"),
    (["serve", "some-model", "--tool-call-parser", "mistral"], "--tool-call-parser: 'mistral' is not one of hermes"),
])
def test_bad_flag_exits_2_in_one_line(args, named):
    if args[0] == "env":  # through `python -m dscluster`, the entry point itself
        proc = subprocess.run([sys.executable, "-m", "dscluster", *args], capture_output=True, text=True, timeout=60)
    else:  # the same parser and handlers, in this process
        proc = run_dscluster(*args)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert named in line, line


def test_tiny_model_into_an_unwritable_place_exits_2(tmp_path):
    (tmp_path / "a-file").write_text("")
    for where in ("/proc/no-such-model", str(tmp_path / "a-file" / "model")):
        proc = run_dscluster("tiny-model", where)
        assert proc.returncode == 2 and f"cannot create {where}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_max_model_len_beyond_the_models_context_exits_2(tiny):
    from dscluster.cluster.launch import free_port

    proc = subprocess.run([sys.executable, "-m", "dscluster", "serve", tiny, "--nproc", "1", "--port", str(free_port()),
                           "--max-model-len", "100000"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--max-model-len 100000 exceeds the model's context of 2048 tokens" in proc.stderr.strip().splitlines()[-1]

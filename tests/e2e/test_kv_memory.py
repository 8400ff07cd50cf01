"""Generation lives within its memory: a server in a memory cgroup (tests/e2e/cgroups.py) sizes its
key/value pool from the limit, and a load that needs more cache than the limit leaves is answered in
full, every request, by making requests wait, grow, and be preempted and recomputed, never by an
OOM kill. Before the pool, the cache grew with the load until the kernel killed the server.

Also: start-up exits 2 when the pool cannot hold one request of --max-model-len."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest

from cgroups import MemoryCgroup, unavailable_reason  # tests/e2e/cgroups.py
from cli_in_process import write_tiny_model  # tests/cli_in_process.py
from dscluster.cluster.launch import free_port
from servers import poll_ready  # tests/e2e/servers.py
from test_launchers import clean_env  # tests/e2e/test_launchers.py

MIB = 2**20
PROMPT, NEW = 700, 32
HEADROOM = 160 * MIB             # above the idle server: a pool of some 10,000 tokens of 8 KiB


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> str:
    """2 layers of width 512: 8 KiB of keys and values per token in float32."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "wide", "--seed", "6", "--hidden", "512", "--heads", "8")


def start(model: str, port: int, cgroup: MemoryCgroup, *args: str) -> tuple[subprocess.Popen, object]:
    log = tempfile.TemporaryFile("w+")
    cmd = [sys.executable, "-m", "dscluster", "serve", model, "--port", str(port), "--max-model-len", "800",
           "--request-timeout", "900", *args]
    proc = subprocess.Popen(cgroup.command(cmd), env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=log, text=True, start_new_session=True)
    return proc, log


def stop(proc: subprocess.Popen, log) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.seek(0)
    return proc.returncode, log.read()


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"needs memory cgroups: {unavailable_reason()}")
def test_a_load_larger_than_the_memory_left_is_answered_in_full(wide):
    # What the server holds when idle (its pool untouched), measured in a cgroup of its own.
    with MemoryCgroup(8 * 2**30, "idle") as cgroup:
        port = free_port()
        proc, log = start(wide, port, cgroup, "--num-kv-blocks", "64")
        assert poll_ready(f"http://127.0.0.1:{port}", lambda: proc.poll() is None, 240), stop(proc, log)[1][-3000:]
        idle = cgroup.usage()
        stop(proc, log)

    limit = idle + HEADROOM
    with MemoryCgroup(limit, "loaded") as cgroup:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, log = start(wide, port, cgroup)
        try:
            assert poll_ready(url, lambda: proc.poll() is None, 240), stop(proc, log)[1][-3000:]
            startup = os.pread(log.fileno(), 1 << 20, 0).decode(errors="replace")   # the server's offset stays
            pool_tokens = int(re.search(r"KV cache: (\d+) tokens", startup).group(1))
            requests = max(16, -(-3 * pool_tokens // (2 * (PROMPT + NEW))))    # half again what the pool holds

            def ask(i: int) -> dict:
                prompt = [1] + [(i * 37 + j * 11) % 1000 + 3 for j in range(PROMPT - 1)]
                body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
                return httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()

            with concurrent.futures.ThreadPoolExecutor(requests) as pool:
                answers = list(pool.map(ask, range(requests)))
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
        finally:
            code, err = stop(proc, log)
        assert cgroup.oom_kills() == 0, err[-3000:]
        peak = cgroup.peak_bytes()
    assert code == 0, err[-3000:]
    assert len(answers) == requests and requests * (PROMPT + NEW) > pool_tokens   # more than the pool holds
    for answer in answers:
        assert "usage" in answer and answer["usage"]["completion_tokens"] == NEW, answer
        assert answer["choices"][0]["finish_reason"] == "length"
    preemptions = float(re.search(r'^vllm:num_preemptions_total\{[^}]*\} (\S+)', metrics, re.M).group(1))
    print(f"kv-memory: idle {idle / MIB:.0f} MiB, limit {limit / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, "
          f"pool {pool_tokens} tokens, {requests} requests, {preemptions:.0f} preemptions")
    assert peak <= limit


def test_a_pool_too_small_for_one_request_exits_2(tiny):
    """Every rank finds the same block count (the group agrees on the smallest); the first rank to
    say so ends the group with exit 2 (the launcher stops the others)."""
    proc = subprocess.run([sys.executable, "-m", "dscluster", "serve", tiny, "--nproc", "2", "--port",
                           str(free_port()), "--max-model-len", "128", "--num-kv-blocks", "7"],
                          capture_output=True, text=True, timeout=240, env=clean_env())
    errors = [line for line in proc.stderr.splitlines() if "dscluster: error:" in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors and all("holds 112 tokens (7 blocks of 16)" in e and "--max-model-len 128" in e for e in errors), \
        proc.stderr[-3000:]

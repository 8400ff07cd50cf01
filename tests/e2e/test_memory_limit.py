"""A node too small for the model: each rank in a memory cgroup whose limit is below what one
unsharded process needs (tests/e2e/cgroups.py).

The model is stored in bfloat16 and served in float32, so its weights take new memory (1.1 GB)
rather than pages mapped from the file, which the kernel could reclaim. Under the limit, one
unsharded rank says it cannot hold the model and exits 2 (and, with that check off, the kernel
kills it: the limit really is too small); two tp ranks, each under the same limit as if on its own
node, load only their halves, serve, and answer exactly like an unlimited unsharded server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from cgroups import MemoryCgroup, unavailable_reason  # tests/e2e/cgroups.py
from dscluster.cluster.launch import free_port
from servers import poll_ready  # tests/e2e/servers.py
from test_launchers import clean_env  # tests/e2e/test_launchers.py

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the memory-limit test needs memory cgroups: {REASON}")

COMPLETION = {"prompt": "The cluster", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
PREDICT = {"inputs": [[1, 614, 15, 591, 4, 788], [1, 20, 30, 40, 50, 60]]}


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> tuple[str, int]:
    """4 layers of width 2048 (272M parameters), stored in bfloat16 in several files; returns the
    directory and the bytes its weights take in float32."""
    path = tmp_path_factory.mktemp("model") / "bf16"
    subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(path), "--seed", "2", "--layers", "4",
                    "--hidden", "2048", "--max-shard-size", "200MB"], check=True, capture_output=True, timeout=600)
    elements = 0
    for file in sorted(path.glob("*.safetensors")):
        state = {k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}
        elements += sum(v.numel() for v in state.values())
        save_file(state, str(file), metadata={"format": "pt"})
        del state
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = 2 * elements
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return str(path), 4 * elements


class Server:
    """One `dscluster serve` process (one rank), maybe inside a memory cgroup."""

    def __init__(self, model: str, port: int, env: dict[str, str], cgroup: MemoryCgroup | None, *args: str):
        cmd = [sys.executable, "-m", "dscluster", "serve", model, "--dtype", "float32", "--port", str(port),
               "--heartbeat-timeout", "30", *args]
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(cgroup.command(cmd) if cgroup else cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.log, text=True, start_new_session=True)

    def wait(self, timeout: float) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self.log.seek(0)
        return self.proc.returncode, self.log.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def answers(url: str) -> dict:
    completion = httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=120)
    predict = httpx.post(f"{url}/v1/predict", json=PREDICT, timeout=120)
    assert completion.status_code == 200 and predict.status_code == 200, (completion.text, predict.text)
    return {"text": completion.json()["choices"][0]["text"], "logits": predict.json()["outputs"]}


def serve_and_ask(servers: list[Server], port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    try:
        if not poll_ready(url, lambda: all(s.proc.poll() is None for s in servers), 300):
            pytest.fail("not ready: " + " | ".join(s.wait(1)[1][-2000:] if s.proc.poll() is not None else "running"
                                                  for s in servers))
        result = answers(url)
        servers[0].proc.send_signal(signal.SIGTERM)  # rank 0 drains and stops every rank
        codes = [s.wait(60)[0] for s in servers]
        assert codes == [0] * len(servers), codes
        return result
    finally:
        for s in servers:
            s.kill()


def test_a_node_too_small_for_the_model_serves_it_split(bf16_model):
    model, weight_bytes = bf16_model
    # Below one unsharded process (its weights plus the ~0.35 GB a rank uses before loading),
    # above a tp=2 rank (half the weights, the embedding, the same fixed cost).
    limit = 400 * 2**20 + int(0.75 * weight_bytes)
    base = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    with MemoryCgroup(2**40, "unlimited") as cgroup:  # no limit that matters: to measure its peak
        unlimited = serve_and_ask([Server(model, port, base, cgroup)], port)
        unsharded_peak = cgroup.peak_bytes()
    assert unsharded_peak > limit, "one unsharded rank fits the limit: the test proves nothing"

    with MemoryCgroup(limit, "unsharded") as cgroup:
        code, err = Server(model, free_port(), base, cgroup).wait(240)
        errors = [line for line in err.splitlines() if line.startswith("dscluster: error:")]
        assert code == 2 and len(errors) == 1, err[-3000:]
        assert f"needs {weight_bytes / 2**30:.2f} GiB of host memory for the whole model" in errors[0]
        assert "memory cgroup (v1) memory.limit_in_bytes" in errors[0] and cgroup.oom_kills() == 0

    with MemoryCgroup(limit, "unchecked") as cgroup:  # the same without the check: the kernel kills it
        code, err = Server(model, free_port(), {**base, "DSCLUSTER_MEMORY_CHECK": "0"}, cgroup).wait(300)
        assert code == -signal.SIGKILL and cgroup.oom_kills() >= 1, (code, err[-2000:])

    port, master = free_port(), free_port()
    with MemoryCgroup(limit, "rank0") as cg0, MemoryCgroup(limit, "rank1") as cg1:
        # Each rank alone in its cgroup, as if on its own node (LOCAL_SIZE 1).
        ranks = [Server(model, port, {**base, "RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                      "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)},
                        cg, "--engine", "tp") for r, cg in enumerate((cg0, cg1))]
        split = serve_and_ask(ranks, port)
        assert cg0.oom_kills() == cg1.oom_kills() == 0
        peaks = [cg.peak_bytes() for cg in (cg0, cg1)]
    print(f"memory-limit: limit {limit / 2**20:.0f} MiB, float32 weights {weight_bytes / 2**20:.0f} MiB, "
          f"unsharded peak {unsharded_peak / 2**20:.0f} MiB, tp=2 cgroup peaks {[round(p / 2**20) for p in peaks]} MiB")
    for rank, peak in enumerate(peaks):
        # Its half of the weights was charged to its cgroup (so the limit applied to it), it never
        # pressed against the limit, and it held about half of what one unsharded rank held.
        assert weight_bytes / 2 < peak < limit, f"rank {rank} peaked at {peak / 2**20:.0f} MiB"
        assert peak <= unsharded_peak - weight_bytes / 4, \
            f"rank {rank} peaked at {peak / 2**20:.0f} MiB, one unsharded rank at {unsharded_peak / 2**20:.0f} MiB"
    assert split["text"] == unlimited["text"]
    diff = max(abs(a - b) for x, y in zip(split["logits"], unlimited["logits"], strict=True)
               for a, b in zip(_flat(x), _flat(y), strict=True))
    assert diff < 1e-4, f"tp=2 under the limit differs from the unlimited unsharded server by {diff}"


def _flat(x) -> list[float]:
    return [v for row in x for v in _flat(row)] if isinstance(x, list) else [x]

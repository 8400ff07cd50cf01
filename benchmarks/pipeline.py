"""Across two nodes: pipeline parallelism (`--pp 2`) against tensor parallelism (tp=2).

Two "nodes" are two network namespaces on this machine joined by one bridge (tests/e2e/netns.py,
the multi-node tests' harness), one rank each, started as LeaderWorkerSet starts them (its
variables, the leader found by name, gloo on the node's interface). Three links in one run, each
shaped on both nodes' interfaces with tbf (the kernel here has tbf, not netem):

- 200 Mbit/s serialized: tbf with a 4 KiB bucket, so that every message pays its size over the
  rate, as on a physical 200 Mbit/s link (measured: a 16 KiB TCP round trip takes 1.1 ms, near
  the 1.31 ms two 16 KiB messages take on the wire, the bucket letting the first 4 KiB through);
- 200 Mbit/s with 64 KiB bursts: the same average rate, but any message under 64 KiB passes at
  memory speed while the bucket is full (a 16 KiB round trip: 0.7 ms). Tensor parallelism's
  all-reduces of a few rows are each under 64 KiB, so this link caps tp's average rate and hardly
  its per-step latency;
- unshaped.

Each link's round trip for 16 and 64 KiB messages (a TCP echo between the nodes) is measured and
reported beside the serialization time, so the shaping is shown, not assumed. On each link
`dscluster serve` with `--pp 2` and with `--engine tp` (tp=2) serve the generation benchmark's
mixed workload (benchmarks/generation.py: streamed, greedy, end-of-sequence ignored, so both
compute exactly the same tokens) from a load process inside node0's namespace, over its loopback,
so that the link carries only what the ranks send. The serialized link is measured a second time
in bfloat16 (`--dtype bfloat16`, the dtype production runs on GPUs; this CPU multiplies bf16 with
AMX), where compute per step shrinks and the link's share of tp's step grows.

Reported per configuration: output tokens/s; bytes each rank sent per generation step, counted by
the kernel (the node's interface `tx_bytes` over the run, divided by the steps rank 0's
`/metrics` counted: hand-overs or all-reduces, control messages, liveness, everything); and the
model memory each rank holds (its parameters, as each rank logs them), against the unsharded
model's. The issue's targets: pp=2 at least 1.5x tp=2 over 200 Mbit/s, at least 0.9x unshaped,
model memory per rank at most 0.55x unsharded.

Needs root (network namespaces and tc); run alone: `python -m benchmarks.run --only pipeline`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, load_avg, model_dir, table

sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from netns import Cluster, unavailable_reason  # noqa: E402  (the multi-node tests' harness)

RATE, RATE_BITS = "200mbit", 200e6
LINKS = [("200 Mbit/s serialized (tbf, 4 KiB bucket)", RATE, "4kb"),
         ("200 Mbit/s, 64 KiB bursts (tbf)", RATE, "64kb"), ("unshaped", None, None)]
BFLOAT16_ON = LINKS[0][0]
ECHO_SIZES, ECHO_ROUNDS, ECHO_PORT = (16 * 1024, 64 * 1024), 50, 29600
STREAMS, REQUESTS = 8, 24
BATCHED_TOKENS = 40
HTTP_PORT, MASTER_PORT = 8000, 29500
LAYOUTS = [("pp=2", ("--pp", "2")), ("tp=2", ("--engine", "tp"))]


def _env(node: int) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    return {**keep, "LWS_LEADER_ADDRESS": "node0", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": str(node),
            "MASTER_PORT": str(MASTER_PORT), "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def _tx_bytes(node) -> int:
    return int(node.run(["cat", "/sys/class/net/eth0/statistics/tx_bytes"]).stdout)


def _metric(node, name: str) -> float:
    """A counter from rank 0's /metrics (read inside node0), summed over its labels."""
    text = node.run(["curl", "-s", f"http://127.0.0.1:{HTTP_PORT}/metrics"]).stdout
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _shape(cluster: Cluster, rate: str | None, burst: str | None) -> None:
    for node in cluster.nodes:
        node.run(["tc", "qdisc", "del", "dev", "eth0", "root"])
        if rate:
            out = node.run(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst,
                            "latency", "200ms"])
            if out.returncode != 0:
                raise RuntimeError(f"tc on {node.name}: {out.stderr.strip()}")


_ECHO_SERVER = f"""
import socket
with socket.create_server(("0.0.0.0", {ECHO_PORT})) as server:
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for size in {ECHO_SIZES}:
        for _ in range({ECHO_ROUNDS}):
            message = b""
            while len(message) < size:      # the whole message, then the answer: a ping-pong
                message += conn.recv(size - len(message))
            conn.sendall(message)
"""

_ECHO_CLIENT = f"""
import json, socket, statistics, time
conn = socket.create_connection(("node1", {ECHO_PORT}), timeout=10)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
out = {{}}
for size in {ECHO_SIZES}:
    message, times = b"x" * size, []
    for _ in range({ECHO_ROUNDS}):
        start = time.perf_counter()
        conn.sendall(message)
        left = size
        while left:
            left -= len(conn.recv(left))
        times.append(time.perf_counter() - start)
    out[size] = round(statistics.median(times) * 1000, 2)
print(json.dumps(out))
"""


def round_trips(cluster: Cluster) -> dict[str, float]:
    """Median TCP round trip (ms) of each message size over the link as shaped: node0 sends the
    message, node1 answers it whole once it has it all (as a hand-over or an all-reduce waits for
    its tensor), so a link that serializes every byte costs twice the message's wire time."""
    server = cluster.nodes[1].popen([sys.executable, "-c", _ECHO_SERVER])
    try:
        for _ in range(50):
            out = cluster.nodes[0].run([sys.executable, "-c", _ECHO_CLIENT])
            if out.returncode == 0:
                return json.loads(out.stdout)
            time.sleep(0.1)      # the server not listening yet
        raise RuntimeError(f"echo over the link failed: {out.stderr[-500:]}")
    finally:
        server.kill()
        server.wait()


def _serve(cluster: Cluster, model: Path, flags: tuple[str, ...], logdir: Path) -> list:
    procs = []
    for i, node in enumerate(cluster.nodes):
        cmd = [sys.executable, "-m", "dscluster", "serve", str(model), "--host", "0.0.0.0", "--port", str(HTTP_PORT),
               "--max-num-seqs", str(STREAMS), "--max-num-batched-tokens", str(BATCHED_TOKENS),
               "--request-timeout", "0", *flags]
        procs.append(node.popen(cmd, env=_env(i), log=logdir / f"node{i}.log"))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a node exited before ready:\n" + "\n".join(
                (logdir / f"node{i}.log").read_text()[-2000:] for i in range(2)))
        ready = cluster.nodes[0].run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                      f"http://127.0.0.1:{HTTP_PORT}/health/ready"]).stdout
        if ready == "200":
            return procs
        time.sleep(1)
    raise RuntimeError("not ready in time")


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def measure(cluster: Cluster, model: Path, name: str, flags: tuple[str, ...], requests: list[dict]) -> dict:
    logdir = Path(tempfile.mkdtemp(prefix="dscluster-pp-bench-"))
    procs = _serve(cluster, model, flags, logdir)
    node0 = cluster.nodes[0]
    try:
        load = [sys.executable, "-m", "benchmarks.generation", "load", "--url", f"http://127.0.0.1:{HTTP_PORT}",
                "--style", "dscluster", "--model", str(model), "--requests"]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=logdir) as f:
            json.dump(requests[:2], f)
        node0.run(load + [f.name, "--concurrency", "2"], timeout=600, cwd=ROOT)     # warm-up
        with open(f.name, "w") as g:
            json.dump(requests, g)
        steps0 = _metric(node0, "dscluster_forward_seconds_count")
        tx0 = [_tx_bytes(n) for n in cluster.nodes]
        load_start = load_avg()
        out = node0.run(load + [f.name, "--concurrency", str(STREAMS)], timeout=3600, cwd=ROOT)
        tx1 = [_tx_bytes(n) for n in cluster.nodes]
        steps = _metric(node0, "dscluster_forward_seconds_count") - steps0
        if out.returncode != 0:
            raise RuntimeError(f"load failed: {out.stderr[-2000:]}")
        loaded = json.loads(out.stdout)
    finally:
        _stop(procs)
    logs = "".join((logdir / f"node{i}.log").read_text(errors="replace") for i in range(2))
    held = {int(r): float(mib) for r, mib in re.findall(r"rank (\d+) ready: .*holds \d+ parameters \(([\d.]+) MiB\)",
                                                        logs)}
    records = loaded["records"]
    tokens = sum(r["tokens"] or 0 for r in records if r["error"] is None)
    return {"name": name, "flags": list(flags), "output_tokens": tokens, "seconds": round(loaded["seconds"], 2),
            "output_tokens_per_s": round(tokens / loaded["seconds"], 1),
            "errors": sum(1 for r in records if r["error"] is not None), "steps": int(steps),
            "bytes_per_step": [round((b - a) / max(steps, 1)) for a, b in zip(tx0, tx1)],
            "bytes_sent": [b - a for a, b in zip(tx0, tx1)], "model_mib_per_rank": [held.get(r) for r in range(2)],
            "load_avg": [load_start, load_avg()]}


def run(out_dir: Path, quick: bool) -> dict:
    from benchmarks.generation import workload

    reason = unavailable_reason()
    if reason:
        return {"skipped": reason}
    model = model_dir("tiny" if quick else "llama-100m")
    requests = workload(6 if quick else REQUESTS)
    from dscluster.engine.client import open_engine

    whole = open_engine(str(model))
    unsharded_mib = sum(p.numel() * p.element_size() for p in whole.runtime.model.module.parameters()) / 2**20
    whole.shutdown()
    links = []
    with Cluster(2) as cluster:
        for link, rate, burst in LINKS:
            _shape(cluster, rate, burst)
            trips = round_trips(cluster)
            wire = {size: round(2 * int(size) * 8 / RATE_BITS * 1000, 2) for size in trips} if rate else None
            rows = [measure(cluster, model, name, flags, requests) for name, flags in LAYOUTS]
            links.append({"link": link, "dtype": "float32", "round_trip_ms": trips, "serialized_ms": wire,
                          "rows": rows})
            if link == BFLOAT16_ON:
                rows = [measure(cluster, model, name, flags + ("--dtype", "bfloat16"), requests)
                        for name, flags in LAYOUTS]
                links.append({"link": link, "dtype": "bfloat16", "round_trip_ms": trips, "serialized_ms": wire,
                              "rows": rows})
    return {"model": model.name, "streams": STREAMS, "requests": len(requests), "batched_tokens": BATCHED_TOKENS,
            "unsharded_model_mib": round(unsharded_mib, 1), "links": links}


def summary(result: dict) -> str:
    if "skipped" in result:
        return f"pipeline: skipped ({result['skipped']})"
    rows, trips = [], []
    for link in result["links"]:
        by = {r["name"]: r for r in link["rows"]}
        unsharded = result["unsharded_model_mib"] * (0.5 if link["dtype"] == "bfloat16" else 1)
        for r in link["rows"]:
            ratio = r["output_tokens_per_s"] / by["tp=2"]["output_tokens_per_s"]
            held = [m for m in r["model_mib_per_rank"] if m is not None]
            memory = f"{' / '.join(f'{m:.0f}' for m in held)} ({max(held) / unsharded:.2f}x)" if held else "?"
            rows.append([link["link"], link["dtype"], r["name"], f"{r['output_tokens_per_s']:.1f}", f"{ratio:.2f}x",
                         " / ".join(f"{b / 1024:.1f}" for b in r["bytes_per_step"]), str(r["steps"]), memory,
                         str(r["errors"])])
        if link["dtype"] == "float32":
            wire = link["serialized_ms"] or {}
            trips.append([link["link"]] + [f"{ms} ms" + (f" (wire {wire[size]} ms)" if size in wire else "")
                                           for size, ms in link["round_trip_ms"].items()])
    head = (f"{result['model']}, {result['requests']} requests, {result['streams']} streams, "
            f"{result['batched_tokens']} tokens per step; unsharded model {result['unsharded_model_mib']:.0f} MiB "
            "(float32)\n\n")
    sizes = [f"{int(size) // 1024} KiB round trip" for size in result["links"][0]["round_trip_ms"]]
    return (head + table(["link", "dtype", "layout", "output tokens/s", "vs tp=2", "KiB sent per step (rank 0 / rank 1)",
                          "steps", "model MiB per rank (max / unsharded)", "errors"], rows)
            + "\n\n" + table(["link"] + sizes, trips))

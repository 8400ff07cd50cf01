"""Serving: the HTTP server's overhead over a bare forward pass, and throughput against the seeds' design.

The model is the seeds' kind of workload: a 4-layer, 2048-wide MLP (one example = 2048 floats),
built from a fixed seed so every rank holds the same weights. Compared, one at a time, each with
the same load:

- **seeds' design**: a plain FastAPI route that runs one forward pass per request (`seeds` below);
- **dscluster, 1 rank**: `dscluster serve benchmarks.serving:build_mlp` (batching, validation, metrics);
- **dscluster, 2 ranks**: the same with `--nproc 2` (replicated: every batch also crosses the
  control channel to the second rank, in lockstep).

Load: a separate process (`python -m benchmarks.serving load ...`, asyncio + httpx, keep-alive
connections) posts to `/predict` with N requests in flight for a fixed time. The load generator
shares the machine's 2 cores with the server, the same for every server, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import load_avg, pyplot, stats, table

IN_FEATURES, WIDTH, LAYERS, OUT_FEATURES = 256, 2048, 4, 256
ROOT = Path(__file__).resolve().parent.parent


def build_mlp() -> nn.Module:
    """The served model (an import spec for `dscluster serve`)."""
    generator = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    sizes = [IN_FEATURES, *[WIDTH] * (LAYERS - 1), OUT_FEATURES]
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5)
            linear.bias.zero_()
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


# -- the seeds' design ---------------------------------------------------------------------------


def seeds_app():
    """The seeds' server: one forward pass per request, in the route, no batching."""
    from fastapi import FastAPI

    app = FastAPI()
    model = build_mlp()

    @app.post("/predict")
    async def predict(data: list[float]) -> dict:
        with torch.no_grad():
            output = model(torch.tensor(data).unsqueeze(0))
        return {"result": output.squeeze(0).tolist()}

    @app.get("/health/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    return app


# -- load generator ---------------------------------------------------------------------------------


async def _load(url: str, concurrency: int, seconds: float, warmup: float) -> dict:
    import asyncio

    import httpx

    body = json.dumps([0.01 * (i % 100) for i in range(WIDTH)]).encode()
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                return
            try:
                reply = await client.post(url, content=body, headers=headers)
                ok = reply.status_code == 200
            except httpx.HTTPError:
                ok = False
            done = time.monotonic()
            if sent >= measure_from:
                if ok:
                    latencies.append(done - sent)
                else:
                    errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "req_per_s": len(latencies) / seconds, "latency_ms": stats([x * 1000 for x in latencies])}


def measure_load(url: str, concurrency: int, seconds: float, warmup: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.serving", "load", "--url", url, "--concurrency", str(concurrency),
           "--seconds", str(seconds), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# -- servers ----------------------------------------------------------------------------------------


def _free_port() -> int:
    from dscluster.cluster.launch import free_port

    return free_port()


class Server:
    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{cmd} not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


SERVERS = [
    ("seeds' design (1 process)", "seeds"),
    ("dscluster, 1 rank", "dscluster-1"),
    ("dscluster, 2 ranks", "dscluster-2"),
]


def start(kind: str) -> Server:
    port = _free_port()
    if kind == "seeds":
        return Server([sys.executable, "-m", "benchmarks.serving", "seeds", "--port", str(port)], port)
    nproc = kind.rsplit("-", 1)[1]
    return Server([sys.executable, "-m", "dscluster", "serve", "benchmarks.serving:build_mlp", "--nproc", nproc,
                   "--port", str(port), "--log-level", "WARNING"], port)


def bare_forward(threads: int, reps: int) -> dict:
    """One example through the model in this process: what a request costs without any server."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, x = build_mlp(), torch.randn(1, WIDTH)
    samples = []
    with torch.no_grad():
        for _ in range(20):
            model(x)
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            samples.append((time.perf_counter() - t) * 1000)
    torch.set_num_threads(before)
    return {"threads": threads, "ms": stats(samples)}


def run(out_dir: Path, quick: bool) -> dict:
    levels = [1, 32] if quick else [1, 8, 32, 64]
    seconds, warmup = (2.0, 0.5) if quick else (5.0, 1.0)
    bare = [bare_forward(t, 50 if quick else 300) for t in (1, 2)]
    servers = []
    for name, kind in SERVERS:
        server = start(kind)
        try:
            runs = [measure_load(f"{server.url}/predict", c, seconds, warmup) for c in levels]
        finally:
            server.stop()
        servers.append({"name": name, "kind": kind, "runs": runs})
    result = {"model": f"MLP {LAYERS} x {WIDTH} (float32)", "levels": levels, "seconds_per_level": seconds,
              "bare_forward": bare, "servers": servers, "client": "asyncio + httpx, separate process",
              "load_avg_end": load_avg()}
    _plot(result, out_dir / "serving.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in result["servers"]:
        levels = [r["concurrency"] for r in s["runs"]]
        ax1.plot(levels, [r["req_per_s"] for r in s["runs"]], marker="o", label=s["name"])
        ax2.plot(levels, [r["latency_ms"]["p50"] for r in s["runs"]], marker="o", label=s["name"])
    ax1.set(xlabel="requests in flight", ylabel="requests / s", title="throughput", xscale="log", xticks=result["levels"])
    ax2.set(xlabel="requests in flight", ylabel="ms (p50)", title="latency", xscale="log", yscale="log",
            xticks=result["levels"])
    for ax in (ax1, ax2):
        ax.set_xticklabels([str(x) for x in result["levels"]])
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle(f"{result['model']}: one request = one example")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    seeds = {r["concurrency"]: r for r in result["servers"][0]["runs"]}
    bare = result["bare_forward"]
    head = ["server", *[f"{c} in flight: req/s (p50 ms)" for c in result["levels"]], "vs seeds at the highest load"]
    rows = []
    for s in result["servers"]:
        cells = [f"{r['req_per_s']:.0f} ({r['latency_ms']['p50']:.1f})" for r in s["runs"]]
        top = s["runs"][-1]["req_per_s"] / max(seeds[result["levels"][-1]]["req_per_s"], 1e-9)
        rows.append([s["name"], *cells, f"{top:.2f}x"])
    one = {s["name"]: s["runs"][0]["latency_ms"]["p50"] for s in result["servers"]}
    bare_ms = statistics.median(b["ms"]["p50"] for b in bare)
    overhead = [[name, f"{ms:.2f}", f"{ms - bare_ms:+.2f}", f"{ms / bare_ms:.1f}x"] for name, ms in one.items()]
    return (f"{result['model']}, `POST /predict` with one example (2048 floats) per request; "
            f"{result['seconds_per_level']:g} s per level; load from {result['client']}.\n\n"
            + table(head, rows)
            + f"\n\nLatency overhead at 1 request in flight, against a bare forward pass in-process "
              f"(p50 {bare[0]['ms']['p50']:.2f} ms with 1 thread, {bare[1]['ms']['p50']:.2f} ms with 2):\n\n"
            + table(["server", "p50 ms", "over bare forward (ms)", "ratio"], overhead))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("seeds", help="run the seeds' design server")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("load", help="generate load, print JSON")
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--warmup", type=float, default=1)
    args = parser.parse_args()
    if args.what == "seeds":
        import uvicorn

        uvicorn.run(seeds_app(), host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    import asyncio

    print(json.dumps(asyncio.run(_load(args.url, args.concurrency, args.seconds, args.warmup))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

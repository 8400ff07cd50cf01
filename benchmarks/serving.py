"""Serving: rank 0's HTTP front end against the seeds' design and LitServe, loaded by `wrk`.

The model: a 4-layer MLP, 2048 wide, 256 numbers in and 256 out (`build_mlp`, built from a fixed
seed so every rank holds the same weights), served through an import spec. One request = one
example of 256 floats. The servers, each alone on the machine, one after the other in one run:

- **seeds' design**: the seeds' FastAPI route (`def predict(x: list[float])`, one forward pass per
  request, torch's default threads), `POST /predict` with a JSON list;
- **LitServe**, batching on and tuned: batch 32, 1 torch thread, its default one HTTP process and
  one inference process, and the `batch_timeout` (2-20 ms; at 0 its batch loop spins on an empty
  queue) that gave it the most requests/s at 32 connections, measured at the start of the run
  (`benchmarks/litserve_mlp.py`); `POST /predict` with `{"inputs": [...]}`;
- **dscluster, 1 rank** and **2 ranks** (`--nproc 2`: replicated, every batch crosses the control
  channel to the second rank), defaults (`--max-batch-size 32`, `--max-wait-ms 0`),
  `POST /v1/predict` with `{"inputs": [...]}`.

Load: `wrk` (a C load generator: a Python client would take the cores the server needs), one
thread, N keep-alive connections each with one request in flight, for a fixed time after an
unmeasured warm-up. A second table repeats some levels while a CPU hog (one process spinning in
a loop) keeps one of the cores busy, as other work on a shared host does. A full run makes three
passes over the servers (each pass starting with the next one, so drifting load from other work
falls on all alike) and reports medians. Everything is reported as ratios to the seeds' design
and to LitServe, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import Server, load_avg, pyplot, stats, table

IN_FEATURES, WIDTH, LAYERS, OUT_FEATURES = 256, 2048, 4, 256
MAX_BATCH = 32
LITSERVE_BATCH_TIMEOUT = 0.005                      # the default; a full run tunes it first
LITSERVE_TIMEOUTS = (0.002, 0.005, 0.01, 0.02)      # batch_timeout values tried at 32 connections
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


def example() -> list[float]:
    return [round(0.01 * (i % 100), 2) for i in range(IN_FEATURES)]


# -- the seeds' design -------------------------------------------------------------------------------


def seeds_app():
    """The seeds' server: their route as written (a plain `def`, so FastAPI runs it in its thread
    pool), one forward pass per request, no batching."""
    from fastapi import FastAPI

    app = FastAPI()
    model = build_mlp()

    @app.post("/predict")
    def predict(x: list[float]) -> dict:
        with torch.no_grad():
            output = model(torch.tensor(x).unsqueeze(0))
        return {"result": output.squeeze(0).tolist()}

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ready"}

    return app


# -- servers ----------------------------------------------------------------------------------------

V1_BODY = json.dumps({"inputs": example()})
SERVERS = [
    # (name, kind, route, body, readiness route)
    ("seeds' design", "seeds", "/predict", json.dumps(example()), "/health/ready"),
    ("LitServe (batch 32, 1 thread)", "litserve", "/predict", V1_BODY, "/health"),
    ("dscluster, 1 rank", "dscluster-1", "/v1/predict", V1_BODY, "/health/ready"),
    ("dscluster, 2 ranks", "dscluster-2", "/v1/predict", V1_BODY, "/health/ready"),
]


def start(kind: str, ready_path: str, litserve_timeout: float = LITSERVE_BATCH_TIMEOUT) -> Server:
    from dscluster.cluster.launch import free_port

    port = free_port()
    me = [sys.executable, "-m", "benchmarks.serving"]
    if kind == "seeds":
        return Server([*me, "seeds", "--port", str(port)], port, ready_path, start_timeout=300)
    if kind == "litserve":
        return Server([sys.executable, "-m", "benchmarks.litserve_mlp", "--port", str(port), "--batch-timeout",
                       str(litserve_timeout)], port, ready_path, start_timeout=300)
    nproc = kind.rsplit("-", 1)[1]
    return Server([sys.executable, "-m", "dscluster", "serve", "benchmarks.serving:build_mlp", "--nproc", nproc,
                   "--port", str(port), "--max-batch-size", str(MAX_BATCH), "--log-level", "WARNING"],
                  port, ready_path, start_timeout=300)


# -- load: wrk ----------------------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nRESULT {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: `make bench` installs it (Debian package wrk)")
    return path


def run_wrk(url: str, body: str, connections: int, seconds: float) -> dict:
    """One wrk run; requests/s and latency percentiles in ms (wrk's own histogram)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        proc = subprocess.run([wrk_path(), "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s",
                               "-s", script.name, url], capture_output=True, text=True,
                              env={**os.environ, "BENCH_BODY": body}, timeout=seconds + 60)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    r = json.loads(line[len("RESULT "):])
    seconds_run = r["duration_us"] / 1e6
    return {"connections": connections, "requests": r["requests"], "req_per_s": r["requests"] / seconds_run,
            "errors": r["non_2xx"] + r["socket_errors"],
            "latency_ms": {k: r[f"{k}_us"] / 1000 for k in ("p50", "p90", "p99", "max")}}


def measure(url: str, body: str, connections: int, seconds: float, warmup: float) -> dict:
    run_wrk(url, body, connections, warmup)  # unmeasured: connections open, batches settle
    result = run_wrk(url, body, connections, seconds)
    result["load_avg"] = load_avg()
    return result


class CpuHog:
    """One process spinning in a loop: one core's worth of other work on the host."""

    def __enter__(self) -> CpuHog:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(10)


def bare_forward(threads: int, batch: int, reps: int) -> dict:
    """The model alone in this process: what a forward pass costs without any server."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, x = build_mlp(), torch.randn(batch, IN_FEATURES)
    samples = []
    with torch.no_grad():
        for _ in range(10):
            model(x)
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            samples.append((time.perf_counter() - t) * 1000)
    torch.set_num_threads(before)
    return {"threads": threads, "batch": batch, "ms": stats(samples)}


def tune_litserve(seconds: float, warmup: float) -> tuple[float, list[dict]]:
    """LitServe's best batch_timeout at 32 connections on this machine now (its batch loop spins
    on an empty queue at 0, so 0 is not a candidate)."""
    _, kind, route, body, ready_path = next(s for s in SERVERS if s[1] == "litserve")
    tried = []
    for timeout in LITSERVE_TIMEOUTS:
        server = start(kind, ready_path, timeout)
        try:
            tried.append({"batch_timeout_s": timeout, **measure(f"{server.url}{route}", body, 32, seconds, warmup)})
        finally:
            server.stop()
    best = max(tried, key=lambda r: r["req_per_s"])["batch_timeout_s"]
    print("  LitServe batch_timeout: " + ", ".join(f"{r['batch_timeout_s'] * 1000:g} ms {r['req_per_s']:.0f}/s"
                                                   for r in tried) + f"; using {best * 1000:g} ms", flush=True)
    return best, tried


def measure_server(name: str, kind: str, route: str, body: str, ready_path: str, levels: list[int],
                   hog_levels: list[int], seconds: float, warmup: float, litserve_timeout: float) -> dict:
    """One server alone: started, loaded at each level (quiet, then with the CPU hog), stopped."""
    server = start(kind, ready_path, litserve_timeout)
    try:
        url = f"{server.url}{route}"
        quiet = [measure(url, body, c, seconds, warmup) for c in levels]
        with CpuHog():
            hog = [measure(url, body, c, seconds, warmup) for c in hog_levels]
    finally:
        server.stop()
    print(f"  {name}: " + ", ".join(f"{r['connections']}: {r['req_per_s']:.0f}/s" for r in quiet), flush=True)
    return {"quiet": quiet, "hog": hog}


def median_cell(runs: list[dict]) -> dict:
    """One table cell from the passes: medians of throughput and of each latency percentile."""
    return {"connections": runs[0]["connections"],
            "req_per_s": statistics.median(r["req_per_s"] for r in runs),
            "latency_ms": {k: statistics.median(r["latency_ms"][k] for r in runs) for k in runs[0]["latency_ms"]},
            "errors": sum(r["errors"] for r in runs), "req_per_s_passes": [round(r["req_per_s"], 1) for r in runs]}


def run(out_dir: Path, quick: bool) -> dict:
    """Every server alone, one after the other; `passes` rounds, each starting with the next server
    (load from other work on a shared host drifts: every server sees the same drift), medians."""
    levels = [1, 32] if quick else [1, 8, 32, 64]
    hog_levels = [32] if quick else [1, 32]
    seconds, warmup, passes = (3.0, 1.0, 1) if quick else (5.0, 2.0, 3)
    bare = [bare_forward(1, b, 20 if quick else 100) for b in (1, MAX_BATCH)]
    litserve_timeout, tuning = (LITSERVE_BATCH_TIMEOUT, []) if quick else tune_litserve(seconds, warmup)
    raw: dict[str, list[dict]] = {kind: [] for _, kind, *_ in SERVERS}
    for p in range(passes):
        for name, kind, route, body, ready_path in SERVERS[p % len(SERVERS):] + SERVERS[:p % len(SERVERS)]:
            raw[kind].append(measure_server(name, kind, route, body, ready_path, levels, hog_levels, seconds,
                                            warmup, litserve_timeout))
    servers = []
    for name, kind, route, _, _ in SERVERS:
        cells = {key: [median_cell([run[key][i] for run in raw[kind]]) for i in range(len(raw[kind][0][key]))]
                 for key in ("quiet", "hog")}
        servers.append({"name": name, "kind": kind, "route": route, **cells, "passes": raw[kind]})
    result = {"model": f"MLP {IN_FEATURES}-{WIDTH}x{LAYERS}-{OUT_FEATURES} (float32)", "levels": levels,
              "hog_levels": hog_levels, "seconds_per_level": seconds, "warmup_seconds": warmup, "passes": passes,
              "litserve_batch_timeout_s": litserve_timeout, "litserve_tuning": tuning, "bare_forward": bare,
              "servers": servers,
              "client": "wrk, 1 thread, N keep-alive connections", "load_avg_end": load_avg()}
    _plot(result, out_dir / "serving.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for s in result["servers"]:
        levels = [r["connections"] for r in s["quiet"]]
        ax1.plot(levels, [r["req_per_s"] for r in s["quiet"]], marker="o", label=s["name"])
        ax2.plot(levels, [r["latency_ms"]["p50"] for r in s["quiet"]], marker="o", label=s["name"])
    for ax in (ax1, ax2):
        ax.set(xlabel="connections (one request in flight each)", xscale="log", xticks=result["levels"])
        ax.set_xticklabels([str(x) for x in result["levels"]])
        ax.grid(alpha=0.3)
    ax1.set(ylabel="requests / s", title="throughput (no CPU hog)")
    ax2.set(ylabel="ms", yscale="log", title="latency p50 (no CPU hog)")
    ax1.legend(fontsize=8)
    names = [s["name"] for s in result["servers"]]
    width = 0.8 / max(1, 2 * len(result["hog_levels"]))
    for i, level in enumerate(result["hog_levels"]):
        for j, (label, key) in enumerate((("no hog", "quiet"), ("CPU hog", "hog"))):
            values = [next(r["req_per_s"] for r in s[key] if r["connections"] == level) for s in result["servers"]]
            offset = (2 * i + j) * width
            ax3.bar([k + offset for k in range(len(names))], values, width, label=f"{level} conn., {label}")
    ax3.set_xticks([k + width * (2 * len(result["hog_levels"]) - 1) / 2 for k in range(len(names))])
    ax3.set_xticklabels([n.split(" (")[0] for n in names], fontsize=8)
    ax3.set(ylabel="requests / s", title="with one core busy (CPU hog)")
    ax3.legend(fontsize=8)
    ax3.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result['model']}: one request = one example of {IN_FEATURES} floats; wrk")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def summary(result: dict) -> str:
    seeds = next(s for s in result["servers"] if s["kind"] == "seeds")
    lit = next(s for s in result["servers"] if s["kind"] == "litserve")

    def at(server: dict, key: str, level: int) -> dict:
        return next(r for r in server[key] if r["connections"] == level)

    def section(key: str, levels: list[int]) -> str:
        busy = 32 if 32 in levels else levels[-1]   # the targets are set at 32 connections
        head = ["server", *[f"{c} conn.: req/s (p50)" for c in levels], f"{busy} conn. vs seeds",
                f"{busy} conn. vs LitServe", f"{levels[0]} conn. p50 vs seeds"]
        if 64 in levels:
            head.append("64 vs 32 conn.")
        rows = []
        for s in result["servers"]:
            row = [s["name"]]
            for c in levels:
                r = at(s, key, c)
                row.append(f"{r['req_per_s']:.0f} ({r['latency_ms']['p50']:.1f} ms)"
                           + (f", {r['errors']} errors" if r["errors"] else ""))
            rps = at(s, key, busy)["req_per_s"]
            row += [_ratio(rps, at(seeds, key, busy)["req_per_s"]), _ratio(rps, at(lit, key, busy)["req_per_s"]),
                    _ratio(at(s, key, levels[0])["latency_ms"]["p50"], at(seeds, key, levels[0])["latency_ms"]["p50"])]
            if 64 in levels:
                row.append(_ratio(at(s, key, 64)["req_per_s"], rps))
            rows.append(row)
        return table(head, rows)

    bare = {b["batch"]: b["ms"]["p50"] for b in result["bare_forward"]}
    return (f"{result['model']}; each request one example of {IN_FEATURES} floats; load from {result['client']}; "
            f"{result['seconds_per_level']:g} s per level after {result['warmup_seconds']:g} s of warm-up, "
            f"medians of {result['passes']} pass(es) (each server alone, one after the other, in each); "
            f"LitServe batch_timeout {result['litserve_batch_timeout_s'] * 1000:g} ms. A bare forward pass "
            f"(1 thread) takes {bare[1]:.2f} ms for 1 example, {bare[MAX_BATCH]:.2f} ms for {MAX_BATCH}.\n\n"
            f"No CPU hog:\n\n{section('quiet', result['levels'])}\n\n"
            f"One core busy with a CPU hog:\n\n{section('hog', result['hog_levels'])}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("seeds", help="run the seeds' design server")
    p.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(seeds_app(), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The plain generation workload (generation.py: 48 streamed requests, 16 in flight, mixed lengths,
no shared prefixes) after the key/value pool, against `transformers serve --continuous-batching`
and against dscluster's dense cache before the pool, in one run, each server alone.

Two thread settings, as issue 22 asks:

- each server's defaults (no OMP_NUM_THREADS): dscluster's own thread policy (engine/threads.py)
  against transformers' (torch's default, every core);
- two torch threads each (OMP_NUM_THREADS=2), with dscluster before the pool (DENSE, from git
  history) beside it: the pool may cost at most 5 % of tokens/s at equal threads.

Targets: dscluster >= 1.0x transformers serve's output tokens/s in both settings; the pool >= 0.95x
the dense cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks import generation
from benchmarks.common import load_avg, model_dir, pyplot, table

DENSE = "634c9c9"     # the last commit with the dense [rows, heads, capacity, dim] cache
RUNS = [
    # name, kind, threads (None: the server's default)
    ("dscluster, defaults", "dscluster", None),
    ("transformers serve --continuous-batching, defaults", "transformers-cb", None),
    ("dscluster, 2 threads", "dscluster", 2),
    ("dscluster before the pool (dense cache), 2 threads", "dense", 2),
    ("transformers serve --continuous-batching, 2 threads", "transformers-cb", 2),
]
TARGET_VS_PEER, TARGET_VS_DENSE = 1.0, 0.95


def measure(name: str, kind: str, threads: int | None, model: Path, dense_src: Path, requests: list[dict],
            concurrency: int) -> dict:
    load_start = load_avg()
    server, style = generation.start("dscluster" if kind == "dense" else kind, 1, threads, model, None,
                                     source=dense_src if kind == "dense" else None)
    try:
        shorts = [r for r in requests if r["short"]]
        generation.run_load(server.url, style, str(model), shorts[:2], 1, idle=True)   # warm-up
        idle = generation.run_load(server.url, style, str(model), shorts, 1, idle=True)
        loaded = generation.run_load(server.url, style, str(model), requests, concurrency)
    finally:
        server.stop()
    row = generation.summarize(name, kind, 1, threads or 0, requests, idle, loaded, load_start)
    row["threads_per_rank"] = threads if threads is not None else "default"
    return row


def run(out_dir: Path, quick: bool) -> dict:
    model = model_dir("tiny" if quick else "llama-100m")
    requests = generation.workload(12 if quick else generation.REQUESTS)
    concurrency = 4 if quick else generation.CONCURRENCY
    runs = RUNS[2:4] if quick else RUNS
    results = []
    with tempfile.TemporaryDirectory(prefix="dscluster-dense-") as tmp:
        dense_src = generation.baseline_source(Path(tmp), DENSE)
        for name, kind, threads in runs:
            print(f"   {name} (load {load_avg()})", flush=True)
            results.append(measure(name, kind, threads, model, dense_src, requests, concurrency))
    result = {"model": "tiny" if quick else "llama-100m", "requests": len(requests), "concurrency": concurrency,
              "batched_tokens": generation.BATCHED_TOKENS, "dense_commit": DENSE, "servers": results,
              "client": "asyncio + httpx, separate process, streamed"}
    result["ratios"] = ratios(result)
    _plot(result, out_dir / "kv_generation.png")
    return result


def ratios(result: dict) -> dict:
    by = {s["name"]: s["output_tokens_per_s"] for s in result["servers"]}

    def ratio(a: str, b: str) -> float | None:
        return round(by[a] / by[b], 3) if by.get(a) and by.get(b) else None

    return {"defaults_vs_transformers": ratio(RUNS[0][0], RUNS[1][0]),
            "two_threads_vs_transformers": ratio(RUNS[2][0], RUNS[4][0]),
            "pool_vs_dense_two_threads": ratio(RUNS[2][0], RUNS[3][0])}


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    servers = result["servers"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(range(len(servers)), [s["output_tokens_per_s"] for s in servers],
           color=["tab:blue" if s["kind"] == "dscluster" else "tab:gray" if s["kind"] == "dense" else "tab:orange"
                  for s in servers])
    ax.set_xticks(range(len(servers)), [s["name"].replace(", ", "\n").replace(" --cont", "\n--cont")
                                        for s in servers], fontsize=7)
    ax.set(ylabel="output tokens / s", title=f"{result['model']}: {result['requests']} streamed completions, "
                                             f"{result['concurrency']} in flight")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    r = ratios(result)
    head = (f"dscluster / transformers serve --continuous-batching, output tokens/s: "
            f"{r['defaults_vs_transformers']}x with each server's defaults, {r['two_threads_vs_transformers']}x "
            f"with two threads each (target {TARGET_VS_PEER}x); the pool / the dense cache before it at two "
            f"threads: {r['pool_vs_dense_two_threads']}x (target >= {TARGET_VS_DENSE}x).\n\n")
    rows = [[s["name"], s["threads_per_rank"], f"{s['output_tokens_per_s']:.1f}",
             f"{s['ttft_ms'].get('p50', 0):.0f} / {s['ttft_ms'].get('p99', 0):.0f}",
             f"{s['itl_ms'].get('p50', 0):.0f}", s["error_count"], f"{s['load_avg_start']} / {s['load_avg_end']}"]
            for s in result["servers"]]
    return head + table(["server", "threads", "output tokens/s", "TTFT p50 / p99 ms", "ITL p50 ms", "errors",
                         "load avg start / end"], rows)



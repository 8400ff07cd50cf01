"""Generation under load: dscluster's continuous batching against transformers' own server, and
against dscluster's static batching before it.

One fixed mixed workload (`workload()`): 48 completion requests on llama-100m, prompts of 4-120
words from the package's corpus and max_tokens from 8 to 192; one in four is short (4-12 words,
8-16 tokens). A separate load process (`python -m benchmarks.generation load ...`, asyncio + httpx)
keeps 16 streams in flight: each stream sends its next request when the last one ended, streamed,
greedy, end-of-sequence ignored, so every server computes exactly the same tokens.

Servers, each alone, one after the other, on the same model directory in the same virtualenv,
with the same torch threads per process (THREADS, 1 by default: on this shared 2-core machine two
OpenMP threads per process collapse whenever another process takes a core, for every server alike):

- `dscluster serve` on 1 rank and on 2 ranks with tensor parallelism;
- `transformers serve --continuous-batching` and `transformers serve`;
- dscluster as it was before continuous batching (`BASELINE`, from git history; static batches
  that run until their longest request ends), 1 rank.

Both continuous-batching servers get the same token budget per step (BATCHED_TOKENS, 40: on one
CPU core a token costs about 3.5 ms on top of the ~85 ms a step of this model costs at all, so a
budget of 16 decoding requests plus a short prompt keeps steps near 200 ms).

Reported per server: output tokens/s over the whole run, time to first token (p50/p99, all
requests and the short ones), inter-token latency p50, and the short requests' time to first
token on the idle server (median of each short request sent alone), to which their p99 under load
is compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import resources
from pathlib import Path

from benchmarks.common import ROOT, Server, load_avg, model_dir, pyplot, stats, table

# The last commit with static batching (a batch decodes until its longest request ends).
BASELINE = "44af1c7"
CONCURRENCY, REQUESTS = 16, 48
BATCHED_TOKENS = int(os.environ.get("DSCLUSTER_BENCH_BATCHED_TOKENS", 40))  # both servers: tokens per step
THREADS = int(os.environ.get("DSCLUSTER_BENCH_THREADS", 1))
SERVERS = [
    # name, kind, ranks (threads per rank: THREADS)
    ("dscluster, 1 rank", "dscluster", 1),
    ("dscluster, tp=2", "dscluster", 2),
    ("transformers serve --continuous-batching", "transformers-cb", 1),
    ("transformers serve", "transformers", 1),
    ("dscluster before (static batches), 1 rank", "baseline", 1),
]


def workload(n: int = REQUESTS, seed: int = 0) -> list[dict]:
    """The fixed mixed set of requests: every fourth is short."""
    words = resources.files("dscluster.data").joinpath("corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        short = i % 4 == 3
        count = rng.randint(4, 12) if short else rng.randint(4, 120)
        start = rng.randrange(len(words) - count)
        out.append({"prompt": " ".join(words[start:start + count]), "words": count, "short": short,
                    "max_tokens": rng.randint(8, 16) if short else rng.randint(32, 192)})
    return out


# -- the load process ---------------------------------------------------------------------------


def request_body(style: str, model: str, request: dict) -> dict:
    """Greedy, streamed, exactly max_tokens tokens (end-of-sequence ignored) on either server."""
    if style == "transformers":  # it rejects unknown fields (ignore_eos); a generation config does it
        config = {"max_new_tokens": request["max_tokens"], "do_sample": False, "eos_token_id": -1}
        return {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"], "stream": True,
                "generation_config": json.dumps(config)}
    return {"prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **request.get("extra", {})}


async def _one(client, url: str, body: dict, t0: float) -> dict:
    sent = time.monotonic()
    texts: list[float] = []
    pieces: list[str] = []
    tokens, error = None, None
    try:
        async with client.stream("POST", url, json=body) as reply:
            if reply.status_code != 200:
                error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
            else:
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = str(event["error"])[:200]
                        break
                    text = "".join(choice.get("text") or "" for choice in event.get("choices", []))
                    if text:
                        texts.append(time.monotonic())
                        pieces.append(text)
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - recorded with the request
        error = f"{type(exc).__name__}: {exc}"
    end = time.monotonic()
    return {"sent": sent - t0, "end": end - t0, "ttft": texts[0] - sent if texts else None,
            "itl": [b - a for a, b in zip(texts, texts[1:])], "tokens": tokens, "error": error,
            "text": "".join(pieces)}


async def _load(url: str, style: str, model: str, requests: list[dict], concurrency: int, idle: bool) -> dict:
    import httpx

    url = f"{url}/v1/completions"
    records: list[dict | None] = [None] * len(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        if idle:  # one at a time: each request's latency on an otherwise idle server
            t0 = time.monotonic()
            for i, request in enumerate(requests):
                records[i] = await _one(client, url, request_body(style, model, request), t0)
            return {"records": records, "seconds": time.monotonic() - t0}
        queue: asyncio.Queue = asyncio.Queue()
        for item in enumerate(requests):
            queue.put_nowait(item)

        async def stream() -> None:
            while not queue.empty():
                i, request = queue.get_nowait()
                records[i] = await _one(client, url, request_body(style, model, request), t0)

        t0 = time.monotonic()
        await asyncio.gather(*(stream() for _ in range(concurrency)))
        return {"records": records, "seconds": time.monotonic() - t0}


def run_load(url: str, style: str, model: str, requests: list[dict], concurrency: int, idle: bool = False) -> dict:
    """The load generator in its own process, so it does not share this interpreter with anything."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(requests, f)
    try:
        cmd = [sys.executable, "-m", "benchmarks.generation", "load", "--url", url, "--style", style,
               "--model", model, "--requests", f.name, "--concurrency", str(concurrency)] + (["--idle"] if idle else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# -- servers -----------------------------------------------------------------------------------------


def baseline_source(into: Path, commit: str = BASELINE) -> Path:
    """dscluster's package as of `commit`, extracted from git history into `into`."""
    archive = into / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit, "src"],
                   check=True, capture_output=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def start(kind: str, ranks: int, threads: int | None, model: Path, baseline_src: Path | None, *,
          max_num_seqs: int = CONCURRENCY, batched_tokens: int = BATCHED_TOKENS,
          flags: tuple[str, ...] = (), source: Path | None = None) -> tuple[Server, str]:
    """(server, load style). `threads`: torch threads per process (each rank, for tp=2; None: the
    server's own default); `batched_tokens`: both continuous-batching servers' token budget per
    step; `flags`: more `dscluster serve` options (other workloads' settings); `source`: another
    dscluster source tree to run (an earlier commit's)."""
    from dscluster.cluster.launch import free_port

    port = free_port()
    env = {"HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif "OMP_NUM_THREADS" in os.environ:
        raise RuntimeError("unset OMP_NUM_THREADS to measure each server's default threads")
    if source is not None:
        env["PYTHONPATH"] = str(source)
    if kind.startswith("transformers"):
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--device", "cpu", "--log-level", "warning"]
        if kind == "transformers-cb":
            # Its default cache sizing takes most of the machine's memory on a CPU: enough blocks for
            # 16 requests of up to 512 tokens, and the same token budget per step as dscluster.
            cmd += ["--continuous-batching", "--cb-num-blocks", "64", "--cb-max-batch-tokens", str(batched_tokens)]
        return Server(cmd, port, "/health", env), "transformers"
    cmd = [sys.executable, "-m", "dscluster", "serve", str(model), "--nproc", str(ranks), "--port", str(port),
           "--log-level", "WARNING", "--request-timeout", "0"]
    if kind == "baseline":
        env["PYTHONPATH"] = str(baseline_src)
    else:
        cmd += ["--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(batched_tokens), *flags]
    return Server(cmd, port, "/health/ready", env), "dscluster"


def measure(name: str, kind: str, ranks: int, threads: int, model: Path, baseline_src: Path | None,
            requests: list[dict], concurrency: int) -> dict:
    load_start = load_avg()
    server, style = start(kind, ranks, threads, model, baseline_src)
    try:
        model_name = str(model)
        shorts = [r for r in requests if r["short"]]
        run_load(server.url, style, model_name, shorts[:2], 1, idle=True)  # warm-up (first-call allocations)
        idle = run_load(server.url, style, model_name, shorts, 1, idle=True)
        loaded = run_load(server.url, style, model_name, requests, concurrency)
    finally:
        server.stop()
    return summarize(name, kind, ranks, threads, requests, idle, loaded, load_start)


def summarize(name: str, kind: str, ranks: int, threads: int, requests: list[dict], idle: dict, loaded: dict,
              load_start: float | None) -> dict:
    records = loaded["records"]
    ok = [r for r in records if r["error"] is None]
    errors = [r["error"] for r in records if r["error"] is not None]
    exact = sum(1 for r, q in zip(records, requests) if r["tokens"] == q["max_tokens"])
    tokens = sum(r["tokens"] or 0 for r in ok)
    ttft = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
    short = [r["ttft"] * 1000 for r, q in zip(records, requests) if q["short"] and r["error"] is None and r["ttft"]]
    idle_short = [r["ttft"] * 1000 for r in idle["records"] if r["error"] is None and r["ttft"]]
    itl = [x * 1000 for r in ok for x in r["itl"]]
    idle_p50 = statistics.median(idle_short) if idle_short else None
    short_stats = stats(short)
    return {
        "name": name, "kind": kind, "ranks": ranks, "threads_per_rank": threads,
        "requests": len(records), "errors": errors[:5], "error_count": len(errors), "exact_token_counts": exact,
        "output_tokens": tokens, "seconds": round(loaded["seconds"], 2),
        "output_tokens_per_s": round(tokens / loaded["seconds"], 1),
        "ttft_ms": _round(stats(ttft)), "ttft_short_ms": _round(short_stats), "itl_ms": _round(stats(itl)),
        "idle_ttft_short_ms": _round(stats(idle_short)),
        "short_p99_vs_idle": round(short_stats["p99"] / idle_p50, 2) if idle_p50 and short else None,
        "load_avg_start": load_start, "load_avg_end": load_avg(),
    }


def _round(d: dict) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in d.items()}


# -- the benchmark ---------------------------------------------------------------------------------


def run(out_dir: Path, quick: bool) -> dict:
    model = model_dir("tiny" if quick else "llama-100m")
    requests = workload(12 if quick else REQUESTS)
    concurrency = 4 if quick else CONCURRENCY
    servers = SERVERS[:1] + SERVERS[-1:] if quick else SERVERS
    results = []
    with tempfile.TemporaryDirectory(prefix="dscluster-baseline-") as tmp:
        baseline_src = baseline_source(Path(tmp))
        for name, kind, ranks in servers:
            print(f"   {name} (load {load_avg()})", flush=True)
            results.append(measure(name, kind, ranks, THREADS, model, baseline_src, requests, concurrency))
    result = {"model": "tiny" if quick else "llama-100m", "requests": len(requests), "concurrency": concurrency,
              "short_requests": sum(r["short"] for r in requests), "batched_tokens": BATCHED_TOKENS,
              "baseline_commit": BASELINE, "workload": requests, "servers": results,
              "client": "asyncio + httpx, separate process, streamed"}
    _plot(result, out_dir / "generation.png")
    return result


def _by_name(result: dict) -> dict:
    return {s["name"]: s for s in result["servers"]}


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    servers = result["servers"]
    names = [s["name"].replace(" --continuous-batching", "\n--continuous-batching").replace(" (", "\n(")
             for s in servers]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax1.bar(range(len(servers)), [s["output_tokens_per_s"] for s in servers], color="tab:blue")
    ax1.set_xticks(range(len(servers)), names, fontsize=7)
    ax1.set(ylabel="output tokens / s", title=f"throughput, {result['concurrency']} streams")
    width = 0.38
    xs = range(len(servers))
    ax2.bar([x - width / 2 for x in xs], [s["idle_ttft_short_ms"].get("p50", 0) for s in servers], width,
            label="short requests, idle server (p50)", color="tab:green")
    ax2.bar([x + width / 2 for x in xs], [s["ttft_short_ms"].get("p99", 0) for s in servers], width,
            label="short requests under load (p99)", color="tab:red")
    ax2.set_xticks(list(xs), names, fontsize=7)
    ax2.set(ylabel="time to first token, ms (log)", yscale="log", title="short requests' time to first token")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result['model']}: {result['requests']} streamed completions, mixed lengths")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    rows = []
    for s in result["servers"]:
        t, ts, idle = s["ttft_ms"], s["ttft_short_ms"], s["idle_ttft_short_ms"]
        rows.append([s["name"], f"{s['output_tokens_per_s']:.1f}",
                     f"{t.get('p50', 0):.0f} / {t.get('p99', 0):.0f}", f"{ts.get('p50', 0):.0f} / {ts.get('p99', 0):.0f}",
                     f"{idle.get('p50', 0):.0f}", f"{s['short_p99_vs_idle']}x", f"{s['itl_ms'].get('p50', 0):.0f}",
                     f"{s['error_count']}", f"{s['load_avg_start']} / {s['load_avg_end']}"])
    servers = _by_name(result)
    lines = []
    ours, cb = servers.get(SERVERS[0][0]), servers.get(SERVERS[2][0])
    if ours and cb:
        lines.append(f"dscluster on 1 rank makes {ours['output_tokens_per_s'] / cb['output_tokens_per_s']:.2f}x the "
                     f"output tokens/s of `transformers serve --continuous-batching` (target 1.5x); its short "
                     f"requests' time to first token under load is {ours['short_p99_vs_idle']}x their idle time at "
                     f"p99 (target at most 3x).")
    base = servers.get(SERVERS[4][0])
    if ours and base:
        lines.append(f"Against dscluster's static batching before: {ours['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x "
                     f"the throughput, short requests' first token at p99 {base['ttft_short_ms'].get('p99', 0) / max(ours['ttft_short_ms'].get('p99', 1), 1e-9):.0f}x sooner.")
    head = (" ".join(lines) + "\n\n" if lines else "") + (
        f"{result['model']}: {result['requests']} streamed completions ({result['short_requests']} short), "
        f"{result['concurrency']} in flight from a separate process; greedy, end-of-sequence ignored, so every "
        f"server computes the same tokens. dscluster with `--max-num-batched-tokens {result['batched_tokens']}`, "
        f"transformers with `--cb-max-batch-tokens {result['batched_tokens']}`. Times in ms.\n\n")
    return head + table(["server", "output tokens/s", "TTFT p50 / p99", "short TTFT p50 / p99", "short TTFT idle",
                         "short p99 / idle", "ITL p50", "errors", "load avg start / end"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("load", help="stream a workload at a server, print JSON")
    p.add_argument("--url", required=True)
    p.add_argument("--style", choices=["dscluster", "transformers"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True, help="JSON file of requests")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--idle", action="store_true", help="one request at a time")
    p = sub.add_parser("one", help="measure one server of SERVERS (by its index) and print its row")
    p.add_argument("index", type=int)
    args = parser.parse_args()
    if args.what == "one":
        name, kind, ranks = SERVERS[args.index]
        with tempfile.TemporaryDirectory(prefix="dscluster-baseline-") as tmp:
            row = measure(name, kind, ranks, THREADS, model_dir("llama-100m"), baseline_source(Path(tmp)),
                          workload(), CONCURRENCY)
        print(summary({"servers": [row], "model": "llama-100m", "requests": REQUESTS, "short_requests": REQUESTS // 4,
                       "concurrency": CONCURRENCY, "batched_tokens": BATCHED_TOKENS}))
        return 0
    requests = json.loads(Path(args.requests).read_text())
    print(json.dumps(asyncio.run(_load(args.url, args.style, args.model, requests, args.concurrency, args.idle))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

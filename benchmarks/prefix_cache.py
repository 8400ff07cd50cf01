"""Shared prefixes: requests that repeat one long prompt prefix, as chat (a system prompt), agents
(tool definitions) and few-shot evaluation do. A server with a prefix cache computes the prefix once
and then only each request's own tokens; a server without one recomputes every prompt.

Workload (`workload()`, fixed by its seed): one common prefix of PREFIX_TOKENS tokens plus
OWN_TOKENS tokens of each request's own, counted with the served model's tokenizer (words drawn
from the package's corpus by a seeded generator, nothing downloaded); REQUESTS streamed
completions, CONCURRENCY in flight from a separate load process (generation.py's client), MAX_TOKENS
tokens out each, greedy, end-of-sequence ignored, so every server computes the same tokens.

Peers, each alone, one after the other, in one run, same model directory (llama-100m), same torch
threads per process (generation.THREADS) and the same token budget per step (BATCHED_TOKENS):

- `transformers serve --continuous-batching` (its paged cache shares blocks between requests);
- `dscluster serve` with its default flags (prefix caching on, once the engine has it);
- `dscluster serve --no-enable-prefix-caching`, the same engine recomputing every prompt; skipped
  with a note when the server does not know the flag (before the prefix cache existed).

Reported per peer: requests/s over the run, time to first token p50/p90, the ratios to transformers
serve, the prefix-cache counters dscluster exports (`vllm:prefix_cache_*`, in tokens), and how many
replies are the same text as each other peer's (greedy: prefix caching must not change a token).
Targets: dscluster with prefix caching at least TARGET_RPS times transformers serve's requests/s, and
a time to first token p50 at most TARGET_TTFT times its.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from benchmarks import generation
from benchmarks.common import (ROOT, corpus_words, load_avg, model_dir, pyplot, scrape_metrics, stats, table,
                               words_for_tokens)

PREFIX_TOKENS, OWN_TOKENS, MAX_TOKENS = 1000, 20, 16
REQUESTS, CONCURRENCY = 32, 8
BATCHED_TOKENS = 256  # tokens per step for both servers: dscluster's default budget
TARGET_RPS, TARGET_TTFT = 3.0, 0.33
NO_PREFIX_CACHING = "--no-enable-prefix-caching"
PEERS = [
    # name, kind (generation.start), extra `dscluster serve` flags
    ("transformers serve --continuous-batching", "transformers-cb", ()),
    ("dscluster, prefix caching (default flags)", "dscluster", ()),
    (f"dscluster {NO_PREFIX_CACHING}", "dscluster", (NO_PREFIX_CACHING,)),
]
REFERENCE, OURS = PEERS[0][0], PEERS[1][0]
METRICS = ["vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total"]


def workload(tokenizer, n: int = REQUESTS, seed: int = 0) -> dict:
    """One prefix of about PREFIX_TOKENS tokens, n requests adding about OWN_TOKENS of their own."""
    rng, words = random.Random(seed), corpus_words()
    prefix, prefix_tokens = words_for_tokens(tokenizer, rng, words, PREFIX_TOKENS)
    prefix_ids = tokenizer(prefix)["input_ids"]
    requests = []
    for _ in range(n):
        own, _ = words_for_tokens(tokenizer, rng, words, OWN_TOKENS)
        prompt = f"{prefix} {own}"
        ids = tokenizer(prompt)["input_ids"]
        requests.append({"prompt": prompt, "max_tokens": MAX_TOKENS, "prompt_tokens": len(ids),
                         # a prefix cache can only hit if the prompt's tokens start with the prefix's
                         "starts_with_prefix_tokens": ids[:len(prefix_ids)] == prefix_ids})
    # A warm-up that shares nothing with the prefix (under one 16-token block), sent before the run.
    warm_up = [{"prompt": " ".join(rng.choice(words) for _ in range(6)), "max_tokens": 4} for _ in range(2)]
    return {"prefix_tokens": prefix_tokens, "requests": requests, "warm_up": warm_up}


def serve_accepts(flag: str) -> bool:
    """Whether this checkout's `dscluster serve` knows `flag` (its --help lists every option)."""
    proc = subprocess.run([sys.executable, "-m", "dscluster", "serve", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    return proc.returncode == 0 and flag in proc.stdout


def measure(name: str, kind: str, flags: tuple[str, ...], model: Path, load: dict, concurrency: int) -> dict:
    load_start = load_avg()
    server, style = generation.start(kind, 1, generation.THREADS, model, None, max_num_seqs=concurrency,
                                     batched_tokens=BATCHED_TOKENS, flags=flags)
    try:
        generation.run_load(server.url, style, str(model), load["warm_up"], 1, idle=True)
        loaded = generation.run_load(server.url, style, str(model), load["requests"], concurrency)
        metrics = scrape_metrics(server.url, METRICS) if kind == "dscluster" else {}
    finally:
        server.stop()
    records = loaded["records"]
    ok = [r for r in records if r["error"] is None]
    return {
        "name": name, "kind": kind, "flags": list(flags), "requests": len(records), "answered": len(ok),
        "exact_token_counts": sum(1 for r in ok if r["tokens"] == MAX_TOKENS),
        "error_count": len(records) - len(ok), "errors": [r["error"] for r in records if r["error"]][:5],
        "seconds": round(loaded["seconds"], 2), "requests_per_s": round(len(ok) / loaded["seconds"], 3),
        "ttft_ms": _rounded(stats([r["ttft"] * 1000 for r in ok if r["ttft"] is not None])),
        "metrics": metrics, "texts": [r["text"] for r in records],
        "load_avg_start": load_start, "load_avg_end": load_avg(),
    }


def _rounded(d: dict) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in d.items()}


def run(out_dir: Path, quick: bool) -> dict:
    from transformers import AutoTokenizer

    model_name = "tiny" if quick else "llama-100m"
    model = model_dir(model_name)
    load = workload(AutoTokenizer.from_pretrained(str(model)), 8 if quick else REQUESTS)
    concurrency = 4 if quick else CONCURRENCY
    peers = []
    for name, kind, flags in PEERS:
        missing = [flag for flag in flags if not serve_accepts(flag)]
        if missing:
            peers.append({"name": name, "kind": kind, "flags": list(flags),
                          "skipped": f"`dscluster serve` does not accept {' '.join(missing)} (no prefix cache "
                                     "in this version)"})
            print(f"   {name}: skipped, {peers[-1]['skipped']}", flush=True)
            continue
        print(f"   {name} (load {load_avg()})", flush=True)
        peers.append(measure(name, kind, flags, model, load, concurrency))
    _compare(peers)
    result = {"model": model_name, "requests": len(load["requests"]), "concurrency": concurrency,
              "prefix_tokens": load["prefix_tokens"], "own_tokens_target": OWN_TOKENS, "max_tokens": MAX_TOKENS,
              "prompt_tokens": stats([r["prompt_tokens"] for r in load["requests"]]),
              "prompts_start_with_prefix_tokens": sum(r["starts_with_prefix_tokens"] for r in load["requests"]),
              "batched_tokens": BATCHED_TOKENS, "threads_per_process": generation.THREADS,
              "targets": {"requests_per_s_vs_reference": TARGET_RPS, "ttft_p50_vs_reference": TARGET_TTFT},
              "peers": peers, "client": "asyncio + httpx, separate process, streamed"}
    _plot(result, out_dir / "prefix_cache.png")
    return result


def _measured(result: dict) -> dict[str, dict]:
    return {p["name"]: p for p in result["peers"] if "skipped" not in p}


def _compare(peers: list[dict]) -> None:
    """Ratios to transformers serve, and replies equal to each other peer's, into each peer's row."""
    measured = _measured({"peers": peers})
    reference = measured.get(REFERENCE)
    for peer in measured.values():
        if reference and reference["requests_per_s"] and reference["ttft_ms"].get("p50"):
            peer["requests_per_s_vs_reference"] = round(peer["requests_per_s"] / reference["requests_per_s"], 2)
            peer["ttft_p50_vs_reference"] = round(peer["ttft_ms"].get("p50", 0) / reference["ttft_ms"]["p50"], 2)
        peer["same_text_as"] = {other["name"]: sum(a == b for a, b in zip(peer["texts"], other["texts"]))
                                for other in measured.values() if other is not peer}


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    peers = list(_measured(result).values())
    names = [p["name"].replace(" --", "\n--").replace(", ", ",\n") for p in peers]
    xs = range(len(peers))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    ax1.bar(xs, [p["requests_per_s"] for p in peers], color="tab:blue")
    reference = _measured(result).get(REFERENCE)
    if reference:
        ax1.axhline(TARGET_RPS * reference["requests_per_s"], color="tab:red", ls="--",
                    label=f"target: {TARGET_RPS:g}x transformers serve")
        ax1.legend(fontsize=8)
    ax1.set(ylabel="requests / s", title=f"throughput, {result['concurrency']} streams")
    width = 0.38
    ax2.bar([x - width / 2 for x in xs], [p["ttft_ms"].get("p50", 0) / 1000 for p in peers], width, label="p50",
            color="tab:green")
    ax2.bar([x + width / 2 for x in xs], [p["ttft_ms"].get("p90", 0) / 1000 for p in peers], width, label="p90",
            color="tab:red")
    ax2.set(ylabel="seconds", title="time to first token")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), names, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result['model']}: {result['requests']} streamed completions sharing a "
                 f"{result['prefix_tokens']}-token prefix, {result['max_tokens']} tokens out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def summary(result: dict) -> str:
    measured = _measured(result)
    lines = []
    ours = measured.get(OURS)
    if ours and "requests_per_s_vs_reference" in ours:
        rps, ttft = ours["requests_per_s_vs_reference"], ours["ttft_p50_vs_reference"]
        lines.append(f"dscluster with its default flags serves {rps:.2f}x the requests/s of `transformers serve "
                     f"--continuous-batching` (target >= {TARGET_RPS:g}x: {_verdict(rps >= TARGET_RPS)}) with a "
                     f"median time to first token {ttft:.2f}x its (target <= {TARGET_TTFT:g}x: "
                     f"{_verdict(ttft <= TARGET_TTFT)}).")
    lines += [f"{p['name']}: skipped, {p['skipped']}." for p in result["peers"] if "skipped" in p]
    rows = []
    for p in measured.values():
        hits, queries = p["metrics"].get("vllm:prefix_cache_hits_total"), p["metrics"].get("vllm:prefix_cache_queries_total")
        same = p["same_text_as"].get(REFERENCE) if p["name"] != REFERENCE else None
        rows.append([p["name"], f"{p['requests_per_s']:.3f}", f"{p.get('requests_per_s_vs_reference', '-')}x",
                     f"{p['ttft_ms'].get('p50', 0):.0f} / {p['ttft_ms'].get('p90', 0):.0f}",
                     f"{p.get('ttft_p50_vs_reference', '-')}x",
                     "-" if queries is None else f"{hits or 0:.0f} / {queries:.0f}",
                     "-" if same is None else f"{same}/{p['requests']}",
                     f"{p['error_count']}", f"{p['load_avg_start']} / {p['load_avg_end']}"])
    head = (" ".join(lines) + "\n\n" if lines else "") + (
        f"{result['model']}: {result['requests']} streamed completions, {result['concurrency']} in flight from a "
        f"separate process, sharing one {result['prefix_tokens']}-token prefix plus about {result['own_tokens_target']} "
        f"tokens each ({result['prompt_tokens'].get('p50', 0):.0f} prompt tokens), {result['max_tokens']} tokens out, greedy. "
        f"Both servers {result['batched_tokens']} tokens per step, {result['threads_per_process']} torch thread(s). "
        "Times in ms.\n\n")
    return head + table(["server", "requests/s", "x transformers", "TTFT p50 / p90", "TTFT p50 x transformers",
                         "prefix-cache hits / queries (tokens)", "same text as transformers", "errors",
                         "load avg start / end"], rows)

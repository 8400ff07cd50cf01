"""What enforcing a grammar costs: the generation workload (generation.py: 48 streamed requests,
16 in flight, mixed lengths, greedy, end-of-sequence ignored) on one dscluster server, once plain
and once with a JSON schema on every request, in the order A B B A in one run (each figure is the mean of its two runs, so the shared
machine's load falls on both alike); and the per-step
cost of the mask itself, in process, in microseconds per constrained row.

The schema (`SCHEMA`) holds every reply to an object whose string field must be longer than any
reply can be, so both runs compute exactly max_tokens tokens per request and tokens/s compare like
with like; each step the grammar's state moves through the object's structure and then the string.

Mask cost: `engine.grammar.apply_masks` over k rows (1, 4, 16) of a vocabulary the size of the
tiny model's (1024) and of a 32k one (a tiny model written with --vocab-size 32000), split into
llguidance's fill (Rust) and the whole call (fill + unpack + masked_fill on the logits).

Target (issue 24): tokens/s with the schema >= 0.8x without.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import generation
from benchmarks.common import load_avg, model_dir, pyplot, table

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "score"],
          "properties": {"answer": {"type": "string", "minLength": 4000}, "score": {"type": "integer"}}}
TARGET = 0.8
ROWS = (1, 4, 16)


def mask_cost(model: Path, repeats: int) -> list[dict]:
    """Microseconds per row for the fill alone and for the whole masking of a step."""
    import torch
    from transformers import AutoTokenizer

    from dscluster.engine.grammar import GrammarCompiler, GrammarSpec, apply_masks

    tok = AutoTokenizer.from_pretrained(model)
    vocab = len(tok)
    compiler = GrammarCompiler(tok, vocab, (tok.eos_token_id,))
    spec = GrammarSpec.json_schema(SCHEMA)
    out = []
    for rows in ROWS:
        states = [compiler.compile(spec) for _ in range(rows)]
        prefix = tok('{"answer": "', add_special_tokens=False)["input_ids"]
        for state in states:                # the common state of a step: inside the string
            for t in prefix:
                state.accept(t)
        logits = torch.randn(rows, vocab)
        words = (vocab + 31) // 32
        bitmask = torch.empty((rows, words), dtype=torch.int32)
        fills, wholes = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for k, state in enumerate(states):
                state.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + k * words * 4, words * 4)
            t1 = time.perf_counter()
            apply_masks(logits.clone(), list(enumerate(states)))
            t2 = time.perf_counter()
            fills.append((t1 - t0) / rows * 1e6)
            wholes.append((t2 - t1) / rows * 1e6)
        out.append({"vocab": vocab, "rows": rows, "fill_us_per_row": round(statistics.median(fills), 1),
                    "mask_us_per_row": round(statistics.median(wholes), 1)})
    return out


def run(out_dir: Path, quick: bool) -> dict:
    model = model_dir("tiny" if quick else "llama-100m")
    plain = generation.workload(12 if quick else generation.REQUESTS)
    constrained = [{**r, "extra": {"structured_outputs": {"json": SCHEMA}}} for r in plain]
    concurrency = 4 if quick else generation.CONCURRENCY
    runs: dict[str, list[dict]] = {"no grammar": [], "json_schema on every request": []}
    bodies = {"no grammar": plain, "json_schema on every request": constrained}
    # A B B A: each run's machine load (this machine is shared) falls on both sides alike.
    for name in ("no grammar", "json_schema on every request", "json_schema on every request", "no grammar"):
        print(f"   {name} (load {load_avg()})", flush=True)
        runs[name].append(generation.measure(name, "dscluster", 1, None, model, None, bodies[name], concurrency))
    servers = [{**pair[0], "output_tokens_per_s": statistics.fmean(r["output_tokens_per_s"] for r in pair),
                "runs_tokens_per_s": [round(r["output_tokens_per_s"], 1) for r in pair]} for pair in runs.values()]
    costs = mask_cost(model_dir("tiny"), 50 if quick else 300)
    with tempfile.TemporaryDirectory(prefix="dscluster-vocab-") as tmp:
        big = Path(tmp) / "tiny-32k"
        subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(big), "--vocab-size", "32000"],
                       check=True, capture_output=True, timeout=600)
        costs += mask_cost(big, 50 if quick else 300)
    result = {"model": "tiny" if quick else "llama-100m", "requests": len(plain), "concurrency": concurrency,
              "schema": SCHEMA, "servers": servers, "mask_cost": costs,
              "client": "asyncio + httpx, separate process, streamed"}
    result["ratio"] = ratio(result)
    _plot(result, out_dir / "structured_output.png")
    return result


def ratio(result: dict) -> float | None:
    plain, constrained = (s["output_tokens_per_s"] for s in result["servers"])
    return round(constrained / plain, 3) if plain else None


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    servers = result["servers"]
    left.bar(range(len(servers)), [s["output_tokens_per_s"] for s in servers], color=["tab:gray", "tab:blue"])
    left.set_xticks(range(len(servers)), [s["name"] for s in servers], fontsize=8)
    left.set(ylabel="output tokens / s", title=f"{result['model']}: {result['requests']} streamed completions, "
                                               f"{result['concurrency']} in flight")
    for vocab in sorted({c["vocab"] for c in result["mask_cost"]}):
        rows = [c for c in result["mask_cost"] if c["vocab"] == vocab]
        right.plot([c["rows"] for c in rows], [c["mask_us_per_row"] for c in rows], marker="o",
                   label=f"vocabulary {vocab}: fill + apply")
        right.plot([c["rows"] for c in rows], [c["fill_us_per_row"] for c in rows], marker=".", linestyle="--",
                   label=f"vocabulary {vocab}: fill only")
    right.set(xlabel="constrained rows in the step", ylabel="microseconds per row", title="grammar mask per step")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    head = (f"Output tokens/s with a JSON schema on every request / without: {result['ratio']}x "
            f"(target >= {TARGET}x).\n\n")
    rows = [[s["name"], f"{s['output_tokens_per_s']:.1f} ({', '.join(map(str, s['runs_tokens_per_s']))})",
             f"{s['ttft_ms'].get('p50', 0):.0f}",
             f"{s['itl_ms'].get('p50', 0):.0f}", s["error_count"], f"{s['load_avg_start']} / {s['load_avg_end']}"]
            for s in result["servers"]]
    costs = [[c["vocab"], c["rows"], c["fill_us_per_row"], c["mask_us_per_row"]] for c in result["mask_cost"]]
    return (head + table(["requests", "output tokens/s (each run)", "TTFT p50 ms (first run)", "ITL p50 ms (first run)", "errors",
                          "load avg start / end (first run)"], rows) + "\n\nMask cost per step:\n\n"
            + table(["vocabulary", "constrained rows", "fill us/row", "fill + apply us/row"], costs))

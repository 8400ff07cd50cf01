"""Which key/value cache and decoding loop for continuous batching: measured, in one process.

The same requests (the generation benchmark's mixed workload, as token ids, greedy, 16 running at
most) go through three ways of batching them, each in a fresh process with the same threads:

- **dscluster's engine**: rows of a preallocated cache written in place (a step never copies the
  cache), every step one packed forward pass of all new tokens (prompt chunks and decoding rows
  together), within 128 tokens per step;
- **Hugging Face cache rows**: a `DynamicCache` with one row per running request; a joining
  request is prefilled alone, then its cache is left-padded and concatenated to the batch's; a
  leaving row is dropped with `index_select`; every decoding step appends through
  `DynamicCache.update`, which concatenates each layer's keys and values anew;
- **transformers' continuous batching**: `ContinuousBatchingManager` (paged attention, its own
  scheduler and thread), 128 tokens per batch, 64 cache blocks.

Reported: output tokens/s over wall time and over the process's CPU time (the machine is shared;
CPU time is the steadier of the two), and that the outputs agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from benchmarks.common import ROOT, load_avg, model_dir, pyplot, table

PATHS = {
    "engine": "dscluster's engine (in-place rows, packed steps)",
    "hf_rows": "Hugging Face cache rows (DynamicCache, pad+concat / index_select)",
    "transformers_cb": "transformers continuous batching (paged)",
}
ROWS = 16
BATCHED_TOKENS = int(os.environ.get("DSCLUSTER_BENCH_BATCHED_TOKENS", 40))   # as benchmarks/generation.py
THREADS = int(os.environ.get("DSCLUSTER_BENCH_THREADS", 1))


def requests(quick: bool) -> list[tuple[list[int], int]]:
    from transformers import AutoTokenizer

    from benchmarks.generation import workload

    tok = AutoTokenizer.from_pretrained(model_dir("tiny" if quick else "llama-100m"))
    return [(tok(r["prompt"])["input_ids"], r["max_tokens"]) for r in workload(12 if quick else 48)]


def engine_path(model: str, work: list[tuple[list[int], int]]) -> list[list[int]]:
    from dscluster.engine.api import GenerationRequest, SamplingParams
    from dscluster.engine.client import open_engine

    engine = open_engine(model, max_num_seqs=ROWS, max_num_batched_tokens=BATCHED_TOKENS)
    requests = [GenerationRequest(tuple(p), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                for p, n in work]
    return [r.token_ids for r in engine.generate(requests)]


def hf_rows_path(model_path: str, work: list[tuple[list[int], int]]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()

    def pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
        extra = width - t.shape[-2] if t.dim() == 4 else width - t.shape[-1]
        if extra == 0:
            return t
        if t.dim() == 4:
            return torch.cat([t.new_zeros(*t.shape[:2], extra, t.shape[3]), t], dim=2)
        return torch.cat([t.new_zeros(t.shape[0], extra), t], dim=1)

    waiting = deque(enumerate(work))
    out: dict[int, list[int]] = {}
    rows: list[list[int]] = []              # [request index, next position]
    cache, mask = None, None
    with torch.no_grad():
        while waiting or rows:
            while waiting and len(rows) < ROWS:
                i, (prompt, _) = waiting.popleft()
                one = DynamicCache(config=model.config)
                ids = torch.tensor([prompt])
                logits = model(input_ids=ids, past_key_values=one, use_cache=True, logits_to_keep=1).logits
                out[i] = [int(logits[0, -1].argmax())]
                if cache is None:
                    cache, mask = one, torch.ones(1, len(prompt), dtype=torch.long)
                else:
                    width = max(mask.shape[1], len(prompt))
                    for mine, theirs in zip(cache.layers, one.layers):
                        mine.keys = torch.cat([pad_left(mine.keys, width), pad_left(theirs.keys, width)])
                        mine.values = torch.cat([pad_left(mine.values, width), pad_left(theirs.values, width)])
                    mask = torch.cat([pad_left(mask, width), pad_left(torch.ones(1, len(prompt), dtype=torch.long),
                                                                       width)])
                rows.append([i, len(prompt)])
            keep = [r for r, (i, _) in enumerate(rows) if len(out[i]) < work[i][1]]
            if len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.long)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[index], layer.values[index]
                mask = mask[index]
                rows = [rows[r] for r in keep]
                if not rows:
                    cache, mask = None, None
                continue
            ids = torch.tensor([[out[i][-1]] for i, _ in rows])
            positions = torch.tensor([[p] for _, p in rows])
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).logits
            for (i, _), token in zip(rows, logits[:, -1].argmax(-1).tolist()):
                out[i].append(token)
            for row in rows:
                row[1] += 1
    return [out[i] for i in range(len(work))]


def transformers_cb_path(model_path: str, work: list[tuple[list[int], int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(n for _, n in work))
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=BATCHED_TOKENS))
    manager.start()
    ids = [manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n) for i, (prompt, n) in enumerate(work)]
    results = {}
    while len(results) < len(ids):
        result = manager.get_result(timeout=600)
        if result is None:
            raise RuntimeError("transformers continuous batching stopped before finishing")
        results[result.request_id] = result.generated_tokens
    manager.stop(block=True)
    return [list(results[i]) for i in ids]


def one(path: str, quick: bool) -> dict:
    work = requests(quick)
    model = str(model_dir("tiny" if quick else "llama-100m"))
    fn = {"engine": engine_path, "hf_rows": hf_rows_path, "transformers_cb": transformers_cb_path}[path]
    fn(model, work[:2])  # warm-up: first-call allocations (and transformers' own warm-up)
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn(model, work)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"path": path, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens": tokens,
            "output_tokens": sum(len(t) for t in tokens)}


def run(out_dir: Path, quick: bool) -> dict:
    results = []
    for path in PATHS:
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
        start_load = load_avg()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.decode_paths", path] + (["--quick"] if quick else []),
                              capture_output=True, text=True, timeout=3600, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{path} failed: {proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(label=PATHS[path], load_avg_start=start_load, load_avg_end=load_avg(),
                 tokens_per_wall_s=round(r["output_tokens"] / r["wall_s"], 1),
                 tokens_per_cpu_s=round(r["output_tokens"] / r["cpu_s"], 1))
        results.append(r)
    engine_tokens = results[0]["tokens"]
    for r in results:
        r["same_tokens_as_engine"] = sum(a == b for a, b in zip(r["tokens"], engine_tokens))
        r["requests"] = len(r.pop("tokens"))
    result = {"model": "tiny" if quick else "llama-100m", "rows": ROWS, "batched_tokens": BATCHED_TOKENS,
              "threads": THREADS, "paths": results}
    _plot(result, out_dir / "decode_paths.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    paths = result["paths"]
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(paths))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [p["tokens_per_wall_s"] for p in paths], width, label="per wall second")
    ax.bar([x + width / 2 for x in xs], [p["tokens_per_cpu_s"] for p in paths], width, label="per CPU second")
    ax.set_xticks(list(xs), [p["label"].replace(" (", "\n(") for p in paths], fontsize=7)
    ax.set(ylabel="output tokens / s", title=f"{result['model']}: the same requests, {result['rows']} running at most")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    paths = result["paths"]
    base = paths[0]
    rows = [[p["label"], p["output_tokens"], f"{p['wall_s']:.1f}", f"{p['tokens_per_wall_s']:.1f}",
             f"{p['tokens_per_cpu_s']:.1f}", f"{p['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x",
             f"{p['same_tokens_as_engine']}/{p['requests']}", f"{p['load_avg_start']} / {p['load_avg_end']}"]
             for p in paths]
    ratios = ", ".join(f"{p['label'].split(' (')[0]} {base['tokens_per_cpu_s'] / p['tokens_per_cpu_s']:.2f}x"
                       for p in paths[1:])
    return (f"Per CPU second, dscluster's engine makes this many times the output tokens of: {ratios}.\n\n"
            f"{result['model']}, the generation benchmark's workload as token ids, greedy, in one process with "
            f"{result['threads']} threads, {result['rows']} requests running at most.\n\n"
            + table(["path", "output tokens", "wall s", "tokens / wall s", "tokens / CPU s", "vs engine (CPU)",
                     "same tokens as engine", "load avg start / end"], rows))


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))
    print(json.dumps(one(sys.argv[1], "--quick" in sys.argv)))

"""Greedy decoding speed per engine: a batch of 8 prompts x 32 new tokens through `Engine.generate`.

Configurations: one process with 2 threads (all of this machine's cores), one process with 1
thread, tp=2 and zero3=2 with 1 thread per rank (so the 2-rank runs use the same 2 cores). EOS is
ignored, so every run decodes exactly 8 x 32 tokens. Reported: tokens/s per repetition (median,
min, max), the prefill step, and every later decoding step's latency (p50/p90/p99).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import launch_ranks, load_avg, model_dir, pyplot, stats, table, warm_up_deepspeed

BATCH, PROMPT_LEN, NEW_TOKENS = 8, 16, 32
# name, engine, ranks, threads per rank
CONFIGS = [
    ("1 process, 2 threads", None, 1, 2),
    ("1 process, 1 thread", None, 1, 1),
    ("tp=2, 1 thread/rank", "tp", 2, 1),
    ("zero3=2, 1 thread/rank", "zero3", 2, 1),
]


def repetitions(model: str, engine: str | None, quick: bool) -> int:
    """Timed batches per launch. ZeRO-3 on the 100M model takes ~35 s per batch on gloo."""
    if quick:
        return 2
    if model == "tiny":
        return 4
    return 1 if engine == "zero3" else 2


def run(out_dir: Path, quick: bool) -> dict:
    """Each configuration is launched once per round, and the rounds alternate configurations,
    so that a burst of outside load on this shared machine does not land on one configuration."""
    models = ["tiny"] if quick else ["tiny", "llama-100m"]
    rounds = 1 if quick else 2
    warm_up_deepspeed()
    result = {"batch": BATCH, "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS, "rounds": rounds, "models": {}}
    for model in models:
        path = model_dir(model)
        runs: dict[str, list[dict]] = {name: [] for name, *_ in CONFIGS}
        reports: dict[str, dict] = {}
        for _ in range(rounds):
            for name, engine, nproc, threads in CONFIGS:
                task = {"mode": "speed", "model": str(path), "engine": engine, "batch": BATCH,
                        "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                        "reps": repetitions(model, engine, quick)}
                reports[name] = launch_ranks(task, nproc=nproc, threads=threads)[0]
                runs[name] += reports[name]["runs"]
        configs = []
        for name, _engine, nproc, threads in CONFIGS:
            done, report = runs[name], reports[name]
            rates = [r["tokens"] / r["seconds"] for r in done]
            steps_ms = [s * 1000 for r in done for s in r["step_seconds"]]
            configs.append({
                "name": name, "engine": report["engine"], "ranks": nproc, "threads_per_rank": threads,
                "repetitions": len(done), "tokens_per_run": done[0]["tokens"],
                "tokens_per_s": {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1),
                                 "max": round(max(rates), 1)},
                "prefill_ms_median": round(statistics.median(r["prefill_seconds"] * 1000 for r in done), 1),
                "step_ms": {k: round(v, 2) if isinstance(v, float) else v for k, v in stats(steps_ms).items()},
                "param_count_rank0": report["param_count"],
            })
        ref = configs[0]["tokens_per_s"]["median"]
        for config in configs:
            config["speed_vs_1_process_2_threads"] = round(config["tokens_per_s"]["median"] / ref, 2)
        result["models"][model] = {"parameters": configs[0]["param_count_rank0"], "configs": configs}
    result["load_avg_1min_at_end"] = load_avg()
    _plot(result, out_dir / "engine_speed.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, (model, data) in zip(axes[0], models.items(), strict=True):
        configs = data["configs"]
        xs = range(len(configs))
        med = [c["tokens_per_s"]["median"] for c in configs]
        low = [m - c["tokens_per_s"]["min"] for m, c in zip(med, configs, strict=True)]
        high = [c["tokens_per_s"]["max"] - m for m, c in zip(med, configs, strict=True)]
        ax.bar(xs, med, yerr=[low, high], capsize=4, color=["tab:blue", "tab:cyan", "tab:orange", "tab:red"])
        for x, m, c in zip(xs, med, configs, strict=True):
            ax.annotate(f"{m:.0f}", (x, c["tokens_per_s"]["max"]), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(list(xs), [c["name"].replace(", ", ",\n") for c in configs], fontsize=8)
        ax.set_ylabel("tokens/s (median; bars: min-max)")
        ax.set_title(f"{model} ({data['parameters'] / 1e6:.1f}M params): "
                     f"{result['batch']} prompts x {result['new_tokens']} tokens", fontsize=9)
    fig.suptitle("Greedy decoding speed per engine (2-core CPU, gloo)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    rows = []
    for model, data in result["models"].items():
        for c in data["configs"]:
            s = c["step_ms"]
            rows.append([f"{model} ({data['parameters'] / 1e6:.1f}M)", c["name"], c["repetitions"],
                         f"{c['tokens_per_s']['median']:.1f} ({c['tokens_per_s']['min']:.0f}-{c['tokens_per_s']['max']:.0f})",
                         f"{c['speed_vs_1_process_2_threads']:.2f}x", f"{c['prefill_ms_median']:.1f}",
                         f"{s['p50']:.1f} / {s['p90']:.1f} / {s['p99']:.1f}"])
    model = list(result["models"])[-1]
    by_name = {c["name"]: c for c in result["models"][model]["configs"]}
    tp, z3, one = by_name["tp=2, 1 thread/rank"], by_name["zero3=2, 1 thread/rank"], by_name["1 process, 2 threads"]
    headline = (f"{model}: one process with 2 threads decodes {one['tokens_per_s']['median']:.0f} tokens/s; "
                f"tp=2 {tp['speed_vs_1_process_2_threads']:.2f}x that, zero3=2 "
                f"{z3['speed_vs_1_process_2_threads']:.2f}x.\n\n")
    return (headline + f"Greedy decoding of {result['batch']} prompts x {result['new_tokens']} new tokens "
            f"({result['prompt_tokens']}-token prompts), float32; configurations alternate over "
            f"{result.get('rounds', 1)} round(s) of launches.\n\n"
            + table(["model", "configuration", "repetitions", "tokens/s median (min-max)",
                     "vs 1 process, 2 threads", "prefill ms (median)", "decode step ms p50 / p90 / p99"], rows))

"""Memory per rank when the model is split: does each rank hold only its share, at load and after?

A 541M-parameter Llama (2.0 GiB of float32 weights) stored as ten files of at most 256 MB (with
the index json) and as one file, served by one unsharded process, tp=2, tp=4 and ZeRO-3 over 2
ranks; and, for comparison, tp=2 and tp=4 with the loader before shard-only loading (every rank
reads the whole checkpoint with transformers, then AutoTP splits it). Each rank goes through the
engine's real path (`build_runtime`), then one short generation so that every weight has been
read, and reports its peak RSS (ru_maxrss), its steady RSS, its load time and the parameter bytes
it holds.

A rank's *model memory* is its peak RSS less the peak RSS of the same configuration (engine,
ranks, threads) serving a negligible model: the fixed cost of a process (Python, torch,
transformers, DeepSpeed: about 400 MB here) is not counted. Ratios are against the unsharded
process's model memory, taking the heaviest rank. Memory does not depend on the machine's load;
load times do (the 1-minute load average is recorded with every run).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import launch_ranks, load_avg, mib, model_dir, pyplot, table, warm_up_deepspeed

# name, engine, ranks, threads per rank, extra task fields
CONFIGS = [
    ("unsharded, 1 process", None, 1, 2, {}),
    ("tp=2", "tp", 2, 1, {}),
    ("tp=4", "tp", 4, 1, {}),
    ("zero3=2", "zero3", 2, 1, {}),
]
WHOLE_THEN_SPLIT = [
    ("tp=2, whole checkpoint then split", "tp", 2, 1, {"whole_then_split": True}),
    ("tp=4, whole checkpoint then split", "tp", 4, 1, {"whole_then_split": True}),
    ("zero3=2, whole checkpoint then split", "zero3", 2, 1, {"whole_then_split": True}),
]
LOAD_REPS = 4   # load time, shard-only against whole-then-split, launches alternating
LAYOUTS = {"multi-file": "llama-540m", "single-file": "llama-540m-1file"}
TARGETS = {"tp=2": 0.55, "tp=4": 0.30}   # model memory per rank, x the unsharded process's


def _measure(model: Path, engine: str | None, nproc: int, threads: int, extra: dict) -> list[dict]:
    reports = launch_ranks({"mode": "memory", "model": str(model), "engine": engine, **extra},
                           nproc=nproc, threads=threads)
    return [{"peak_mib": mib(r["steady"]["peak"]), "steady_mib": mib(r["steady"]["rss"]),
             "ready_mib": mib(r["ready"]["rss"]), "steady_anon_mib": mib(r["steady"]["anon"]),
             "steady_file_mib": mib(r["steady"]["file"]), "param_mib": mib(r["param_bytes"]),
             "load_seconds": round(r["load_seconds"], 2), "ready_seconds": round(r["ready_seconds"], 2),
             "description": r["description"]} for r in reports]


def run(out_dir: Path, quick: bool) -> dict:
    warm_up_deepspeed()
    baseline_model = model_dir("negligible")
    layouts = {"single-file": "tiny"} if quick else LAYOUTS
    plan = [(layout, c) for layout in layouts for c in CONFIGS[:2 if quick else None]]
    if not quick:
        plan += [("multi-file", c) for c in WHOLE_THEN_SPLIT]
    baselines: dict[tuple, list[dict]] = {}
    runs = []
    for layout, (name, engine, nproc, threads, extra) in plan:
        key = (engine, nproc, threads, tuple(sorted(extra.items())))
        if key not in baselines:
            baselines[key] = _measure(baseline_model, engine, nproc, threads, extra)
        per_rank = _measure(model_dir(layouts[layout]), engine, nproc, threads, extra)
        for rank, (r, b) in enumerate(zip(per_rank, baselines[key], strict=True)):
            r["baseline_peak_mib"] = b["peak_mib"]
            r["model_mib"] = round(r["peak_mib"] - b["peak_mib"], 1)
            r["steady_model_mib"] = round(r["steady_mib"] - baselines[key][rank]["steady_mib"], 1)
        runs.append({"layout": layout, "model": layouts[layout], "name": name, "engine": engine, "ranks": nproc,
                     "threads_per_rank": threads, "load_avg_1min": load_avg(), "per_rank": per_rank})
    for run_ in runs:
        unsharded = next(r for r in runs if r["layout"] == run_["layout"] and r["ranks"] == 1)["per_rank"][0]
        heaviest = max(run_["per_rank"], key=lambda r: r["model_mib"])
        run_["heaviest"] = {
            "model_mib": heaviest["model_mib"], "peak_mib": heaviest["peak_mib"],
            "model_x_unsharded": _ratio(heaviest["model_mib"], unsharded["model_mib"]),
            "steady_model_x_unsharded": _ratio(max(r["steady_model_mib"] for r in run_["per_rank"]),
                                               unsharded["steady_model_mib"]),
            "load_seconds": max(r["load_seconds"] for r in run_["per_rank"]),
            "ready_seconds": max(r["ready_seconds"] for r in run_["per_rank"])}
    load_times = {} if quick else _load_times(model_dir(LAYOUTS["multi-file"]))
    result = {"models": {layout: layouts[layout] for layout in layouts}, "dtype": "float32",
              "baseline_model": "negligible", "repetitions": 1, "targets_x_unsharded": TARGETS,
              "runs": runs, "load_times": load_times, "load_avg_1min_at_end": load_avg(),
              "method": "peak RSS is ru_maxrss after one generation (2 x 32 prompt tokens + 4 new); steady RSS is "
                        "VmRSS then, after gc; model memory = peak RSS - the same configuration's peak RSS with "
                        "the negligible model, rank by rank; ratios take the heaviest rank; load_seconds is "
                        "load_split (read and split), ready_seconds the whole build_runtime (imports of the "
                        "engine, rendezvous, load, ready barrier)."}
    _plot(result, out_dir / "engine_memory.png")
    return result


def _load_times(model: Path) -> dict:
    """tp=2 with shard-only loading and with the whole checkpoint, launches taking turns, so that
    the machine's changing load hits both alike: seconds of the slowest rank, every repetition."""
    loaders = {"shard-only": {}, "whole checkpoint then split": {"whole_then_split": True}}
    times = {name: {"load_seconds": [], "ready_seconds": [], "load_avg_1min": []} for name in loaders}
    for _ in range(LOAD_REPS):
        for name, extra in loaders.items():
            ranks = _measure(model, "tp", 2, 1, extra)
            times[name]["load_seconds"].append(max(r["load_seconds"] for r in ranks))
            times[name]["ready_seconds"].append(max(r["ready_seconds"] for r in ranks))
            times[name]["load_avg_1min"].append(load_avg())
    for t in times.values():
        t["load_median"] = statistics.median(t["load_seconds"])
        t["ready_median"] = statistics.median(t["ready_seconds"])
    return {"configuration": "tp=2, multi-file", "repetitions": LOAD_REPS, "loaders": times}


def _ratio(part: float, whole: float) -> float | None:
    """None when the whole is too small to divide by (the quick run's model is negligible too)."""
    return round(part / whole, 3) if whole > 16 else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    runs = result["runs"]
    load = result.get("load_times") or {}
    fig, axes = plt.subplots(1, 2 if load else 1, figsize=(13 if load else 10, 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1] if load else [1]})
    mem = axes[0][0]
    labels = [f"{r['name'].replace(', whole checkpoint then split', chr(10) + '(whole ckpt)')}\n{r['layout']}"
              .replace("unsharded, 1 process", "unsharded") for r in runs]
    xs = list(range(len(runs)))
    colors = ["tab:gray" if r["ranks"] == 1 else "tab:red" if "whole" in r["name"] else "tab:blue" for r in runs]
    mem.bar(xs, [r["heaviest"]["model_mib"] for r in runs], color=colors)
    for x, r in zip(xs, runs, strict=True):
        mem.text(x, r["heaviest"]["model_mib"], f"{_x(r['heaviest']['model_x_unsharded'])}x", ha="center",
                 va="bottom", fontsize=8)
    first = next(iter(result["models"]))  # targets drawn against the first layout's unsharded process
    unsharded = next(r for r in runs if r["layout"] == first and r["ranks"] == 1)["heaviest"]["model_mib"]
    for name, target in result["targets_x_unsharded"].items():
        mem.axhline(unsharded * target, color="black", linestyle=":", linewidth=0.8)
        mem.text(-0.4, unsharded * target, f"target {name}: {target}x", fontsize=7, va="bottom")
    mem.set_xticks(xs, labels, fontsize=7)
    mem.set_ylabel("MiB: peak RSS less the same configuration's with a negligible model")
    mem.set_title("Model memory of the heaviest rank (blue: shard-only loading; red: every rank reads the "
                  "whole checkpoint, then splits)", fontsize=9)
    if load:
        ax = axes[0][1]
        names = list(load["loaders"])
        for i, name in enumerate(names):
            t = load["loaders"][name]
            for key, offset, color in (("load_seconds", -0.2, "tab:blue" if i == 0 else "tab:red"),
                                       ("ready_seconds", 0.2, "lightsteelblue" if i == 0 else "lightcoral")):
                values = t[key]
                median = t["load_median" if key == "load_seconds" else "ready_median"]
                ax.bar(i + offset, median, 0.38, color=color,
                       yerr=[[median - min(values)], [max(values) - median]], capsize=3,
                       label=("load and split" if key == "load_seconds" else "to ready") if i == 0 else None)
        ax.set_xticks(range(len(names)), [n.replace(" then ", "\nthen ") for n in names], fontsize=8)
        ax.set_ylabel("seconds (median, min-max)")
        ax.set_title(f"Load time, {load['configuration']}\n{load['repetitions']} launches each, taking turns",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    runs = result["runs"]
    headline = []
    for name, target in result["targets_x_unsharded"].items():
        got = next((r for r in runs if r["name"] == name and r["layout"] == "multi-file"), None)
        if got:
            x = got["heaviest"]["model_x_unsharded"]
            met = "met" if x is not None and x <= target else "NOT met"
            headline.append(f"{name} {_x(x)}x (target <= {target}x: {met})")
    rows = []
    for r in runs:
        h = r["heaviest"]
        ranks = r["per_rank"]
        rows.append([r["layout"], r["name"], f"{max(x['param_mib'] for x in ranks):.0f}",
                     f"{h['peak_mib']:.0f}", f"{max(x['baseline_peak_mib'] for x in ranks):.0f}",
                     f"{h['model_mib']:.0f}", _x(h["model_x_unsharded"]),
                     f"{max(x['steady_mib'] for x in ranks):.0f}", _x(h["steady_model_x_unsharded"]),
                     f"{h['load_seconds']:.1f}", f"{h['ready_seconds']:.1f}", f"{r['load_avg_1min']}"])
    models = ", ".join(f"{layout}: `{name}`" for layout, name in result["models"].items())
    load = result.get("load_times") or {}
    load_text = ""
    if load:
        rows_load = [[name, f"{t['load_median']:.1f} ({', '.join(f'{x:.1f}' for x in t['load_seconds'])})",
                      f"{t['ready_median']:.1f} ({', '.join(f'{x:.1f}' for x in t['ready_seconds'])})",
                      ", ".join(str(x) for x in t["load_avg_1min"])] for name, t in load["loaders"].items()]
        load_text = (f"\n\nLoad time, {load['configuration']}, {load['repetitions']} launches each, taking turns "
                     "(seconds of the slowest rank, median (each run)):\n\n"
                     + table(["loader", "load and split s", "to ready s", "load avg (1 min) per run"], rows_load))
    return ((f"Model memory per rank against one unsharded process (multi-file checkpoint): "
             f"{'; '.join(headline)}.\n\n" if headline else "")
            + f"Float32, {models}. MiB per rank (the heaviest), 1 run each; model memory = peak RSS less the same "
            "configuration's peak with a negligible model.\n\n"
            + table(["checkpoint", "configuration", "parameters held", "peak RSS", "baseline peak", "model memory",
                     "x unsharded", "steady RSS", "steady model x unsharded", "load s", "ready s", "load avg"],
                    rows)
            + load_text)

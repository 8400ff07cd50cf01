"""Memory per rank: a ~100M-parameter Llama split with tp=2 (and ZeRO-3 over 2 ranks) against one
unsharded process.

Each rank goes through the engine's real path (`build_runtime`) and reports its RSS after the full
checkpoint is loaded, after the split, and after one short unit of work (steady serving memory:
every weight has been read), split into anonymous, file-backed and shared memory; its peak RSS;
and the bytes of parameters it holds. Every rank loads the whole checkpoint before splitting it,
so peak RSS is about the full model on every rank; the split saves only steady-state memory.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import launch_ranks, load_avg, mib, model_dir, pyplot, table, warm_up_deepspeed

# name, engine, ranks, threads per rank, extra task fields
CONFIGS = [
    ("unsharded, 1 process", None, 1, 2, {}),
    ("tp=2", "tp", 2, 1, {}),
    ("tp=2, ckpt unmapped", "tp", 2, 1, {"release_checkpoint": True}),
    ("zero3=2", "zero3", 2, 1, {}),
]
STAGES = ("start", "loaded", "ready", "steady", "trimmed")


def _rank_summary(report: dict) -> dict:
    stages = {stage: {k: mib(v) for k, v in report[stage].items()} for stage in STAGES if stage in report}
    return {"param_mib": mib(report["param_bytes"]), "param_count": report["param_count"],
            "peak_mib": mib(report["steady"]["peak"]), "steady_rss_mib": stages["steady"]["rss"],
            "steady_above_start_mib": round(stages["steady"]["rss"] - stages["start"]["rss"], 1),
            "stages_mib": stages}


def run(out_dir: Path, quick: bool) -> dict:
    model = "tiny" if quick else "llama-100m"
    path = model_dir(model)
    warm_up_deepspeed()
    configs = []
    for name, engine, nproc, threads, extra in CONFIGS:
        task = {"mode": "memory", "model": str(path), "engine": engine, **extra}
        reports = launch_ranks(task, nproc=nproc, threads=threads)
        configs.append({"name": name, "engine": reports[0]["engine"], "ranks": nproc, "threads_per_rank": threads,
                        "per_rank": [_rank_summary(r) for r in reports]})
    base = configs[0]["per_rank"][0]

    def ratios(config: dict) -> dict:
        worst = {k: max(r[k] for r in config["per_rank"]) for k in ("param_mib", "peak_mib", "steady_rss_mib",
                                                                     "steady_above_start_mib")}
        return {k: round(v / base[k], 2) for k, v in worst.items()}

    result = {"model": model, "parameters": base["param_count"], "dtype": "float32", "repetitions": 1,
              "load_avg_1min_at_end": load_avg(), "configs": configs,
              "ratios_vs_unsharded": {c["name"]: ratios(c) for c in configs[1:]},
              "method": "RSS from /proc/self/status (RssAnon, RssFile, RssShmem) after gc; peak is ru_maxrss; "
                        "'trimmed' is after malloc_trim(0). Ratios take the larger of the ranks."}
    _plot(result, out_dir / "engine_memory.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    labels, anon, file, shmem, peak, params = [], [], [], [], [], []
    for config in result["configs"]:
        for rank, r in enumerate(config["per_rank"]):
            labels.append(config["name"].replace(", ", ",\n") + (f"\nrank {rank}" if config["ranks"] > 1 else ""))
            steady = r["stages_mib"]["steady"]
            anon.append(steady["anon"])
            file.append(steady["file"])
            shmem.append(steady["shmem"])
            peak.append(r["peak_mib"])
            params.append(r["param_mib"])
    xs = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    w = 0.4
    left = [x - w / 2 for x in xs]
    ax.bar(left, anon, w, label="steady RSS: anonymous")
    ax.bar(left, file, w, bottom=anon, label="steady RSS: file-backed (libraries, mapped checkpoint)")
    ax.bar(left, shmem, w, bottom=[a + f for a, f in zip(anon, file, strict=True)], label="steady RSS: shared memory")
    ax.scatter(left, peak, marker="_", s=500, color="black", zorder=3, label="peak RSS")
    ax.bar([x + w / 2 for x in xs], params, w, color="tab:gray", label="parameter bytes held")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(f"Memory per rank, {result['model']} ({result['parameters'] / 1e6:.1f}M parameters, float32)")
    ax.set_ylim(0, max(peak + [a + f + s for a, f, s in zip(anon, file, shmem, strict=True)]) * 1.05)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    rows = []
    for config in result["configs"]:
        for rank, r in enumerate(config["per_rank"]):
            st = r["stages_mib"]
            rows.append([config["name"] + (f", rank {rank}" if config["ranks"] > 1 else ""),
                         f"{r['param_mib']:.0f}", f"{st['loaded']['rss']:.0f}", f"{st['ready']['rss']:.0f}",
                         f"{r['steady_rss_mib']:.0f} ({st['steady']['anon']:.0f} / {st['steady']['file']:.0f} / "
                         f"{st['steady']['shmem']:.0f})", f"{st['trimmed']['rss']:.0f}", f"{r['peak_mib']:.0f}"])
    ratio_rows = [[name, f"{v['param_mib']:.2f}", f"{v['steady_rss_mib']:.2f}", f"{v['steady_above_start_mib']:.2f}",
                   f"{v['peak_mib']:.2f}"] for name, v in result["ratios_vs_unsharded"].items()]
    tp = result["ratios_vs_unsharded"].get("tp=2")
    headline = (f"With tp=2 each rank holds {tp['param_mib']:.2f}x the parameter bytes of one unsharded process, "
                f"but its steady RSS is {tp['steady_rss_mib']:.2f}x and its peak RSS {tp['peak_mib']:.2f}x "
                "(every rank loads the full checkpoint, and the split leaves it mapped).\n\n") if tp else ""
    return (headline + f"{result['model']}: {result['parameters'] / 1e6:.1f}M parameters, float32. MiB per rank, "
            "1 run each (memory does not depend on outside load as timings do).\n\n"
            + table(["configuration", "parameters held", "RSS loaded", "RSS split", "RSS steady (anon / file / shm)",
                     "RSS after malloc_trim", "peak RSS"], rows)
            + "\n\nPer rank against the unsharded process (the larger rank):\n\n"
            + table(["configuration", "parameters held", "steady RSS", "steady RSS above start (after imports)",
                     "peak RSS"], ratio_rows))

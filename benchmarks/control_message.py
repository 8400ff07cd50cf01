"""Cost of a control message between rank 0 and a worker, 2 ranks on this machine: the channel's
TCP sockets against the gloo group it used before, side by side in one run.

Every unit of work (and every heartbeat) crosses `ControlChannel`. On the sockets a message is one
frame to each worker, and the next message first reads every worker's report on it; a predict
unit adds the agreement on its outcome (reports in, the count out). Over gloo (the channel as it
was, kept in `benchmarks/ranks.py`) a message was a header all-reduce plus a payload broadcast,
and a predict unit's outcome one more all-reduce. Measured: what rank 0 spends per unit, units
back to back as the engine sends them (a heartbeat; a generation step of 8 decoding requests, the
header alone; a step in which 8 requests of 64 prompt tokens join; a predict unit of a (1, 10) and
a (32, 10) float32 tensor), and the bare primitives beneath (a gloo all-reduce and broadcast of 3
int64, a socket round trip of one small frame each way).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import launch_ranks, load_avg, pyplot, stats, table

LABELS = {
    "heartbeat": "heartbeat (header only)",
    "decode_step_8": "generation step, 8 requests decode (header only)",
    "join_8x64": "generation step, 8 requests join (64 prompt tokens each)",
    "predict_1x10": "predict unit, (1, 10) float32",
    "predict_32x10": "predict unit, (32, 10) float32",
}
PRIMITIVES = {
    "all_reduce_3xint64": "gloo all-reduce of 3 int64",
    "broadcast_3xint64": "gloo broadcast of 3 int64",
    "socket_round_trip": "socket round trip (one small frame each way)",
}
CHANNELS = {"gloo": "gloo group (before)", "socket": "sockets (now)"}


def _us(ns: list[int]) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in stats([x / 1000 for x in ns]).items()}


def run(out_dir: Path, quick: bool) -> dict:
    reps = 100 if quick else 500
    rank0, _ = launch_ranks({"mode": "control", "reps": reps, "block": 20, "warmup_rounds": 1}, nproc=2, threads=1)
    units = rank0["unit_ns"]
    cases = {}
    for name, label in LABELS.items():
        gloo, socket = _us(units[f"gloo/{name}"]), _us(units[f"socket/{name}"])
        entry = {"label": label, "gloo_us": gloo, "socket_us": socket,
                 "gloo_vs_socket_p50": round(gloo["p50"] / socket["p50"], 2)}
        if name in rank0["encoded_bytes"]:
            entry.update(encoded_bytes=rank0["encoded_bytes"][name], encode_us=_us(rank0["encode_ns"][name]),
                         decode_us=_us(rank0["decode_ns"][name]))
        cases[name] = entry
    primitives = {name: {"label": label, "us": _us(units[f"primitive/{name}"])} for name, label in PRIMITIVES.items()}
    result = {"ranks": 2, "threads_per_rank": 1, "repetitions": reps, "load_avg_1min_at_end": load_avg(),
              "cases": cases, "primitives": primitives,
              "method": "rank 0's time per unit (perf_counter around send, plus agree_ok for a predict unit), "
                        "units back to back in blocks of 20 that take turns between channels and cases; the "
                        "first unit of each block is not counted."}
    _plot(result, out_dir / "control_message.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    cases = result["cases"]
    names = list(cases)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for offset, kind in ((-width / 2, "gloo"), (width / 2, "socket")):
        xs = [i + offset for i in range(len(names))]
        bars = ax.bar(xs, [cases[n][f"{kind}_us"]["p50"] for n in names], width, label=f"{CHANNELS[kind]}, p50")
        ax.scatter(xs, [cases[n][f"{kind}_us"]["p90"] for n in names], marker="_", s=300,
                   color=bars.patches[0].get_facecolor(), zorder=3)
    ax.scatter([], [], marker="_", s=300, color="gray", label="p90")
    ax.set_xticks(range(len(names)), [cases[n]["label"].replace(", ", ",\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("rank 0's time per unit, microseconds")
    ax.set_title(f"One control unit, 2 ranks, gloo group vs sockets ({result['repetitions']} units each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    def cell(s: dict) -> str:
        return f"{s['p50']:.0f} / {s['p90']:.0f} / {s['p99']:.0f}"

    rows = [[case["label"], cell(case["gloo_us"]), cell(case["socket_us"]), f"{case['gloo_vs_socket_p50']:.1f}x",
             f"{case['encode_us']['p50']:.0f} + {case['decode_us']['p50']:.0f}" if "encode_us" in case else "-"]
            for case in result["cases"].values()]
    c, prim = result["cases"], result["primitives"]
    headline = (f"Per unit, the sockets cost {c['heartbeat']['socket_us']['p50']:.0f} us for a heartbeat "
                f"({c['heartbeat']['gloo_vs_socket_p50']:.1f}x less than the gloo group), "
                f"{c['decode_step_8']['socket_us']['p50']:.0f} us for a decoding step "
                f"({c['decode_step_8']['gloo_vs_socket_p50']:.1f}x less) and "
                f"{c['predict_1x10']['socket_us']['p50']:.0f} us for a small predict unit "
                f"({c['predict_1x10']['gloo_vs_socket_p50']:.1f}x less).\n\n")
    notes = "\n\nThe bare primitives, same method (p50 / p90 / p99 us): " + "; ".join(
        f"{p['label']} {cell(p['us'])}" for p in prim.values()) + "."
    return (headline + f"Rank 0's time per unit in microseconds, p50 / p90 / p99 over {result['repetitions']} units "
            "each, 2 ranks, 1 thread per rank, units back to back.\n\n"
            + table(["unit", CHANNELS["gloo"], CHANNELS["socket"], "gloo / sockets (p50)",
                     "encode + decode alone (p50)"], rows) + notes)

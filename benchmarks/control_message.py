"""Cost of one control message between rank 0 and a worker, 2 ranks over gloo on this machine.

Every unit of work (and every heartbeat) crosses `ControlChannel`: a header all-reduce (opcode,
length, failed steps, one action per running generation row), then a broadcast of the pickled
payload if there is one. A generation step in which every request decodes is the header alone; a
step in which requests join also carries their prompts. This measures their one-way latency
(rank 0 starts sending -> the worker holds the decoded message), against
`torch.distributed.broadcast_object_list` of the same payload and against the encoding alone, so
a change to the protocol shows up as a ratio, not a guess.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import launch_ranks, load_avg, pyplot, stats, table
from dscluster.engine.protocol import HEADER

PAYLOADS = {
    "heartbeat": "heartbeat (header only)",
    "predict_1x10": "predict, (1, 10) float32",
    "predict_32x10": "predict, (32, 10) float32",
    "join_8x64": "generation step, 8 requests join (64 prompt tokens each)",
}
DECODE_STEPS = {"decode_step_8": 8, "decode_step_32": 32}
HEADER_BYTES = 8 * HEADER  # int64 opcode, payload length, failed steps (no running rows)


def _us(ns: list[int]) -> list[float]:
    return [x / 1000 for x in ns]


def _r(d: dict) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in d.items()}


def run(out_dir: Path, quick: bool) -> dict:
    reps = 100 if quick else 500
    rank0, worker = launch_ranks({"mode": "control", "reps": reps, "warmup": 20}, nproc=2, threads=1)

    def latency(case: str) -> dict:
        return _r(stats([(b - a) / 1000 for a, b in zip(rank0["times_ns"][case], worker["times_ns"][case],
                                                          strict=True)]))

    cases = {}
    for name, label in PAYLOADS.items():
        channel, objects = latency(f"channel/{name}"), latency(f"object_list/{name}")
        entry = {"label": label, "channel_us": channel, "object_list_us": objects,
                 "channel_sender_us": _r(stats(_us(rank0["blocked_ns"][f"channel/{name}"]))),
                 "object_list_vs_channel_p50": round(objects["p50"] / channel["p50"], 2), "wire_bytes": HEADER_BYTES}
        if name in rank0["encode_ns"]:
            entry.update(wire_bytes=HEADER_BYTES + rank0["encoded_bytes"][name], encoded_bytes=rank0["encoded_bytes"][name],
                         object_list_bytes=rank0["object_bytes"][name],
                         encode_us=_r(stats(_us(rank0["encode_ns"][name]))),
                         decode_us=_r(stats(_us(rank0["decode_ns"][name]))))
        cases[name] = entry
    for name, rows in DECODE_STEPS.items():
        cases[name] = {"label": f"generation step, {rows} requests decode (header only)",
                       "channel_us": latency(f"channel/{name}"), "wire_bytes": HEADER_BYTES + 8 * rows,
                       "channel_sender_us": _r(stats(_us(rank0["blocked_ns"][f"channel/{name}"])))}
    primitives = {name: latency(f"primitive/{name}") for name in ("all_reduce_2xint64", "broadcast_2xint64")}
    result = {"ranks": 2, "backend": "gloo", "threads_per_rank": 1, "repetitions": reps,
              "load_avg_1min_at_end": load_avg(), "cases": cases, "primitives_us": primitives,
              "method": "one-way latency: an untimed barrier, then rank 0 notes the monotonic clock and "
                        "sends; the worker notes it when it holds the decoded message. Cases alternate "
                        "message by message."}
    _plot(result, out_dir / "control_message.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    cases = result["cases"]
    names = list(cases)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for offset, key, label in ((-width / 2, "channel_us", "ControlChannel (dscluster)"),
                               (width / 2, "object_list_us", "broadcast_object_list")):
        xs = [i + offset for i, n in enumerate(names) if key in cases[n]]
        p50 = [cases[n][key]["p50"] for n in names if key in cases[n]]
        p90 = [cases[n][key]["p90"] for n in names if key in cases[n]]
        bars = ax.bar(xs, p50, width, label=f"{label}, p50")
        ax.scatter(xs, p90, marker="_", s=300, color=bars.patches[0].get_facecolor(), zorder=3)
    ax.scatter([], [], marker="_", s=300, color="gray", label="p90")
    ax.set_xticks(range(len(names)), [cases[n]["label"].replace(", ", ",\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("one-way latency, microseconds")
    ax.set_title(f"One control message, 2 ranks over gloo ({result['repetitions']} repetitions each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    rows = []
    for case in result["cases"].values():
        ch, ob = case["channel_us"], case.get("object_list_us")
        enc = case.get("encode_us")
        rows.append([case["label"], f"{ch['p50']:.0f} / {ch['p90']:.0f} / {ch['p99']:.0f}",
                     f"{ob['p50']:.0f} / {ob['p90']:.0f} / {ob['p99']:.0f}" if ob else "-",
                     f"{case['object_list_vs_channel_p50']:.2f}x" if ob else "-",
                     f"{enc['p50']:.0f} + {case['decode_us']['p50']:.0f}" if enc else "-",
                     case.get("wire_bytes", "-")])
    prim = result.get("primitives_us", {})
    notes = ""
    if prim:
        ar, bc = prim["all_reduce_2xint64"], prim["broadcast_2xint64"]
        notes = (f"\n\nThe bare primitives under the header, same method: all-reduce of 2 int64 "
                 f"{ar['p50']:.0f} / {ar['p90']:.0f} / {ar['p99']:.0f} us, broadcast of 2 int64 "
                 f"{bc['p50']:.0f} / {bc['p90']:.0f} / {bc['p99']:.0f} us (p50 / p90 / p99).")
    c = result["cases"]
    headline = (f"A heartbeat costs {c['heartbeat']['channel_us']['p50']:.0f} us (p50), a generation step of 8 "
                f"decoding requests {c['decode_step_8']['channel_us']['p50']:.0f} us (the header alone), a step in "
                f"which 8 requests of 64 prompt tokens join {c['join_8x64']['channel_us']['p50']:.0f} us; encoding "
                f"is a small part of it.\n\n")
    return (headline + f"One-way latency in microseconds, p50 / p90 / p99 over {result['repetitions']} messages each, "
            f"2 ranks, gloo, 1 thread per rank.\n\n"
            + table(["message", "ControlChannel", "broadcast_object_list", "object_list / channel (p50)",
                     "encode + decode alone (p50)", "bytes sent (channel)"], rows) + notes)

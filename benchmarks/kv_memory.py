"""Long requests under a memory limit: does a server live within the memory it is given?

One `dscluster serve` rank (llama-100m, one process) in a memory cgroup (benchmarks/memory_cgroup.py,
cgroup v1 or v2) whose limit is the server's idle size plus HEADROOM_MIB, the memory a pod gets
with its limit set a little above what the server needs at rest. REQUESTS completions of about
PROMPT_TOKENS prompt tokens (each its own words, from a seeded generator, counted with the model's
tokenizer: no shared prefix to lean on) and MAX_TOKENS tokens out, greedy, end-of-sequence ignored,
all sent at once, streamed, from a separate load process (generation.py's client).

A KV cache that grows with every running row takes REQUESTS x (prompt + output) positions (about
4 GiB here): the kernel OOM-kills the server and every request in flight is lost. A cache sized to
the limit makes requests wait or be preempted instead, and every one completes. The kernel is the
judge, not the server: its OOM-kill count in the cgroup, its high-water mark of the cgroup's
memory, and its log (`dmesg`).

0. The weights' files are read once by the harness first: the kernel charges a page of the page
   cache to the cgroup that first reads it, so this keeps the (mapped, reclaimable) weights out of
   both servers' cgroups alike, and the idle size and the limit count what the server itself holds.
1. Idle size: the server alone in an unlimited cgroup, after one short warm-up request; the
   cgroup's usage then.
2. The run: a fresh server in a fresh cgroup limited to idle + HEADROOM_MIB (set before the server
   starts, so a server that sizes its cache from its limit sees it), then the load, while a thread
   samples the cgroup's usage every SAMPLE_S seconds (the plot).

Recorded, as a result whatever happens (an OOM kill is an outcome, not a harness failure): requests
completed in full, errors, the server's exit status and when it died, the OOM kills, the peak
against the limit, the wall time, and the server's start-up lines about its cache. Target: every
request completes, no OOM kill, and the peak stays under the limit.
"""

from __future__ import annotations

import os
import random
import re
import sys
import threading
import time
from pathlib import Path

from benchmarks import generation
from benchmarks.common import (MIB, ROOT, Server, corpus_words, load_avg, mib, model_dir, pyplot, table,
                               words_for_tokens)
from benchmarks.memory_cgroup import MemoryCgroup, kernel_log_lines, oom_lines, unavailable_reason

PROMPT_TOKENS, MAX_TOKENS, REQUESTS = 1700, 100, 32
HEADROOM_MIB = int(os.environ.get("DSCLUSTER_BENCH_KV_HEADROOM_MIB", 600))
SAMPLE_S = 0.2
# Start-up lines that describe the server's cache (pool size, maximum concurrency), kept in the JSON.
CACHE_LINE = re.compile(r"kv cache|cache size|concurrency|blocks", re.IGNORECASE)


def workload(tokenizer, n: int = REQUESTS, seed: int = 0) -> list[dict]:
    rng, words = random.Random(seed), corpus_words()
    out = []
    for _ in range(n):
        prompt, tokens = words_for_tokens(tokenizer, rng, words, PROMPT_TOKENS)
        out.append({"prompt": prompt, "max_tokens": MAX_TOKENS, "prompt_tokens": tokens})
    return out


def server_command(model: Path, port: int) -> list[str]:
    """One rank in this process (no launcher in between), so its exit status is the kernel's signal.
    Default cache flags; INFO logs for the start-up lines about the cache."""
    return [sys.executable, "-m", "dscluster", "serve", str(model), "--port", str(port), "--log-level", "INFO",
            "--request-timeout", "0"]


def start_server(cgroup: MemoryCgroup, model: Path) -> Server:
    from dscluster.cluster.launch import free_port

    port = free_port()
    return Server(cgroup.command(server_command(model, port)), port, "/health/ready",
                  {"OMP_NUM_THREADS": str(generation.THREADS), "HF_HUB_OFFLINE": "1"})


def read_into_page_cache(model: Path) -> None:
    """Read the weights' files once from this process (see step 0 above)."""
    for path in sorted(model.glob("*.safetensors")):
        with path.open("rb") as f:
            while f.read(16 * MIB):
                pass


def idle_size(model: Path, warm_up: list[dict]) -> dict:
    """The server's memory at rest, after its first request, in a cgroup of its own."""
    with MemoryCgroup("idle") as cgroup:
        server = start_server(cgroup, model)
        try:
            generation.run_load(server.url, "dscluster", str(model), warm_up, 1, idle=True)
            return {"usage_bytes": cgroup.usage(), "anon_bytes": cgroup.resident_anon(), "stat": _stat_subset(cgroup)}
        finally:
            server.stop()


class Sampler(threading.Thread):
    """The cgroup's usage every SAMPLE_S seconds, and when the server process was first seen gone."""

    def __init__(self, cgroup: MemoryCgroup, server: Server):
        super().__init__(daemon=True)
        self.cgroup, self.server = cgroup, server
        self.samples: list[tuple[float, int, int | None]] = []  # seconds, usage, anonymous
        self.exited_after: float | None = None
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.done.is_set():
            now = round(time.monotonic() - self.t0, 2)
            try:
                self.samples.append((now, self.cgroup.usage(), self.cgroup.resident_anon()))
            except OSError:
                pass
            if self.exited_after is None and self.server.proc.poll() is not None:
                self.exited_after = now
            self.done.wait(SAMPLE_S)

    def stop(self) -> None:
        self.done.set()
        self.join()


def limited_run(model: Path, requests: list[dict], limit_bytes: int) -> dict:
    with MemoryCgroup("limited") as cgroup:
        limit = cgroup.set_limit(limit_bytes)
        out: dict = {"limit_bytes": limit, "cgroup_version": cgroup.version}
        try:
            server = start_server(cgroup, model)
        except RuntimeError as exc:  # did not start: exit 2 (pool too small for a request) or killed
            out.update(started=False, start_error=_without_paths(str(exc))[-1500:], oom_kills=cgroup.oom_kills(),
                       peak_bytes=cgroup.peak(), completed=0, requests=len(requests))
            out["kernel_oom_lines"] = _kernel_oom_lines(cgroup, [])
            return out
        pids = cgroup.pids()
        log_lines = server.output().splitlines()
        out["server_cache_lines"] = [_without_paths(line) for line in log_lines if CACHE_LINE.search(line)][:20]
        sampler = Sampler(cgroup, server)
        sampler.start()
        try:
            loaded = generation.run_load(server.url, "dscluster", str(model), requests, len(requests))
        finally:
            time.sleep(2 * SAMPLE_S)  # one more sample after the last answer (or the kill)
            sampler.stop()
            exit_status = server.proc.poll()
            out.update(oom_kills=cgroup.oom_kills(), peak_bytes=cgroup.peak())
            if exit_status is None:  # what the running server holds after the load
                out["stat_after"] = _stat_subset(cgroup)
            tail = [_without_paths(line) for line in server.output().splitlines()[-15:]]
            server.stop()
        records = loaded["records"]
        complete = [r for r in records if r["error"] is None and r["tokens"] == MAX_TOKENS]
        samples = sampler.samples
        out.update(
            started=True, requests=len(records), completed=len(complete),
            errors=sorted({r["error"] for r in records if r["error"]})[:5],
            error_count=sum(1 for r in records if r["error"]),
            seconds=round(loaded["seconds"], 1),
            server_exit_status=exit_status, server_exit_after_s=sampler.exited_after,
            peak_sampled_bytes=max((s[1] for s in samples), default=None),
            peak_anon_sampled_bytes=max((s[2] or 0 for s in samples), default=None),
            completion_s=sorted(round(r["end"], 2) for r in complete),
            samples=[list(s) for s in samples],
            server_log_tail=tail if exit_status not in (None, 0) else [],
            kernel_oom_lines=_kernel_oom_lines(cgroup, pids),
        )
        return out


def _without_paths(text: str) -> str:
    """A server's message as recorded in results: without this checkout's or the interpreter's
    location on the host that ran it."""
    return text.replace(sys.executable, "python").replace(str(ROOT), ".")


def _kernel_oom_lines(cgroup: MemoryCgroup, pids: list[int]) -> list[str] | None:
    lines = kernel_log_lines()
    return None if lines is None else oom_lines(lines, cgroup, pids)[:10]


def _stat_subset(cgroup: MemoryCgroup) -> dict:
    keep = {"total_rss", "total_cache", "total_mapped_file", "rss", "cache", "anon", "file", "file_mapped"}
    try:
        return {k: v for k, v in cgroup.stat().items() if k in keep}
    except OSError:
        return {}


def run(out_dir: Path, quick: bool) -> dict:
    from transformers import AutoTokenizer

    reason = unavailable_reason()
    if reason is not None:
        print(f"   skipped: {reason}", flush=True)
        return {"skipped": reason}
    model = model_dir("llama-100m")  # the cache's size is the point: the tiny model's would fit anywhere
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    requests = workload(tokenizer, 8 if quick else REQUESTS)
    warm_up = [{"prompt": "The cluster serves", "max_tokens": 4}]
    load_start = load_avg()
    read_into_page_cache(model)
    idle = idle_size(model, warm_up)
    print(f"   idle {mib(idle['usage_bytes'])} MiB; limit idle + {HEADROOM_MIB} MiB (load {load_avg()})", flush=True)
    outcome = limited_run(model, requests, idle["usage_bytes"] + HEADROOM_MIB * MIB)
    result = {"model": "llama-100m", "requests": len(requests), "prompt_tokens_target": PROMPT_TOKENS,
              "prompt_tokens_median": sorted(r["prompt_tokens"] for r in requests)[len(requests) // 2],
              "max_tokens": MAX_TOKENS, "threads": generation.THREADS, "headroom_mib": HEADROOM_MIB,
              "idle_bytes": idle["usage_bytes"], "idle_anon_bytes": idle["anon_bytes"], "idle_stat": idle["stat"],
              **outcome,
              "oom_killed": outcome.get("oom_kills", 0) > 0 or outcome.get("server_exit_status") == -9,
              "load_avg_start": load_start, "load_avg_end": load_avg(),
              "client": "asyncio + httpx, separate process, streamed, all requests at once"}
    result["target_met"] = (not result["oom_killed"] and result.get("completed") == len(requests)
                            and result.get("peak_bytes") is not None and result["peak_bytes"] < result["limit_bytes"])
    if outcome.get("started"):
        _plot(result, out_dir / "kv_memory.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.6))
    samples = result["samples"]
    ax.plot([s[0] for s in samples], [mib(s[1]) for s in samples], color="tab:blue", label="cgroup usage")
    ax.plot([s[0] for s in samples], [mib(s[2] or 0) for s in samples], color="tab:cyan", lw=1,
            label="of which anonymous (resident)")
    ax.axhline(mib(result["limit_bytes"]), color="tab:red", ls="--", label="limit")
    ax.axhline(mib(result["idle_bytes"]), color="grey", ls=":", label="idle size")
    if result.get("server_exit_after_s") is not None:
        ax.axvline(result["server_exit_after_s"], color="black",
                   label=f"server exited ({'OOM kill' if result['oom_killed'] else result['server_exit_status']})")
    ax.set(xlabel="seconds from the start of the load", ylabel="MiB")
    ax.grid(alpha=0.3)
    done = ax.twinx()
    done.step(result["completion_s"], range(1, len(result["completion_s"]) + 1), where="post", color="tab:green",
              label="requests completed")
    done.set(ylabel="requests completed", ylim=(0, result["requests"] + 1))
    handles = ax.get_legend_handles_labels()
    more = done.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.13), ncol=3)
    ax.set_title(f"{result['model']}, {result['requests']} requests of ~{result['prompt_tokens_target']}+"
                 f"{result['max_tokens']} tokens at once, limit idle + {result['headroom_mib']} MiB: "
                 f"{result['completed']}/{result['requests']} completed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    if "skipped" in result:
        return f"Skipped: {result['skipped']}."
    if not result.get("started"):
        verdict = f"the server did not start under the limit: {result['start_error'].splitlines()[-1]}"
    elif result["oom_killed"]:
        verdict = (f"the kernel OOM-killed the server after {result['server_exit_after_s']} s; "
                   f"{result['completed']} of {result['requests']} requests completed")
    else:
        verdict = f"{result['completed']} of {result['requests']} requests completed, no OOM kill"
    peak = result.get("peak_bytes")
    line = (f"Under a limit of its idle size + {result['headroom_mib']} MiB, {verdict} (target: all complete, no "
            f"OOM kill, peak under the limit: {'met' if result['target_met'] else 'not met'}).")
    row = [f"{result['model']}, 1 rank", f"{result['requests']} x ~{result['prompt_tokens_target']}+{result['max_tokens']}",
           f"{mib(result['idle_bytes'])}", f"{mib(result['limit_bytes'])}", "-" if peak is None else f"{mib(peak)}",
           f"{result.get('completed', 0)}/{result['requests']}", "yes" if result["oom_killed"] else "no",
           "running" if result.get("server_exit_status") is None else f"{result['server_exit_status']}",
           f"{result.get('seconds', '-')}",
           f"{result['load_avg_start']} / {result['load_avg_end']}"]
    return (f"{line}\n\nOne rank in a memory cgroup (v{result['cgroup_version']}); all requests sent at once, "
            f"streamed, greedy, {result['threads']} torch thread(s). Memory in MiB (the cgroup's: resident and page "
            "cache); peak is the kernel's high-water mark.\n\n"
            + table(["server", "requests (prompt+out tokens)", "idle", "limit", "peak", "completed", "OOM-killed",
                     "exit status", "wall s", "load avg start / end"], [row]))

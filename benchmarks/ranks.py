"""The rank program the benchmarks start with `dscluster launch --nproc N -- python ranks.py TASK.json`.

Every rank runs the same task and writes its own report to OUT_DIR/rankR.json. Modes:
- `memory`: load and split the model through the engine's real path (`build_runtime`) and report
  this rank's RSS when ready and after serving, its peak RSS, its load time, and the parameter
  bytes it holds.
- `control`: time control messages between rank 0 and the others, over the sockets
  (`ControlChannel`) and over a gloo group (the channel as it was before), side by side.
- `speed`: time greedy decoding of a batch through `Engine.generate` (every rank in lockstep).
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

from dscluster.cluster.rendezvous import discover


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def held_bytes(module: torch.nn.Module) -> dict:
    """Bytes of parameters this rank really holds: its tensor-parallel shards or its ZeRO-3 partition."""
    params = count = 0
    for p in module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        params += t.numel() * t.element_size()
        count += t.numel()
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return {"param_bytes": params, "param_count": count, "buffer_bytes": buffers}


def build(task: dict):
    from dscluster.engine import runtime as rt

    options = rt.RuntimeOptions(model=task["model"], engine=task.get("engine"))
    return rt.build_runtime(options, discover())


def finish(runtime, report: dict, task: dict, work=None) -> None:
    """Rank 0 runs `work` through an Engine then stops the group; the others serve as workers."""
    from dscluster.engine.client import make_engine
    from dscluster.engine.worker import run_worker

    if runtime.rank == 0:
        engine = make_engine(runtime)
        try:
            if work is not None:
                report.update(work(engine))
        finally:
            engine.shutdown()
    else:
        run_worker(runtime)
    write(report, task, runtime.rank)


def write(report: dict, task: dict, rank: int) -> None:
    if task["mode"] == "memory":
        report["steady"] = memory_now()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the allocator keeps cached, versus live data
        report["trimmed"] = memory_now()
    Path(task["out_dir"], f"rank{rank}.json").write_text(json.dumps(report))


# -- memory ---------------------------------------------------------------------------------
def memory_now() -> dict:
    """RSS and its parts. Transformers maps safetensors weights from the file, so part of a rank's
    RSS is file pages (shared with other ranks that map the same file, and reclaimable); anonymous
    memory and shared memory (DeepSpeed's all-reduce segments) are what the rank cannot give back."""
    gc.collect()
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value, _unit = line.split()
                parts[key[3:-1].lower()] = int(value) * 1024
    return {"rss": rss(), **parts, "peak": peak_rss()}


def memory(task: dict) -> None:
    """Load through `build_runtime` (timed: to ready, and the load and split alone), then one short
    unit of work so that every weight has been read once: steady serving memory."""
    from dscluster.engine import runtime as rt
    from dscluster.engine.api import GenerationRequest, SamplingParams

    report = {"start": memory_now()}
    if task.get("whole_then_split"):
        _use_whole_checkpoint_loader(rt)
    load_split, timed = rt.load_split, {}

    def timed_load_split(*args, **kwargs):
        t0 = time.monotonic()
        try:
            return load_split(*args, **kwargs)
        finally:
            timed["load_seconds"] = time.monotonic() - t0

    rt.load_split = timed_load_split
    t0 = time.monotonic()
    runtime = build(task)
    report["ready_seconds"] = time.monotonic() - t0
    report.update(timed)
    report["ready"] = memory_now()
    report.update(engine=runtime.model.engine, world_size=runtime.world_size, threads=torch.get_num_threads(),
                  description=runtime.model.description, **held_bytes(runtime.model.module))
    request = GenerationRequest(tuple(range(4, 36)), SamplingParams(max_tokens=4, temperature=0))
    finish(runtime, report, task, lambda engine: {"generated": len(engine.generate([request] * 2)[0].token_ids)})


def _use_whole_checkpoint_loader(rt) -> None:
    """The loader before shard-only loading, for comparison: every rank reads the whole checkpoint
    with transformers, then AutoTP splits it (what the engine still does for a .bin checkpoint)."""
    prepare = rt.prepare

    def whole(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        prepared.checkpoint = prepared.meta_module = prepared.keys = None
        return prepared

    rt.prepare = whole


# -- control messages -----------------------------------------------------------------------
def control_payloads() -> dict:
    """The units the engine sends, at the sizes the brief asks about: name -> (op, payload, rows)."""
    from dscluster.engine.api import SamplingParams
    from dscluster.engine.protocol import Join, Op

    g = torch.Generator().manual_seed(0)
    prompts = [tuple(torch.randint(4, 1024, (64,), generator=g).tolist()) for _ in range(8)]
    joins = [Join(i, p, 64, SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=i))
             for i, p in enumerate(prompts)]
    return {
        "heartbeat": (Op.HEARTBEAT, None, 0),
        "decode_step_8": (Op.STEP, None, 8),
        "join_8x64": (Op.STEP, joins, 0),
        "predict_1x10": (Op.PREDICT, torch.randn(1, 10, generator=g), 0),
        "predict_32x10": (Op.PREDICT, torch.randn(32, 10, generator=g), 0),
    }


class GlooControlChannel:
    """The control channel as it was before its sockets, kept here to compare against: the header
    all-reduced over a gloo group (each rank adding its failed-step flag), the payload broadcast
    from rank 0, a predict unit's outcome all-reduced."""

    def __init__(self, group, rank: int):
        self.group, self.rank, self.rows, self.step_failed = group, rank, [0], False

    def _header(self, op: int = 0, size: int = 0, actions: list[int] | None = None) -> torch.Tensor:
        from dscluster.engine.protocol import HEADER

        header = torch.zeros(HEADER + self.rows[0], dtype=torch.int64)
        header[0], header[1], header[2] = op, size, int(self.step_failed)
        if actions:
            header[HEADER:] = torch.tensor(actions, dtype=torch.int64)
        self.step_failed = False
        return header

    def send(self, op, payload=None, actions=None) -> None:
        import torch.distributed as dist

        from dscluster.engine.protocol import encode

        data = b"" if payload is None else encode(payload)
        dist.all_reduce(self._header(int(op), len(data), actions), group=self.group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self.group)

    def recv(self) -> None:
        import torch.distributed as dist

        from dscluster.engine.protocol import decode

        header = self._header()
        dist.all_reduce(header, group=self.group)
        if int(header[1]):
            buf = torch.empty(int(header[1]), dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group)
            decode(buf.numpy().tobytes())

    def agree_ok(self, ok: bool) -> int:
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.group)
        return int(flag.item())


def control(task: dict) -> None:
    """What rank 0 pays per unit on each channel, units back to back as the engine sends them: a
    heartbeat or a step is one message (on the sockets, its send waits for the workers' reports on
    the one before), a predict unit is its message and the agreement on its outcome. Blocks of
    `block` units take turns between the channels and the cases; the first unit of each block is
    not counted (on the sockets it reads reports left from the block before)."""
    import torch.distributed as dist

    from dscluster.cluster.group import init_groups, store_prefix
    from dscluster.engine.control_socket import open_link
    from dscluster.engine.protocol import ControlChannel, Op, decode, encode

    rdzv = discover()
    groups = init_groups(rdzv, "gloo")
    rank = groups.rank
    link = open_link(groups.store, f"{store_prefix()}/bench-control", rank, groups.world_size, rdzv.master_addr,
                     timeout=120, setup_timeout=120)
    channels = {"gloo": GlooControlChannel(dist.group.WORLD, rank), "socket": ControlChannel(link, rank)}
    cases = control_payloads()

    def unit(channel, op, payload, rows):
        actions = list(range(100, 100 + rows)) or None

        def run() -> None:
            channel.rows = [rows]           # one micro-batch
            if rank == 0:
                channel.send(op, payload, actions)
            else:
                channel.recv()
            if op is Op.PREDICT:
                channel.agree_ok(True)
            channel.rows = [0]
        return run

    units = {f"{kind}/{name}": unit(channel, *case)
             for name, case in cases.items() for kind, channel in channels.items()}
    header = torch.tensor([1, 0, 0], dtype=torch.int64)  # the bare primitives under the channels
    units["primitive/all_reduce_3xint64"] = lambda: dist.all_reduce(header.clone())
    units["primitive/broadcast_3xint64"] = lambda: dist.broadcast(header.clone(), src=0)
    units["primitive/socket_round_trip"] = (lambda: (link.broadcast([0]), link.gather())) if rank == 0 else \
        (lambda: (link.receive(), link.send([0])))

    block, rounds, warmup = task["block"], -(-task["reps"] // (task["block"] - 1)), task["warmup_rounds"]
    times: dict[str, list[int]] = {name: [] for name in units}
    order = list(units)
    for r in range(warmup + rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            fn = units[name]
            for i in range(block):
                t0 = time.perf_counter_ns()
                fn()
                if i and r >= warmup:
                    times[name].append(time.perf_counter_ns() - t0)
    if rank == 0:
        channels["socket"].send(Op.STOP)
    else:
        channels["socket"].recv()
    channels["socket"].close()
    report = {"rank": rank, "unit_ns": {k: v[:task["reps"]] for k, v in times.items()}}
    if rank == 0:  # the encoding alone, in this process
        report["encode_ns"], report["decode_ns"], report["encoded_bytes"] = {}, {}, {}
        for name, (_, payload, _) in cases.items():
            if payload is None:
                continue
            data = encode(payload)
            report["encoded_bytes"][name] = len(data)
            enc, dec = [], []
            for _ in range(task["reps"]):
                t0 = time.perf_counter_ns()
                encode(payload)
                t1 = time.perf_counter_ns()
                decode(data)
                t2 = time.perf_counter_ns()
                enc.append(t1 - t0)
                dec.append(t2 - t1)
            report["encode_ns"][name], report["decode_ns"][name] = enc, dec
    dist.barrier()
    write(report, task, rank)


# -- decoding speed -------------------------------------------------------------------------
def speed(task: dict) -> None:
    from dscluster.engine.api import GenerationRequest, SamplingParams

    runtime = build(task)
    runtime.eos_ids = ()  # a random model may emit EOS; every request must decode exactly max_tokens
    vocab = runtime.loaded.vocab_size
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=task["new_tokens"], temperature=0)
    requests = [GenerationRequest(tuple(torch.randint(4, vocab, (task["prompt_len"],), generator=g).tolist()), params)
                for _ in range(task["batch"])]

    def work(engine) -> dict:
        warm = [GenerationRequest(r.prompt_ids, SamplingParams(max_tokens=2, temperature=0)) for r in requests]
        engine.generate(warm)  # warm-up: first-call allocations, DeepSpeed's lazy set-up
        runs = []
        for _ in range(task["reps"]):
            steps: list[float] = []

            def on_token(i: int, _token: int) -> bool:
                if i == 0:
                    steps.append(time.perf_counter())
                return True

            t0 = time.perf_counter()
            results = engine.generate(requests, on_token)
            t1 = time.perf_counter()
            runs.append({"seconds": t1 - t0, "tokens": sum(len(r.token_ids) for r in results),
                         "prefill_seconds": steps[0] - t0,
                         "step_seconds": [b - a for a, b in zip(steps, steps[1:], strict=False)]})
        return {"runs": runs, "engine": runtime.model.engine, "world_size": runtime.world_size,
                "threads": torch.get_num_threads(), **held_bytes(runtime.model.module)}

    finish(runtime, {"rank": runtime.rank}, task, work)


def main() -> int:
    task = json.loads(Path(sys.argv[1]).read_text())
    {"memory": memory, "control": control, "speed": speed}[task["mode"]](task)
    return 0


if __name__ == "__main__":
    from dscluster.cluster.group import exit_now_if_joined

    raise SystemExit(exit_now_if_joined(main()))  # as the product does: no teardown abort

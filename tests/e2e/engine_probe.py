"""A rank program for engine tests: every rank builds the runtime; rank 0 runs the work in a JSON
file through the Engine (so every unit goes through the control channel to all ranks) and writes
the results as JSON. Started by the local launcher, torchrun or mpirun like any dscluster rank.

Work: `predict` (examples), `generate` (requests all submitted at once), `schedule` (requests
submitted at given steps: they join a running batch). `fail_step_of_request`: an injected fault,
on every rank, in the first step that computes that request (by submission order), to show that a
failed step drops the batch on every rank and the group goes on; `fail_stage` [rank, request]: the
same on one rank only, inside its pipeline stage's forward pass."""

import json
import os
import sys
import time

import torch

from dscluster.cluster.rendezvous import discover
from dscluster.engine import batch as batch_mod
from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.client import make_engine
from dscluster.engine.runtime import RuntimeOptions, build_runtime
from dscluster.engine.worker import run_worker
from dscluster.errors import EXIT_PEER_FAILED, PeerFailure


def local_parameter_count(module: torch.nn.Module) -> int:
    """Parameters this rank really holds: its ZeRO-3 partition, or its tensor-parallel shards."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def run_work(engine, work: dict) -> dict:
    out: dict = {"engine": engine.info.engine, "world_size": engine.info.world_size,
                 "local_params": local_parameter_count(engine.runtime.model.module),
                 "master_port": os.environ.get("MASTER_PORT")}
    dtype = engine.info.input_dtype
    if "predict" in work:
        outputs = engine.predict([torch.tensor(x, dtype=dtype) for x in work["predict"]])
        out["predict"] = [o.tolist() for o in outputs]
    if "generate" in work:
        requests = [GenerationRequest(tuple(g["prompt_ids"]), sampling_params(g.get("params", {})))
                    for g in work["generate"]]
        results = engine.generate(requests)
        out["generate"] = [{"token_ids": r.token_ids, "finish_reason": r.finish_reason,
                            "logprobs": logprob_values(r.logprobs),
                            "prompt_logprobs": logprob_values(r.prompt_logprobs)}
                           for r in results]
    if "schedule" in work:
        out["schedule"] = run_schedule(engine, work["schedule"])
    out["cache"] = cache_stats(engine)
    out["most_steps_in_flight"] = engine.most_steps_in_flight
    pipeline = engine.runtime.model.pipeline
    if pipeline is not None:
        out["handed_back"] = pipeline.handed_back
    return out


def cache_stats(engine) -> dict:
    """What the key/value pool did: the same decisions on one rank or many give the same counts."""
    stats = engine.generation_stats()
    return {"blocks": stats.num_blocks, "preemptions": stats.preemptions, "prefix_queries": stats.prefix_queries,
            "prefix_hits": stats.prefix_hits}


def sampling_params(params: dict) -> SamplingParams:
    """SamplingParams from JSON (lists where the dataclass holds tuples)."""
    fix = {"stop_token_ids": tuple, "logit_bias": lambda pairs: tuple(tuple(p) for p in pairs)}
    return SamplingParams(**{k: fix[k](v) if k in fix else v for k, v in params.items()})


def logprob_values(entries) -> list | None:
    """[token, logprob, [top token ids]] per entry (None stays None)."""
    if entries is None:
        return None
    return [None if e is None else [e.token, e.logprob, [t for t, _ in e.top]] for e in entries]


class Sink:
    def __init__(self):
        self.outcome = None
        self.cancelled = False

    def on_token(self, token: int, logprobs=None) -> bool:
        return True

    def on_prompt_logprobs(self, logprobs) -> None:
        pass                                        # in the result too

    def on_finish(self, result) -> None:
        self.outcome = {"token_ids": result.token_ids, "finish_reason": result.finish_reason}

    def on_error(self, error: BaseException) -> None:
        self.outcome = {"error": str(error)}


def run_schedule(engine, schedule: list[dict]) -> list[dict]:
    """Submit each request at its step ("arrive"), step until all are done."""
    sinks = [Sink() for _ in schedule]
    step = 0
    while any(s.outcome is None for s in sinks) or engine.has_generation_work():
        for entry, sink in zip(schedule, sinks):
            if entry["arrive"] == step:
                engine.submit(GenerationRequest(tuple(entry["prompt_ids"]), sampling_params(entry["params"])), sink)
        if engine.has_generation_work():
            engine.step()
        step += 1
    return [s.outcome for s in sinks]


def inject_step_fault(request_id: int) -> None:
    """Fail (once, on this rank) the first step that computes request `request_id`, before its forward."""
    original = batch_mod.RunningBatch._forward
    state = {"fired": False}

    def forward(self, rows, feed, chunk, micro_batch):
        if not state["fired"] and any(row.request_id == request_id for row in rows):
            state["fired"] = True
            raise RuntimeError("injected step failure")
        return original(self, rows, feed, chunk, micro_batch)

    batch_mod.RunningBatch._forward = forward


def inject_stage_fault(runtime, request_id: int) -> None:
    """Pipeline: fail (once, on this rank only) the forward pass of this rank's stage in the first
    step that computes request `request_id`, after the hand-over into the stage was received."""
    pipeline = runtime.model.pipeline
    target = pipeline.module if pipeline.layout.last else pipeline.base
    original, state = target.forward, {"fired": False}

    def forward(*args, **kwargs):
        if not state["fired"] and any(row.request_id == request_id for row in runtime.batch.rows):
            state["fired"] = True
            raise RuntimeError(f"injected stage failure on rank {runtime.rank}")
        return original(*args, **kwargs)

    target.forward = forward


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    options = RuntimeOptions(**spec["options"])
    if "fail_step_of_request" in spec:
        inject_step_fault(spec["fail_step_of_request"])
    runtime = build_runtime(options, discover())
    with open(f"{spec['output']}.rank{runtime.rank}", "w") as f:  # what this rank holds
        json.dump({"local_params": local_parameter_count(runtime.model.module)}, f)
    if spec.get("fail_stage", [None])[0] == runtime.rank:
        inject_stage_fault(runtime, spec["fail_stage"][1])
    if runtime.rank != 0:
        return run_worker(runtime)
    engine = make_engine(runtime)
    if spec.get("ready_file"):
        open(spec["ready_file"], "w").close()
    time.sleep(spec.get("hold_seconds", 0))  # idle: only heartbeats cross the control channel
    try:
        result = run_work(engine, spec["work"])
    except PeerFailure:
        # As `dscluster serve` does: stay until the engine exits 3 by itself, once the liveness
        # monitor has named the rank that is gone.
        time.sleep(options.heartbeat_timeout * 3)
        return EXIT_PEER_FAILED
    finally:
        engine.shutdown()
    with open(spec["output"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    from dscluster.cluster.group import exit_now_if_joined

    try:
        code = main()
    except PeerFailure as exc:  # as the command line does
        print(f"dscluster: peer failure: {exc}", file=sys.stderr)
        code = EXIT_PEER_FAILED
    raise SystemExit(exit_now_if_joined(code))  # as the product does: no teardown abort

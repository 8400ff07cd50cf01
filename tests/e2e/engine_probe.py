"""A rank program for engine tests: every rank builds the runtime; rank 0 runs the work in a JSON
file through the Engine (so every unit goes through the control channel to all ranks) and writes
the results as JSON. Started by the local launcher, torchrun or mpirun like any dscluster rank."""

import json
import os
import sys
import time

import torch

from dscluster.cluster.rendezvous import discover
from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.runtime import RuntimeOptions, build_runtime, make_engine, run_worker


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
        requests = [GenerationRequest(tuple(g["prompt_ids"]), SamplingParams(**g.get("params", {})))
                    for g in work["generate"]]
        results = engine.generate(requests)
        out["generate"] = [{"token_ids": r.token_ids, "finish_reason": r.finish_reason} for r in results]
    return out


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    options = RuntimeOptions(**spec["options"])
    runtime = build_runtime(options, discover())
    if runtime.rank != 0:
        return run_worker(runtime)
    engine = make_engine(runtime)
    if spec.get("ready_file"):
        open(spec["ready_file"], "w").close()
    time.sleep(spec.get("hold_seconds", 0))  # idle: only heartbeats cross the control channel
    try:
        result = run_work(engine, spec["work"])
    finally:
        engine.shutdown()
    with open(spec["output"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    from dscluster.cluster.group import exit_now_if_joined

    raise SystemExit(exit_now_if_joined(main()))  # as the product does: no teardown abort

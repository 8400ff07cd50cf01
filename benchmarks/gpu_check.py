"""The GPU check (`make gpu-check`; scripts/gpu-check.sh prepares the environment, then runs this).

Real servers, real clients, the tiny Llama of `dscluster tiny-model` (written here, nothing
downloaded), each server alone:

| server | what it proves |
| --- | --- |
| 1 rank on the CPU, float32 (`--backend gloo`, GPUs hidden) | the reference |
| 1 GPU, float32 | greedy tokens identical to the CPU's; seeded sampling repeats; streaming |
| 1 GPU, bfloat16 | the same requests run; how many greedy tokens agree with float32 (reported) |
| 1 GPU, `dscluster.examples.linear:build_mlp` | `/v1/predict` and `/predict` equal the module on the CPU |
| 2 ranks, `--engine tp`, float32 (where 2 GPUs exist) | greedy tokens identical to the CPU's |
| 2 ranks, `--pp 2`, float32 (where 2 GPUs exist) | the pipeline's NCCL hand-overs: greedy tokens identical to the CPU's |

and, for each generation server, the time to first token and per output token of one streamed
request at a time. Then the GPU tests (`pytest tests/test_gpu.py tests/test_gpu_paths.py`). It
prints a table and writes benchmarks/results/gpu_check.json.

Greedy tokens are compared as the streamed text, piece by piece as the server sent it (the HTTP
API gives text, not token ids): equal tokens give equal pieces. tests/test_gpu.py compares token
ids in-process as well. Time per output token is (last piece - first piece) / (tokens - 1).

`--device cpu` runs every check with the CPU in place of the GPUs (`--backend gloo`, GPUs
hidden; tp over 2 CPU ranks): the orchestration proven where no GPU is, written elsewhere
(benchmarks/results/quick/) so it never replaces a GPU run's results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, Server, machine, table, write_json

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [[1, 614, 15, 591, 4, 788, 366, 473], [1, 20, 30], [1, *range(500, 540)]]
MAX_TOKENS = 32
TIMED_TOKENS = 64
TIMED_RUNS = 5
PREDICT_INPUTS = [[0.1 * i for i in range(10)], [1.0] * 10, [-0.5 + 0.1 * i for i in range(10)]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run every check with the CPU standing in for the GPUs (a dry run)")
    parser.add_argument("--out", type=Path, help="the JSON results (default benchmarks/results/gpu_check.json; "
                        "with --device cpu, benchmarks/results/quick/gpu_check.json)")
    parser.add_argument("--pytest", action=argparse.BooleanOptionalAction, default=None,
                        help="run the GPU tests too (default: on a GPU, yes; with --device cpu, no)")
    parser.add_argument("--timed-runs", type=int, default=TIMED_RUNS,
                        help=f"streamed requests timed per server, after a warm-up (default {TIMED_RUNS}; the "
                             "test suite's dry run times 1: it proves the orchestration, not the figures)")
    args = parser.parse_args(argv)
    out = args.out or (RESULTS / "gpu_check.json" if args.device == "cuda" else RESULTS / "quick" / "gpu_check.json")
    gpus = visible_gpus() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus == 0:
        print("gpu-check: torch sees no CUDA GPU on this machine; nothing to check")
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dscluster-gpu-check-") as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(model), "--seed", "0"],
                       check=True, capture_output=True, timeout=300)
        check = GpuCheck(args.device, gpus, model, timed_runs=max(1, args.timed_runs))
        check.run()
    run_tests = args.pytest if args.pytest is not None else args.device == "cuda"
    tests = pytest_gpu(args.device) if run_tests else None
    result = {
        "benchmark": "gpu_check",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "gpus": gpus,
        "gpu": gpu_name() if gpus else None,
        "cuda": cuda_version(),
        "machine": machine(),
        "checks": check.checks,
        "timings": check.timings,
        "bfloat16_greedy_agreement": check.bfloat16_agreement,
        "pytest": tests,
        "seconds": round(time.monotonic() - started, 1),
    }
    result["ok"] = all(c["ok"] for c in check.checks) and (tests is None or tests["returncode"] == 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(report(result))
    print(f"\nwritten: {out}")
    return 0 if result["ok"] else 1


# -- the host ----------------------------------------------------------------------------------


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def cuda_version() -> str | None:
    import torch

    return torch.version.cuda


# -- the checks ------------------------------------------------------------------------------------


class GpuCheck:
    def __init__(self, device: str, gpus: int, model: Path, timed_runs: int = TIMED_RUNS):
        self.device, self.gpus, self.model, self.timed_runs = device, gpus, model, timed_runs
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.bfloat16_agreement: float | None = None  # greedy text agreeing with float32, to the first difference

    def record(self, name: str, ok: bool, detail: str, **data) -> None:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail, **data})
        print(f"gpu-check: {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def server(self, name: str, *args: str, ranks: int = 1, cpu: bool = False, model: str | None = None):
        """`dscluster serve` on this check's device (`cpu`: the CPU reference, whatever the device)."""
        from dscluster.cluster.launch import free_port

        on_cpu = cpu or self.device == "cpu"
        env = {"HF_HUB_OFFLINE": "1"}
        if on_cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
            args = (*args, "--backend", "gloo")
        port = free_port()
        cmd = [sys.executable, "-m", "dscluster", "serve", model or str(self.model), "--nproc", str(ranks),
               "--port", str(port), "--log-level", "WARNING", *args]
        return Server(cmd, port, "/health/ready", env)

    def run(self) -> None:
        """Every check; a server that fails to start or answer fails its checks, and the rest go on."""
        where = "cpu" if self.device == "cpu" else "1 GPU"
        reference = self.attempt("cpu float32 (reference)", lambda name: self.generation_server(
            name, ranks=1, dtype="float32", cpu=True))
        fp32 = self.attempt(f"{where} float32", lambda name: self.generation_server(
            name, ranks=1, dtype="float32", sampled=True))
        self.same_greedy("float32 greedy = cpu", fp32, reference)
        bf16 = self.attempt(f"{where} bfloat16", lambda name: self.generation_server(
            name, ranks=1, dtype="bfloat16", sampled=True))
        if bf16 and fp32:  # reported, not required: bfloat16 rounds differently
            self.bfloat16_agreement = round(agreement(bf16["greedy"], fp32["greedy"]), 3)
        self.attempt(f"{where} import spec", self.predict_server)
        if self.gpus >= 2 or self.device == "cpu":
            tp = self.attempt(f"{'2 cpu ranks' if self.device == 'cpu' else '2 GPUs'} tp float32",
                              lambda name: self.generation_server(name, ranks=2, dtype="float32", engine="tp"))
            self.same_greedy("tp=2 float32 greedy = cpu", tp, reference)
            pp = self.attempt(f"{'2 cpu ranks' if self.device == 'cpu' else '2 GPUs'} pp float32",
                              lambda name: self.generation_server(name, ranks=2, dtype="float32", pp=2))
            self.same_greedy("pp=2 float32 greedy = cpu", pp, reference)
        else:
            for what in ("tp=2", "pp=2"):
                self.record(what, True, f"skipped: {self.gpus} GPU visible, {what} needs 2 (NCCL takes one rank "
                            "per GPU)", skipped=True)

    def attempt(self, name: str, check):
        try:
            return check(name)
        except Exception as exc:  # noqa: BLE001 - recorded as this server's failure; the others still run
            self.record(f"{name}: server", False, f"{type(exc).__name__}: {str(exc)[-1500:]}")
            return None

    def same_greedy(self, name: str, got: dict | None, reference: dict | None) -> None:
        if got is None or reference is None:
            self.record(name, False, "no result to compare (a server failed)")
            return
        same = got["greedy"] == reference["greedy"]
        self.record(name, same, "identical greedy text on every prompt" if same
                    else f"differs on prompts {differing(got['greedy'], reference['greedy'])}")

    def generation_server(self, name: str, ranks: int, dtype: str, engine: str | None = None, cpu: bool = False,
                          sampled: bool = False, pp: int = 1) -> dict:
        import httpx

        args = ["--dtype", dtype] + (["--engine", engine] if engine else []) + (["--pp", str(pp)] if pp > 1 else [])
        server = self.server(name, *args, ranks=ranks, cpu=cpu)
        try:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                streams = [stream(client, {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                                           "ignore_eos": True}) for p in PROMPTS]
                greedy = [s["pieces"] for s in streams]
                counted = all(s["tokens"] == MAX_TOKENS for s in streams)
                self.record(f"{name}: greedy streams", counted,
                            f"{len(PROMPTS)} streamed completions of {MAX_TOKENS} tokens each, ending in [DONE]"
                            if counted else f"token counts {[s['tokens'] for s in streams]}")
                if sampled:
                    self.sampled(client, name)
                self.timings.append(dict(server=name, ranks=ranks, dtype=dtype,
                                         engine=f"pp={pp}" if pp > 1 else engine or "replicated",
                                         **timing(client, self.timed_runs)))
        finally:
            server.stop()
        return {"greedy": greedy}

    def sampled(self, client, name: str) -> None:
        body = {"prompt": "The model", "max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 1234,
                "ignore_eos": True}
        first = client.post("/v1/completions", json=body)
        again = client.post("/v1/completions", json=body)
        other = client.post("/v1/completions", json={**body, "seed": 4321})
        codes = [first.status_code, again.status_code, other.status_code]
        ok = codes == [200, 200, 200] and first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]
        self.record(f"{name}: seeded sampling", ok, "temperature 0.8, top_p 0.95: the same seed gives the same "
                    "text again" if ok else f"answers {codes}: {first.text[:200]}")

    def predict_server(self, name: str) -> None:
        import httpx
        import torch

        from dscluster.examples.linear import build_mlp

        with torch.no_grad():
            want = build_mlp()(torch.tensor(PREDICT_INPUTS)).tolist()
        server = self.server(name, model="dscluster.examples.linear:build_mlp")
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                batch = client.post("/v1/predict", json={"inputs": PREDICT_INPUTS})
                single = client.post("/predict", json=PREDICT_INPUTS[0])
        finally:
            server.stop()
        ok = batch.status_code == 200 and single.status_code == 200
        error = 0.0
        if ok:
            got = batch.json()["outputs"]
            error = max(abs(a - b) for row, ref in zip(got, want, strict=True) for a, b in zip(row, ref, strict=True))
            ok = error < 1e-4 and len(single.json()["result"]) == len(want[0])
        self.record(f"{name}: /v1/predict", ok, f"{len(PREDICT_INPUTS)} examples, largest difference from the "
                    f"module on the CPU {error:.2e}" if batch.status_code == 200 else f"answered {batch.status_code}: "
                    f"{batch.text[:200]}", max_abs_error=error)


def stream(client, body: dict) -> dict:
    """One streamed completion: its text pieces (as the server sent them), its token count (the
    usage chunk) and when the pieces arrived."""
    pieces, times, tokens, done = [], [], None, False
    sent = time.monotonic()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"completion answered {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    pieces.append(choice["text"])
                    times.append(time.monotonic())
    if not done:
        raise RuntimeError("the stream ended without data: [DONE]")
    return {"pieces": pieces, "tokens": tokens, "ttft": times[0] - sent if times else None,
            "tpot": (times[-1] - times[0]) / (tokens - 1) if times and tokens and tokens > 1 else None}


def timing(client, runs: int = TIMED_RUNS) -> dict:
    """Time to first token and per output token, one streamed request at a time (after a warm-up)."""
    body = {"prompt": PROMPTS[0], "max_tokens": TIMED_TOKENS, "temperature": 0, "ignore_eos": True}
    stream(client, {**body, "max_tokens": 4})
    timed = [stream(client, body) for _ in range(runs)]
    return {"ttft_ms": round(1000 * statistics.median(r["ttft"] for r in timed), 2),
            "tpot_ms": round(1000 * statistics.median(r["tpot"] for r in timed), 2),
            "tokens": TIMED_TOKENS, "runs": runs}


def agreement(a: list[list[str]], b: list[list[str]]) -> float:
    """The share of greedy tokens that agree, up to each prompt's first difference."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += len(y)
        for p, q in zip(x, y, strict=False):
            if p != q:
                break
            same += 1
    return same / total if total else 0.0


def differing(a: list[list[str]], b: list[list[str]]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def pytest_gpu(device: str) -> dict:
    """The GPU tests, as plain pytest (on the CPU standing in for the GPU with --device cpu)."""
    env = dict(os.environ, DSCLUSTER_GPU_TESTS="1")
    if device == "cpu":
        env.update(DSCLUSTER_GPU_TESTS_ON_CPU="1", DSCLUSTER_GPU_TESTS="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_gpu.py", "tests/test_gpu_paths.py"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    print(proc.stdout[-3000:], flush=True)
    return {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "summary": lines[-1] if lines else "",
            "skipped": [line for line in lines if line.startswith("SKIPPED")],
            "seconds": round(time.monotonic() - started, 1)}


def report(result: dict) -> str:
    where = result["gpu"] or "the CPU standing in for the GPU"
    lines = [f"gpu-check on {where} ({result['gpus']} GPU(s), torch {result['machine']['torch']}, "
             f"CUDA {result['cuda']}), {result['seconds']:.0f} s: {'ALL PASS' if result['ok'] else 'FAILED'}", ""]
    lines.append(table(["check", "result", "detail"],
                       [[c["name"], "SKIP" if c.get("skipped") else ("PASS" if c["ok"] else "FAIL"), c["detail"]]
                        for c in result["checks"]]))
    lines += ["", table(["server", "ranks", "dtype", "engine", "time to first token (ms)", "per output token (ms)"],
                        [[t["server"], t["ranks"], t["dtype"], t["engine"], t["ttft_ms"], t["tpot_ms"]]
                         for t in result["timings"]])]
    if result["bfloat16_greedy_agreement"] is not None:
        lines += ["", f"bfloat16 greedy text agreeing with float32 (to each prompt's first difference; reported, "
                  f"not required): {result['bfloat16_greedy_agreement']:.0%}"]
    if result["pytest"] is not None:
        lines += ["", f"GPU tests ({result['pytest']['command']}): {result['pytest']['summary']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

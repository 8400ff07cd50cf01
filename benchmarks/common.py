"""Helpers shared by the benchmarks: statistics, the benchmark models, and starting rank programs
through the product's own local launcher (the way users run it)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DSCLUSTER_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
RANKS = Path(__file__).resolve().with_name("ranks.py")

# The models: `dscluster tiny-model` defaults, and the same architecture grown to ~100M parameters
# (10 layers of width 768 with a 4096-token vocabulary: 100.7M); for memory, 541M parameters
# (2.0 GiB in float32) as ten files of at most 256 MB (the largest 1/8.6 of the model) and as one
# file; and a negligible model with 4 heads (width 256, 2.4M parameters), the fixed cost of a rank
# in every configuration up to tp=4.
MODELS = {
    "tiny": [],
    "llama-100m": ["--layers", "10", "--hidden", "768", "--vocab-size", "4096"],
    "llama-540m": ["--layers", "8", "--hidden", "2048", "--max-shard-size", "256MB"],
    "llama-540m-1file": ["--layers", "8", "--hidden", "2048"],
    "negligible": ["--hidden", "256"],
}


def model_dir(name: str) -> Path:
    """Write the model once (deterministic for its seed) and reuse it across runs."""
    path = CACHE / name
    if not (path / "dscluster.json").exists():  # written last
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "dscluster", "tiny-model", str(path), "--seed", "0", *MODELS[name]],
                       check=True, capture_output=True, timeout=600)
    return path


def stats(samples: list[float]) -> dict:
    """Median and tail of a list of timings (any unit): noisy machines need percentiles, not means."""
    xs = sorted(samples)
    if not xs:
        return {"n": 0}

    def pct(q: float) -> float:
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"n": len(xs), "p50": statistics.median(xs), "p90": pct(0.90), "p99": pct(0.99),
            "min": xs[0], "mean": statistics.fmean(xs)}


def launch_ranks(task: dict, nproc: int, threads: int, timeout: float = 900) -> list[dict]:
    """Run `ranks.py` with `task` as `nproc` local ranks (`dscluster launch`), each with `threads`
    OpenMP threads. Returns every rank's JSON report, in rank order."""
    with tempfile.TemporaryDirectory(prefix="dscluster-bench-") as tmp:
        task = dict(task, out_dir=tmp)
        spec = Path(tmp) / "task.json"
        spec.write_text(json.dumps(task))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=_pythonpath())
        # DeepSpeed's compiled all-reduce op, cached apart from other checkouts' (whose different
        # ninja or Python would otherwise make every run compile it again, minutes on 2 cores)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
        env.pop("MASTER_PORT", None)
        cmd = [sys.executable, "-m", "dscluster", "launch", "--nproc", str(nproc), "--",
               sys.executable, str(RANKS), str(spec)]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{task['mode']} on {nproc} rank(s) failed ({proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        reports = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]
        for report in reports:
            report["launch_seconds"] = round(time.monotonic() - started, 1)
        return reports


def _pythonpath() -> str:
    parts = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def machine() -> dict:
    """What the numbers were measured on, recorded with them."""
    import platform

    import torch

    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "load_avg_1min_at_start": load_avg()}


def load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


_warmed = False


def warm_up_deepspeed() -> None:
    """DeepSpeed compiles its shared-memory all-reduce op on first use (about 50 s, then cached):
    one tp=2 run of the tiny model, so that no measured run pays for it."""
    global _warmed
    if not _warmed:
        launch_ranks({"mode": "memory", "model": str(model_dir("tiny")), "engine": "tp"}, nproc=2, threads=1)
        _warmed = True


def pyplot():
    """matplotlib with the file-only backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MIB = 1024 * 1024


def mib(n: float) -> float:
    return round(n / MIB, 1)


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Server:
    """One server in its own session (process group), its output kept in a temporary file; ready
    when its readiness route answers 200, stopped with SIGTERM (SIGKILL if it does not exit)."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, env: dict[str, str] | None = None,
                 start_timeout: float = 600):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.url}{ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{cmd} not ready in time: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def scrape_metrics(url: str, names: list[str]) -> dict[str, float | None]:
    """The server's own account of a run from its Prometheus page (`GET /metrics`): each name's
    samples summed over their labels, None for a name the server does not export (or no page)."""
    import httpx

    out: dict[str, float | None] = dict.fromkeys(names)
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        name = sample.split("{", 1)[0]
        if name in out:
            try:
                out[name] = (out[name] or 0.0) + float(value)
            except ValueError:
                pass
    return out


def corpus_words() -> list[str]:
    """The words of the package's own corpus (what `dscluster tiny-model` trains its tokenizer on),
    so prompts are made here from a seeded generator and nothing is downloaded."""
    from importlib import resources

    return resources.files("dscluster.data").joinpath("corpus.txt").read_text(encoding="utf-8").split()


def words_for_tokens(tokenizer, rng, words: list[str], tokens: int) -> tuple[str, int]:
    """Words drawn by `rng` until the model's own tokenizer counts at least `tokens` tokens (a few
    more at most): (the text, its token count without special tokens). Counted, not estimated,
    because words per token depend on the tokenizer."""
    pieces: list[str] = []
    count = 0
    while count < tokens:
        # Every word is at least one token, so half the missing count never overshoots by much;
        # a few rounds converge instead of re-tokenizing after every word.
        pieces += [rng.choice(words) for _ in range(max(1, (tokens - count) // 2))]
        count = len(tokenizer(" ".join(pieces), add_special_tokens=False)["input_ids"])
    return " ".join(pieces), count

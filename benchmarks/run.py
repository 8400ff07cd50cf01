"""Run the benchmarks: `python -m benchmarks.run [--only NAME ...] [--quick] [--out DIR]`.

Each benchmark is a module with `run(out_dir, quick) -> dict` (its results, also written as
OUT/NAME.json next to its plots) and `summary(result) -> str` (Markdown). To add one, write the
module and list it in BENCHMARKS. A full run also refreshes results/summary.md and the numbers in
benchmarks/README.md; `--quick` writes to results/quick/ so it never replaces the committed numbers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
from pathlib import Path

from benchmarks.common import machine, write_json

BENCHMARKS = {
    "control_message": "benchmarks.control_message",
    "engine_memory": "benchmarks.engine_memory",
    "engine_speed": "benchmarks.engine_speed",
    "serving": "benchmarks.serving",
    "decode_paths": "benchmarks.decode_paths",
    "generation": "benchmarks.generation",
    "prefix_cache": "benchmarks.prefix_cache",
    "kv_memory": "benchmarks.kv_memory",
    "kv_generation": "benchmarks.kv_generation",
    "structured_output": "benchmarks.structured_output",
    "pipeline": "benchmarks.pipeline",
}
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def summary_markdown(out_dir: Path) -> str:
    """One section per benchmark whose results are in out_dir, in registry order."""
    parts = []
    for name, module_name in BENCHMARKS.items():
        path = out_dir / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        module = importlib.import_module(module_name)
        when = result.get("date", "")[:10]
        parts.append(f"### {name}\n\n{module.summary(result)}\n\n"
                     f"_{when}, {'quick run' if result.get('quick') else 'full run'}, "
                     f"{result['seconds']:.0f} s, machine load (1 min) {result['machine'].get('load_avg_1min_at_start')} "
                     f"at start._\n")
    return "\n".join(parts)


def update_readme(text: str) -> None:
    if not README.exists():
        return
    readme = README.read_text()
    if MARK_START in readme and MARK_END in readme:
        head, rest = readme.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        README.write_text(f"{head}{MARK_START}\n{text}\n{MARK_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only this (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and the small model only")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        started, info = time.monotonic(), machine()
        try:
            result = importlib.import_module(BENCHMARKS[name]).run(out_dir, args.quick)
        except Exception as exc:  # noqa: BLE001 - report it, run the others, exit non-zero
            print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        result = {"benchmark": name, "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "machine": info, **result}
        write_json(out_dir / f"{name}.json", result)
        print(importlib.import_module(BENCHMARKS[name]).summary(result), flush=True)
    text = summary_markdown(out_dir)
    (out_dir / "summary.md").write_text(text)
    if out_dir.resolve() == RESULTS.resolve():
        update_readme(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

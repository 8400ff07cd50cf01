"""`dscluster batch`: a JSONL file of requests through the split model, one JSONL result per request.

Every request goes through the same application the HTTP server runs, in-process (no socket):
the same validation, the same batching across ranks, the same response bodies. So a batch run
answers exactly what the server would. Results are written as they finish and flushed; a re-run
with the same output file skips the ids already there, so a killed job loses at most what was in
flight.

Input lines: OpenAI batch requests `{"custom_id", "method": "POST", "url", "body"}` (url one of
ROUTES), or plain `/v1/predict` bodies with an id: `{"id": "a", "inputs": [...]}`.
Output lines: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dscluster.errors import EXIT_RUNTIME, PeerFailure, UsageError

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/predict")
TRANSIENT = (429, 503, 504)  # the group or queue failed, not the request: never written as done


@dataclass
class BatchLine:
    number: int                    # 1-based line number in the input file
    custom_id: str
    url: str | None = None
    body: dict | None = None
    problem: str | None = None     # why the line cannot be run; reported in its `error`


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0               # already in the output (resume)
    succeeded: int = 0
    failed: int = 0
    retry: int = 0                 # transient failures, left for a re-run
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        took = time.monotonic() - self.started
        done = self.succeeded + self.failed
        rate = done / took if took > 0 else 0.0
        return (f"batch: {done} run ({self.succeeded} ok, {self.failed} failed), {self.skipped} already done, "
                f"{took:.1f} s, {rate:.1f} requests/s")


def check_batch_files(input_path: str, output_path: str) -> None:
    """Fail before any rank loads the model: the input must be readable, the output writable."""
    src = Path(input_path)
    if not src.is_file():
        raise UsageError(f"--input {input_path!r}: no such file")
    if not os.access(src, os.R_OK):
        raise UsageError(f"--input {input_path!r} is not readable")
    out = Path(output_path)
    if out.is_dir():
        raise UsageError(f"--output {output_path!r} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"--output {output_path!r}: directory {str(parent)!r} does not exist")
    if (out.exists() and not os.access(out, os.W_OK)) or (not out.exists() and not os.access(parent, os.W_OK)):
        raise UsageError(f"--output {output_path!r} is not writable")
    if out.resolve() == src.resolve():
        raise UsageError("--output must not be the --input file")


def parse_line(number: int, text: str) -> BatchLine:
    """One input line → what to run, or the problem with it (never an exception)."""
    fallback_id = f"line-{number}"
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, _NonFinite) as exc:
        return BatchLine(number, fallback_id, problem=f"line {number}: not valid JSON ({exc})")
    if not isinstance(obj, dict):
        return BatchLine(number, fallback_id, problem=f"line {number}: expected a JSON object")
    if "url" in obj or "body" in obj or "custom_id" in obj:
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return BatchLine(number, fallback_id, problem=f"line {number}: custom_id must be a non-empty string")
        method = obj.get("method", "POST")
        url = obj.get("url")
        if method != "POST":
            return BatchLine(number, custom_id, problem=f"line {number}: method {method!r} is not POST")
        if url not in ROUTES:
            return BatchLine(number, custom_id, problem=f"line {number}: url {url!r} is not one of {', '.join(ROUTES)}")
        if not isinstance(obj.get("body"), dict):
            return BatchLine(number, custom_id, problem=f"line {number}: body must be a JSON object")
        return BatchLine(number, custom_id, url=url, body=obj["body"])
    if "inputs" in obj:
        line_id = obj.get("id")
        if not isinstance(line_id, (str, int)) or isinstance(line_id, bool) or line_id == "":
            return BatchLine(number, fallback_id, problem=f"line {number}: a predict line needs an \"id\" (string or integer)")
        body = {k: v for k, v in obj.items() if k != "id"}
        return BatchLine(number, str(line_id), url="/v1/predict", body=body)
    return BatchLine(number, fallback_id,
                     problem=f"line {number}: neither an OpenAI batch request (custom_id, url, body) "
                             "nor a predict body with id and inputs")


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise _NonFinite(f"{name} is not a finite number")


def read_done_ids(output: Path) -> set[str]:
    """Ids already answered in `output`. A last line cut short by a kill is removed first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: removing an incomplete last line left by an interrupted run", output)
        with open(output, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            done.add(str(json.loads(raw)["custom_id"]))
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--output {str(output)!r} line {number} is not a dscluster batch result; "
                             "choose another output file") from None
    return done


def iter_lines(path: Path) -> Iterator[BatchLine]:
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            line = parse_line(number, text)
            if line.problem is None:
                if line.custom_id in seen:
                    line = BatchLine(number, f"line-{number}",
                                     problem=f"line {number}: id {line.custom_id!r} already used on line "
                                             f"{seen[line.custom_id]}")
                else:
                    seen[line.custom_id] = number
            yield line


def result_record(line: BatchLine, status: int | None, body: dict | None) -> dict:
    """The OpenAI batch output shape; request failures also carry their message in `error`."""
    error = None
    if line.problem is not None:
        error = {"code": "invalid_request_line", "message": line.problem}
    elif status is not None and status >= 400:
        detail = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        error = {"code": detail.get("code") or str(status),
                 "message": f"line {line.number}: {detail.get('message') or f'HTTP {status}'}"}
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.custom_id, "response": response,
            "error": error}


class Progress:
    """A progress bar on a terminal; plain lines every few seconds in logs."""

    def __init__(self, total: int | None):
        self.bar = None
        self.last = time.monotonic()
        self.count = 0
        self.total = total
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", desc="batch", file=sys.stderr)

    def update(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self.last >= 5:
            self.last = time.monotonic()
            print(f"batch: {self.count}/{self.total} done", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(engine, args) -> int:
    """Rank 0's side of `dscluster batch` (the other ranks run the worker loop meanwhile)."""
    return asyncio.run(_run(engine, args))


async def _run(engine, args) -> int:
    import httpx

    from dscluster.serving.app import create_app
    from dscluster.serving.server import config_from_args

    output = Path(args.output)
    done = read_done_ids(output)
    todo = sum(1 for line in iter_lines(Path(args.input)) if line.custom_id not in done)
    summary = Summary(skipped=len(done))
    # Enough requests in flight to fill every predict batch and every generation step.
    window = max(2, 2 * max(args.max_batch_size, args.max_num_seqs))
    app = create_app(engine, config_from_args(args))
    progress = Progress(todo)
    limit = asyncio.Semaphore(window)
    transport = httpx.ASGITransport(app=app)
    with open(output, "a", encoding="utf-8") as out:

        def write(record: dict, ok: bool) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()
            summary.succeeded += ok
            summary.failed += not ok
            progress.update()

        async def one(client: httpx.AsyncClient, line: BatchLine) -> None:
            try:
                reply = await client.post(line.url, json=line.body)
                try:
                    body = reply.json()
                except ValueError:
                    body = {"error": {"message": reply.text[:500], "type": "server_error", "code": None}}
                if reply.status_code in TRANSIENT:
                    summary.retry += 1  # not written: a re-run with the same output retries it
                else:
                    write(result_record(line, reply.status_code, body), ok=reply.status_code < 400)
            finally:
                limit.release()

        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://batch",
                                         timeout=None, headers=_auth_header(args)) as client:
                in_flight: set[asyncio.Task] = set()
                for line in iter_lines(Path(args.input)):
                    if line.custom_id in done:
                        continue
                    if line.problem is not None:
                        write(result_record(line, None, None), ok=False)
                        continue
                    await limit.acquire()
                    task = asyncio.create_task(one(client, line))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.gather(*in_flight)
    progress.close()
    print(summary.line(), file=sys.stderr, flush=True)
    if engine.failure:
        raise PeerFailure(engine.failure)
    if summary.retry:
        print(f"batch: {summary.retry} request(s) not run (server busy or group broken): run the same "
              "command again to finish them", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def _auth_header(args) -> dict[str, str]:
    key = getattr(args, "api_key", None)
    return {"Authorization": f"Bearer {key}"} if key else {}

"""Tensor routes: POST /v1/predict ({"inputs": ...} -> {"outputs": [...]}) and the seeds' POST /predict
(a JSON list of floats -> {"result": ...}).

Inputs are checked completely on rank 0 (regular nesting, numbers only, finite, the model's
per-example shape, token ids inside the vocabulary) before anything reaches the other ranks:
a batch of mismatched shapes would make ranks disagree about what they execute.

These routes carry every request of a tensor model, so they are lean: plain ASGI handlers that the
application calls before FastAPI's middleware and routing (`app.ServingApp`), a body parsed by
orjson into one numpy array with no Python step per number, outputs written by orjson from numpy.
An input that is not a plain regular array of finite numbers goes to the exact checker
(`nested_shape`), which names the element at fault: both paths accept the same inputs, and every
error message comes from one place.
"""

from __future__ import annotations

import asyncio
import logging
import math

import numpy as np
import orjson
import torch

from dscluster.engine.api import ModelInfo
from dscluster.serving.batcher import WorkItem, predict_key
from dscluster.serving.protocol import (
    APIError,
    ClientGone,
    PredictRequest,
    bad_request,
    error_body,
    parse_json,
    parse_model,
    read_body,
)
from dscluster.serving.state import ServerState, wait_items

log = logging.getLogger(__name__)

MAX_DIMS = 8
# Input dtypes numpy converts to exactly as torch does; others (bfloat16, float16) go through torch.
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def nested_shape(value, path: str = "inputs", depth: int = 0) -> tuple[int, ...]:
    """The shape of a regular nested list of numbers; a 400 naming the first element that is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise bad_request(f"{path} is {type(value).__name__ if value is not None else 'null'}; expected a number "
                          "or a list of numbers", param="inputs")
    if not isinstance(value, list):
        if isinstance(value, float) and not math.isfinite(value):
            raise bad_request(f"{path} is {value}: only finite numbers are accepted", param="inputs")
        return ()
    if depth >= MAX_DIMS:
        raise bad_request(f"{path} nests deeper than {MAX_DIMS} levels", param="inputs")
    if not value:
        raise bad_request(f"{path} is an empty list", param="inputs")
    if all(v.__class__ is float or v.__class__ is int for v in value):  # the common case, fast
        if not all(math.isfinite(v) for v in value):
            bad = next(i for i, v in enumerate(value) if not math.isfinite(v))
            raise bad_request(f"{path}[{bad}] is {value[bad]}: only finite numbers are accepted", param="inputs")
        return (len(value),)
    first = nested_shape(value[0], f"{path}[0]", depth + 1)
    for i in range(1, len(value)):
        shape = nested_shape(value[i], f"{path}[{i}]", depth + 1)
        if shape != first:
            raise bad_request(f"{path}[{i}] has shape {list(shape)} but {path}[0] has {list(first)}: "
                              "inputs must be a regular nested list", param="inputs")
    return (len(value), *first)


def plain_array(inputs: list, raw: bytes) -> np.ndarray | None:
    """`inputs` (parsed from the body `raw`) as one numeric array, when it is the plain case: a
    regular nested list of finite numbers, at most MAX_DIMS deep, no empty list. None otherwise.

    numpy reads JSON's true and false as 1 and 0, so a body that holds either is never plain
    (a valid tensor body holds nothing but numbers)."""
    if b"true" in raw or b"false" in raw:
        return None
    try:
        array = np.array(inputs)
    except (ValueError, OverflowError):  # ragged nesting; an integer numpy cannot hold
        return None
    if array.dtype.kind not in "if" or array.size == 0 or array.ndim > MAX_DIMS:
        return None  # strings, nulls, objects, unsigned (past int64); empty lists
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return None
    return array


def _has_float(value) -> bool:
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return isinstance(value, float) and not value.is_integer()


def _examples_shape(shape: tuple[int, ...], info: ModelInfo, max_examples: int) -> tuple[tuple[int, ...], bool]:
    """(batch shape, was_batch) for inputs of `shape`: one example or a batch of the model's shape."""
    token_ids = info.input_dtype in (torch.long, torch.int32, torch.int64)
    example_dims = len(info.input_shape) if info.input_shape is not None else 1
    if len(shape) == example_dims:
        batched, shape = False, (1, *shape)
    elif len(shape) == example_dims + 1:
        batched = True
    else:
        expected = f"{list(info.input_shape)}" if info.input_shape is not None else (
            "[tokens]" if token_ids else "[features]")
        raise bad_request(f"inputs has shape {list(shape)}; this model takes one example of shape {expected} "
                          "or a batch of them", param="inputs")
    if info.input_shape is not None and tuple(shape[1:]) != tuple(info.input_shape):
        raise bad_request(f"each example has shape {list(shape[1:])}; the model takes {list(info.input_shape)}",
                          param="inputs")
    if shape[0] > max_examples:
        raise bad_request(f"inputs has {shape[0]} examples; at most {max_examples} per request", param="inputs")
    return shape, batched


def _plain_batch(array: np.ndarray, info: ModelInfo) -> np.ndarray | torch.Tensor | None:
    """The batch from a plain array, or None when a value check fails (the exact path then names
    it). Values as the exact path makes them: float64 first, then the model's dtype."""
    if info.input_dtype in (torch.long, torch.int32, torch.int64):
        vocab = info.vocab_size
        if array.dtype.kind != "i" or (vocab is not None and (array.min() < 0 or array.max() >= vocab)):
            return None
        if info.max_context is not None and array.shape[-1] > info.max_context:
            return None
        return array.astype(np.int64, copy=False)
    values = array.astype(np.float64, copy=False)
    dtype = _NUMPY_FLOATS.get(info.input_dtype)
    if dtype is not None:
        with np.errstate(over="ignore"):
            values = values.astype(dtype, copy=False)
        return values if np.isfinite(values).all() else None
    batch = torch.from_numpy(values).to(info.input_dtype)
    return batch if bool(torch.isfinite(batch).all()) else None


def _as_numpy(batch: torch.Tensor) -> np.ndarray | torch.Tensor:
    return batch.numpy() if batch.dtype in (torch.long, *_NUMPY_FLOATS) else batch


def _exact_batch(inputs, info: ModelInfo) -> torch.Tensor:
    """The batch tensor from nested lists that passed `nested_shape`; a 400 naming a bad value."""
    if info.input_dtype in (torch.long, torch.int32, torch.int64):
        if _has_float(inputs):
            raise bad_request("inputs must be integer token ids for this model", param="inputs")
        vocab = info.vocab_size
        out_of_range = bad_request(f"inputs: token ids must be in 0..{vocab - 1}" if vocab is not None else
                                   "inputs: token ids must fit in 64 bits", param="inputs")
        try:
            batch = torch.tensor(inputs, dtype=torch.long)
        except (ValueError, RuntimeError, OverflowError):  # past int64
            raise out_of_range from None
        if vocab is not None and (batch.min() < 0 or batch.max() >= vocab):
            raise out_of_range
        if info.max_context is not None and batch.shape[-1] > info.max_context:
            raise bad_request(f"inputs: {batch.shape[-1]} tokens exceed the model's context of {info.max_context}",
                              param="inputs", code="context_length_exceeded")
        return batch
    batch = torch.tensor(inputs, dtype=torch.float64)
    if not torch.isfinite(batch).all():
        raise bad_request("inputs contain a number too large to represent", param="inputs")
    batch = batch.to(info.input_dtype)
    if not torch.isfinite(batch).all():
        raise bad_request(f"inputs contain a number out of range for {info.input_dtype}", param="inputs")
    return batch


def to_examples(inputs, info: ModelInfo, max_examples: int, raw: bytes | None = None
                ) -> tuple[list[np.ndarray | torch.Tensor], bool]:
    """(examples, was_batch): one array per example in the model's input dtype; numpy where numpy
    has the dtype (so that the event loop runs no torch op: each one hands the GIL to the thread
    running the model), else torch. With the body `raw` that `inputs` came from, plain inputs take
    the numpy path."""
    array = plain_array(inputs, raw) if raw is not None and isinstance(inputs, list) else None
    shape, batched = _examples_shape(array.shape if array is not None else nested_shape(inputs), info,
                                     max_examples)
    batch = _plain_batch(array.reshape(shape), info) if array is not None else None
    if batch is None:
        batch = _as_numpy(_exact_batch(inputs if batched else [inputs], info))
    return list(batch), batched


async def run_examples(state: ServerState, receive, examples: list[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
    """The model's outputs for `examples`, as numpy rows (the batcher converts each batch once)."""
    loop = asyncio.get_running_loop()
    items = [WorkItem(predict_key(x), x, loop, loop.create_future()) for x in examples]
    state.batcher.submit(items)
    outputs = await wait_items(items, receive, state.config.request_timeout)
    if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind in "fc"):
        raise APIError(500, "the model produced a non-finite output (NaN or infinity)", type="server_error",
                       code="non_finite_output")
    return outputs


async def _predict(state: ServerState, body, raw: bytes, receive) -> dict:
    if body.__class__ is dict and body.keys() == {"inputs"} and body["inputs"].__class__ is list:
        inputs = body["inputs"]  # what the schema accepts, without building the model
    else:
        inputs, raw = parse_model(PredictRequest, body).inputs, None
    examples, _ = to_examples(inputs, state.engine.info, state.config.max_queue, raw)
    return {"outputs": await run_examples(state, receive, examples)}


async def _predict_seed_shape(state: ServerState, body, raw: bytes, receive) -> dict:
    """The seeds' route: one example as a JSON list; a one-element output comes back as a number."""
    if not isinstance(body, list):
        raise bad_request(f"body must be a JSON list of numbers (one example), not {type(body).__name__}")
    examples, batched = to_examples(body, state.engine.info, 1, raw)
    if batched:
        raise bad_request("POST /predict takes one example; send batches to POST /v1/predict")
    (output,) = await run_examples(state, receive, examples)
    return {"result": output.reshape(-1)[0].item() if output.size == 1 else output}


class TensorRoute:
    """One tensor route as a plain ASGI application. `ServingApp` sends POSTs here directly; it is
    registered with FastAPI too, so that other methods get FastAPI's 405. `await route(...)`
    answers the request, whatever happens, and returns the status code it sent."""

    def __init__(self, state: ServerState, handler):
        self.state = state
        self.handler = handler

    async def __call__(self, scope, receive, send) -> int:
        try:
            raw = await read_body(receive, _header(scope, b"content-length"), self.state.config.max_body_bytes)
            body = parse_json(raw)
            return await send_json(send, 200, await self.handler(self.state, body, raw, receive))
        except APIError as exc:
            return await send_json(send, exc.status, exc.body(), exc.headers)
        except ClientGone:
            return await send_json(send, 499, {})  # nginx's "client closed request"; nobody reads it
        except Exception as exc:  # noqa: BLE001 - answered like any other route's unexpected error
            log.exception("%s %s failed", scope["method"], scope["path"])
            return await send_json(send, 500, error_body(f"internal error: {type(exc).__name__}: {exc}",
                                                         "server_error"))


def routes(state: ServerState) -> dict[str, TensorRoute]:
    return {"/v1/predict": TensorRoute(state, _predict), "/predict": TensorRoute(state, _predict_seed_shape)}


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


_JSON_HEADER = (b"content-type", b"application/json")


async def send_json(send, status: int, content: dict, headers: dict[str, str] | None = None) -> int:
    """Answer `content` as JSON. orjson writes numpy arrays directly, many times faster than json
    over Python floats: outputs (logits, embeddings) can be large, and this runs on the event loop."""
    payload = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    raw_headers = [_JSON_HEADER, (b"content-length", str(len(payload)).encode())]
    if headers:
        raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
    return status

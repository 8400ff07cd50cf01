"""Tensor routes: POST /v1/predict ({"inputs": ...} -> {"outputs": [...]}) and the seeds' POST /predict
(a JSON list of floats -> {"result": ...}).

Inputs are checked completely on rank 0 (regular nesting, numbers only, finite, the model's
per-example shape, token ids inside the vocabulary) before anything reaches the other ranks:
a batch of mismatched shapes would make ranks disagree about what they execute.
"""

from __future__ import annotations

import asyncio
import math

import orjson
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from dscluster.engine.api import ModelInfo
from dscluster.serving.batcher import WorkItem, predict_key
from dscluster.serving.protocol import APIError, PredictRequest, bad_request, parse_model, read_json
from dscluster.serving.state import ServerState, get_state, wait_results

router = APIRouter()

MAX_DIMS = 8


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


def _has_float(value) -> bool:
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return isinstance(value, float) and not value.is_integer()


def to_examples(inputs, info: ModelInfo, max_examples: int) -> tuple[list[torch.Tensor], bool]:
    """(examples, was_batch): one tensor per example in the model's input dtype."""
    shape = nested_shape(inputs)
    token_ids = info.input_dtype in (torch.long, torch.int32, torch.int64)
    example_dims = len(info.input_shape) if info.input_shape is not None else 1
    if len(shape) == example_dims:
        batched, shape = False, (1, *shape)
        inputs = [inputs]
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
    if token_ids:
        if _has_float(inputs):
            raise bad_request("inputs must be integer token ids for this model", param="inputs")
        batch = torch.tensor(inputs, dtype=torch.long)
        vocab = info.vocab_size
        if vocab is not None and (batch.min() < 0 or batch.max() >= vocab):
            raise bad_request(f"inputs: token ids must be in 0..{vocab - 1}", param="inputs")
        if info.max_context is not None and batch.shape[-1] > info.max_context:
            raise bad_request(f"inputs: {batch.shape[-1]} tokens exceed the model's context of {info.max_context}",
                              param="inputs", code="context_length_exceeded")
    else:
        batch = torch.tensor(inputs, dtype=torch.float64)
        if not torch.isfinite(batch).all():
            raise bad_request("inputs contain a number too large to represent", param="inputs")
        batch = batch.to(info.input_dtype)
        if not torch.isfinite(batch).all():
            raise bad_request(f"inputs contain a number out of range for {info.input_dtype}", param="inputs")
    return list(batch.unbind(0)), batched


async def run_examples(state: ServerState, request: Request, examples: list[torch.Tensor]) -> list:
    loop = asyncio.get_running_loop()
    items = [WorkItem(predict_key(x), x, loop, loop.create_future()) for x in examples]
    state.batcher.submit(items)
    outputs = await wait_results(items, request, state.config.request_timeout)
    if not all(torch.isfinite(o).all() for o in outputs if o.is_floating_point()):
        raise APIError(500, "the model produced a non-finite output (NaN or infinity)", type="server_error",
                       code="non_finite_output")
    # numpy has no bfloat16; half precision goes out as float32 too
    return [(o.float() if o.is_floating_point() and o.dtype != torch.float64 else o).numpy() for o in outputs]


def json_response(content: dict) -> Response:
    """orjson writes numpy arrays directly, many times faster than json over Python floats: outputs
    (logits, embeddings) are large, and encoding them on the event loop limits throughput."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


@router.post("/v1/predict")
async def predict(request: Request) -> Response:
    state = get_state(request)
    req: PredictRequest = parse_model(PredictRequest, await read_json(request, state.config.max_body_bytes))
    examples, _ = to_examples(req.inputs, state.engine.info, state.config.max_queue)
    return json_response({"outputs": await run_examples(state, request, examples)})


@router.post("/predict")
async def predict_seed_shape(request: Request) -> Response:
    """The seeds' route: one example as a JSON list; a one-element output comes back as a number."""
    state = get_state(request)
    body = await read_json(request, state.config.max_body_bytes)
    if not isinstance(body, list):
        raise bad_request(f"body must be a JSON list of numbers (one example), not {type(body).__name__}")
    examples, batched = to_examples(body, state.engine.info, 1)
    if batched:
        raise bad_request("POST /predict takes one example; send batches to POST /v1/predict")
    (output,) = await run_examples(state, request, examples)
    return json_response({"result": output.reshape(-1)[0].item() if output.size == 1 else output})

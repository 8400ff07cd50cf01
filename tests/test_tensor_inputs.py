"""The tensor routes' body path: orjson + numpy for plain inputs, the exact checker for the rest.

Both paths must accept the same inputs, build the same values, and fail with the same message:
every case below goes through both (`raw=None` forces the exact checker) and the answers are
compared, and the values are compared with torch's own conversion of the nested lists.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dscluster.engine.api import ModelInfo
from dscluster.serving.protocol import APIError, parse_json
from dscluster.serving.predict import plain_array, to_examples


def info(dtype=torch.float32, shape=(3,), vocab=None, context=None) -> ModelInfo:
    return ModelInfo(name="m", kind="module", engine="replicated", world_size=1, dtype=dtype, input_dtype=dtype,
                     input_shape=shape, vocab_size=vocab, max_context=context)


FLOAT_MODEL, BF16_MODEL = info(), info(torch.bfloat16)
TOKEN_MODEL = info(torch.long, shape=None, vocab=100, context=8)

CASES = [
    # (model, body text of `inputs`)
    (FLOAT_MODEL, "[0.5, -1.25, 3]"),                 # one example, ints and floats mixed
    (FLOAT_MODEL, "[[1, 2, 3], [4.5, 5, 6]]"),         # a batch
    (FLOAT_MODEL, "[1, 2, 3]"),                        # ints only
    (FLOAT_MODEL, "[0.1, 1e-320, 123456789.123456789]"),
    (FLOAT_MODEL, "[1e39, 0, 0]"),                     # past float32: 400
    (FLOAT_MODEL, "[1e400, 0, 0]"),                    # past float64: 400
    (FLOAT_MODEL, "[1, true, 3]"),                     # JSON booleans are not numbers
    (FLOAT_MODEL, "[1, 2, false]"),
    (FLOAT_MODEL, '[1, "2", 3]'),
    (FLOAT_MODEL, "[1, null, 3]"),
    (FLOAT_MODEL, "[[1, 2, 3], [4, 5]]"),              # ragged
    (FLOAT_MODEL, "[[1, 2, 3], 4]"),
    (FLOAT_MODEL, "[[], []]"),
    (FLOAT_MODEL, "[]"),
    (FLOAT_MODEL, "[1, 2]"),                           # wrong example shape
    (FLOAT_MODEL, "[[[1, 2, 3]]]"),                    # too many dimensions
    (FLOAT_MODEL, "[" * 12 + "1" + "]" * 12),          # nested past MAX_DIMS
    (FLOAT_MODEL, '[1, {"a": 2}, 3]'),
    (FLOAT_MODEL, "[1, 2, 18446744073709551617]"),     # past 64 bits
    (FLOAT_MODEL, "[1, 2, 1180591620717411303424]"),
    (FLOAT_MODEL, "[[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1], [2, 2, 2]]"),  # more than max_examples
    (BF16_MODEL, "[0.1, 0.2, 0.3]"),
    (BF16_MODEL, "[1e39, 0, 0]"),                      # past bfloat16's range
    (TOKEN_MODEL, "[1, 2, 99]"),
    (TOKEN_MODEL, "[[1, 2], [3, 4]]"),
    (TOKEN_MODEL, "[1, 2.0, 3]"),                      # an integral float is a token id
    (TOKEN_MODEL, "[1, 2.5, 3]"),
    (TOKEN_MODEL, "[1, 100]"),                         # outside the vocabulary
    (TOKEN_MODEL, "[-1, 2]"),
    (TOKEN_MODEL, "[1, 9223372036854775808]"),         # past int64
    (TOKEN_MODEL, "[1, 2, 3, 4, 5, 6, 7, 8, 9]"),       # past the context
]


def outcome(inputs, model: ModelInfo, raw: bytes | None):
    try:
        examples, batched = to_examples(inputs, model, 4, raw)
    except APIError as exc:
        return "error", exc.status, exc.message
    return "ok", batched, torch.stack([torch.as_tensor(x) for x in examples])


@pytest.mark.parametrize("model,text", CASES, ids=[c[1][:40] for c in CASES])
def test_plain_and_exact_paths_agree(model, text):
    raw = f'{{"inputs": {text}}}'.encode()
    inputs = parse_json(raw)["inputs"]
    fast, exact = outcome(inputs, model, raw), outcome(json.loads(raw)["inputs"], model, None)
    assert fast[:2] == exact[:2]
    if fast[0] == "error":
        assert fast == exact
        assert fast[1] == 400
        return
    assert fast[2].dtype == exact[2].dtype == (torch.long if model is TOKEN_MODEL else model.input_dtype)
    assert torch.equal(fast[2], exact[2])
    reference = torch.tensor(json.loads(text), dtype=torch.float64 if model is not TOKEN_MODEL else torch.long)
    assert torch.equal(fast[2].reshape(reference.shape), reference.to(fast[2].dtype))


def test_plain_inputs_take_the_numpy_path_and_stay_numpy():
    raw = b'{"inputs": [[1.5, 2, 3], [4, 5, 6]]}'
    inputs = parse_json(raw)["inputs"]
    assert plain_array(inputs, raw) is not None
    examples, batched = to_examples(inputs, FLOAT_MODEL, 4, raw)
    assert batched and all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in examples)


@pytest.mark.parametrize("text", ["[1, true]", "[[1], [2, 3]]", '["1"]', "[]", "[1, null]", "[1e400]"])
def test_anything_unusual_is_not_plain(text):
    raw = text.encode()
    assert plain_array(parse_json(raw), raw) is None


def test_errors_name_the_element_at_fault():
    raw = b'{"inputs": [[1, 2, 3], [4, 5]]}'
    with pytest.raises(APIError, match=r"inputs\[1\] has shape \[2\]"):
        to_examples(parse_json(raw)["inputs"], FLOAT_MODEL, 4, raw)
    raw = b'{"inputs": [1, true, 3]}'
    with pytest.raises(APIError, match=r"inputs\[1\] is bool"):
        to_examples(parse_json(raw)["inputs"], FLOAT_MODEL, 4, raw)


@pytest.mark.parametrize("body,message", [
    (b"", "request body is empty"),
    (b"   ", "request body is empty"),
    (b"{not json", "body is not valid JSON"),
    (b"[1, NaN]", "NaN is not a finite number"),
    (b"[Infinity]", "Infinity is not a finite number"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_parse_json_errors(body, message):
    with pytest.raises(APIError, match=message) as err:
        parse_json(body)
    assert err.value.status == 400 and err.value.code == "invalid_json"


def test_parse_json_keeps_what_the_standard_parser_keeps():
    """What orjson refuses but JSON allows comes back as the standard parser reads it."""
    assert parse_json(b"[1180591620717411303424]") == [2**70]
    assert parse_json('{"a": "\\ud800"}'.encode()) == {"a": "\ud800"}  # a lone surrogate escape
    assert parse_json(b'{"inputs": [0.1, 2]}') == {"inputs": [0.1, 2]}

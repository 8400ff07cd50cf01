"""Load the model every rank serves: a Hugging Face directory or a `package.module:factory` spec."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dscluster.errors import UsageError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    module: nn.Module
    kind: Literal["causal-lm", "module"]
    name: str
    dtype: torch.dtype
    tokenizer: Any = None
    max_context: int | None = None
    vocab_size: int | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: torch.dtype = torch.float32
    input_name: str = "input_ids"  # the keyword a transformers model takes its input as
    hf: bool = False   # a transformers model (AutoTP knows how to split it)


def is_import_spec(spec: str) -> bool:
    return ":" in spec and not os.path.exists(spec)


def check_model_spec(spec: str) -> None:
    """Cheap checks that fail before any rank starts: the directory or module exists."""
    if is_import_spec(spec):
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise UsageError(f"model {spec!r}: an import spec is package.module:factory")
        return
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model {spec!r}: no such directory (or use package.module:factory)")
    if not (path / "config.json").is_file():
        raise UsageError(f"model directory {spec!r} has no config.json")


def resolve_dtype(requested: str, config_dtype: Any = None, cuda: bool | None = None) -> torch.dtype:
    """auto = the checkpoint's dtype on GPUs; float32 on CPU, where half-precision matmuls are slow."""
    if requested in DTYPES:
        return DTYPES[requested]
    if requested != "auto":
        raise UsageError(f"--dtype {requested!r}: choose auto, float32, bfloat16 or float16")
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda and config_dtype is not None:
        name = str(config_dtype).replace("torch.", "")
        if name in DTYPES:
            return DTYPES[name]
    return torch.float32


def load_model(spec: str, dtype: str = "auto", checkpoint: str | None = None) -> LoadedModel:
    check_model_spec(spec)
    if is_import_spec(spec):
        return _load_import_spec(spec, dtype, checkpoint)
    if checkpoint:
        raise UsageError("--checkpoint is for import-spec models; a model directory carries its weights")
    return _load_hf_directory(Path(spec), dtype)


def _load_hf_directory(path: Path, dtype: str) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise UsageError(f"model directory {str(path)!r}: config.json is not loadable: {exc}") from None
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    cls, causal = _model_class(config)
    try:
        module = cls.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model directory {str(path)!r}: weights are not loadable: {exc}") from None
    module.eval()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    max_context = getattr(config, "max_position_embeddings", None)
    if tokenizer is not None and getattr(tokenizer, "model_max_length", None):
        if max_context is None or tokenizer.model_max_length < max_context:
            max_context = int(tokenizer.model_max_length)
    kind = "causal-lm" if causal else "module"
    input_name = getattr(module, "main_input_name", "input_ids")
    log.info("loaded %s from %s: %s (%s), %.1fM parameters, %s", config.model_type, path, kind,
             type(module).__name__, sum(p.numel() for p in module.parameters()) / 1e6, torch_dtype)
    return LoadedModel(module=module, kind=kind, name=path.resolve().name, dtype=torch_dtype,
                       tokenizer=tokenizer, max_context=max_context,
                       vocab_size=getattr(config, "vocab_size", None),
                       input_dtype=torch.long if input_name == "input_ids" else torch_dtype,
                       input_name=input_name, hf=True)


def _model_class(config) -> tuple[type, bool]:
    """The class the directory was saved from (config.json's `architectures`), so a head is never
    dropped or replaced by a randomly initialised one: a causal LM goes through the causal-LM auto
    class; any other saved class (BertModel, ...ForSequenceClassification) is loaded as itself.
    Without `architectures`, the model type decides."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LMS

    saved = list(getattr(config, "architectures", None) or [])
    if not saved:
        causal = config.model_type in CAUSAL_LMS
        return (transformers.AutoModelForCausalLM if causal else transformers.AutoModel), causal
    if set(saved) & set(CAUSAL_LMS.values()):
        return transformers.AutoModelForCausalLM, True
    cls = getattr(transformers, saved[0], None)
    if cls is None:
        raise UsageError(f"config.json names architecture {saved[0]!r}, which this transformers "
                         f"{transformers.__version__} does not have")
    return cls, False


def _load_import_spec(spec: str, dtype: str, checkpoint: str | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like uvicorn: specs resolve from the working directory
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise UsageError(f"model {spec!r}: cannot import {module_name}: {exc}") from None
    except AttributeError:
        raise UsageError(f"model {spec!r}: {module_name} has no attribute {attr}") from None
    module = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(module, nn.Module):
        raise UsageError(f"model {spec!r}: {attr} returned {type(module).__name__}, not a torch.nn.Module")
    if checkpoint:
        _load_checkpoint(module, checkpoint)
    torch_dtype = resolve_dtype(dtype)
    module = module.to(torch_dtype).eval()
    return LoadedModel(module=module, kind="module", name=spec, dtype=torch_dtype,
                       input_shape=_input_shape(module), input_dtype=torch_dtype)


def _load_checkpoint(module: nn.Module, checkpoint: str) -> None:
    path = Path(checkpoint)
    if not path.is_file():
        raise UsageError(f"--checkpoint {checkpoint!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UsageError(f"--checkpoint {checkpoint!r} is not a state_dict file: {exc}") from None
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {result.unexpected_keys[:5]}")
    if problems:
        raise UsageError(f"--checkpoint {checkpoint!r} does not match the model: {'; '.join(problems)}")


def _input_shape(module: nn.Module) -> tuple[int, ...] | None:
    """Per-example input shape: declared as `input_shape`, or the first Linear's in_features."""
    declared = getattr(module, "input_shape", None)
    if declared is not None:
        return tuple(int(d) for d in declared)
    first = next((m for m in module.modules() if not list(m.children())), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    return None

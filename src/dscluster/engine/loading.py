"""Load the model every rank serves: a Hugging Face directory or a `package.module:factory` spec.

`open_model` reads what the model is (no weights); `load_whole` reads every weight (one rank, the
replicated engine, ZeRO-3's partition-as-read); `build_on_meta` gives the structure without
weights, for the tensor-parallel loader that fills each rank's shards from the checkpoint files.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dscluster.engine.model_spec import check_model_spec, is_import_spec
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


@dataclass
class ModelSource:
    """What a model is, read before any weight: its config, class, tokenizer and dtype. The engine
    is chosen from it and the checkpoint checked against it; then each engine reads the weights its
    own way (whole, shard by shard, or partitioned as read)."""

    spec: str
    name: str
    dtype: torch.dtype
    hf: bool                      # a transformers directory (AutoTP knows how to split it)
    kind: Literal["causal-lm", "module"] = "module"
    path: Path | None = None      # the model directory
    config: Any = None
    model_class: type | None = None
    tokenizer: Any = None
    max_context: int | None = None
    factory: Any = None           # import specs: the callable (or module) the spec names
    checkpoint: str | None = None  # import specs: --checkpoint

    def loaded(self, module: nn.Module) -> LoadedModel:
        """The served model's description around `module` (whole, split or partitioned)."""
        if not self.hf:
            return LoadedModel(module=module, kind="module", name=self.spec, dtype=self.dtype,
                               input_shape=_input_shape(module), input_dtype=self.dtype)
        input_name = getattr(module, "main_input_name", "input_ids")
        return LoadedModel(module=module, kind=self.kind, name=self.name, dtype=self.dtype,
                           tokenizer=self.tokenizer, max_context=self.max_context,
                           vocab_size=getattr(self.config, "vocab_size", None),
                           input_dtype=torch.long if input_name == "input_ids" else self.dtype,
                           input_name=input_name, hf=True)


def open_model(spec: str, dtype: str = "auto", checkpoint: str | None = None,
               device: torch.device | None = None) -> ModelSource:
    """Read what the model is (config, class, tokenizer; for an import spec, the factory), no weights.
    `device`: where it will run, which `--dtype auto` follows (None: a GPU if CUDA is available)."""
    check_model_spec(spec)
    cuda = None if device is None else device.type == "cuda"
    if is_import_spec(spec):
        return _open_import_spec(spec, dtype, checkpoint, cuda)
    if checkpoint:
        raise UsageError("--checkpoint is for import-spec models; a model directory carries its weights")
    return _open_hf_directory(Path(spec), dtype, cuda)


def load_model(spec: str, dtype: str = "auto", checkpoint: str | None = None) -> LoadedModel:
    """The whole model in this process (one rank, or an engine that splits a whole model)."""
    source = open_model(spec, dtype, checkpoint)
    return source.loaded(load_whole(source))


def load_whole(source: ModelSource, device: torch.device | None = None) -> nn.Module:
    """Every weight, in this process's memory: transformers' own loader for a directory (under a
    live HfDeepSpeedConfig it partitions parameters as it reads them), the factory for a spec.

    `device`: where the model goes. A factory runs as its author wrote it (on the host: factories
    seed CPU generators and the like), its module is moved to the device, and --checkpoint is
    read straight onto the device into it; a directory's model is moved after loading."""
    device = torch.device("cpu") if device is None else device
    if not source.hf:
        module = source.factory() if callable(source.factory) and not isinstance(source.factory, nn.Module) \
            else source.factory
        if not isinstance(module, nn.Module):
            raise UsageError(f"model {source.spec!r}: {source.spec.partition(':')[2]} returned "
                             f"{type(module).__name__}, not a torch.nn.Module")
        module = module.to(device=device, dtype=source.dtype)
        if source.checkpoint:
            _load_checkpoint(module, source.checkpoint, device)
        return module.eval()
    try:
        module = source.model_class.from_pretrained(source.path, dtype=source.dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model directory {str(source.path)!r}: weights are not loadable: {exc}") from None
    module.eval()
    log.info("loaded %s from %s: %s (%s), %.1fM parameters, %s", source.config.model_type, source.path,
             source.kind, type(module).__name__, sum(p.numel() for p in module.parameters()) / 1e6, source.dtype)
    return module if device.type == "cpu" else module.to(device)


def build_on_meta(source: ModelSource) -> nn.Module:
    """The model's structure with every parameter on the meta device (no memory), its buffers real.

    Buffers are computed by the model's own constructor (rotary `inv_freq` and the like are not in
    the checkpoint), so they come out exactly as `from_pretrained` makes them; parameters are
    filled later, each rank with its own share."""
    with _parameters_on_meta():
        return construct(source)


def construct(source: ModelSource) -> nn.Module:
    """The model built from its config alone (parameters as the surrounding context makes them:
    on the meta device, or partitioned by ZeRO-3), with its generation config read as
    from_pretrained reads it (its eos ids end generation)."""
    from transformers import GenerationConfig

    if hasattr(source.model_class, "from_config"):   # an Auto class
        module = source.model_class.from_config(source.config, dtype=source.dtype)
    else:
        module = source.model_class._from_config(source.config, dtype=source.dtype)
    if (source.path / "generation_config.json").is_file() and getattr(module, "generation_config", None) is not None:
        module.generation_config = GenerationConfig.from_pretrained(source.path, local_files_only=True)
    return module.eval()


@dataclass
class ModelTensors:
    """The tensors a model reads from its checkpoint, by every name they go by."""

    parameters: dict[str, tuple[int, ...]]   # each parameter, under each of its names -> full shape
    buffers: dict[str, tuple[int, ...]]      # persistent buffers (read when the checkpoint has them)
    aliases: dict[str, list[str]]            # other names of the same tensor (tied weights)
    prefix: str | None                       # the base model's prefix (`model`, `bert`)


def model_tensors(module: nn.Module) -> ModelTensors:
    """What `module` (whole-shaped, e.g. on the meta device) needs from a checkpoint."""
    names: dict[int, list[str]] = {}
    parameters = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        parameters[name] = tuple(param.shape)
    aliases = {n: [m for m in group if m != n] for group in names.values() for n in group}
    for target, source in (getattr(module, "all_tied_weights_keys", None) or {}).items():
        aliases.setdefault(target, []).append(source)
        aliases.setdefault(source, []).append(target)
    saved = module.state_dict(keep_vars=True).keys()
    buffers = {name: tuple(buf.shape) for name, buf in module.named_buffers(remove_duplicate=False) if name in saved}
    return ModelTensors(parameters, buffers, aliases, getattr(module, "base_model_prefix", None) or None)


@contextlib.contextmanager
def _parameters_on_meta():
    """While a model is constructed, put each parameter on the meta device as it is registered
    and leave buffers where the constructor made them (accelerate's `init_empty_weights(
    include_buffers=False)`, without depending on accelerate for these few lines)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(module._parameters[name].__dict__)  # Parameter subclasses keep their attributes
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(kwargs)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _open_hf_directory(path: Path, dtype: str, cuda: bool | None) -> ModelSource:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' config validation raises its own types
        text = " ".join(str(exc).split())  # one line: validation errors span several
        raise UsageError(f"model directory {str(path)!r}: config.json is not loadable: {text}") from None
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None), cuda)
    cls, causal = _model_class(config)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    max_context = getattr(config, "max_position_embeddings", None)
    if tokenizer is not None and getattr(tokenizer, "model_max_length", None):
        if max_context is None or tokenizer.model_max_length < max_context:
            max_context = int(tokenizer.model_max_length)
    return ModelSource(spec=str(path), name=path.resolve().name, dtype=torch_dtype, hf=True,
                       kind="causal-lm" if causal else "module", path=path, config=config, model_class=cls,
                       tokenizer=tokenizer, max_context=max_context)


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


def _open_import_spec(spec: str, dtype: str, checkpoint: str | None, cuda: bool | None) -> ModelSource:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like uvicorn: specs resolve from the working directory
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise UsageError(f"model {spec!r}: cannot import {module_name}: {exc}") from None
    except AttributeError:
        raise UsageError(f"model {spec!r}: {module_name} has no attribute {attr}") from None
    return ModelSource(spec=spec, name=spec, dtype=resolve_dtype(dtype, cuda=cuda), hf=False, factory=factory,
                       checkpoint=checkpoint)


def _load_checkpoint(module: nn.Module, checkpoint: str, device: torch.device) -> None:
    path = Path(checkpoint)
    if not path.is_file():
        raise UsageError(f"--checkpoint {checkpoint!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device=str(device))
        else:
            state = torch.load(path, map_location=device, weights_only=True)
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

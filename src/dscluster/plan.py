"""`dscluster plan`: the smallest tensor-parallel layout that holds a model and its KV cache, and where to run it.

Per GPU, for a tensor-parallel degree tp (a divisor of the attention heads), serving
--max-num-seqs S requests of --max-model-len L tokens with --max-num-batched-tokens T per step:

    weights    = parameters x bytes per parameter / tp
    activation = T x (2 x hidden + intermediate / tp) x bytes + S x vocab x 4
    kv / token = 2 x layers x ceil(kv_heads / tp) x head_dim x bytes
    kv cache   = S x ceil(L / 16) x 16 x kv / token
    need       = (weights + activation) x (1 + margin) + overhead per GPU + kv cache
    usable     = GPU memory x --gpu-memory-utilization

The KV cache is the engine's: a pool of blocks of 16 tokens per rank, holding that rank's share
of the key/value heads (whole heads: the busiest rank of an uneven split holds ceil(kv / tp);
past tp = kv heads every rank still holds one), sized to what is left of `usable` after the
weights and the activation peak. A request holds whole blocks. A layout fits when its pool holds
S requests of L tokens; `plan` also reports the pool itself (tokens, GiB) and how many requests
of L tokens it holds at once (vLLM's "maximum concurrency"), and says why a layout does not fit.

Per node, in host memory, each of its ranks (one per GPU) holds at load:

    host       = overhead per rank (Python, torch, CUDA's host side) + weights read through host memory

With safetensors weights each rank reads only its own shards, straight onto its GPU through a small
staging buffer, so the weights term is 0 whatever the model's size; a checkpoint without
safetensors files (PyTorch .bin) is read whole by every rank, so it costs the whole model per rank.

The seeds' advice, with numbers: when one node's GPUs hold the model, deploy on one node (no
inter-node traffic on every layer: `k8s render deployment`); only when they don't, run across
nodes (MPIJob or LWS) with tensor parallelism over whole nodes.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dscluster.engine.kv_blocks import BLOCK_SIZE  # tokens per block of the engine's KV pool
from dscluster.errors import EXIT_RUNTIME, UsageError

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MARGIN = 0.10                 # estimation error, allocator fragmentation
OVERHEAD_GIB = 1.0            # CUDA context, NCCL buffers, the runtime itself
HOST_OVERHEAD_GIB = 2.0       # host memory of a GPU rank before weights (0.4 GiB on CPU ranks; CUDA adds more)
DEFAULT_CONTEXT = 4096        # tokens per request when the model does not say its context (and for --params)
MIN_BATCHED_TOKENS = 256      # serve's --max-num-batched-tokens default: the larger of this and --max-num-seqs
CHECKPOINTS = "/mnt/checkpoints"
PVC_MARGIN = 0.10             # the checkpoint volume: the weights and this much more

# Llama-family shapes for --params without a config: (parameters, layers, hidden, heads, kv heads,
# intermediate, vocab). The nearest by parameter count is used for the KV cache and the heads.
KNOWN_SHAPES = (
    (1.2e9, 16, 2048, 32, 8, 8192, 128256),
    (3.2e9, 28, 3072, 24, 8, 8192, 128256),
    (8.0e9, 32, 4096, 32, 8, 14336, 128256),
    (13e9, 40, 5120, 40, 40, 13824, 32000),
    (34e9, 48, 8192, 64, 8, 22016, 32000),
    (70e9, 80, 8192, 64, 8, 28672, 128256),
    (405e9, 126, 16384, 128, 8, 53248, 128256),
)


@dataclass(frozen=True)
class Shape:
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    context: int                           # the model's context: the default --max-model-len
    weight_bytes: float | None = None      # measured from the weight files, in the requested dtype
    source: str = ""
    dim_per_head: int | None = None        # config's head_dim, when it is not hidden / heads (Gemma, Qwen3)
    shard_only: bool = True                # safetensors weights: each rank reads only its shards
    context_stated: bool = False           # config.json says the context (a longer --max-model-len is an error)

    @property
    def head_dim(self) -> int:
        return self.dim_per_head or self.hidden // self.heads


@dataclass(frozen=True)
class Serving:
    """What every layout must hold, in serve's terms: the dtype, --max-num-seqs requests of
    --max-model-len tokens, --max-num-batched-tokens per step; and the machines it runs on."""

    dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_mem_gib: float
    gpu_memory_utilization: float
    gpus_per_node: int
    host_mem_gib: float | None = None

    @property
    def usable_gib(self) -> float:
        return self.gpu_mem_gib * self.gpu_memory_utilization

    @property
    def blocks_per_request(self) -> int:
        return math.ceil(self.max_model_len / BLOCK_SIZE)


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    nodes: int
    gpus_per_node: int
    weights_gib: float
    kv_cache_gib: float              # the cache of --max-num-seqs requests of --max-model-len tokens, per rank
    activation_gib: float
    per_gpu_gib: float               # what a rank needs: weights, activations, margin, overhead and that cache
    fits: bool
    host_per_node_gib: float = 0.0   # host memory its ranks on one node hold at load
    kv_bytes_per_token: int = 0      # one token's keys and values on the busiest rank
    kv_pool_gib: float = 0.0         # the pool a rank gets from what is left of the usable memory
    kv_pool_tokens: int = 0          # ... in tokens (whole blocks)
    max_concurrency: float = 0.0     # requests of --max-model-len tokens the pool holds at once
    why_not: str | None = None       # why it does not fit (None when it does)


def parse_params(text: str) -> float:
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise UsageError(f"--params {text!r} is not a number (e.g. 70e9)") from None
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"--params {text!r} must be a positive parameter count")
    return value


def shape_from_params(params: float) -> Shape:
    row = min(KNOWN_SHAPES, key=lambda r: abs(math.log(r[0] / params)))
    _, layers, hidden, heads, kv, inter, vocab = row
    return Shape(params, layers, hidden, heads, kv, inter, vocab, DEFAULT_CONTEXT,
                 source=f"--params {params:.3g}, shaped like Llama {row[0] / 1e9:g}B")


# Families whose config names `intermediate_size` but whose MLP is not gated (two matrices).
NON_GATED_MLP = frozenset({"gpt_bigcode", "gpt_neox", "gptj", "phi", "falcon", "bert", "roberta", "starcoder2"})
# Families with biases on the query, key and value projections though the config does not say so.
QKV_BIAS = frozenset({"qwen2", "qwen2_moe"})

# Config keys for the shape, Llama's name first (the one an error names), then other families'.
LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN = ("hidden_size", "n_embd", "d_model")
HEADS = ("num_attention_heads", "n_head", "num_heads")


def _first(config: dict, names: tuple[str, ...]):
    value = next((config[n] for n in names if config.get(n) is not None), None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"config.json: {names[0]} is {value!r}, not a positive integer")
    return value


def weight_files(directory: Path) -> list[Path]:
    """The files that hold the weights. Repositories often ship the same weights twice (safetensors
    and a PyTorch .bin); only the first format present counts."""
    for suffixes in ((".safetensors",), (".bin",), (".pt", ".pth")):
        files = sorted(f for f in directory.iterdir() if f.suffix in suffixes and f.is_file())
        if files:
            return files
    return []


def pod_model_path(path: str) -> str:
    """Where the model will be inside the pod: the checkpoints PVC is mounted at /mnt/checkpoints."""
    if path.startswith(CHECKPOINTS + "/"):
        return path.rstrip("/")
    return f"{CHECKPOINTS}/{Path(path).resolve().name}"


def shape_from_model(path: str, dtype: str) -> Shape:
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UsageError(f"--model {path!r}: no config.json there")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {path!r}: config.json is not readable JSON: {exc}") from None
    config = {**config.get("text_config", {}), **config}
    missing = [names[0] for names in (LAYERS, HIDDEN, HEADS) if _first(config, names) is None]
    if missing:
        raise UsageError(f"--model {path!r}: config.json lacks {', '.join(missing)}")
    layers, hidden, heads = (_first(config, names) for names in (LAYERS, HIDDEN, HEADS))
    if hidden < heads and config.get("head_dim") is None:
        raise UsageError(f"--model {path!r}: config.json's hidden_size {hidden} is smaller than its "
                         f"num_attention_heads {heads} and it has no head_dim")
    kv = config.get("num_key_value_heads") or heads
    inter = _first(config, ("intermediate_size", "n_inner", "ffn_dim")) or 4 * hidden
    vocab = config.get("vocab_size") or 32000
    files = weight_files(directory)
    stored = BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", ""), 4)
    weight_bytes = sum(f.stat().st_size for f in files) * BYTES[dtype] / stored if files else None
    # Parameters: from the weight files when there are any, else from the shape.
    params = (weight_bytes / BYTES[dtype]) if weight_bytes else count_params(config, layers, hidden, heads)
    context = _first(config, ("max_position_embeddings", "n_positions"))
    return Shape(params, layers, hidden, heads, kv, inter, vocab, context or DEFAULT_CONTEXT,
                 weight_bytes=weight_bytes, source=f"{path} ({len(files)} weight file(s))",
                 dim_per_head=_first(config, ("head_dim",)),
                 shard_only=not files or files[0].suffix == ".safetensors", context_stated=context is not None)


def count_params(config: dict, layers: int, hidden: int, heads: int) -> float:
    """Parameters of a decoder-only transformer from its config.json, for a directory without
    weight files.

    Per layer: attention's query and output projections (hidden x heads x head_dim each), its key
    and value projections for the key/value heads only (grouped-query attention: Llama-3-70B has 8
    of them for 64 query heads), and the MLP: three hidden x intermediate matrices when it is gated
    (Llama, Mistral, Qwen: gate, up, down; configs that name `intermediate_size`), two otherwise
    (GPT-2's n_inner, OPT's ffn_dim); plus norms and biases where the config says so. Then the
    token embeddings, and the output head unless `tie_word_embeddings` shares them."""
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = _first(config, ("intermediate_size", "n_inner", "ffn_dim")) or 4 * hidden
    vocab = config.get("vocab_size") or 32000
    gated = config.get("intermediate_size") is not None and config.get("model_type") not in NON_GATED_MLP
    q_out = heads * head_dim
    kv_out = kv * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if config.get("attention_bias") or config.get("model_type") in QKV_BIAS:
        attention += q_out + 2 * kv_out
    mlp = (3 if gated else 2) * hidden * inter
    norms = 2 * hidden
    embeddings = vocab * hidden
    head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return layers * (attention + mlp + norms) + hidden + embeddings + head


def host_per_rank_gib(shape: Shape, dtype: str) -> float:
    """Host memory one rank holds at load: its fixed cost, plus the whole model when it must read
    the whole checkpoint (no safetensors files)."""
    return HOST_OVERHEAD_GIB + (0 if shape.shard_only else (shape.weight_bytes or shape.params * BYTES[dtype]) / GIB)


def kv_bytes_per_token(shape: Shape, dtype: str, tp: int) -> int:
    """One token's keys and values on the busiest rank, over all layers. Tensor parallelism gives
    each rank whole key/value heads: an uneven split gives some ranks one more (ceil), and past
    tp = kv heads each rank still holds one. The pool's block count is the same on every rank (the
    block decisions are shared), so the busiest rank is the one that sizes it."""
    return 2 * shape.layers * math.ceil(shape.kv_heads / tp) * shape.head_dim * BYTES[dtype]


def estimate(shape: Shape, serving: Serving, tp: int) -> Layout:
    b = BYTES[serving.dtype]
    weights = (shape.weight_bytes or shape.params * b) / tp
    # Chunked prefill: a step computes at most --max-num-batched-tokens tokens, whatever the
    # prompts' lengths, and the logits of one position per running request.
    act = (serving.max_num_batched_tokens * (2 * shape.hidden + shape.intermediate / tp) * b
           + serving.max_num_seqs * shape.vocab * 4)
    fixed = (weights + act) * (1 + MARGIN) + OVERHEAD_GIB * GIB
    per_token = kv_bytes_per_token(shape, serving.dtype, tp)
    block_bytes = BLOCK_SIZE * per_token
    pool_blocks = max(0, math.floor((serving.usable_gib * GIB - fixed) / block_bytes))
    wanted_blocks = serving.max_num_seqs * serving.blocks_per_request
    cache = wanted_blocks * block_bytes
    need = (fixed + cache) / GIB
    # floored, so that a pool one block short of --max-num-seqs requests never reads as enough
    concurrency = math.floor(pool_blocks / serving.blocks_per_request * 100) / 100
    nodes = math.ceil(tp / serving.gpus_per_node)
    host = min(tp, serving.gpus_per_node) * host_per_rank_gib(shape, serving.dtype)
    reasons = []
    if fixed > serving.usable_gib * GIB:
        reasons.append(f"weights and activations alone need {fixed / GIB:.2f} GiB of {serving.usable_gib:g} GiB "
                       "usable: no room for a KV cache")
    elif pool_blocks < serving.blocks_per_request:
        reasons.append(f"the KV pool of {pool_blocks * BLOCK_SIZE:,} tokens cannot hold one request of "
                       f"{serving.max_model_len:,} tokens")
    elif pool_blocks < wanted_blocks:
        reasons.append(f"the KV pool holds {concurrency:.2f} requests of {serving.max_model_len:,} tokens, "
                       f"fewer than --max-num-seqs {serving.max_num_seqs}")
    if serving.host_mem_gib is not None and host > serving.host_mem_gib:
        reasons.append(f"its ranks hold {host:g} GiB of host memory per node at load, more than --host-mem-gib "
                       f"{serving.host_mem_gib:g}")
    return Layout(tp, nodes, min(tp, serving.gpus_per_node), round(weights / GIB, 2), round(cache / GIB, 2),
                  round(act / GIB, 2), round(need, 2), not reasons, round(host, 2),
                  kv_bytes_per_token=per_token, kv_pool_gib=round(pool_blocks * block_bytes / GIB, 2),
                  kv_pool_tokens=pool_blocks * BLOCK_SIZE, max_concurrency=concurrency,
                  why_not="; ".join(reasons) or None)


def candidates(shape: Shape, gpus_per_node: int, max_nodes: int) -> list[int]:
    """Divisors of the attention heads that fill whole nodes once they span more than one."""
    limit = gpus_per_node * max_nodes
    return [tp for tp in range(1, min(shape.heads, limit) + 1)
            if shape.heads % tp == 0 and (tp <= gpus_per_node or tp % gpus_per_node == 0)]


def _missing(shape: Shape, serving: Serving, largest: Layout) -> str:
    """What is short when nothing fits: host memory, or the shortfall per GPU and the node count that would do."""
    host = serving.host_mem_gib
    gpu_holds = largest.kv_pool_tokens >= serving.max_num_seqs * serving.blocks_per_request * BLOCK_SIZE
    if host is not None and gpu_holds and largest.host_per_node_gib > host:
        whole = "" if shape.shard_only else (" (no safetensors files: every rank reads the whole checkpoint; "
                                             "save it as safetensors and each rank reads only its shards)")
        return (f"the {largest.gpus_per_node} ranks of a node hold {largest.host_per_node_gib:g} GiB of host memory "
                f"at load, more than --host-mem-gib {host:g}{whole}")
    short = (f"at tensor parallel {largest.tensor_parallel} over {largest.nodes} node(s) of {serving.gpus_per_node} "
             f"each GPU needs {largest.per_gpu_gib:g} GiB, {largest.per_gpu_gib - serving.usable_gib:.2f} GiB more "
             f"than the {serving.usable_gib:g} GiB usable (--gpu-mem-gib {serving.gpu_mem_gib:g} x "
             f"--gpu-memory-utilization {serving.gpu_memory_utilization:g}; {largest.why_not.split('; ')[0]})")
    unbounded = candidates(shape, serving.gpus_per_node, max_nodes=shape.heads)
    more = next((layout for layout in (estimate(shape, serving, tp) for tp in unbounded
                                       if tp > largest.tensor_parallel) if layout.fits), None)
    if more is not None:
        return f"{short}; it fits at tensor parallel {more.tensor_parallel} over {more.nodes} nodes: pass --max-nodes {more.nodes}"
    return (f"{short}; no more nodes help (tensor parallelism stops at the {shape.heads} attention heads, and the KV "
            f"cache stops shrinking at the {shape.kv_heads} key/value heads): use GPUs with more memory, a smaller "
            "--dtype, a shorter --max-model-len or a smaller --max-num-seqs")


def serving_from_args(args: argparse.Namespace, shape: Shape) -> Serving:
    """serve's defaults for what the flags leave out, and the same one-line errors for bad values."""
    if args.gpu_mem_gib <= 0:
        raise UsageError(f"--gpu-mem-gib {args.gpu_mem_gib:g} must be positive")
    utilization = args.gpu_memory_utilization
    if not 0 < utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization {utilization:g} must be a fraction of the GPU's memory, "
                         "more than 0 and at most 1")
    host = getattr(args, "host_mem_gib", None)
    if host is not None and host <= 0:
        raise UsageError(f"--host-mem-gib {host:g} must be positive")
    length = args.max_model_len or shape.context
    if shape.context_stated and length > shape.context:
        raise UsageError(f"--max-model-len {length} exceeds the model's context of {shape.context} tokens")
    batched = args.max_num_batched_tokens or max(MIN_BATCHED_TOKENS, args.max_num_seqs)
    if batched < args.max_num_seqs:
        raise UsageError(f"--max-num-batched-tokens {batched} must be at least --max-num-seqs {args.max_num_seqs} "
                         "(every running request computes a token per step)")
    return Serving(args.dtype, length, args.max_num_seqs, batched, args.gpu_mem_gib, utilization,
                   args.gpus_per_node, host)


def make_plan(args: argparse.Namespace) -> dict:
    shape = shape_from_model(args.model, args.dtype) if args.model else shape_from_params(parse_params(args.params))
    serving = serving_from_args(args, shape)
    layouts = [estimate(shape, serving, tp) for tp in candidates(shape, serving.gpus_per_node, args.max_nodes)]
    best = next((layout for layout in layouts if layout.fits), None)
    plan = {"model": shape.source, "dtype": args.dtype, "params": shape.params,
            "max_model_len": serving.max_model_len, "max_num_seqs": serving.max_num_seqs,
            "max_num_batched_tokens": serving.max_num_batched_tokens,
            "context_len": serving.max_model_len, "batch_size": serving.max_num_seqs,  # their older names
            "gpu_mem_gib": args.gpu_mem_gib, "gpu_memory_utilization": serving.gpu_memory_utilization,
            "usable_gib": round(serving.usable_gib, 2), "block_size": BLOCK_SIZE,
            "candidates": [asdict(layout) for layout in layouts], "fits": best is not None,
            "host_mem_gib": serving.host_mem_gib, "host_per_rank_gib": round(host_per_rank_gib(shape, args.dtype), 2),
            "shard_only_loading": shape.shard_only}
    if best is None:
        largest = layouts[-1]  # tp=1 is always a candidate
        plan.update(tensor_parallel=None, nodes=None, gpus_per_node=None, recommendation=None,
                    per_gpu_gib=largest.per_gpu_gib, missing=_missing(shape, serving, largest))
        return plan
    single = best.nodes == 1
    model_arg = pod_model_path(args.model) if args.model else f"{CHECKPOINTS}/model"
    kind = "deployment" if single else "mpijob"
    engine = "tp" if best.tensor_parallel > 1 else "replicated"
    weights_gib = (shape.weight_bytes or shape.params * BYTES[args.dtype]) / GIB
    pvc = pvc_size_gib(weights_gib)
    # Copies of the model one node holds when it needs fewer GPUs than the node has (Deployment pods).
    copies = serving.gpus_per_node // best.gpus_per_node if single else 1
    # Across nodes: tensor parallel inside each node, a pipeline stage per node (the same GPUs and
    # about the same memory per GPU; one hand-over per step crosses the network, not every layer's
    # all-reduces). Without enough layers for a stage per node, tensor parallelism over every GPU.
    pipeline = best.nodes if best.nodes > 1 and shape.layers >= best.nodes else 1
    command = (f"dscluster k8s render {kind} --nodes {best.nodes} --gpus-per-node {best.gpus_per_node} "
               f"--model {model_arg} --engine {engine} --dtype {args.dtype} --image {args.image} "
               f"--pvc-size {pvc}Gi")
    if pipeline > 1:
        command += f" --pp {pipeline}"
    if not shape.shard_only:
        # every rank reads the whole checkpoint through host memory: the pod must be given it
        host = best.host_per_node_gib + best.gpus_per_node  # plus /dev/shm, 1 GiB per rank
        command += f" --memory {math.ceil(host)}Gi"
    if copies > 1:
        command += f" --replicas {copies}"
    plan.update(tensor_parallel=best.tensor_parallel, nodes=best.nodes, gpus_per_node=best.gpus_per_node,
                pipeline_parallel=pipeline, per_gpu_gib=best.per_gpu_gib,
                recommendation="single-node" if single else "multi-node",
                weights_gib=round(weights_gib, 2), pvc_gib=pvc, copies_per_node=copies, render_command=command)
    return plan


def pvc_size_gib(weights_gib: float) -> int:
    """A checkpoint volume that holds the weights with room to spare (tokenizer, config, the
    filesystem's own overhead): 10 % more, rounded up to 10 GiB."""
    return max(10, math.ceil(weights_gib * (1 + PVC_MARGIN) / 10) * 10)


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _bytes(n: int) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n} B"


def describe(plan: dict) -> str:
    length = f"{plan['max_model_len']:,}"
    lines = [f"model: {plan['model']}, {_count(plan['params'])} parameters, {plan['dtype']}, "
             f"{plan['gpu_mem_gib']:g} GiB per GPU, {plan['usable_gib']:g} GiB usable "
             f"(--gpu-memory-utilization {plan['gpu_memory_utilization']:g})",
             f"serving: {plan['max_num_seqs']} request(s) of {length} tokens at once (--max-num-seqs, "
             f"--max-model-len), {plan['max_num_batched_tokens']} tokens per step; KV cache in blocks of "
             f"{plan['block_size']} tokens",
             "",
             f"{'tp':>4} {'nodes':>5} {'weights':>8} {'activ.':>7} {'kv/token':>9} {'kv cache':>8} {'per GPU':>8} "
             f"{'kv pool':>8} {'pool tokens':>12} {'max conc.':>10}  fits"]
    for c in plan["candidates"]:
        lines.append(f"{c['tensor_parallel']:>4} {c['nodes']:>5} {c['weights_gib']:>7.2f}G "
                     f"{c['activation_gib']:>6.2f}G {_bytes(c['kv_bytes_per_token']):>9} {c['kv_cache_gib']:>7.2f}G {c['per_gpu_gib']:>7.2f}G "
                     f"{c['kv_pool_gib']:>7.2f}G {c['kv_pool_tokens']:>12,} {c['max_concurrency']:>9.2f}x  "
                     f"{'yes' if c['fits'] else 'no: ' + c['why_not']}")
    lines.append("")
    lines.append(_host_line(plan))
    if not plan["fits"]:
        lines.append(f"does not fit: {plan['missing']}")
        return "\n".join(lines)
    chosen = next(c for c in plan["candidates"] if c["tensor_parallel"] == plan["tensor_parallel"])
    lines.append(f"KV cache per rank at tensor parallel {plan['tensor_parallel']}: "
                 f"{_bytes(chosen['kv_bytes_per_token'])} per token; pool {chosen['kv_pool_gib']:g} GiB, "
                 f"{chosen['kv_pool_tokens']:,} tokens; maximum concurrency for {length} tokens per request: "
                 f"{chosen['max_concurrency']:.2f}x")
    lines.append(f"weights: {plan['weights_gib']:g} GiB; the checkpoint volume: --pvc-size {plan['pvc_gib']}Gi "
                 "(fill it with `k8s render ... --download REPO`, see docs/kubernetes.md)")
    if plan["recommendation"] == "single-node":
        lines.append(f"fits on one node: tensor parallel {plan['tensor_parallel']} on {plan['gpus_per_node']} GPU(s), "
                     f"{plan['per_gpu_gib']:g} GiB per GPU. Deploy on a single node; multi-node buys nothing here.")
        lines.append(f"  {plan['render_command']}")
        if plan["copies_per_node"] > 1:
            lines.append(f"  a node of {plan['gpus_per_node'] * plan['copies_per_node']} GPUs holds "
                         f"{plan['copies_per_node']} copies, one pod of {plan['gpus_per_node']} GPU(s) each: "
                         f"--replicas {plan['copies_per_node']} (per node; more nodes, more replicas)")
        lines.append("  (one pod per copy of the model; or a dedicated single-node server such as Ray Serve)")
    else:
        lines.append(f"needs {plan['nodes']} nodes: tensor parallel {plan['tensor_parallel']} over {plan['nodes']} x "
                     f"{plan['gpus_per_node']} GPUs, {plan['per_gpu_gib']:g} GiB per GPU.")
        if plan.get("pipeline_parallel", 1) > 1:
            lines.append(f"  recommended: tensor parallel {plan['gpus_per_node']} inside each node and a pipeline stage per "
                         f"node (--pp {plan['pipeline_parallel']}): one hand-over of hidden states per step crosses the "
                         "network instead of every layer's all-reduces. With InfiniBand/RoCE between the nodes, "
                         f"tensor parallel over all {plan['tensor_parallel']} GPUs (drop --pp) is the other choice.")
        else:
            lines.append(f"  tensor parallelism spans all {plan['tensor_parallel']} GPUs of the {plan['nodes']} nodes: "
                         "every layer's all-reduce crosses the network, so give the pods a fast interconnect "
                         "(InfiniBand/RoCE).")
        lines.append(f"  {plan['render_command']}")
        lines.append("  (or `k8s render lws` with the same flags)")
    return "\n".join(lines)


def _host_line(plan: dict) -> str:
    how = ("each rank reads only its own shards, straight to its GPU" if plan["shard_only_loading"]
           else "no safetensors files: every rank reads the whole checkpoint")
    chosen = next((c for c in plan["candidates"] if c["tensor_parallel"] == plan.get("tensor_parallel")), None)
    per_node = f", {chosen['host_per_node_gib']:g} GiB per node" if chosen else ""
    limit = f" (--host-mem-gib {plan['host_mem_gib']:g})" if plan["host_mem_gib"] is not None else ""
    return f"host memory at load: {plan['host_per_rank_gib']:g} GiB per rank ({how}){per_node}{limit}."


def run_plan(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    print(json.dumps(plan) if args.json else describe(plan))
    return 0 if plan["fits"] else EXIT_RUNTIME

"""The `dscluster` command: parse, call, print. Work happens in the modules each command names.

Exit codes (DESIGN.md): 0 success, 2 usage or bad input, 1 runtime failure, 3 a peer rank failed.
Heavy imports (torch, DeepSpeed, FastAPI) happen inside the commands that need them, so that
`dscluster env` and `dscluster k8s render` answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from dscluster.errors import EXIT_PEER_FAILED, EXIT_RUNTIME, EXIT_USAGE, PeerFailure, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _byte_size(text: str) -> int:
    """'4GiB', '512MiB', '1.5G', '1000000' -> bytes (K, M, G, T are powers of 1024, as memory is counted)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GiB, 512MiB or 1000000")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be a fraction in (0, 1]")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads the model and runs ranks (serve, batch)."""
    p.add_argument("model", help="a Hugging Face model directory (config.json) or package.module:factory")
    p.add_argument("--engine", choices=["tp", "zero3", "replicated"], default=None,
                   help="how to split the model (default: tp when world size > 1, else replicated)")
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=_positive_int, default=1, metavar="N",
                   help="pipeline stages: the decoder layers cut into N contiguous stages over consecutive "
                        "ranks, tensor parallel inside each stage over world/N ranks (tp within a node, "
                        "pp across nodes)")
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="spawn N local ranks (omit under torchrun, mpirun, deepspeed, srun)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="data-plane backend: auto = nccl on CUDA, gloo on CPU")
    p.add_argument("--checkpoint", default=None,
                   help="state_dict (.pt) or .safetensors file for an import-spec model")
    p.add_argument("--max-batch-size", type=_positive_int, default=32,
                   help="examples per predict batch (generation is limited by --max-num-seqs)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=32,
                   help="generation requests running at once (the rest wait to join)")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                   help="tokens computed per generation step: prompt chunks plus one per running request "
                        "(default: the larger of 256 and --max-num-seqs); smaller keeps steps short while "
                        "long prompts arrive")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="longest request, prompt plus output tokens (default: the model's context)")
    p.add_argument("--kv-cache-memory", type=_byte_size, default=None, metavar="BYTES",
                   help="bytes of key/value cache per rank, e.g. 4GiB (default: on a GPU, from "
                        "--gpu-memory-utilization; on a CPU, what the memory limit leaves after the weights, "
                        "at most 4 GiB when no limit is set)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                   help="fraction of each GPU for the weights, activations and key/value cache (default 0.9)")
    p.add_argument("--num-kv-blocks", type=_positive_int, default=None, metavar="N",
                   help="exactly N blocks of 16 tokens of key/value cache per rank, whatever the memory "
                        "(vLLM's --num-gpu-blocks-override: for tests and benchmarks)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cached keys and values of prompt prefixes already computed (default: on)")
    p.add_argument("--heartbeat-interval", type=_positive_float, default=1.0,
                   help="seconds between liveness heartbeats")
    p.add_argument("--heartbeat-timeout", type=_positive_float, default=10.0,
                   help="seconds without a heartbeat before a rank is declared failed")
    p.add_argument("--collective-timeout", type=_positive_float, default=600.0,
                   help="seconds a model collective may block before the group is declared broken")
    p.add_argument("--rendezvous-timeout", type=_positive_float, default=300.0,
                   help="seconds for every rank to join at start-up before the group gives up (exit 3)")
    p.add_argument("--log-level", default=os.environ.get("DSCLUSTER_LOG_LEVEL", "INFO"))




def _tool_call_parser(text: str) -> str:
    from dscluster.serving.tool_calls import PARSER_NAMES     # only when the flag is given: it imports pydantic

    if text not in PARSER_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(PARSER_NAMES)}")
    return text


def _add_tool_call_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tool-call-parser", type=_tool_call_parser, default="hermes", metavar="{hermes,llama3_json,none}",
                   help="how chat replies with tool_choice auto are read for tool calls (default hermes: "
                        "<tool_call>{json}</tool_call>, as Hermes, Qwen and the tiny model write them; llama3_json: "
                        "a reply of {\"name\", \"parameters\"} objects, as Llama 3.x writes them; none: "
                        "tool_choice auto is refused)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dscluster", description=__doc__.splitlines()[0])
    from dscluster import __version__

    parser.add_argument("--version", action="version", version=f"dscluster {__version__}")
    # The `deepspeed` launcher puts --local_rank=N before the command unless told --no_local_rank;
    # LOCAL_RANK in the environment says the same, so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # serve --------------------------------------------------------------------------------
    p = sub.add_parser("serve", help="serve a model from rank 0 over HTTP; other ranks run in lockstep")
    _add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-wait-ms", type=_non_negative_float, default=0.0,
                   help="how long an idle server holds a request for more to batch with it (default 0: "
                        "batches form from the requests that arrive while one runs)")
    p.add_argument("--max-queue", type=_positive_int, default=256, help="queued requests before 429")
    p.add_argument("--request-timeout", type=_non_negative_float, default=60.0,
                   help="seconds before 504 (0: no deadline)")
    p.add_argument("--api-key", default=os.environ.get("DSCLUSTER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (env DSCLUSTER_API_KEY)")
    p.add_argument("--metrics-without-api-key", action="store_true",
                   help="let GET /metrics through without the API key, so a Prometheus scrape needs no "
                        "secret (it shows counts and latencies, never request content)")
    p.add_argument("--served-model-name", default=None)
    _add_tool_call_parser(p)
    p.add_argument("--max-body-bytes", type=_positive_int, default=8 * 1024 * 1024)
    p.add_argument("--drain-delay", type=_non_negative_float, default=0.0, metavar="SECONDS",
                   help="after SIGTERM, answer readiness 503 but keep accepting and answering requests for "
                        "this long before draining, while endpoints and load balancers stop routing here "
                        "(default 0: drain at once; the rendered Kubernetes manifests pass 10)")
    p.set_defaults(handler=_cmd_serve)

    # batch --------------------------------------------------------------------------------
    p = sub.add_parser("batch", help="run a JSONL file of requests through the engine, write JSONL, exit")
    _add_engine_options(p)
    p.add_argument("--input", required=True, help="JSONL requests (OpenAI batch lines or predict bodies)")
    p.add_argument("--output", required=True, help="JSONL results; ids already there are skipped")
    p.add_argument("--served-model-name", default=None)
    _add_tool_call_parser(p)
    p.set_defaults(handler=_cmd_batch)

    # tiny-model ---------------------------------------------------------------------------
    p = sub.add_parser("tiny-model", help="write a small random Llama and its tokenizer to DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=_positive_int, default=2)
    p.add_argument("--hidden", type=_positive_int, default=128,
                   help="hidden size; a multiple of 64 unless --heads is given (attention heads are 64 wide)")
    p.add_argument("--heads", type=_positive_int, default=None,
                   help="attention heads (default hidden / 64); hidden must be heads x an even head width")
    p.add_argument("--kv-heads", type=_positive_int, default=None,
                   help="key/value heads, for grouped-query attention (default: --heads); must divide --heads")
    p.add_argument("--vocab-size", type=_positive_int, default=1024)
    p.add_argument("--max-shard-size", type=_byte_size, default=None,
                   help="largest weight file, e.g. 256MB or 1GiB: several files and their index json, as real "
                        "checkpoints are (default: one model.safetensors)")
    p.set_defaults(handler=_cmd_tiny_model)

    # env ----------------------------------------------------------------------------------
    p = sub.add_parser("env", help="print the discovered rendezvous as one line of JSON")
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="processes per node, for per-node launchers (LWS, Trainer torch)")
    p.add_argument("--check", action="store_true",
                   help="also join the process group and check an all-reduce (run on every rank)")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    p.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds to wait for every rank (--check)")
    p.set_defaults(handler=_cmd_env)

    # launch -------------------------------------------------------------------------------
    p = sub.add_parser("launch", help="run CMD as N local ranks: dscluster launch --nproc N -- CMD ... "
                                      "(under LWS or Trainer torch variables: this node's N ranks of the group)")
    p.add_argument("--nproc", type=_positive_int, required=True)
    p.add_argument("--grace", type=_non_negative_float, default=10.0,
                   help="seconds ranks get to exit after SIGTERM before SIGKILL")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_cmd_launch)

    # doctor -------------------------------------------------------------------------------
    p = sub.add_parser("doctor", help="preflight checks inside a pod or host")
    p.add_argument("--model", default=None, help="model directory to check")
    p.add_argument("--json", action="store_true")
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="ranks this pod runs (under LWS or a Trainer torch runtime, default: the --nproc of the "
                        "dscluster serve running here, else one per visible GPU)")
    p.add_argument("--timeout", type=_positive_float, default=3.0, help="seconds for network probes")
    p.add_argument("--require-gpu", action="store_true", help="no visible GPU is a failure, not a warning")
    p.set_defaults(handler=_cmd_doctor)

    # plan ---------------------------------------------------------------------------------
    p = sub.add_parser("plan", help="smallest tensor-parallel layout that fits, and where to run it")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="model directory (config.json and weights)")
    src.add_argument("--params", default=None, help="parameter count, e.g. 70e9")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--host-mem-gib", type=float, default=None,
                   help="host memory per node; layouts whose ranks hold more at load do not fit (default: not checked)")
    p.add_argument("--gpus-per-node", type=_positive_int, default=8)
    p.add_argument("--max-nodes", type=_positive_int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of each GPU the rank may use, as for serve; the KV pool gets what is left after "
                        "the weights and activations (0.9)")
    p.add_argument("--max-model-len", "--context-len", dest="max_model_len", type=_positive_int, default=None,
                   help="tokens per request, prompt plus output, as for serve (default: the model's context)")
    p.add_argument("--max-num-seqs", "--batch-size", dest="max_num_seqs", type=_positive_int, default=32,
                   help="requests of --max-model-len tokens the KV cache must hold at once, as for serve (32)")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                   help="tokens computed per step, which bound the activations, as for serve "
                        "(default: the larger of 256 and --max-num-seqs)")
    p.add_argument("--image", default=f"dscluster:{__version__}",
                   help="the image the printed render command names (push the Dockerfile's image to your registry)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_plan)

    # k8s ----------------------------------------------------------------------------------
    k8s = sub.add_parser("k8s", help="Kubernetes manifests: render and validate")
    ksub = k8s.add_subparsers(dest="k8s_command", required=True, parser_class=_Parser)
    from dscluster.k8s.options import add_render_options

    p = ksub.add_parser("render", help="write the manifests for one way of running as YAML")
    add_render_options(p)
    p.set_defaults(handler=_cmd_k8s_render)
    p = ksub.add_parser("validate", help="validate manifests strictly against Kubernetes and CRD schemas")
    p.add_argument("files", nargs="+")
    p.add_argument("--crds", default=None, help="directory of CRD YAML files")
    p.set_defaults(handler=_cmd_k8s_validate)
    return parser


# ------------------------------------------------------------------------------------------
# Handlers: each returns an exit code.


def _cmd_serve(args: argparse.Namespace) -> int:
    return _run_model(args, role="serve")


def _cmd_batch(args: argparse.Namespace) -> int:
    return _run_model(args, role="batch")


def _run_model(args: argparse.Namespace, role: str) -> int:
    from dscluster.engine.threads import bound_openmp_spin

    bound_openmp_spin()  # before torch loads (the runner imports it); local ranks inherit it
    from dscluster.runner import run

    return run(args, role=role)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from dscluster.tiny_model import write_tiny_model

    try:
        os.makedirs(args.dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"tiny-model: cannot create {args.dir}: {exc.strerror or exc}") from None
    path = write_tiny_model(args.dir, seed=args.seed, layers=args.layers, hidden=args.hidden,
                            vocab_size=args.vocab_size, heads=args.heads, kv_heads=args.kv_heads,
                            max_shard_size=args.max_shard_size)
    print(path)
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from dscluster.cluster.rendezvous import discover

    rdzv = discover(nproc_per_node=args.nproc)
    if not args.check:
        print(rdzv.to_json())
        return 0
    import json

    from dscluster.cluster.group import check_all_reduce, destroy_groups, init_groups

    groups = init_groups(rdzv, args.backend, timeout_s=args.timeout)
    total = check_all_reduce(groups)  # raises when a rank joined another group
    destroy_groups()
    print(json.dumps({**json.loads(rdzv.to_json()), "backend": groups.backend, "all_reduce": total}))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from dscluster.cluster.launch import launch

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("launch needs a command after --, e.g. dscluster launch --nproc 2 -- dscluster env")
    import shutil

    if shutil.which(cmd[0]) is None:
        raise UsageError(f"launch: {cmd[0]}: no such program (or not executable)")
    from dscluster.cluster.rendezvous import PER_NODE_LAUNCHERS, discover

    # Under a per-node launcher (an LWS pod, a Trainer torch node) this process is the node's agent:
    # its ranks continue the numbering of the nodes before it, towards the launcher's master.
    rdzv = discover(nproc_per_node=args.nproc)
    node = rdzv if rdzv.launcher in PER_NODE_LAUNCHERS else None
    return launch(cmd, nproc=args.nproc, grace=args.grace, rdzv=node)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from dscluster.doctor import run_doctor

    return run_doctor(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from dscluster.plan import run_plan

    return run_plan(args)


def _cmd_k8s_render(args: argparse.Namespace) -> int:
    from dscluster.k8s.render import render

    sys.stdout.write(render(args.kind, args))
    return 0


def _cmd_k8s_validate(args: argparse.Namespace) -> int:
    from dscluster.k8s.validate import run_validate

    return run_validate(args.files, crds_dir=args.crds)


def main(argv: list[str] | None = None) -> int:
    code = run_command(argv)
    group = sys.modules.get("dscluster.cluster.group")  # imported only by commands that join a group
    return group.exit_now_if_joined(code) if group is not None else code


def run_command(argv: list[str] | None = None) -> int:
    """Parse and run one command; its exit code (argparse raises SystemExit for usage errors and
    --help). `main` adds the end of a process that joined a group; the tests call this in their own
    process for commands that join none."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # local ranks re-run the same command
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from dscluster.cluster.rendezvous import RendezvousError

    try:
        return args.handler(args)
    except (UsageError, RendezvousError) as exc:
        print(f"dscluster: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PeerFailure as exc:
        print(f"dscluster: peer failure: {exc}", file=sys.stderr)
        return EXIT_PEER_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, exits 1
        logging.getLogger("dscluster").debug("failure", exc_info=True)
        print(f"dscluster: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    raise SystemExit(main())

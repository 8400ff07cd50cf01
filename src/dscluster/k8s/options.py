"""Flags of `dscluster k8s render` (kept beside the renderers that read them), and their checks."""

from __future__ import annotations

import argparse
import re

from dscluster.errors import UsageError

KINDS = ("mpijob", "trainjob", "lws", "deployment")
# Kinds whose one group spans several pods; a Deployment runs the whole group in one pod.
MULTI_NODE_KINDS = ("mpijob", "trainjob", "lws")
# What restarts a broken group, per kind (first: the default): the MPIJob launcher's restartPolicy
# (the MPI Operator accepts OnFailure and Never), the JobSet failurePolicy.restartStrategy of the
# Trainer runtime, the LeaderWorkerSet restartPolicy. A Deployment restarts its pod's container.
RESTART_POLICIES = {
    "mpijob": ("OnFailure", "Never"),
    "trainjob": ("Recreate", "BlockingRecreate"),
    "lws": ("RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"),
}
# Kinds with a bounded number of group restarts: MPIJob runPolicy.backoffLimit, JobSet
# failurePolicy.maxRestarts. LWS and Deployments restart without limit.
MAX_RESTARTS_KINDS = ("mpijob", "trainjob")
DEFAULT_MAX_RESTARTS = 6
DEFAULT_DRAIN_DELAY = 10.0
DEFAULT_REQUEST_TIMEOUT = 60.0
NCCL_DEBUG_LEVELS = ("VERSION", "WARN", "INFO", "TRACE")
ENGINES = ("tp", "zero3", "replicated")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Derived names add at most "-checkpoints" / "-launcher-0-0" and a 5-character pod suffix; 40
# characters keep every pod name and hostname below the 63-character DNS label limit.
MAX_NAME_LEN = 40
MAX_GPUS_PER_NODE = 16
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Linux interface names: at most 15 characters, no slash or whitespace. NCCL also accepts a
# comma-separated list and the ^ (exclude) and = (exact) prefixes.
IFNAME = re.compile(r"^[\^=]?[A-Za-z0-9_.:@-]{1,15}(,[A-Za-z0-9_.:@-]{1,15})*$")


def add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("--name", default="dscluster",
                   help=f"base name of every object (DNS-1035 label, at most {MAX_NAME_LEN} characters)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", default="dscluster:latest")
    p.add_argument("--nodes", type=int, default=None,
                   help="pods (nodes) per group (default 2; deployment: 1, the only value it takes)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per pod; 0 runs on CPU over gloo")
    p.add_argument("--model", default="/mnt/checkpoints/model", help="model path inside the pod")
    p.add_argument("--pvc-size", default="100Gi", help="size of the checkpoint PVC")
    p.add_argument("--existing-pvc", default=None, metavar="NAME",
                   help="mount this PVC instead of creating <name>-checkpoints")
    p.add_argument("--storage-class", default=None, help="storageClassName of the created PVC")
    p.add_argument("--nccl-socket-ifname", default="eth0",
                   help="interface for NCCL and gloo bootstrap traffic (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)")
    p.add_argument("--nccl-ib-disable", action="store_true", help="set NCCL_IB_DISABLE=1 (no InfiniBand/RoCE)")
    p.add_argument("--nccl-debug", default="WARN", choices=list(NCCL_DEBUG_LEVELS))
    p.add_argument("--replicas", type=int, default=1,
                   help="independent copies of the whole group: LeaderWorkerSet groups, Deployment pods "
                        "(lws and deployment only)")
    p.add_argument("--engine", choices=list(ENGINES), default=None,
                   help="parallel engine (default tp when more than one rank, else replicated)")
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1, metavar="N",
                   help="serve --pp: pipeline stages over the group's ranks, tensor parallel inside each "
                        "(across nodes: --pp NODES, one stage per node)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of rank 0")
    p.add_argument("--api-key-secret", default=None, metavar="NAME",
                   help="Secret with key api-key, exposed to the server as DSCLUSTER_API_KEY")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                   help="serve --request-timeout (0: no deadline, drained for up to 60 s)")
    p.add_argument("--drain-delay", type=float, default=DEFAULT_DRAIN_DELAY, metavar="SECONDS",
                   help="serve --drain-delay: after SIGTERM, seconds of 503 readiness while requests are still "
                        "answered, so that endpoints stop routing here before the drain; "
                        "terminationGracePeriodSeconds covers it plus the request timeout")
    restart = "; ".join(f"{kind}: {', '.join(values)}" for kind, values in RESTART_POLICIES.items())
    p.add_argument("--restart-policy", default=None, metavar="POLICY",
                   help=f"what restarts a broken group (first: default) - {restart}")
    p.add_argument("--max-restarts", type=int, default=None, metavar="N",
                   help=f"group restarts before the job fails (mpijob: runPolicy.backoffLimit, trainjob: "
                        f"failurePolicy.maxRestarts; default {DEFAULT_MAX_RESTARTS})")


def check_options(opts: argparse.Namespace) -> None:
    """Raise UsageError naming the first bad flag; fill in the per-kind defaults."""
    _check_kind_options(opts)
    name = opts.name
    if not DNS1035_LABEL.match(name or ""):
        raise UsageError(f"--name {name!r} is not a DNS-1035 label (lowercase letters, digits and '-', "
                         "starting with a letter, ending with a letter or digit)")
    if len(name) > MAX_NAME_LEN:
        raise UsageError(f"--name {name!r} is {len(name)} characters; at most {MAX_NAME_LEN} so that "
                         "derived pod and Service names stay valid DNS labels")
    if not DNS1123_LABEL.match(opts.namespace or "") or len(opts.namespace) > 63:
        raise UsageError(f"--namespace {opts.namespace!r} is not a DNS-1123 label")
    if not opts.image or any(c.isspace() for c in opts.image):
        raise UsageError(f"--image {opts.image!r} is not an image reference")
    if opts.nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {opts.nodes}")
    if not 0 <= opts.gpus_per_node <= MAX_GPUS_PER_NODE:
        raise UsageError(f"--gpus-per-node must be between 0 and {MAX_GPUS_PER_NODE}, got {opts.gpus_per_node}")
    if opts.replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {opts.replicas}")
    ranks = opts.nodes * max(1, opts.gpus_per_node)
    if opts.pp < 1 or ranks % opts.pp:
        raise UsageError(f"--pp {opts.pp} must divide the group's {ranks} ranks (--nodes x --gpus-per-node)")
    if opts.pp > 1 and opts.engine not in (None, "tp"):
        raise UsageError(f"--pp runs tensor parallelism inside each stage: drop --engine {opts.engine}")
    if opts.replicas != 1 and opts.kind not in ("lws", "deployment"):
        raise UsageError(f"--replicas applies to lws and deployment only; {opts.kind} runs one group")
    if not 1 <= opts.port <= 65535 or opts.port == 29500:
        raise UsageError(f"--port must be 1..65535 and not 29500 (the rendezvous port), got {opts.port}")
    if not opts.model or not opts.model.startswith("/") and ":" not in opts.model:
        raise UsageError(f"--model {opts.model!r} must be an absolute path in the pod or package.module:factory")
    if not QUANTITY.match(str(opts.pvc_size)):
        raise UsageError(f"--pvc-size {opts.pvc_size!r} is not a Kubernetes quantity (e.g. 100Gi)")
    if opts.existing_pvc is not None and (not DNS1123_SUBDOMAIN.match(opts.existing_pvc)
                                          or len(opts.existing_pvc) > 253):
        raise UsageError(f"--existing-pvc {opts.existing_pvc!r} is not a valid PVC name")
    if opts.storage_class is not None and not DNS1123_SUBDOMAIN.match(opts.storage_class):
        raise UsageError(f"--storage-class {opts.storage_class!r} is not a valid StorageClass name")
    if opts.api_key_secret is not None and (not DNS1123_SUBDOMAIN.match(opts.api_key_secret)
                                            or len(opts.api_key_secret) > 253):
        raise UsageError(f"--api-key-secret {opts.api_key_secret!r} is not a valid Secret name")
    if not IFNAME.match(opts.nccl_socket_ifname or ""):
        raise UsageError(f"--nccl-socket-ifname {opts.nccl_socket_ifname!r} is not a network interface name")


def _check_kind_options(opts: argparse.Namespace) -> None:
    """The flags whose meaning or default depends on the kind."""
    kind = opts.kind
    if opts.nodes is None:
        opts.nodes = 2 if kind in MULTI_NODE_KINDS else 1
    if kind == "deployment" and opts.nodes != 1:
        raise UsageError(f"--nodes {opts.nodes}: a deployment runs the whole model in one pod (one node); "
                         "render mpijob, trainjob or lws for a group across nodes")
    for flag, value in (("--drain-delay", opts.drain_delay), ("--request-timeout", opts.request_timeout)):
        if not value >= 0 or value > 3600:
            raise UsageError(f"{flag} must be between 0 and 3600 seconds, got {value:g}")
    allowed = RESTART_POLICIES.get(kind, ())
    if opts.restart_policy is None:
        opts.restart_policy = allowed[0] if allowed else None
    elif not allowed:
        raise UsageError(f"--restart-policy does not apply to {kind}: Kubernetes restarts the pod's container")
    elif opts.restart_policy not in allowed:
        raise UsageError(f"--restart-policy {opts.restart_policy!r} is not one of {kind}'s: {', '.join(allowed)}")
    if opts.max_restarts is None:
        opts.max_restarts = DEFAULT_MAX_RESTARTS if kind in MAX_RESTARTS_KINDS else None
    elif kind not in MAX_RESTARTS_KINDS:
        raise UsageError(f"--max-restarts does not apply to {kind}: it restarts without limit")
    elif opts.max_restarts < 0:
        raise UsageError(f"--max-restarts must be at least 0, got {opts.max_restarts}")

"""Flags of `dscluster k8s render` (kept beside the renderers that read them), and their checks."""

from __future__ import annotations

import argparse
import re

from dscluster.errors import UsageError

KINDS = ("mpijob", "trainjob", "lws", "deployment")
# What `k8s render` also prints that is not a workload: the Grafana dashboard, a Prometheus scrape
# configuration and Prometheus alerting rules (monitor.py).
MONITORING_KINDS = ("dashboard", "scrape-config", "alert-rules")
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
# A non-streamed completion of a large model runs for minutes (4096 tokens at 20 tokens/s is 205 s):
# 600 s lets it finish; the grace period (drain + timeout + margin) follows.
DEFAULT_REQUEST_TIMEOUT = 600.0
# Loading a large model from a PVC: the time until /health/ready first answers 200, after which
# liveness takes over. A group that has not loaded by then is restarted.
DEFAULT_LOAD_TIMEOUT = 1800.0
GANGS = ("volcano", "scheduler-plugins", "kueue")
# The scheduler that runs each gang plugin, as their installation manifests name it (kueue uses the
# default scheduler: it admits whole groups before any pod is created).
GANG_SCHEDULER_NAMES = {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}
DEFAULT_GANG_TIMEOUT = 600
LWS_VERSIONS = ("0.10", "0.8")
# LWS fields and values by the release that introduced them (the version an older install rejects).
LWS_RESTART_POLICY_SINCE = {"RecreateGroupAfterStart": "0.10"}
PVC_ACCESS_MODES = ("ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce", "ReadWriteOncePod")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
HF_REPO = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?$")
DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")
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
    p.add_argument("kind", choices=list(KINDS + MONITORING_KINDS),
                   help="a workload kind, or dashboard (Grafana JSON), scrape-config (Prometheus configuration), "
                        "alert-rules (Prometheus rule file)")
    p.add_argument("--name", default="dscluster",
                   help=f"base name of every object (DNS-1035 label, at most {MAX_NAME_LEN} characters)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", default="dscluster:latest")
    p.add_argument("--nodes", type=int, default=None,
                   help="pods (nodes) per group (default 2; deployment: 1, the only value it takes)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per pod; 0 runs on CPU over gloo")
    p.add_argument("--model", default="/mnt/checkpoints/model", help="model path inside the pod")
    p.add_argument("--pvc-size", default="100Gi",
                   help="size of the checkpoint PVC (`dscluster plan --model` prints one that holds the weights)")
    p.add_argument("--pvc-access-mode", default="ReadWriteMany", choices=list(PVC_ACCESS_MODES),
                   help="access mode of the created PVC (ReadWriteMany: pods on several nodes, and the download "
                        "Job, mount it)")
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
                   help=f"serve --request-timeout (default {DEFAULT_REQUEST_TIMEOUT:g}: a long non-streamed generation "
                        "of a large model finishes; 0: no deadline, drained for up to 60 s)")
    p.add_argument("--load-timeout", type=float, default=DEFAULT_LOAD_TIMEOUT, metavar="SECONDS",
                   help=f"time the group gets to form and load the model before it is restarted; only readiness "
                        f"(/health/ready) ends it (default {DEFAULT_LOAD_TIMEOUT:g})")
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
    p.add_argument("--lws-version", choices=list(LWS_VERSIONS), default=LWS_VERSIONS[0],
                   help="the LeaderWorkerSet release installed (Kubeflow Trainer v2.3 installs 0.8): fields it "
                        "lacks are refused (lws only)")
    _add_gang_options(p)
    _add_pod_options(p)
    _add_monitoring_options(p)


def _add_gang_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gang scheduling (gang.py): a group's pods are placed together or not at all")
    g.add_argument("--gang", choices=list(GANGS), default=None,
                   help="volcano or scheduler-plugins (coscheduling): a PodGroup per group; kueue: Kueue admits "
                        "the whole group (default: none)")
    g.add_argument("--queue", default=None, metavar="NAME",
                   help="the Volcano queue, or Kueue's LocalQueue (required with --gang kueue)")
    g.add_argument("--priority-class", default=None, metavar="NAME",
                   help="PriorityClass of every pod of the group (and of its PodGroup)")
    g.add_argument("--scheduler-name", default=None, metavar="NAME",
                   help="schedulerName of the pods with volcano or scheduler-plugins (default: volcano, "
                        "scheduler-plugins-scheduler; default-scheduler where the plugin runs in it)")
    g.add_argument("--gang-timeout", type=int, default=DEFAULT_GANG_TIMEOUT, metavar="SECONDS",
                   help=f"scheduler-plugins: how long a partly placed group may hold its nodes "
                        f"(scheduleTimeoutSeconds, default {DEFAULT_GANG_TIMEOUT})")
    g.add_argument("--exclusive-topology", default=None, metavar="LABEL",
                   help="lws: one group per value of this node label (e.g. a rack or NVLink domain label), "
                        "the leaderworkerset.sigs.k8s.io/exclusive-topology annotation")


def _add_pod_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pods: resources and placement")
    g.add_argument("--cpu", default=None, metavar="QTY",
                   help="CPU request of a rank pod (default 2 per rank); no CPU limit, so ranks are never throttled")
    g.add_argument("--memory", default=None, metavar="QTY",
                   help="memory request of a rank pod (default: plan's host memory per rank x ranks, plus /dev/shm)")
    g.add_argument("--memory-limit", default=None, metavar="QTY",
                   help="memory limit of a rank pod (default: twice the request)")
    g.add_argument("--shm-size", default=None, metavar="QTY",
                   help="sizeLimit of the memory-backed /dev/shm (default 1Gi per rank, at least 1Gi); it counts "
                        "towards the pod's memory")
    g.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="nodeSelector of the rank pods (repeatable)")
    g.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                   help="a toleration of every pod (repeatable), e.g. nvidia.com/gpu=present:NoSchedule")
    g.add_argument("--rdma-resource", action="append", default=[], metavar="NAME[=COUNT]",
                   help="an RDMA/InfiniBand device resource each rank pod requests (repeatable), e.g. "
                        "rdma/rdma_shared_device_a=1 or nvidia.com/hostdev=8; adds the IPC_LOCK capability")
    g.add_argument("--ipc-lock", action="store_true",
                   help="add the IPC_LOCK capability (RDMA registers pinned memory; implied by --rdma-resource)")
    g.add_argument("--network", action="append", default=[], metavar="NAME",
                   help="a secondary network attached to the rank pods (Multus k8s.v1.cni.cncf.io/networks; "
                        "repeatable); pair with --nccl-socket-ifname net1")
    g.add_argument("--download", default=None, metavar="REPO",
                   help="render a Job that downloads this Hugging Face repository's safetensors weights, config "
                        "and tokenizer into --model on the PVC; rank pods wait for it")
    g.add_argument("--revision", default=None, help="with --download: the branch, tag or commit")
    g.add_argument("--hf-token-secret", default=None, metavar="NAME",
                   help="with --download: a Secret with key `token`, given to the download as HF_TOKEN")


def _add_monitoring_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("monitoring and routing (monitor.py, inference_pool.py)")
    g.add_argument("--monitor", action="store_true",
                   help="add a prometheus-operator PodMonitor for rank 0's /metrics")
    g.add_argument("--monitor-label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label of the PodMonitor, for the Prometheus' podMonitorSelector (e.g. release=prometheus)")
    g.add_argument("--scrape-interval", default="15s", metavar="DURATION",
                   help="how often Prometheus scrapes /metrics (PodMonitor, scrape-config)")
    g.add_argument("--inference-pool", action="store_true",
                   help="add a Gateway API Inference Extension InferencePool over the serving pods "
                        "(deployment, lws: the leaders)")
    g.add_argument("--epp-service", default=None, metavar="NAME",
                   help="the endpoint picker's Service the InferencePool names (default <name>-epp)")
    g.add_argument("--epp-port", type=int, default=9002, help="the endpoint picker's gRPC port (9002)")
    g.add_argument("--target", action="append", default=[], metavar="HOST:PORT",
                   help="scrape-config: rank 0's HTTP address to scrape (repeatable, at least one)")
    g.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="scrape-config: send the API key in this file as a bearer token")
    g.add_argument("--rule-file", action="append", default=[], metavar="PATH",
                   help="scrape-config: rule files Prometheus loads (e.g. the output of `render alert-rules`)")


def parse_pairs(values: list[str], flag: str, *, value_required: bool = True) -> dict[str, str]:
    """KEY=VALUE flags into a dict (a label key, a label value), or a one-line UsageError."""
    out: dict[str, str] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not QUALIFIED_NAME.match(key) or (value_required and not eq) or not LABEL_VALUE.match(value):
            raise UsageError(f"{flag} {item!r} is not KEY=VALUE with a label key and value")
        out[key] = value
    return out


def parse_toleration(text: str) -> dict[str, str]:
    """KEY[=VALUE][:EFFECT] -> a toleration (Equal with a value, Exists without)."""
    rest, _, effect = text.rpartition(":") if ":" in text else (text, "", "")
    key, eq, value = rest.partition("=")
    if not QUALIFIED_NAME.match(key) or (eq and not LABEL_VALUE.match(value)) or \
            (effect and effect not in TOLERATION_EFFECTS):
        raise UsageError(f"--toleration {text!r} is not KEY[=VALUE][:EFFECT] (effects: {', '.join(TOLERATION_EFFECTS)})")
    tol = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def parse_rdma(text: str) -> tuple[str, str]:
    name, eq, count = text.partition("=")
    if "/" not in name or not QUALIFIED_NAME.match(name) or (eq and not count.isdigit()) or count == "0":
        raise UsageError(f"--rdma-resource {text!r} is not NAME[=COUNT] with a domain-prefixed resource name "
                         "(e.g. rdma/rdma_shared_device_a=1)")
    return name, count or "1"


def _check_quantity(flag: str, value: str | None) -> None:
    if value is not None and (not QUANTITY.match(str(value)) or str(value).startswith("-")):
        raise UsageError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")


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
    _check_pod_options(opts)
    _check_gang_options(opts)
    _check_monitoring_options(opts)


def _check_pod_options(opts: argparse.Namespace) -> None:
    for flag in ("cpu", "memory", "memory_limit", "shm_size"):
        _check_quantity("--" + flag.replace("_", "-"), getattr(opts, flag))
    parse_pairs(opts.node_selector, "--node-selector")
    for t in opts.toleration:
        parse_toleration(t)
    for r in opts.rdma_resource:
        parse_rdma(r)
    for net in opts.network:
        if not DNS1123_SUBDOMAIN.match(net.rpartition("/")[2]) or net.count("/") > 1:
            raise UsageError(f"--network {net!r} is not a NetworkAttachmentDefinition name ([namespace/]name)")
    if opts.pvc_access_mode in ("ReadWriteOnce", "ReadWriteOncePod") and (opts.nodes > 1 or opts.replicas > 1):
        raise UsageError(f"--pvc-access-mode {opts.pvc_access_mode} mounts the volume on one node (one pod for "
                         "ReadWriteOncePod); this layout runs pods on several: use ReadWriteMany or ReadOnlyMany")
    if opts.download is not None:
        if not HF_REPO.match(opts.download):
            raise UsageError(f"--download {opts.download!r} is not a Hugging Face repository id (owner/name)")
        if opts.existing_pvc is None and opts.pvc_access_mode == "ReadOnlyMany":
            raise UsageError("--download writes the weights onto the PVC: --pvc-access-mode ReadOnlyMany cannot "
                             "be written; use ReadWriteMany")
        if not opts.model.startswith("/mnt/checkpoints/"):
            raise UsageError(f"--download writes to the PVC mounted at /mnt/checkpoints: --model {opts.model!r} "
                             "must be a directory there")
    elif opts.revision is not None or opts.hf_token_secret is not None:
        raise UsageError("--revision and --hf-token-secret apply to --download only")
    if opts.revision is not None and not re.match(r"^[-A-Za-z0-9_./]+$", opts.revision):
        raise UsageError(f"--revision {opts.revision!r} is not a branch, tag or commit")
    if opts.hf_token_secret is not None and not DNS1123_SUBDOMAIN.match(opts.hf_token_secret):
        raise UsageError(f"--hf-token-secret {opts.hf_token_secret!r} is not a valid Secret name")


def _check_gang_options(opts: argparse.Namespace) -> None:
    from dscluster.k8s import gang

    gang.check(opts)


def _check_monitoring_options(opts: argparse.Namespace) -> None:
    parse_pairs(opts.monitor_label, "--monitor-label")
    if not DURATION.match(opts.scrape_interval or ""):
        raise UsageError(f"--scrape-interval {opts.scrape_interval!r} is not a duration such as 15s or 1m")
    if opts.inference_pool and opts.kind not in ("deployment", "lws"):
        raise UsageError(f"--inference-pool applies to the kinds that serve behind a gateway, deployment and lws; "
                         f"{opts.kind} is one job")
    if opts.epp_service is not None and (not DNS1035_LABEL.match(opts.epp_service) or len(opts.epp_service) > 63):
        raise UsageError(f"--epp-service {opts.epp_service!r} is not a Service name (DNS-1035 label)")
    if not 1 <= opts.epp_port <= 65535:
        raise UsageError(f"--epp-port must be 1..65535, got {opts.epp_port}")
    if opts.target or opts.api_key_file or opts.rule_file:
        raise UsageError("--target, --api-key-file and --rule-file apply to `render scrape-config` only")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


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
    since = LWS_RESTART_POLICY_SINCE.get(opts.restart_policy) if kind == "lws" else None
    if since and _version(opts.lws_version) < _version(since):
        raise UsageError(f"--restart-policy {opts.restart_policy} needs LeaderWorkerSet {since} or later; "
                         f"--lws-version {opts.lws_version} rejects it")
    if opts.lws_version != LWS_VERSIONS[0] and kind != "lws":
        raise UsageError("--lws-version applies to lws only")
    for flag, value in (("--load-timeout", opts.load_timeout),):
        if not 60 <= value <= 86400:
            raise UsageError(f"{flag} must be between 60 and 86400 seconds, got {value:g}")
    if opts.max_restarts is None:
        opts.max_restarts = DEFAULT_MAX_RESTARTS if kind in MAX_RESTARTS_KINDS else None
    elif kind not in MAX_RESTARTS_KINDS:
        raise UsageError(f"--max-restarts does not apply to {kind}: it restarts without limit")
    elif opts.max_restarts < 0:
        raise UsageError(f"--max-restarts must be at least 0, got {opts.max_restarts}")

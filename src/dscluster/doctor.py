"""`dscluster doctor`: why this pod (or host) would not join the group, before NCCL hangs on it.

Each check answers PASS, WARN or FAIL with a one-line fix. Exit 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dscluster.cluster.gpus import gpu_count
from dscluster.cluster.names import NotResolved, resolve
from dscluster.cluster.rendezvous import Rendezvous, RendezvousError, discover, select_row
from dscluster.errors import EXIT_RUNTIME, UsageError

GIB = 1024**3
SHM_MIN = 1 * GIB          # Docker's 64 MiB default breaks NCCL and DeepSpeed's shared memory
DISK_MIN = 1 * GIB


@dataclass
class Check:
    name: str
    status: str            # PASS, WARN, FAIL
    message: str
    fix: str = ""


def check_rendezvous(args, environ=None) -> tuple[Check, Rendezvous | None]:
    environ = os.environ if environ is None else environ
    nproc, note = args.nproc, ""
    row = select_row(environ)
    if nproc is None and row is not None and row.per_node:
        # A per-node launcher's variables count nodes, not ranks: an LWS group of 2 pods of 8 GPUs
        # is 16 ranks. doctor is not the launcher, so it asks what this pod runs: a server with this
        # pod's launcher variables and master (another group's on a shared host has another port).
        same = (*row.markers, row.master_addr, row.master_port)
        nproc, note = pod_ranks({m: environ[m] for m in same if m and m in environ})
    try:
        rdzv = discover(environ, nproc_per_node=nproc)
    except RendezvousError as exc:
        return Check("rendezvous", "FAIL", str(exc), "set the launcher's variables consistently"), None
    return Check("rendezvous", "PASS",
                 f"rank {rdzv.rank} of {rdzv.world_size} (local {rdzv.local_rank} of {rdzv.local_world_size}), "
                 f"master {rdzv.master_addr}:{rdzv.master_port}, launcher {rdzv.launcher}{note}"), rdzv


def _serve_nproc(same_env: dict[str, str], proc: Path = Path("/proc")) -> int | None:
    """The --nproc of a `dscluster serve` (or `launch`) running here for the same group member: a
    process whose launcher variables (`same_env`: LWS_WORKER_INDEX, ...) are this one's."""
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            words = re.split(r"[\0\s]+", cmdline.read_bytes().decode(errors="replace"))
            if not any(w.endswith("dscluster") for w in words):
                continue
            environ = dict(item.partition("=")[::2] for item in
                           (cmdline.parent / "environ").read_bytes().decode(errors="replace").split("\0") if item)
        except OSError:
            continue
        if any(environ.get(k) != v for k, v in same_env.items()):
            continue
        for i, word in enumerate(words[:-1]):
            if word.endswith("dscluster") and words[i + 1] in ("serve", "launch") and "--nproc" in words:
                value = words[words.index("--nproc") + 1]
                if value.isdigit() and int(value) > 0:
                    return int(value)
    return None


def pod_ranks(same_env: dict[str, str]) -> tuple[int, str]:
    """Ranks this pod runs under a per-node launcher when --nproc is not given: the --nproc of the
    server running here, else one per visible GPU (what `k8s render` runs), else one."""
    running = _serve_nproc(same_env)
    if running is not None:
        return running, f" (--nproc {running}, from the dscluster serve running in this pod)"
    gpus = gpu_count()
    if gpus:
        return gpus, f" (--nproc not given: {gpus}, one rank per visible GPU, as the rendered pods run)"
    return 1, " (--nproc not given and no GPU: one rank per pod; pass --nproc if the pod runs more)"


def check_heads(spec: str, rdzv: Rendezvous) -> Check | None:
    """Tensor parallelism gives every rank whole attention heads: the group's size must divide them."""
    try:
        config = json.loads((Path(spec) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # check_model reports it
    config = {**config.get("text_config", {}), **config}
    heads = next((config[k] for k in ("num_attention_heads", "n_head", "num_heads") if config.get(k)), None)
    world = rdzv.world_size
    if not isinstance(heads, int) or world == 1:
        return None
    if heads % world:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        return Check("heads", "FAIL", f"the model's {heads} attention heads do not divide by the group's {world} "
                     "ranks: tensor parallelism (--engine tp, the default with several ranks) gives each rank "
                     "whole heads", f"run a number of ranks that divides {heads} (nodes x GPUs per node: "
                     f"{', '.join(map(str, divisors[-6:]))}), or --engine zero3")
    return Check("heads", "PASS", f"{heads} attention heads: {heads // world} per rank over {world} ranks")


def check_master(rdzv: Rendezvous, timeout: float) -> Check:
    addr, port = rdzv.master_addr, rdzv.master_port
    if rdzv.world_size == 1:
        return Check("master", "PASS", "single process: no master needed")
    try:  # bounded: a DNS server that never answers must not hang doctor
        addresses = resolve(addr, port, timeout)
    except NotResolved as exc:
        if exc.timed_out:
            return Check("master", "FAIL", f"MASTER_ADDR {addr} did not resolve within {timeout:g} s",
                         "check the pod's DNS (dnsPolicy, CoreDNS) or use rank 0's IP address")
        return Check("master", "FAIL", f"MASTER_ADDR {addr} does not resolve ({exc.reason})",
                     "use the headless Service's name for rank 0's pod, and check its selector and namespace")
    if rdzv.rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as exc:
                return Check("master", "FAIL", f"port taken: rank 0 cannot listen on MASTER_PORT {port} "
                             f"({exc.strerror})", "stop whatever holds the port, or choose another MASTER_PORT")
        if not any(_is_local(a) for a in addresses):
            return Check("master", "WARN", f"rank 0: MASTER_PORT {port} is free, but MASTER_ADDR {addr} resolves to "
                         f"{', '.join(addresses)}, not an address of this host: other ranks will look elsewhere",
                         "point MASTER_ADDR at rank 0's own pod (a headless Service, not a ClusterIP one)")
        return Check("master", "PASS", f"rank 0: MASTER_PORT {port} is free to listen on; {addr} is this host")
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return Check("master", "PASS", f"{addr}:{port} accepts connections")
    except ConnectionRefusedError:
        return Check("master", "WARN", f"{addr}:{port} refused the connection: master not listening yet "
                     "(normal before rank 0 starts)", "if rank 0 is running, check MASTER_PORT on both sides")
    except OSError as exc:
        reason = f"did not answer within {timeout:g} s" if isinstance(exc, TimeoutError) else f"is unreachable ({exc})"
        return Check("master", "FAIL", f"{addr}:{port} {reason}",
                     "check NetworkPolicies, the Service's port 29500 and that rank 0's pod is scheduled")


def _is_local(address: str) -> bool:
    """Whether this host can bind `address` (one of its own, or a wildcard/loopback)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def interface_matches(spec: str, names: list[str], prefix_match: bool) -> tuple[list[str], str | None]:
    """Interfaces a *_SOCKET_IFNAME value selects, and the problem when it selects none.

    NCCL (prefix_match=True): a comma-separated list of name prefixes; a leading `^` excludes the
    listed ones instead, and `=` (after any `^`) makes the whole list exact names: `eth`, `^lo,docker`,
    `=eth0`, `^=docker0`. gloo: comma-separated exact names, no `^`.
    """
    rest, exclude, exact = spec, False, not prefix_match
    if prefix_match:
        if rest.startswith("^"):
            exclude, rest = True, rest[1:]
        if rest.startswith("="):
            exact, rest = True, rest[1:]
    elif rest.startswith(("^", "=")):
        return [], f"{spec!r}: gloo takes exact interface names, without NCCL's ^ or = prefixes"
    parts = [p for p in rest.split(",") if p]
    if not parts:
        return [], f"{spec!r} names no interface"
    selected = [name for name in names
                if any(name == p if exact else name.startswith(p) for p in parts) != exclude]
    if not selected:
        return [], f"{spec!r} selects no interface here (there are: {', '.join(names)})"
    return selected, None


def check_interfaces(environ) -> list[Check]:
    names = [name for _, name in socket.if_nameindex()]
    checks = []
    for var, prefix in (("NCCL_SOCKET_IFNAME", True), ("GLOO_SOCKET_IFNAME", False)):
        spec = environ.get(var)
        if not spec:
            checks.append(Check(var, "PASS", "not set: the library picks an interface"))
            continue
        selected, problem = interface_matches(spec, names, prefix)
        if problem:
            checks.append(Check(var, "FAIL", f"{var}={problem}",
                                f"set {var} to this pod's interface (often eth0)"))
        else:
            checks.append(Check(var, "PASS", f"{var}={spec} selects {', '.join(selected)}"))
    return checks


def check_gpus(rdzv: Rendezvous | None, require_gpu: bool = False, count: int | None = None) -> Check:
    count = gpu_count() if count is None else count
    local = rdzv.local_world_size if rdzv else 1
    if count == 0:
        if require_gpu:
            return Check("gpus", "FAIL", "no GPU visible, and a GPU is required",
                         "request nvidia.com/gpu in the pod and check the NVIDIA device plugin on the node")
        return Check("gpus", "WARN", "no GPU: gloo backend (ranks run on CPU)",
                     "on GPU nodes: request nvidia.com/gpu and check the device plugin")
    if count < local:
        return Check("gpus", "FAIL", f"{local} local ranks but {count} GPU(s) visible",
                     "request one nvidia.com/gpu per local rank, or start fewer ranks per node (--nproc)")
    return Check("gpus", "PASS", f"{count} GPU(s) visible for {local} local rank(s)")


def check_shm(path: str = "/dev/shm", minimum: int = SHM_MIN) -> Check:
    try:
        stat = os.statvfs(path)
    except OSError:
        return Check("shm", "WARN", f"{path} is missing", "mount an emptyDir with medium: Memory at /dev/shm")
    size = stat.f_blocks * stat.f_frsize
    if size < minimum:
        return Check("shm", "WARN", f"{path} is {size / 2**20:.0f} MiB; NCCL and DeepSpeed need more",
                     "mount an emptyDir with medium: Memory at /dev/shm (dscluster k8s render does)")
    return Check("shm", "PASS", f"{path} is {size / GIB:.1f} GiB")


def check_model(spec: str) -> list[Check]:
    if ":" in spec and not Path(spec).exists():
        module = spec.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return [Check("model", "PASS", f"import spec {spec}: module {module} is importable")]
        return [Check("model", "FAIL", f"import spec {spec}: module {module} is not importable",
                      "install the package in the image, or run from its directory")]
    path = Path(spec)
    if not path.is_dir():
        return [Check("model", "FAIL", f"model directory {spec} does not exist",
                      "mount the checkpoints PVC and check --model")]
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except OSError:
        return [Check("model", "FAIL", f"{config_path} is missing or unreadable",
                      "copy the whole model directory (save_pretrained output)")]
    except ValueError as exc:
        return [Check("model", "FAIL", f"{config_path} is not valid JSON ({exc})", "copy config.json again")]
    weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    missing = []
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            return [Check("model", "FAIL", f"{index} is not valid JSON", "copy the weight index again")]
        missing += sorted(s for s in shards if not (path / s).is_file())
    if missing:
        return [Check("model", "FAIL", f"weight files listed in the index are missing: {', '.join(missing[:5])}",
                      "the copy is incomplete: copy the model directory again")]
    if not weights:
        return [Check("model", "FAIL", f"{spec} has config.json but no weight files",
                      "copy the *.safetensors (or *.bin) files too")]
    unreadable = [w for w in weights if not os.access(path / w, os.R_OK)]
    if unreadable:
        return [Check("model", "FAIL", f"weight files not readable: {', '.join(unreadable)}",
                      "fix file permissions on the volume (fsGroup)")]
    checks = [Check("model", "PASS", f"{spec}: {config.get('model_type', 'model')}, {len(weights)} weight file(s)")]
    if "ForCausalLM" in " ".join(config.get("architectures") or []) and not any(
            (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        checks.append(Check("tokenizer", "WARN", f"{spec} has no tokenizer files: only /v1/predict will work",
                            "copy the tokenizer files (tokenizer.json, tokenizer_config.json)"))
    return checks


def check_disk(path: str, minimum: int = DISK_MIN) -> Check:
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        return Check("disk", "WARN", f"cannot read free space of {path}: {exc.strerror}",
                     "set HOME to a writable directory")
    if free < minimum:
        return Check("disk", "WARN", f"{free / 2**20:.0f} MiB free in {path}",
                     "DeepSpeed's op cache (~/.cache/torch_extensions) and logs need space")
    return Check("disk", "PASS", f"{free / GIB:.1f} GiB free in {path}")


def run_checks(args: argparse.Namespace, environ=None) -> list[Check]:
    environ = os.environ if environ is None else environ
    rendezvous, rdzv = check_rendezvous(args, environ)
    checks = [rendezvous]
    if rdzv is not None:
        checks.append(check_master(rdzv, args.timeout))
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: check_interfaces(environ), lambda: check_gpus(rdzv, getattr(args, 'require_gpu', False)), check_shm,
        lambda: check_disk(os.path.expanduser("~")),
    ]
    if args.model:
        steps.append(lambda: check_model(args.model))
        if rdzv is not None:
            steps.append(lambda: [c for c in (check_heads(args.model, rdzv),) if c is not None])
    for step in steps:
        result = step()
        checks += result if isinstance(result, list) else [result]
    return checks


def run_doctor(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g} must be a positive number of seconds")
    checks = run_checks(args)
    failed = any(c.status == "FAIL" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            print(f"{c.status:4}  {c.name}: {c.message}" + (f"\n      fix: {c.fix}" if c.status != "PASS" and c.fix else ""))
    return EXIT_RUNTIME if failed else 0

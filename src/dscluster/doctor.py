"""`dscluster doctor`: why this pod (or host) would not join the group, before NCCL hangs on it.

Each check answers PASS, WARN or FAIL with a one-line fix. Exit 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dscluster.cluster.rendezvous import Rendezvous, RendezvousError, discover
from dscluster.errors import EXIT_RUNTIME

GIB = 1024**3
SHM_MIN = 1 * GIB          # Docker's 64 MiB default breaks NCCL and DeepSpeed's shared memory
DISK_MIN = 1 * GIB


@dataclass
class Check:
    name: str
    status: str            # PASS, WARN, FAIL
    message: str
    fix: str = ""


def check_rendezvous(args) -> tuple[Check, Rendezvous | None]:
    try:
        rdzv = discover(nproc_per_node=args.nproc)
    except RendezvousError as exc:
        return Check("rendezvous", "FAIL", str(exc), "set the launcher's variables consistently"), None
    return Check("rendezvous", "PASS",
                 f"rank {rdzv.rank} of {rdzv.world_size} (local {rdzv.local_rank} of {rdzv.local_world_size}), "
                 f"master {rdzv.master_addr}:{rdzv.master_port}, launcher {rdzv.launcher}"), rdzv


def check_master(rdzv: Rendezvous, timeout: float) -> Check:
    addr, port = rdzv.master_addr, rdzv.master_port
    if rdzv.world_size == 1:
        return Check("master", "PASS", "single process: no master needed")
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return Check("master", "FAIL", f"MASTER_ADDR {addr} does not resolve ({exc.strerror})",
                     "use the headless Service's name for rank 0's pod, and check its selector and namespace")
    if rdzv.rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as exc:
                return Check("master", "FAIL", f"rank 0 cannot listen on MASTER_PORT {port}: {exc.strerror}",
                             "stop whatever holds the port, or choose another MASTER_PORT")
        return Check("master", "PASS", f"rank 0: MASTER_PORT {port} is free to listen on; {addr} resolves")
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return Check("master", "PASS", f"{addr}:{port} accepts connections")
    except ConnectionRefusedError:
        return Check("master", "WARN", f"{addr}:{port} refused the connection: rank 0 is not listening yet "
                     "(normal before rank 0 starts)", "if rank 0 is running, check MASTER_PORT on both sides")
    except OSError as exc:
        return Check("master", "FAIL", f"{addr}:{port} did not answer within {timeout:g} s ({exc})",
                     "check NetworkPolicies, the Service's port 29500 and that rank 0's pod is scheduled")


def interface_matches(spec: str, names: list[str], prefix_match: bool) -> tuple[list[str], str | None]:
    """Interfaces a NCCL/GLOO *_SOCKET_IFNAME selects. NCCL: comma-separated prefixes, `=` for an
    exact name, `^` to exclude. gloo: exact names. Returns (selected, problem)."""
    exclude = spec.startswith("^")
    parts = [p for p in spec.lstrip("^").split(",") if p]
    selected = []
    for name in names:
        hit = any(name == p[1:] if p.startswith("=") else (name.startswith(p) if prefix_match else name == p)
                  for p in parts)
        if hit != exclude:
            selected.append(name)
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


def check_gpus(rdzv: Rendezvous | None) -> Check:
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    local = rdzv.local_world_size if rdzv else 1
    if count == 0:
        return Check("gpus", "WARN", "no GPU visible: ranks run on CPU over gloo",
                     "on GPU nodes: request nvidia.com/gpu and check the device plugin")
    if count < local and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        return Check("gpus", "FAIL", f"{local} local ranks but {count} GPU(s) visible",
                     "request one nvidia.com/gpu per local rank, or start fewer ranks per node")
    return Check("gpus", "PASS", f"{count} GPU(s) visible for {local} local rank(s)")


def check_shm(path: str = "/dev/shm") -> Check:
    try:
        stat = os.statvfs(path)
    except OSError:
        return Check("shm", "WARN", f"{path} is missing", "mount an emptyDir with medium: Memory at /dev/shm")
    size = stat.f_blocks * stat.f_frsize
    if size < SHM_MIN:
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


def check_disk(path: str) -> Check:
    free = shutil.disk_usage(path).free
    if free < DISK_MIN:
        return Check("disk", "WARN", f"{free / 2**20:.0f} MiB free in {path}",
                     "DeepSpeed's op cache (~/.cache/torch_extensions) and logs need space")
    return Check("disk", "PASS", f"{free / GIB:.1f} GiB free in {path}")


def run_checks(args: argparse.Namespace, environ=None) -> list[Check]:
    environ = os.environ if environ is None else environ
    rendezvous, rdzv = check_rendezvous(args)
    checks = [rendezvous]
    if rdzv is not None:
        checks.append(check_master(rdzv, args.timeout))
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: check_interfaces(environ), lambda: check_gpus(rdzv), check_shm,
        lambda: check_disk(os.path.expanduser("~")),
    ]
    if args.model:
        steps.append(lambda: check_model(args.model))
    for step in steps:
        result = step()
        checks += result if isinstance(result, list) else [result]
    return checks


def run_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args)
    failed = any(c.status == "FAIL" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            print(f"{c.status:4}  {c.name}: {c.message}" + (f"\n      fix: {c.fix}" if c.status != "PASS" and c.fix else ""))
    return EXIT_RUNTIME if failed else 0

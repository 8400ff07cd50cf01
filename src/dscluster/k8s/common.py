"""Pieces every workload kind shares: labels, rank environment, volumes, probes, Services, PVC."""

from __future__ import annotations

import argparse
import math
from typing import Any

from dscluster.k8s.options import parse_pairs, parse_rdma, parse_toleration

MASTER_PORT = 29500
CHECKPOINT_MOUNT = "/mnt/checkpoints"
SHM_VOLUME = "dshm"
CHECKPOINT_VOLUME = "checkpoints"
API_KEY_ENV = "DSCLUSTER_API_KEY"
API_KEY_SECRET_KEY = "api-key"
# Variables the launcher forwards to every rank with `mpirun -x` (ranks started over ssh do not
# inherit the launcher pod's environment).
FORWARDED_ENV = ("MASTER_ADDR", "MASTER_PORT", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
                 "GLOO_SOCKET_IFNAME", "NCCL_IB_DISABLE")
# Also forwarded, from the image's environment: sshd gives ranks its own default PATH and no
# LD_LIBRARY_PATH (where CUDA images and some clouds put the driver libraries).
IMAGE_ENV = ("PATH", "LD_LIBRARY_PATH")
# Seconds a pod gets after SIGTERM beyond the drain delay and the request timeout: Uvicorn's own
# margin (5 s, serving/server.py), then stopping every rank and the launcher's teardown.
GRACE_MARGIN_S = 20
GIB = 1024**3
# Host memory of one GPU rank before weights: plan.HOST_OVERHEAD_GIB (a test keeps them equal).
HOST_GIB_PER_RANK = 2.0
SHM_GIB_PER_RANK = 1
CPU_PER_RANK = 2
MEMORY_LIMIT_FACTOR = 2
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"
STARTUP_PERIOD_S = 10

Obj = dict[str, Any]


def slots(opts: argparse.Namespace) -> int:
    """Ranks per pod: one per GPU, or one CPU rank."""
    return opts.gpus_per_node if opts.gpus_per_node > 0 else 1


def world_size(opts: argparse.Namespace) -> int:
    return opts.nodes * slots(opts)


def engine(opts: argparse.Namespace) -> str:
    if opts.engine:
        return opts.engine
    return "tp" if world_size(opts) > 1 else "replicated"


def common_labels(opts: argparse.Namespace) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dscluster", "app.kubernetes.io/instance": opts.name,
            "app.kubernetes.io/managed-by": "dscluster"}


def meta(opts: argparse.Namespace, name: str) -> Obj:
    return {"name": name, "namespace": opts.namespace, "labels": common_labels(opts)}


def workload_meta(opts: argparse.Namespace, name: str) -> Obj:
    """Metadata of the workload object: what gang.py asks for (Kueue's queue label, Volcano's
    queue and LWS's placement annotations)."""
    from dscluster.k8s import gang

    metadata = meta(opts, name)
    metadata["labels"].update(gang.workload_labels(opts))
    notes = gang.workload_annotations(opts)
    if notes:
        metadata["annotations"] = notes
    return metadata


def master_name(opts: argparse.Namespace) -> str:
    return f"{opts.name}-master"


def http_name(opts: argparse.Namespace) -> str:
    return f"{opts.name}-http"


def pvc_name(opts: argparse.Namespace) -> str:
    return opts.existing_pvc or f"{opts.name}-checkpoints"


def serve_command(opts: argparse.Namespace, nproc: int | None = None) -> list[str]:
    cmd = ["dscluster", "serve", opts.model, "--host", "0.0.0.0", "--port", str(opts.port),
           "--engine", engine(opts)]
    if getattr(opts, "pp", 1) > 1:
        cmd += ["--pp", str(opts.pp)]
    if nproc is not None:
        cmd += ["--nproc", str(nproc)]
    if opts.dtype:
        cmd += ["--dtype", opts.dtype]
    if opts.api_key_secret:
        cmd += ["--metrics-without-api-key"]    # the annotated scrape (scrape_annotations) needs no secret
    return cmd + ["--request-timeout", f"{opts.request_timeout:g}", "--drain-delay", f"{opts.drain_delay:g}"]


def termination_grace_seconds(opts: argparse.Namespace) -> int:
    """terminationGracePeriodSeconds of every pod that runs ranks or their launcher: the drain
    delay, then the longest request in flight (no deadline: the server drains for 60 s), then
    the margin."""
    return math.ceil(opts.drain_delay + (opts.request_timeout or 60.0) + GRACE_MARGIN_S)


def scrape_annotations(opts: argparse.Namespace) -> dict[str, str]:
    """Prometheus' conventional annotations (read by the common `kubernetes-pods` and
    `kubernetes-service-endpoints` scrape jobs): /metrics on the HTTP port. They go on the HTTP
    Service, which selects rank 0's pod only, and on the pod template when every pod it makes
    serves HTTP (Deployment, LeaderWorkerSet leader); never on pods of other ranks, which would
    show as targets that are down."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(opts.port), "prometheus.io/path": "/metrics"}


def http_pod_metadata(opts: argparse.Namespace) -> Obj:
    """Metadata of a pod template whose pods run rank 0 (labels, and the scrape annotations)."""
    return rank_pod_metadata(opts, serves_http=True)


def rank_pod_metadata(opts: argparse.Namespace, *, serves_http: bool, labels: dict[str, str] | None = None) -> Obj:
    """Metadata of a pod template of ranks: its labels; the scrape annotations where every pod it
    makes serves HTTP; the secondary networks (Multus) of --network."""
    from dscluster.k8s import gang

    metadata: Obj = {"labels": {**(labels or common_labels(opts)), **gang.kueue_pod_labels(opts)}}
    notes = dict(scrape_annotations(opts)) if serves_http else {}
    if opts.network:
        notes[NETWORKS_ANNOTATION] = ",".join(opts.network)
    if notes:
        metadata["annotations"] = notes
    return metadata


def pod_spec(opts: argparse.Namespace, containers: list[Obj], *, volumes: bool = True) -> Obj:
    """A pod spec whose SIGTERM leaves time for the drain (see termination_grace_seconds).

    `volumes`: a pod that runs ranks (the /dev/shm and checkpoint volumes, the node selector, the
    wait for a download); otherwise a launcher, which only needs the group's scheduler, priority
    and tolerations."""
    from dscluster.k8s import download, gang

    spec: Obj = {"terminationGracePeriodSeconds": termination_grace_seconds(opts)}
    spec.update(gang.pod_fields(opts))
    if volumes and opts.node_selector:
        spec["nodeSelector"] = parse_pairs(opts.node_selector, "--node-selector")
    if opts.toleration:
        spec["tolerations"] = [parse_toleration(t) for t in opts.toleration]
    if volumes and opts.download:
        spec["initContainers"] = [download.wait_container(opts)]
    spec["containers"] = containers
    if volumes:
        spec["volumes"] = rank_volumes(opts)
    return spec


def nccl_env(opts: argparse.Namespace) -> list[Obj]:
    return [
        {"name": "NCCL_DEBUG", "value": opts.nccl_debug},
        {"name": "NCCL_SOCKET_IFNAME", "value": opts.nccl_socket_ifname},
        {"name": "GLOO_SOCKET_IFNAME", "value": opts.nccl_socket_ifname},
        {"name": "NCCL_IB_DISABLE", "value": "1" if opts.nccl_ib_disable else "0"},
    ]


def rank_env(opts: argparse.Namespace, *, master_addr: bool = True) -> list[Obj]:
    """NCCL/gloo settings plus the rendezvous address (the `<name>-master` headless Service)."""
    env = []
    if master_addr:
        env.append({"name": "MASTER_ADDR", "value": master_name(opts)})
    env.append({"name": "MASTER_PORT", "value": str(MASTER_PORT)})
    return env + nccl_env(opts)


def api_key_env(opts: argparse.Namespace) -> list[Obj]:
    if not opts.api_key_secret:
        return []
    return [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": opts.api_key_secret,
                                                                  "key": API_KEY_SECRET_KEY}}}]


def ranks_per_pod(opts: argparse.Namespace) -> int:
    return slots(opts)


def shm_size(opts: argparse.Namespace) -> str:
    """/dev/shm's sizeLimit: 1Gi per rank (NCCL's and DeepSpeed's buffers between the ranks of a
    pod; `dscluster doctor` warns below 1 GiB), or --shm-size."""
    return opts.shm_size or f"{max(1, slots(opts)) * SHM_GIB_PER_RANK}Gi"


def _gib(quantity: str) -> float:
    """A memory quantity in GiB (for the defaults, which are built from Gi and plain numbers)."""
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "k": 1e3 / GIB, "M": 1e6 / GIB, "G": 1e9 / GIB,
             "T": 1e12 / GIB}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * scale
    return float(quantity) / GIB


def memory_request(opts: argparse.Namespace) -> str:
    """What a rank pod holds in host memory: plan's figure per rank (HOST_GIB_PER_RANK: Python,
    torch, CUDA's host side; safetensors weights go straight to the GPU) for each of its ranks,
    plus /dev/shm, whose pages are charged to the pod. --memory overrides it (a checkpoint without
    safetensors files costs the whole model per rank: `dscluster plan` says how much)."""
    if opts.memory:
        return opts.memory
    return f"{math.ceil(slots(opts) * HOST_GIB_PER_RANK + _gib(shm_size(opts)))}Gi"


def rank_resources(opts: argparse.Namespace) -> Obj:
    """Requests (CPU, memory) and limits (memory, GPUs, RDMA devices) of a container that runs ranks.

    Requests make the pod Burstable rather than BestEffort (which is evicted first under memory
    pressure); there is no CPU limit, so ranks are never throttled mid-step."""
    requests: Obj = {"cpu": opts.cpu or str(slots(opts) * CPU_PER_RANK), "memory": memory_request(opts)}
    limit = opts.memory_limit or f"{math.ceil(_gib(requests['memory']) * MEMORY_LIMIT_FACTOR)}Gi"
    limits: Obj = {"memory": limit}
    if opts.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(opts.gpus_per_node)
    for item in opts.rdma_resource:
        name, count = parse_rdma(item)
        limits[name] = count
    return {"requests": requests, "limits": limits}


def rank_security_context(opts: argparse.Namespace) -> Obj:
    """IPC_LOCK for RDMA: the verbs library pins (locks) the memory it registers with the NIC."""
    if opts.ipc_lock or opts.rdma_resource:
        return {"securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}
    return {}


def rank_volumes(opts: argparse.Namespace) -> list[Obj]:
    return [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(opts)}},
        {"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": pvc_name(opts), "readOnly": True}},
    ]


def rank_volume_mounts() -> list[Obj]:
    return [
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": CHECKPOINT_VOLUME, "mountPath": CHECKPOINT_MOUNT, "readOnly": True},
    ]


def rank_ports(opts: argparse.Namespace) -> list[Obj]:
    return [{"name": "http", "containerPort": opts.port, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}]


def http_probes(opts: argparse.Namespace) -> Obj:
    """Probes for a container that runs rank 0's HTTP server itself (httpGet on the HTTP port).

    While the group forms and loads the model, a placeholder answers /health/live 200 and
    /health/ready 503; so the startup probe asks /health/ready: loading gets --load-timeout, and only
    readiness ends it. Liveness (/health/live) starts after that."""
    return {
        "startupProbe": {"httpGet": {"path": "/health/ready", "port": "http"},
                         "periodSeconds": STARTUP_PERIOD_S, "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(opts.load_timeout / STARTUP_PERIOD_S)},
        "readinessProbe": {"httpGet": {"path": "/health/ready", "port": "http"},
                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2,
                           "successThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/health/live", "port": "http"},
                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
    }


def _curl(url: str) -> str:
    return f"curl -fsS -o /dev/null --max-time 3 {url}"


# `[ ]` keeps the probe's own command line (which contains this pattern) from matching itself.
_SERVE_RUNNING = 'pgrep -f "dscluster[ ]serve" >/dev/null'


def _tcp_open(port: int) -> str:
    return f"timeout 2 bash -c '</dev/tcp/127.0.0.1/{port}' 2>/dev/null"


def ssh_worker_probes(opts: argparse.Namespace, rank0_hostname: str) -> Obj:
    """Probes for pods that run sshd and receive their ranks from an mpirun launcher.

    All these pods share one template, but only the pod named `rank0_hostname` runs rank 0's HTTP
    server (by-slot mapping puts rank 0 on the first hostfile host). The probes are exec scripts:
    - readiness: before the launcher has started ranks in the pod, the pod is Ready when sshd
      accepts connections (the Trainer's `dependsOn: Ready` and the MPI Operator's
      `WaitForWorkersReady` wait for exactly that); once ranks run, every pod is Ready exactly
      when rank 0 answers /health/ready (through the `<name>-master` headless Service), i.e. when
      the whole group has loaded the model and answers heartbeats. The `<name>-http` Service
      selects the rank-0 pod only, so it routes traffic only to a ready group.
    - liveness: on the rank-0 pod, while ranks run: until the group has once answered
      /health/ready (a marker file per group, named by its oldest rank's pid), it lives for
      --load-timeout from that rank's start (the placeholder answers /health/live 200 all along,
      so loading needs its own budget); afterwards /health/live must answer. Other pods are alive
      while sshd (PID 1) runs. A dead rank anywhere makes mpirun exit non-zero, and the launcher
      restarts the whole group.
    """
    port = opts.port
    ready = (f"if {_SERVE_RUNNING}; then {_curl(f'http://${{MASTER_ADDR}}:{port}/health/ready')}; "
             f"else {_tcp_open(22)}; fi")
    budget = math.ceil(opts.load_timeout)
    live = (f'pid=$(pgrep -o -f "dscluster[ ]serve"); '
            f'if [ "$(hostname)" = "{rank0_hostname}" ] && [ -n "$pid" ]; then '
            f"if {_curl(f'http://127.0.0.1:{port}/health/ready')}; then touch /tmp/dscluster-ready.$pid; "
            f"elif [ -e /tmp/dscluster-ready.$pid ]; then {_curl(f'http://127.0.0.1:{port}/health/live')}; "
            f'else [ "$(ps -o etimes= -p "$pid" | tr -d " ")" -lt {budget} ]; fi; fi')
    return {
        "readinessProbe": {"exec": {"command": ["bash", "-c", ready]},
                           "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"exec": {"command": ["bash", "-c", live]},
                          "initialDelaySeconds": 30, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 6},
    }


def leader_follower_probes(opts: argparse.Namespace, leader_addr_env: str) -> Obj:
    """Readiness for pods whose ranks do not serve HTTP but belong to a group led by another pod:
    Ready when the group's rank 0 answers /health/ready."""
    ready = _curl(f"http://${{{leader_addr_env}}}:{opts.port}/health/ready")
    return {"readinessProbe": {"exec": {"command": ["bash", "-c", ready]},
                               "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 2}}


def ssh_rank_container(opts: argparse.Namespace, name: str, rank0_hostname: str) -> Obj:
    """A pod where mpirun starts ranks over ssh (MPIJob workers, Trainer MPI nodes).

    The ranks get their environment through `mpirun -x`; it is set here too so that
    `dscluster doctor` in the pod sees the same values."""
    container = {
        "name": name,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": sshd_command(),
        "env": rank_env(opts),
        "ports": rank_ports(opts) + [{"name": "ssh", "containerPort": 22, "protocol": "TCP"}],
        "volumeMounts": rank_volume_mounts(),
        "resources": rank_resources(opts),
        **rank_security_context(opts),
        **ssh_worker_probes(opts, rank0_hostname),
    }
    return container


# The command of a pod where mpirun starts ranks over ssh. sshd as PID 1 would exit at the pod's
# SIGTERM and take the ranks with it at once; this shell keeps the pod up while they drain. It
# passes the SIGTERM to the ranks in the pod: rank 0, when it runs here, drains and stops the whole
# group; other ranks wait for its stop. `[ ]` keeps pgrep/pkill from matching this script itself.
SSHD_WRAPPER = (
    '/usr/sbin/sshd -De & sshd=$!; '
    'trap \'pkill -TERM -f "dscluster[ ]serve"\' TERM; '
    'wait "$sshd"; '
    'while pgrep -f "dscluster[ ]serve" >/dev/null; do sleep 1; done; '
    'kill "$sshd" 2>/dev/null; exit 0'
)

# The MPI launcher's command: mpirun under a shell that turns the pod's SIGTERM into SIGUSR1.
# mpirun answers SIGTERM by signalling every rank and SIGKILLing it a second later, too soon to
# drain; it forwards SIGUSR1 at once and does nothing else, and the ranks take it as SIGTERM
# (runner.py). The shell then waits for mpirun, which ends when the ranks have drained and exited,
# and exits with its status. "$@" is the mpirun command line.
MPIRUN_WRAPPER = (
    '"$@" & mpirun=$!; '
    'trap \'kill -USR1 "$mpirun" 2>/dev/null\' TERM INT; '
    'while kill -0 "$mpirun" 2>/dev/null; do wait "$mpirun"; done; '
    'wait "$mpirun"'
)


def sshd_command() -> list[str]:
    return ["bash", "-c", SSHD_WRAPPER]


def launcher_command(opts: argparse.Namespace) -> list[str]:
    """The MPI launcher's command line: mpirun_command under MPIRUN_WRAPPER."""
    return ["bash", "-c", MPIRUN_WRAPPER, "mpirun-launcher", *mpirun_command(opts)]


def mpirun_command(opts: argparse.Namespace) -> list[str]:
    cmd = ["mpirun", "--allow-run-as-root", "-np", str(world_size(opts)), "-bind-to", "none",
           "-map-by", "slot"]
    for var in FORWARDED_ENV:
        cmd += ["-x", var]
    if opts.api_key_secret:
        cmd += ["-x", API_KEY_ENV]
    for var in IMAGE_ENV:
        cmd += ["-x", var]
    return cmd + serve_command(opts)


def master_service(opts: argparse.Namespace, selector: dict[str, str]) -> Obj:
    """Headless Service resolving to the rank-0 pod; published before readiness (rendezvous
    happens before the model is loaded)."""
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": meta(opts, master_name(opts)),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": dict(selector),
                 "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT,
                            "protocol": "TCP"}]},
    }


def http_service(opts: argparse.Namespace, selector: dict[str, str]) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {**meta(opts, http_name(opts)), "annotations": scrape_annotations(opts)},
        "spec": {"type": "ClusterIP", "selector": dict(selector),
                 "ports": [{"name": "http", "port": opts.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def checkpoint_pvc(opts: argparse.Namespace) -> Obj | None:
    if opts.existing_pvc:
        return None
    spec: Obj = {"accessModes": [opts.pvc_access_mode],
                 "resources": {"requests": {"storage": str(opts.pvc_size)}}}
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(opts, pvc_name(opts)),
            "spec": spec}

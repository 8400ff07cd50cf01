"""Who am I: rank, world size and master address, read from whatever launcher started us.

One table (`LAUNCHERS`) has a row per launcher. The first row whose marker variables are present
wins; its row says which variable holds each field. Rows that start one process per *node*
(Kubeflow Trainer's torch runtimes, LeaderWorkerSet) describe a node; `discover(nproc_per_node=N)`
turns that into the rank of local process 0 on that node, and the local launcher spawns the rest.

`export()` then writes what torch.distributed and DeepSpeed read (`RANK`, `LOCAL_RANK`,
`WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `LOCAL_SIZE`, `MASTER_ADDR`, `MASTER_PORT`). DeepSpeed's CPU
shared-memory all-reduce crashes without `LOCAL_SIZE`, and its MPI discovery overwrites
everything unless all five torch variables are present, so all of them are always set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_MASTER_PORT = 29500


class RendezvousError(ValueError):
    """The environment is partial or contradictory; the message names the variables."""


@dataclass(frozen=True)
class Rendezvous:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    node_rank: int = 0
    # Processes this launcher started on this node; > 1 only for per-node rows, where the local
    # launcher must spawn local ranks 1..n-1 itself.
    spawn_local: int = 1

    def to_json(self) -> str:
        keys = ("rank", "local_rank", "world_size", "local_world_size", "master_addr",
                "master_port", "launcher", "node_rank")
        return json.dumps({k: getattr(self, k) for k in keys})

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed (env://) and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "LOCAL_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def export(self, environ: dict[str, str] | None = None) -> None:
        (os.environ if environ is None else environ).update(self.torch_env())


@dataclass(frozen=True)
class LauncherRow:
    """How one launcher describes a process. Field values name environment variables."""

    name: str
    markers: tuple[str, ...]          # any of these present selects the row
    rank: str
    world_size: str | tuple[str, ...]                       # a tuple: alternatives, first set wins
    local_rank: str | None = None
    local_world_size: str | tuple[str, ...] | None = None  # a tuple: alternatives, first set wins
    master_addr: str | None = None
    master_port: str | None = None
    per_node: bool = False            # rank/world_size count nodes, not processes
    node_rank: str | None = None      # else rank // local_world_size (wrong when nodes differ in size)
    # Special ways to find a field (parse a Slurm nodelist, read a hostfile, ask MPI).
    derive: Mapping[str, Callable[[Mapping[str, str]], str | None]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Derivations for launchers that do not hand us a field directly.


def _first_hostfile_host(env: Mapping[str, str]) -> str | None:
    """OpenMPI sets no master address; rank 0 runs on the hostfile's first host (by-slot mapping)."""
    for var in ("OMPI_MCA_orte_default_hostfile", "OMPI_MCA_prte_default_hostfile", "PRTE_MCA_prte_default_hostfile"):
        path = env.get(var)
        if not path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.split("#", 1)[0].strip()
                    if line:
                        return line.split()[0]
        except OSError:
            continue
    return None


def _mpi_master_addr(env: Mapping[str, str]) -> str | None:
    """Last resort for MPI: rank 0 broadcasts its own address over MPI (needs mpi4py)."""
    addr = env.get("MASTER_ADDR") or _first_hostfile_host(env)
    if addr:
        return addr
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the image
        raise RendezvousError(
            "MPI launcher detected but no MASTER_ADDR, no readable hostfile "
            "(OMPI_MCA_orte_default_hostfile) and no mpi4py to ask rank 0: set MASTER_ADDR"
        ) from exc
    comm = MPI.COMM_WORLD
    mine = own_address() if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def own_address() -> str:
    """This host's address as peers would dial it: its hostname's address, else the route out."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def expand_first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'node[1-2]-ib' -> 'node1-ib',
    'rack[1-2]-n[1-4]' -> 'rack1-n1'.

    python-hostlist implements Slurm's syntax (several bracket groups, text after a bracket, zero
    padding); a list it rejects is given to Slurm's own `scontrol show hostnames` when that is
    installed (a newer form), before it is reported as an error."""
    import hostlist

    nodelist = nodelist.strip()
    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        hosts = _scontrol_hostnames(nodelist)
        if hosts is None:
            raise RendezvousError(f"SLURM_STEP_NODELIST={nodelist!r} is not a Slurm node list ({exc})") from None
    if not hosts:
        raise RendezvousError(f"SLURM_STEP_NODELIST={nodelist!r} names no host")
    return hosts[0]


def _scontrol_hostnames(nodelist: str) -> list[str] | None:
    """`scontrol show hostnames LIST`, or None when scontrol is missing or rejects the list (it
    prints 'Invalid hostlist' and still exits 0)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts or "Invalid" in out.stdout or out.stderr.strip():
        return None
    return hosts


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> str | None:
    """This node's entry of the step's SLURM_STEP_TASKS_PER_NODE ('2(x3),1'), else of the job's
    SLURM_TASKS_PER_NODE, else SLURM_NTASKS_PER_NODE (the job's --ntasks-per-node). A step can run
    fewer tasks than its job (`srun -n 2` inside `sbatch -n 8`): the step's count is the truth."""
    var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(v)), None)
    if var is None:
        return env.get("SLURM_NTASKS_PER_NODE") or None
    spec = env[var]
    counts: list[str] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise RendezvousError(f"{var}={spec!r} is not a Slurm task count list")
        counts += [m.group(1)] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else counts[0]


def _slurm_master(env: Mapping[str, str]) -> str | None:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    return expand_first_host(nodelist) if nodelist else None


def _nproc_per_node(env: Mapping[str, str]) -> str | None:
    """Kubeflow Trainer's numProcPerNode may be a number or auto/gpu/cpu (torchrun's meanings)."""
    value = env.get("PET_NPROC_PER_NODE")
    if value is None or value.isdigit():
        return value
    if value in ("auto", "gpu"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 and value == "gpu":
            raise RendezvousError("PET_NPROC_PER_NODE=gpu but no GPU is visible")
        return str(count or 1)
    if value == "cpu":
        return str(os.cpu_count() or 1)
    raise RendezvousError(f"PET_NPROC_PER_NODE={value!r} is not a number, auto, gpu or cpu")


_TORCH = dict(rank="RANK", world_size="WORLD_SIZE", local_rank="LOCAL_RANK",
              master_addr="MASTER_ADDR", master_port="MASTER_PORT")

# The launcher table. Order matters: per-process launchers before per-node ones, specific markers
# before the generic RANK/WORLD_SIZE row.
LAUNCHERS: tuple[LauncherRow, ...] = (
    LauncherRow("torchrun", ("TORCHELASTIC_RUN_ID",), local_world_size="LOCAL_WORLD_SIZE", **_TORCH),
    LauncherRow("deepspeed", ("CROSS_RANK", "CROSS_SIZE"), local_world_size="LOCAL_SIZE", **_TORCH),
    LauncherRow("local", ("DSCLUSTER_LAUNCHER",), local_world_size="LOCAL_WORLD_SIZE", **_TORCH),
    LauncherRow("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                rank="OMPI_COMM_WORLD_RANK", world_size="OMPI_COMM_WORLD_SIZE",
                local_rank="OMPI_COMM_WORLD_LOCAL_RANK", local_world_size="OMPI_COMM_WORLD_LOCAL_SIZE",
                master_port="MASTER_PORT", derive={"master_addr": _mpi_master_addr}),
    LauncherRow("mpich", ("PMI_RANK", "PMI_SIZE"), rank="PMI_RANK", world_size="PMI_SIZE",
                local_rank="MPI_LOCALRANKID", local_world_size="MPI_LOCALNRANKS",
                master_port="MASTER_PORT", derive={"master_addr": _mpi_master_addr}),
    LauncherRow("slurm", ("SLURM_PROCID",), rank="SLURM_PROCID", world_size=("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                local_rank="SLURM_LOCALID", master_port="MASTER_PORT", node_rank="SLURM_NODEID",
                derive={"master_addr": _slurm_master, "local_world_size": _slurm_tasks_on_this_node}),
    LauncherRow("env", ("RANK", "WORLD_SIZE"), local_world_size=("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), **_TORCH),
    LauncherRow("trainer-torch", ("PET_NNODES", "PET_NODE_RANK"), rank="PET_NODE_RANK",
                world_size="PET_NNODES", master_addr="PET_MASTER_ADDR", master_port="PET_MASTER_PORT",
                per_node=True, derive={"local_world_size": _nproc_per_node}),
    LauncherRow("lws", ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"),
                rank="LWS_WORKER_INDEX", world_size="LWS_GROUP_SIZE",
                master_addr="LWS_LEADER_ADDRESS", master_port="MASTER_PORT", per_node=True),
)


# Rows that describe a node: a process they start is the node's agent and spawns its local ranks.
PER_NODE_LAUNCHERS = frozenset(row.name for row in LAUNCHERS if row.per_node)


def _int(env: Mapping[str, str], var: str, minimum: int) -> int:
    raw = env.get(var)
    if raw is None or raw == "":
        raise RendezvousError(f"{var} is not set")
    try:
        value = int(raw)
    except ValueError:
        raise RendezvousError(f"{var}={raw!r} is not an integer") from None
    if value < minimum:
        raise RendezvousError(f"{var}={value} must be >= {minimum}")
    return value


def _field(row: LauncherRow, name: str, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(value, where it came from) for one field of a row."""
    if name in row.derive:
        return row.derive[name](env), f"{row.name} {name}"
    var = _variable(getattr(row, name), env)
    if var is None:
        return None, None
    return env.get(var), var


def _variable(spec: str | tuple[str, ...] | None, env: Mapping[str, str]) -> str | None:
    """The variable a row field names; of alternatives (a tuple), the first one set."""
    if isinstance(spec, tuple):
        return next((v for v in spec if env.get(v) not in (None, "")), spec[0])
    return spec


def select_row(env: Mapping[str, str]) -> LauncherRow | None:
    for row in LAUNCHERS:
        if any(env.get(m) not in (None, "") for m in row.markers):
            return row
    return None


def discover(env: Mapping[str, str] | None = None, nproc_per_node: int | None = None) -> Rendezvous:
    """Read the rendezvous from `env` (default: os.environ). Raises RendezvousError naming variables.

    `nproc_per_node` is the local launcher's `--nproc`: for per-node rows it is the number of
    processes this node runs (Trainer's PET_NPROC_PER_NODE wins when it is set).
    """
    env = dict(os.environ if env is None else env)
    row = select_row(env)
    if row is None:
        nproc = nproc_per_node or 1
        return Rendezvous(0, 0, nproc, nproc, env.get("MASTER_ADDR") or "127.0.0.1",
                          _port(env.get("MASTER_PORT"), "MASTER_PORT"), "none", spawn_local=nproc)

    # Partial variables: a row's rank without its size (or the reverse) is an error naming both.
    rank_var, world_var = row.rank, _variable(row.world_size, env)
    for var in (rank_var, world_var):
        if env.get(var) in (None, ""):
            present = [m for m in (rank_var, world_var) if env.get(m) not in (None, "")]
            raise RendezvousError(f"{var} is not set but {', '.join(present)} is ({row.name} launcher): "
                                  "set both or neither")
    rank = _int(env, rank_var, 0)
    world = _int(env, world_var, 1)
    if rank >= world:
        raise RendezvousError(f"{rank_var}={rank} must be less than {world_var}={world}")

    lws_raw, lws_src = _field(row, "local_world_size", env)
    lr_raw, lr_src = _field(row, "local_rank", env)

    if row.per_node:
        per_node = int(lws_raw) if lws_raw else (nproc_per_node or 1)
        if per_node < 1:
            raise RendezvousError(f"{lws_src}={per_node} must be >= 1")
        # This process is the node's first rank; the local launcher spawns the other per_node - 1.
        node_rank, nnodes = rank, world
        rank, world, local_rank, local_world = node_rank * per_node, nnodes * per_node, 0, per_node
        spawn = per_node
    else:
        local_world = _checked_int(lws_raw, lws_src, 1) if lws_raw not in (None, "") else None
        local_rank = _checked_int(lr_raw, lr_src, 0) if lr_raw not in (None, "") else None
        if local_world is None:
            # A launcher that does not say how many ranks share this node: assume all, unless the
            # local rank proves otherwise (then this node holds at least local_rank + 1).
            local_world = world if local_rank is None else max(local_rank + 1, 1)
            if local_rank is None:
                local_rank = rank
        if local_rank is None:
            local_rank = rank % local_world
        if local_rank >= local_world:
            raise RendezvousError(f"{lr_src}={local_rank} must be less than {lws_src}={local_world}")
        if local_world > world:
            raise RendezvousError(f"{lws_src}={local_world} must not exceed {world_var}={world}")
        node_raw, node_src = _field(row, "node_rank", env)
        node_rank = (_checked_int(node_raw, node_src, 0) if node_raw not in (None, "")
                     else rank // local_world)
        spawn = 1

    _check_agreement(row, env, rank, world)
    addr, addr_src = _field(row, "master_addr", env)
    if not addr:
        if world > 1 and not (row.per_node and node_rank == 0) and row.name not in ("slurm",):
            raise RendezvousError(f"{addr_src or 'MASTER_ADDR'} is not set: {row.name} launcher with "
                                  f"{world} ranks needs the master address")
        addr = "127.0.0.1" if world == 1 or row.per_node else None
        if addr is None:
            raise RendezvousError("MASTER_ADDR is not set and SLURM_STEP_NODELIST is missing")
    port_raw, port_src = _field(row, "master_port", env)
    port = _port(port_raw, port_src or "MASTER_PORT")
    return Rendezvous(rank, local_rank, world, local_world, addr, port, row.name,
                      node_rank=node_rank, spawn_local=spawn)


def _checked_int(raw: str, source: str | None, minimum: int) -> int:
    return _int({source or "value": raw}, source or "value", minimum)


def _port(raw: str | None, var: str) -> int:
    if raw in (None, ""):
        return DEFAULT_MASTER_PORT
    port = _checked_int(raw, var, 1)
    if port > 65535:
        raise RendezvousError(f"{var}={port} is not a TCP port (1-65535)")
    return port


def _check_agreement(row: LauncherRow, env: Mapping[str, str], rank: int, world: int) -> None:
    """Torch variables exported by hand (the seeds' entrypoint.sh) must agree with the launcher's."""
    if row.rank == "RANK" or row.per_node:
        return
    for var, value in (("RANK", rank), ("WORLD_SIZE", world)):
        given = env.get(var)
        if given not in (None, "") and given != str(value):
            source = row.rank if var == "RANK" else _variable(row.world_size, env)
            raise RendezvousError(f"{var}={given} contradicts {source}={value} ({row.name} launcher)")


def describe(rdzv: Rendezvous) -> dict:
    return dataclasses.asdict(rdzv)

"""Process groups: the data group the model's collectives use, and the rendezvous store; and the
device each rank computes on.

The backend names the device: NCCL means every rank on its own GPU (`cuda:LOCAL_RANK`, or `cuda:0`
when the launcher made one GPU visible per rank), gloo means the CPU. A single rank forms no group
but follows the same rule (`auto`: its GPU when CUDA is there). NCCL refuses two ranks on one GPU,
so before joining it every rank publishes which GPU it holds and all of them stop with one line
(exit 2) when two share one; there is no gloo-on-CUDA fallback (docs/gpu.md says why).

Control messages do not use a process group: they go over sockets in a star around rank 0
(engine/control_socket.py), which find each other through the store kept here. Transport code
never imports DeepSpeed; the engine hands the already-initialised default group to DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dscluster.cluster.names import NotResolved, resolve, resolve_until
from dscluster.cluster.rendezvous import Rendezvous
from dscluster.errors import PeerFailure, UsageError

log = logging.getLogger(__name__)


def resolve_backend(requested: str, cuda_available: bool | None = None) -> str:
    """auto = NCCL when CUDA is available, else gloo. NCCL without CUDA is a usage error."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise UsageError("--backend nccl needs CUDA GPUs, and none is visible: use --backend gloo")
    if requested not in ("nccl", "gloo"):
        raise UsageError(f"--backend {requested!r}: choose auto, nccl or gloo")
    return requested


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU a rank uses: its only visible GPU when the launcher pinned CUDA_VISIBLE_DEVICES
    to one device per rank, else the GPU numbered by its local rank."""
    if visible_devices <= 0:
        raise UsageError("no CUDA device is visible to this rank")
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise UsageError(f"local rank {local_rank} has no GPU: only {visible_devices} visible")
    return local_rank


def rank_device(backend: str, local_rank: int) -> torch.device:
    """The device a rank computes on under `backend` (already resolved): its GPU with NCCL, the
    CPU with gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    return torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count()))


def single_rank_device(backend: str = "auto") -> torch.device:
    """The device of a lone rank (no process group): what `--backend` would give it, so `auto` is
    the first visible GPU when there is one. Made the current CUDA device."""
    device = rank_device(resolve_backend(backend), 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def store_prefix() -> str:
    """Keys of this run in the rendezvous store. torchrun's agent keeps one store across restarts
    of the group, so the run id and restart count keep one attempt's keys apart from another's."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"dscluster/{run_id}/{restart}"


def gpu_identity(device: torch.device) -> str:
    """What names a physical GPU across processes, whatever CUDA_VISIBLE_DEVICES each one has:
    its UUID, else its PCI address."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid:
        return f"{props.name} {uuid}"
    return f"{props.name} at PCI {props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}"


def check_one_gpu_per_rank(store: dist.Store, rdzv: Rendezvous, device: torch.device, timeout_s: float,
                           prefix: str | None = None) -> None:
    """Before NCCL is joined: every rank writes (host, GPU) to the store and reads everyone's. Two
    ranks on one GPU make every rank raise the same UsageError, since NCCL would refuse the pair
    ("Duplicate GPU detected") and leave the others waiting. Rank 0 hosts the store, so it raises
    only once every rank has read."""
    prefix = f"{prefix or store_prefix()}/gpu"
    mine = f"{socket.gethostname()}\t{gpu_identity(device)}"
    store.set(f"{prefix}/{rdzv.rank}", mine)
    keys = [f"{prefix}/{r}" for r in range(rdzv.world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
        held = [v.decode() for v in store.multi_get(keys)]
    except dist.DistError as exc:
        raise PeerFailure(f"not every rank said which GPU it holds within {timeout_s:g} s "
                          f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    store.add(f"{prefix}/read", 1)
    first: dict[str, int] = {}
    for rank, where in enumerate(held):
        if where not in first:
            first[where] = rank
            continue
        host, gpu = where.split("\t", 1)
        sharing = sum(1 for w in held if w == where)
        if rdzv.rank == 0:  # the store goes when rank 0 exits: let every rank read its verdict first
            deadline = time.monotonic() + timeout_s
            while store.add(f"{prefix}/read", 0) < rdzv.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
        raise UsageError(f"ranks {first[where]} and {rank} share one GPU ({gpu} on {host}; {sharing} ranks on it): "
                         "NCCL needs a GPU per rank; start as many ranks per node as it has GPUs, or "
                         "--backend gloo to run the ranks on the CPU")


@dataclass
class Groups:
    rdzv: Rendezvous
    backend: str
    store: dist.Store | None         # the rendezvous store (rank 0 hosts it)
    device: torch.device

    @property
    def rank(self) -> int:
        return self.rdzv.rank

    @property
    def world_size(self) -> int:
        return self.rdzv.world_size


def join_store(rdzv: Rendezvous, timeout_s: float) -> dist.Store:
    """The env:// rendezvous store, bounded by `timeout_s`: rank 0 waits that long for every rank
    to connect, the others that long to reach rank 0. Raises PeerFailure naming what is missing
    (a master address that does not resolve, a master that does not answer, ranks that never
    came), UsageError when rank 0 cannot listen on MASTER_PORT."""
    where = f"{rdzv.master_addr}:{rdzv.master_port}"
    deadline = time.monotonic() + timeout_s
    # The name first, by ourselves: torch's client retries a failed lookup until its timeout and
    # then reports only a connect timeout, after more than the timeout when lookups are slow.
    try:
        resolve_until(rdzv.master_addr, rdzv.master_port, deadline)
    except NotResolved as exc:
        raise PeerFailure(f"rendezvous timed out after {timeout_s:g} s (--rendezvous-timeout): the master "
                          f"{where} (MASTER_ADDR, MASTER_PORT) does not resolve ({exc.reason}); check the "
                          "master address and that rank 0 is running") from None
    remaining = max(deadline - time.monotonic(), 1.0)
    outcome: dict = {}

    def attempt() -> None:
        try:
            outcome["store"] = next(dist.rendezvous("env://", rank=rdzv.rank, world_size=rdzv.world_size,
                                                    timeout=timedelta(seconds=remaining)))[0]
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            outcome["error"] = exc

    # A client connected to something that accepts but never answers (another program on
    # MASTER_PORT) waits in torch forever; the thread bounds it. Connect retries can overrun the
    # timeout by up to one more timeout, hence the factor 2.
    thread = threading.Thread(target=attempt, name="dscluster-rendezvous", daemon=True)
    thread.start()
    thread.join(2 * remaining + 5)
    if thread.is_alive():
        # torch's client is still running in that thread: ending the interpreter normally would
        # abort the process when it unwinds ("terminate called without an active exception").
        _mark_joined()
        raise PeerFailure(f"rendezvous timed out after {timeout_s:g} s (--rendezvous-timeout): "
                          f"{_master_state(rdzv, connected=None)}")
    if "store" in outcome:
        return outcome["store"]
    try:
        raise outcome["error"]
    except dist.DistError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "EADDRINUSE" in text or "address already in use" in text:
            raise UsageError(f"rank 0 cannot listen on MASTER_PORT {rdzv.master_port}: the port is "
                             "already in use on this node; choose another MASTER_PORT") from None
        if rdzv.rank == 0:
            joined = re.search(r"(\d+)/(\d+) clients joined", text)
            count = f"only {joined.group(1)} of {joined.group(2)}" if joined else "not all"
            raise PeerFailure(f"rendezvous timed out after {timeout_s:g} s (--rendezvous-timeout): {count} "
                              f"ranks reached the master at {where}; check that every node started "
                              "and can reach this address") from None
        raise PeerFailure(f"rendezvous timed out after {timeout_s:g} s (--rendezvous-timeout): "
                          f"{_master_state(rdzv, connected=None)}") from None


def _master_state(rdzv: Rendezvous, connected: bool | None, timeout_s: float = 2.0) -> str:
    """Why a rank could not join the master's store, found out in at most twice `timeout_s`: the
    name no longer resolves, nothing answers there, or something that is not the store accepts
    connections there. `connected`: whether torch's client got a connection (False: it gave up
    connecting), None when unknown (it never returned), then a connection is tried here."""
    where = f"{rdzv.master_addr}:{rdzv.master_port}"
    master = f"the master {where} (MASTER_ADDR, MASTER_PORT)"
    try:
        address = resolve(rdzv.master_addr, rdzv.master_port, timeout_s)[0]
    except NotResolved as exc:
        return f"{master} does not resolve ({exc.reason}); check the master address and that rank 0 is running"
    if connected is None:
        try:
            with socket.create_connection((address, rdzv.master_port), timeout=timeout_s):
                connected = True
        except OSError:
            connected = False
    if not connected:
        return f"{master} did not answer; check the master address and that rank 0 is running"
    return (f"something at {where} accepted the connection but never answered as the rendezvous store; "
            "is another program listening on MASTER_PORT on the master?")


def init_groups(rdzv: Rendezvous, backend: str = "auto", timeout_s: float = 600.0,
                rendezvous_timeout_s: float | None = None) -> Groups:
    """Join the default (data) group over env://. `rendezvous_timeout_s` bounds forming the group
    (default: `timeout_s`)."""
    backend = resolve_backend(backend)
    rdzv.export()
    device = rank_device(backend, rdzv.local_rank)
    if device.type == "cuda":  # before any collective: NCCL binds the communicator to the current device
        torch.cuda.set_device(device)
    store = None
    if not dist.is_initialized():
        store = join_store(rdzv, rendezvous_timeout_s or timeout_s)
        store.set_timeout(timedelta(seconds=timeout_s))
        _mark_joined()
        bound = {}
        if device.type == "cuda":
            check_one_gpu_per_rank(store, rdzv, device, rendezvous_timeout_s or timeout_s)
            bound["device_id"] = device  # NCCL's communicator is made now, on this GPU, not at the first collective
        dist.init_process_group(backend=backend, store=store, rank=rdzv.rank,
                                world_size=rdzv.world_size, timeout=timedelta(seconds=timeout_s), **bound)
    elif rdzv.world_size > 1:  # the caller joined already: a client of the same env:// store
        store = dist.TCPStore(rdzv.master_addr, rdzv.master_port, rdzv.world_size, is_master=False,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    log.info("rank %d/%d joined: backend=%s master=%s:%d launcher=%s",
             rdzv.rank, rdzv.world_size, backend, rdzv.master_addr, rdzv.master_port, rdzv.launcher)
    return Groups(rdzv, backend, store, device)


_joined = False  # joined a process group, or left torch's store client running: its C++ threads may be running


def _mark_joined() -> None:
    global _joined
    _joined = True


def exit_now_if_joined(code: int) -> int:
    """End a process that joined a group with `code` once its work is flushed, skipping the
    interpreter's teardown: torch's C++ threads (gloo, the store client) can still be running
    then, and destroying them aborts the process ("terminate called without an active
    exception", SIGABRT) after a clean finish. Returns `code` when this process never joined."""
    if not _joined:
        return code
    # mpi4py (the master address) wants MPI finalized after a clean finish; after a failure, skip
    # it (it may wait for a dead peer) and let mpirun end the job.
    mpi = sys.modules.get("mpi4py.MPI")
    if code == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def destroy_groups() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown of a broken group must not mask the real error
            log.debug("destroy_process_group failed", exc_info=True)


def check_all_reduce(groups: Groups) -> int:
    """All-reduce each rank's (rank + 1): the sum proves every rank joined the same group."""
    t = torch.tensor([groups.rank + 1], dtype=torch.int64, device=groups.device)
    if groups.world_size > 1:
        dist.all_reduce(t)
    expected = groups.world_size * (groups.world_size + 1) // 2
    if int(t.item()) != expected:
        raise RuntimeError(f"all-reduce gave {int(t.item())}, expected {expected}")
    return int(t.item())


def default_threads(local_world_size: int) -> int:
    """Threads per rank when no launcher set OMP_NUM_THREADS: the cores split between local ranks."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))

"""How much host memory this rank may still fill, and a check before it loads weights into it.

A rank that loads more than its memory limit allows is killed by the kernel's OOM killer halfway
through loading: SIGKILL, no message, and a pod that restarts into the same death. Checked first,
the same rank says what it needs, what it has and what to do, and exits 2.

The limit is the tightest of the memory cgroups above this process (v1 `memory.limit_in_bytes`
and `hierarchical_memory_limit`, v2 `memory.max` up the tree: a Kubernetes container's limit) and
the node's MemAvailable. What the cgroup already holds counts against it, less its page cache
(file pages the kernel can reclaim). Ranks on one node that share a cgroup (one pod running
several ranks) load at the same time, so each gets its share: the room divided by LOCAL_SIZE.

`DSCLUSTER_MEMORY_CHECK=0` turns the check off (an estimate can be wrong; the kernel is not).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dscluster.errors import UsageError

GIB = 2**30
UNLIMITED = 2**60   # cgroup v1 writes "no limit" as a number near 2^63


@dataclass(frozen=True)
class HostMemory:
    room: int          # bytes this rank may still fill
    limit: int         # the limit that bounds it
    source: str        # where the limit comes from


def host_memory(cgroup_root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc")) -> HostMemory:
    """The room left to this rank: the tightest limit less what is in use, shared by local ranks."""
    candidates = []
    available = _meminfo(proc).get("MemAvailable")
    if available is not None:
        candidates.append((available, available, "MemAvailable in /proc/meminfo"))
    for limit, in_use, source in _cgroup_limits(cgroup_root, proc):
        candidates.append((max(0, limit - in_use), limit, source))
    if not candidates:
        return HostMemory(UNLIMITED, UNLIMITED, "no limit found")
    room, limit, source = min(candidates)
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1"
    share = max(1, int(local)) if local.isdigit() else 1
    return HostMemory(room // share, limit, source + (f", shared by {share} local ranks" if share > 1 else ""))


def check_host_memory(need: int, what: str, memory: HostMemory | None = None) -> None:
    """Raise a UsageError when `need` bytes (what this rank is about to hold) exceed its room."""
    if os.environ.get("DSCLUSTER_MEMORY_CHECK", "1") == "0":
        return
    memory = memory or host_memory()
    if need > memory.room:
        raise UsageError(f"this rank needs {need / GIB:.2f} GiB of host memory for {what}, but only "
                         f"{memory.room / GIB:.2f} GiB is left under its limit of {memory.limit / GIB:.2f} GiB "
                         f"({memory.source}): split the model over more ranks or nodes (see `dscluster plan "
                         "--host-mem-gib`), or give each rank more memory (DSCLUSTER_MEMORY_CHECK=0 skips this check)")


def _meminfo(proc: Path) -> dict[str, int]:
    out = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_limits(root: Path, proc: Path) -> list[tuple[int, int, str]]:
    """(limit, bytes in use that cannot be reclaimed, where) for each memory cgroup limit above us."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            found += _v1(root / "memory", path)
        elif controllers == "" and (root / "cgroup.controllers").exists():  # v2, the unified hierarchy
            found += _v2(root, path)
    return found


def _v1(mount: Path, path: str) -> list[tuple[int, int, str]]:
    group = mount / path.lstrip("/")
    if not group.is_dir():
        group = mount  # inside a container the mount shows this cgroup as the root
    stat = _stat(group / "memory.stat")
    limits = [x for x in (_number(group / "memory.limit_in_bytes"), stat.get("hierarchical_memory_limit"))
              if x is not None]
    usage = _number(group / "memory.usage_in_bytes")
    if not limits or min(limits) >= UNLIMITED or usage is None:
        return []
    reclaimable = stat.get("total_inactive_file", 0) + stat.get("total_active_file", 0)
    return [(min(limits), max(0, usage - reclaimable), "memory cgroup (v1) memory.limit_in_bytes")]


def _v2(root: Path, path: str) -> list[tuple[int, int, str]]:
    found = []
    group = root / path.lstrip("/")
    while group != root.parent and str(group).startswith(str(root)):
        text = _text(group / "memory.max")
        current = _number(group / "memory.current")
        if text is not None and text != "max" and text.isdigit() and current is not None:
            stat = _stat(group / "memory.stat")
            reclaimable = stat.get("inactive_file", 0) + stat.get("active_file", 0)
            found.append((int(text), max(0, current - reclaimable), "memory cgroup (v2) memory.max"))
        if group == root:
            break
        group = group.parent
    return found


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(path: Path) -> int | None:
    text = _text(path)
    return int(text) if text is not None and text.isdigit() else None


def _stat(path: Path) -> dict[str, int]:
    text = _text(path) or ""
    return {k: int(v) for k, _, v in (line.partition(" ") for line in text.splitlines()) if v.isdigit()}

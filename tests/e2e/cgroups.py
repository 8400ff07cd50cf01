"""A node with less memory than the model, on one machine: a memory cgroup (v1) with a limit.

`MemoryCgroup(limit)` makes a child of this process's own memory cgroup (so whatever limits
apply to the test apply to it too), sets `memory.limit_in_bytes`, and `command(cmd)` wraps a
command so that it enters the cgroup before it execs (children inherit it). An OOM kill inside
it is counted in `memory.oom_control`. `close()` kills what is left in it and removes it; the
context manager calls it even when the test fails.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

MOUNT = Path("/sys/fs/cgroup/memory")


def own_memory_cgroup() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return MOUNT / path.lstrip("/")
    except OSError:
        pass
    return None


def unavailable_reason() -> str | None:
    """None when memory cgroups (v1) can be made here, else why not."""
    if os.geteuid() != 0:
        return "memory cgroups need root"
    parent = own_memory_cgroup()
    if parent is None or not (parent / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {MOUNT}"
    probe = parent / f"dscluster-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a memory cgroup under {parent}: {exc.strerror}"
    probe.rmdir()
    return None


class MemoryCgroup:
    def __init__(self, limit_bytes: int, name: str = "rank"):
        self.path = own_memory_cgroup() / f"dscluster-test-{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.limit = int((self.path / "memory.limit_in_bytes").read_text())

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside this cgroup (the shell moves itself in, then execs)."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def close(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # still busy: the last processes are being reaped
                time.sleep(0.1)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

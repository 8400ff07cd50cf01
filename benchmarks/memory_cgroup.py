"""A memory cgroup around one server: the memory limit a rank gets as a Kubernetes container, on
one host, and the kernel's own account of what happened inside it.

Works with either hierarchy, whichever the host mounts: cgroup v1 (a `memory` controller at
/sys/fs/cgroup/memory: `memory.limit_in_bytes`, `memory.max_usage_in_bytes`, the `oom_kill` count
in `memory.oom_control`) or cgroup v2 (unified at /sys/fs/cgroup: `memory.max`, `memory.peak`,
the `oom_kill` count in `memory.events`). The cgroup is made as a child of this process's own
memory cgroup, so whatever limits apply to the benchmark apply to the server too. `command(cmd)`
wraps a command so that it moves itself in before it execs (its children inherit the cgroup);
`close()` kills what is left inside and removes it.

The kernel's numbers are the reference here, not the server's: the peak is the cgroup's high-water
mark (v1 always; v2 from kernel 5.19, else None and the caller's samples of `usage()` stand in),
and an OOM kill is counted by the kernel whether or not the server could say anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V1_MOUNT = ROOT / "memory"


def hierarchy() -> int | None:
    """2 when the unified hierarchy is mounted at /sys/fs/cgroup, 1 for a v1 memory controller."""
    if (ROOT / "cgroup.controllers").exists():
        return 2
    if (V1_MOUNT / "memory.limit_in_bytes").exists():
        return 1
    return None


def own_cgroup(version: int) -> Path | None:
    """This process's memory cgroup directory, from /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if version == 1 and "memory" in controllers.split(","):
            return V1_MOUNT / path.lstrip("/")
        if version == 2 and hier == "0":
            return ROOT / path.lstrip("/")
    return None


def unavailable_reason() -> str | None:
    """None when a memory cgroup with a limit can be made here, else why not (one line)."""
    if os.geteuid() != 0:
        return "making a memory cgroup needs root"
    version = hierarchy()
    if version is None:
        return f"no memory cgroup hierarchy mounted at {ROOT}"
    try:
        MemoryCgroup("probe").close()
    except (OSError, RuntimeError) as exc:
        return f"cannot make a memory cgroup (v{version}): {exc}"
    return None


class MemoryCgroup:
    def __init__(self, name: str = "server"):
        self.version = hierarchy()
        parent = own_cgroup(self.version) if self.version else None
        if parent is None:
            raise RuntimeError("this process's memory cgroup was not found in /proc/self/cgroup")
        if self.version == 2:
            _enable_memory_controller(parent)
        self.path = parent / f"dscluster-bench-{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        limit_file = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        if not (self.path / limit_file).exists():
            self.path.rmdir()
            raise RuntimeError(f"{parent} does not delegate the memory controller to its children")

    # -- settings -------------------------------------------------------------------------------

    def set_limit(self, limit_bytes: int) -> int:
        """Set the hard limit; returns the limit the kernel took (v1 rounds to pages)."""
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            return int((self.path / "memory.limit_in_bytes").read_text())
        (self.path / "memory.max").write_text(str(limit_bytes))
        if (self.path / "memory.swap.max").exists():  # as v1 without memsw: the limit is on memory alone
            (self.path / "memory.swap.max").write_text("0")
        return int((self.path / "memory.max").read_text())

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside this cgroup (the shell moves itself in, then execs: same pid)."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]

    # -- the kernel's account ---------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes charged now (anonymous memory and page cache)."""
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text())

    def peak(self) -> int | None:
        """The high-water mark of usage since the cgroup was made; None where the kernel has none."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this cgroup."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def stat(self) -> dict[str, int]:
        """`memory.stat`: resident anonymous memory and page cache, among others."""
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.isdigit():
                out[key] = int(value)
        return out

    def resident_anon(self) -> int | None:
        """Anonymous memory only (what the kernel cannot reclaim without swap)."""
        stat = self.stat()
        return stat.get("total_rss", stat.get("rss")) if self.version == 1 else stat.get("anon")

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    # -- teardown -----------------------------------------------------------------------------------

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


def _enable_memory_controller(parent: Path) -> None:
    """cgroup v2 gives a child `memory.max` only when its parent delegates the controller."""
    control = parent / "cgroup.subtree_control"
    if "memory" in control.read_text().split():
        return
    try:
        control.write_text("+memory")
    except OSError as exc:  # EBUSY: the parent holds processes itself ("no internal processes")
        raise RuntimeError(f"cannot enable the memory controller for children of {parent}: "
                           f"{exc.strerror or exc}") from None


def kernel_log_lines() -> list[str] | None:
    """The kernel ring buffer (`dmesg`), or None where it cannot be read."""
    try:
        proc = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def oom_lines(lines: list[str], cgroup: MemoryCgroup, pids: list[int]) -> list[str]:
    """The kernel's OOM reports that name this cgroup or one of `pids`, with the host's own cgroup
    path above ours written as `...` (it names the host, not the benchmark). Filtered by those
    marks, not by position: the kernel's ring buffer is of fixed size, so once full its line count
    no longer grows and a count taken before the run says nothing."""
    marks = [cgroup.path.name] + [f"process {pid} " for pid in pids] + [f"pid={pid}," for pid in pids]
    mount = V1_MOUNT if cgroup.version == 1 else ROOT
    above = "/" + str(cgroup.path.parent.relative_to(mount)).strip("/.")
    return [line.replace(f"{above}/", ".../") if above != "/" else line for line in lines
            if ("oom" in line.lower() or "killed process" in line.lower()) and any(mark in line for mark in marks)]

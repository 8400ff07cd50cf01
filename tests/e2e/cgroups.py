"""A node with less memory than the model, on one machine: a memory cgroup with a limit.

`MemoryCgroup(limit)` makes a child of this process's own memory cgroup (so whatever limits apply
to the test apply to it too) and sets its limit; `command(cmd)` wraps a command so that it enters
the cgroup before it execs (children inherit it); an OOM kill inside it is counted; `close()`
kills what is left in it and removes it, and the context manager calls it even when the test
fails. The cgroup itself is the benchmarks' (benchmarks/memory_cgroup.py: cgroup v1 or v2,
whichever the host mounts); this adds the limit at creation, as the tests use it.
"""

from __future__ import annotations

from benchmarks.memory_cgroup import MemoryCgroup as _MemoryCgroup
from benchmarks.memory_cgroup import unavailable_reason

__all__ = ["MemoryCgroup", "unavailable_reason"]


class MemoryCgroup(_MemoryCgroup):
    def __init__(self, limit_bytes: int, name: str = "rank"):
        super().__init__(f"test-{name}")
        self.limit = self.set_limit(limit_bytes)

    def peak_bytes(self) -> int:
        peak = self.peak()
        if peak is None:
            raise RuntimeError(f"the kernel keeps no peak usage for {self.path}")
        return peak

"""How many GPUs this host shows, without importing torch where no GPU driver is.

Importing torch costs about a second of CPU; the node agent (`dscluster launch`, `serve --nproc N`)
and `doctor` only need the count, and a host without the driver's device nodes has none.
"""

from __future__ import annotations

import os

GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd")


def driver_present() -> bool:
    """An NVIDIA (or ROCm) driver's device nodes exist on this host."""
    return any(os.path.exists(p) for p in GPU_DEVICE_NODES)


def gpu_count() -> int:
    """torch.cuda.device_count(), or 0 without importing torch when no driver is present."""
    if not driver_present():
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0

"""What names a model on the command line: a directory (a transformers checkpoint) or an import
spec (`package.module:factory`), and the checks that fail before any rank starts.

Free of torch: the node agent (`serve --nproc N`, which only starts and supervises ranks) checks
the spec without the second of CPU that importing torch costs.
"""

from __future__ import annotations

import os
from pathlib import Path

from dscluster.errors import UsageError


def is_import_spec(spec: str) -> bool:
    return ":" in spec and not os.path.exists(spec)


def check_model_spec(spec: str) -> None:
    """Cheap checks that fail before any rank starts: the directory or module exists."""
    if is_import_spec(spec):
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise UsageError(f"model {spec!r}: an import spec is package.module:factory")
        return
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model {spec!r}: no such directory (or use package.module:factory)")
    if not (path / "config.json").is_file():
        raise UsageError(f"model directory {spec!r} has no config.json")

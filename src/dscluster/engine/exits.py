"""How a rank leaves when the group breaks, and how a collective's error reads in one line.

A broken group ends every process with exit code 3 (launchers and Kubernetes then restart the
group); a unit that failed while the group stayed intact is an `EngineError`."""

from __future__ import annotations

import logging
import os
import re
import sys

from dscluster.errors import EXIT_PEER_FAILED


class EngineError(RuntimeError):
    """A unit of work failed on some rank, but the group is intact and in step."""


def exit_group_broken(reason: str, rank: int) -> None:
    """Leave at once: threads may be stuck inside a collective that will never return."""
    sys.stderr.write(f"dscluster: rank {rank}: group broken: {reason}; exiting {EXIT_PEER_FAILED}\n")
    sys.stderr.flush()
    logging.shutdown()
    os._exit(EXIT_PEER_FAILED)


def first_line(exc: BaseException | None) -> str:
    """A collective error in one readable line: gloo's source location and advice removed."""
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0]
    return text[:300]

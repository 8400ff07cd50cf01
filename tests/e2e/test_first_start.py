"""A clean first start, as a new user has it: `make install` compiles DeepSpeed's shared-memory
all-reduce op, so the first `make serve` loads it (seconds) instead of compiling it (about 40 s on 2
cores, which the log showed as slow reading of the checkpoint); and Ctrl-C ends every rank quietly
with exit 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from servers import RemoteServer  # tests/e2e/servers.py

ROOT = Path(__file__).resolve().parents[2]


def make_install_op_build() -> str:
    """The command `make install` runs to build the op, read from the Makefile (`make -n`)."""
    venv = Path(sys.executable).parent.parent
    plan = subprocess.run(["make", "-n", "-B", "install", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True).stdout
    builds = [line for line in plan.splitlines() if "dscluster.engine.parallel" in line and not line.startswith("#")]
    assert len(builds) == 1, f"`make install` builds no shared-memory op:\n{plan}"
    return builds[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_first_serve_loads_the_op_make_install_built_and_ctrl_c_exits_0(tiny):
    build = subprocess.run(make_install_op_build(), shell=True, cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "shared-memory all-reduce op" in build.stdout + build.stderr
    with RemoteServer(tiny) as server:
        with server.client() as c:
            reply = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
        assert reply.status_code == 200
        # Ctrl-C in a terminal: SIGINT to the foreground process group, which holds the launcher
        # (its ranks run in sessions of their own, so the launcher passes it on to each).
        os.killpg(server.proc.pid, signal.SIGINT)
        code = server.proc.wait(60)
        log = server.output()
    assert code == 0, log[-3000:]
    # Both ranks loaded what `make install` built: none compiled it again at start.
    assert log.count("shared-memory all-reduce op: loaded from") == 2, log[-3000:]
    assert "op: compiled" not in log
    assert "rank 1: stop received" in log  # the worker left on rank 0's stop, not on the signal
    for noise in ("ERROR", "group broken", "Traceback", "KeyboardInterrupt", "stopping the other ranks"):
        assert noise not in log, log[-3000:]

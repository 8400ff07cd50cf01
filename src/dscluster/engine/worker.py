"""Every rank but rank 0: receive each unit rank 0 sends (engine/client.py), run it, report, until
rank 0 says stop. A lost rank 0 (a closed or silent control connection) ends the process with exit 3."""

from __future__ import annotations

import logging
import signal

from dscluster.engine.exits import exit_group_broken, first_line
from dscluster.engine.protocol import Op, StepPlan
from dscluster.engine.runtime import Runtime

log = logging.getLogger(__name__)


def run_worker(runtime: Runtime) -> int:
    """Receive and run every unit rank 0 sends, until it says stop. Returns 0; exits 3 if the group breaks."""
    channel = runtime.channel
    # A stop (SIGTERM, or SIGINT: Ctrl-C reaches every rank through the launcher) is rank 0's to
    # carry out: it drains, then sends STOP. A worker that left at once would break the group.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda signum, _: log.info("%s: waiting for rank 0 to stop the group",
                                                       signal.Signals(signum).name))
    while True:
        runtime.before_message()
        try:
            message = channel.recv()
        except Exception as exc:  # noqa: BLE001
            exit_group_broken(f"lost rank 0 ({first_line(exc)})", runtime.rank)
        reset = runtime.after_message(message)
        if message.op is Op.STOP:
            log.info("rank %d: stop received", runtime.rank)
            runtime.close()
            return 0
        if message.op is Op.HEARTBEAT:
            continue
        if message.op is Op.STEP:
            plan = StepPlan() if reset else StepPlan.received(message)
            try:
                runtime.run_step(plan)
            except Exception:  # noqa: BLE001 - reported to every rank in the next header
                log.exception("rank %d: generation step failed", runtime.rank)
            continue
        ok = True
        try:
            runtime.run_predict(message.payload)
        except Exception:  # noqa: BLE001 - reported to rank 0 through the agreement below
            log.exception("rank %d: %s failed", runtime.rank, message.op.name.lower())
            ok = False
        try:
            channel.agree_ok(ok)
        except Exception as exc:  # noqa: BLE001
            exit_group_broken(f"lost rank 0 during {message.op.name.lower()} ({first_line(exc)})", runtime.rank)

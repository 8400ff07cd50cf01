"""Fixtures shared by the end-to-end modules."""

from __future__ import annotations

import pytest

from servers import RemoteServer  # tests/e2e/servers.py


@pytest.fixture(scope="session")
def shared_server(tiny):
    """One 2-rank server on the tiny model with default flags, for the modules that only send it
    requests (a server's start costs 15-40 s of this 2-core machine; each module starting its own
    was most of the suite's time). A module that changes a server's state (signals, faults, flags)
    starts its own. Under `make test`'s two xdist workers the session is a worker's: each worker
    that runs one of these modules starts one (a few seconds), rather than pinning the modules to
    one worker."""
    with RemoteServer(tiny) as s:
        yield s

"""Whether the HTTP port is free, checked before any rank starts.

Free of torch and of the web stack: the node agent (`serve --nproc N`) checks the port and then
only starts and supervises the ranks.
"""

from __future__ import annotations

import socket

from dscluster.errors import UsageError


def check_port_free(host: str, port: int) -> None:
    """Fail before any rank loads the model when the HTTP port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

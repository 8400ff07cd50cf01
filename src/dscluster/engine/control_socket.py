"""The control channel's transport: plain TCP sockets in a star around rank 0.

Why not a gloo process group, which carried the control messages before: gloo's TCP transport
hands every operation to its loop thread, which wakes the caller when it is done, so on a 2-core
machine a 2-rank all-reduce of 3 int64 took about 1000 us and a broadcast about 400 us, while a
round trip over a plain blocking socket between the same two processes takes 80-200 us. A
`/v1/predict` on two replicated ranks paid about 2.4 ms of control messages on a 2 ms forward
(a header all-reduce, a payload broadcast, an all-reduce of the outcome), and every generation
step about 1 ms. The benchmark `control_message` compares the two side by side.

The star: rank 0 listens on a port the operating system picks, on every interface, and publishes
where it is (its address as the others see it, the port, a secret) under a key in the rendezvous
store. Every worker reads the key, connects, proves with the secret that it belongs to this run
and says its rank; rank 0 answers with the other half of the secret, so that a worker knows it
reached rank 0 and not another program on the same port. A worker tries rank 0's published
address first, then MASTER_ADDR (which reached the store): a host whose own name resolves to a
loopback address on rank 0's node publishes an address the other nodes cannot use.

On the wire a frame is two int64 (how many values, how many payload bytes), the int64 values,
then the payload bytes. Rank 0 sends a frame to every worker (`broadcast`) and waits for one frame
from each (`gather`); a worker `send`s frames to rank 0 and `receive`s them. What the frames mean
is the protocol's business (engine/protocol.py). Every wait is bounded by the timeout: a peer
that closes its socket, resets it or stays silent that long raises `LinkLost`, naming the rank.
TCP_NODELAY is set on every socket: frames are small and each one is waited for.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import struct
import time
from datetime import timedelta

import numpy as np

from dscluster.errors import PeerFailure

_PREFIX = struct.Struct("<qq")      # count of int64 values, payload bytes
_SECRET = 16                         # bytes each side proves: the worker's half, then rank 0's
_HELLO = struct.Struct(f"<{_SECRET}sq")   # the worker's half of the secret, its rank
_HANDSHAKE_S = 5.0                   # a connection that does not say hello by then is not a worker
_RETRY_S = 0.2


class LinkLost(ConnectionError):
    """A peer closed its control connection, reset it, or stayed silent past the timeout."""

    def __init__(self, ranks: list[int], detail: str):
        self.ranks = list(ranks)
        self.detail = detail
        who = ", ".join(f"rank {r}" for r in self.ranks)
        super().__init__(f"{who} {detail}")


def _frame(values, payload: bytes = b"") -> bytes:
    array = np.asarray(values, dtype="<i8")
    return _PREFIX.pack(array.size, len(payload)) + array.tobytes() + payload


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return buffer


def _read_frame(sock: socket.socket) -> tuple[np.ndarray, bytes]:
    count, size = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    body = _recv_exact(sock, 8 * count + size)
    return np.frombuffer(body, dtype="<i8", count=count), bytes(body[8 * count:])


def _silent(timeout: float) -> str:
    return f"stopped answering on the control channel for more than {timeout:g} s"


def _lost(rank: int, exc: BaseException, timeout: float) -> LinkLost:
    if isinstance(exc, (EOFError, ConnectionResetError, BrokenPipeError)):  # the peer's socket is gone
        return LinkLost([rank], "closed its control connection")
    if isinstance(exc, TimeoutError):
        return LinkLost([rank], _silent(timeout))
    return LinkLost([rank], f"lost its control connection ({exc})")


def _connected(sock: socket.socket, timeout: float) -> socket.socket:
    """A connection ready for frames: every send and receive bounded by `timeout`, no Nagle delay."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


class Rank0Link:
    """Rank 0's end: one connected socket per worker.

    A worker only ever sends what rank 0 waits for (a frame in answer to one of its own), so a
    socket that is readable at any other time is one whose peer closed it: `broadcast` checks for
    that first, which notices a worker lost since the last message at the next one. (While
    answers are still owed, `owed=True`, a readable socket may hold one: `gather` finds a closed
    one then.)"""

    def __init__(self, sockets: dict[int, socket.socket], timeout: float):
        self.sockets = {rank: _connected(sock, timeout) for rank, sock in sorted(sockets.items())}
        self.timeout = timeout
        self._rank_of = {sock.fileno(): rank for rank, sock in self.sockets.items()}
        self._poller = select.poll()
        for fd in self._rank_of:
            self._poller.register(fd, select.POLLIN)

    def broadcast(self, values, payload: bytes = b"", owed: bool = False) -> None:
        for fd, _ in ([] if owed else self._poller.poll(0)):
            raise self._unasked(self._rank_of[fd])
        frame = _frame(values, payload)
        for rank, sock in self.sockets.items():
            try:
                sock.sendall(frame)
            except OSError as exc:
                raise _lost(rank, exc, self.timeout) from None

    def gather(self) -> list[np.ndarray]:
        """One frame's values from every worker, in rank order; the first peer lost raises at once,
        whichever worker it is. A worker's next frame may already follow its first (answers on
        steps in flight), so a worker is polled until its frame is read, not after."""
        deadline = time.monotonic() + self.timeout
        got: dict[int, np.ndarray] = {}
        poller = select.poll()
        for fd in self._rank_of:
            poller.register(fd, select.POLLIN)
        while len(got) < len(self.sockets):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(self.sockets) - set(got))
                raise LinkLost(missing, _silent(self.timeout))
            for fd, _ in poller.poll(remaining * 1000):
                rank = self._rank_of[fd]
                poller.unregister(fd)
                try:
                    got[rank] = _read_frame(self.sockets[rank])[0]
                except (OSError, EOFError) as exc:
                    raise _lost(rank, exc, self.timeout) from None
        return [got[rank] for rank in sorted(got)]

    def _unasked(self, rank: int) -> LinkLost:
        """What a socket that is readable when nothing is owed holds: its end (or a broken peer)."""
        try:
            data = self.sockets[rank].recv(1)
        except OSError as exc:
            return _lost(rank, exc, self.timeout)
        return _lost(rank, EOFError() if not data else ConnectionError("sent a frame it was not asked for"),
                     self.timeout)

    def close(self, drain: bool = False) -> None:
        """Close every connection. `drain`: first wait (the timeout at most) until every worker has
        closed its end, which a worker does once it has read the last message."""
        if drain:
            deadline = time.monotonic() + self.timeout
            for sock in self.sockets.values():
                try:
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(max(0.0, deadline - time.monotonic()))
                    while sock.recv(4096):
                        pass
                except OSError:
                    pass
        for sock in self.sockets.values():
            sock.close()


class WorkerLink:
    """A worker's end: its one socket to rank 0."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = _connected(sock, timeout)
        self.timeout = timeout

    def send(self, values, payload: bytes = b"") -> None:
        try:
            self.sock.sendall(_frame(values, payload))
        except OSError as exc:
            raise _lost(0, exc, self.timeout) from None

    def receive(self) -> tuple[np.ndarray, bytes]:
        try:
            return _read_frame(self.sock)
        except (OSError, EOFError) as exc:
            raise _lost(0, exc, self.timeout) from None

    def close(self, drain: bool = False) -> None:
        self.sock.close()


# -- setting it up -----------------------------------------------------------------------------


def open_link(store, key: str, rank: int, world_size: int, master_addr: str, timeout: float,
              setup_timeout: float) -> Rank0Link | WorkerLink:
    """Connect the star: rank 0 publishes its address under `key` in `store` and accepts every
    worker; a worker connects to it. Raises PeerFailure (one line) when that is not done within
    `setup_timeout`. `timeout` bounds every later wait for a peer."""
    deadline = time.monotonic() + setup_timeout
    if rank == 0:
        return Rank0Link(_accept_workers(store, key, world_size, master_addr, deadline, setup_timeout), timeout)
    return WorkerLink(_connect_to_rank0(store, key, rank, master_addr, deadline, setup_timeout), timeout)


def _address_towards(master_addr: str) -> str:
    """This host's address on the route to MASTER_ADDR, as the other nodes reach it: the local
    address of a UDP socket connected there (no packet is sent). 127.0.0.1 on one machine."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(master_addr, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(where)
            return probe.getsockname()[0]
    except OSError:
        return master_addr


def _listen() -> socket.socket:
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("0.0.0.0", 0))


def _accept_workers(store, key: str, world_size: int, master_addr: str, deadline: float,
                    setup_timeout: float) -> dict[int, socket.socket]:
    secret = secrets.token_bytes(2 * _SECRET)
    with _listen() as listener:
        host, port = _address_towards(master_addr), listener.getsockname()[1]
        store.set(key, json.dumps({"host": host, "port": port, "secret": secret.hex()}))
        accepted: dict[int, socket.socket] = {}
        while len(accepted) < world_size - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = ", ".join(str(r) for r in range(1, world_size) if r not in accepted)
                for sock in accepted.values():
                    sock.close()
                raise PeerFailure(f"control channel: rank(s) {missing} did not connect to rank 0 at "
                                  f"{host}:{port} within {setup_timeout:g} s; check that every node can "
                                  "reach rank 0's node on any port, as the process group's own connections do")
            listener.settimeout(remaining)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(min(remaining, _HANDSHAKE_S))
                proof, peer = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
                if proof != secret[:_SECRET] or not 0 < peer < world_size or peer in accepted:
                    raise ConnectionError("not a worker of this group")
                conn.sendall(secret[_SECRET:])
            except (OSError, EOFError):
                conn.close()
                continue
            accepted[peer] = conn
    return accepted


def _connect_to_rank0(store, key: str, rank: int, master_addr: str, deadline: float,
                      setup_timeout: float) -> socket.socket:
    try:
        store.wait([key], timedelta(seconds=max(setup_timeout, 0.001)))
        where = json.loads(store.get(key))
    except Exception as exc:  # noqa: BLE001 - DistStoreError (timeout), DistNetworkError (rank 0 gone)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerFailure(f"control channel: rank 0 did not publish its address within {setup_timeout:g} s "
                          f"({first})") from None
    secret, port = bytes.fromhex(where["secret"]), where["port"]
    hosts = list(dict.fromkeys([where["host"], master_addr]))
    errors: dict[str, str] = {}
    while True:
        for host in hosts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tried = "; ".join(f"{h}:{port}: {e}" for h, e in errors.items())
                raise PeerFailure(f"control channel: could not reach rank 0 within {setup_timeout:g} s ({tried})")
            try:
                sock = socket.create_connection((host, port), timeout=min(remaining, _HANDSHAKE_S))
            except OSError as exc:
                errors[host] = str(exc) or type(exc).__name__
                continue
            try:
                sock.sendall(_HELLO.pack(secret[:_SECRET], rank))
                if bytes(_recv_exact(sock, _SECRET)) != secret[_SECRET:]:
                    raise ConnectionError("something else answered on that port")
            except (OSError, EOFError) as exc:
                sock.close()
                errors[host] = str(exc) or "closed before the handshake"
                continue
            return sock
        time.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))

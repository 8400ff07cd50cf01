"""Several "nodes" on one machine, for multi-node tests: each node a Linux network namespace.

`Cluster(n)` makes a bridge in the root namespace and, per node, a namespace with a veth pair
(`eth0` inside, its peer on the bridge), an address in a private /24 (10.77.X.0/24, X chosen so
that no route of this machine uses it) and `/etc/netns/NS/hosts` naming every node, so a rank
finds the master by name as it would through a headless Service. The bridge holds the last
address of the subnet, so the test process reaches every node (HTTP to rank 0) directly.

`Cluster(n, names=[...], aliases={name: [...]})` names the nodes as pods are named and adds more
names for a node to every hosts file (a Service name, a pod's DNS name under a headless Service).

`node.popen(cmd)` runs a command in the node: `ip netns exec` (network and mount namespaces)
then `unshare --uts` with the node's name as hostname, so the names ranks report are node names.
Paths given in `hide` are covered by an empty tmpfs in that node's own mount namespace only: a
model directory "missing on one node".

Everything made here (processes, namespaces, veths, the bridge, the /etc/netns directories) is
removed in `close()`, which the context manager calls even when the test fails.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

IP_TIMEOUT = 15


class Unavailable(RuntimeError):
    """Namespaces cannot be made here; the message says why (tests skip with it)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=check)


def unavailable_reason() -> str | None:
    """None when this machine can make network namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"dsprobe{uuid.uuid4().hex[:6]}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    for _ in range(200):
        third = int.from_bytes(os.urandom(1), "big")
        if f"10.77.{third}." not in used:
            return ipaddress.IPv4Network(f"10.77.{third}.0/24")
    raise Unavailable("no free 10.77.X.0/24 subnet")


class Node:
    def __init__(self, cluster: Cluster, index: int, name: str | None = None):
        self.cluster = cluster
        self.index = index
        self.name = name or f"node{index}"               # hostname and DNS name
        self.ns = f"{cluster.tag}-{self.name}"           # namespace name, unique per cluster
        self.addr = str(cluster.subnet.network_address + index + 1)
        self.ifname = "eth0"                             # inside the namespace
        self.peer = f"{cluster.tag}v{index}"             # on the bridge, in the root namespace
        self.procs: list[subprocess.Popen] = []

    # -- running things --------------------------------------------------------------------
    def command(self, cmd: list[str], hide: tuple[str, ...] = ()) -> list[str]:
        mounts = "".join(f"mount -t tmpfs none {shlex.quote(p)} && " for p in hide)
        script = f'{mounts}hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", script, self.name, *cmd]

    def popen(self, cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None,
              hide: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start `cmd` in this node (its pid is the command's own: every layer execs).
        Output goes to `log` (a file) or is discarded."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(self.command(cmd, hide), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, process_group=0)
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)

    def pids(self) -> list[int]:
        """Every process in this node's network namespace (a launcher's children included)."""
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    # -- faults ----------------------------------------------------------------------------
    def link(self, up: bool) -> None:
        """Cut (or restore) this node's only link, as a dead switch port or a partitioned node."""
        _ip("netns", "exec", self.ns, "ip", "link", "set", self.ifname, "up" if up else "down")


class Cluster:
    """N nodes on a private bridge. Use as a context manager."""

    def __init__(self, n: int, names: list[str] | None = None, aliases: dict[str, list[str]] | None = None):
        reason = unavailable_reason()
        if reason:
            raise Unavailable(reason)
        self.tag = f"ds{uuid.uuid4().hex[:5]}"
        self.bridge = f"{self.tag}br"
        self.subnet = _free_subnet()
        self.bridge_addr = str(self.subnet.broadcast_address - 1)
        self.nodes = [Node(self, i, names[i] if names else None) for i in range(n)]
        self.aliases = aliases or {}
        self._made_bridge = False
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _ip("addr", "add", f"{self.bridge_addr}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{n.addr} {' '.join([n.name, *self.aliases.get(n.name, [])])}\n" for n in self.nodes)
        for node in self.nodes:
            etc = Path("/etc/netns") / node.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            _ip("netns", "add", node.ns)
            _ip("link", "add", node.peer, "type", "veth", "peer", "name", f"{self.tag}p{node.index}")
            _ip("link", "set", f"{self.tag}p{node.index}", "netns", node.ns)
            _ip("netns", "exec", node.ns, "ip", "link", "set", f"{self.tag}p{node.index}", "name", node.ifname)
            _ip("link", "set", node.peer, "master", self.bridge)
            _ip("link", "set", node.peer, "up")
            _ip("netns", "exec", node.ns, "ip", "addr", "add", f"{node.addr}/{prefix}", "dev", node.ifname)
            _ip("netns", "exec", node.ns, "ip", "link", "set", node.ifname, "up")
            _ip("netns", "exec", node.ns, "ip", "link", "set", "lo", "up")

    def close(self) -> None:
        """Remove everything, whatever state the test left it in. Safe to call twice."""
        for node in self.nodes:
            node.kill_all()
        for node in self.nodes:
            _ip("netns", "del", node.ns, check=False)
            _ip("link", "del", node.peer, check=False)
            shutil.rmtree(Path("/etc/netns") / node.ns, ignore_errors=True)
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
            self._made_bridge = False

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (empty after close)."""
        found = []
        namespaces = _ip("netns", "list", check=False).stdout
        links = _ip("-br", "link", check=False).stdout
        for node in self.nodes:
            if node.ns in namespaces:
                found.append(f"namespace {node.ns}")
            if (Path("/etc/netns") / node.ns).exists():
                found.append(f"/etc/netns/{node.ns}")
        found += [f"link {name}" for name in links.split() if name.split("@")[0].startswith(self.tag)]
        return found

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

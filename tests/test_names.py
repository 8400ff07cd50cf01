"""Looking up the master's name (dscluster/cluster/names.py) with the system's own resolver: a name
that resolves, one that does not (the reserved .invalid domain), and a name server that never
answers (a silent UDP socket in a network namespace of its own); and a rank whose master does not
resolve failing in one line, within its rendezvous timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from dscluster.cluster.group import join_store
from dscluster.cluster.names import NotResolved, resolve, resolve_until
from dscluster.cluster.rendezvous import Rendezvous
from dscluster.errors import PeerFailure

MISSING = "no-such-host.invalid"  # RFC 6761: never resolves


def test_a_name_resolves_to_its_addresses():
    assert "127.0.0.1" in resolve("localhost", 29500, timeout=10)
    assert resolve("127.0.0.1", 29500, timeout=10) == ["127.0.0.1"]


def test_a_missing_name_names_the_resolvers_reason():
    with pytest.raises(NotResolved) as failed:
        resolve(MISSING, 29500, timeout=10)
    assert not failed.value.timed_out and failed.value.reason
    assert str(failed.value) == f"{MISSING} does not resolve ({failed.value.reason})"


def test_resolve_until_asks_again_until_the_deadline():
    start = time.monotonic()
    with pytest.raises(NotResolved):
        resolve_until(MISSING, 29500, deadline=start + 1.0)
    assert 0.7 < time.monotonic() - start < 5


def test_a_rank_whose_master_does_not_resolve_fails_within_its_timeout():
    """Before torch's store client is started: nothing of torch is left running in this process."""
    rdzv = Rendezvous(rank=1, local_rank=0, world_size=2, local_world_size=1, master_addr=MISSING,
                      master_port=29500, launcher="env")
    start = time.monotonic()
    with pytest.raises(PeerFailure) as failed:
        join_store(rdzv, timeout_s=1.5)
    assert 1.0 < time.monotonic() - start < 6
    message = str(failed.value)
    assert message.startswith("rendezvous timed out after 1.5 s (--rendezvous-timeout): the master "
                              f"{MISSING}:29500 (MASTER_ADDR, MASTER_PORT) does not resolve ("), message
    assert "\n" not in message


SILENT_RESOLVER = textwrap.dedent("""
    import socket, sys, time
    from dscluster.cluster.names import NotResolved, resolve
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 53))  # the name server of this namespace: it reads nothing, answers nothing
    start = time.monotonic()
    try:
        resolve("master.example", 29500, timeout=1.0)
    except NotResolved as exc:
        print(f"{exc.timed_out} {time.monotonic() - start:.2f} {exc}", flush=True)
    # the lookup is still waiting on its thread: the interpreter must exit anyway
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="a private resolv.conf needs root and unshare")
def test_a_name_server_that_never_answers_is_given_up_on_in_time(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")  # glibc would wait 30 s
    script = (f"ip link set lo up && mount --bind {resolv} /etc/resolv.conf && "
              f'exec {sys.executable} -c "$0"')
    start = time.monotonic()
    proc = subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script, SILENT_RESOLVER], capture_output=True,
                          text=True, timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    timed_out, after, message = proc.stdout.split(" ", 2)
    assert timed_out == "True" and 0.9 < float(after) < 3, proc.stdout
    assert message.strip() == "master.example does not resolve (no answer from the name service within 1 s)"
    assert took < 20  # the process did not wait for the lookup's 30 s

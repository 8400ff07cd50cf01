"""The seeds' own path across pods: the rendered MPIJob run over three network-namespace "pods"
(tests/e2e/netns.py), a launcher and two workers, as the MPI Operator runs it.

What the operator provides, as it provides it:
- the launcher's container: the rendered command (mpirun under the SIGTERM -> SIGUSR1 wrapper)
  and its rendered environment (MASTER_ADDR=<name>-master, MASTER_PORT, the NCCL/GLOO interface
  variables), with the image's PATH, plus the variables the operator adds to a launcher
  (the hostfile, FQDN host names, ssh arguments);
- the hostfile the operator writes: `<name>-worker-i.<name>.<ns>.svc slots=N`;
- names: each pod's hosts file resolves the workers' DNS names and the `<name>-master` Service
  (to worker-0, as its selector does), the way cluster DNS would;
- the checkpoint volume, mounted at the rendered model path in each worker pod.
The one stand-in: OpenMPI's ssh agent (`OMPI_MCA_plm_rsh_agent`) is a small script that enters
the worker's namespace instead of an sshd in the worker pod.

The group serves from worker-0's namespace, answers like the unsharded model (transformers'
forward pass, greedy), and tears down when the launcher is stopped.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from netns import Cluster, unavailable_reason
from servers import poll_ready  # tests/e2e/servers.py

REASON = unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"needs network namespaces: {REASON}"),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI mpirun not installed"),
              pytest.mark.timeout(600)]

NAME, NAMESPACE, MODEL_PATH = "dscluster", "default", "/mnt/checkpoints/model"
WORKERS, SLOTS = 2, 1
PODS = [f"{NAME}-launcher", *(f"{NAME}-worker-{i}" for i in range(WORKERS))]
# sshd's default PATH: what an ssh session gets, not the launcher's environment
SSHD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def worker_dns(i: int) -> str:
    return f"{NAME}-worker-{i}.{NAME}.{NAMESPACE}.svc"


def rendered_mpijob() -> dict:
    out = subprocess.run([sys.executable, "-m", "dscluster", "k8s", "render", "mpijob", "--name", NAME,
                          "--namespace", NAMESPACE, "--nodes", str(WORKERS), "--gpus-per-node", "0",
                          "--model", MODEL_PATH, "--drain-delay", "1"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "MPIJob")


def write_agent(path: Path, cluster: Cluster, model_dir: str) -> None:
    """`agent [-o OPTION]... HOST COMMAND...`, as OpenMPI calls ssh: run COMMAND with a login-like
    environment in HOST's pod (its network namespace, its hostname, its checkpoint volume)."""
    cases = "".join(f"  {worker_dns(i)}|{node.name}) ns={node.ns}; pod={node.name} ;;\n"
                    for i, node in enumerate(cluster.nodes[1:]))
    mount = (f"mount -t tmpfs none /mnt && mkdir -p {MODEL_PATH} && "
             f"mount --bind {shlex.quote(model_dir)} {MODEL_PATH}")
    path.write_text(f"""#!/bin/sh
while [ "$1" = "-o" ]; do shift 2; done
host=$1; shift
case "$host" in
{cases}  *) echo "agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c \\
  'hostname "$1" && {mount} && exec env -i PATH={SSHD_PATH} HOME=/root sh -c "$2"' agent "$pod" "$*"
""")
    path.chmod(0o755)


def reference_completion(model_dir: str, prompt: str, n: int) -> str:
    """Greedy continuation by the unsharded model's own forward pass (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_rendered_mpijob_across_pods(tiny, tmp_path):
    job = rendered_mpijob()
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    command = launcher["command"]
    env = {e["name"]: e["value"] for e in launcher["env"]}
    assert env["MASTER_ADDR"] == f"{NAME}-master" and env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert command[command.index("-np") + 1] == str(WORKERS * SLOTS)

    aliases = {f"{NAME}-worker-{i}": [worker_dns(i)] for i in range(WORKERS)}
    aliases[f"{NAME}-worker-0"].append(f"{NAME}-master")  # the master Service selects worker 0
    with Cluster(len(PODS), names=PODS, aliases=aliases) as cluster:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{worker_dns(i)} slots={SLOTS}\n" for i in range(WORKERS)))
        agent = tmp_path / "agent"
        write_agent(agent, cluster, tiny)
        launcher_env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{SSHD_PATH}",  # the image's PATH
            "HOME": "/root", "PYTHONUNBUFFERED": "1",
            **env,
            # what the MPI Operator adds to an OpenMPI launcher
            "OMPI_MCA_orte_default_hostfile": str(hostfile),
            "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
            "OMPI_MCA_orte_set_default_slots": str(SLOTS),
            "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
            "OMPI_MCA_plm_rsh_agent": str(agent),  # the stand-in for ssh
        }
        log = tmp_path / "launcher.log"
        proc = cluster.nodes[0].popen(command, env=launcher_env, log=log)
        worker0 = cluster.nodes[1]
        url = f"http://{worker0.addr}:{job_port(command)}"
        try:
            assert poll_ready(url, lambda: proc.poll() is None, 300), \
                f"not ready (launcher exit {proc.poll()}):\n{log.read_text()[-4000:]}"
            # Rank 0 serves from worker-0's pod, rank 1 runs in worker-1's.
            for node in cluster.nodes[1:]:
                assert any("dscluster" in _cmdline(pid) for pid in node.pids()), node.name
            prompt, n = "the cluster of pods", 8
            r = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == reference_completion(tiny, prompt, n)

            # Kubernetes deleting the launcher pod: SIGTERM to its process.
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            text = log.read_text()
            assert code == 0, f"launcher exit {code}:\n{text[-4000:]}"
            deadline = time.monotonic() + 30
            while any(node.pids() for node in cluster.nodes[1:]):
                assert time.monotonic() < deadline, "processes left in the worker pods after the launcher ended"
                time.sleep(0.2)
            assert "rank 1: stop received" in text, text[-4000:]
            assert "(host dscluster-worker-1)" not in text  # no rank failed
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not cluster.leftovers()


def job_port(command: list[str]) -> int:
    return int(command[command.index("--port") + 1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""

"""The MPIJob launcher's exact command and environment, run here under a real `mpirun`.

The launcher's command is the rendered one: mpirun under the wrapper that turns the pod's SIGTERM
into SIGUSR1. What a cluster would provide and this machine cannot is replaced, nothing else: the model path
(a `dscluster tiny-model` directory instead of the PVC), MASTER_ADDR (127.0.0.1 instead of the
`<name>-master` Service), the ports (free ones instead of 8000/29500, which may be taken here),
and the MPI Operator's hostfile (`localhost slots=2`, found through OMPI_MCA_orte_default_hostfile
as the operator sets it). The interface is rendered as `lo`, the one every machine has.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from dscluster.cluster.launch import free_port
from servers import poll_ready  # tests/e2e/servers.py

pytestmark = [pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI mpirun not installed"),
              pytest.mark.timeout(420)]


def rendered_launcher() -> dict:
    r = subprocess.run([sys.executable, "-m", "dscluster", "k8s", "render", "mpijob", "--nodes", "1",
                        "--gpus-per-node", "2", "--nccl-socket-ifname", "lo", "--drain-delay", "2"],
                       capture_output=True, text=True, check=True, timeout=60)
    job = next(d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "MPIJob")
    return job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]


def test_launcher_command_serves_under_mpirun(tiny, tmp_path):
    launcher = rendered_launcher()
    cmd = list(launcher["command"])
    assert cmd[cmd.index("-np") + 1] == "2"  # nodes=1 x gpus=2 slots
    http_port, master_port = free_port(), free_port()
    while master_port == http_port:
        master_port = free_port()
    cmd[cmd.index("/mnt/checkpoints/model")] = tiny
    cmd[cmd.index("--port") + 1] = str(http_port)

    env = {e["name"]: e["value"] for e in launcher["env"]}
    assert env["MASTER_ADDR"] == "dscluster-master"
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(master_port)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env["OMPI_MCA_orte_default_hostfile"] = str(hostfile)
    # `dscluster` from this environment, for mpirun's local launch of both ranks. Two ranks fit the
    # two slots the hostfile declares, so --oversubscribe is not needed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    full_env = {**os.environ, **env}
    full_env.pop("OMPI_COMM_WORLD_RANK", None)

    log = tmp_path / "mpirun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, process_group=0)
    url = f"http://127.0.0.1:{http_port}"
    try:
        ready = poll_ready(url, lambda: proc.poll() is None, 300)
        assert ready, f"not ready (mpirun exit {proc.poll()}):\n{log.read_text()[-4000:]}"
        assert httpx.get(f"{url}/health/live", timeout=5).status_code == 200

        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/completions", timeout=120,
                       json={"model": model, "prompt": "hello world", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion"
        assert isinstance(body["choices"][0]["text"], str)
        assert body["usage"]["completion_tokens"] >= 1

        # Kubernetes deleting the launcher pod: SIGTERM to the container's process, the rendered
        # wrapper, which sends SIGUSR1 to mpirun; mpirun forwards it to every rank at once (a
        # SIGTERM it would follow with SIGKILL a second later). Rank 0 takes it as SIGTERM: not
        # ready, still answering for the drain delay, then drains and sends the stop command; the
        # other ranks leave on it, and mpirun and the wrapper exit 0.
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
        text = log.read_text()
        assert rc == 0, f"launcher exit {rc}:\n{text[-4000:]}"
        assert "Forwarding signal 10 to job" in text, text[-4000:]  # mpirun's own line for SIGUSR1
        assert "signal 15: not ready; still answering for 2 s (--drain-delay)" in text, text[-4000:]
        assert "rank 1: stop received" in text, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

"""`dscluster k8s render`: every kind over a grid of shapes is valid (strictly, against the upstream
CRDs and Kubernetes' built-in schemas) and wires rank 0, the Services, GPUs and NCCL as intended."""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dscluster.errors import UsageError
from dscluster.k8s import options
from dscluster.k8s.render import render
from dscluster.k8s.validate import run_validate

from cli_in_process import run_dscluster  # tests/cli_in_process.py

SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"CRD schemas not found at {SCHEMAS}")


def make_opts(kind: str, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    options.add_render_options(p)
    return p.parse_args([kind, *extra])


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def services(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def check_rank_container(c: dict, gpus: int, *, master: bool = True) -> None:
    env = env_of(c)
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_DEBUG"] == "WARN"
    assert env["NCCL_IB_DISABLE"] in ("0", "1")
    assert env["MASTER_PORT"] == "29500"
    if master:
        assert env["MASTER_ADDR"] == "dscluster-master"
    else:
        assert "MASTER_ADDR" not in env
    limits = c.get("resources", {}).get("limits", {})
    if gpus:
        assert limits["nvidia.com/gpu"] == str(gpus)
    else:
        assert "nvidia.com/gpu" not in limits
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/dev/shm"]["name"] == "dshm"
    assert mounts["/mnt/checkpoints"]["readOnly"] is True


def check_pod_volumes(spec: dict, pvc: str) -> None:
    vols = {v["name"]: v for v in spec["volumes"]}
    shm = vols["dshm"]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"].endswith("Gi") and int(shm["sizeLimit"][:-2]) >= 1
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == pvc


def check_common(docs: list[dict], existing_pvc: str | None, *, master_selector: dict | None,
                 http_selector: dict) -> None:
    svcs = services(docs)
    if master_selector is None:
        assert "dscluster-master" not in svcs
    else:
        m = svcs["dscluster-master"]["spec"]
        assert m["clusterIP"] == "None" and m["publishNotReadyAddresses"] is True
        assert m["ports"][0]["port"] == 29500
        assert m["selector"] == master_selector
    h = svcs["dscluster-http"]["spec"]
    assert h["selector"] == http_selector and h["ports"][0]["port"] == 8000
    assert h.get("type", "ClusterIP") == "ClusterIP"
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    if existing_pvc:
        assert pvcs == []
    else:
        assert [p["metadata"]["name"] for p in pvcs] == ["dscluster-checkpoints"]
        assert pvcs[0]["spec"]["accessModes"][0] in ("ReadWriteMany", "ReadOnlyMany")


def serve_tail(cmd: list[str]) -> list[str]:
    i = cmd.index("dscluster")
    assert cmd[i + 1] == "serve"
    tail = cmd[i:]
    # every kind drains the same way: the delay and the timeout the grace period is computed from
    assert tail[tail.index("--drain-delay") + 1] == "10" and tail[tail.index("--request-timeout") + 1] == "600"
    return tail


def mpirun_argv(cmd: list[str]) -> list[str]:
    """The mpirun command line inside the launcher's wrapper (SIGTERM -> SIGUSR1 to mpirun)."""
    assert cmd[:2] == ["bash", "-c"] and "kill -USR1" in cmd[2]
    return cmd[cmd.index("mpirun"):]


GRACE = 10 + 600 + 20  # --drain-delay, --request-timeout (600 s: a long non-streamed generation), margin


def check_loading_budget(container: dict) -> None:
    """The placeholder answers /health/live 200 while the model loads: only /health/ready ends the
    startup probe, which allows --load-timeout (30 minutes by default) for loading."""
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health/ready"
    assert startup["failureThreshold"] * startup["periodSeconds"] == 1800


def check_grace(pod_spec: dict) -> None:
    assert pod_spec["terminationGracePeriodSeconds"] == GRACE


def check_sshd_wrapper(container: dict) -> None:
    """sshd in the background; the pod's SIGTERM reaches the ranks, and PID 1 waits for them."""
    cmd = container["command"]
    assert cmd[:2] == ["bash", "-c"] and "/usr/sbin/sshd -De &" in cmd[2]
    assert 'pkill -TERM -f "dscluster[ ]serve"' in cmd[2]


def check_mpijob(docs, nodes, gpus, existing_pvc, secret) -> None:
    kinds = by_kind(docs)
    job = kinds["MPIJob"][0]
    spec = job["spec"]
    slots = gpus or 1
    assert spec["slotsPerWorker"] == slots and spec["mpiImplementation"] == "OpenMPI"
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    assert "schedulingPolicy" not in spec["runPolicy"]  # gang scheduling is off unless --gang
    assert spec["runPolicy"]["backoffLimit"] == 6
    rs = spec["mpiReplicaSpecs"]
    assert set(rs) == {"Launcher", "Worker"}
    assert rs["Launcher"]["replicas"] == 1 and rs["Launcher"]["restartPolicy"] == "OnFailure"
    assert rs["Worker"]["replicas"] == nodes
    check_grace(rs["Launcher"]["template"]["spec"])
    check_grace(rs["Worker"]["template"]["spec"])
    launcher = rs["Launcher"]["template"]["spec"]["containers"][0]
    cmd = mpirun_argv(launcher["command"])
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"]
    assert cmd[cmd.index("-np") + 1] == str(nodes * slots)
    forwarded = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"]
    want = ["MASTER_ADDR", "MASTER_PORT", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
            "NCCL_IB_DISABLE"] + (["DSCLUSTER_API_KEY"] if secret else [])
    assert forwarded == want + ["PATH", "LD_LIBRARY_PATH"]  # the last two come from the image
    env = env_of(launcher)
    assert all(v in env for v in want)  # mpirun -x forwards values it has
    if secret:
        assert env["DSCLUSTER_API_KEY"] == {"secretKeyRef": {"name": secret, "key": "api-key"}}
    tail = serve_tail(cmd)
    assert "--nproc" not in tail
    assert tail[2] == "/mnt/checkpoints/model"
    assert tail[tail.index("--host") + 1] == "0.0.0.0" and tail[tail.index("--port") + 1] == "8000"
    assert tail[tail.index("--engine") + 1] == ("tp" if nodes * slots > 1 else "replicated")
    wspec = rs["Worker"]["template"]["spec"]
    worker = wspec["containers"][0]
    check_rank_container(worker, gpus)
    check_sshd_wrapper(worker)
    check_pod_volumes(wspec, existing_pvc or "dscluster-checkpoints")
    assert "launcher" not in str(launcher.get("resources", {}).get("limits", {}))
    assert "nvidia.com/gpu" not in str(launcher.get("resources", {}))
    # worker 0 is the rank-0 pod: its liveness check is tied to its pod name
    assert "dscluster-worker-0" in " ".join(worker["livenessProbe"]["exec"]["command"])
    assert "/health/ready" in " ".join(worker["readinessProbe"]["exec"]["command"])
    rank0 = {"training.kubeflow.org/job-name": "dscluster", "training.kubeflow.org/replica-type": "worker",
             "training.kubeflow.org/replica-index": "0"}
    check_common(docs, existing_pvc, master_selector=rank0, http_selector=rank0)
    # the operator creates <name>-worker and <name>-launcher: ours never collide
    assert not set(services(docs)) & {"dscluster-worker", "dscluster-launcher", "dscluster"}


def check_trainjob(docs, nodes, gpus, existing_pvc, secret) -> None:
    kinds = by_kind(docs)
    rt, tj = kinds["TrainingRuntime"][0], kinds["TrainJob"][0]
    slots = gpus or 1
    mpi = rt["spec"]["mlPolicy"]["mpi"]
    assert rt["metadata"]["name"] == "dscluster-runtime"
    assert rt["spec"]["mlPolicy"]["numNodes"] == nodes
    assert mpi["numProcPerNode"] == slots and mpi["mpiImplementation"] == "OpenMPI"
    assert mpi["runLauncherAsNode"] is False
    jobset = rt["spec"]["template"]["spec"]
    assert jobset["failurePolicy"] == {"maxRestarts": 6, "restartStrategy": "Recreate"}
    rjobs = {r["name"]: r for r in jobset["replicatedJobs"]}
    assert set(rjobs) == {"launcher", "node"}
    assert rjobs["launcher"]["template"]["spec"]["backoffLimit"] == 0  # a failed mpirun restarts the group
    check_grace(rjobs["launcher"]["template"]["spec"]["template"]["spec"])
    node_spec = rjobs["node"]["template"]["spec"]["template"]["spec"]
    check_grace(node_spec)
    node = node_spec["containers"][0]
    assert node["name"] == "node"
    check_rank_container(node, gpus)
    check_sshd_wrapper(node)
    check_pod_volumes(node_spec, existing_pvc or "dscluster-checkpoints")
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                        "name": "dscluster-runtime"}
    tr = tj["spec"]["trainer"]
    assert tr["numNodes"] == nodes
    cmd = mpirun_argv(tr["command"] + tr["args"])
    assert cmd[cmd.index("-np") + 1] == str(nodes * slots)
    env = env_of(tr)
    assert not [k for k in env if k.startswith("PET_") or k.startswith("OMPI_MCA_")]
    assert env["MASTER_ADDR"] == "dscluster-master"
    assert ("DSCLUSTER_API_KEY" in env) == bool(secret)
    rank0 = {"jobset.sigs.k8s.io/jobset-name": "dscluster", "jobset.sigs.k8s.io/replicatedjob-name": "node",
             "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index": "0"}
    check_common(docs, existing_pvc, master_selector=rank0, http_selector=rank0)
    assert "dscluster" not in services(docs)  # JobSet's own headless Service


def check_lws(docs, nodes, gpus, existing_pvc, secret) -> None:
    lws = by_kind(docs)["LeaderWorkerSet"][0]
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lws["spec"]["replicas"] == 1
    assert lwt["size"] == nodes and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    for key in ("leaderTemplate", "workerTemplate"):
        spec = lwt[key]["spec"]
        check_grace(spec)
        c = spec["containers"][0]
        check_rank_container(c, gpus, master=False)
        check_pod_volumes(spec, existing_pvc or "dscluster-checkpoints")
        tail = serve_tail(c["command"])
        assert tail[tail.index("--nproc") + 1] == str(gpus or 1)
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert leader["livenessProbe"]["httpGet"]["path"] == "/health/live"
    check_loading_budget(leader)
    assert ("DSCLUSTER_API_KEY" in env_of(leader)) == bool(secret)
    leaders = {"leaderworkerset.sigs.k8s.io/name": "dscluster", "leaderworkerset.sigs.k8s.io/worker-index": "0"}
    check_common(docs, existing_pvc, master_selector=leaders, http_selector=leaders)


def check_deployment(docs, nodes, gpus, existing_pvc, secret) -> None:
    dep = by_kind(docs)["Deployment"][0]
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    check_grace(pod)
    check_pod_volumes(pod, existing_pvc or "dscluster-checkpoints")
    (c,) = pod["containers"]
    env = env_of(c)
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env  # the local launcher's own rendezvous
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
    limits = c.get("resources", {}).get("limits", {})
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/dev/shm"]["name"] == "dshm" and mounts["/mnt/checkpoints"]["readOnly"] is True
    tail = serve_tail(c["command"])
    assert tail[tail.index("--nproc") + 1] == str(gpus or 1)
    assert tail[tail.index("--engine") + 1] == ("tp" if gpus > 1 else "replicated")
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    check_loading_budget(c)
    assert [p["containerPort"] for p in c["ports"]] == [8000]
    assert ("DSCLUSTER_API_KEY" in env) == bool(secret)
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    check_common(docs, existing_pvc, master_selector=None, http_selector=selector)


CHECKS = {"mpijob": check_mpijob, "trainjob": check_trainjob, "lws": check_lws, "deployment": check_deployment}


@needs_schemas
@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_grid_renders_valid_manifests(kind, tmp_path, capsys):
    nodes = [1] if kind == "deployment" else [1, 2, 3, 4]
    grid = itertools.product(nodes, [0, 1, 8], [None, "models"], [None, "dscluster-key"])
    for i, (nodes, gpus, pvc, secret) in enumerate(grid):
        extra = ["--nodes", str(nodes), "--gpus-per-node", str(gpus)]
        extra += ["--existing-pvc", pvc] if pvc else []
        extra += ["--api-key-secret", secret] if secret else []
        text = render(kind, make_opts(kind, *extra))
        path = tmp_path / f"{kind}-{i}.yaml"
        path.write_text(text)
        rc = run_validate([str(path)], crds_dir=str(SCHEMAS))
        out = capsys.readouterr().out
        assert rc == 0, f"{extra}: {out}"
        CHECKS[kind](docs_of(text), nodes, gpus, pvc, secret)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Through `python -m dscluster`, the entry point itself."""
    return subprocess.run([sys.executable, "-m", "dscluster", *args], capture_output=True, text=True, timeout=60)


@needs_schemas
@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_cli_render_then_validate(kind, tmp_path):
    nodes = "1" if kind == "deployment" else "2"
    r = run_dscluster("k8s", "render", kind, "--nodes", nodes, "--gpus-per-node", "8", "--nccl-ib-disable",
                "--nccl-debug", "INFO", "--image", "registry.example/dscluster:0.1", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    docs = docs_of(r.stdout)
    text = r.stdout
    assert "NCCL_IB_DISABLE" in text and "registry.example/dscluster:0.1" in text
    for d in docs:
        for path, node in _walk(d):
            if isinstance(node, dict) and node.get("name") == "NCCL_IB_DISABLE":
                assert node["value"] == "1"
            if isinstance(node, dict) and node.get("name") == "NCCL_DEBUG":
                assert node["value"] == "INFO"
    assert "--dtype" in text and "bfloat16" in text
    f = tmp_path / "m.yaml"
    f.write_text(text)
    v = run_dscluster("k8s", "validate", str(f), "--crds", str(SCHEMAS))
    assert v.returncode == 0, v.stdout + v.stderr
    assert "valid" in v.stdout


def test_lws_replicas_and_name_namespace():
    text = render("lws", make_opts("lws", "--replicas", "3", "--name", "llama", "--namespace", "serving",
                                   "--nodes", "2", "--port", "8080"))
    docs = docs_of(text)
    assert {d["metadata"]["namespace"] for d in docs} == {"serving"}
    lws = by_kind(docs)["LeaderWorkerSet"][0]
    assert lws["spec"]["replicas"] == 3
    http = services(docs)["llama-http"]["spec"]
    assert http["selector"] == {"leaderworkerset.sigs.k8s.io/name": "llama",
                                "leaderworkerset.sigs.k8s.io/worker-index": "0"}
    assert http["ports"][0]["port"] == 8080


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "17"], "--gpus-per-node"),
    (["--gpus-per-node", "-1"], "--gpus-per-node"),
    (["--name", "Bad_Name"], "--name"),
    (["--name", "a" * 41], "--name"),
    (["--name", "9lives"], "--name"),
    (["--pvc-size", "lots"], "--pvc-size"),
    (["--existing-pvc", "Bad PVC"], "--existing-pvc"),
    (["--port", "0"], "--port"),
    (["--replicas", "2"], "--replicas"),
    (["--model", "relative/path"], "--model"),
    (["--nccl-socket-ifname", "eth0 eth1"], "--nccl-socket-ifname"),
    (["--drain-delay", "-1"], "--drain-delay"),
    (["--request-timeout", "-5"], "--request-timeout"),
    (["--restart-policy", "Always"], "--restart-policy 'Always' is not one of mpijob's: OnFailure, Never"),
    (["--restart-policy", "RecreateGroupOnPodRestart"], "--restart-policy"),
    (["--max-restarts", "-1"], "--max-restarts"),
])
def test_bad_flags_are_usage_errors(args, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        render("mpijob", make_opts("mpijob", *args))


@pytest.mark.parametrize("kind, args, needle", [
    ("deployment", ["--nodes", "2"], "--nodes 2: a deployment runs the whole model in one pod"),
    ("deployment", ["--restart-policy", "Never"], "--restart-policy does not apply to deployment"),
    ("deployment", ["--max-restarts", "3"], "--max-restarts does not apply to deployment"),
    ("lws", ["--max-restarts", "3"], "--max-restarts does not apply to lws"),
    ("lws", ["--restart-policy", "OnFailure"], "not one of lws's: RecreateGroupOnPodRestart, RecreateGroupAfterStart, None"),
    ("trainjob", ["--restart-policy", "InPlaceRestart"], "not one of trainjob's: Recreate, BlockingRecreate"),
    ("trainjob", ["--replicas", "2"], "--replicas applies to lws and deployment only"),
])
def test_kind_specific_flags(kind, args, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        render(kind, make_opts(kind, *args))


@needs_schemas
@pytest.mark.parametrize("kind, args, where, expected", [
    ("mpijob", ["--restart-policy", "Never", "--max-restarts", "2"],
     lambda d: (d["spec"]["mpiReplicaSpecs"]["Launcher"]["restartPolicy"], d["spec"]["runPolicy"]["backoffLimit"]),
     ("Never", 2)),
    ("trainjob", ["--restart-policy", "BlockingRecreate", "--max-restarts", "0"],
     lambda d: d["spec"]["template"]["spec"]["failurePolicy"], {"maxRestarts": 0, "restartStrategy": "BlockingRecreate"}),
    ("lws", ["--restart-policy", "None"], lambda d: d["spec"]["leaderWorkerTemplate"]["restartPolicy"], "None"),
    ("deployment", ["--replicas", "3"], lambda d: d["spec"]["replicas"], 3),
])
def test_restart_flags_render_and_validate(kind, args, where, expected, tmp_path):
    text = render(kind, make_opts(kind, *args))
    workload = docs_of(text)[0]
    assert where(workload) == expected
    f = tmp_path / "m.yaml"
    f.write_text(text)
    assert run_validate([str(f)], crds_dir=str(SCHEMAS)) == 0


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_grace_period_covers_the_drain_delay_and_the_request_timeout(kind):
    docs = docs_of(render(kind, make_opts(kind, "--drain-delay", "30", "--request-timeout", "0", "--nodes", "1")))
    graces = [node["terminationGracePeriodSeconds"] for d in docs for _, node in _walk(d)
              if isinstance(node, dict) and "terminationGracePeriodSeconds" in node]
    assert graces and set(graces) == {30 + 60 + 20}  # no deadline: the server drains for up to 60 s
    commands = [node for d in docs for _, node in _walk(d) if isinstance(node, list) and "serve" in node]
    assert commands
    for cmd in commands:
        assert cmd[cmd.index("--drain-delay") + 1] == "30" and cmd[cmd.index("--request-timeout") + 1] == "0"


def test_cli_bad_flag_exit_2_one_line():
    r = run_cli("k8s", "render", "mpijob", "--nodes", "0")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "--nodes" in r.stderr


def _pod_templates(doc: dict):
    """(path, pod template) for every pod template in a manifest."""
    for path, node in _walk(doc):
        if isinstance(node, dict) and "spec" in node and "containers" in node.get("spec", {}):
            yield path, node


@pytest.mark.parametrize("kind", ["mpijob", "trainjob", "lws", "deployment"])
def test_scrape_annotations_only_where_rank_0_serves_http(kind):
    """Prometheus finds /metrics through the HTTP Service (it selects rank 0's pod only) and, where
    every pod of a template serves HTTP, the pod; never on other ranks' pods (targets that are down).
    With an API key, the server lets /metrics through without it, so a scrape needs no secret."""
    extra = ("--nodes", "2") if kind != "deployment" else ()
    docs = docs_of(render(kind, make_opts(kind, "--api-key-secret", "key", *extra)))
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}
    http = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-http")]
    assert len(http) == 1 and http[0]["metadata"]["annotations"] == want
    annotated = []
    for doc in docs:
        for path, template in _pod_templates(doc):
            notes = template.get("metadata", {}).get("annotations", {})
            if notes:
                assert notes == want
                annotated.append(path)
                assert any("--port" in c.get("command", []) or "--port" in " ".join(c.get("args", []))
                           for c in template["spec"]["containers"]), path
    assert bool(annotated) == (kind in ("lws", "deployment")), annotated
    commands = [node for d in docs for _, node in _walk(d) if isinstance(node, list) and "serve" in node]
    assert commands and all("--metrics-without-api-key" in cmd for cmd in commands)


@pytest.mark.parametrize("kind", ["mpijob", "trainjob", "lws"])
def test_pipeline_stages_across_nodes_render_and_validate(kind, tmp_path):
    """--pp 2 over 2 nodes of 4 GPUs: every rank's serve command says --pp 2 (tp=4 inside a node);
    the manifests stay valid."""
    text = render(kind, make_opts(kind, "--nodes", "2", "--gpus-per-node", "4", "--pp", "2"))
    def commands(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("command", "args") and isinstance(value, list):
                    yield " ".join(str(v) for v in value)
                else:
                    yield from commands(value)
        elif isinstance(node, list):
            for value in node:
                yield from commands(value)

    serves = [c for c in commands(docs_of(text)) if "dscluster serve" in c]
    assert serves and all(" --pp 2 " in f"{c} " for c in serves), serves
    if SCHEMAS.is_dir():
        f = tmp_path / "m.yaml"
        f.write_text(text)
        v = run_cli("k8s", "validate", str(f), "--crds", str(SCHEMAS))
        assert v.returncode == 0, v.stdout + v.stderr


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "3", "--gpus-per-node", "1", "--pp", "2"], "--pp 2 must divide the group's 3 ranks"),
    (["--nodes", "2", "--pp", "2", "--engine", "zero3"], "--pp runs tensor parallelism inside each stage"),
])
def test_pipeline_flags_that_cannot_work(args, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        render("mpijob", make_opts("mpijob", *args))

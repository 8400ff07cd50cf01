"""Operating on a cluster: gang scheduling for every kind, the PodMonitor, the InferencePool, pod
resources (QoS), placement and interconnect, the download Job, the LWS release rendered for, and the
monitoring kinds (dashboard, scrape-config, alert-rules), each checked by the strict validator
against the upstream CRDs (and the CEL rules they carry) or by Prometheus' own promtool."""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dscluster.errors import UsageError
from dscluster.k8s import common, monitor, options
from dscluster.k8s.render import render, render_objects
from dscluster.k8s.validate import run_validate

from cli_in_process import run_dscluster  # tests/cli_in_process.py

SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"CRD schemas not found at {SCHEMAS}")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")


def make_opts(kind: str, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    options.add_render_options(p)
    return p.parse_args([kind, *extra])


def objects(kind: str, *extra: str) -> list[dict]:
    nodes = ["--nodes", "1"] if kind == "deployment" else ["--nodes", "2"]
    return render_objects(kind, make_opts(kind, *nodes, "--gpus-per-node", "8", *extra))


def validate(tmp_path: Path, docs: list[dict]) -> tuple[int, str]:
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = io.StringIO()
    return run_validate([str(f)], crds_dir=str(SCHEMAS), out=out), out.getvalue()


def walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def pod_specs(doc: dict) -> list[dict]:
    return [node for _, node in walk(doc) if isinstance(node, dict) and "containers" in node]


def the(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def rank_pod_specs(docs: list[dict]) -> list[dict]:
    return [s for d in docs for s in pod_specs(d) if any(v["name"] == "dshm" for v in s.get("volumes", []))]


# ------------------------------------------------------------------------------------------
# Gang scheduling

GANGS = [
    ("mpijob", ["--gang", "volcano", "--queue", "research", "--priority-class", "serving-high"]),
    ("mpijob", ["--gang", "scheduler-plugins", "--gang-timeout", "300"]),
    ("mpijob", ["--gang", "kueue", "--queue", "team-a"]),
    ("trainjob", ["--gang", "volcano", "--queue", "research", "--priority-class", "serving-high"]),
    ("trainjob", ["--gang", "scheduler-plugins", "--gang-timeout", "300"]),
    ("trainjob", ["--gang", "kueue", "--queue", "team-a"]),
    ("lws", ["--gang", "volcano", "--queue", "research", "--priority-class", "serving-high"]),
    ("lws", ["--gang", "kueue", "--queue", "team-a", "--replicas", "2"]),
    ("deployment", ["--gang", "kueue", "--queue", "team-a", "--replicas", "2"]),
]


@needs_schemas
@pytest.mark.parametrize("kind, args", GANGS, ids=[f"{k}-{a[1]}" for k, a in GANGS])
def test_each_kind_with_each_gang_option_validates(kind, args, tmp_path):
    docs = objects(kind, *args)
    rc, out = validate(tmp_path, docs)
    assert rc == 0, out
    gang = args[1]
    workload = the(docs, "TrainJob") if kind == "trainjob" else docs[0]  # what Kueue admits
    pods = [s for d in docs if d["kind"] != "Job" for s in pod_specs(d)]
    schedulers = {s.get("schedulerName") for s in pods}
    if gang == "kueue":
        # Kueue admits the whole group, the default scheduler places it
        assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert schedulers == {None}
    else:
        assert "kueue.x-k8s.io/queue-name" not in workload["metadata"]["labels"]
        assert schedulers == {"volcano" if gang == "volcano" else "scheduler-plugins-scheduler"}
    if "--priority-class" in args:
        assert {s.get("priorityClassName") for s in pods} == {"serving-high"}
    if kind == "mpijob":
        policy = workload["spec"]["runPolicy"].get("schedulingPolicy")
        want = {"volcano": {"minAvailable": 3, "queue": "research", "priorityClass": "serving-high"},
                "scheduler-plugins": {"minAvailable": 3, "scheduleTimeoutSeconds": 300},
                "kueue": None}[gang]
        assert policy == want  # launcher + 2 workers placed together
    if kind == "trainjob":
        runtime, job = the(docs, "TrainingRuntime"), the(docs, "TrainJob")
        want = {"volcano": {"volcano": {}}, "scheduler-plugins": {"coscheduling": {"scheduleTimeoutSeconds": 300}},
                "kueue": None}[gang]
        assert runtime["spec"].get("podGroupPolicy") == want
        if gang == "volcano":
            assert job["metadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "research"}
    if kind == "lws" and gang == "volcano":
        assert workload["metadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "research"}
    if kind == "deployment":
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@needs_schemas
def test_gang_is_off_by_default(tmp_path):
    for kind in options.KINDS:
        docs = objects(kind)
        text = json.dumps(docs)
        assert "schedulerName" not in text and "podGroupPolicy" not in text and "schedulingPolicy" not in text
        assert "kueue.x-k8s.io" not in text and "volcano" not in text


@needs_schemas
def test_lws_exclusive_topology(tmp_path):
    docs = objects("lws", "--exclusive-topology", "topology.kubernetes.io/zone", "--gang", "volcano")
    notes = docs[0]["metadata"]["annotations"]
    assert notes["leaderworkerset.sigs.k8s.io/exclusive-topology"] == "topology.kubernetes.io/zone"
    assert validate(tmp_path, docs)[0] == 0


@pytest.mark.parametrize("kind, args, needle", [
    ("lws", ["--gang", "scheduler-plugins"], "creates PodGroups for volcano only"),
    ("deployment", ["--gang", "volcano"], "its one pod is the whole group"),
    ("mpijob", ["--gang", "kueue"], "--gang kueue needs --queue"),
    ("mpijob", ["--gang", "scheduler-plugins", "--queue", "q"], "coscheduling has no queues"),
    ("mpijob", ["--queue", "q"], "need --gang"),
    ("mpijob", ["--exclusive-topology", "zone"], "applies to lws only"),
    ("mpijob", ["--gang", "volcano", "--priority-class", "Bad Name"], "--priority-class"),
    ("mpijob", ["--inference-pool"], "--inference-pool applies to"),
    ("lws", ["--lws-version", "0.8", "--restart-policy", "RecreateGroupAfterStart"], "needs LeaderWorkerSet 0.10"),
    ("mpijob", ["--toleration", "gpu:Sometimes"], "--toleration"),
    ("mpijob", ["--rdma-resource", "rdma"], "--rdma-resource"),
    ("mpijob", ["--memory", "lots"], "--memory"),
    ("mpijob", ["--pvc-access-mode", "ReadWriteOnce"], "mounts the volume on one node"),
    ("deployment", ["--download", "meta-llama/Llama", "--model", "/models/x"], "must be a directory there"),
    ("deployment", ["--hf-token-secret", "hf"], "apply to --download only"),
    ("deployment", ["--scrape-interval", "often"], "--scrape-interval"),
    ("scrape-config", [], "scrape-config needs --target"),
    ("scrape-config", ["--target", "no-port"], "is not HOST:PORT"),
    ("dashboard", ["--target", "h:1"], "apply to `render scrape-config` only"),
])
def test_bad_operation_flags_are_one_line_usage_errors(kind, args, needle):
    extra = ["--nodes", "1"] if kind == "deployment" else []
    with pytest.raises(UsageError, match=re.escape(needle)):
        render(kind, make_opts(kind, *extra, *args))


@needs_schemas
def test_lws_version_0_8_renders_what_it_accepts_and_0_10_fields_are_refused_by_its_crd(tmp_path):
    """RecreateGroupAfterStart exists since LWS 0.10: rendered for 0.10 it validates against that CRD
    and is rejected by the 0.8 CRD (the one Kubeflow Trainer v2.3 installs), naming it."""
    docs = objects("lws", "--restart-policy", "RecreateGroupAfterStart")
    rc, out = validate(tmp_path, docs)
    assert rc == 2 and "RecreateGroupAfterStart" in out and "v0.8.0" in out and out.count("\n") == 2, out
    assert validate(tmp_path, objects("lws", "--lws-version", "0.8"))[0] == 0


# ------------------------------------------------------------------------------------------
# Pods: resources, placement, interconnect, loading


def qos_class(spec: dict) -> str:
    """Kubernetes' pod QoS class (pkg/apis/core/helper/qos): BestEffort without any CPU or memory
    request or limit; Guaranteed when every container limits both and requests equal limits."""
    containers = spec["containers"] + spec.get("initContainers", [])
    any_set, guaranteed = False, True
    for cont in containers:
        res = cont.get("resources", {})
        req, lim = res.get("requests", {}), res.get("limits", {})
        for r in ("cpu", "memory"):
            any_set |= r in req or r in lim
            if r not in lim or req.get(r, lim[r]) != lim[r]:
                guaranteed = False
    return "BestEffort" if not any_set else "Guaranteed" if guaranteed else "Burstable"


def gib(q: str) -> float:
    return common._gib(q)


@pytest.mark.parametrize("kind", options.KINDS)
@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_every_pod_requests_cpu_and_memory(kind, gpus):
    nodes = "1" if kind == "deployment" else "2"
    docs = render_objects(kind, make_opts(kind, "--nodes", nodes, "--gpus-per-node", str(gpus),
                                          "--download", "org/model"))
    specs = [s for d in docs for s in pod_specs(d)]
    assert len(specs) >= 2
    for spec in specs:
        assert qos_class(spec) in ("Burstable", "Guaranteed")
        for cont in spec["containers"] + spec.get("initContainers", []):
            req = cont["resources"]["requests"]
            assert {"cpu", "memory"} <= set(req), cont["name"]
    for spec in rank_pod_specs(docs):
        (cont,) = spec["containers"]
        res = cont["resources"]
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
        ranks = max(gpus, 1)
        assert gib(shm) == ranks  # 1 GiB per rank
        # plan's host memory per rank (2 GiB) for each rank, plus /dev/shm, whose pages the pod is charged
        assert gib(res["requests"]["memory"]) == 2 * ranks + ranks
        assert gib(res["limits"]["memory"]) == 2 * gib(res["requests"]["memory"])
        assert res["requests"]["cpu"] == str(2 * ranks) and "cpu" not in res["limits"]


def test_host_memory_per_rank_is_plans():
    from dscluster import plan

    assert common.HOST_GIB_PER_RANK == plan.HOST_OVERHEAD_GIB


@needs_schemas
@pytest.mark.parametrize("kind", options.KINDS)
def test_resources_placement_and_interconnect_flags(kind, tmp_path):
    docs = objects(kind, "--cpu", "48", "--memory", "200Gi", "--memory-limit", "400Gi", "--shm-size", "16Gi",
                   "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
                   "--toleration", "nvidia.com/gpu=present:NoSchedule", "--toleration", "dedicated",
                   "--rdma-resource", "rdma/rdma_shared_device_a", "--rdma-resource", "nvidia.com/hostdev=8",
                   "--network", "ib-net", "--nccl-socket-ifname", "net1", "--pvc-access-mode", "ReadOnlyMany")
    rc, out = validate(tmp_path, docs)
    assert rc == 0, out
    ranks = rank_pod_specs(docs)
    assert ranks
    for spec in ranks:
        (cont,) = spec["containers"]
        assert cont["resources"]["requests"] == {"cpu": "48", "memory": "200Gi"}
        assert cont["resources"]["limits"] == {"memory": "400Gi", "nvidia.com/gpu": "8",
                                               "rdma/rdma_shared_device_a": "1", "nvidia.com/hostdev": "8"}
        assert cont["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
            {"key": "dedicated", "operator": "Exists"}]
        assert next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "16Gi"
    templates = [node for d in docs for _, node in walk(d)
                 if isinstance(node, dict) and "spec" in node and "containers" in node.get("spec", {})]
    rank_templates = [t for t in templates if t["spec"] in ranks]
    assert all(t["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "ib-net" for t in rank_templates)
    # launchers run no ranks: no GPUs, RDMA devices, node selector or secondary network
    for t in templates:
        if t["spec"] not in ranks:
            assert "nodeSelector" not in t["spec"] and "k8s.v1.cni.cncf.io/networks" not in json.dumps(t)
    assert the(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_ssh_pods_give_loading_its_own_budget(tmp_path):
    """The MPI pods' liveness script on the rank-0 pod: while the group has never been ready, the
    oldest rank may run for --load-timeout; once ready (a marker per group), /health/live decides.
    Run here against a fake rank-0 HTTP server and a fake `dscluster serve` process."""
    import http.server
    import os
    import threading

    from dscluster.cluster.launch import free_port

    port = free_port()
    docs = render_objects("mpijob", make_opts("mpijob", "--port", str(port), "--load-timeout", "60"))
    worker = docs[0]["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    script = worker["livenessProbe"]["exec"]["command"][2]
    status = {"/health/ready": 503, "/health/live": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status.get(self.path, 404))
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # a process whose command line is `dscluster serve ...`, as a rank's is; in a pod the script
    # sees the pod's processes only, here it would see every server on this host: the pattern gets
    # a word of this test's own
    tag = f"t{os.getpid()}"
    assert script.count("dscluster[ ]serve") == 1
    script = script.replace("dscluster[ ]serve", f"dscluster[ ]serve {tag}")
    fake = subprocess.Popen(["bash", "-c", f"exec -a 'dscluster serve {tag} /m' sleep 120"])
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    script = script.replace('"dscluster-worker-0"', f'"{hostname}"')
    env = {**os.environ}

    def live(age_shift: str = "") -> int:
        s = script.replace("-lt 60", f"-lt {age_shift}") if age_shift else script
        return subprocess.run(["bash", "-c", s], env=env, timeout=20).returncode

    try:
        import time

        time.sleep(1.2)
        assert live() == 0                 # loading, within the budget (placeholder: live 200, ready 503)
        assert live("1") != 0              # loading past the budget: restart the group
        status["/health/ready"] = 200
        assert live("1") == 0              # ready: the marker is written, the budget no longer applies
        status["/health/ready"], status["/health/live"] = 503, 500
        assert live() != 0                 # once ready, a failing /health/live fails liveness
        status["/health/live"] = 200
        assert live("1") == 0
    finally:
        fake.kill()
        server.shutdown()
        for marker in Path("/tmp").glob(f"dscluster-ready.{fake.pid}"):
            marker.unlink()


@needs_schemas
@pytest.mark.parametrize("kind", options.KINDS)
def test_download_job_and_the_wait_for_it(kind, tmp_path):
    docs = objects(kind, "--download", "meta-llama/Meta-Llama-3-70B-Instruct", "--revision", "main",
                   "--hf-token-secret", "hf-token", "--model", "/mnt/checkpoints/llama-3-70b")
    rc, out = validate(tmp_path, docs)
    assert rc == 0, out
    job = the(docs, "Job")
    (cont,) = job["spec"]["template"]["spec"]["containers"]
    script = cont["command"][2]
    assert ("hf download meta-llama/Meta-Llama-3-70B-Instruct --revision main --include '*.safetensors' "
            "--include '*.json' --include tokenizer.model --local-dir /mnt/checkpoints/llama-3-70b") in script
    assert script.endswith("touch /mnt/checkpoints/llama-3-70b/.dscluster-complete")
    env = {e["name"]: e.get("valueFrom") for e in cont["env"]}
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    mount = cont["volumeMounts"][0]
    assert mount["mountPath"] == "/mnt/checkpoints" and not mount.get("readOnly")
    for spec in rank_pod_specs(docs):
        (wait,) = spec["initContainers"]
        assert "/mnt/checkpoints/llama-3-70b/.dscluster-complete" in wait["command"][2]
        assert wait["volumeMounts"][0]["readOnly"] is True


def test_download_script_skips_a_filled_volume(tmp_path):
    """The Job's script, run with the volume already complete, exits 0 without downloading."""
    docs = render_objects("deployment", make_opts("deployment", "--download", "org/model"))
    script = the(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["command"][2]
    model = tmp_path / "model"
    model.mkdir()
    (model / ".dscluster-complete").touch()
    script = script.replace("/mnt/checkpoints/model", str(model))
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=20,
                       env={"PATH": "/usr/bin:/bin"})  # no `hf` here: it must not be run
    assert r.returncode == 0 and "is complete" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------------
# Monitoring and routing


@needs_schemas
@pytest.mark.parametrize("kind", options.KINDS)
def test_pod_monitor_scrapes_rank_0_with_the_api_key(kind, tmp_path):
    docs = objects(kind, "--monitor", "--monitor-label", "release=prometheus", "--api-key-secret", "llm-key",
                   "--scrape-interval", "30s")
    rc, out = validate(tmp_path, docs)
    assert rc == 0, out
    pm = the(docs, "PodMonitor")
    http = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "dscluster-http")
    assert pm["spec"]["selector"]["matchLabels"] == http["spec"]["selector"]  # rank 0's pod(s) only
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics" and ep["interval"] == "30s"
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": "llm-key", "key": "api-key"}}
    # the named port exists on the selected pods' container
    ports = [p["name"] for s in pod_specs(docs[0]) for c in s["containers"] for p in c.get("ports", [])]
    assert "http" in ports
    assert "authorization" not in json.dumps(the(objects(kind, "--monitor"), "PodMonitor"))


@needs_schemas
@pytest.mark.parametrize("kind, selector", [
    ("lws", {"leaderworkerset.sigs.k8s.io/name": "dscluster", "leaderworkerset.sigs.k8s.io/worker-index": "0"}),
    ("deployment", {"app.kubernetes.io/name": "dscluster", "app.kubernetes.io/instance": "dscluster"}),
])
def test_inference_pool_selects_the_serving_pods(kind, selector, tmp_path):
    docs = objects(kind, "--inference-pool", "--port", "8080")
    rc, out = validate(tmp_path, docs)
    assert rc == 0, out
    pool = the(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"] == {"matchLabels": selector}
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "dscluster-epp",
                                                 "port": {"number": 9002}, "failureMode": "FailClose"}
    # the picker scrapes the pods' /metrics without a key
    serve = [n for d in docs for _, n in walk(d) if isinstance(n, list) and "serve" in n]
    assert serve


@needs_schemas
def test_a_manifest_breaking_a_cel_rule_is_rejected(tmp_path):
    """The InferencePool CRD's CEL rules: an endpoint picker Service needs a port; target ports are
    unique. Both broken, both reported with the CRD's own messages."""
    docs = objects("lws", "--inference-pool")
    pool = the(docs, "InferencePool")
    del pool["spec"]["endpointPickerRef"]["port"]
    pool["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    rc, out = validate(tmp_path, docs)
    assert rc == 2
    assert ("spec.endpointPickerRef: port is required when kind is 'Service' or unspecified "
            "(defaults to 'Service')") in out
    assert "spec.targetPorts: port number must be unique" in out


def test_dashboard_covers_what_operators_watch():
    board = monitor.dashboard()
    queries = monitor.dashboard_queries(board)
    text = " ".join(expr for _, expr in queries)
    for metric in ("dscluster_requests_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "dscluster_queue_depth", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:inter_token_latency_seconds_bucket", "vllm:generation_tokens_total",
                   "vllm:kv_cache_usage_perc", "dscluster_ranks_alive", "dscluster_world_size",
                   "dscluster_batch_size_bucket"):
        assert metric in text, metric
    assert any("status=~" in expr for _, expr in queries)  # errors by code
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "job"}
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_cli_prints_the_dashboard_and_the_rules():
    r = run_dscluster("k8s", "render", "dashboard")
    assert r.returncode == 0 and json.loads(r.stdout)["uid"] == "dscluster-serving"
    r = run_dscluster("k8s", "render", "alert-rules")
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["groups"][0]["name"] == "dscluster"


@needs_promtool
@pytest.mark.parametrize("extra", [["--target", "127.0.0.1:8000", "--api-key-file", "/etc/key"],
                                   ["--target", "10.0.0.5:8000", "--target", "10.0.0.6:8000"]])
def test_promtool_checks_the_scrape_config_and_the_rules(extra, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(monitor.alert_rules_text())
    (tmp_path / "key").write_text("secret")
    extra = [a.replace("/etc/key", str(tmp_path / "key")) for a in extra]
    config = tmp_path / "prometheus.yml"
    config.write_text(render("scrape-config", make_opts("scrape-config", *extra, "--rule-file", str(rules))))
    r = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr and "4 rules found" in r.stdout + r.stderr


@needs_promtool
def test_alert_rules_fire_on_a_broken_group_a_full_queue_and_slow_first_tokens(tmp_path):
    """`promtool test rules`: synthetic series in, the alerts that must fire out."""
    (tmp_path / "rules.yaml").write_text(monitor.alert_rules_text())
    labels = 'job="dscluster", instance="r0:8000"'
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f"dscluster_ranks_alive{{{labels}}}", "values": "16 16 15 15 15 15"},
            {"series": f"dscluster_world_size{{{labels}}}", "values": "16 16 16 16 16 16"},
            {"series": f'dscluster_requests_total{{{labels}, route="/v1/completions", status="429"}}',
             "values": "0+30x20"},
            {"series": f'vllm:time_to_first_token_seconds_bucket{{{labels}, le="1"}}', "values": "0+1x20"},
            {"series": f'vllm:time_to_first_token_seconds_bucket{{{labels}, le="10"}}', "values": "0+10x20"},
            {"series": f'vllm:time_to_first_token_seconds_bucket{{{labels}, le="+Inf"}}', "values": "0+10x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "DsclusterGroupBroken",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "dscluster", "instance": "r0:8000"},
                             "exp_annotations": {
                                 "summary": "dscluster group at r0:8000 has lost ranks",
                                 "description": "15 rank(s) answer heartbeats, fewer than the group's size, "
                                                "for 1 minute."}}]},
            {"eval_time": "1m", "alertname": "DsclusterGroupBroken", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "DsclusterQueueFull",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "dscluster", "instance": "r0:8000"},
                             "exp_annotations": {
                                 "summary": "dscluster at r0:8000 rejects requests: queue full",
                                 "description": "500m requests per second answered 429 over the last 5 minutes: "
                                                "add replicas or raise --max-queue."}}]},
            {"eval_time": "19m", "alertname": "DsclusterHighTimeToFirstToken",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "dscluster", "instance": "r0:8000"},
                             "exp_annotations": {
                                 "summary": "dscluster at r0:8000: slow first tokens",
                                 "description": "95th percentile time to first token is 9.5s (more than 5 s "
                                                "for 10 minutes)."}}]},
        ]}]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

"""`dscluster k8s validate`: mutated manifests are rejected with the field path; exit codes 0/2."""

from __future__ import annotations

import argparse
import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dscluster.errors import UsageError
from dscluster.k8s import options
from dscluster.k8s.render import render_objects
from dscluster.k8s.validate import run_validate, strict_schema

SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
pytestmark = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"CRD schemas not found at {SCHEMAS}")


def objects(kind: str, *extra: str) -> list[dict]:
    p = argparse.ArgumentParser()
    options.add_render_options(p)
    return render_objects(kind, p.parse_args([kind, "--nodes", "2", "--gpus-per-node", "2", *extra]))


def check(tmp_path: Path, docs: list[dict], crds: Path | None = SCHEMAS) -> tuple[int, str]:
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = io.StringIO()
    rc = run_validate([str(f)], crds_dir=str(crds) if crds else None, out=out)
    return rc, out.getvalue()


def the_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def test_rendered_and_upstream_examples_pass(tmp_path):
    for kind in ("mpijob", "trainjob", "lws"):
        rc, out = check(tmp_path, objects(kind))
        assert rc == 0, out
    examples = sorted(str(p) for p in (SCHEMAS / "upstream-examples").glob("*.yaml"))
    out = io.StringIO()
    assert run_validate(examples, crds_dir=str(SCHEMAS), out=out) == 0, out.getvalue()


def test_typo_in_worker_container_field(tmp_path):
    docs = objects("mpijob")
    c = the_kind(docs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    c["imagePullPolicyy"] = "Always"
    rc, out = check(tmp_path, docs)
    assert rc == 2
    line = [ln for ln in out.splitlines() if "imagePullPolicyy" in ln]
    assert len(line) == 1
    assert line[0].endswith("document 1 (MPIJob/dscluster): "
                            "spec.mpiReplicaSpecs.Worker.template.spec.containers[0].imagePullPolicyy: unknown field")
    assert "1 problem" in out.splitlines()[-1]


def test_wrong_api_version(tmp_path):
    docs = objects("mpijob")
    the_kind(docs, "MPIJob")["apiVersion"] = "kubeflow.org/v1"
    rc, out = check(tmp_path, docs)
    assert rc == 2 and "apiVersion: kubeflow.org/v1 is not a served version of MPIJob" in out
    assert "kubeflow.org/v2beta1" in out
    docs = objects("trainjob")
    the_kind(docs, "TrainJob")["apiVersion"] = "training.kubeflow.org/v1alpha1"  # the seeds' API
    rc, out = check(tmp_path, docs)
    assert rc == 2 and "(TrainJob/dscluster): apiVersion: no CustomResourceDefinition for TrainJob" in out


def test_bad_gpu_quantity(tmp_path):
    docs = objects("lws")
    c = the_kind(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    c["resources"]["limits"]["nvidia.com/gpu"] = "two"
    rc, out = check(tmp_path, docs)
    assert rc == 2
    assert ("spec.leaderWorkerTemplate.leaderTemplate.spec.containers[0].resources.limits.nvidia.com/gpu: "
            "'two' is not a quantity") in out
    assert len([ln for ln in out.splitlines() if "nvidia.com/gpu" in ln]) == 1


def test_bad_pvc_quantity(tmp_path):
    docs = objects("mpijob")
    the_kind(docs, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] = "100 GB"
    rc, out = check(tmp_path, docs)
    assert rc == 2 and "spec.resources.requests.storage: '100 GB' is not a quantity" in out


def test_mpijob_launchers_key_and_launcher_replicas(tmp_path):
    docs = objects("mpijob")
    rs = the_kind(docs, "MPIJob")["spec"]["mpiReplicaSpecs"]
    rs["Launchers"] = rs.pop("Launcher")
    rc, out = check(tmp_path, docs)
    assert rc == 2
    assert "spec.mpiReplicaSpecs.Launchers: unknown replica type" in out
    assert "spec.mpiReplicaSpecs.Launcher: required" in out
    docs = objects("mpijob")
    the_kind(docs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] = 2
    rc, out = check(tmp_path, docs)
    assert rc == 2 and "spec.mpiReplicaSpecs.Launcher.replicas: must be 1" in out


def test_lws_size_below_one(tmp_path):
    """The LWS webhook rejects size < 1; the CRD schema has no minimum, so validate checks it."""
    docs = objects("lws")
    the_kind(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["size"] = 0
    rc, out = check(tmp_path, docs)
    assert rc == 2 and "spec.leaderWorkerTemplate.size: must be at least 1 (got 0)" in out


def test_bad_names(tmp_path):
    docs = objects("mpijob")
    the_kind(docs, "MPIJob")["metadata"]["name"] = "My_Job"
    the_kind(docs, "Service", "dscluster-http")["metadata"]["name"] = "1http"
    rc, out = check(tmp_path, docs)
    assert rc == 2
    assert "(MPIJob/My_Job): metadata.name: 'My_Job' is not a DNS-1035 label" in out
    assert "(Service/1http): metadata.name: '1http' is not a DNS-1035 label" in out
    docs = objects("mpijob")
    the_kind(docs, "MPIJob")["metadata"]["name"] = "a" * 60
    rc, out = check(tmp_path, docs)
    assert rc == 2 and "exceeds 63 characters" in out


def test_typo_in_service_and_bad_label(tmp_path):
    docs = objects("trainjob")
    svc = the_kind(docs, "Service", "dscluster-master")
    svc["spec"]["clusterIp"] = "None"
    svc["metadata"]["labels"]["tier"] = "not ok!"
    rc, out = check(tmp_path, docs)
    assert rc == 2
    assert "(Service/dscluster-master): spec.clusterIp: unknown field" in out
    assert "metadata.labels.tier: invalid label value 'not ok!'" in out


def test_trainjob_reserved_env(tmp_path):
    docs = objects("trainjob")
    env = the_kind(docs, "TrainJob")["spec"]["trainer"]["env"]
    env.append({"name": "PET_NNODES", "value": "2"})
    env.append({"name": "OMPI_MCA_orte_default_hostfile", "value": "/tmp/h"})
    rc, out = check(tmp_path, docs)
    assert rc == 2
    n = len(env)
    assert f"spec.trainer.env[{n - 2}].name: PET_NNODES is reserved" in out
    assert f"spec.trainer.env[{n - 1}].name: OMPI_MCA_orte_default_hostfile is reserved" in out


def test_unknown_field_in_trainingruntime_template_metadata(tmp_path):
    docs = objects("trainjob")
    rt = the_kind(docs, "TrainingRuntime")
    rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["uid"] = "x"
    rc, out = check(tmp_path, docs)
    assert rc == 2
    assert "spec.template.spec.replicatedJobs[0].template.spec.template.metadata.uid: unknown field" in out


def test_missing_crds_message(tmp_path):
    rc, out = check(tmp_path, objects("lws"), crds=None)
    assert rc == 2
    assert "(LeaderWorkerSet/dscluster): apiVersion:" in out and "pass --crds DIR" in out
    # the built-in objects are still checked and pass
    assert "Service/" not in out and "PersistentVolumeClaim/" not in out


def test_crds_from_kubectl_list_output(tmp_path):
    crds = tmp_path / "crds"
    crds.mkdir()
    items = [yaml.safe_load((SCHEMAS / "kubeflow.org_mpijobs.yaml").read_text())]
    (crds / "all.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    rc, out = check(tmp_path, objects("mpijob"), crds=crds)
    assert rc == 0, out


def test_strict_schema_conversion():
    s = strict_schema({"type": "object", "properties": {
        "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"a": {"type": "string"}}}},
        "n": {"type": "string", "nullable": True}}})
    assert s["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["free"]
    assert s["properties"]["map"]["additionalProperties"]["additionalProperties"] is False
    assert s["properties"]["q"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert s["properties"]["n"]["type"] == ["string", "null"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dscluster", *args], capture_output=True, text=True, timeout=60)


def test_cli_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all(objects("mpijob")))
    r = run_cli("k8s", "validate", str(good), "--crds", str(SCHEMAS))
    assert r.returncode == 0, r.stdout + r.stderr
    bad_docs = copy.deepcopy(objects("mpijob"))
    the_kind(bad_docs, "Service", "dscluster-http")["spec"]["portz"] = []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(bad_docs))
    r = run_cli("k8s", "validate", str(good), str(bad), "--crds", str(SCHEMAS))
    assert r.returncode == 2
    assert f"{bad}: document 3 (Service/dscluster-http): spec.portz: unknown field" in r.stdout
    # unreadable file, bad YAML, missing --crds directory: one line, exit 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [\n")
    for args, needle in [((str(tmp_path / "nope.yaml"),), "cannot read"),
                         ((str(broken),), "not valid YAML"),
                         ((str(good), "--crds", str(tmp_path / "nodir")), "not a directory")]:
        r = run_cli("k8s", "validate", *args)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def test_no_objects_is_usage_error(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("---\n")
    with pytest.raises(UsageError, match="no Kubernetes objects"):
        run_validate([str(f)], crds_dir=None)

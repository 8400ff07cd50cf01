"""Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1): a TrainingRuntime with the MPI policy and a
JobSet template (replicated jobs `launcher` and `node`), plus a TrainJob that refers to it.

With `runLauncherAsNode: false` the launcher runs mpirun only and the `node` pods run sshd; the
Trainer writes the hostfile (`<name>-node-0-0.<name>` first), so rank 0 runs on the pod of node
job 0, completion index 0. JobSet labels its pods with `jobset.sigs.k8s.io/{jobset-name,
replicatedjob-name,job-index}` and `batch.kubernetes.io/job-completion-index`; the JobSet is named
after the TrainJob and creates a headless Service with that same name, so ours are `<name>-master`
and `<name>-http`.

The TrainJob sets only its own variables: the Trainer reserves the PET_* torch variables and the
OpenMPI variables it writes itself (see validate.RESERVED_TRAINJOB_ENV).
"""

from __future__ import annotations

import argparse

from dscluster.k8s import common as c
from dscluster.k8s import gang

SSH_AUTH_MOUNT_PATH = "/root/.ssh"


def runtime_name(opts: argparse.Namespace) -> str:
    return f"{opts.name}-runtime"


def rank0_selector(opts: argparse.Namespace) -> dict[str, str]:
    return {
        "jobset.sigs.k8s.io/jobset-name": opts.name,
        "jobset.sigs.k8s.io/replicatedjob-name": "node",
        "jobset.sigs.k8s.io/job-index": "0",
        "batch.kubernetes.io/job-completion-index": "0",
    }


def training_runtime(opts: argparse.Namespace) -> c.Obj:
    # The Trainer finds the containers it manages by the name `node`.
    node = c.ssh_rank_container(opts, "node", f"{opts.name}-node-0-0")
    launcher = {
        "name": "node",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
    }
    spec: c.Obj = {
        "mlPolicy": {
            "numNodes": opts.nodes,
            "mpi": {"numProcPerNode": c.slots(opts), "mpiImplementation": "OpenMPI",
                    "sshAuthMountPath": SSH_AUTH_MOUNT_PATH, "runLauncherAsNode": False},
        },
    }
    # Gang scheduling (gang.py): the Trainer makes one PodGroup of the launcher and every node.
    policy = gang.trainjob_pod_group_policy(opts)
    if policy:
        spec["podGroupPolicy"] = policy
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainingRuntime",
        "metadata": c.meta(opts, runtime_name(opts)),
        "spec": {
            **spec,
            "template": {"spec": {
                # Rendezvous names must resolve before the pods are Ready.
                "network": {"publishNotReadyAddresses": True},
                "successPolicy": {"operator": "All", "targetReplicatedJobs": ["launcher"]},
                # A broken group fails the launcher job (mpirun exits non-zero); JobSet then
                # recreates every job of the group, up to maxRestarts times.
                "failurePolicy": {"maxRestarts": opts.max_restarts, "restartStrategy": opts.restart_policy},
                "replicatedJobs": [
                    {"name": "node", "template": {"spec": {"completionMode": "Indexed", "template": {
                        "metadata": c.rank_pod_metadata(opts, serves_http=False),
                        "spec": c.pod_spec(opts, [node])}}}},
                    {"name": "launcher",
                     "dependsOn": [{"name": "node", "status": "Ready"}],
                     "template": {
                         "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                         # No retry inside the job: a failed mpirun restarts the whole group.
                         "spec": {"backoffLimit": 0,
                                  "template": {"metadata": {"labels": c.common_labels(opts)},
                                               "spec": c.pod_spec(opts, [launcher], volumes=False)}}}},
                ],
            }},
        },
    }


def train_job(opts: argparse.Namespace) -> c.Obj:
    cmd = c.launcher_command(opts)
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": c.workload_meta(opts, opts.name),
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                           "name": runtime_name(opts)},
            "trainer": {
                "image": opts.image,
                "numNodes": opts.nodes,
                "command": cmd[:1],
                "args": cmd[1:],
                "env": c.rank_env(opts) + c.api_key_env(opts),
            },
        },
    }


def render_objects(opts: argparse.Namespace) -> list[c.Obj]:
    sel = rank0_selector(opts)
    return [training_runtime(opts), train_job(opts), c.master_service(opts, sel), c.http_service(opts, sel)]

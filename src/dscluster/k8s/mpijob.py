"""Kubeflow MPI Operator (kubeflow.org/v2beta1 MPIJob): a launcher pod runs mpirun, worker pods run sshd.

mpirun maps ranks by slot over the operator's hostfile, whose first host is `<name>-worker-0`, so
rank 0 (and its HTTP server) runs on worker 0. The operator labels its pods with
`training.kubeflow.org/{job-name,replica-type,replica-index}`; the Services select worker 0 by
those labels. The operator itself creates the `<name>-worker` headless Service; ours are named
`<name>-master` and `<name>-http` so they never collide.
"""

from __future__ import annotations

import argparse

from dscluster.k8s import common as c
from dscluster.k8s import gang

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


def rank0_selector(opts: argparse.Namespace) -> dict[str, str]:
    return {JOB_NAME_LABEL: opts.name, REPLICA_TYPE_LABEL: "worker", REPLICA_INDEX_LABEL: "0"}


def mpijob(opts: argparse.Namespace) -> c.Obj:
    launcher = {
        "name": "launcher",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": c.launcher_command(opts),
        "env": c.rank_env(opts) + c.api_key_env(opts),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
    }
    worker = c.ssh_rank_container(opts, "worker", f"{opts.name}-worker-0")
    run_policy: c.Obj = {
        # Running pods are removed when the job ends; a failed mpirun (a broken group: every
        # rank exits non-zero) is run again by the launcher Job, up to backoffLimit times.
        "cleanPodPolicy": "Running",
        "backoffLimit": opts.max_restarts,
    }
    # Gang scheduling (gang.py): the launcher and every worker are placed together or not at all.
    policy = gang.mpijob_scheduling_policy(opts, pods=opts.nodes + 1)
    if policy:
        run_policy["schedulingPolicy"] = policy
    return {
        "apiVersion": "kubeflow.org/v2beta1",
        "kind": "MPIJob",
        "metadata": c.workload_meta(opts, opts.name),
        "spec": {
            "slotsPerWorker": c.slots(opts),
            "mpiImplementation": "OpenMPI",
            "launcherCreationPolicy": "AtStartup",
            "runPolicy": run_policy,
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    # OnFailure: mpirun runs again in the same pod; Never: in a new pod each time.
                    "restartPolicy": opts.restart_policy,
                    "template": {"metadata": {"labels": c.common_labels(opts)},
                                 "spec": c.pod_spec(opts, [launcher], volumes=False)},
                },
                "Worker": {
                    "replicas": opts.nodes,
                    # sshd must come back: the launcher's next mpirun reaches every worker again.
                    "restartPolicy": "OnFailure",
                    "template": {"metadata": c.rank_pod_metadata(opts, serves_http=False),
                                 "spec": c.pod_spec(opts, [worker])},
                },
            },
        },
    }


def render_objects(opts: argparse.Namespace) -> list[c.Obj]:
    sel = rank0_selector(opts)
    return [mpijob(opts), c.master_service(opts, sel), c.http_service(opts, sel)]

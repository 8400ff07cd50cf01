"""A Deployment (apps/v1) for a model that fits one node: each pod runs the whole group.

The seeds' advice, and `dscluster plan`'s answer when one node's GPUs hold the model: no MPI
Operator, no cross-pod rendezvous. The pod's process is `dscluster serve --nproc <gpus>`, the local
launcher, which starts one rank per GPU and finds the master on loopback; so there is no
`<name>-master` Service. `--replicas` pods are independent copies behind `<name>-http`, and a
rolling update starts a new pod before the old one stops (maxUnavailable 0), which then drains:
readiness 503 for `--drain-delay`, then requests in flight finish.
"""

from __future__ import annotations

import argparse

from dscluster.k8s import common as c


def pod_labels(opts: argparse.Namespace) -> dict[str, str]:
    labels = c.common_labels(opts)
    return {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}


def deployment(opts: argparse.Namespace) -> c.Obj:
    container: c.Obj = {
        "name": "dscluster",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": c.serve_command(opts, nproc=c.slots(opts)),
        "env": c.nccl_env(opts) + c.api_key_env(opts),
        "ports": [{"name": "http", "containerPort": opts.port, "protocol": "TCP"}],
        "volumeMounts": c.rank_volume_mounts(),
        "resources": c.rank_resources(opts),
        **c.rank_security_context(opts),
        **c.http_probes(opts),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.workload_meta(opts, opts.name),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": pod_labels(opts)},
            # A new pod is Ready (model loaded) before an old one is told to stop; this needs room
            # for one more pod's GPUs during a rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": c.rank_pod_metadata(opts, serves_http=True),
                         "spec": c.pod_spec(opts, [container])},
        },
    }


def render_objects(opts: argparse.Namespace) -> list[c.Obj]:
    return [deployment(opts), c.http_service(opts, pod_labels(opts))]

"""LeaderWorkerSet (leaderworkerset.x-k8s.io/v1): `--replicas` groups of `--nodes` pods each.

Every pod runs `dscluster serve --nproc <gpus>`, which starts one rank per GPU in the pod; the
rendezvous comes from LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX, which LWS injects
into every pod, with MASTER_PORT from the pod's env. The leader (worker index 0) runs rank 0 and the
HTTP server. Each group has its own leader, so the rendezvous address is LWS_LEADER_ADDRESS (LWS
itself creates the headless Service `<name>` that makes it resolvable). The `<name>-master`
headless Service, like the other kinds', publishes the leaders' rendezvous port: with one replica
it names the one master (for `dscluster doctor`, debugging), with several it lists every group's.
The `<name>-http` Service selects the leaders of all groups and so balances across groups.
"""

from __future__ import annotations

import argparse

from dscluster.k8s import common as c

NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def leaders_selector(opts: argparse.Namespace) -> dict[str, str]:
    return {NAME_LABEL: opts.name, WORKER_INDEX_LABEL: "0"}


def _container(opts: argparse.Namespace, *, leader: bool) -> c.Obj:
    cont: c.Obj = {
        "name": "dscluster",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": c.serve_command(opts, nproc=c.slots(opts)),
        "env": c.rank_env(opts, master_addr=False) + (c.api_key_env(opts) if leader else []),
        "ports": c.rank_ports(opts),
        "volumeMounts": c.rank_volume_mounts(),
        "resources": c.rank_resources(opts),
        **c.rank_security_context(opts),
    }
    if leader:
        cont.update(c.http_probes(opts))
    else:
        cont.update(c.leader_follower_probes(opts, "LWS_LEADER_ADDRESS"))
    return cont


def leader_worker_set(opts: argparse.Namespace) -> c.Obj:
    def template(leader: bool) -> c.Obj:
        metadata = c.rank_pod_metadata(opts, serves_http=leader)
        return {"metadata": metadata, "spec": c.pod_spec(opts, [_container(opts, leader=leader)])}

    lwt: c.Obj = {
        "size": opts.nodes,
        # One lost pod breaks the process group: by default LWS recreates the whole group.
        "restartPolicy": opts.restart_policy,
        "leaderTemplate": template(True),
    }
    if opts.nodes > 1:
        lwt["workerTemplate"] = template(False)
    else:
        lwt["workerTemplate"] = template(True)
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": c.workload_meta(opts, opts.name),
        "spec": {
            "replicas": opts.replicas,
            # Workers must start with the leader: the leader is not Ready until they have joined.
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": lwt,
        },
    }


def render_objects(opts: argparse.Namespace) -> list[c.Obj]:
    return [leader_worker_set(opts), c.master_service(opts, leaders_selector(opts)),
            c.http_service(opts, leaders_selector(opts))]

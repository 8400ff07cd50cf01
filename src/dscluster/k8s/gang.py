"""Gang scheduling: a group's pods are placed together or not at all (`--gang`, off by default).

A sharded model cannot serve with a rank missing, so a half-placed group holds GPUs while it waits
for the rest, and two half-placed groups can wait on each other for ever. Each scheduler that
prevents this is told about the group in its own way, per kind:

| kind | volcano | scheduler-plugins (coscheduling) | kueue |
| --- | --- | --- | --- |
| MPIJob | `runPolicy.schedulingPolicy` (minAvailable, queue, priorityClass): the MPI Operator, started with `--gang-scheduling=volcano`, creates the PodGroup | the same, with `scheduleTimeoutSeconds` (`--gang-scheduling=scheduler-plugins-scheduler`) | label `kueue.x-k8s.io/queue-name` on the MPIJob |
| TrainJob | the runtime's `podGroupPolicy.volcano`; queue: annotation `scheduling.volcano.sh/queue-name` on the TrainJob | `podGroupPolicy.coscheduling.scheduleTimeoutSeconds` | label on the TrainJob |
| LeaderWorkerSet | the LWS controller (>= 0.7, configured with `gangSchedulingManagement.schedulerProvider: volcano`) makes a PodGroup per group; queue: annotation `scheduling.volcano.sh/queue-name` on the LWS | not supported by LWS (refused) | label on the LWS: Kueue admits each group as one workload |
| Deployment | one pod is the whole group: nothing to gang (refused) | refused | label on the Deployment and its pod template (Kueue's pod integration) |

With volcano and scheduler-plugins every pod gets that scheduler's `schedulerName`
(`--scheduler-name` overrides it). `--priority-class` is every pod's `priorityClassName` (Kueue and
Volcano take a workload's priority from it) and, for the MPIJob, the PodGroup's.
"""

from __future__ import annotations

import argparse

from dscluster.errors import UsageError
from dscluster.k8s.options import DNS1123_SUBDOMAIN, GANG_SCHEDULER_NAMES, QUALIFIED_NAME

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"
LWS_EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"


def check(opts: argparse.Namespace) -> None:
    """One-line UsageErrors for gang flags a kind cannot take."""
    kind, gang = opts.kind, opts.gang
    for flag, value in (("--queue", opts.queue), ("--priority-class", opts.priority_class)):
        if value is not None and (not DNS1123_SUBDOMAIN.match(value) or len(value) > 253):
            raise UsageError(f"{flag} {value!r} is not a valid name (DNS-1123 subdomain)")
    if opts.scheduler_name is not None and not DNS1123_SUBDOMAIN.match(opts.scheduler_name):
        raise UsageError(f"--scheduler-name {opts.scheduler_name!r} is not a valid scheduler name")
    if opts.exclusive_topology is not None:
        if kind != "lws":
            raise UsageError("--exclusive-topology applies to lws only (one group per topology domain)")
        if not QUALIFIED_NAME.match(opts.exclusive_topology):
            raise UsageError(f"--exclusive-topology {opts.exclusive_topology!r} is not a node label key")
    if gang is None:
        if opts.queue is not None or opts.scheduler_name is not None:
            raise UsageError("--queue and --scheduler-name need --gang volcano, scheduler-plugins or kueue")
        return
    if not 1 <= opts.gang_timeout <= 86400:
        raise UsageError(f"--gang-timeout must be between 1 and 86400 seconds, got {opts.gang_timeout}")
    if gang == "kueue":
        if opts.queue is None:
            raise UsageError("--gang kueue needs --queue: the LocalQueue that admits the group")
        if opts.scheduler_name is not None:
            raise UsageError("--scheduler-name does not apply to --gang kueue: Kueue admits, the default scheduler places")
    if gang == "scheduler-plugins" and opts.queue is not None:
        raise UsageError("--queue does not apply to --gang scheduler-plugins: coscheduling has no queues "
                         "(use volcano or kueue for queues)")
    if kind == "deployment" and gang != "kueue":
        raise UsageError(f"--gang {gang} does not apply to deployment: its one pod is the whole group; "
                         "--gang kueue queues it")
    if kind == "lws" and gang == "scheduler-plugins":
        raise UsageError("--gang scheduler-plugins does not apply to lws: the LeaderWorkerSet controller "
                         "creates PodGroups for volcano only; use volcano or kueue")


def scheduler_name(opts: argparse.Namespace) -> str | None:
    if opts.gang in GANG_SCHEDULER_NAMES:
        return opts.scheduler_name or GANG_SCHEDULER_NAMES[opts.gang]
    return None


def pod_fields(opts: argparse.Namespace) -> dict:
    """Fields of every pod spec of the group: its scheduler and its priority."""
    fields: dict = {}
    name = scheduler_name(opts)
    if name:
        fields["schedulerName"] = name
    if opts.priority_class:
        fields["priorityClassName"] = opts.priority_class
    return fields


def workload_labels(opts: argparse.Namespace) -> dict[str, str]:
    """Labels of the workload object itself (Kueue's queue)."""
    return {KUEUE_QUEUE_LABEL: opts.queue} if opts.gang == "kueue" else {}


def workload_annotations(opts: argparse.Namespace) -> dict[str, str]:
    """Annotations of a TrainJob or a LeaderWorkerSet: Volcano's queue (the Trainer's and the LWS
    controller's Volcano integrations read it there), LWS's exclusive placement."""
    notes = {}
    if opts.gang == "volcano" and opts.queue and opts.kind in ("trainjob", "lws"):
        notes[VOLCANO_QUEUE_ANNOTATION] = opts.queue
    if opts.kind == "lws" and opts.exclusive_topology:
        notes[LWS_EXCLUSIVE_TOPOLOGY] = opts.exclusive_topology
    return notes


def mpijob_scheduling_policy(opts: argparse.Namespace, pods: int) -> dict | None:
    """runPolicy.schedulingPolicy: the PodGroup the MPI Operator creates (launcher and workers)."""
    if opts.gang not in ("volcano", "scheduler-plugins"):
        return None
    policy: dict = {"minAvailable": pods}
    if opts.gang == "volcano" and opts.queue:
        policy["queue"] = opts.queue
    if opts.priority_class:
        policy["priorityClass"] = opts.priority_class
    if opts.gang == "scheduler-plugins":
        policy["scheduleTimeoutSeconds"] = opts.gang_timeout
    return policy


def trainjob_pod_group_policy(opts: argparse.Namespace) -> dict | None:
    """The TrainingRuntime's podGroupPolicy: the Trainer creates the PodGroup of the whole JobSet."""
    if opts.gang == "volcano":
        return {"volcano": {}}
    if opts.gang == "scheduler-plugins":
        return {"coscheduling": {"scheduleTimeoutSeconds": opts.gang_timeout}}
    return None


def kueue_pod_labels(opts: argparse.Namespace) -> dict[str, str]:
    """A Deployment's pods carry the queue too (Kueue's pod integration reads the pod's label)."""
    return workload_labels(opts) if opts.kind == "deployment" else {}

"""`dscluster k8s render KIND`: the manifests for one way of running, as multi-document YAML; or, for
the monitoring kinds, the Grafana dashboard (JSON), a Prometheus scrape configuration or alerting
rules (YAML).

A workload's manifests, in the order `kubectl apply` creates them: the workload, its Services, the
checkpoint PVC (unless --existing-pvc), the download Job (--download), the PodMonitor (--monitor),
the InferencePool (--inference-pool).
"""

from __future__ import annotations

import argparse
import copy

import yaml

from dscluster.errors import UsageError
from dscluster.k8s import common as c
from dscluster.k8s import deployment, download, inference_pool, lws, monitor, mpijob, trainjob
from dscluster.k8s.options import KINDS, MONITORING_KINDS, check_options

_RENDERERS = {"mpijob": mpijob.render_objects, "trainjob": trainjob.render_objects, "lws": lws.render_objects,
              "deployment": deployment.render_objects}
# The pods that serve HTTP, per kind: the scrape's and the inference pool's selector.
_SERVING_PODS = {"mpijob": mpijob.rank0_selector, "trainjob": trainjob.rank0_selector,
                 "lws": lws.leaders_selector, "deployment": deployment.pod_labels}


class _Dumper(yaml.SafeDumper):
    """Block style, keys in insertion order, and no YAML anchors/aliases (kubectl-friendly)."""

    def ignore_aliases(self, data):  # noqa: D102
        return True


def render_objects(kind: str, opts: argparse.Namespace) -> list[dict]:
    if kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    opts = copy.copy(opts)  # check_options fills in per-kind defaults
    opts.kind = kind
    check_options(opts)
    objs = _RENDERERS[kind](opts)
    pvc = c.checkpoint_pvc(opts)
    if pvc:
        objs.append(pvc)
    if opts.download:
        objs.append(download.download_job(opts))
    if opts.monitor:
        objs.append(monitor.pod_monitor(opts, _SERVING_PODS[kind](opts)))
    if opts.inference_pool:
        objs.append(inference_pool.inference_pool(opts, _SERVING_PODS[kind](opts)))
    return objs


def _dump(objs: list[dict]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def render(kind: str, opts: argparse.Namespace) -> str:
    if kind in MONITORING_KINDS:
        return render_monitoring(kind, opts)
    return _dump(render_objects(kind, opts))


def render_monitoring(kind: str, opts: argparse.Namespace) -> str:
    if kind != "scrape-config" and (opts.target or opts.api_key_file or opts.rule_file):
        raise UsageError("--target, --api-key-file and --rule-file apply to `render scrape-config` only")
    if kind == "dashboard":
        return monitor.dashboard_text()
    if kind == "alert-rules":
        return monitor.alert_rules_text()
    return _dump([monitor.scrape_config(opts)])

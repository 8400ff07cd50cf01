"""`dscluster k8s render KIND`: the manifests for one way of running, as multi-document YAML."""

from __future__ import annotations

import argparse
import copy

import yaml

from dscluster.errors import UsageError
from dscluster.k8s import deployment, lws, mpijob, trainjob
from dscluster.k8s.options import KINDS, check_options

_RENDERERS = {"mpijob": mpijob.render_objects, "trainjob": trainjob.render_objects, "lws": lws.render_objects,
              "deployment": deployment.render_objects}


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
    return _RENDERERS[kind](opts)


def render(kind: str, opts: argparse.Namespace) -> str:
    objs = render_objects(kind, opts)
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)

"""Flags of `dscluster k8s render` (kept beside the renderers that read them)."""

from __future__ import annotations

import argparse


def add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["mpijob", "trainjob", "lws"])
    p.add_argument("--name", default="dscluster")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", default="dscluster:latest")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--model", default="/mnt/checkpoints/model")

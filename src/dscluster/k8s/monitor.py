"""Prometheus and Grafana: the PodMonitor of `render KIND --monitor`, `render scrape-config`,
`render dashboard` and `render alert-rules`.

- PodMonitor (prometheus-operator, monitoring.coreos.com/v1): scrapes `/metrics` on the `http`
  port of rank 0's pod(s) only, selected by the same labels as the `<name>-http` Service, since the
  other ranks serve nothing. With `--api-key-secret` it sends the key as a bearer token (the
  rendered server also lets /metrics through without it, for annotation-based scrapes and the
  inference gateway's endpoint picker).
- scrape-config: a Prometheus configuration that scrapes static `--target`s (rank 0's HTTP address),
  for a Prometheus outside Kubernetes or without the operator. (In a cluster, Prometheus' usual
  `kubernetes-service-endpoints` job finds the `<name>-http` Service by its `prometheus.io/*`
  annotations.)
- dashboard: the Grafana dashboard shipped as package data (data/grafana-dashboard.json). Its
  queries use vLLM's metric names wherever the server exports them (running and waiting requests,
  time to first token and per output token, tokens, KV-cache usage, preemptions, prefix cache), so
  one dashboard shows a fleet that mixes dscluster and vLLM servers; dscluster's own names only
  where vLLM has none (requests and errors by HTTP status, the predict queue, the group's ranks,
  batch sizes, step time). Every query is run against a real Prometheus scraping a real server in
  tests/e2e/test_prometheus.py.
- alert-rules: Prometheus alerting rules (data/alert-rules.yaml): a broken group, a full queue, a
  high time to first token.
"""

from __future__ import annotations

import argparse
import json
import re
from importlib import resources
from typing import Any

from dscluster.errors import UsageError
from dscluster.k8s import common as c
from dscluster.k8s.options import DURATION, parse_pairs

DASHBOARD_FILE = "grafana-dashboard.json"
ALERT_RULES_FILE = "alert-rules.yaml"
SCRAPE_JOB = "dscluster"
TARGET = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")


def _data(name: str) -> str:
    return resources.files("dscluster.k8s").joinpath("data", name).read_text(encoding="utf-8")


def dashboard() -> dict[str, Any]:
    return json.loads(_data(DASHBOARD_FILE))


def dashboard_text() -> str:
    return _data(DASHBOARD_FILE)


def alert_rules_text() -> str:
    return _data(ALERT_RULES_FILE)


def dashboard_queries(board: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of the dashboard."""
    board = board or dashboard()
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def pod_monitor(opts: argparse.Namespace, selector: dict[str, str]) -> c.Obj:
    endpoint: c.Obj = {"port": "http", "path": "/metrics", "interval": opts.scrape_interval}
    if opts.api_key_secret:
        endpoint["authorization"] = {"type": "Bearer",
                                     "credentials": {"name": opts.api_key_secret, "key": c.API_KEY_SECRET_KEY}}
    metadata = c.meta(opts, opts.name)
    metadata["labels"].update(parse_pairs(opts.monitor_label, "--monitor-label"))
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": {"selector": {"matchLabels": dict(selector)}, "podMetricsEndpoints": [endpoint]},
    }


def scrape_config(opts: argparse.Namespace) -> dict[str, Any]:
    """A Prometheus configuration with one scrape job for dscluster servers."""
    if not DURATION.match(opts.scrape_interval or ""):
        raise UsageError(f"--scrape-interval {opts.scrape_interval!r} is not a duration such as 15s or 1m")
    job: dict[str, Any] = {"job_name": SCRAPE_JOB, "metrics_path": "/metrics"}
    bad = [t for t in opts.target if not TARGET.match(t)]
    if bad:
        raise UsageError(f"--target {bad[0]!r} is not HOST:PORT")
    if not opts.target:
        raise UsageError("scrape-config needs --target HOST:PORT (rank 0's HTTP address); in Kubernetes use "
                         "--monitor (a PodMonitor) or the prometheus.io/* annotations the <name>-http Service carries")
    job["static_configs"] = [{"targets": list(opts.target)}]
    if opts.api_key_file:
        job["authorization"] = {"type": "Bearer", "credentials_file": opts.api_key_file}
    config: dict[str, Any] = {"global": {"scrape_interval": opts.scrape_interval,
                                         "evaluation_interval": opts.scrape_interval}}
    if opts.rule_file:
        config["rule_files"] = list(opts.rule_file)
    config["scrape_configs"] = [job]
    return config

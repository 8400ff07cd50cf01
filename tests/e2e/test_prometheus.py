"""The dashboard, proven against a real Prometheus: Debian's `prometheus` binary, started here on a free
loopback port with the configuration `dscluster k8s render scrape-config` writes (checked first by
`promtool check config`, with the alert rules loaded), scrapes a real 2-rank server every second
through its API key. Under load (completions, streamed and not, and error answers), every query of
the shipped Grafana dashboard, asked through Prometheus' HTTP API, returns at least one series.

Nothing here stands in for Prometheus or the server; only Grafana is absent: its two template
variables are filled in as Grafana would ($job: the scrape job, $__rate_interval: a window of
several scrapes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dscluster.cluster.launch import free_port
from dscluster.k8s import monitor
from servers import RemoteServer, poll_ready  # tests/e2e/servers.py

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                reason="prometheus and promtool (Debian package prometheus) not installed")
API_KEY = "prometheus-test-key"
RATE_WINDOW = "30s"


def grafana_expr(expr: str) -> str:
    """Grafana's substitution of the dashboard's variables."""
    return expr.replace("$job", monitor.SCRAPE_JOB).replace("$__rate_interval", RATE_WINDOW)


class Prometheus:
    def __init__(self, config: Path, data: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data.parent / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if not poll_ready(self.url, lambda: self.proc.poll() is None, 20, path="/-/ready"):
            raise RuntimeError(f"prometheus exited {self.proc.poll()} or was not ready in 20 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def render_config(tmp_path: Path, target: str) -> Path:
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY)
    rules = tmp_path / "alert-rules.yaml"
    run = [sys.executable, "-m", "dscluster", "k8s", "render"]
    rules.write_text(subprocess.run(run + ["alert-rules"], capture_output=True, text=True, check=True).stdout)
    config = tmp_path / "prometheus.yml"
    config.write_text(subprocess.run(
        run + ["scrape-config", "--target", target, "--scrape-interval", "1s", "--api-key-file", str(key_file),
               "--rule-file", str(rules)], capture_output=True, text=True, check=True).stdout)
    check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    return config


def put_load(server: RemoteServer) -> dict[int, int]:
    """Completions (plain and streamed), and answers with error codes: a bad body, a missing key."""
    codes: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with server.client(headers=headers) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(4):
            r = client.post("/v1/completions", json={"model": model, "prompt": f"Hello number {i}",
                                                     "max_tokens": 8, "temperature": 0})
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
        for i in range(3):
            with client.stream("POST", "/v1/completions",
                               json={"model": model, "prompt": f"Stream {i}", "max_tokens": 8, "stream": True}) as r:
                r.read()
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
        r = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": -3})
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "no key"}, timeout=10)
    codes[r.status_code] = codes.get(r.status_code, 0) + 1
    return codes


def test_every_dashboard_query_returns_data_from_a_real_prometheus(tiny, tmp_path):
    with RemoteServer(tiny, "--api-key", API_KEY, "--max-num-seqs", "4") as server:
        config = render_config(tmp_path, f"127.0.0.1:{server.port}")
        prom = Prometheus(config, tmp_path / "data")
        try:
            deadline = time.monotonic() + 15
            while not [s for s in prom.query(f'up{{job="{monitor.SCRAPE_JOB}"}} == 1')]:
                assert time.monotonic() < deadline, f"target never up:\n{prom.output()}"
                time.sleep(0.5)
            codes = put_load(server)
            assert codes.get(200) == 7 and codes.get(401) == 1 and sum(codes.values()) == 9, codes
            queries = monitor.dashboard_queries()
            ttft_expr = grafana_expr(next(e for t, e in queries if t == "Time to first token"))
            deadline = time.monotonic() + 30  # until the scrapes after the load are in (every 1 s)
            while True:
                empty = [(title, expr) for title, expr in queries if not prom.query(grafana_expr(expr))]
                ttft = prom.query(ttft_expr)
                if (not empty and 0 < float(ttft[0]["value"][1])) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert not empty, f"dashboard queries with no series: {json.dumps(empty, indent=1)}"
            # the latency panels read real observations, not empty histograms (NaN)
            assert 0 < float(ttft[0]["value"][1]) < 60, ttft
            # the error codes are there by code, as the errors panel shows them
            errors = prom.query(grafana_expr(next(e for t, e in queries if t.startswith("Errors"))))
            assert {s["metric"]["status"] for s in errors} >= {"401"}
            # the group: two ranks alive of two
            assert prom.query('dscluster_ranks_alive{job="dscluster"}')[0]["value"][1] == "2"
            # the alert rules are loaded and evaluate without error
            rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            assert [r["name"] for g in rules for r in g["rules"]] == [
                "DsclusterGroupBroken", "DsclusterServerDown", "DsclusterQueueFull", "DsclusterHighTimeToFirstToken"]
            assert all(r["health"] in ("ok", "unknown") for g in rules for r in g["rules"]), rules
        finally:
            prom.stop()

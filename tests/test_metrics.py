"""The KV-cache pool's metrics as a Prometheus scraper reads them, under dscluster's names and vLLM's.

This is the metrics module's unit test, so the engine is a fake stats provider: a callable whose
snapshot the test changes between two scrapes, which is how the real engine's numbers move (the
engine thread owns them; the registry reads them at scrape time). The expected names, types and
labels are vLLM's as its v1/metrics/loggers.py exposes them (prometheus_client adds `_total` to a
counter's samples), written out here rather than derived from our code. The real server's metrics
moving as the cache fills and hits are tested end to end with the engine.
"""

from __future__ import annotations

from dataclasses import replace

from dscluster.engine.api import GenerationStats
from dscluster.serving.metrics import Metrics

from prometheus_client.parser import text_string_to_metric_families

MODEL = {"model_name": "tiny"}


class FakeStats:
    """Stands in for the engine's generation_stats(): returns whatever snapshot the test set last."""

    def __init__(self, snapshot: GenerationStats):
        self.snapshot = snapshot

    def __call__(self) -> GenerationStats:
        return self.snapshot


def scrape(metrics: Metrics) -> dict[str, tuple[str, dict[tuple[str, tuple], float]]]:
    """Family name -> (type, {(sample name, sorted labels): value}), from the exposition text."""
    families = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = (family.type, samples)
    return families


def one(families, family: str, kind: str, sample: str, labels: dict[str, str]) -> float:
    """The value of the only sample of `family`, after checking its type, sample name and labels."""
    got_kind, samples = families[family]
    assert got_kind == kind, family
    assert list(samples) == [(sample, tuple(sorted(labels.items())))], family
    return samples[(sample, tuple(sorted(labels.items())))]


FIRST = GenerationStats(waiting=1, running=2, kv_bytes=1 << 20, kv_used_bytes=1 << 18, kv_usage=0.25,
                        block_size=16, num_blocks=64, prefix_caching=True, preemptions=3,
                        prefix_queries=40, prefix_hits=32)
SECOND = replace(FIRST, kv_used_bytes=3 << 18, kv_usage=0.75, preemptions=7, prefix_queries=100, prefix_hits=80)


def test_cache_metrics_are_read_from_the_engine_at_each_scrape():
    stats = FakeStats(FIRST)
    metrics = Metrics(lambda: 2, 2, stats, model_name="tiny")
    preemptions_seen = []
    for snapshot in (FIRST, SECOND):
        stats.snapshot = snapshot
        got = scrape(metrics)
        # vLLM's names: the gauge under its current and its older name, the counters' samples end
        # in _total, tokens for the prefix cache, model_name on each.
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            assert one(got, name, "gauge", name, MODEL) == snapshot.kv_usage
        preemptions_seen.append(one(got, "vllm:num_preemptions", "counter", "vllm:num_preemptions_total", MODEL))
        for name in ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"):
            assert one(got, name, "counter", name + "_total", MODEL) == snapshot.prefix_queries
        for name in ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"):
            assert one(got, name, "counter", name + "_total", MODEL) == snapshot.prefix_hits
        assert one(got, "vllm:cache_config_info", "gauge", "vllm:cache_config_info",
                   {"block_size": "16", "num_gpu_blocks": "64", "enable_prefix_caching": "True"}) == 1
        # dscluster's names for the same numbers, without labels.
        assert one(got, "dscluster_kv_cache_usage", "gauge", "dscluster_kv_cache_usage", {}) == snapshot.kv_usage
        assert one(got, "dscluster_kv_cache_bytes", "gauge", "dscluster_kv_cache_bytes", {}) == 1 << 20
        assert one(got, "dscluster_kv_cache_used_bytes", "gauge", "dscluster_kv_cache_used_bytes",
                   {}) == snapshot.kv_used_bytes
        assert one(got, "dscluster_preemptions", "counter", "dscluster_preemptions_total",
                   {}) == snapshot.preemptions
        assert one(got, "dscluster_prefix_cache_queries", "counter", "dscluster_prefix_cache_queries_total",
                   {}) == snapshot.prefix_queries
        assert one(got, "dscluster_prefix_cache_hits", "counter", "dscluster_prefix_cache_hits_total",
                   {}) == snapshot.prefix_hits
        # The scheduler's gauges come from the same provider.
        assert one(got, "vllm:num_requests_running", "gauge", "vllm:num_requests_running", MODEL) == 2
    assert preemptions_seen == [3, 7], "each scrape reads the engine's counter anew"


def test_exposed_sample_lines_carry_vllm_exact_names():
    """Readers that grep the text rather than parse it see vLLM's exact sample names."""
    text = Metrics(lambda: 1, 1, FakeStats(SECOND), model_name="tiny").render().decode()
    lines = set(text.splitlines())
    for line in ('vllm:num_preemptions_total{model_name="tiny"} 7.0',
                 'vllm:prefix_cache_queries_total{model_name="tiny"} 100.0',
                 'vllm:gpu_prefix_cache_hits_total{model_name="tiny"} 80.0',
                 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.75',
                 'vllm:gpu_cache_usage_perc{model_name="tiny"} 0.75',
                 '# TYPE vllm:num_preemptions_total counter',
                 'dscluster_preemptions_total 7.0'):
        assert line in lines, line


def test_prefix_caching_off_and_no_pool():
    """With prefix caching off the info label says False; a tensor model has no pool, so there is
    no cache configuration to describe, while the usage gauges and counters still read zero."""
    off = scrape(Metrics(lambda: 1, 1, FakeStats(replace(FIRST, prefix_caching=False)), model_name="tiny"))
    assert one(off, "vllm:cache_config_info", "gauge", "vllm:cache_config_info",
               {"block_size": "16", "num_gpu_blocks": "64", "enable_prefix_caching": "False"}) == 1
    none = scrape(Metrics(lambda: 1, 1, model_name="m"))
    assert "vllm:cache_config_info" not in none
    assert one(none, "vllm:kv_cache_usage_perc", "gauge", "vllm:kv_cache_usage_perc", {"model_name": "m"}) == 0
    assert one(none, "vllm:num_preemptions", "counter", "vllm:num_preemptions_total", {"model_name": "m"}) == 0

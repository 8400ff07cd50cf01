"""Prometheus metrics of one server, in its own registry (two apps in one process never collide).

Besides dscluster's own names, generation is also reported under vLLM's names (vllm/v1/metrics),
with a `model_name` label, so that dashboards written for vLLM and the endpoint pickers that read
them (the Gateway API Inference Extension's, llm-d's, vLLM's production-stack router: they read
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` and `vllm:cache_config_info`) work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from dscluster.engine.api import GenerationStats

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, ranks_alive: Callable[[], int], world_size: int,
                 generation_stats: Callable[[], GenerationStats] = GenerationStats, model_name: str = "model"):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dscluster_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("dscluster_request_latency_seconds", "end-to-end request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("dscluster_queue_time_seconds", "time a request waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dscluster_queue_depth", "requests waiting for a batch", registry=r)
        self.batch_size = Histogram("dscluster_batch_size",
                                    "requests per executed predict batch, or per generation step", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.forward_time = Histogram("dscluster_forward_seconds",
                                      "time to execute one predict batch or one generation step on all ranks",
                                      ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("dscluster_time_to_first_token_seconds",
                                             "from a generation request's arrival to its first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests_running = Gauge("dscluster_requests_running", "generation requests in the running batch",
                                      registry=r)
        self.requests_running.set_function(lambda: float(generation_stats().running))
        self.requests_waiting = Gauge("dscluster_requests_waiting", "generation requests waiting to join",
                                      registry=r)
        self.requests_waiting.set_function(lambda: float(generation_stats().waiting))
        self.prompt_tokens = Counter("dscluster_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("dscluster_generated_tokens", "tokens generated", registry=r)
        self.ranks_alive = Gauge("dscluster_ranks_alive", "ranks that answered the last heartbeat", registry=r)
        self.ranks_alive.set_function(lambda: float(ranks_alive()))
        self.world_size = Gauge("dscluster_world_size", "ranks in the group", registry=r)
        self.world_size.set(world_size)
        self.vllm = VLLMMetrics(r, model_name, generation_stats)
        r.register(KVCacheCollector(generation_stats, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class VLLMMetrics:
    """vLLM's metric names for the same measurements (a `model_name` label on each)."""

    def __init__(self, r: CollectorRegistry, model_name: str, stats: Callable[[], GenerationStats]):
        label = {"model_name": model_name}

        def gauge(name: str, doc: str, value: Callable[[GenerationStats], float]) -> None:
            g = Gauge(name, doc, list(label), registry=r)
            g.labels(**label).set_function(lambda: float(value(stats())))

        gauge("vllm:num_requests_running", "requests in the running batch", lambda s: s.running)
        gauge("vllm:num_requests_waiting", "requests waiting to join the running batch", lambda s: s.waiting)

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS):
            return Histogram(name, doc, list(label), buckets=buckets, registry=r).labels(**label)

        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds", "time to first token")
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds", "time between two tokens")
        self.e2e_request_latency = histogram("vllm:e2e_request_latency_seconds", "arrival to last token")
        self.request_queue_time = histogram("vllm:request_queue_time_seconds",
                                            "arrival to joining the running batch")
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prompt tokens processed", list(label),
                                     registry=r).labels(**label)
        self.generation_tokens = Counter("vllm:generation_tokens", "tokens generated", list(label),
                                         registry=r).labels(**label)
        self._success = Counter("vllm:request_success", "requests finished, by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name

    def success(self, reason: str):
        return self._success.labels(model_name=self.model_name, finished_reason=reason)


class KVCacheCollector:
    """The key-value cache pool's gauges and counters, under dscluster's names and vLLM's.

    The engine thread owns these numbers and keeps its counters' totals, so they are read at scrape
    time from one snapshot (every value of a scrape comes from the same moment) rather than pushed
    into prometheus_client's Counter, which only takes increments. CounterMetricFamily appends
    `_total` itself: `vllm:num_preemptions` is exposed as `vllm:num_preemptions_total`, as vLLM's
    Counter of that name is."""

    def __init__(self, stats: Callable[[], GenerationStats], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def describe(self) -> list[Metric]:
        """The names, for the registry's collision check, without asking the engine."""
        return self.families(GenerationStats())

    def collect(self) -> list[Metric]:
        return self.families(self.stats())

    def families(self, s: GenerationStats) -> list[Metric]:
        out: list[Metric] = []

        def ours(family: type[Metric], name: str, doc: str, value: float) -> None:
            out.append(family(name, doc, value=value))

        def vllm(family: type[Metric], names: tuple[str, ...], doc: str, value: float) -> None:
            for name in names:                  # vLLM's current name, then its older one
                metric = family(name, doc, labels=["model_name"])
                metric.add_metric([self.model_name], value)
                out.append(metric)

        usage_doc = "KV-cache usage: blocks held by running requests over blocks in the pool (1 means full)"
        ours(GaugeMetricFamily, "dscluster_kv_cache_usage", usage_doc, s.kv_usage)
        ours(GaugeMetricFamily, "dscluster_kv_cache_bytes", "bytes of the KV-cache pool on rank 0", s.kv_bytes)
        ours(GaugeMetricFamily, "dscluster_kv_cache_used_bytes",
             "bytes of the KV-cache blocks held by running requests on rank 0", s.kv_used_bytes)
        ours(CounterMetricFamily, "dscluster_preemptions", "running requests sent back to wait for free blocks "
             "(recomputed when they rejoin)", s.preemptions)
        ours(CounterMetricFamily, "dscluster_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
             s.prefix_queries)
        ours(CounterMetricFamily, "dscluster_prefix_cache_hits", "prompt tokens found in the prefix cache "
             "(not computed again)", s.prefix_hits)

        vllm(GaugeMetricFamily, ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), usage_doc, s.kv_usage)
        vllm(CounterMetricFamily, ("vllm:num_preemptions",), "cumulative number of preemptions", s.preemptions)
        vllm(CounterMetricFamily, ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
             "prefix cache queries, in queried tokens", s.prefix_queries)
        vllm(CounterMetricFamily, ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
             "prefix cache hits, in cached tokens", s.prefix_hits)
        if s.num_blocks:                        # no pool (a tensor model): no cache to describe
            # An info metric as vLLM writes it: a gauge fixed at 1, its labels the values, booleans
            # spelled as Python's str() spells them. vLLM puts no model_name on it.
            info = GaugeMetricFamily("vllm:cache_config_info", "information of the KV-cache configuration",
                                     labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"])
            info.add_metric([str(s.block_size), str(s.num_blocks), str(bool(s.prefix_caching))], 1)
            out.append(info)
        return out

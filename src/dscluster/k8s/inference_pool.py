"""`--inference-pool`: a Gateway API Inference Extension InferencePool (inference.networking.k8s.io/v1)
over the serving pods, for gateways that route LLM traffic (GAIE, llm-d).

The pool selects the pods that answer HTTP: a Deployment's pods, a LeaderWorkerSet's leaders
(`leaderworkerset.sigs.k8s.io/worker-index: "0"`; the workers serve nothing) and names the HTTP
port as its target port. The gateway asks the pool's endpoint picker (EPP) which pod gets each
request; it is deployed from the GAIE release (its Helm chart or manifests) with this pool's name,
and the pool names its Service (`--epp-service`, default `<name>-epp`, gRPC port `--epp-port` 9002).

The picker scrapes each pod's `/metrics` (the rendered server lets it through without an API key)
and reads vLLM's names, which dscluster exports: `vllm:num_requests_waiting` (queue length),
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (KV-cache utilisation) and
`vllm:cache_config_info` (block size, blocks). LoRA adapters' `vllm:lora_requests_info` is absent:
dscluster serves no adapters, and the picker then routes on queue and cache alone.
"""

from __future__ import annotations

import argparse

from dscluster.k8s import common as c

API_VERSION = "inference.networking.k8s.io/v1"
PICKER_METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def epp_service(opts: argparse.Namespace) -> str:
    return opts.epp_service or f"{opts.name}-epp"


def inference_pool(opts: argparse.Namespace, serving_pods: dict[str, str]) -> c.Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": "InferencePool",
        "metadata": c.meta(opts, opts.name),
        "spec": {
            "selector": {"matchLabels": dict(serving_pods)},
            "targetPorts": [{"number": opts.port}],
            "endpointPickerRef": {"kind": "Service", "name": epp_service(opts), "port": {"number": opts.epp_port},
                                  "failureMode": "FailClose"},
        },
    }

"""`--download REPO`: a Job that fills the checkpoint PVC from the Hugging Face Hub, and the wait that
keeps rank pods from starting before it has.

The Job runs the image's `hf download` (huggingface_hub's command, installed with transformers) for
the safetensors weights, the JSON files (config, weight index, tokenizer) and a sentencepiece
`tokenizer.model` only: repositories often also carry the same weights as PyTorch `.bin` or
`original/*.pth`, which would double the download and the volume. A Hugging Face token comes from
a Secret (`--hf-token-secret`, key `token`) for gated models. When every file is there it writes
`<model>/.dscluster-complete`; run again on a filled volume it does nothing.

Every rank pod gets an init container that waits for that marker, so the manifests can be applied
in one go: the ranks start once the weights are complete, instead of crash-looping on a missing or
half-copied model (and an init container's wait does not count against the startup probe's loading
budget).
"""

from __future__ import annotations

import argparse
import shlex

from dscluster.k8s import common as c

COMPLETE_MARKER = ".dscluster-complete"
HF_TOKEN_SECRET_KEY = "token"
INCLUDE = ("*.safetensors", "*.json", "tokenizer.model")


def job_name(opts: argparse.Namespace) -> str:
    return f"{opts.name}-download"


def download_command(opts: argparse.Namespace) -> list[str]:
    cmd = ["hf", "download", opts.download]
    if opts.revision:
        cmd += ["--revision", opts.revision]
    for pattern in INCLUDE:
        cmd += ["--include", pattern]
    return cmd + ["--local-dir", opts.model]


def _script(opts: argparse.Namespace) -> str:
    marker = shlex.quote(f"{opts.model}/{COMPLETE_MARKER}")
    return (f"set -e; if [ -e {marker} ]; then echo {shlex.quote(opts.model)} is complete; exit 0; fi; "
            f"{shlex.join(download_command(opts))}; touch {marker}")


def download_job(opts: argparse.Namespace) -> c.Obj:
    env: list[c.Obj] = [{"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if opts.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": opts.hf_token_secret,
                                                                       "key": HF_TOKEN_SECRET_KEY}}})
    container = {
        "name": "download",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bash", "-c", _script(opts)],
        "env": env,
        "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "volumeMounts": [{"name": c.CHECKPOINT_VOLUME, "mountPath": c.CHECKPOINT_MOUNT}],
    }
    spec: c.Obj = {"restartPolicy": "OnFailure", "containers": [container],
                   "volumes": [{"name": c.CHECKPOINT_VOLUME,
                                "persistentVolumeClaim": {"claimName": c.pvc_name(opts)}}]}
    if opts.toleration:
        spec["tolerations"] = [c.parse_toleration(t) for t in opts.toleration]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": c.meta(opts, job_name(opts)),
        # hf download resumes what an earlier try left; a few retries ride out the Hub's hiccups
        "spec": {"backoffLimit": 4, "template": {"metadata": {"labels": c.common_labels(opts)}, "spec": spec}},
    }


def wait_container(opts: argparse.Namespace) -> c.Obj:
    """The init container of every rank pod with --download: until the Job's marker is there."""
    marker = shlex.quote(f"{opts.model}/{COMPLETE_MARKER}")
    wait = (f"until [ -e {marker} ]; do echo waiting for job/{job_name(opts)} to fill {shlex.quote(opts.model)}; "
            "sleep 10; done")
    return {
        "name": "wait-for-model",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bash", "-c", wait],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [{"name": c.CHECKPOINT_VOLUME, "mountPath": c.CHECKPOINT_MOUNT, "readOnly": True}],
    }

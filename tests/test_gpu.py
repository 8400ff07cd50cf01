"""The GPU path for real: one GPU in float32 and bfloat16, the weights read straight onto it,
sampling with CUDA generators, an import-spec model, tensor parallelism and ZeRO-3 over two GPUs,
two ranks on one GPU refused. Skipped where no CUDA GPU is visible (the suite hides GPUs unless
DSCLUSTER_GPU_TESTS=1, which `make gpu-check` sets); tests/test_gpu_paths.py covers the same
paths with CUDA mocked.

`DSCLUSTER_GPU_TESTS_ON_CPU=1` runs these same tests with the CPU standing in for the GPU (the
ones that need a real GPU skip): a dry run of their logic on a machine without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from dscluster.cluster.launch import free_port
from dscluster.engine.api import GenerationRequest, SamplingParams
from dscluster.engine.client import open_engine
from dscluster.engine.sampling import RequestSampler

from bfloat16_reference import check_bfloat16_against_float32  # tests/bfloat16_reference.py

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from servers import RemoteServer  # noqa: E402  (tests/e2e/servers.py)

ON_CPU = os.environ.get("DSCLUSTER_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cpu") if ON_CPU else torch.device("cuda", 0)
GPUS = 0 if ON_CPU or not torch.cuda.is_available() else torch.cuda.device_count()

pytestmark = pytest.mark.skipif(not ON_CPU and GPUS == 0, reason="no CUDA GPU visible (the suite hides GPUs "
                                "unless DSCLUSTER_GPU_TESTS=1; make gpu-check sets it)")
needs_real_gpu = pytest.mark.skipif(ON_CPU, reason="needs a real GPU, not the CPU standing in for one")
two_gpus = pytest.mark.skipif(not ON_CPU and GPUS < 2, reason=f"needs 2 GPUs, {GPUS} visible")

PROMPTS = [(1, 614, 15, 591, 4, 788, 366, 473), (1, 20, 30), (1, *range(500, 530))]


def greedy(engine, tokens: int = 16) -> list[list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in engine.generate([GenerationRequest(p, params) for p in PROMPTS])]


def cache_while_generating(engine) -> set[tuple[str, torch.dtype]]:
    """(device type, dtype) of every key/value cache tensor, seen while requests run."""
    seen = set()

    def look(index: int, token: int) -> bool:
        cache = engine.runtime.batch.pool
        seen.update((t.device.type, t.dtype) for t in [*cache.keys.values(), *cache.values.values()])
        return True

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.generate([GenerationRequest(p, params) for p in PROMPTS], on_token=look)
    return seen


def on_device(module: torch.nn.Module) -> bool:
    return all(p.device.type == DEVICE.type for p in module.parameters())


@pytest.fixture(scope="module")
def cpu_reference(tiny):
    return open_engine(tiny, dtype="float32", device="cpu", max_num_seqs=4)


def test_float32_on_one_gpu_gives_the_cpus_greedy_tokens(tiny, cpu_reference):
    engine = open_engine(tiny, dtype="float32", device=DEVICE, max_num_seqs=4)
    module = engine.runtime.model.module
    assert on_device(module) and all(p.dtype == torch.float32 for p in module.parameters())
    assert greedy(engine) == greedy(cpu_reference)
    assert cache_while_generating(engine) == {(DEVICE.type, torch.float32)}
    ids = torch.tensor(PROMPTS[0])
    (logits,) = engine.predict([ids])
    (want,) = cpu_reference.predict([ids])
    assert logits.device.type == "cpu" and torch.allclose(logits, want, atol=1e-4, rtol=1e-4)


def test_bfloat16_on_one_gpu(tiny):
    """Logits within bfloat16's bound of float32's, greedy tokens equal up to near ties
    (tests/bfloat16_reference.py: the bound, and the wrong kernels it catches)."""
    engine = open_engine(tiny, dtype="bfloat16", device=DEVICE, max_num_seqs=4)
    assert on_device(engine.runtime.model.module)
    assert all(p.dtype == torch.bfloat16 for p in engine.runtime.model.module.parameters())
    found = check_bfloat16_against_float32(engine, tiny)
    print(f"bfloat16 on {DEVICE}: largest logit error {found['largest_error']:.2%} of the largest logit, "
          f"{found['compared_steps']} greedy steps compared")
    assert cache_while_generating(engine) == {(DEVICE.type, torch.bfloat16)}


@needs_real_gpu
def test_weights_go_straight_to_the_gpu(tiny):
    """No host copy of the model: transformers' from_pretrained (which builds it on the host) is
    never called, and the GPU holds the weights."""
    import gc

    import transformers

    gc.collect()  # earlier tests' engines freed now, not while this one loads
    before = torch.cuda.memory_allocated(DEVICE)
    with mock.patch.object(transformers.AutoModelForCausalLM, "from_pretrained",
                           side_effect=AssertionError("from_pretrained loads on the host")):
        engine = open_engine(tiny, dtype="float32", device=DEVICE)
    module = engine.runtime.model.module
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    assert on_device(module) and torch.cuda.memory_allocated(DEVICE) - before >= weights


def test_sampling_draws_from_a_generator_on_the_logits_device(tiny):
    logits = torch.randn(1024, device=DEVICE)
    sampler = RequestSampler(SamplingParams(temperature=0.8, top_p=0.9, seed=5))
    token = sampler.choose(sampler.process(logits))
    assert 0 <= token < 1024 and sampler.generator(DEVICE).device.type == DEVICE.type
    engine = open_engine(tiny, dtype="float32", device=DEVICE, max_num_seqs=4)

    def sampled(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        return engine.generate([GenerationRequest(PROMPTS[1], params)])[0].token_ids

    first = sampled(11)
    assert len(first) == 12 and sampled(11) == first      # a seed gives the same tokens again
    assert len({tuple(sampled(s)) for s in range(12, 16)} | {tuple(first)}) > 1


def test_import_spec_model_on_one_gpu():
    engine = open_engine("dscluster.examples.linear:build_mlp", device=DEVICE)
    reference = open_engine("dscluster.examples.linear:build_mlp", device="cpu")
    assert on_device(engine.runtime.model.module)
    inputs = [torch.linspace(-1, 1, 10), torch.ones(10)]
    got, want = engine.predict(inputs), reference.predict(inputs)
    assert all(g.device.type == "cpu" and torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))


@needs_real_gpu
def test_two_ranks_on_one_gpu_exit_2_in_one_line(tiny):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"}
    proc = subprocess.run([sys.executable, "-m", "dscluster", "serve", tiny, "--nproc", "2", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "share one GPU" in line]
    assert lines and all("NCCL needs a GPU per rank" in line for line in lines), proc.stderr[-3000:]


def completions(server: RemoteServer, tokens: int = 16) -> list[str]:
    """Greedy completions of PROMPTS over HTTP."""
    texts = []
    with server.client() as client:
        for prompt in PROMPTS:
            r = client.post("/v1/completions", json={"prompt": list(prompt), "max_tokens": tokens, "temperature": 0,
                                                     "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == tokens
            texts.append(r.json()["choices"][0]["text"])
    return texts


@two_gpus
@pytest.mark.parametrize("engine", ["tp", "zero3"])
def test_two_gpus_serve_the_one_gpu_tokens(tiny, engine):
    with RemoteServer(tiny, "--engine", engine, "--dtype", "float32", nproc=2) as split, \
         RemoteServer(tiny, "--dtype", "float32", nproc=1) as whole:
        assert completions(split) == completions(whole)

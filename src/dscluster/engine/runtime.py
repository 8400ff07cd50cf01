"""What every rank holds, the `Runtime` (the split model, its running generation batch, the control
channel and the liveness monitor), and how a rank builds it: join the group, check the model, load
its share, wait for every rank.

Rank 0 drives the runtime through its `Engine` (engine/client.py); every other rank runs it in the
worker loop (engine/worker.py). Both run the same units, identically, in the same order.
"""

from __future__ import annotations

import logging

import torch

from dscluster.cluster.group import Groups, init_groups, single_rank_device, store_prefix
from dscluster.cluster.rendezvous import Rendezvous
from dscluster.engine.api import GenerationLimits, ModelInfo
from dscluster.engine.batch import RunningBatch, StepOutput
from dscluster.engine.control_socket import open_link
from dscluster.engine.exits import exit_group_broken
from dscluster.engine.kv_blocks import BLOCK_SIZE
from dscluster.engine.kv_budget import activation_estimate, kv_cache_budget
from dscluster.engine.loading import LoadedModel, open_model
from dscluster.engine.options import RuntimeOptions, resolve_limits
from dscluster.engine.parallel import (
    ParallelModel,
    choose_engine,
    load_split,
    prepare,
    release_shared_memory,
    use_accelerator,
)
from dscluster.engine.protocol import ControlChannel, Message, StepPlan
from dscluster.engine.threads import openmp_wait, torch_threads
from dscluster.errors import UsageError

log = logging.getLogger(__name__)


class Runtime:
    """What every rank holds: the split model, the running generation batch, the control channel
    and the liveness monitor."""

    def __init__(self, options: RuntimeOptions, loaded: LoadedModel, model: ParallelModel,
                 groups: Groups | None, monitor=None, device: torch.device | None = None,
                 channel: ControlChannel | None = None):
        self.options = options
        self.loaded = loaded
        self.model = model
        self.groups = groups
        self.monitor = monitor
        self.rank = groups.rank if groups else 0
        self.world_size = groups.world_size if groups else 1
        # where the model's parameters, the key/value cache and every step's inputs live
        self.device = device or (groups.device if groups else torch.device("cpu"))
        self.channel = channel          # None on a lone rank
        self.micro_batches = model.micro_batches
        tok = loaded.tokenizer
        self.pad_id = 0
        self.eos_ids: tuple[int, ...] = ()
        if tok is not None:
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        eos = getattr(getattr(loaded.module, "generation_config", None), "eos_token_id", None)
        if eos is None and tok is not None:
            eos = tok.eos_token_id
        if eos is not None:
            self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        self.batch: RunningBatch | None = None
        self.limits = GenerationLimits(options.max_num_seqs, options.max_num_batched_tokens, None)
        self.block_bytes = 0            # one block of the key/value pool, over every layer, on this rank
        if loaded.kind == "causal-lm":
            self.limits = resolve_limits(options, loaded.max_context)
            self.batch = RunningBatch(model.module, self.device, self.limits.max_model_len, model.pipeline,
                                      micro_batches=self.micro_batches)
            if self.batch.unsupported:
                log.warning("generation is off for this model: %s", self.batch.unsupported)
            else:
                self._allocate_pool()
        self.step_failed = False        # this rank's last generation step raised (said in the next header)
        # Torch threads for predict units and for generation steps (engine/threads.py): rank 0
        # leaves a core to its front end for the first, and gives generation every core.
        self.threads: tuple[int, int] | None = None

    def _allocate_pool(self) -> None:
        """Size this rank's key/value pool from the memory it runs in (engine/kv_budget.py) after one
        step of the largest size has run (its activations and what a token costs here are then
        known), agree with every rank on the smallest block count, and allocate it. Exits 2 on
        every rank when the pool cannot hold one request of --max-model-len."""
        options, limits = self.options, self.limits
        tokens = min(limits.max_num_batched_tokens, limits.max_model_len)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        per_token = self.batch.probe(tokens)
        if self.device.type == "cuda":
            activation = torch.cuda.max_memory_allocated(self.device) - before
            torch.cuda.empty_cache()
        else:
            activation = activation_estimate(getattr(self.loaded.module, "config", None), tokens, self.loaded.dtype)
        budget, source = kv_cache_budget(self.device, kv_cache_memory=options.kv_cache_memory,
                                         gpu_memory_utilization=options.gpu_memory_utilization,
                                         activation=activation)
        self.block_bytes = per_token * BLOCK_SIZE
        # A rank may hold no key/value heads at all (AutoTP over more ranks than heads): its pool
        # costs nothing and the other ranks' decide.
        blocks = budget // self.block_bytes if self.block_bytes else 2**40
        if options.num_kv_blocks is not None:
            blocks, source = options.num_kv_blocks, "--num-kv-blocks"
        if self.groups is not None and self.world_size > 1:
            agreed = torch.tensor([blocks], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            blocks = int(agreed.item())
        needed = -(-limits.max_model_len // BLOCK_SIZE)
        if blocks < needed:
            raise UsageError(
                f"the key/value cache holds {blocks * BLOCK_SIZE} tokens ({blocks} blocks of {BLOCK_SIZE}) on the "
                f"smallest rank, fewer than one request of --max-model-len {limits.max_model_len} needs: lower "
                "--max-model-len, give each rank more memory (--kv-cache-memory, --gpu-memory-utilization, the "
                "memory limit) or split the model over more ranks")
        self.batch.allocate_pool(blocks, BLOCK_SIZE)
        log.info("rank %d: KV cache: %d tokens (%d blocks of %d, %.2f GiB; %s, %d bytes per token); maximum "
                 "concurrency for %d tokens per request: %.2fx", self.rank, blocks * BLOCK_SIZE, blocks, BLOCK_SIZE,
                 blocks * self.block_bytes / 2**30, source, per_token, limits.max_model_len,
                 blocks * BLOCK_SIZE / limits.max_model_len)

    def info(self) -> ModelInfo:
        lm = self.loaded
        return ModelInfo(name=self.options.served_model_name or lm.name, kind=lm.kind, engine=self.model.engine,
                         world_size=self.world_size, dtype=lm.dtype, pipeline_parallel=self.options.pp,
                         max_context=self.limits.max_model_len or lm.max_context,
                         vocab_size=lm.vocab_size, input_dtype=lm.input_dtype, input_shape=lm.input_shape,
                         tokenizer=lm.tokenizer, eos_ids=self.eos_ids,
                         generation_unsupported=self.batch.unsupported if self.batch else None,
                         extra={"description": self.model.description})

    # -- the units of work, identical on every rank ----------------------------------------
    def _use_threads(self, generating: bool) -> None:
        if self.threads is not None and torch.get_num_threads() != self.threads[generating]:
            torch.set_num_threads(self.threads[generating])

    @torch.no_grad()
    def run_predict(self, batch: torch.Tensor) -> torch.Tensor:
        self._use_threads(False)
        x = batch.to(self.device)
        if self.model.pipeline is not None:   # logits on rank 0 (from the last stage), nothing elsewhere
            out = self.model.pipeline.forward(x)
            if out is None:
                return torch.empty(0)
        elif self.loaded.kind == "causal-lm":
            out = self.model.module(input_ids=x).logits
        elif self.loaded.hf:
            out = self.model.module(**{self.loaded.input_name: x})
            logits = getattr(out, "logits", None)  # a head's output, else the first (hidden states)
            out = logits if logits is not None else out[0]
        else:
            out = self.model.module(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
        return out.detach().to("cpu")

    def run_step(self, plan: StepPlan) -> StepOutput:
        """Apply one generation step to the running batch and run its forward pass. The row count
        the next header is sized by is settled before anything can fail; a failure is remembered
        for the next header, and re-raised."""
        if self.batch is None:
            raise RuntimeError(f"{self.loaded.name} is not a causal language model")
        if self.channel is not None and 0 <= plan.micro_batch < len(self.channel.rows):
            self.channel.rows[plan.micro_batch] = self.batch.rows_after(plan)
        self._use_threads(True)
        try:
            return self.batch.step(plan)
        except Exception:
            self.step_failed = True
            raise

    def before_message(self) -> None:
        """Put this rank's failed-step flag into the next header (said once)."""
        if self.channel is not None:
            self.channel.step_failed, self.step_failed = self.step_failed, False

    def after_message(self, message: Message) -> bool:
        """A generation step failed somewhere: every rank drops the running batch now. True if so."""
        if not message.failed:
            return False
        log.warning("rank %d: a generation step failed on %d rank(s); dropping the running batch",
                    self.rank, message.failed)
        self.reset_generation()
        return True

    def reset_generation(self) -> None:
        if self.batch is not None:
            self.batch.reset()
        if self.channel is not None:
            self.channel.rows = [0] * len(self.channel.rows)

    def close(self) -> None:
        """Stop watching the peers, then close the control channel (after STOP, rank 0 waits until
        every worker closed its end, so no worker sees rank 0 go before it read the STOP)."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.channel is not None:
            self.channel.close()


# ------------------------------------------------------------------------------------------
# Building it


def set_threads(local_world_size: int, runs_front_end: bool = False) -> int:
    """Torch threads per rank (engine/threads.py: the policy and why): OMP_NUM_THREADS if a launcher
    set it, else the cores split evenly, less one for rank 0's front end."""
    threads = torch_threads(local_world_size, runs_front_end)
    torch.set_num_threads(threads)
    return threads


def build_runtime(options: RuntimeOptions, rdzv: Rendezvous) -> Runtime:
    """Join the group, check the model, load this rank's share of it onto its device, and wait
    until every rank has done the same.

    The model and its checkpoint are checked once the group has formed and before any collective:
    every rank reads the same files, so a bad checkpoint makes every rank exit 2 with the same
    message at once (a rank alone with a bad copy exits 2 and the others notice it is gone). The
    check comes after the rendezvous so that it never delays noticing a rank that never arrives,
    and a peer lost while this rank is still checking is acted on only after its own verdict: a
    rank whose model is bad says so, rather than that rank 0 (which hosts the store) left first."""
    threads = set_threads(rdzv.local_world_size, runs_front_end=rdzv.rank == 0)
    generation_threads = torch_threads(rdzv.local_world_size, runs_front_end=False)
    if rdzv.rank == 0:
        # Rank 0 computes on its front end's engine thread from now on (Runtime._use_threads sets
        # the counts there). OpenMP work done on this thread with more threads would leave a second
        # thread team behind, and libgomp then throttles every team's spinning: measured, a step
        # took 120 ms on two threads instead of 66 ms. So this thread loads on one.
        torch.set_num_threads(1)
    log.info("rank %d: %d torch thread(s) (%d while generating), %s", rdzv.rank, threads, generation_threads,
             openmp_wait())
    groups = monitor = None
    engine_ref: dict = {}               # rank 0: its Engine, once made (engine/client.py make_engine)
    checking: dict = {"active": True, "failure": None}
    if rdzv.world_size == 1:
        device = single_rank_device(options.backend)
    else:
        from dscluster.engine.liveness import LivenessMonitor

        groups = init_groups(rdzv, options.backend, timeout_s=options.collective_timeout,
                             rendezvous_timeout_s=options.rendezvous_timeout)
        device = groups.device

        def on_failure(reason: str) -> None:
            if checking["active"]:
                checking["failure"] = checking["failure"] or reason
                return
            if rdzv.rank == 0 and "engine" in engine_ref:
                engine_ref["engine"].on_liveness_failure(reason)
            else:
                exit_group_broken(reason, rdzv.rank)

        monitor = LivenessMonitor(rdzv.master_addr, rdzv.master_port, rdzv.rank, rdzv.world_size,
                                  options.heartbeat_interval, options.heartbeat_timeout, on_failure,
                                  prefix=store_prefix())
        monitor.start()
        use_accelerator(device)  # before `prepare` first imports DeepSpeed (a lone rank never uses it)
    source = open_model(options.model, options.dtype, options.checkpoint, device=device)
    prepared = prepare(source, choose_engine(options.engine, source, rdzv.world_size), rdzv.world_size,
                       pp=options.pp, rank=rdzv.rank)
    checking["active"] = False
    if checking["failure"]:
        exit_group_broken(checking["failure"], rdzv.rank)
    loaded, model = load_split(prepared, device, options.zero3_persistence_threshold)
    channel = None
    if monitor is not None:
        monitor.mark_ready()
        monitor.wait_all_ready()
        release_shared_memory(rdzv.rank)
        channel = open_channel(groups, options, model.micro_batches)
    runtime = Runtime(options, loaded, model, groups, monitor, device=device, channel=channel)
    runtime.threads = (threads, generation_threads)
    runtime.engine_ref = engine_ref
    held = [getattr(p, "ds_tensor", p) for p in model.module.parameters()]  # a ZeRO-3 partition, or the shard
    log.info("rank %d ready: %s; holds %d parameters (%.1f MiB)", rdzv.rank, model.description,
             sum(t.numel() for t in held), sum(t.numel() * t.element_size() for t in held) / 2**20)
    return runtime


def open_channel(groups: Groups, options: RuntimeOptions, micro_batches: int = 1) -> ControlChannel:
    """Connect the control channel's sockets (engine/control_socket.py). Done once every rank has
    loaded, so that the liveness monitor watches the peers meanwhile and the connections never sit
    idle through a long load; bounded by the rendezvous timeout. Waits for a peer are bounded by the
    heartbeat timeout, as the heartbeats keep an idle group talking."""
    rdzv = groups.rdzv
    link = open_link(groups.store, f"{store_prefix()}/control", rdzv.rank, rdzv.world_size, rdzv.master_addr,
                     timeout=options.heartbeat_timeout, setup_timeout=options.rendezvous_timeout)
    return ControlChannel(link, rdzv.rank, micro_batches)

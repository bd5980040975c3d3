"""The learner's DeepSpeed engine and the helpers that run a pass where the model lives.

:func:`build_engine` wraps the policy in :class:`Scorer` (whose forward is the whole log-prob pass,
or a loss of it with its gradient) and hands it to DeepSpeed with the ZeRO section of
:func:`zero_section`; :func:`stats_on_device` and :func:`loss_on_device` run the fused log-prob pass
(:mod:`rlkit.logprobs`) on the model's device with batches and losses on the CPU;
:func:`load_frozen` loads a reference or teacher model. Used by :mod:`rlkit.workers.learner`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

import torch

from rlkit import attention
from rlkit.config import LearnerConfig
from rlkit.logprobs import split_lm, token_loss, token_stats
from rlkit.types import TrainBatch

if TYPE_CHECKING:
    from rlkit.workers.learner import LearnerSpec


def patch_deepspeed_shm() -> None:
    """Skip DeepSpeed's shm-comm JIT build on CPU (70-80 s cold); collectives then go via gloo."""
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    # `import deepspeed.comm.torch as m` would give the real torch module (name shadowing).
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def zero_section(stage: int, world: int, offload_optimizer: bool = False, offload_params: bool = False,
                 pin: bool = False) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section for ``learner.zero_stage`` on ``world`` ranks.

    ZeRO-2 partitions gradients over the ranks: after every backward DeepSpeed copies each gradient
    into a bucket, reduces the bucket and copies this rank's part into a flat partition
    (``reduce_independent_p_g_buckets_and_remove_grads``, ``copy_grads_in_partition`` in
    deepspeed/runtime/zero/stage_1_and_2.py). On one rank there is nothing to partition or reduce,
    and those copies are overhead: about 0.5 s per micro-batch for SmolLM2's 135M fp32 parameters
    on 2 CPU threads. One rank therefore runs stage 1, the same optimizer (the same flat fp32
    partition, overflow check, gradient norm and checkpoint files, so checkpoints load either way),
    where autograd accumulates the micro-batches' gradients in place and the step flattens them
    once; ``contiguous_gradients`` off skips stage 1's copy of every gradient into a contiguous
    buffer as well, and :func:`one_rank_reduce` its all-reduce of one member. Stage 0 and 3, and
    several ranks, are as configured.

    ``offload_optimizer`` (ZeRO ≥ 1) keeps the fp32 partitions and Adam's states in host memory
    and steps them there (ZeRO-Offload, Ren et al. 2021, arXiv:2101.06840); ``offload_params``
    (ZeRO-3) keeps the weight shards there between uses. ``pin`` pins those host buffers (CUDA).
    """
    section: dict[str, Any] = {"stage": stage}
    if world == 1 and stage in (1, 2):
        section = {"stage": 1, "contiguous_gradients": False}
    if offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return section


def one_rank_reduce(engine) -> bool:
    """Make the ZeRO optimizer's gradient all-reduce a no-op where its group has one rank.

    Stage 1 reduces the accumulated gradients once per step (``allreduce_and_copy`` in
    deepspeed/runtime/zero/stage_1_and_2.py): it flattens them into one buffer, divides it by the
    world size, all-reduces it and copies every gradient back. On one rank each of those is the
    identity (a copy, a division by 1, a one-member collective), and for SmolLM2's 135M fp32
    gradients on 2 CPU threads they take about 0.3 s per step. The replacement keeps the one effect
    that is not the identity (adding a gradient into an output partition buffer, where DeepSpeed
    passes one) and defers to DeepSpeed for any group of several ranks. Returns whether it was
    installed (a ZeRO stage 1/2 optimizer on one rank, no sequence parallelism, no overlapped
    communication)."""
    import inspect

    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    expected = ["self", "small_bucket", "communication_data_type", "rank", "log", "divide", "process_group",
                "output_bucket"]  # the method this replaces, as in DeepSpeed 0.19; another signature: leave it
    if (not isinstance(opt, DeepSpeedZeroOptimizer) or getattr(opt, "sequence_parallel_size", 1) != 1
            or list(inspect.signature(DeepSpeedZeroOptimizer.allreduce_and_copy).parameters) != expected
            or opt.overlap_comm or dist.get_world_size(group=opt.dp_process_group) != 1):
        return False
    deepspeed_reduce = opt.allreduce_and_copy

    def allreduce_and_copy(small_bucket, communication_data_type, rank=None, log=None, divide=True,
                           process_group=None, output_bucket=None):
        group = opt.dp_process_group if process_group is None else process_group
        if dist.get_world_size(group=group) != 1:
            return deepspeed_reduce(small_bucket, communication_data_type, rank=rank, log=log, divide=divide,
                                    process_group=process_group, output_bucket=output_bucket)
        opt.one_rank_reduces = getattr(opt, "one_rank_reduces", 0) + 1
        for grad, out in zip(small_bucket, output_bucket or [None] * len(small_bucket)):
            if out is not None:
                out.add_(grad.to(out.dtype))

    opt.allreduce_and_copy = allreduce_and_copy
    return True


def lr_lambda(lc: LearnerConfig, total_steps: int):
    def f(step: int) -> float:
        if lc.warmup_steps and step < lc.warmup_steps:
            return (step + 1) / lc.warmup_steps
        if lc.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - lc.warmup_steps) / max(1, total_steps - lc.warmup_steps))
        return 1.0 - frac if lc.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


class Scorer(torch.nn.Module):
    """The policy as DeepSpeed sees it: forward = per-token log-probs (and entropy, KL) of a batch's
    response tokens through the fused kernel (:func:`rlkit.logprobs.token_stats`), or, given
    ``loss_fn``, a loss of them with its gradient from the fused loss pass (:func:`loss_on_device`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: TrainBatch, loss_fn=None, **kwargs):
        if loss_fn is not None:
            return loss_on_device(self.model, batch, loss_fn, **kwargs)
        return stats_on_device(self.model, batch, **kwargs)


def learner_device() -> torch.device:
    """CUDA when this process sees a GPU (Ray's ``num_gpus`` sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def batch_to(batch: TrainBatch, device: torch.device) -> TrainBatch:
    """``batch`` with every tensor (extras included) on ``device``; the batch itself if already there."""
    if batch.input_ids_B_L.device == device:
        return batch
    moved = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **moved, extras={k: v.to(device) for k, v in batch.extras.items()})


def stats_on_device(model: torch.nn.Module, batch: TrainBatch, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`token_stats` with the forward on ``model``'s device and the results on the batch's.

    Batches, advantages and losses stay on the CPU (they are small: B × T); the forward, the fused
    log-prob pass and their backward run where the model is. ``.to`` is differentiable, so the
    gradient of a CPU loss reaches the GPU weights.
    """
    dev = next(model.parameters()).device
    home = batch.input_ids_B_L.device
    out = token_stats(model, batch_to(batch, dev), **kwargs)
    return {k: v.to(home) for k, v in out.items()}


def loss_on_device(model: torch.nn.Module, batch: TrainBatch, loss_fn, **kwargs):
    """:func:`rlkit.logprobs.token_loss` with the forward on ``model``'s device, ``loss_fn`` on the
    batch's: it receives the stats there. Returns (loss, stats detached, aux, ProbeReport)."""
    dev = next(model.parameters()).device
    home = batch.input_ids_B_L.device
    loss, stats, aux, report = token_loss(
        model, batch_to(batch, dev), lambda st: loss_fn({k: v.to(home) for k, v in st.items()}), **kwargs)
    return loss.to(home), {k: v.to(home) for k, v in stats.items()}, aux, report


def load_frozen(model_dir: str, dtype: str, device: torch.device | None = None):
    """A frozen model (reference, teacher) in ``dtype`` on ``device`` (default: :func:`learner_device`)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    m.to(device if device is not None else learner_device())
    attention.install(m)  # CPU: tree attention over packed groups (rlkit.attention)
    m.eval().requires_grad_(False)
    return m



def build_engine(spec: LearnerSpec, world: int):
    """The DeepSpeed engine of the policy: on CUDA over NCCL when this rank has a GPU (CPU tensors
    such as the batch counts go over gloo in the same group: backend "cpu:gloo,cuda:nccl"), on
    CPU over gloo otherwise. bf16 (``model.dtype`` bfloat16, or "auto" on a GPU) keeps fp32
    master weights in the optimizer, and ``check_grad_overflow`` makes a non-finite gradient
    skip the update (``engine.was_step_applied()`` is False) exactly as in fp32."""
    cuda = torch.cuda.is_available()
    # The accelerator follows the device this rank really has, whatever the parent exported.
    os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    import deepspeed

    if not cuda:
        patch_deepspeed_shm()
    deepspeed.init_distributed(dist_backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    from transformers import AutoModelForCausalLM

    s, lc = spec, spec.learner
    bf16 = s.model.resolved_dtype(cuda) == "bfloat16"
    ds_config = {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.max_grad_norm,
        "zero_optimization": zero_section(lc.zero_stage, world, lc.offload_optimizer, lc.offload_params,
                                           pin=cuda),
        # The client optimizer below (torch's fused AdamW) also steps offloaded partitions on CPU.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    zero_init = None
    if lc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # While it lives, from_pretrained loads each rank's shard only (deepspeed.zero.Init), so
        # no rank holds the full policy. Dropped right after: the frozen reference and teacher
        # are plain replicas.
        zero_init = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=torch.float32)
    del zero_init
    attention.install(model, learner_device())  # CPU: tree attention over packed groups (rlkit.attention)
    if s.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if s.model.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if lc.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=lc.lora.r, lora_alpha=lc.lora.alpha, lora_dropout=lc.lora.dropout,
            target_modules=list(lc.lora.target_modules), task_type="CAUSAL_LM"))
    scorer = Scorer(model)
    if lc.zero_stage == 3:
        deepspeed.zero.register_external_parameter(scorer, split_lm(model)[1])
    params = [p for p in scorer.parameters() if p.requires_grad]
    # The fused kernel (one pass over all tensors) also runs on CPU: 0.58 → 0.07 s per step for
    # SmolLM2's 135M fp32 parameters here.
    opt = torch.optim.AdamW(params, lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(lc, s.total_steps))
    engine, *_ = deepspeed.initialize(model=scorer, optimizer=opt, lr_scheduler=sched, config=ds_config)
    one_rank_reduce(engine)
    return engine


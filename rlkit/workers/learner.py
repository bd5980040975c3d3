"""Learner rank: one member of a DeepSpeed ZeRO data-parallel group, as a Ray actor.

gloo on CPU (with a client torch AdamW, so nothing JIT-compiles), NCCL on GPU. Log-probs, entropy
and KL come from the fused kernel (:mod:`rlkit.logprobs`); the loss comes from the algorithm
registry. Gradient accumulation keeps the algorithm's global normalization exact: each micro-batch
loss is normalized by counts over the whole optimizer step (all micro-batches, all ranks), and
since DeepSpeed *averages* gradients over ranks, the loss is multiplied by the world size.

DeepSpeed wraps :class:`Scorer`, whose forward is the whole log-prob pass (backbone and fused LM
head). Under ZeRO-3 every rank holds a shard of each weight; the head weight is registered as an
external parameter of the Scorer, so it is gathered for the pass and its backward even though the
fused kernel reads it outside the head module. Whatever needs full weights (sync, checksums, the HF
checkpoint) gathers them group by group on every rank (:meth:`LearnerRank.full_groups`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from rlkit import algorithms
from rlkit.algorithms.base import LossInputs, PairLossInputs
from rlkit.logprobs import split_lm, token_stats
from rlkit.workers.lora_sync import LoraDelta, lora_deltas, merged_weight
from rlkit.types import TrainBatch


@dataclass
class LearnerSpec:
    model_dir: str
    algorithm: str
    algorithm_args: dict
    dtype: str = "float32"
    zero_stage: int = 2
    threads: int = 1
    micro_batch_size: int = 16
    chunk_size: int = 1024
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    updates_per_step: int = 1
    max_response_len: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    tis_cap: Optional[float] = None
    freeze_embeddings: bool = False
    gradient_checkpointing: bool = False
    lora: dict = field(default_factory=dict)
    critic_lr: float = 1e-5
    ref_dir: Optional[str] = None
    teacher_dir: Optional[str] = None
    seed: int = 0


def _patch_deepspeed_shm() -> None:
    """Skip DeepSpeed's shm-comm JIT build on CPU (70-80 s cold); collectives then go via gloo."""
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    # `import deepspeed.comm.torch as m` would give the real torch module (name shadowing).
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _lr_lambda(spec: LearnerSpec):
    def f(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - spec.warmup_steps) / max(1, spec.total_steps - spec.warmup_steps))
        return 1.0 - frac if spec.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


class Scorer(torch.nn.Module):
    """The policy as DeepSpeed sees it: forward = per-token log-probs (and entropy, KL) of a batch's
    response tokens through the fused kernel (:func:`rlkit.logprobs.token_stats`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: TrainBatch, **kwargs) -> dict[str, torch.Tensor]:
        return token_stats(self.model, batch, **kwargs)


def _full_numel(p: torch.Tensor) -> int:
    """Elements of a parameter's full tensor (ZeRO-3 keeps only a shard in ``p``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def load_frozen(model_dir: str, dtype: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    m.eval().requires_grad_(False)
    return m


class LearnerRank:
    def __init__(self, rank: int, world: int, master_addr: str, master_port: int, spec: LearnerSpec):
        self.rank, self.world, self.spec = rank, world, spec
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_SIZE="1")
        from rlkit.workers import claim_cpu

        claim_cpu(spec.threads)
        random.seed(spec.seed + rank)
        np.random.seed(spec.seed + rank)
        torch.manual_seed(spec.seed)
        self.algo = algorithms.get(spec.algorithm)
        self.algo_cfg = self.algo.make_config(spec.algorithm_args)
        self.needs = self.algo.needs(self.algo_cfg)
        self.engine = self._init_engine()
        self.ref = load_frozen(spec.ref_dir or spec.model_dir, spec.dtype) if (
            self.needs.ref_logp or self.needs.ref_full_kl or self.needs.ref_temper_phi is not None
            or self.needs.pairs) else None
        self.teacher = load_frozen(spec.teacher_dir, spec.dtype) if self.needs.teacher_logp else None
        self.critic = None
        if self.needs.values:
            from rlkit.workers.critic import Critic

            self.critic = Critic(spec.model_dir, lr=spec.critic_lr, max_grad_norm=spec.max_grad_norm, seed=spec.seed)
        self.batch: Optional[TrainBatch] = None
        self._shm = None  # shared-memory sync segments (rank 0, same-node rollout workers)
        self.version = 0
        # The sampler's truncated support, when it used top-k/top-p (log-prob contract).
        from rlkit.workers.engine import SamplingConfig

        self.truncation = (SamplingConfig(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k)
                           if spec.top_k or spec.top_p < 1.0 else None)

    def _init_engine(self):
        import deepspeed

        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        if not torch.cuda.is_available():
            _patch_deepspeed_shm()
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
        from transformers import AutoModelForCausalLM

        s = self.spec
        ds_config = {
            "train_micro_batch_size_per_gpu": s.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": s.max_grad_norm,
            "zero_optimization": {"stage": s.zero_stage},
            "bf16": {"enabled": s.dtype == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        zero_init = None
        if s.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # While it lives, from_pretrained loads each rank's shard only (deepspeed.zero.Init), so
            # no rank holds the full policy. Dropped right after: the frozen reference and teacher
            # are plain replicas.
            zero_init = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=torch.float32)
        del zero_init
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if s.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        if s.lora.get("enabled"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=s.lora["r"], lora_alpha=s.lora["alpha"], lora_dropout=s.lora["dropout"],
                target_modules=s.lora["target_modules"], task_type="CAUSAL_LM"))
        scorer = Scorer(model)
        if s.zero_stage == 3:
            deepspeed.zero.register_external_parameter(scorer, split_lm(model)[1])
        params = [p for p in scorer.parameters() if p.requires_grad]
        # The fused kernel (one pass over all tensors) also runs on CPU: 0.58 → 0.07 s per step for
        # SmolLM2's 135M fp32 parameters here.
        opt = torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay,
                                fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s))
        engine, *_ = deepspeed.initialize(model=scorer, optimizer=opt, lr_scheduler=sched, config=ds_config)
        return engine

    @property
    def policy(self) -> torch.nn.Module:
        """The HF (or PEFT) model being trained; under ZeRO-3 its parameters are shards."""
        return self.engine.module.model

    def _gathered(self, params: list[torch.Tensor]):
        """Full tensors of ``params`` for the ``with`` block (a collective under ZeRO-3)."""
        if self.spec.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def full_groups(self, group_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's full weights in HF names, in groups of about ``group_bytes``.

        The tensors are valid until the next group is requested (under ZeRO-3 each group is
        gathered from every rank for that long), and every rank must exhaust the iterator."""
        group, size = [], 0
        named = list(self.policy.named_parameters())
        for i, (name, p) in enumerate(named):
            group.append((name, p))
            size += _full_numel(p) * p.element_size()
            if size >= group_bytes or i == len(named) - 1:
                with self._gathered([q for _, q in group]):
                    yield [(n, q.detach()) for n, q in group]
                group, size = [], 0

    # ---------------------------------------------------------------- passes
    def ready(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "needs": self.needs.__dict__}

    def set_batch(self, batch: TrainBatch) -> int:
        self.batch = batch
        return batch.size

    @torch.no_grad()
    def side_passes(self) -> dict[str, torch.Tensor]:
        """Detached per-token log-probs of the stored shard under π_old, π_ref, the teacher."""
        b, s, out = self.batch, self.spec, {}
        kw = dict(temperature=s.temperature, chunk_size=s.chunk_size)
        if self.needs.old_logp and s.updates_per_step > 1:
            out["old_logp"] = self._in_micro_batches(
                lambda mb: self.engine(mb, truncation=self.truncation, **kw)["logp"])
        if self.ref is not None and (self.needs.ref_logp or self.needs.pairs):
            out["ref_logp"] = self._in_micro_batches(lambda mb: token_stats(self.ref, mb, **kw)["logp"])
        phi = self.needs.ref_temper_phi
        if phi is not None:
            # log q_φ(y) = φ·z_y − logsumexp(φ·z) with z = ref logits / T: the log-softmax at
            # temperature T/φ, i.e. the exact normalized tempered reference (spec §2.5). φ = 0 is
            # the uniform distribution over the vocabulary: −log V at every token.
            if phi > 0:
                kw_phi = dict(kw, temperature=s.temperature / phi)
                out["ref_tempered_logp"] = self._in_micro_batches(lambda mb: token_stats(self.ref, mb, **kw_phi)["logp"])
            else:
                V = self.ref.get_output_embeddings().weight.shape[0]
                out["ref_tempered_logp"] = -math.log(V) * b.response_mask_B_T
        if self.critic is not None:
            out["values"] = self._in_micro_batches(self.critic.values)
        if self.teacher is not None:
            out["teacher_logp"] = self._in_micro_batches(lambda mb: token_stats(self.teacher, mb, **kw)["logp"])
        self.batch.extras.update(out)
        return out

    def _in_micro_batches(self, fn) -> torch.Tensor:
        n, mb = self.batch.size, self.spec.micro_batch_size
        parts = [fn(self.batch.select(list(range(i, min(n, i + mb))))) for i in range(0, n, mb)]
        return torch.cat(parts, 0)

    # ---------------------------------------------------------------- update
    def train(self, advantages_B_T: Optional[torch.Tensor], controller: dict[str, float],
              returns_B_T: Optional[torch.Tensor] = None) -> dict[str, float]:
        """All optimizer steps for the stored shard; returns metrics averaged over micro-batches."""
        b = self.batch
        if advantages_B_T is not None:
            b.advantages_B_T = advantages_B_T
        if returns_B_T is not None:
            b.extras["returns"] = returns_B_T
        t0 = time.perf_counter()
        order = torch.arange(b.size)
        minis = torch.tensor_split(order, self.spec.updates_per_step)
        sums: dict[str, float] = {}
        self._grad_norms: list[float] = []
        for mini in minis:
            self._optimizer_step(b.select(mini), controller, sums)
        metrics = {k: v / max(1.0, sums.get("_count", 1.0)) for k, v in sums.items() if k != "_count"}
        if self._grad_norms:
            metrics["learn/grad_norm"] = float(np.mean(self._grad_norms))
        metrics["learn/lr"] = float(self.engine.get_lr()[0])
        metrics["learn/seconds"] = time.perf_counter() - t0
        self.version += 1
        return metrics

    def _global_counts(self, mini: TrainBatch) -> tuple[float, float, int]:
        local = torch.tensor([mini.response_mask_B_T.sum().item(),
                              float((mini.response_mask_B_T.sum(-1) > 0).sum().item())], dtype=torch.float64)
        dist.all_reduce(local)
        n_micro = torch.tensor([math.ceil(mini.size / self.spec.micro_batch_size)], dtype=torch.long)
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
        return float(local[0]), float(local[1]), int(n_micro)

    def _optimizer_step(self, mini: TrainBatch, controller: dict, sums: dict) -> None:
        tokens, seqs, n_micro = self._global_counts(mini)
        mb = self.spec.micro_batch_size
        for i in range(n_micro):
            idx = list(range(i * mb, min(mini.size, (i + 1) * mb)))
            # A rank with fewer rows still joins every collective: a zero-weight micro-batch.
            weight = 1.0 if idx else 0.0
            micro = mini.select(idx or [0])
            loss, metrics = self._micro_loss(micro, tokens, seqs, controller, weight)
            self.engine.backward(loss * weight * self.world, scale_wrt_gas=False)
            if idx:
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["_count"] = sums.get("_count", 0.0) + 1.0
        self.engine.step()
        if self.critic is not None:
            sums["learn/critic_grad_norm"] = sums.get("learn/critic_grad_norm", 0.0) + self.critic.step()
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            self._grad_norms.append(float(gn))

    def _micro_loss(self, micro: TrainBatch, tokens: float, seqs: float, controller: dict, weight: float = 1.0):
        if self.algo.kind == "preference":
            return self._pair_loss(micro, seqs / 2)
        s = self.spec
        stats = self.engine(
            micro, temperature=s.temperature, chunk_size=s.chunk_size, with_entropy=True,
            ref_model=self.ref if self.needs.ref_full_kl else None, truncation=self.truncation,
        )
        logp, mask = stats["logp"], micro.response_mask_B_T
        old = micro.extras.get("old_logp", logp.detach())
        adv = micro.advantages_B_T if micro.advantages_B_T is not None else torch.zeros_like(logp)
        metrics = _gap_metrics(micro.sampler_logp_B_T, old, mask)
        if s.tis_cap is not None:
            # Truncated IS for the sampler/learner mismatch. Losses are linear in A where unclipped,
            # so scaling A by the detached weight w = min(π_old/π_sampler, cap) equals weighting each token.
            w = torch.exp(old - micro.sampler_logp_B_T).clamp(max=s.tis_cap) * mask
            adv = adv * w
        entropy = stats["entropy"] if self.needs.entropy else stats["entropy"].detach()
        inputs = LossInputs(
            logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, num_tokens_global=tokens,
            num_seqs_global=seqs, old_logp_B_T=old, ref_logp_B_T=micro.extras.get("ref_logp"),
            ref_tempered_logp_B_T=micro.extras.get("ref_tempered_logp"),
            teacher_logp_B_T=micro.extras.get("teacher_logp"), entropy_B_T=entropy,
            ref_full_kl_B_T=stats.get("ref_full_kl"), rewards_B=micro.rewards_B,
            max_response_len=s.max_response_len, controller=controller,
        )
        loss, algo_metrics = self.algo.loss(inputs, self.algo_cfg)
        if self.critic is not None:
            inputs.values_B_T = self.critic.values(micro)
            inputs.old_values_B_T = micro.extras.get("values")
            inputs.returns_B_T = micro.extras["returns"]
            critic_loss, critic_metrics = self.algo.critic_loss(inputs, self.algo_cfg)
            # The critic is its own graph and optimizer (its gradients are all-reduced in Critic.step).
            (critic_loss * weight).backward()
            algo_metrics = {**algo_metrics, **critic_metrics}
        ent = float((stats["entropy"].detach() * mask).sum() / mask.sum().clamp(min=1))
        metrics.update({f"loss/{k}": float(v) for k, v in algo_metrics.items()})
        metrics.update({"loss/total": float(loss.detach()), "entropy/mean": ent})
        return loss, metrics

    def _pair_loss(self, micro: TrainBatch, pairs_global: float):
        """Rows come pair-major: 2p is the chosen response of pair p, 2p+1 the rejected one."""
        s = self.spec
        stats = self.engine(micro, temperature=s.temperature, chunk_size=s.chunk_size,
                            ref_model=self.ref if self.needs.ref_full_kl else None)
        logp, mask, ref = stats["logp"], micro.response_mask_B_T, micro.extras["ref_logp"]
        kl_full = stats.get("ref_full_kl")
        inputs = PairLossInputs(
            logp_c_P_T=logp[0::2], logp_r_P_T=logp[1::2], mask_c_P_T=mask[0::2], mask_r_P_T=mask[1::2],
            ref_logp_c_P_T=ref[0::2], ref_logp_r_P_T=ref[1::2], num_pairs_global=pairs_global,
            ref_full_kl_c_P_T=None if kl_full is None else kl_full[0::2],
            ref_full_kl_r_P_T=None if kl_full is None else kl_full[1::2],
        )
        loss, algo_metrics = self.algo.loss(inputs, self.algo_cfg)
        metrics = {f"loss/{k}": float(v) for k, v in algo_metrics.items()}
        metrics["loss/total"] = float(loss.detach())
        return loss, metrics

    # ---------------------------------------------------------------- weights
    # Under ZeRO-3 the methods below gather weights: the driver calls them on every rank together
    # (Runtime.on_learners) and uses rank 0's answer.
    @torch.no_grad()
    def full_state(self, bucket_bytes: int) -> dict[str, Any]:
        """Rank 0: the policy's weights in HF names, packed in buckets of about ``bucket_bytes`` and
        put in the object store once each (every rollout worker then reads the same objects).
        With LoRA only the adapters travel (:mod:`rlkit.workers.lora_sync`)."""
        import ray

        if self._is_lora():
            buckets = _pack(lora_deltas(self.policy), bucket_bytes)
        else:
            # No clone: ray.put serializes each bucket into the object store, which is the one copy
            # (made while the bucket is gathered under ZeRO-3).
            buckets = self.full_groups(bucket_bytes)
        refs, names, nbytes = [], [], 0
        for bucket in buckets:
            if self.rank == 0:
                refs.append(ray.put(bucket))
                names += [_item_name(i) for i in bucket]
                nbytes += sum(_item_bytes(i) for i in bucket)
        return {"refs": refs, "names": names, "bytes": float(nbytes)}

    @torch.no_grad()
    def shm_state(self, tag: str, group_bytes: int = 64 * 2**20) -> dict[str, Any]:
        """Rank 0, same-node sync: full weights copied into the next shared-memory slot."""
        from rlkit.workers.shm_sync import ShmWriter

        named = [(n, p) for n, p in self.policy.named_parameters()]
        full_shapes = [(n, torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=p.dtype, device="meta"))
                       for n, p in named]
        items = (item for group in self.full_groups(group_bytes) for item in group)
        if self.rank != 0:
            for _ in items:  # join every gather
                pass
            return {}
        if self._shm is None:
            self._shm = ShmWriter(full_shapes, tag)
        segment = self._shm.write(items)
        return {"segment": segment, "entries": self._shm.entries, "names": [n for n, _ in named],
                "bytes": float(sum(t.numel() * t.element_size() for _, t in full_shapes))}

    def param_elems(self) -> dict[str, int]:
        """Parameter elements this rank holds, and in the full model (equal unless ZeRO-3)."""
        params = list(self.policy.parameters())
        return {"local": sum(p.numel() for p in params), "full": sum(_full_numel(p) for p in params)}

    def weight_bytes(self) -> int:
        return sum(_full_numel(p) * p.element_size() for p in self.policy.parameters())

    def close_shm(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def _is_lora(self) -> bool:
        return hasattr(self.policy, "merge_and_unload")

    @torch.no_grad()
    def checksum(self, names: list[str]) -> dict[str, float]:
        """Sums of the weights a rollout engine must hold under these HF names."""
        model = self.policy
        if self._is_lora():
            deltas = {d.name: d for d in lora_deltas(model)}
            return {n: float(merged_weight(model, n, deltas).double().sum()) for n in names}
        state = dict(model.named_parameters())
        with self._gathered([state[n] for n in names]):
            return {n: float(state[n].detach().double().sum()) for n in names}

    @torch.no_grad()
    def param_vector(self) -> torch.Tensor:
        return torch.cat([t.flatten().clone() for group in self.full_groups(64 * 2**20) for _, t in group])

    # ---------------------------------------------------------------- checkpoint
    def save(self, directory: str, client_state: dict) -> None:
        d = Path(directory)
        self.engine.save_checkpoint(str(d / "deepspeed"), tag="state", client_state=client_state,
                                    save_latest=False)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "version": self.version}
        torch.save(rng, d / f"rng_rank{self.rank}.pt")
        if self.critic is not None:
            torch.save({"model": self.critic.state_dict(), "opt": self.critic.opt.state_dict()},
                       d / f"critic_rank{self.rank}.pt")
        model = self.policy
        if self._is_lora():  # LoRA (stage ≤ 2): the adapter, plus merged full weights
            if self.rank == 0:
                model.save_pretrained(str(d / "adapter"), safe_serialization=True)
                import copy

                copy.deepcopy(model).merge_and_unload().save_pretrained(str(d / "hf"), safe_serialization=True)
        elif self.spec.zero_stage == 3:
            # Gathered group by group; only rank 0 keeps (CPU) copies.
            state = {n: t.clone() for group in self.full_groups(64 * 2**20) for n, t in group if self.rank == 0}
            if self.rank == 0:
                model.save_pretrained(str(d / "hf"), state_dict=state, safe_serialization=True)
        elif self.rank == 0:
            model.save_pretrained(str(d / "hf"), safe_serialization=True)
        dist.barrier()

    def load(self, directory: str) -> dict:
        d = Path(directory)
        _, client = self.engine.load_checkpoint(str(d / "deepspeed"), tag="state")
        rng = torch.load(d / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.version = rng["version"]
        if self.critic is not None:
            state = torch.load(d / f"critic_rank{self.rank}.pt", weights_only=False)
            self.critic.load_state_dict(state["model"])
            self.critic.opt.load_state_dict(state["opt"])
        return client or {}


def _pack(items: list, bucket_bytes: int) -> list[list]:
    """Sync items in buckets of about ``bucket_bytes``."""
    buckets, cur, size = [], [], 0
    for item in items:
        cur.append(item)
        size += _item_bytes(item)
        if size >= bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
    return buckets + ([cur] if cur else [])


def _item_name(item) -> str:
    """Name of a sync item: a (name, tensor) pair or a LoRA delta."""
    return item.name if isinstance(item, LoraDelta) else item[0]


def _item_bytes(item) -> int:
    return item.nbytes if isinstance(item, LoraDelta) else item[1].numel() * item[1].element_size()


def _gap_metrics(sampler_logp: torch.Tensor, learner_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sampler-vs-learner log-prob gap on the same tokens: mean k3 KL and max ratio."""
    from rlkit.kl import kl_estimate

    k3 = kl_estimate(learner_logp.detach(), sampler_logp, "k3", mask=mask)
    n = mask.sum().clamp(min=1)
    ratio = torch.exp((learner_logp.detach() - sampler_logp).clamp(-20, 20)) * mask
    return {"gap/kl": float(k3.sum() / n), "gap/max_ratio": float(ratio.max()) if mask.any() else 1.0}

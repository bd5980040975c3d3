"""Learner rank: one member of a DeepSpeed ZeRO data-parallel group, as a Ray actor.

gloo on CPU (with a client torch AdamW, so nothing JIT-compiles), NCCL on GPU. Log-probs, entropy
and KL come from the fused kernel (:mod:`rlkit.logprobs`); the loss comes from the algorithm
registry. Gradient accumulation keeps the algorithm's global normalization exact: each micro-batch
loss is normalized by counts over the whole optimizer step (all micro-batches, all ranks), and
since DeepSpeed *averages* gradients over ranks, the loss is multiplied by the world size.

DeepSpeed wraps :class:`rlkit.workers.ds_engine.Scorer` (built there), whose forward is the whole
log-prob pass (backbone and fused LM head). Under ZeRO-3 every rank holds a shard of each weight; the head weight is registered as an
external parameter of the Scorer, so it is gathered for the pass and its backward even though the
fused kernel reads it outside the head module. Whatever needs full weights (sync, checksums, the HF
checkpoint) gathers them group by group on every rank (:meth:`LearnerRank.full_groups`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from rlkit import checkpoint
from rlkit.algorithms.base import AlgorithmSetup, LossInputs, PairLossInputs
from rlkit.config import LearnerConfig, ModelConfig, RunConfig
from rlkit.timeline import Spans
from rlkit.types import SamplingConfig, TrainBatch
from rlkit.workers import weights
from rlkit.workers.ds_engine import (  # noqa: F401
    Scorer,
    build_engine,
    learner_device,
    load_frozen,
    stats_on_device,
)


@dataclass
class LearnerSpec:
    """What a learner rank is built from: the run config's own sections, not copies of their fields."""

    model_dir: str
    model: ModelConfig
    learner: LearnerConfig
    sampling: SamplingConfig
    """The rollout's sampling settings: log-probs are scored at its temperature, over its support."""
    algorithm: AlgorithmSetup
    total_steps: int = 1
    seed: int = 0
    nan_loss_at: frozenset = frozenset()
    """Fault injection (``recovery.inject``): the updates, counted from 0 in this process, whose
    loss is made NaN."""

    @classmethod
    def from_config(cls, cfg: RunConfig, model_dir: str) -> "LearnerSpec":
        nan_at = frozenset(int(i.partition("@")[2]) for i in cfg.recovery.inject if i.startswith("nan_loss@"))
        return cls(model_dir=model_dir, model=cfg.model, learner=cfg.learner, sampling=cfg.rollout.sampling,
                   algorithm=cfg.algorithm_setup, total_steps=max(1, cfg.train.steps), seed=cfg.train.seed,
                   nan_loss_at=nan_at)


class LearnerRank:
    def __init__(self, rank: int, world: int, master_addr: str, master_port: int, spec: LearnerSpec):
        self.rank, self.world, self.spec = rank, world, spec
        self.spans = Spans(f"learner {rank}")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_SIZE="1")
        from rlkit.workers import claim_cpu, hold_freed_memory

        lc, mc = spec.learner, spec.model
        claim_cpu(lc.threads)
        # Before DeepSpeed and the model allocate: on the CPU the step's buffers are reused, not refaulted.
        self.holds_heap = lc.hold_freed_memory and learner_device().type == "cpu" and hold_freed_memory()
        random.seed(spec.seed + rank)
        np.random.seed(spec.seed + rank)
        torch.manual_seed(spec.seed)
        self.algo, self.algo_cfg, self.needs = spec.algorithm.algo, spec.algorithm.cfg, spec.algorithm.needs
        self.engine = build_engine(spec, world)
        # Preference algorithms always read reference log-probs (Needs.ref_logp), so they load it too.
        self.device = learner_device()
        dtype = mc.resolved_dtype(self.device.type == "cuda")
        self.ref = load_frozen(mc.ref_path or spec.model_dir, dtype, self.device) if self.needs.reference else None
        self.teacher = load_frozen(mc.teacher_path, dtype, self.device) if self.needs.teacher_logp else None
        self.critic = None
        if self.needs.values:
            from rlkit.workers.critic import Critic

            self.critic = Critic(spec.model_dir, lr=lc.critic_lr, max_grad_norm=lc.max_grad_norm, seed=spec.seed,
                                 device=self.device)
        self.batch: Optional[TrainBatch] = None
        """This rank's shard of the step's batch (``set_batch``), with its side-pass tensors."""
        self._shm: dict = {}  # the shared-memory sync writer (rank 0, same-node rollout workers)
        self._updates = 0  # optimizer steps attempted by this process (fault injection counts them)
        # The sampler's truncated support, when it used top-k/top-p (log-prob contract).
        self.truncation = spec.sampling if spec.sampling.truncates else None
        # The loss's gradient comes from the fused loss pass (three LM-head matmuls) until a micro-batch
        # of several chunks shows the loss is not a sum of per-token terms (_loss_pass).
        self._per_token_loss = True

    @property
    def policy(self) -> torch.nn.Module:
        """The HF (or PEFT) model being trained; under ZeRO-3 its parameters are shards."""
        return self.engine.module.model

    # ---------------------------------------------------------------- passes
    def ready(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "needs": self.needs.__dict__, "holds_heap": self.holds_heap}

    def set_batch(self, batch: TrainBatch) -> int:
        self.batch = batch
        return batch.size

    @torch.no_grad()
    def side_passes(self) -> dict[str, Any]:
        """Detached per-token log-probs of the stored shard under π_old, π_ref, the teacher (and
        critic values), kept with the shard for the loss. Returns ``tensors``: those the algorithm's
        advantage and return functions read (``Algorithm.advantage_reads``), and ``kl``: the sum
        of k1(π_sampler‖π_ref) over the shard's tokens and their count, when π_ref was scored."""
        b, out, wall = self.batch, {}, time.time()
        T, chunk = self.spec.sampling.temperature, self.spec.learner.chunk_size
        kw = dict(temperature=T, chunk_size=chunk)
        if self.needs.old_logp and self.spec.learner.updates_per_step > 1:
            out["old_logp"] = self._in_micro_batches(
                lambda mb: self.engine(mb, truncation=self.truncation, **kw)["logp"])
        if self.needs.ref_logp:
            out["ref_logp"] = self._in_micro_batches(lambda mb: stats_on_device(self.ref, mb, **kw)["logp"])
        phi = self.needs.ref_temper_phi
        if phi is not None:
            # log q_φ(y) = φ·z_y − logsumexp(φ·z) with z = ref logits / T: the log-softmax at
            # temperature T/φ, i.e. the exact normalized tempered reference (docs/algorithms.md
            # § RAPO). φ = 0 is the uniform distribution over the vocabulary: −log V at every token.
            if phi > 0:
                kw_phi = dict(kw, temperature=T / phi)
                out["ref_tempered_logp"] = self._in_micro_batches(lambda mb: stats_on_device(self.ref, mb, **kw_phi)["logp"])
            else:
                V = self.ref.get_output_embeddings().weight.shape[0]
                out["ref_tempered_logp"] = -math.log(V) * b.response_mask_B_T
        if self.critic is not None:
            out["values"] = self._in_micro_batches(self.critic.values)
        if self.teacher is not None:
            out["teacher_logp"] = self._in_micro_batches(lambda mb: stats_on_device(self.teacher, mb, **kw)["logp"])
        self.batch.extras.update(out)
        reads = self.algo.advantage_reads
        kl = {}
        if "ref_logp" in out:
            from rlkit.kl import kl_estimate

            mask = b.response_mask_B_T
            kl = {"sum": float(kl_estimate(b.sampler_logp_B_T, out["ref_logp"], "k1", mask=mask).sum()),
                  "tokens": float(mask.sum())}
        self.spans.add("side passes", wall, time.time())
        return {"tensors": {k: v for k, v in out.items() if reads is None or k in reads}, "kl": kl}

    def _in_micro_batches(self, fn) -> torch.Tensor:
        n, mb = self.batch.size, self.spec.learner.micro_batch_size
        parts = [fn(self.batch.select(list(range(i, min(n, i + mb))))) for i in range(0, n, mb)]
        return torch.cat(parts, 0)

    # ---------------------------------------------------------------- update
    def train(self, advantages_B_T: Optional[torch.Tensor], controller: dict[str, float],
              returns_B_T: Optional[torch.Tensor] = None) -> dict[str, float]:
        """All optimizer steps for the stored shard, with this shard's advantages (and critic
        returns); returns metrics averaged over micro-batches."""
        extras = dict(self.batch.extras, **({"returns": returns_B_T} if returns_B_T is not None else {}))
        b = dataclasses.replace(self.batch, advantages_B_T=advantages_B_T, extras=extras)
        t0, wall = time.perf_counter(), time.time()
        order = torch.arange(b.size)
        minis = torch.tensor_split(order, self.spec.learner.updates_per_step)
        sums: dict[str, float] = {}
        self._grad_norms: list[float] = []
        skipped = {"loss": 0, "grad": 0}
        for mini in minis:
            reason = self._optimizer_step(b.select(mini), controller, sums)
            if reason:
                skipped[reason] += 1
        metrics = {k: v / max(1.0, sums.get("_count", 1.0)) for k, v in sums.items() if k != "_count"}
        metrics["learn/skipped_updates"] = float(skipped["loss"] + skipped["grad"])
        metrics["learn/nonfinite_loss"] = float(skipped["loss"])
        metrics["learn/nonfinite_grad"] = float(skipped["grad"])
        if self._grad_norms:
            metrics["learn/grad_norm"] = float(np.mean(self._grad_norms))
        metrics["learn/lr"] = float(self.engine.get_lr()[0])
        metrics["learn/seconds"] = time.perf_counter() - t0
        self.spans.add("learn", wall, time.time())
        return metrics

    def _global_counts(self, mini: TrainBatch) -> tuple[float, float, int]:
        local = torch.tensor([mini.response_mask_B_T.sum().item(),
                              float((mini.response_mask_B_T.sum(-1) > 0).sum().item())], dtype=torch.float64)
        dist.all_reduce(local)
        n_micro = torch.tensor([math.ceil(mini.size / self.spec.learner.micro_batch_size)], dtype=torch.long)
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
        return float(local[0]), float(local[1]), int(n_micro)

    def _optimizer_step(self, mini: TrainBatch, controller: dict, sums: dict) -> Optional[str]:
        """One optimizer step over ``mini``. A non-finite loss or gradient on any rank skips the
        update (weights and optimizer state untouched); returns "loss" or "grad" then, else None."""
        tokens, seqs, n_micro = self._global_counts(mini)
        mb = self.spec.learner.micro_batch_size
        finite = True
        for i in range(n_micro):
            idx = list(range(i * mb, min(mini.size, (i + 1) * mb)))
            # A rank with fewer rows still joins every collective: a zero-weight micro-batch.
            weight = 1.0 if idx else 0.0
            micro = mini.select(idx or [0])
            loss, metrics = self._micro_loss(micro, tokens, seqs, controller, weight)
            if self._updates in self.spec.nan_loss_at:
                loss = loss * float("nan")
            finite = finite and bool(torch.isfinite(loss.detach()))
            self.engine.backward(loss * weight * self.world, scale_wrt_gas=False)
            if idx:
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["_count"] = sums.get("_count", 0.0) + 1.0
        self._updates += 1
        bad_loss = _any_rank(not finite)
        if self._zero == 0 and (bad_loss or _any_rank(not _grads_finite(self.engine.module))):
            applied = False  # no ZeRO optimizer to check the gradients: do not step at all
            self.engine.zero_grad()
        else:
            # ZeRO 1-3 check the global gradient norm and skip a non-finite update themselves.
            self.engine.step()
            applied = self.engine.was_step_applied()
        if not applied:
            if self.critic is not None:
                self.critic.opt.zero_grad(set_to_none=True)
            return "loss" if bad_loss else "grad"
        if self.critic is not None:
            sums["learn/critic_grad_norm"] = sums.get("learn/critic_grad_norm", 0.0) + self.critic.step()
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            self._grad_norms.append(float(gn))
        return None

    def _micro_loss(self, micro: TrainBatch, tokens: float, seqs: float, controller: dict, weight: float = 1.0):
        if self.needs.pairs:
            loss, stats, (_, metrics) = self._loss_pass(micro, lambda st: self._pair_loss(micro, seqs / 2, st))
            return loss, metrics
        loss, stats, (inputs, metrics) = self._loss_pass(
            micro, lambda st: self._policy_loss(micro, tokens, seqs, controller, st), with_entropy=True)
        if self.critic is not None:
            inputs.values_B_T = self.critic.values(micro)
            inputs.old_values_B_T = micro.extras.get("values")
            inputs.returns_B_T = micro.extras["returns"]
            critic_loss, critic_metrics = self.algo.critic_loss(inputs, self.algo_cfg)
            # The critic is its own graph and optimizer (its gradients are all-reduced in Critic.step).
            (critic_loss * weight).backward()
            metrics.update({f"loss/{k}": float(v) for k, v in critic_metrics.items()})
        mask = micro.response_mask_B_T
        metrics["entropy/mean"] = float((stats["entropy"].detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, metrics

    def _loss_pass(self, micro: TrainBatch, loss_fn, with_entropy: bool = False):
        """(loss, stats, aux) of ``loss_fn(stats) -> (loss, aux)`` on the policy's stats of ``micro``.

        The fused loss pass (:func:`loss_on_device`: the gradient computed in the forward, three
        LM-head matmuls) unless the sampler truncated its support, or the loss was found not to be a
        sum of per-token terms and ``micro`` needs several chunks; then the stats with their
        recompute backward (four) and the loss on them. Either way the same loss and gradient: the
        fused pass corrects what its probe got wrong, and once that was over a third of a
        micro-batch's rows (where the correction costs more than the recompute saves) the
        recompute path takes over for multi-chunk micro-batches.
        """
        s = self.spec
        kw = dict(temperature=s.sampling.temperature, chunk_size=s.learner.chunk_size, with_entropy=with_entropy,
                  ref_model=self.ref if self.needs.ref_full_kl else None)
        one_chunk = int(micro.response_mask_B_T.sum()) <= s.learner.chunk_size
        if self.truncation is None and (self._per_token_loss or one_chunk):
            loss, stats, aux, report = self.engine(micro, loss_fn=loss_fn, **kw)
            if 3 * report.corrected_rows > report.rows:
                self._per_token_loss = False
            return loss, stats, aux
        stats = self.engine(micro, truncation=self.truncation, **kw)
        loss, aux = loss_fn(stats)
        return loss, stats, aux

    def _policy_loss(self, micro: TrainBatch, tokens: float, seqs: float, controller: dict, stats: dict):
        """The algorithm's loss of one micro-batch from the policy's stats; aux = (LossInputs, metrics)."""
        s = self.spec
        logp, mask = stats["logp"], micro.response_mask_B_T
        old = micro.extras.get("old_logp", logp.detach())
        adv = micro.advantages_B_T if micro.advantages_B_T is not None else torch.zeros_like(logp)
        metrics = _gap_metrics(micro.sampler_logp_B_T, old, mask)
        # Off-policy correction for the sampler/learner mismatch and for stale samples (docs/async.md).
        adv, mask = _off_policy_correction(s.learner, old, micro.sampler_logp_B_T, mask, adv, metrics)
        entropy = stats["entropy"] if self.needs.entropy else stats["entropy"].detach()
        inputs = LossInputs(
            logp_B_T=logp, mask_B_T=mask, advantages_B_T=adv, num_tokens_global=tokens,
            num_seqs_global=seqs, old_logp_B_T=old, ref_logp_B_T=micro.extras.get("ref_logp"),
            ref_tempered_logp_B_T=micro.extras.get("ref_tempered_logp"),
            teacher_logp_B_T=micro.extras.get("teacher_logp"), entropy_B_T=entropy,
            ref_full_kl_B_T=stats.get("ref_full_kl"), rewards_B=micro.rewards_B,
            max_response_len=s.sampling.max_new_tokens, controller=controller,
        )
        loss, algo_metrics = self.algo.loss(inputs, self.algo_cfg)
        metrics.update({f"loss/{k}": float(v) for k, v in algo_metrics.items()})
        metrics["loss/total"] = float(loss.detach())
        return loss, (inputs, metrics)

    def _pair_loss(self, micro: TrainBatch, pairs_global: float, stats: dict):
        """Rows come pair-major: 2p is the chosen response of pair p, 2p+1 the rejected one."""
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
        return loss, (inputs, metrics)

    # ---------------------------------------------------------------- weights
    # Under ZeRO-3 the methods below gather weights: the driver calls them on every rank together
    # (rlkit.sync.on_learners) and uses rank 0's answer. The work is in rlkit.workers.weights.
    def full_state(self, bucket_bytes: int) -> dict[str, Any]:
        with self.spans("sync"):
            return weights.object_state(self.policy, self.rank, self._zero, bucket_bytes)

    def shm_state(self, tag: str) -> dict[str, Any]:
        with self.spans("sync"):
            return weights.shm_state(self.policy, self.rank, self._zero, self._shm, tag)

    def checksum(self, names: list[str]) -> dict[str, float]:
        return weights.checksum(self.policy, self._zero, names)

    def param_vector(self) -> torch.Tensor:
        return weights.param_vector(self.policy, self._zero)

    def param_elems(self) -> dict[str, int]:
        return weights.param_elems(self.policy)

    def weight_bytes(self) -> int:
        return weights.weight_bytes(self.policy)

    def drain_spans(self) -> list[dict[str, Any]]:
        """What this rank did since the last call, as wall-clock spans (:mod:`rlkit.timeline`)."""
        return self.spans.drain()

    def close_shm(self) -> None:
        if self._shm.get("writer") is not None:
            self._shm.pop("writer").close()

    def sync_place(self) -> dict[str, Any]:
        return weights.sync_place(self.policy)

    def sync_layout(self, bucket_bytes: int) -> list:
        return weights.wire_layout(self.policy, bucket_bytes)

    def collective_open(self, tag: str, world: int, backend: str) -> tuple[str, int]:
        return weights.open_group(self._sync_groups, tag, world, backend)

    def collective_join(self, tag: str) -> None:
        weights.join_opened(self._sync_groups, tag)

    def collective_send(self, tag: str, bucket_bytes: int) -> dict[str, Any]:
        with self.spans("sync"):
            return weights.send_on_group(self.policy, self.rank, self._zero, self._sync_groups, tag, bucket_bytes)

    def ipc_state(self, bucket_bytes: int) -> dict[str, Any]:
        with self.spans("sync"):
            return weights.ipc_state(self.policy, self._zero, bucket_bytes)

    @property
    def _sync_groups(self) -> dict:
        """Rank 0's collective sync groups by tag (rlkit.sync.CollectiveTransport)."""
        return self.__dict__.setdefault("_groups", {})

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @property
    def _zero(self) -> int:
        return self.spec.learner.zero_stage

    # ---------------------------------------------------------------- checkpoint
    def save(self, directory: str, client_state: dict) -> None:
        d = Path(directory)
        self.engine.save_checkpoint(str(d / "deepspeed"), tag="state", client_state=client_state,
                                    save_latest=False)
        # Plain tensors and numbers only: resume reads them without unpickling code (docs/security.md).
        checkpoint.save_state(d / f"rng_rank{self.rank}.pt", checkpoint.capture_rng())
        if self.critic is not None:
            checkpoint.save_state(d / f"critic_rank{self.rank}.pt",
                                  {"model": self.critic.state_dict(), "opt": self.critic.opt.state_dict()})
        model = self.policy
        if weights.is_lora(model):  # LoRA (stage ≤ 2): the adapter, plus merged full weights
            if self.rank == 0:
                model.save_pretrained(str(d / "adapter"), safe_serialization=True)
                import copy

                copy.deepcopy(model).merge_and_unload().save_pretrained(str(d / "hf"), safe_serialization=True)
        elif self._zero == 3:
            # Gathered group by group; only rank 0 keeps (CPU) copies.
            state = {n: t.clone() for group in weights.full_groups(model, 3) for n, t in group if self.rank == 0}
            if self.rank == 0:
                model.save_pretrained(str(d / "hf"), state_dict=state, safe_serialization=True)
        elif self.rank == 0:
            model.save_pretrained(str(d / "hf"), safe_serialization=True)
        dist.barrier()

    def load(self, directory: str) -> dict:
        d = Path(directory)
        _, client = self.engine.load_checkpoint(str(d / "deepspeed"), tag="state")
        checkpoint.restore_rng(checkpoint.load_state(d / f"rng_rank{self.rank}.pt"))
        if self.critic is not None:
            state = checkpoint.load_state(d / f"critic_rank{self.rank}.pt")
            self.critic.load_state_dict(state["model"])
            self.critic.opt.load_state_dict(state["opt"])
        return client or {}


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _grads_finite(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _gap_metrics(sampler_logp: torch.Tensor, learner_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sampler-vs-learner log-prob gap on the same tokens: mean k3 KL and max ratio."""
    from rlkit.kl import kl_estimate

    k3 = kl_estimate(learner_logp.detach(), sampler_logp, "k3", mask=mask)
    n = mask.sum().clamp(min=1)
    ratio = torch.exp((learner_logp.detach() - sampler_logp).clamp(-20, 20)) * mask
    return {"gap/kl": float(k3.sum() / n), "gap/max_ratio": float(ratio.max()) if mask.any() else 1.0}


def _off_policy_correction(lc: LearnerConfig, old_logp: torch.Tensor, sampler_logp: torch.Tensor,
                           mask: torch.Tensor, adv: torch.Tensor, metrics: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The advantages and loss mask after ``learner.is_correction`` (:func:`rlkit.async_rl.off_policy_weights`),
    its ratio statistics added to ``metrics``. Scaling corrections (token_tis, seq_is) multiply the
    advantages by the detached weight: losses are linear in A where unclipped, so this equals
    weighting each token (config validation refuses them otherwise). Masks take tokens out of the
    loss mask instead, which is valid for any loss; the global token count that normalizes the loss
    is left as it is, so a masked token contributes zero rather than renormalizing the others."""
    from rlkit.async_rl import SCALING, correction_active, off_policy_weights

    mode = lc.is_correction
    if not correction_active(mode, lc.tis_cap, lc.is_low, lc.is_high):
        return adv, mask
    w, m = off_policy_weights(old_logp, sampler_logp, mask, mode, cap=lc.tis_cap, low=lc.is_low, high=lc.is_high)
    metrics.update(m)
    return (adv * w, mask) if mode in SCALING else (adv, mask * w)

"""Bounded asynchronous RL: generation runs up to ``rollout.max_staleness`` policy versions ahead of
the learner, and the off-policy corrections the learner applies to what it gets (docs/async.md).

Two parts, both small:

* :func:`off_policy_weights`, pure tensor math: per-token weights from π_old (the learner's
  log-probs before the update) and π_behaviour (the sampler's own log-probs of the same tokens):
  truncated IS per token or per sequence, or masks that drop tokens or whole sequences whose ratio
  leaves [lo, hi]. Read by :meth:`rlkit.workers.learner.LearnerRank._micro_loss`.
* :class:`GenerationBuffer` (a bounded FIFO of generation batches and the policy version each was
  started at) and :class:`AsyncCollector`, which the trainer calls instead of its synchronous
  sampling when ``rollout.max_staleness`` N > 0.
* Per-token versions (partial rollouts, ``rollout.partial_rollouts``): a sample's staleness is its
  oldest token's (:func:`oldest_version`); :func:`token_version_metrics` logs how many tokens
  older versions produced.

Versions without partial rollouts: no lock needed. A Ray actor runs its calls one at a time in
submission order. The collector starts a generation batch only at the start of a step, after the
previous step's sync has returned, so the batch records ``Runtime.version`` = v and every rollout
worker holds v (:meth:`rlkit.runtime.Runtime.generate_async`). The next sync (to v + 1) is
submitted after that batch, so on each worker it queues behind it: the batch is generated with
exactly the weights of v, never a mixture, and :meth:`rlkit.runtime.Runtime.collect` checks that
every sample says v (a worker restarted in between answers with another version and its share is
redone). The sync still verifies every tensor on every engine, as in the synchronous loop.

Versions with partial rollouts. The rollout actor is threaded (:func:`rlkit.workers.rollout.rollout_actor`):
syncs run in their own concurrency group beside the generation, and the HF engine applies them
between two decode steps under a lock (:class:`rlkit.workers.hf_engine.WeightGate`), so a forward
never sees a half-loaded model and the verification that follows the sync reads the new weights.
A batch started at v therefore begins at v or later (a sync may land before it runs) and its
tokens' versions never decrease; each token records the version that computed its distribution
and its behaviour log-prob under exactly that distribution, which is all the off-policy
corrections read. ``Runtime.collect`` then checks that no sample is older than v.

Why no trained sample is older than N versions. At a step's start the learner is at version v and
the buffer is topped up to N + 1 batches, the new ones started at v. Each step takes at least one
batch, oldest first, so a batch started at v is taken by the step that runs at version v + N at the
latest: staleness ≤ N by construction, measured on the oldest token. Groups that wait longer (a
group filter's surplus carried to the next step) are checked at training time and dropped and
counted (``async/dropped_stale``), not regenerated: the sampler has moved on, and a regenerated
prompt would be trained twice.

Throughput. Without partial rollouts the sync to v + 1 waits on each worker for the batches queued
before it, so the generation that overlaps learning is at most one batch per step (the one
started at the step's start); deeper buffers add staleness, not overlap. With partial rollouts the
sync interrupts the running generation instead of waiting for it, so the rollout workers generate
through the learner's step and its sync, and the buffer's N batches keep them busy
(docs/async.md § Throughput).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

CORRECTIONS = ("token_tis", "seq_is", "token_mask", "seq_mask")
"""Values of ``learner.is_correction``."""
SCALING = ("token_tis", "seq_is")
"""Corrections that scale the advantage (need an algorithm linear in it); the others mask tokens."""


# ---------------------------------------------------------------------------------------- IS math
def off_policy_weights(old_logp_B_T: torch.Tensor, behaviour_logp_B_T: torch.Tensor, mask_B_T: torch.Tensor,
                       mode: str, cap: Optional[float] = None, low: float = 0.0,
                       high: Optional[float] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached off-policy weights w_B_T from the ratio ρ = π_old / π_behaviour of each sampled token.

    * ``token_tis``: w_t = min(ρ_t, cap) (truncated IS per token; Yao et al., "Your efficient RL
      framework secretly brings you off-policy RL training", 2025, and IMPALA's truncation,
      arXiv:1802.01561).
    * ``seq_is``: w_t = min(Π_t ρ_t, cap) for every token of the sequence; the product is a sum of
      log ratios, capped in log space (log cap) before the exp so a long sequence cannot overflow
      (sequence-level IS as in GSPO's sequence ratio, arXiv:2507.18071, without its length root).
    * ``token_mask``: w_t = 1 if lo ≤ ρ_t ≤ hi else 0 (masked IS: the token is dropped).
    * ``seq_mask``: w_t = 1 for every token if lo ≤ Π_t ρ_t ≤ hi else 0 (the sequence is dropped);
      compared in log space. ``high`` None means no upper bound; ``low`` 0 no lower bound.

    Shapes: log-probs and mask [B, T] (mask 1 on response tokens). Returns w [B, T] (0 off the
    mask) and ``is/ratio_mean``, ``is/ratio_max`` (over tokens), ``is/seq_log_ratio_mean``,
    ``is/seq_log_ratio_max`` (over sequences with a token), ``is/masked_frac`` (tokens whose weight
    is 0 by the mask rule) and ``is/clipped_frac`` (tokens whose weight was capped).
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"off_policy_weights: unknown mode {mode!r}; valid: {list(CORRECTIONS)}")
    mask = mask_B_T.to(old_logp_B_T.dtype)
    log_rho_B_T = (old_logp_B_T.detach() - behaviour_logp_B_T) * mask
    seq_log_rho_B = log_rho_B_T.sum(-1)
    has_B = mask.sum(-1) > 0
    n_tok = mask.sum().clamp(min=1)
    rho_B_T = torch.exp(log_rho_B_T.clamp(max=80.0))
    clipped = torch.zeros_like(mask)
    masked = torch.zeros_like(mask)
    if mode == "token_tis":
        # The same expression as the learner's historical tis_cap path, so results stay bitwise.
        w_B_T = torch.exp(old_logp_B_T.detach() - behaviour_logp_B_T).clamp(max=cap) * mask
        clipped = (rho_B_T > cap).to(mask.dtype) * mask
    elif mode == "seq_is":
        log_cap = math.log(cap)
        w_B = torch.exp(seq_log_rho_B.clamp(max=log_cap))
        w_B_T = w_B[:, None] * mask
        clipped = (seq_log_rho_B > log_cap).to(mask.dtype)[:, None] * mask
    else:
        lo = math.log(low) if low > 0 else -math.inf
        hi = math.log(high) if high is not None else math.inf
        x = log_rho_B_T if mode == "token_mask" else seq_log_rho_B[:, None].expand_as(mask)
        keep = ((x >= lo) & (x <= hi)).to(mask.dtype)
        w_B_T = keep * mask
        masked = (1 - keep) * mask
    seq = seq_log_rho_B[has_B]
    metrics = {
        "is/ratio_mean": float((rho_B_T * mask).sum() / n_tok),
        "is/ratio_max": float((rho_B_T * mask).max()) if bool(mask.any()) else 1.0,
        "is/seq_log_ratio_mean": float(seq.mean()) if seq.numel() else 0.0,
        "is/seq_log_ratio_max": float(seq.max()) if seq.numel() else 0.0,
        "is/masked_frac": float(masked.sum() / n_tok),
        "is/clipped_frac": float(clipped.sum() / n_tok),
    }
    return w_B_T.detach(), metrics


def correction_active(mode: str, cap: Optional[float], low: float, high: Optional[float]) -> bool:
    """Whether ``learner.is_correction`` does anything: a cap for the scaling modes, a bound for masks."""
    return cap is not None if mode in SCALING else (low > 0 or high is not None)


# ---------------------------------------------------------------------------------------- scheduling
def staleness_ok(version_now: int, produced: int, max_staleness: int) -> bool:
    """A sample produced by ``produced`` may be trained at learner version ``version_now``."""
    return 0 <= version_now - produced <= max_staleness


def oldest_version(rollout: Any) -> int:
    """The version of a sample's oldest token (its ``policy_version`` when it records none)."""
    versions = getattr(rollout, "token_versions", None)
    return min(versions) if versions else rollout.policy_version


def token_version_metrics(token_staleness_B_T: Optional[torch.Tensor], mask_B_T: torch.Tensor) -> dict[str, float]:
    """Per-token staleness of a batch (learner version − each response token's version, 0 off the
    mask): ``rollout/token_staleness_mean`` (over tokens), ``rollout/old_token_frac`` (tokens
    produced by a version older than the learner's) and ``rollout/partial_frac`` (samples whose
    tokens come from more than one version: a sync landed during their generation)."""
    if token_staleness_B_T is None:
        return {}
    stale, on = token_staleness_B_T, mask_B_T > 0
    n = on.sum().clamp(min=1)
    newest_B = stale.masked_fill(~on, torch.iinfo(stale.dtype).max).amin(-1)
    oldest_B = stale.masked_fill(~on, torch.iinfo(stale.dtype).min).amax(-1)
    partial_B = on.any(-1) & (newest_B != oldest_B)
    return {"rollout/token_staleness_mean": float((stale * on).sum() / n),
            "rollout/old_token_frac": float(((stale > 0) & on).sum() / n),
            "rollout/partial_frac": float(partial_B.float().mean()) if partial_B.numel() else 0.0}


@dataclass
class Started:
    """One generation batch started ahead: its prompt rows, its in-flight work (the runtime's
    :class:`rlkit.runtime.GenerationTask` list) and the policy version it was started at."""

    rows: list
    tasks: Any
    version: int
    sampler_before: dict = field(default_factory=dict)
    """The prompt sampler's state before these rows were drawn (a checkpoint resumes from it)."""


class GenerationBuffer:
    """A bounded FIFO of started generation batches: at most ``max_staleness + 1`` at once
    (in flight or done, not yet taken), which is the back-pressure on generation."""

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.capacity = max_staleness + 1
        self._q: collections.deque[Started] = collections.deque()

    def __len__(self) -> int:
        return len(self._q)

    def top_up(self, version: int, start: Callable[[], Started]) -> int:
        """Start batches (``start()``, which must start them at ``version``) until the buffer is
        full; call only when every rollout worker holds ``version``. Returns how many started."""
        n = 0
        while len(self._q) < self.capacity:
            b = start()
            if b.version != version:
                raise RuntimeError(f"generation batch started at version {b.version}, expected {version}")
            self._q.append(b)
            n += 1
        return n

    def take(self) -> Optional[Started]:
        """The oldest started batch, or None when empty."""
        return self._q.popleft() if self._q else None

    def oldest(self) -> Optional[Started]:
        return self._q[0] if self._q else None

    def clear(self) -> None:
        self._q.clear()


def split_fresh(groups: list, version_now: int, max_staleness: int) -> tuple[list, int]:
    """The groups all of whose samples may be trained at ``version_now`` (judged by each sample's
    oldest token), and the number of samples dropped with the others (a group is kept or dropped
    whole: its advantages are relative)."""
    keep, dropped = [], 0
    for g in groups:
        if all(staleness_ok(version_now, oldest_version(r), max_staleness) for r in g.rollouts):
            keep.append(g)
        else:
            dropped += len(g.rollouts)
    return keep, dropped


class AsyncCollector:
    """The trainer's sampling stage under bounded asynchrony (``rollout.max_staleness`` = N).

    Each call (one per step, after the previous step's sync): top the buffer up to N + 1 batches
    at the current version, take batches oldest first, score them and apply the group filter until
    the step has its groups (a filter that needs more than the buffer holds generates on the spot),
    drop groups older than N versions and count them. Batch k is sampled with
    ``generation_seed(seed, k, 0)``, so with N = 0 this is the synchronous loop, bitwise (tested).
    With partial rollouts nothing here changes: the batches in the buffer keep generating while the
    learner steps, and the sync that ends the step interrupts them instead of waiting."""

    def __init__(self, trainer: Any, max_staleness: Optional[int] = None):
        self.t = trainer
        self.n = trainer.cfg.rollout.max_staleness if max_staleness is None else max_staleness
        self.buffer = GenerationBuffer(self.n)
        self.next_batch: Optional[int] = None
        """Index of the next generation batch (its seed); starts at the trainer's step."""

    def reset(self) -> None:
        """Forget the started batches (a learner restart or resume): they are regenerated."""
        self.buffer.clear()
        self.next_batch = None
        self._publish()

    def _start(self) -> Started:
        t = self.t
        before = t.sampler.state_dict()
        rows = t.sampler.next_batch()
        tasks = t._launch(rows, self.next_batch, 0)
        self.next_batch += 1
        return Started(rows, tasks, t.runtime.version, before)

    def collect(self, timer) -> tuple[list, dict[str, float]]:
        from rlkit import groups

        t, rt = self.t, self.t.runtime
        if self.next_batch is None:
            self.next_batch = t.state.step
        want, max_rounds = t.cfg.train.prompts_per_step, t.max_rounds()
        kept, dropped = split_fresh(list(t.state.carry), rt.version, self.n)
        started = self.buffer.top_up(rt.version, self._start)
        metrics: dict[str, float] = {}
        rounds = 0
        while groups.more_rounds(len(kept), want, rounds, max_rounds):
            b = self.buffer.take() or self._start()  # an empty buffer: generate now, at this version
            rollouts = rt.collect(b.tasks)
            with timer("score"):
                new, m = t._score(b.rows, rollouts)
            metrics = metrics or m
            new, d = split_fresh(new, rt.version, self.n)
            kept.extend(new)
            dropped += d
            rounds += 1
        metrics.update(t._check_short(len(kept), rounds))
        t.state.carry = kept[want:]
        out = kept[:want]
        self._publish()
        versions = [oldest_version(r) for g in out for r in g.rollouts]
        metrics.update({"async/dropped_stale": float(dropped), "async/buffered": float(len(self.buffer)),
                        "async/started": float(started),
                        "async/max_staleness": float(rt.version - min(versions)) if versions else 0.0})
        return groups.renumber(out), metrics

    def _publish(self) -> None:
        """Tell the trainer's checkpoint what is in flight: it saves the sampler state from before
        the oldest started batch, so a resume redraws those prompts and regenerates them."""
        b = self.buffer.oldest()
        self.t._pending = (b.rows, b.tasks) if b is not None else None
        self.t._sampler_before_pending = b.sampler_before if b is not None else {}

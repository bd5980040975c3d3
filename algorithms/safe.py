"""SAFE: L = L_PPO + P_KL − c_H·H, P_KL = 0.1·g·(kl_short − τ_t)² when kl_short > τ_t (+ critic 0.5·L_V).

Paper: Maity, "SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive Control for RLHF",
arXiv 2602.04651 (the soft-min critic V_soft, the entropy-gated penalty L_EPC = g_t·L_base and the
threshold τ_t = (τ_base + PID(r_t))·φ_t). Formulas, defaults and decisions: docs/algorithms.md
§ SAFE. Reference implementation: ryyzn9/SAFE @ 183daf7 (no licence: nothing copied, behaviour
re-implemented from its description): ``EntropyAwarePredictiveController.compute_penalty``,
``PIDController``, ``PhaseDetector``, ``AsymmetricKLController``, ``DoubleCritic.soft_min``,
``SAFETrainer.train_step``, ``AsymmetricKLTrainer.train_step``, ``RewardNormalizer``.

Pieces (each a pure function here, the state in the two controller classes):
* Critic: two heads V1, V2 combined by the soft-min V = −α_s·log(½(e^{−V1/α_s} + e^{−V2/α_s}))
  (α_s → 0: min, α_s → ∞: mean), read at the **last valid** token (the reference reads position −1,
  which can be padding). Loss 0.5·[Huber_δ(V, R) + Huber_δ(V_clip, R)],
  V_clip = V_old + clip(V − V_old, ±0.2), δ = 0.5 — *summed*, as the reference does
  (``value_loss="squared_max"``: the asymmetric trainer's 0.5·max((V − R)², (V_clip − R)²)).
* Advantage: A = batch-normalize(R − V_old), sequence level, broadcast to tokens; in the reference
  R is the reward normalized with running (Chan-merged) statistics updated *before* normalizing
  the same batch. R is also the critic target (``returns``).
* Entropy-aware controller (``controller="entropy_aware"``, the default; per call, with KL the
  signed token-mean k1 of π_old vs π_ref, H the rollout entropy, r the mean raw reward):
  kl_short ← 0.9·kl_short + 0.1·KL; phase multiplier φ (WARMUP 1.5 before 50 rewards; then
  CLIMBING 1.2 / CONVERGED 1.0 / PLATEAU 0.8 from the last 50 vs the previous 50); PID on reward
  velocity e = Δ EMA_0.95(r) − 0.001, integral clipped to ±1, gains 0.3/0.01/0.05, first call 0;
  τ_t = clip((τ_base + PID)·φ, 0.1, 0.6); if kl_short > τ_t: g = max(0.5, H_floor/(H + 0.1)),
  P = 0.1·g·(kl_short − τ_t)², else P = 0, g = 1.
* Asymmetric-KL controller (``controller="asymmetric"``, the reference's sibling trainer): on the
  raw KL, P = λ_asym·(KL − τ)² when KL > τ, plus λ_mom·m² when the KL momentum
  m = (KL_now − KL_{window−1 calls earlier})/window is positive; no momentum before ``window`` calls.

Decisions:
* ``penalty_mode="differentiable"`` (default) vs ``"reference"``. In the reference code P is built
  from ``.item()`` floats: it shifts the loss value and never the update, so the published results
  were measured with a penalty that has **no gradient**. ``reference`` reproduces that (P added as a
  constant). ``differentiable`` adds β_t·∇KL_batch(θ), β_t = dP/dKL_batch at the controller's last
  state: for the entropy-aware controller, through kl_short(θ) = 0.9·SG[kl_short] + 0.1·KL_batch(θ),
  β_t = 0.02·g·(kl_short − τ_t) when the gate is open; for the asymmetric one
  β_t = 2λ_asym·(KL − τ)₊ + 2λ_mom·m₊/window. Being linear in per-token terms it is exactly
  invariant to micro-batching and data-parallel splits.
* The KL inside the differentiable penalty is the kernel's ``k1+`` by default: the reference's signed
  k1 *value* with the k2 *gradient* (correct reverse-KL gradient on-policy). Plain ``k1`` in a loss
  has a zero-mean gradient on-policy and pushes away from π_old off-policy (docs/algorithms.md
  § KL estimators); it is available as ``penalty_kl_kind="k1"`` for the literal form.
* Timing: the controller is updated once per training step *after* the step, from the step's
  metrics (:data:`CONTROLLER_KEYS`, found under any stage prefix such as ``adv/``); the loss of
  step n reads its state after step n−1. The reference calls the controller just before the loss
  with the current KL, so the penalty here lags by one call; in reference mode the update is
  unaffected (the penalty has no gradient there).
* Value clipping needs V_old in the loss inputs (``old_values_B_T``, not in the contract yet);
  without it V_clip = V and the critic loss is the plain Huber (or squared) loss.
* Reward normalization: ``batch`` by default, because the advantage inputs carry no controller
  state yet; ``running`` reproduces the reference's running statistics once the runtime passes the
  controller's values to the advantage function.
* The PPO ratio's log is clamped to ±20 before the exp (verl's surrogate; the reference has no
  clamp, which only matters for ratios beyond e^20).
* Entropy bonus: masked token-mean with global counts by default; ``entropy_over_padding=True``
  averages over all positions as the reference does.
* Not implemented: the never-called preview-KL scaling, ``target_kl`` and the unused Polyak target
  critic. The asymmetric trainer's critic learning rate (5e−5) is an optimizer setting, not part of
  this config.

Shapes: B responses, T padded response length; critic values [B, T] (already combined) or [B, T, 2]
(the two heads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkit.kl import kl_estimate

from .base import AdvantageInputs, Algorithm, LossInputs, Metrics, Needs, register
from .common import (
    agg_loss,
    check_choice,
    clipped_surrogate,
    masked,
    masked_mean,
    to_floats,
)

PENALTY_MODES = ("differentiable", "reference")
PENALTY_KL_KINDS = ("k1+", "k1")
REWARD_NORMS = ("running", "batch", "none")
CONTROLLER_KINDS = ("entropy_aware", "asymmetric")
VALUE_LOSSES = ("huber_sum", "squared_max")
# Metric keys the controllers read in update(); the first four come from ``advantages``, the
# last from ``loss`` (average it over micro-batches; only the entropy-aware controller reads it).
CONTROLLER_KEYS = ("safe/kl", "safe/reward_raw_mean", "safe/reward_raw_var", "safe/reward_count",
                   "safe/rollout_entropy")
_INIT_STATS = (1e-4, 0.0, 1.0)  # RewardNormalizer: count, mean, var


@dataclass
class SAFEConfig:
    """SAFE hyperparameters (paper symbols in brackets; reference ``SAFEConfig`` names in quotes)."""

    clip: float = 0.2
    """[ε] PPO clip, "clip_range" (no dual clip in the reference)."""
    entropy_coef: float = 0.01
    """[c_H] entropy bonus, "entropy_coef"."""
    value_coef: float = 0.5
    """[c_V] weight of the critic loss in the total (hard-coded 0.5)."""
    clip_vf: float = 0.2
    """Value clip around V_old, "clip_vf"."""
    huber_delta: float = 0.5
    """[δ] Huber threshold of the value loss."""
    alpha_softmin: float = 0.3
    """[α] soft-min temperature of the double critic, "alpha_softmin" (config 0.3; class default 0.5)."""
    kl_base_threshold: float = 0.3
    """[τ_base] base KL threshold, "kl_base_threshold"."""
    entropy_floor: float = 2.0
    """[H_floor] entropy floor (nats) of the gate, "entropy_floor"."""
    kp: float = 0.3
    """[K_p] PID proportional gain."""
    ki: float = 0.01
    """[K_i] PID integral gain."""
    kd: float = 0.05
    """[K_d] PID derivative gain."""
    penalty_coef: float = 0.1
    """Coefficient of the quadratic penalty (hard-coded 0.1)."""
    penalty_mode: str = "differentiable"
    """``differentiable`` (default) or ``reference`` (no gradient, as the reference code)."""
    penalty_kl_kind: str = "k1+"
    """KL estimator whose gradient the differentiable penalty uses: ``k1+`` or ``k1``."""
    reward_norm: str = "batch"
    """``batch`` (default: this batch's statistics), ``running`` (reference parity: running statistics
    from the controller, needs ``AdvantageInputs.controller``) or ``none``."""
    entropy_over_padding: bool = False
    """True: average the entropy over all positions, padding included (reference behaviour)."""
    controller: str = "entropy_aware"
    """KL controller: ``entropy_aware`` (default; the paper's ``SAFETrainer``) or ``asymmetric``
    (the reference's sibling ``AsymmetricKLTrainer``)."""
    kl_threshold: float = 0.3
    """[τ] asymmetric controller: KL above which the quadratic term acts, "kl_threshold"."""
    lambda_asymmetric: float = 0.1
    """[λ_asym] asymmetric controller: quadratic-term strength, "kl_lambda_asymmetric"."""
    lambda_momentum: float = 5.0
    """[λ_mom] asymmetric controller: momentum-term strength, "kl_lambda_momentum"."""
    momentum_window: int = 50
    """[W] asymmetric controller: calls spanned by the KL momentum, "kl_momentum_window"."""
    value_loss: str = "huber_sum"
    """Critic loss per sequence: ``huber_sum`` 0.5·[Huber(V, R) + Huber(V_clip, R)] (``SAFETrainer``)
    or ``squared_max`` 0.5·max((V − R)², (V_clip − R)²) (``AsymmetricKLTrainer``)."""

    def __post_init__(self) -> None:
        check_choice("penalty_mode", self.penalty_mode, PENALTY_MODES)
        check_choice("penalty_kl_kind", self.penalty_kl_kind, PENALTY_KL_KINDS)
        check_choice("reward_norm", self.reward_norm, REWARD_NORMS)
        check_choice("controller", self.controller, CONTROLLER_KINDS)
        check_choice("value_loss", self.value_loss, VALUE_LOSSES)
        if self.alpha_softmin <= 0:
            raise ValueError(f"alpha_softmin must be > 0, got {self.alpha_softmin}")
        if self.momentum_window < 2:
            raise ValueError(f"momentum_window must be >= 2, got {self.momentum_window}")


def soft_min(v1: Tensor, v2: Tensor, alpha: float) -> Tensor:
    """V = −α·(logsumexp(−V1/α, −V2/α) − log 2): the double critic's pessimistic value (V_soft)."""
    stacked = torch.stack([-v1 / alpha, -v2 / alpha], dim=-1)
    return -alpha * (torch.logsumexp(stacked, dim=-1) - math.log(2.0))


def last_valid(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """x at each row's last position with mask 1 (position 0 for an empty row). [B, T(, K)] → [B(, K)]."""
    t = torch.arange(mask_B_T.shape[-1], device=mask_B_T.device)
    pos = (mask_B_T.bool().long() * t).argmax(-1)
    idx = pos.view(-1, 1, *([1] * (x_B_T.dim() - 2))).expand(-1, 1, *x_B_T.shape[2:])
    return x_B_T.gather(1, idx).squeeze(1)


def seq_values(values: Tensor, mask_B_T: Tensor, alpha: float) -> Tensor:
    """Sequence value V_B from [B, T] (combined) or [B, T, 2] (two heads, soft-min) critic outputs."""
    v = last_valid(values, mask_B_T)
    return soft_min(v[..., 0], v[..., 1], alpha) if values.dim() == 3 else v


def merge_stats(prior: tuple[float, float, float], batch: tuple[float, float, float]) -> tuple[float, float, float]:
    """Chan's parallel merge of (count, mean, var) with population variances."""
    (na, ma, va), (nb, mb, vb) = prior, batch
    n = na + nb
    d = mb - ma
    mean = ma + d * nb / n
    var = (va * na + vb * nb + d * d * na * nb / n) / n
    return n, mean, var


def _batch_stats(r_B: Tensor) -> tuple[float, float, float]:
    r = r_B.detach().double()
    return float(r.numel()), float(r.mean()), float(r.var(unbiased=False))


def normalized_rewards(inp: AdvantageInputs, cfg: SAFEConfig) -> Tensor:
    """R = (r − μ)/(√var + 1e−8), the statistics merged with this batch first (``RewardNormalizer``).

    ``reward_norm="running"``: prior statistics from ``inp.controller``; ``"batch"``: from the
    normalizer's initial state (count 1e−4, mean 0, var 1), i.e. this batch alone; ``"none"``: r.
    Shapes: [B] → [B] float64.
    """
    r = inp.rewards_B.detach().double()
    if cfg.reward_norm == "none":
        return r
    prior = _INIT_STATS
    if cfg.reward_norm == "running":
        ctrl = getattr(inp, "controller", None)
        if not ctrl or "reward_count" not in ctrl:
            raise ValueError("safe reward_norm='running' needs the controller's reward statistics "
                             "in AdvantageInputs.controller; use reward_norm='batch' otherwise")
        prior = (ctrl["reward_count"], ctrl["reward_mean"], ctrl["reward_var"])
    _, mu, var = merge_stats(prior, _batch_stats(r))
    return (r - mu) / (math.sqrt(var) + 1e-8)


def _float_dtype(mask_B_T: Tensor) -> torch.dtype:
    return mask_B_T.dtype if mask_B_T.is_floating_point() else torch.float32


def safe_returns(inp: AdvantageInputs, cfg: SAFEConfig) -> Tensor:
    """Critic target R (normalized reward), broadcast over the response tokens. [B] → [B, T]."""
    R = normalized_rewards(inp, cfg).to(_float_dtype(inp.mask_B_T))
    return masked(R.unsqueeze(-1).expand(inp.mask_B_T.shape), inp.mask_B_T)


def safe_advantages(inp: AdvantageInputs, cfg: SAFEConfig) -> tuple[Tensor, Metrics]:
    """A = batch-normalize(R − V_old), broadcast over tokens; emits the controller inputs."""
    if inp.values_B_T is None:
        raise ValueError("safe needs critic values (Needs.values)")
    stats = _batch_stats(inp.rewards_B)
    R = normalized_rewards(inp, cfg)
    diff = R - seq_values(inp.values_B_T.detach(), inp.mask_B_T, cfg.alpha_softmin).double()
    # torch.std of one element is NaN (unbiased std): a batch of one gets A = 0.
    adv_B = (diff - diff.mean()) / (diff.std() + 1e-8) if diff.numel() > 1 else torch.zeros_like(diff)
    adv = masked(adv_B.to(_float_dtype(inp.mask_B_T)).unsqueeze(-1).expand(inp.mask_B_T.shape), inp.mask_B_T)
    kl = masked_mean(kl_estimate(inp.old_logp_B_T, inp.ref_logp_B_T, "k1", mask=inp.mask_B_T),
                     inp.mask_B_T) if inp.old_logp_B_T is not None and inp.ref_logp_B_T is not None else 0.0
    return adv, {"safe/kl": float(kl), "safe/reward_raw_mean": stats[1], "safe/reward_raw_var": stats[2],
                 "safe/reward_count": stats[0], "safe/return_mean": float(R.mean())}


def safe_penalty(inp: LossInputs, cfg: SAFEConfig) -> tuple[Tensor, Tensor]:
    """This micro-batch's share of P_KL (docs/algorithms.md § SAFE); returns (term, detached KL share).

    Value: P (the controller's) × local tokens / num_tokens_global, so shares sum to P. Gradient
    (differentiable mode): β_t·∇KL_share with KL_share = Σ m·k(ℓ, ℓ^ref) / N_global and β_t the
    configured controller's ``penalty_slope`` (0 while its penalty is off).
    """
    c = inp.controller
    n_glob = max(float(inp.num_tokens_global), 1.0)
    k = kl_estimate(inp.logp_B_T, inp.ref_logp_B_T, cfg.penalty_kl_kind, mask=inp.mask_B_T)
    kl_share = k.sum() / n_glob
    share = float(inp.mask_B_T.bool().sum()) / n_glob
    value = float(c.get("penalty", 0.0)) * share
    term = kl_share.new_tensor(value)
    if cfg.penalty_mode == "differentiable":
        beta = CONTROLLERS[cfg.controller].penalty_slope(c, cfg)
        if beta != 0.0:
            term = term + beta * (kl_share - kl_share.detach())
    return term, kl_share.detach()


def _entropy_term(inp: LossInputs, cfg: SAFEConfig) -> tuple[Tensor, float]:
    """−c_H·mean H (masked token-mean with global count, or over all positions as the reference)."""
    h = inp.entropy_B_T
    if cfg.entropy_over_padding:
        mean_h = torch.nan_to_num(h).sum() / max(float(inp.num_seqs_global) * h.shape[-1], 1.0)
    else:
        mean_h = agg_loss(h, inp.mask_B_T, "token-mean", num_tokens=inp.num_tokens_global)
    keep = inp.mask_B_T.bool()
    per_seq = masked(h.detach(), keep).sum(-1) / keep.sum(-1).clamp(min=1)
    return -cfg.entropy_coef * mean_h, float(per_seq.mean()) if per_seq.numel() else 0.0


def safe_loss(inp: LossInputs, cfg: SAFEConfig) -> tuple[Tensor, Metrics]:
    """PPO clip (token-mean) + P_KL − c_H·H; the critic's is ``critic_loss`` (docs/algorithms.md § SAFE)."""
    if inp.old_logp_B_T is None or inp.ref_logp_B_T is None or inp.entropy_B_T is None:
        raise ValueError("safe needs old/ref log-probs and entropy (Needs.old_logp, ref_logp, entropy)")
    per_tok, metrics = clipped_surrogate(inp.logp_B_T, inp.old_logp_B_T, inp.advantages_B_T, inp.mask_B_T,
                                         clip_low=cfg.clip, clip_high=cfg.clip, dual_clip_c=None)
    pg = agg_loss(per_tok, inp.mask_B_T, "token-mean", num_tokens=inp.num_tokens_global)
    penalty, kl_share = safe_penalty(inp, cfg)
    ent, h_roll = _entropy_term(inp, cfg)
    metrics.update({"pg_loss": pg.detach(), "safe/penalty": penalty.detach(), "safe/kl_share": kl_share})
    out = to_floats(metrics)
    out["safe/rollout_entropy"] = h_roll
    return pg + penalty + ent, out


def safe_critic_loss(inp: LossInputs, cfg: SAFEConfig) -> tuple[Tensor, Metrics]:
    """c_V·Σ_i 0.5·[Huber(V_i, R_i) + Huber(V_clip,i, R_i)] / num_seqs_global (docs/algorithms.md § SAFE).

    ``value_loss="squared_max"`` uses 0.5·max((V − R)², (V_clip − R)²) per sequence instead.
    ``values_B_T`` are the differentiable critic outputs ([B, T] or [B, T, 2]); ``returns_B_T`` the
    normalized reward R; ``old_values_B_T`` (if the runtime provides it) V_old for the clip —
    without it V_clip = V, i.e. the plain Huber (or squared) loss.
    """
    if inp.values_B_T is None or inp.returns_B_T is None:
        raise ValueError("safe critic_loss needs values_B_T and returns_B_T")
    v = seq_values(inp.values_B_T, inp.mask_B_T, cfg.alpha_softmin)
    ret = last_valid(inp.returns_B_T.detach(), inp.mask_B_T).to(v.dtype)
    old = getattr(inp, "old_values_B_T", None)
    v_old = seq_values(old.detach(), inp.mask_B_T, cfg.alpha_softmin) if old is not None else None
    v_clip = v if v_old is None else v_old + (v - v_old).clamp(-cfg.clip_vf, cfg.clip_vf)
    if cfg.value_loss == "huber_sum":
        hub = F.huber_loss(v, ret, reduction="none", delta=cfg.huber_delta)
        hub_clip = F.huber_loss(v_clip, ret, reduction="none", delta=cfg.huber_delta)
        per_seq = 0.5 * (hub + hub_clip)
    else:  # the pessimistic PPO value clip: the larger of the two squared errors
        per_seq = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    loss = cfg.value_coef * per_seq.sum() / max(float(inp.num_seqs_global), 1.0)
    return loss, {"safe/value_loss": float(per_seq.detach().mean()), "safe/value_mean": float(v.detach().mean())}


def phase_multiplier(rewards: list[float]) -> tuple[float, str]:
    """Phase detector on the reward history (``PhaseDetector``): (threshold multiplier, phase name)."""
    if len(rewards) < 50:
        return 1.5, "warmup"
    recent = torch.tensor(rewards[-50:], dtype=torch.float64)
    old = torch.tensor(rewards[-100:-50], dtype=torch.float64) if len(rewards) >= 100 else recent
    if float(recent.mean()) > float(old.mean()) + 0.01:
        return 1.2, "climbing"
    if float(recent.std(unbiased=False)) < 0.02 and float(recent.mean()) > 0.7:
        return 1.0, "converged"
    return 0.8, "plateau"


def _find_keys(metrics: Mapping[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """``keys``, found as-is or under a stage prefix (``adv/safe/kl``, ``loss/...``)."""
    out, missing = {}, []
    for key in keys:
        hits = [k for k in metrics if k == key or k.endswith("/" + key)]
        if hits:
            out[key] = float(metrics[hits[0]])
        else:
            missing.append(key)
    if missing:
        raise KeyError(f"SAFE controller update needs metric(s) {missing} (optionally stage-prefixed)")
    return out


class _Controller:
    """What SAFE's two KL controllers share: the running reward statistics of the reference's
    ``RewardNormalizer`` (merged once per call) and a JSON-friendly checkpoint state.

    Subclasses name their metric inputs (``KEYS``), their float state (``SCALARS``) and their
    list-of-floats state (``LISTS``), and give ``penalty_slope``: dP/dKL_batch from ``values()``,
    the coefficient of the differentiable penalty's gradient.
    """

    KEYS: tuple[str, ...] = ()
    SCALARS: tuple[str, ...] = ()
    LISTS: tuple[str, ...] = ()

    def __init__(self, cfg: SAFEConfig):
        self.cfg = cfg
        self.penalty = 0.0
        self.calls = 0
        self.reward_stats = _INIT_STATS

    def _read(self, metrics: Mapping[str, float]) -> dict[str, float]:
        got = _find_keys(metrics, self.KEYS)
        batch = (got["safe/reward_count"], got["safe/reward_raw_mean"], got["safe/reward_raw_var"])
        self.reward_stats = merge_stats(self.reward_stats, batch)
        return got

    def _reward_values(self) -> dict[str, float]:
        n, mean, var = self.reward_stats
        return {"reward_count": n, "reward_mean": mean, "reward_var": var}

    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.SCALARS}
        state.update({k: list(getattr(self, k)) for k in self.LISTS})
        state["reward_stats"] = list(self.reward_stats)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            if k in self.LISTS:
                setattr(self, k, [float(x) for x in v])
            elif k == "reward_stats":
                self.reward_stats = tuple(float(x) for x in v)
            elif k in self.SCALARS:
                setattr(self, k, v)
            else:
                raise KeyError(f"{type(self).__name__}.load_state_dict: unknown key {k!r}")


class SafeController(_Controller):
    """SAFE's entropy-aware predictive KL controller (docs/algorithms.md § SAFE).

    ``update(metrics)`` is one reference ``compute_penalty(kl, entropy, reward)`` call (plus the
    reward-normalizer merge) and reads :data:`CONTROLLER_KEYS`; ``values()`` exposes the state the
    next loss and advantage use; ``state_dict``/``load_state_dict`` round-trip it for checkpoints.
    """

    HISTORY = 100  # the phase detector looks at the last 100 rewards at most
    KEYS = CONTROLLER_KEYS
    SCALARS = ("kl_short", "kl_long", "pid_ema", "integral", "prev_error", "threshold", "gate",
               "gate_open", "penalty", "calls")
    LISTS = ("rewards",)

    def __init__(self, cfg: SAFEConfig):
        super().__init__(cfg)
        self.kl_short = 0.0
        self.kl_long = 0.0
        self.rewards: list[float] = []
        self.pid_ema: float | None = None
        self.integral = 0.0
        self.prev_error = 0.0
        self.threshold = min(max(cfg.kl_base_threshold * 1.5, 0.1), 0.6)
        self.gate = 1.0
        self.gate_open = 0.0

    def _pid(self, reward: float) -> float:
        if self.pid_ema is None:  # first call: seed the EMA, output 0, integral untouched
            self.pid_ema = reward
            return 0.0
        ema_new = 0.95 * self.pid_ema + 0.05 * reward
        err = (ema_new - self.pid_ema) - 0.001
        self.pid_ema = ema_new
        self.integral = min(max(self.integral + err, -1.0), 1.0)
        out = self.cfg.kp * err + self.cfg.ki * self.integral + self.cfg.kd * (err - self.prev_error)
        self.prev_error = err
        return out

    def update(self, metrics: Mapping[str, float]) -> Metrics:
        got = self._read(metrics)
        kl, reward, entropy = got["safe/kl"], got["safe/reward_raw_mean"], got["safe/rollout_entropy"]
        self.kl_short = 0.9 * self.kl_short + 0.1 * kl
        self.kl_long = 0.99 * self.kl_long + 0.01 * kl
        self.rewards = (self.rewards + [reward])[-self.HISTORY:]
        mult, phase = phase_multiplier(self.rewards)
        pid = self._pid(reward)
        self.threshold = min(max((self.cfg.kl_base_threshold + pid) * mult, 0.1), 0.6)
        if self.kl_short > self.threshold:
            self.gate = max(0.5, self.cfg.entropy_floor / (entropy + 0.1))
            self.gate_open = 1.0
            self.penalty = self.cfg.penalty_coef * (self.kl_short - self.threshold) ** 2 * self.gate
        else:
            self.gate, self.gate_open, self.penalty = 1.0, 0.0, 0.0
        self.calls += 1
        return {"safe/kl_short": self.kl_short, "safe/kl_long": self.kl_long, "safe/threshold": self.threshold,
                "safe/phase_multiplier": mult, "safe/pid_out": pid, "safe/gate": self.gate,
                "safe/penalty_reference": self.penalty, f"safe/phase_{phase}": 1.0}

    def values(self) -> dict[str, float]:
        return {"kl_short": self.kl_short, "threshold": self.threshold, "gate": self.gate,
                "gate_open": self.gate_open, "penalty": self.penalty, **self._reward_values()}

    @staticmethod
    def penalty_slope(c: Mapping[str, float], cfg: SAFEConfig) -> float:
        """dP/dKL_batch while the gate is open: P = coef·g·(kl_short − τ)² and ∂kl_short/∂KL = 0.1."""
        if c.get("gate_open", 0.0) <= 0:
            return 0.0
        return 2.0 * cfg.penalty_coef * c["gate"] * (c["kl_short"] - c["threshold"]) * 0.1


class AsymmetricKLController(_Controller):
    """The reference's asymmetric-KL controller, with the same running reward statistics.

    Per call, on the raw signed KL (no EMA): P = λ_asym·(KL − τ)² if KL > τ (a negative or small
    KL is never penalized), plus λ_mom·m² if m > 0, where m = (KL_now − KL_old)/W and KL_old is the
    oldest of the last W values (W − 1 calls back; the reference divides by W all the same). With
    fewer than W values there is no momentum term. The history keeps the last 2W values, as the
    reference does. docs/algorithms.md § SAFE.
    """

    KEYS = CONTROLLER_KEYS[:4]  # no entropy gate
    SCALARS = ("kl", "momentum", "asym_penalty", "momentum_penalty", "penalty", "calls")
    LISTS = ("kl_history",)

    def __init__(self, cfg: SAFEConfig):
        super().__init__(cfg)
        self.kl = 0.0
        self.momentum = 0.0
        self.asym_penalty = 0.0
        self.momentum_penalty = 0.0
        self.kl_history: list[float] = []

    def update(self, metrics: Mapping[str, float]) -> Metrics:
        kl = self._read(metrics)["safe/kl"]
        w, cfg = self.cfg.momentum_window, self.cfg
        self.kl = kl
        self.kl_history = (self.kl_history + [kl])[-2 * w:]
        over = kl - cfg.kl_threshold
        self.asym_penalty = cfg.lambda_asymmetric * over ** 2 if over > 0 else 0.0
        self.momentum = (kl - self.kl_history[-w]) / w if len(self.kl_history) >= w else 0.0
        self.momentum_penalty = cfg.lambda_momentum * self.momentum ** 2 if self.momentum > 0 else 0.0
        self.penalty = self.asym_penalty + self.momentum_penalty
        self.calls += 1
        return {"safe/kl_momentum": self.momentum, "safe/asym_penalty": self.asym_penalty,
                "safe/momentum_penalty": self.momentum_penalty, "safe/penalty_reference": self.penalty,
                "safe/asym_active": float(kl > cfg.kl_threshold)}

    def values(self) -> dict[str, float]:
        return {"kl": self.kl, "threshold": self.cfg.kl_threshold, "momentum": self.momentum,
                "penalty": self.penalty, **self._reward_values()}

    @staticmethod
    def penalty_slope(c: Mapping[str, float], cfg: SAFEConfig) -> float:
        """dP/dKL: 2λ_asym·(KL − τ) above τ, plus 2λ_mom·m/W while the momentum is positive."""
        kl, m = c.get("kl", 0.0), c.get("momentum", 0.0)
        slope = 2.0 * cfg.lambda_asymmetric * (kl - cfg.kl_threshold) if kl > cfg.kl_threshold else 0.0
        if m > 0:
            slope += 2.0 * cfg.lambda_momentum * m / cfg.momentum_window
        return slope


CONTROLLERS: dict[str, type[_Controller]] = {"entropy_aware": SafeController,
                                             "asymmetric": AsymmetricKLController}


def make_controller(cfg: SAFEConfig) -> _Controller:
    """The KL controller named by ``cfg.controller`` (one of :data:`CONTROLLER_KINDS`)."""
    return CONTROLLERS[cfg.controller](cfg)


def safe_needs(cfg: SAFEConfig) -> Needs:
    """π_old, π_ref (controller KL and penalty), critic values and the differentiable entropy."""
    return Needs(old_logp=True, ref_logp=True, values=True, entropy=True)


SAFE = register(Algorithm(name="safe", config_cls=SAFEConfig, needs=safe_needs,
                          loss=safe_loss, advantages=safe_advantages, make_controller=make_controller,
                          critic_loss=safe_critic_loss, returns=safe_returns,
                          advantage_reads=frozenset({"old_logp", "ref_logp", "values"})))

"""The algorithm contract: what every algorithm provides and what the runtime gives it.

The training loop never branches on an algorithm's name. It reads ``Algorithm.needs(cfg)`` to
decide which passes to run (reference, teacher, critic, full-vocabulary KL, entropy), builds an
``AdvantageInputs`` (online algorithms) and then, per micro-batch, a ``LossInputs`` or
``PairLossInputs``, and calls the algorithm's pure functions.

Shapes: B responses (or P preference pairs), T padded response length. Every ``*_B_T`` tensor is
aligned with ``mask_B_T`` (1 on real response tokens, EOS included; 0 on padding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Protocol

from torch import Tensor

Metrics = dict[str, float]


@dataclass(frozen=True)
class Needs:
    """Which runtime passes an algorithm (with a given config) needs. Default: plain policy gradient."""

    old_logp: bool = True
    """π_old log-probs of the sampled tokens (recomputed by the learner before the update)."""
    ref_logp: bool = False
    """Reference-model log-probs of the sampled tokens (frozen reference worker)."""
    ref_temper_phi: Optional[float] = None
    """If set, the reference worker also returns log q_φ(y_t) (RAPO tempering, exact normalization)."""
    teacher_logp: bool = False
    """Teacher-model log-probs of the sampled tokens (ExOPD / G-OPD)."""
    ref_full_kl: bool = False
    """Exact per-token full-vocabulary KL(π_ref(·|s_t) ‖ π_θ(·|s_t)), differentiable (TDPO)."""
    values: bool = False
    """Critic values per response token (SAFE)."""
    entropy: bool = False
    """Per-token entropy of π_θ (differentiable) in the loss pass."""
    pairs: bool = False
    """Preference pairs (chosen/rejected) instead of scored rollout groups (f-DPO, TDPO)."""

    @property
    def reference(self) -> bool:
        """A frozen reference model must be loaded: some pass reads its log-probs or distribution."""
        return self.ref_logp or self.ref_full_kl or self.ref_temper_phi is not None


@dataclass(frozen=True)
class FilterPolicy:
    """How the driver honours an algorithm's group filter (e.g. DAPO's dynamic sampling).

    The driver draws generation batches until ``prompts_per_step`` groups survive the filter or
    ``max_rounds`` batches were drawn (0 = unlimited); surplus groups carry over to the next step.
    When rounds run out short, ``on_short="raise"`` stops the run with the counts, and
    ``on_short="train"`` trains on the groups it has and logs ``filter/short_groups``.
    """

    max_rounds: int = 1
    on_short: Literal["raise", "train"] = "train"

    def __post_init__(self) -> None:
        if self.max_rounds < 0:
            raise ValueError(f"FilterPolicy.max_rounds must be >= 0 (0 = unlimited), got {self.max_rounds}")
        if self.on_short not in ("raise", "train"):
            raise ValueError(f"FilterPolicy.on_short must be 'raise' or 'train', got {self.on_short!r}")


@dataclass
class AdvantageInputs:
    """What an online algorithm's advantage function receives (all detached)."""

    rewards_B: Tensor
    """Scalar outcome reward per response (already the weighted sum of the reward components)."""
    group_ids_B: Tensor
    """int64 prompt-group id per response; responses of one prompt share it."""
    mask_B_T: Tensor
    old_logp_B_T: Optional[Tensor] = None
    ref_logp_B_T: Optional[Tensor] = None
    ref_tempered_logp_B_T: Optional[Tensor] = None
    teacher_logp_B_T: Optional[Tensor] = None
    values_B_T: Optional[Tensor] = None
    truncated_B: Optional[Tensor] = None
    """bool: the response hit the length limit without EOS."""
    controller: Mapping[str, float] = field(default_factory=dict)
    """Read-only scalars from the algorithm's controller (e.g. SAFE's running reward statistics)."""


@dataclass
class LossInputs:
    """One micro-batch of an online update.

    ``num_tokens_global`` / ``num_seqs_global`` are the counts over the *whole* optimizer step
    (all micro-batches, all data-parallel ranks), so that summing micro-batch losses gives exactly
    the loss of the full batch (global normalization under gradient accumulation).
    """

    logp_B_T: Tensor
    """log π_θ(y_t|s_t), differentiable, temperature-scaled like the sampler."""
    mask_B_T: Tensor
    advantages_B_T: Tensor
    num_tokens_global: float
    num_seqs_global: float
    old_logp_B_T: Optional[Tensor] = None
    ref_logp_B_T: Optional[Tensor] = None
    ref_tempered_logp_B_T: Optional[Tensor] = None
    teacher_logp_B_T: Optional[Tensor] = None
    entropy_B_T: Optional[Tensor] = None
    """Differentiable per-token entropy (only when ``Needs.entropy``)."""
    ref_full_kl_B_T: Optional[Tensor] = None
    """Differentiable exact KL(π_ref‖π_θ) per token (only when ``Needs.ref_full_kl``)."""
    values_B_T: Optional[Tensor] = None
    """Critic predictions, differentiable in the critic (only when ``Needs.values``)."""
    old_values_B_T: Optional[Tensor] = None
    """Critic predictions at rollout time, detached (value clipping)."""
    returns_B_T: Optional[Tensor] = None
    rewards_B: Optional[Tensor] = None
    max_response_len: int = 0
    controller: Mapping[str, float] = field(default_factory=dict)
    """Read-only scalars from the algorithm's controller (e.g. SAFE's KL threshold)."""


@dataclass
class PairLossInputs:
    """One micro-batch of a preference update over P pairs (chosen ``c`` / rejected ``r``)."""

    logp_c_P_T: Tensor
    logp_r_P_T: Tensor
    mask_c_P_T: Tensor
    mask_r_P_T: Tensor
    ref_logp_c_P_T: Tensor
    ref_logp_r_P_T: Tensor
    num_pairs_global: float
    ref_full_kl_c_P_T: Optional[Tensor] = None
    ref_full_kl_r_P_T: Optional[Tensor] = None


class Controller(Protocol):
    """A stateful controller (adaptive KL, SAFE's PID). Its state is saved in checkpoints."""

    def update(self, metrics: Mapping[str, float]) -> Metrics: ...
    def values(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Algorithm:
    """One registry entry. Every callable is pure except the controller object it builds."""

    name: str
    config_cls: type
    """A dataclass whose fields carry the paper's defaults (documented, mapped to paper symbols)."""
    needs: Callable[[Any], Needs]
    loss: Callable[[Any, Any], tuple[Tensor, Metrics]]
    """online: (LossInputs, cfg) -> (loss, metrics); preference: (PairLossInputs, cfg) -> ..."""
    advantages: Optional[Callable[[AdvantageInputs, Any], tuple[Tensor, Metrics]]] = None
    """online only: -> (advantages_B_T, metrics)."""
    group_filter: Optional[Callable[[Tensor, Tensor, Any], Tensor]] = None
    """(raw_rewards_B, group_ids_B, cfg) -> keep_B bool; e.g. DAPO's dynamic sampling."""
    filter_policy: Callable[[Any], FilterPolicy] = lambda cfg: FilterPolicy()
    """cfg -> how many generation batches the driver may draw for the filter, and what it does
    when they run out short (only read when ``group_filter`` is set)."""
    make_controller: Optional[Callable[[Any], Controller]] = None
    critic_loss: Optional[Callable[[LossInputs, Any], tuple[Tensor, Metrics]]] = None
    """Loss of the critic's values (``Needs.values``); trained beside the policy in the learner."""
    linear_in_advantage: bool = True
    """The loss is linear in A where unclipped, so truncated IS may scale A per token."""
    returns: Optional[Callable[[AdvantageInputs, Any], Tensor]] = None
    """Value targets R_B_T for the critic (with ``critic_loss``), from the same inputs as the advantage."""
    advantage_reads: Optional[frozenset[str]] = None
    """The side-pass tensors (``old_logp``, ``ref_logp``, ``ref_tempered_logp``, ``teacher_logp``,
    ``values``) that ``advantages``/``returns`` read: only these travel from the learners back to
    the driver; the rest stay with the learner's shard for the loss. None: all of them."""

    @property
    def kind(self) -> Literal["online", "preference"]:
        """"preference" when the algorithm trains on chosen/rejected pairs (``Needs.pairs``)."""
        return "preference" if self.needs(self.config_cls()).pairs else "online"

    def make_config(self, overrides: Mapping[str, Any] | None = None, source: str = "<config>"):
        """Build this algorithm's config, failing with the key and ``source`` on a bad field."""
        overrides = dict(overrides or {})
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {unknown} for algorithm '{self.name}'; "
                f"valid keys: {sorted(names)}"
            )
        try:
            return self.config_cls(**overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: algorithm '{self.name}': {e}") from e


@dataclass(frozen=True)
class AlgorithmSetup:
    """An algorithm with its validated config and the passes that config needs: built once per run
    (:meth:`build`) and handed to the driver, the runtime, every learner rank and ``rlkit plan``."""

    algo: Algorithm
    cfg: Any
    needs: Needs

    @classmethod
    def build(cls, name: str, args: Mapping[str, Any] | None = None, source: str = "<config>") -> "AlgorithmSetup":
        algo = get(name)
        cfg = algo.make_config(args, source=source)
        return cls(algo, cfg, algo.needs(cfg))

    @property
    def filter_policy(self) -> FilterPolicy:
        return self.algo.filter_policy(self.cfg)


_REGISTRY: dict[str, Algorithm] = {}


def register(algo: Algorithm) -> Algorithm:
    if algo.name in _REGISTRY:
        raise ValueError(f"algorithm '{algo.name}' registered twice")
    _REGISTRY[algo.name] = algo
    return algo


def get(name: str) -> Algorithm:
    """The algorithm registered as ``name``; an unknown name raises and lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown algorithm '{name}'; valid: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


__all__ = [
    "Algorithm", "AlgorithmSetup", "AdvantageInputs", "Controller", "FilterPolicy", "LossInputs", "Metrics", "Needs",
    "PairLossInputs", "get", "names", "register",
]

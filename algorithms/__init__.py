"""rlkit.algorithms: the KL-regularized algorithms as pure tensor functions, behind one registry.

``rlkit.algorithms.get(name)`` returns an :class:`~rlkit.algorithms.base.Algorithm`; an unknown
name raises and lists the valid ones. Importing this package needs only torch.
"""

import importlib

from .base import Algorithm, AdvantageInputs, LossInputs, Needs, PairLossInputs, get, names

# Each module registers itself on import (kl_cov registers both kl_cov and clip_cov).
for _mod in ("grpo", "dapo", "rpg", "kl_cov", "pmd_mean", "exopd", "rapo", "safe", "fdpo", "tdpo"):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["Algorithm", "AdvantageInputs", "LossInputs", "Needs", "PairLossInputs", "get", "names"]

"""Weight sync of a LoRA policy: only the adapters travel.

The learner sends, per adapted module, the factors ``A`` [r, in] and ``B`` [out, r] and the scale
``alpha / r`` under the module's Hugging Face weight name. The rollout worker keeps the frozen base
weights of those modules (read once from the model folder's safetensors, the same files its engine
loaded) and hands its engine ``W = W0 + scale · B A``, the weight PEFT's ``merge_and_unload`` would
produce. Every sync merges from the pristine base, so repeated syncs never accumulate error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraDelta:
    name: str
    """HF name of the adapted weight, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
    A: Tensor
    B: Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def merged(self, base: Tensor) -> Tensor:
        delta = (self.B.float() @ self.A.float()) * self.scaling
        if self.fan_in_fan_out:
            delta = delta.T
        return (base.float() + delta).to(base.dtype)


def lora_deltas(peft_model, adapter: str = "default") -> list[LoraDelta]:
    """The adapters of a PEFT model, one per adapted module (detached, not copied)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
            out.append(LoraDelta(
                name=name.removeprefix(PEFT_PREFIX) + ".weight", A=mod.lora_A[adapter].weight.detach(),
                B=mod.lora_B[adapter].weight.detach(), scaling=float(mod.scaling[adapter]),
                fan_in_fan_out=bool(getattr(mod, "fan_in_fan_out", False))))
    if not out:
        raise ValueError("LoRA sync: the model has no LoRA layers (check learner.lora.target_modules)")
    return out


def merged_weight(peft_model, name: str, deltas: dict[str, LoraDelta]) -> Tensor:
    """The weight the rollout engine must hold for HF name ``name`` (merged if adapted)."""
    params = dict(peft_model.named_parameters())
    if name in deltas:
        stem = PEFT_PREFIX + name.removesuffix(".weight")
        return deltas[name].merged(params[stem + ".base_layer.weight"].detach())
    return params[PEFT_PREFIX + name].detach()


class BaseWeights:
    """Frozen base tensors of a model folder, read lazily from its safetensors files."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self._files: dict[str, Path] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                    self._files[key] = path
        if not self._files:
            raise FileNotFoundError(f"LoRA sync: no *.safetensors in {model_dir} to read base weights from")
        self._cache: dict[str, Tensor] = {}

    def get(self, name: str) -> Tensor:
        if name not in self._cache:
            from safetensors import safe_open

            path = self._files.get(name)
            if path is None:
                raise KeyError(f"LoRA sync: base weight '{name}' not found in the model folder's safetensors")
            with safe_open(str(path), framework="pt") as f:
                self._cache[name] = f.get_tensor(name)
        return self._cache[name]

    def merge(self, deltas: list[LoraDelta]) -> list[tuple[str, Tensor]]:
        return [(d.name, d.merged(self.get(d.name))) for d in deltas]

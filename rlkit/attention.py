"""Attention for grouped-query models on the CPU: SDPA's own GQA instead of repeated KV heads.

transformers' ``sdpa`` attention hands SDPA grouped-query heads (``enable_gqa``) only when there is
no attention mask; with one (left-padded decode batches, the learner's packed masks) it first
repeats every key/value head ``num_attention_heads / num_key_value_heads`` times, which copies the
whole KV cache twice per layer at every decode step. On the CPU, torch's SDPA takes a mask and
``enable_gqa`` together, so :data:`NAME` ("rlkit_sdpa") is transformers' ``sdpa`` with the
repetition left to the kernel: the same scores and weighted sums, summed in the same order.

Measured on this repository's CPU machines at SmolLM2-135M's decode shape (64 rows, 9 query and 3
KV heads of 64, 60–100 cached positions, boolean mask, 2 threads): 6.4–7.9 ms per layer with the
repetition, 0.9–1.3 ms without (``docs/benchmarks.md``).

On CUDA transformers' own ``sdpa`` stays: a masked GQA call there can fall back to the math kernel
(see ``use_gqa_in_sdpa`` in transformers), where the repeated heads keep the fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "rlkit_sdpa"


def gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, Lq, D], key/value [B, Hkv, Lk, D],
    a boolean or additive mask broadcastable to [B, 1, Lq, Lk] (or None); returns [B, Lq, H, D]."""
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        raise ValueError(f"attention {NAME!r} takes no position bias or paged cache; use 'sdpa'")
    groups = query.shape[1] // key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > query.shape[2]:  # an empty static cache's prefill: keys beyond the queries
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`NAME` known to transformers (attention function and the ``sdpa`` mask format)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_gqa_kernel(model: torch.nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` to :data:`NAME` when it runs on the CPU and groups its KV heads.
    Returns whether it switched (a model on another attention implementation is left alone)."""
    config = model.config
    kv = getattr(config, "num_key_value_heads", None)
    grouped = kv is not None and kv < getattr(config, "num_attention_heads", kv)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not (grouped and on_cpu and getattr(config, "_attn_implementation", None) == "sdpa"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True

"""Per-token log-probs, entropy and exact KL of response tokens, through the fused kernel.

Logits are computed only at positions that score a response token (never at prompt positions),
chunk by chunk inside :func:`rlkit.kl.fused_token_logprobs`, so no [tokens × vocab] tensor exists.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlkit import kl
from rlkit.types import TrainBatch


def split_lm(model) -> tuple[torch.nn.Module, Tensor, Optional[Tensor]]:
    """(backbone returning final hidden states, LM-head weight [V, D], head bias or None)."""
    lm = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    if hasattr(lm, "get_base_model"):  # PEFT wrapper
        lm = lm.get_base_model()
    backbone = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    return backbone, head.weight, getattr(head, "bias", None)


def response_positions(batch: TrainBatch) -> tuple[Tensor, Tensor]:
    """Mask [B, L] of positions whose logits score a response token, and the labels there [N].

    Row-major order of the selected positions equals row-major order of ``response_mask_B_T``.
    """
    B, L = batch.input_ids_B_L.shape
    n_B = batch.response_mask_B_T.sum(-1).long()
    pos = torch.arange(L)[None, :]
    start = (batch.prompt_len_B - 1)[:, None]
    sel_B_L = (pos >= start) & (pos < start + n_B[:, None])
    labels_B_L = torch.roll(batch.input_ids_B_L, shifts=-1, dims=1)
    return sel_B_L, labels_B_L[sel_B_L]


def token_stats(model, batch: TrainBatch, *, temperature: float, chunk_size: int,
                with_entropy: bool = False, ref_model=None) -> dict[str, Tensor]:
    """``logp`` [B,T] (differentiable if grad is on), optional ``entropy`` and ``ref_full_kl``."""
    backbone, weight, bias = split_lm(model)
    hidden_B_L_D = backbone(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L).last_hidden_state
    sel_B_L, labels_N = response_positions(batch)
    hidden_N_D = hidden_B_L_D[sel_B_L]
    ref_kwargs = {}
    if ref_model is not None:
        ref_backbone, ref_weight, _ = split_lm(ref_model)
        with torch.no_grad():
            ref_h = ref_backbone(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L).last_hidden_state
        ref_kwargs = dict(ref_hidden_N_D=ref_h[sel_B_L], ref_weight_V_D=ref_weight.detach(), kl_direction="forward")
    out = kl.fused_token_logprobs(
        hidden_N_D, weight, labels_N, temperature=temperature, chunk_size=chunk_size,
        with_entropy=with_entropy, bias_V=bias, **ref_kwargs,
    )
    mask = batch.response_mask_B_T.bool()
    result = {"logp": _scatter(out.logp_N, mask)}
    if with_entropy and out.entropy_N is not None:
        result["entropy"] = _scatter(out.entropy_N, mask)
    if ref_model is not None and out.kl_N is not None:
        result["ref_full_kl"] = _scatter(out.kl_N, mask)
    return result


def _scatter(values_N: Tensor, mask_B_T: Tensor) -> Tensor:
    out = values_N.new_zeros(mask_B_T.shape)
    return out.masked_scatter(mask_B_T, values_N)

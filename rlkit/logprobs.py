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


def support_logprobs(logits_N_V: Tensor, sampling) -> Tensor:
    """log-softmax over the sampler's support: logits / T, then top-k and top-p truncation."""
    z = logits_N_V.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < z.shape[-1]:
        kth = torch.topk(z, sampling.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop_sorted = (probs.cumsum(-1) - probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def token_stats(model, batch: TrainBatch, *, temperature: float, chunk_size: int,
                with_entropy: bool = False, ref_model=None, truncation=None) -> dict[str, Tensor]:
    """``logp`` [B,T] (differentiable if grad is on), optional ``entropy`` and ``ref_full_kl``.

    ``truncation``: the sampler's SamplingConfig when it used top-k/top-p; log-probs are then over
    the same truncated support (the log-prob contract), through full logits at response positions
    (the fused kernel covers the temperature-only case)."""
    if truncation is not None and ref_model is not None:
        raise ValueError("exact full-vocabulary KL with top-k/top-p sampling is not supported")
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
    if truncation is not None and (truncation.top_k or truncation.top_p < 1.0):
        out = _truncated_stats(hidden_N_D, weight, bias, labels_N, truncation)
    else:
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


def _truncated_stats(hidden_N_D: Tensor, weight: Tensor, bias, labels_N: Tensor, sampling) -> "kl.FusedOut":
    """Log-probs and entropy of the sampler's truncated distribution (top-k/top-p after temperature)."""
    logits = hidden_N_D.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    lp_N_V = support_logprobs(logits, sampling)
    logp_N = lp_N_V.gather(-1, labels_N[:, None]).squeeze(-1)
    p = lp_N_V.exp()
    entropy_N = -torch.where(p > 0, p * lp_N_V, torch.zeros_like(p)).sum(-1)
    return kl.FusedOut(logp_N, entropy_N, None)

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
    sel_B_L, labels_N = response_positions(batch)
    hidden_N_D = response_hidden(backbone, batch, sel_B_L)
    ref_kwargs = {}
    if ref_model is not None:
        ref_backbone, ref_weight, _ = split_lm(ref_model)
        with torch.no_grad():
            ref_h = response_hidden(ref_backbone, batch, sel_B_L)
        ref_kwargs = dict(ref_hidden_N_D=ref_h, ref_weight_V_D=ref_weight.detach(), kl_direction="forward")
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


def response_hidden(backbone, batch: TrainBatch, sel_B_L: Tensor) -> Tensor:
    """Final hidden states [N, D] at the positions that score response tokens (``sel_B_L`` order).

    Rows sharing a prompt (a GRPO group) share one forward of that prompt: its KV cache is computed
    once and repeated for every row, and only the responses run per row. Gradients flow back through
    the shared cache, so this is the same computation as one full forward per row (up to float
    summation order). It is used when it saves work; gradient checkpointing (which drops the cache)
    and batches without repeated prompts take a plain full forward.
    """
    plan = _shared_prompt_plan(batch)
    if plan is None or getattr(backbone, "is_gradient_checkpointing", False):
        return backbone(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L).last_hidden_state[sel_B_L]
    from transformers import DynamicCache

    prompts, row_prompt_B, n_B = plan
    plen_B = batch.prompt_len_B
    # Prefix: every distinct prompt but its last token, left-padded, once.
    width = max(len(p) for p in prompts) - 1
    cache = DynamicCache(config=backbone.config)
    pre_mask_U_W = torch.zeros(len(prompts), width, dtype=torch.long)
    if width > 0:
        pre_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for u, p in enumerate(prompts):
            if len(p) > 1:
                pre_ids[u, width - len(p) + 1:] = torch.tensor(p[:-1])
                pre_mask_U_W[u, width - len(p) + 1:] = 1
        pre_pos = (pre_mask_U_W.cumsum(-1) - 1).clamp(min=0)
        backbone(input_ids=pre_ids, attention_mask=pre_mask_U_W, position_ids=pre_pos, past_key_values=cache,
                 use_cache=True)
        cache.batch_select_indices(row_prompt_B)
    # Suffix per row: the prompt's last token, then the response but its last token.
    S = max(int(n_B.max()), 1)
    B = batch.size
    pos_S = torch.arange(S)
    take_B_S = (pos_S[None, :] < n_B[:, None].clamp(min=1))
    src_B_S = (plen_B - 1)[:, None] + pos_S[None, :]
    suf_ids = torch.where(take_B_S, batch.input_ids_B_L.gather(1, src_B_S.clamp(max=batch.input_ids_B_L.shape[1] - 1)), 0)
    mask = torch.cat([pre_mask_U_W[row_prompt_B], take_B_S.long()], dim=1)
    out = backbone(input_ids=suf_ids, attention_mask=mask, position_ids=src_B_S, past_key_values=cache,
                   use_cache=True).last_hidden_state
    assert out.shape[:2] == (B, S)
    return out[pos_S[None, :] < n_B[:, None]]


def _shared_prompt_plan(batch: TrainBatch):
    """(distinct prompts, row → prompt index [B], response lengths [B]) when sharing prompts saves
    at least a quarter of the token positions of a full forward; else None."""
    B, L = batch.input_ids_B_L.shape
    if B < 2:
        return None
    index: dict[tuple[int, ...], int] = {}
    row_prompt = []
    for b in range(B):
        key = tuple(batch.input_ids_B_L[b, : int(batch.prompt_len_B[b])].tolist())
        row_prompt.append(index.setdefault(key, len(index)))
    n_B = batch.response_mask_B_T.sum(-1).long()
    prompts = list(index)
    shared_cost = len(prompts) * (max(len(p) for p in prompts) - 1) + B * max(int(n_B.max()), 1)
    if shared_cost > 0.75 * B * L:
        return None
    return prompts, torch.tensor(row_prompt, dtype=torch.long), n_B


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

"""Per-token log-probs, entropy and exact KL of response tokens, through the fused kernel.

Logits are computed only at positions that score a response token (never at prompt positions),
chunk by chunk inside :mod:`rlkit.kl_fused`, so no [tokens × vocab] tensor exists:
:func:`token_stats` returns the stats (``fused_token_logprobs``, whose backward recomputes the
logits), :func:`token_loss` a loss of them with its gradient computed in the forward
(:func:`rlkit.kl_stats_loss.fused_stats_loss`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlkit import attention, kl_fused, kl_stats_loss
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
    pos = torch.arange(L, device=batch.input_ids_B_L.device)[None, :]
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
    ref_kwargs = _ref_kwargs(ref_model, batch, sel_B_L)
    if truncation is not None and (truncation.top_k or truncation.top_p < 1.0):
        out = _truncated_stats(hidden_N_D, weight, bias, labels_N, truncation)
    else:
        out = kl_fused.fused_token_logprobs(
            hidden_N_D, weight, labels_N, temperature=temperature, chunk_size=chunk_size,
            with_entropy=with_entropy, bias_V=bias, **ref_kwargs,
        )
    return _stats_B_T(out.logp_N, out.entropy_N if with_entropy else None, out.kl_N, batch.response_mask_B_T.bool())


def token_loss(model, batch: TrainBatch, loss_fn, *, temperature: float, chunk_size: int,
               with_entropy: bool = False, ref_model=None):
    """A loss of the per-token stats and its gradient in one fused pass (three LM-head matmuls).

    ``loss_fn(stats) -> (loss, aux)`` receives what :func:`token_stats` returns (``logp`` [B,T],
    ``entropy``, ``ref_full_kl``), as leaves whose gradient is taken, and may depend on them and on
    constants only. The pass is :func:`rlkit.kl_stats_loss.fused_stats_loss`: coefficients ∂loss/∂stat
    probed per chunk, checked against the exact ones and corrected where they differ, so the
    gradient is that of ``loss_fn(token_stats(...))`` whatever the loss. No top-k/top-p support
    (the caller takes :func:`token_stats` then).

    Returns (loss, differentiable; the stats, detached; aux of the exact evaluation; ProbeReport).
    """
    backbone, weight, bias = split_lm(model)
    sel_B_L, labels_N = response_positions(batch)
    hidden_N_D = response_hidden(backbone, batch, sel_B_L)
    mask = batch.response_mask_B_T.bool()

    def flat_loss(logp_N, entropy_N, kl_N):
        return loss_fn(_stats_B_T(logp_N, entropy_N, kl_N, mask))

    loss, out, aux, report = kl_stats_loss.fused_stats_loss(
        hidden_N_D, weight, labels_N, flat_loss, temperature=temperature, chunk_size=chunk_size,
        with_entropy=with_entropy, bias_V=bias, **_ref_kwargs(ref_model, batch, sel_B_L),
    )
    return loss, _stats_B_T(out.logp_N, out.entropy_N, out.kl_N, mask), aux, report


def _ref_kwargs(ref_model, batch: TrainBatch, sel_B_L: Tensor) -> dict:
    """The fused pass's reference (hidden states at the response positions, head), or nothing."""
    if ref_model is None:
        return {}
    ref_backbone, ref_weight, _ = split_lm(ref_model)
    with torch.no_grad():
        ref_h = response_hidden(ref_backbone, batch, sel_B_L)
    return dict(ref_hidden_N_D=ref_h, ref_weight_V_D=ref_weight.detach(), kl_direction="forward")


def _stats_B_T(logp_N: Tensor, entropy_N, kl_N, mask_B_T: Tensor) -> dict[str, Tensor]:
    """Per-token values [N] (``sel_B_L`` order) as the [B, T] dict of :func:`token_stats`."""
    result = {"logp": _scatter(logp_N, mask_B_T)}
    if entropy_N is not None:
        result["entropy"] = _scatter(entropy_N, mask_B_T)
    if kl_N is not None:
        result["ref_full_kl"] = _scatter(kl_N, mask_B_T)
    return result


def response_hidden(backbone, batch: TrainBatch, sel_B_L: Tensor) -> Tensor:
    """Final hidden states [N, D] at the positions that score response tokens (``sel_B_L`` order).

    Rows that share a prompt (a GRPO group) are packed into one sequence: the prompt once, then each
    row's response (but its last token), with an attention mask that lets a response see the prompt
    and its own earlier tokens only, and position ids that continue from the prompt. This is the
    same computation as one full forward per row (up to float summation order), without running a
    prompt more than once and without padding responses to the longest one. It is used when it
    saves at least a quarter of the cost (token positions plus attended pairs, see
    :func:`_packed_plan`) and the attention implementation takes a custom mask; otherwise one plain
    forward of the padded batch.
    """
    plan = _packed_plan(batch, backbone.config)
    if plan is None:
        return backbone(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L).last_hidden_state[sel_B_L]
    ids_U_S, pos_U_S, mask_U_1_S_S, take_N = plan
    out_U_S_D = backbone(input_ids=ids_U_S, attention_mask=mask_U_1_S_S, position_ids=pos_U_S).last_hidden_state
    return out_U_S_D.flatten(0, 1)[take_N]


def _packed_plan(batch: TrainBatch, config):
    """Packed rows (one per distinct prompt): ids and position ids [U, S], the boolean attention
    mask [U, 1, S, S] (True = attend) and, in ``sel_B_L`` order, the flat index into [U·S] of the
    hidden state that scores each response token. None when packing does not pay or cannot apply."""
    B, L = batch.input_ids_B_L.shape
    if B < 2 or getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager", attention.NAME):
        return None
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        return None  # a custom mask would override the window
    n_B = batch.response_mask_B_T.sum(-1).long().tolist()
    plen_B = batch.prompt_len_B.tolist()
    index: dict[tuple[int, ...], int] = {}
    members: list[list[int]] = []
    row_u = []
    for b in range(B):
        key = tuple(batch.input_ids_B_L[b, : plen_B[b]].tolist())
        u = index.setdefault(key, len(index))
        if u == len(members):
            members.append([])
        members[u].append(b)
        row_u.append(u)
    prompts = list(index)
    lengths = [len(p) + sum(max(n_B[b] - 1, 0) for b in rows) for p, rows in zip(prompts, members)]
    S, U = max(lengths), len(prompts)
    # Cost in token-equivalents: a position's linear layers vs 4·d FLOPs per attended (query, key)
    # pair; the dense mask makes a pack's attention quadratic in its length, so long responses are
    # cheaper unpacked.
    d, f = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    pairs_per_token = 2 * d + 1.5 * f
    if U * S + U * S * S / pairs_per_token > 0.75 * (B * L + B * L * L / pairs_per_token):
        return None
    ids = torch.zeros(U, S, dtype=torch.long)
    pos = torch.zeros(U, S, dtype=torch.long)
    seg = torch.full((U, S), -1, dtype=torch.long)  # -1 padding, 0 prompt, j + 1 the j-th response
    start_B = [0] * B  # packed offset of each row's response tokens
    for u, (p, rows) in enumerate(zip(prompts, members)):
        ids[u, : len(p)] = torch.tensor(p)
        pos[u, : len(p)] = torch.arange(len(p))
        seg[u, : len(p)] = 0
        off = len(p)
        for j, b in enumerate(rows):
            k = max(n_B[b] - 1, 0)
            start_B[b] = off
            ids[u, off: off + k] = batch.input_ids_B_L[b, plen_B[b]: plen_B[b] + k]
            pos[u, off: off + k] = torch.arange(plen_B[b], plen_B[b] + k)
            seg[u, off: off + k] = j + 1
            off += k
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = causal & (k >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(S, dtype=torch.bool)  # padding attends to itself (no all-masked softmax rows)
    take = []
    for b in range(B):
        if n_B[b] == 0:
            continue
        base = row_u[b] * S
        take.append(base + plen_B[b] - 1)  # the prompt's last token scores response token 0
        take.extend(range(base + start_B[b], base + start_B[b] + n_B[b] - 1))
    return ids, pos, mask[:, None], torch.tensor(take, dtype=torch.long)


def _scatter(values_N: Tensor, mask_B_T: Tensor) -> Tensor:
    out = values_N.new_zeros(mask_B_T.shape)
    return out.masked_scatter(mask_B_T, values_N)


def _truncated_stats(hidden_N_D: Tensor, weight: Tensor, bias, labels_N: Tensor, sampling) -> "kl_fused.FusedOut":
    """Log-probs and entropy of the sampler's truncated distribution (top-k/top-p after temperature)."""
    logits = hidden_N_D.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    lp_N_V = support_logprobs(logits, sampling)
    logp_N = lp_N_V.gather(-1, labels_N[:, None]).squeeze(-1)
    p = lp_N_V.exp()
    entropy_N = -torch.where(p > 0, p * lp_N_V, torch.zeros_like(p)).sum(-1)
    return kl_fused.FusedOut(logp_N, entropy_N, None)

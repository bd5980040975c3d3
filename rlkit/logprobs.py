"""Per-token log-probs, entropy and exact KL of response tokens, through the fused kernel.

Logits are computed only at positions that score a response token (never at prompt positions),
chunk by chunk inside :mod:`rlkit.kl_fused`, so no [tokens × vocab] tensor exists:
:func:`token_stats` returns the stats (``fused_token_logprobs``, whose backward recomputes the
logits), :func:`token_loss` a loss of them with its gradient computed in the forward
(:func:`rlkit.kl_stats_loss.fused_stats_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    z = logits_N_V.float()
    if sampling.temperature != 1.0:
        z = z / sampling.temperature
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

    Rows that share a prompt (a GRPO group) are packed: the prompt once, then each row's response
    (but its last token), position ids continuing from the prompt, a response seeing the prompt and
    its own earlier tokens only. Two packings (:func:`_packed_plan`): with the ``rlkit_sdpa``
    attention (:mod:`rlkit.attention`, on the CPU) all groups end to end in one row with no padding
    and tree attention (each response against its prompt and itself); otherwise one row per group
    under a dense mask. Either is the computation of one full forward per row (up to float
    summation order), without running a prompt more than once; it is used when it saves at least a
    quarter of the cost (token positions plus attended pairs). Otherwise one plain forward of the
    padded batch.
    """
    plan = _packed_plan(batch, backbone.config)
    if plan is not None:
        plan = plan.to(batch.input_ids_B_L.device)
    if plan is not None and plan.tree is not None and not getattr(backbone, "_rlkit_no_tree", False):
        tree = plan.tree
        out = backbone(input_ids=plan.ids, position_ids=plan.pos, **{attention.TREE_KWARG: tree}).last_hidden_state
        if tree.calls >= backbone.config.num_hidden_layers:
            return out.flatten(0, 1)[plan.take]
        # The model's layers did not hand the layout to their attention: never again, and this
        # micro-batch through the padded forward.
        backbone._rlkit_no_tree = True
        plan = None
    elif plan is not None and plan.tree is not None:
        plan = None
    if plan is None:
        return backbone(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L).last_hidden_state[sel_B_L]
    out = backbone(input_ids=plan.ids, attention_mask=plan.mask, position_ids=plan.pos).last_hidden_state
    return out.flatten(0, 1)[plan.take]


@dataclass
class Packing:
    """Packed rows for the backbone: ids and position ids, a dense mask [U, 1, S, S] (True = attend)
    or a tree layout (one row, no padding), and the flat index of the hidden state that scores each
    response token, in ``sel_B_L`` order."""

    ids: Tensor
    pos: Tensor
    mask: Optional[Tensor]
    tree: Optional[attention.TreeLayout]
    take: Tensor

    def to(self, device: torch.device) -> "Packing":
        return Packing(self.ids.to(device), self.pos.to(device), None if self.mask is None else self.mask.to(device),
                       None if self.tree is None else self.tree.to(device), self.take.to(device))


def _packed_plan(batch: TrainBatch, config) -> Optional[Packing]:
    """The cheapest packing of ``batch`` (tree when the attention is ``rlkit_sdpa``, else dense), or
    None when packing does not pay or cannot apply."""
    B, L = batch.input_ids_B_L.shape
    impl = getattr(config, "_attn_implementation", "sdpa")
    if B < 2 or impl not in ("sdpa", "eager", attention.NAME):
        return None
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        return None  # a custom mask would override the window
    n_B = batch.response_mask_B_T.sum(-1).long().tolist()
    plen_B = batch.prompt_len_B.tolist()
    index: dict[tuple[int, ...], int] = {}
    members: list[list[int]] = []
    for b in range(B):
        key = tuple(batch.input_ids_B_L[b, : plen_B[b]].tolist())
        u = index.setdefault(key, len(index))
        if u == len(members):
            members.append([])
        members[u].append(b)
    prompts = list(index)
    lengths = [len(p) + sum(max(n_B[b] - 1, 0) for b in rows) for p, rows in zip(prompts, members)]
    S, U = max(lengths), len(prompts)
    # Cost in token-equivalents: a position's linear layers vs 4·d FLOPs per attended (query, key) pair.
    d, f = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    pairs_per_token = 2 * d + 1.5 * f
    plain = B * L + B * L * L / pairs_per_token
    dense = U * S + U * S * S / pairs_per_token
    tree = _tree_layout(batch, prompts, members, n_B) if impl == attention.NAME else None
    tree_cost = None if tree is None else tree[0].tokens + tree[0].pairs / pairs_per_token
    if tree_cost is not None and tree_cost <= min(dense, 0.75 * plain):
        layout, ids, pos, take = tree
        return Packing(ids[None], pos[None], None, layout, take)
    if dense > 0.75 * plain:
        return None
    ids = torch.zeros(U, S, dtype=torch.long)
    pos = torch.zeros(U, S, dtype=torch.long)
    seg = torch.full((U, S), -1, dtype=torch.long)  # -1 padding, 0 prompt, j + 1 the j-th response
    start_B = [0] * B  # packed offset of each row's response tokens
    row_u = [0] * B
    for u, (p, rows) in enumerate(zip(prompts, members)):
        ids[u, : len(p)] = torch.tensor(p)
        pos[u, : len(p)] = torch.arange(len(p))
        seg[u, : len(p)] = 0
        off = len(p)
        for j, b in enumerate(rows):
            k = max(n_B[b] - 1, 0)
            start_B[b], row_u[b] = u * S + off, u
            ids[u, off: off + k] = batch.input_ids_B_L[b, plen_B[b]: plen_B[b] + k]
            pos[u, off: off + k] = torch.arange(plen_B[b], plen_B[b] + k)
            seg[u, off: off + k] = j + 1
            off += k
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = causal & (k >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(S, dtype=torch.bool)  # padding attends to itself (no all-masked softmax rows)
    take = _take(n_B, [row_u[b] * S for b in range(B)], plen_B, start_B)
    return Packing(ids, pos, mask[:, None], None, take)


def _take(n_B: list[int], base_B: list[int], plen_B: list[int], start_B: list[int]) -> Tensor:
    """Flat index of the hidden state scoring each response token: the prompt's last position for
    token 0, then the row's own packed positions."""
    take = []
    for b, n in enumerate(n_B):
        if n == 0:
            continue
        take.append(base_B[b] + plen_B[b] - 1)
        take.extend(range(start_B[b], start_B[b] + n - 1))
    return torch.tensor(take, dtype=torch.long)


def _tree_layout(batch: TrainBatch, prompts: list[tuple[int, ...]], members: list[list[int]], n_B: list[int]):
    """(TreeLayout, ids [N], position ids [N], take) of all groups end to end: per group its prompt,
    then each row's response but its last token. Blocks: each response (queries) against its
    prompt and itself (keys); the prompt in chunks of the longest response's length, each against
    the prompt up to the chunk's end."""
    B = len(n_B)
    plen_B = batch.prompt_len_B.tolist()
    lq = max(1, max(max(n - 1, 0) for n in n_B))
    ids, pos, blocks = [], [], []
    base_B, start_B = [0] * B, [0] * B
    off = 0
    for p, rows in zip(prompts, members):
        P = len(p)
        prompt = torch.arange(off, off + P)
        ids.append(torch.tensor(p))
        pos.append(torch.arange(P))
        for c in range(0, P, lq):
            blocks.append((prompt[c: c + lq], prompt[: c + lq]))
        end = off + P
        for b in rows:
            k = max(n_B[b] - 1, 0)
            base_B[b], start_B[b] = off, end
            if k:
                own = torch.arange(end, end + k)
                ids.append(batch.input_ids_B_L[b, plen_B[b]: plen_B[b] + k])
                pos.append(torch.arange(plen_B[b], plen_B[b] + k))
                blocks.append((own, torch.cat([prompt, own])))
            end += k
        off = end
    layout = attention.TreeLayout.build(off, blocks)
    return layout, torch.cat(ids), torch.cat(pos), _take(n_B, base_B, plen_B, start_B)


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

"""Attention for the CPU paths: SDPA's own grouped-query heads, and tree attention over packed groups.

**Grouped-query heads.** transformers' ``sdpa`` attention hands SDPA grouped-query heads
(``enable_gqa``) only when there is no attention mask; with one (left-padded decode batches, the
learner's packed masks) it first repeats every key/value head ``num_attention_heads /
num_key_value_heads`` times, which copies the whole KV cache twice per layer at every decode step.
On the CPU, torch's SDPA takes a mask and ``enable_gqa`` together, so :data:`NAME` ("rlkit_sdpa")
is transformers' ``sdpa`` with the repetition left to the kernel: the same scores and weighted sums.
At SmolLM2-135M's decode shape (64 rows, 9 query and 3 KV heads of 64, 60–100 cached positions,
boolean mask, 2 threads) a layer's attention takes 6.4–7.9 ms with the repetition and 0.9–1.3 ms
without (docs/benchmarks.md, "Levers").

**Tree attention.** A GRPO group is one prompt and G responses. Packed as one sequence (the prompt
once, then each response), a response must see the prompt and its own earlier tokens only. A dense
mask over the pack spends most of its score pairs on masked ones (a response against the other
responses). :class:`TreeLayout` lays the packed groups of a micro-batch end to end with no padding
and cuts the attention into blocks: each response's queries against the prompt's keys and its own,
each prompt chunk's queries against the prompt up to it. The blocks are gathered, attended together
and scattered back; passed as the ``rlkit_tree`` keyword of the backbone's forward, which
transformers hands every attention call. SDPA's kernel attends the blocks by default; ``TreeLayout.kernel
= "matmul"`` takes two batched matmuls around a softmax instead. On the blocks alone that is 0.6×
flash's forward-and-backward time (SmolLM2's learner shape, 2 threads), but with the gathers a
whole learner step is no faster (docs/benchmarks.md, "Levers").

On CUDA transformers' own ``sdpa`` stays: a masked GQA call there can fall back to the math kernel
(see ``use_gqa_in_sdpa`` in transformers), where the repeated heads keep the fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "rlkit_sdpa"
TREE_KWARG = "rlkit_tree"


def gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, Lq, D], key/value [B, Hkv, Lk, D],
    a boolean or additive mask broadcastable to [B, 1, Lq, Lk] (or None); returns [B, Lq, H, D].
    With a :class:`TreeLayout` in ``kwargs["rlkit_tree"]`` the mask is ignored and the layout's
    blocks are attended instead."""
    tree = kwargs.get(TREE_KWARG)
    if tree is not None:
        return tree.attend(query, key, value, scaling=scaling, dropout=dropout), None
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


def install(model: torch.nn.Module, device: torch.device | str | None = None) -> bool:
    """Switch ``model`` from ``sdpa`` to :data:`NAME` when it runs on the CPU (``device``, default:
    where its parameters are). Returns whether it switched; a model on another attention
    implementation, or on CUDA, is left alone."""
    config = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


@dataclass
class TreeLayout:
    """Packed groups end to end in one row of ``tokens`` positions, and the attention blocks over them.

    ``blocks``: (query positions, key positions) per block, flat positions in ascending order, every
    query's own position among its block's keys. A query attends the keys of its block at or before
    its own position (causal): a prompt chunk its prompt so far, a response the whole prompt and
    its own earlier tokens. Each position is the query of exactly one block.
    """

    tokens: int
    q_index: Tensor
    """[blocks × Lq] flat position of each query slot (``tokens`` = padding, a zero row)."""
    k_index: Tensor
    """[blocks × Lk] flat position of each key slot."""
    mask: Tensor
    """[blocks, 1, Lq, Lk] True where a query slot attends a key slot."""
    out_index: Tensor
    """[tokens] the query slot (in blocks × Lq) that holds each position's output."""
    lq: int
    lk: int
    calls: int = field(default=0, compare=False)
    """Attention calls that used the layout (one per layer and forward)."""
    kernel: ClassVar[str] = "sdpa"
    """How the blocks are attended: "sdpa" (the default: SDPA's kernel with the boolean mask; always
    taken for dropout) or "matmul" (two batched matmuls around a softmax)."""
    _bias: dict = field(default_factory=dict, compare=False, repr=False)
    """The mask as an additive bias (0 or −inf) per dtype, built on first use."""

    @classmethod
    def build(cls, tokens: int, blocks: list[tuple[Tensor, Tensor]]) -> "TreeLayout":
        nb = len(blocks)
        lq, lk = max(len(q) for q, _ in blocks), max(len(k) for _, k in blocks)
        q_index = torch.full((nb, lq), tokens, dtype=torch.long)
        k_index = torch.full((nb, lk), tokens, dtype=torch.long)
        for i, (q, k) in enumerate(blocks):
            q_index[i, : len(q)], k_index[i, : len(k)] = q, k
        q_real, k_real = q_index < tokens, k_index < tokens
        mask = (k_index[:, None, :] <= q_index[:, :, None]) & k_real[:, None, :] & q_real[:, :, None]
        mask[:, :, 0] |= ~q_real  # a padding query attends one key: no all-masked softmax row
        out_index = torch.empty(tokens, dtype=torch.long)
        flat = q_index.flatten()
        real = flat < tokens
        out_index[flat[real]] = torch.arange(flat.numel())[real]
        if real.sum() != tokens or bool((mask.sum(-1) == 0).any()):
            raise ValueError("tree layout: every position must be the query of exactly one block")
        return cls(tokens, q_index.flatten(), k_index.flatten(), mask[:, None], out_index, lq, lk)

    @property
    def pairs(self) -> int:
        """Score pairs computed (padding included): the attention's cost."""
        return int(self.mask.shape[0]) * self.lq * self.lk

    def to(self, device: torch.device) -> "TreeLayout":
        return TreeLayout(self.tokens, self.q_index.to(device), self.k_index.to(device), self.mask.to(device),
                          self.out_index.to(device), self.lq, self.lk)

    def bias(self, dtype: torch.dtype) -> Tensor:
        """[1, blocks, 1, Lq, Lk]: 0 where :attr:`mask` attends, −inf elsewhere."""
        if dtype not in self._bias:
            zeros = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._bias[dtype] = zeros.masked_fill_(~self.mask, float("-inf"))[None]
        return self._bias[dtype]

    def attend(self, query: Tensor, key: Tensor, value: Tensor, *, scaling: float | None = None,
               dropout: float = 0.0) -> Tensor:
        """query [1, H, tokens, D], key/value [1, Hkv, tokens, D] -> output [1, tokens, H, D]."""
        self.calls += 1
        _, h, n, d = query.shape
        hk, nb = key.shape[1], self.mask.shape[0]
        if n != self.tokens or query.shape[0] != 1:
            raise ValueError(f"tree layout of {self.tokens} positions got a query of shape {tuple(query.shape)}")
        # Padding slots gather the last position: a padding key is masked out, and no position's
        # output is read from a padding query (out_index), so neither changes a value or a gradient.
        last = self.tokens - 1
        qi, ki = self.q_index.clamp(max=last), self.k_index.clamp(max=last)
        lq, lk = self.lq, self.lk
        if dropout or h % hk or self.kernel == "sdpa":
            def blocks(x: Tensor, index: Tensor, length: int) -> Tensor:  # [1, c, n, d] -> [nb, c, length, d]
                return x[0].index_select(1, index).view(x.shape[1], nb, length, d).transpose(0, 1)

            out = F.scaled_dot_product_attention(blocks(query, qi, lq), blocks(key, ki, lk), blocks(value, ki, lk),
                                                 attn_mask=self.mask, dropout_p=dropout, scale=scaling,
                                                 enable_gqa=hk < h)
            out = out.transpose(0, 1).reshape(h, nb * lq, d).index_select(1, self.out_index)
            return out.transpose(0, 1)[None].contiguous()
        # Query head j reads key/value head j // g (as SDPA's enable_gqa): the g query heads of a
        # key/value head are one [g · Lq] row block against that head's keys. Batched over
        # (key/value head, block): keys and values as gathered, the queries permuted once.
        g = h // hk
        q = query[0].index_select(1, qi).view(hk, g, nb, lq, d).transpose(1, 2).reshape(hk * nb, g * lq, d)
        k = key[0].index_select(1, ki).view(hk * nb, lk, d)
        v = value[0].index_select(1, ki).view(hk * nb, lk, d)
        scale = d ** -0.5 if scaling is None else scaling
        scores = torch.bmm(q, k.transpose(1, 2)).view(hk, nb, g, lq, lk)
        probs = torch.softmax(torch.add(self.bias(scores.dtype), scores, alpha=scale), dim=-1)
        out = torch.bmm(probs.view(hk * nb, g * lq, lk), v).view(hk, nb, g, lq, d)
        # [hk, nb, g, lq, d] -> [nb · lq, h, d] (head hk · g + g', as the input's) -> each position's row.
        out = out.permute(1, 3, 0, 2, 4).reshape(nb * lq, h, d).index_select(0, self.out_index)
        return out[None]

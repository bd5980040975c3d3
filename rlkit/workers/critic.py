"""Critic: a transformer backbone with a small value head, trained beside the policy in each learner rank.

Created only when the algorithm declares ``Needs.values`` (SAFE's double critic: ``heads=2``).
It reads the hidden state at the same positions that score response tokens, so values align with
``response_mask_B_T``. Plain torch AdamW; gradients are summed over data-parallel ranks by an
all-reduce (critic losses are normalized by global counts, so the sum is the full-batch gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlkit.logprobs import response_positions
from rlkit.types import TrainBatch


class Critic(nn.Module):
    def __init__(self, model_dir: str, *, heads: int = 2, lr: float = 1e-5, max_grad_norm: float = 1.0, seed: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(self.backbone.config.hidden_size, heads)
        with torch.no_grad():
            # Small, different initial heads so the two critics of a double critic start apart.
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 1e-3)
            self.head.bias.zero_()
        self.heads = heads
        self.max_grad_norm = max_grad_norm
        self.to(device)  # the learner's device: its GPU when it has one
        self.opt = torch.optim.AdamW(self.parameters(), lr=lr)

    def values(self, batch: TrainBatch) -> Tensor:
        """Values at response positions, [B, T, heads] (or [B, T] for one head); 0 at padding. The
        forward runs on the critic's device, the values come back on the batch's (differentiably)."""
        dev = self.head.weight.device
        hidden = self.backbone(input_ids=batch.input_ids_B_L.to(dev),
                               attention_mask=batch.attention_mask_B_L.to(dev)).last_hidden_state
        sel_B_L, _ = response_positions(batch)
        v_N_H = self.head(hidden[sel_B_L.to(dev)]).to(batch.response_mask_B_T.device)
        mask = batch.response_mask_B_T.bool()
        out = v_N_H.new_zeros(*mask.shape, self.heads)
        out[mask] = v_N_H
        return out.squeeze(-1) if self.heads == 1 else out

    def step(self) -> float:
        """All-reduce (sum) gradients over ranks, clip, AdamW step; returns the grad norm."""
        params = [p for p in self.parameters() if p.grad is not None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            for p in params:
                dist.all_reduce(p.grad)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

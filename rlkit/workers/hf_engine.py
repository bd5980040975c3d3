"""Hugging Face ``generate`` behind the engine contract (the fallback next to vLLM).

Log-probs of sampled tokens come from ``output_scores``: the scores after the logits processors
(temperature, top-k, top-p), i.e. the processed distribution the token was drawn from.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from rlkit.logprobs import support_logprobs
from rlkit.workers.engine import Generation, SamplingConfig


class HFEngine:
    def __init__(self, model_dir: str, *, dtype: str = "float32", threads: int = 1, batch_size: int = 64):
        from transformers import AutoModelForCausalLM

        from rlkit.assets import load_tokenizer

        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.batch_size = batch_size

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            attn[i, width - len(s):] = 1
        return ids, attn

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, seed: int) -> list[Generation]:
        flat = [p for p in prompt_ids for _ in range(n)]
        out: list[Generation] = []
        torch.manual_seed(seed)
        for start in range(0, len(flat), self.batch_size):
            out.extend(self._generate_batch(flat[start:start + self.batch_size], sampling, greedy=False))
        return out

    @torch.no_grad()
    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[Generation]:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens)
        out: list[Generation] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            out.extend(self._generate_batch(prompt_ids[start:start + self.batch_size], sampling, greedy=True))
        return out

    def _generate_batch(self, seqs: list[list[int]], sampling: SamplingConfig, greedy: bool) -> list[Generation]:
        ids, attn = self._left_pad(seqs)
        from transformers import GenerationConfig

        # A fresh GenerationConfig: no defaults inherited from the model folder (top_k=50 etc.).
        gen_cfg = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else sampling.top_k,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            output_scores=True, return_dict_in_generate=True,
        )
        res = self.model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg)
        new = res.sequences[:, ids.shape[1]:]
        scores = torch.stack(res.scores, dim=1) if res.scores else torch.zeros(len(seqs), 0, 1)
        logp = torch.log_softmax(scores.float(), dim=-1).gather(-1, new[:, : scores.shape[1], None]).squeeze(-1)
        gens = []
        for i, prompt in enumerate(seqs):
            toks = new[i].tolist()
            stop = toks.index(self.eos_id) + 1 if self.eos_id in toks else None
            keep = toks[:stop] if stop else toks
            gens.append(Generation(
                prompt_ids=list(prompt), completion_ids=keep, logprobs=logp[i, : len(keep)].tolist(),
                finish_reason="stop" if stop else "length",
            ))
        return gens

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        for name, t in named_tensors:
            target = params.get(name, buffers.get(name))
            if target is None:
                raise KeyError(f"weight sync: the engine has no tensor named '{name}'")
            target.copy_(t.to(target.dtype))

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], sampling: SamplingConfig) -> list[list[float]]:
        out = []
        for p, c in zip(prompt_ids, completion_ids):
            ids = torch.tensor([p + c], dtype=torch.long)
            logits = self.model(input_ids=ids).logits[0, len(p) - 1: len(p) + len(c) - 1]
            lp = support_logprobs(logits, sampling).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            out.append(lp.tolist())
        return out

    def tensor_checksum(self, names: list[str]) -> dict[str, float]:
        state = self.model.state_dict()
        return {n: float(state[n].double().sum()) for n in names}

    def close(self) -> None:
        self.model = None

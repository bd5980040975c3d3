"""rlkit's own decoding engine on a Hugging Face model's forward: the CPU default, and the engine
next to vLLM wherever vLLM is not installed.

The decoding loop is ours (not ``generate``), on the model's own forward and a KV cache that appends in place: each
prompt is prefilled once for all of its samples, finished rows leave the batch, and tokens are drawn
from :func:`rlkit.logprobs.support_logprobs` (temperature, top-k, top-p), the distribution the
learner scores, so a sampled token's log-prob is exactly the processed distribution it was drawn
from.
Measured at the demo's shape (8 prompts x 8 samples x 48 tokens, SmolLM2, 2 threads) this is faster
than ``generate``, which prefills every sample and spends ~90 ms per step in ``torch.multinomial``.

Partial rollouts (``rollout.partial_rollouts``, docs/async.md): a weight load may arrive from
another thread while a generation runs. Every forward (prefill, decode step, score) and every load
pass through the engine's :class:`WeightGate`, so weights change only between decode steps, never
inside a forward; each sampled token records the policy version of the weights that computed its
distribution (:attr:`SampledGeneration.versions`) next to its log-prob. After a swap the prefix's
KV cache is kept (``on_swap = "keep"``, as PipelineRL's in-flight weight updates,
arXiv:2509.19128) or rebuilt by the new weights (``"recompute"``, as AReaL's interruptible
generation, arXiv:2505.24298).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor

from rlkit import attention
from rlkit.logprobs import support_logprobs
from rlkit.workers.engine import Generation, SamplingConfig
from rlkit.workers.fused_decode import FusedDecoder, SharedPrefixKV


BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw
HOLD_TIMEOUT_S = 300.0  # how long a held generation (:meth:`HFEngine.hold_after`) waits for new weights


@dataclass
class SampledGeneration(Generation):
    """A :class:`Generation` with the policy version that produced each completion token."""

    versions: list[int] = field(default_factory=list)


class WeightGate:
    """Forwards and weight loads of one engine exclude each other; a load that is waiting goes
    before the next forward (so a decode loop that re-enters at once cannot starve it).

    ``forward()`` and ``load()`` are context managers; loads also exclude each other. Loads notify
    :meth:`wait_for` callers, which wait outside both."""

    def __init__(self):
        self._cv = threading.Condition()
        self._forwards = 0
        self._loading = False
        self._waiting_loads = 0

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not self._loading and not self._waiting_loads)
            self._forwards += 1
        try:
            yield
        finally:
            with self._cv:
                self._forwards -= 1
                self._cv.notify_all()

    @contextmanager
    def load(self) -> Iterator[None]:
        with self._cv:
            self._waiting_loads += 1
            try:
                self._cv.wait_for(lambda: not self._loading and not self._forwards)
            finally:
                self._waiting_loads -= 1
            self._loading = True
        try:
            yield
        finally:
            with self._cv:
                self._loading = False
                self._cv.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until ``predicate()`` holds (re-checked after every load), at most ``timeout`` s."""
        with self._cv:
            return self._cv.wait_for(predicate, timeout)


def draw(lp_R_V: Tensor, rng: torch.Generator, out: Optional[Tensor] = None) -> Tensor:
    """One token per row from the distribution ``exp(lp)`` by inverse CDF, in two levels: the block
    of ``BLOCK`` tokens, then the token inside it. Cumulative sums run over V / BLOCK block masses
    and one block (in float64), not over the whole vocabulary; a zero-probability token is never
    drawn. A block's mass is summed in the probabilities' own dtype (256 terms in [0, 1]: a relative
    error of a few 1e-7, against a float64 copy of the whole [R, V] matrix per step). ``out``: an
    [R', V'] buffer with R' ≥ R and V' ≥ V rounded up to ``BLOCK`` (the decode loop keeps one, so a
    step does not fault in a fresh vocabulary-sized allocation)."""
    R, V = lp_R_V.shape
    width = V + (-V % BLOCK)
    if out is None or out.shape[0] < R or out.shape[1] != width or out.dtype != lp_R_V.dtype:
        out = lp_R_V.new_empty(R, width)
    p = out[:R]
    torch.exp(lp_R_V, out=p[:, :V])
    if width > V:
        p[:, V:] = 0
    p_R_K_B = p.view(R, -1, BLOCK)
    return pick_in_blocks(p_R_K_B, p_R_K_B.sum(-1).double().cumsum(-1), rng)


def pick_in_blocks(p_R_K_B: Tensor, cdf_R_K: Tensor, rng: torch.Generator) -> Tensor:
    """The inverse-CDF pick of :func:`draw` from probabilities in blocks [R, K, BLOCK] and the
    float64 cumulative block masses [R, K]: the block, then the token inside it."""
    R = p_R_K_B.shape[0]
    total = cdf_R_K[:, -1:]
    # The uniforms come from ``rng`` on the CPU whatever the device: the same seed draws the same
    # tokens on CPU and CUDA when the distributions agree.
    u = torch.rand(R, 1, generator=rng, dtype=torch.float64).to(p_R_K_B.device) * total
    # The last block / token with mass bounds each search (rounding may push u past a cumsum's end).
    k = torch.minimum(torch.searchsorted(cdf_R_K, u, right=True), (cdf_R_K < total).sum(-1, keepdim=True))
    below = torch.where(k > 0, cdf_R_K.gather(-1, (k - 1).clamp(min=0)), torch.zeros_like(u))
    cdf_R_B = p_R_K_B.gather(1, k[:, :, None].expand(R, 1, BLOCK)).squeeze(1).double().cumsum(-1)
    rest = (u - below).clamp(min=0)
    j = torch.minimum(torch.searchsorted(cdf_R_B, rest, right=True), (cdf_R_B < cdf_R_B[:, -1:]).sum(-1, keepdim=True))
    return (k * BLOCK + j).squeeze(-1)


class _AppendLayer:
    """Mixin for a ``DynamicLayer`` whose keys/values are views into buffers with room to grow:
    appending a decode step writes in place instead of concatenating (which copies the whole cache
    at every step)."""

    def _adopt(self, k: Tensor, v: Tensor, room: int) -> None:
        B, H, n, D = k.shape
        self._k = k.new_empty(B, H, n + room, D)
        self._v = v.new_empty(B, H, n + room, D)
        self._k[:, :, :n].copy_(k)
        self._v[:, :, :n].copy_(v)
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._adopt(key_states, value_states, self.room)
            return self.keys, self.values
        n, add = self.keys.shape[-2], key_states.shape[-2]
        if n + add > self._k.shape[-2]:
            self._adopt(self.keys, self.values, max(self.room, add))
        self._k[:, :, n: n + add].copy_(key_states)
        self._v[:, :, n: n + add].copy_(value_states)
        self.keys, self.values = self._k[:, :, : n + add], self._v[:, :, : n + add]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._k, self._v = (t.repeat_interleave(repeats, dim=0) for t in (self._k, self._v))
            n = self.keys.shape[-2]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def batch_select_indices(self, indices: Tensor) -> None:
        """Row ``i`` becomes old row ``indices[i]``. Rows that stay where they are are not copied and
        the moved ones copy only their filled positions, inside the same buffers: a shrinking decode
        batch whose holes are filled from its tail (:func:`fill_holes`) moves one row per finished one."""
        if self.get_seq_length() == 0:
            return
        n, keep = self.keys.shape[-2], indices.numel()
        if keep > self._k.shape[0]:
            self._k, self._v = self._k[indices], self._v[indices]
        else:
            moved = (indices != torch.arange(keep, device=indices.device)).nonzero().squeeze(-1)
            if moved.numel():
                src = indices[moved]  # gathered into a temporary first, so sources may also be targets
                self._k[moved, :, :n] = self._k[src, :, :n]
                self._v[moved, :, :n] = self._v[src, :, :n]
            self._k, self._v = self._k[:keep], self._v[:keep]
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


def fill_holes(done: Tensor) -> Tensor:
    """The rows a batch keeps when ``done`` rows leave it, as indices for ``batch_select_indices``:
    kept rows at the front stay where they are and each hole there takes a kept row from the tail."""
    kept = (~done).nonzero().squeeze(-1)
    order = torch.arange(kept.numel(), device=done.device)
    holes = done[: kept.numel()].nonzero().squeeze(-1)
    order[holes] = kept[kept >= kept.numel()]
    return order


def append_cache(config, room: int):
    """A ``DynamicCache`` for ``config`` whose full-attention layers append in place, with room for
    ``room`` tokens beyond the prefill (layers of other kinds are kept as they are)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)

    class AppendLayer(_AppendLayer, DynamicLayer):
        pass

    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer = AppendLayer()
            layer.room = room
        layers.append(layer)
    cache.layers = layers
    return cache


class PackedLinears:
    """Inference-time linear layers on oneDNN-packed copies of their weights (fp32 weights, CPU).

    At decode shapes (tens of rows) a oneDNN matmul on a weight reordered once for that batch size
    is faster than ``F.linear`` on the plain weight: measured here at 64 rows, 2 threads, SmolLM2's
    layer shapes 4.15 → 3.57 ms per layer and the 49,152 × 576 head 59 → 29 ms. A packed copy is
    rebuilt at the first forward after its weight changed (the weight's storage or in-place version
    counter differs from the packed one's); the parameters themselves stay as they are (they are
    what syncs write and checksums read). With gradients enabled, or when the ops are missing or
    disagree with ``F.linear`` on a probe, the plain op runs.

    :meth:`set_matmul_dtype` (``rollout.matmul_dtype: bfloat16``) packs bfloat16 copies instead and
    multiplies in bfloat16 (oneDNN's AMX / AVX512-BF16 kernels): each input is rounded to bf16 and
    each output widened back to the weights' dtype, so norms, residuals, attention, the KV cache and
    the LM head (``keep``) stay in fp32 while the fp32 weights remain the synced, checksummed truth.
    """

    def __init__(self, model: torch.nn.Module, rows: int, keep: tuple[torch.nn.Module, ...] = ()):
        self.linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
        self.keep = [m for m in self.linears if any(m is k for k in keep)]
        self.enabled = bool(self.linears) and _packed_ops_work(rows, torch.float32)
        if self.enabled:
            for m in self.linears:
                m._rlkit_rows, m._rlkit_dtype = rows, torch.float32
                m.forward = _packed_forward.__get__(m)

    def set_matmul_dtype(self, dtype: torch.dtype) -> None:
        """Multiply every packed linear but ``keep`` in ``dtype`` (their packed copies are rebuilt)."""
        if dtype != torch.float32 and not (self.enabled and _packed_ops_work(self.linears[0]._rlkit_rows, dtype)):
            raise ValueError(f"rollout.matmul_dtype: {str(dtype).removeprefix('torch.')} needs fp32 weights on a "
                             "CPU whose oneDNN multiplies in that dtype (the HF engine's packed linears); "
                             "use rollout.matmul_dtype: auto here")
        for m in self.linears:  # the dtype is part of each copy's stamp: the next forward repacks
            m._rlkit_dtype = torch.float32 if any(m is k for k in self.keep) else dtype


def _packed_ops_work(rows: int, dtype: torch.dtype = torch.float32) -> bool:
    try:
        w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), rows)
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "").float()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        return bool(torch.allclose(y, torch.nn.functional.linear(x, w), rtol=tol, atol=tol * 8))
    except (AttributeError, RuntimeError):
        return False


def _packed_forward(self: torch.nn.Linear, x: Tensor) -> Tensor:
    if torch.is_grad_enabled():
        return torch.nn.functional.linear(x, self.weight, self.bias)
    dtype = self._rlkit_dtype
    stamp = (self.weight.data_ptr(), self.weight._version, dtype) + (
        () if self.bias is None else (self.bias.data_ptr(), self.bias._version))
    if getattr(self, "_rlkit_stamp", None) != stamp:
        with torch.no_grad():
            self._rlkit_packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(dtype),
                                                                         self._rlkit_rows)
            self._rlkit_bias = None if self.bias is None else self.bias.detach().to(dtype)
        self._rlkit_stamp = stamp
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(dtype), self._rlkit_packed,
                                           self._rlkit_bias, "none", [], "")
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


class HFEngine:
    """The decoding engine on ``device`` ("cuda" when a GPU is visible, else "cpu"; default: that choice)."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", threads: int = 1, batch_size: int = 64,
                 device: str | None = None, fused: bool = True, matmul_dtype: str = "auto"):
        from transformers import AutoModelForCausalLM

        from rlkit.assets import load_tokenizer

        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(model_dir)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        attention.install(self.model)  # CPU: SDPA's grouped-query heads, not repeated KV copies
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.batch_size = batch_size
        # oneDNN-packed weights are a CPU optimization; on CUDA the plain linears run.
        self.packed = PackedLinears(self.model if self.device.type == "cpu" else torch.nn.Module(), batch_size,
                                    keep=(self.model.get_output_embeddings(),))
        # CPU: a Llama-family decode step in fused ops (rlkit.workers.fused_decode), when its probe agrees.
        self.fused = (FusedDecoder.build(self.model, batch_size, packed=self.packed.enabled)
                      if fused and self.device.type == "cpu" else None)
        if matmul_dtype not in ("auto", "bfloat16"):
            raise ValueError(f"rollout.matmul_dtype: unknown value {matmul_dtype!r}; valid: ['auto', 'bfloat16']")
        if matmul_dtype == "bfloat16" and dtype != "bfloat16":
            # After the fused step's probe, which checks its arithmetic against transformers' at fp32.
            self.set_matmul_dtype(torch.bfloat16)
        self.share_prefix = True
        """Samples of one prompt read its prefill's keys and values once (:class:`SharedPrefixKV`, fused
        step only); False repeats the cache per sample."""
        self.gate = WeightGate()
        """Forwards and weight loads exclude each other (a load from another thread lands between steps)."""
        self.policy_version = 0
        """Version of the weights held; whoever loads weights sets it inside ``gate.load()``."""
        self.on_swap = "keep"
        """What a generation does when the weights changed under it: "keep" the prefix's KV cache or
        "recompute" it with the new weights (``rollout.partial_kv``)."""
        self._hold: Optional[list] = None
        self._hold_load: Optional[threading.Event] = None

    def set_matmul_dtype(self, dtype: torch.dtype) -> None:
        """What the packed linears (and the fused step's concatenations) multiply in:
        ``torch.float32`` or ``torch.bfloat16`` (``rollout.matmul_dtype``)."""
        self.packed.set_matmul_dtype(dtype)
        if self.fused is not None:
            self.fused.set_matmul_dtype(dtype)

    def hold_after(self, steps: int, skip: int = 0) -> None:
        """Tests: a rendezvous of a generation (the next ``generate`` call after ``skip`` others)
        and the next weight load. The generation, after ``steps`` decode steps, waits (outside the
        gate) until the weights change; the load waits until the generation got there (or ended).
        The load lands exactly before step ``steps``: tokens 0 … steps − 1 come from the old
        weights, the rest from the new ones."""
        reached = threading.Event()
        self._hold, self._hold_load = [steps, reached, skip], reached

    def _take_hold(self) -> Optional[tuple[int, threading.Event]]:
        """The hold of this ``generate`` call, if it is the one :meth:`hold_after` chose."""
        if self._hold is None:
            return None
        if self._hold[2] > 0:
            self._hold[2] -= 1
            return None
        (steps, reached, _), self._hold = self._hold, None
        return steps, reached

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            attn[i, width - len(s):] = 1
        return ids.to(self.device), attn.to(self.device)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig,
                 seed: int) -> list[SampledGeneration]:
        rng = torch.Generator().manual_seed(seed)
        per_batch = max(1, self.batch_size // max(n, 1))
        out: list[SampledGeneration] = []
        hold = self._take_hold()
        try:
            for start in range(0, len(prompt_ids), per_batch):
                out.extend(self._decode(prompt_ids[start:start + per_batch], n, sampling, rng,
                                        hold=hold if start == 0 else None))
        finally:
            if hold is not None:
                hold[1].set()  # a generation that ended before the held step lets the load go
        return out

    @torch.no_grad()
    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[Generation]:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens)
        out: list[Generation] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            out.extend(Generation(g.prompt_ids, g.completion_ids, g.logprobs, g.finish_reason)
                       for g in self._decode(prompt_ids[start:start + self.batch_size], 1, sampling, None))
        return out

    def _decode(self, prompts: list[list[int]], n: int, sampling: SamplingConfig, rng: torch.Generator | None,
                hold: Optional[tuple[int, threading.Event]] = None) -> list[SampledGeneration]:
        """``n`` completions per prompt (greedy when ``rng`` is None), prompt-major.

        Each prompt is prefilled once for its ``n`` samples (the fused step reads that KV once for all
        of them, :class:`SharedPrefixKV`; otherwise it is repeated per sample); rows leave
        the batch as soon as they emit EOS. Tokens are drawn by inverse-CDF sampling from
        :func:`support_logprobs` (temperature, top-k, top-p): the same support the learner scores.
        Every forward runs inside ``gate.forward()``; a weight load between two of them is seen at
        the next step (its version recorded for the tokens it produces; ``on_swap`` says what
        happens to the prefix's KV cache).
        """
        ids, attn = self._left_pad(prompts)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache, shared, cache_version = self._prefill(ids, attn, pos, n, room=sampling.max_new_tokens + 1)
        if n > 1:
            ids, attn, pos = (t.repeat_interleave(n, dim=0) for t in (ids, attn, pos))
        rows = ids.shape[0]
        alive = torch.arange(rows)
        step_ids, step_pos = ids[:, -1:], pos[:, -1:]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logps: list[list[float]] = [[] for _ in range(rows)]
        versions: list[list[int]] = [[] for _ in range(rows)]
        stopped = [False] * rows
        probs: Optional[Tensor] = None
        for step in range(sampling.max_new_tokens):
            if hold is not None and step == hold[0]:
                held = self.policy_version
                hold[1].set()
                if not self.gate.wait_for(lambda held=held: self.policy_version != held, HOLD_TIMEOUT_S):
                    raise RuntimeError(f"held generation: no weight load within {HOLD_TIMEOUT_S:.0f} s")
            with self.gate.forward():
                version = self.policy_version
                if version != cache_version and self.on_swap == "recompute":
                    cache = self._prefix_cache(ids[alive.to(ids.device)], tokens, alive, attn,
                                               room=sampling.max_new_tokens + 1)
                cache_version = version
                if shared is not None:
                    logits = self.fused.step_shared(step_ids, step_pos, alive, shared).float()
                elif self.fused is not None:
                    logits = self.fused.step(step_ids, step_pos, attn, cache).float()
                else:
                    logits = self.model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos,
                                        past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if rng is None:
                lp = torch.log_softmax(logits, dim=-1)
                nxt = lp.argmax(-1)
            else:
                lp = support_logprobs(logits, sampling)
                if probs is None:  # rows only leave the batch: the first step's buffer serves them all
                    probs = lp.new_empty(lp.shape[0], lp.shape[1] + (-lp.shape[1] % BLOCK))
                nxt = draw(lp, rng, out=probs)
            nxt_lp = lp.gather(-1, nxt[:, None]).squeeze(-1)
            done = nxt == self.eos_id
            for r, t, l, d in zip(alive.tolist(), nxt.tolist(), nxt_lp.tolist(), done.tolist()):
                tokens[r].append(t)
                logps[r].append(l)
                versions[r].append(version)
                stopped[r] = d
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(attn.shape[0], 1, dtype=attn.dtype, device=attn.device)], dim=1)
            step_ids, step_pos = nxt[:, None], step_pos + 1
            if bool(done.any()):  # finished rows leave the batch; rows from the tail fill their places
                keep = fill_holes(done)
                if shared is None:
                    cache.batch_select_indices(keep)
                alive = alive[keep.cpu()]
                attn, step_ids, step_pos = attn[keep], step_ids[keep], step_pos[keep]
        return [
            SampledGeneration(prompt_ids=list(prompts[r // n]), completion_ids=tokens[r], logprobs=logps[r],
                              finish_reason="stop" if stopped[r] else "length", versions=versions[r])
            for r in range(rows)
        ]

    def _prefill(self, ids: Tensor, attn: Tensor, pos: Tensor, n: int, room: int):
        """The prompts' KV cache (all but each prompt's last token, prefilled once per prompt) for
        ``n`` samples each: shared by the samples (:class:`SharedPrefixKV`, fused step only, and not
        with ``on_swap = "recompute"``, which rebuilds one cache per row) or repeated per sample.
        Returns (cache, shared or None, the policy version that computed it)."""
        cache = append_cache(self.model.config, room)
        with self.gate.forward():
            version = self.policy_version
            if ids.shape[1] > 1:
                backbone = getattr(self.model, self.model.base_model_prefix)
                backbone(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
                         past_key_values=cache, use_cache=True)
        if n == 1:
            return cache, None, version
        if self.fused is not None and self.share_prefix and ids.shape[1] > 1 and self.on_swap != "recompute":
            return cache, SharedPrefixKV(cache, attn[:, :-1], n, room), version
        cache.batch_repeat_interleave(n)
        return cache, None, version

    def _prefix_cache(self, ids: Tensor, tokens: list[list[int]], alive: Tensor, attn: Tensor, room: int):
        """A fresh KV cache of the alive rows' prompt and tokens so far (all but the last, which the
        next step feeds) under the current weights: the prefill after a mid-generation swap."""
        rows = alive.tolist()
        done = torch.tensor([tokens[r] for r in rows], dtype=torch.long).reshape(len(rows), len(tokens[rows[0]]))
        seq = torch.cat([ids, done.to(ids.device)], dim=1)
        cache = append_cache(self.model.config, room)
        if seq.shape[1] > 1:
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            backbone = getattr(self.model, self.model.base_model_prefix)
            backbone(input_ids=seq[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
                     past_key_values=cache, use_cache=True)
        return cache

    @contextmanager
    def swapping(self, version: int) -> Iterator[None]:
        """Load weights inside this block (no forward runs meanwhile); the engine then holds ``version``."""
        reached, self._hold_load = self._hold_load, None
        if reached is not None and not reached.wait(HOLD_TIMEOUT_S):
            raise RuntimeError(f"held weight load: the generation did not reach its step within {HOLD_TIMEOUT_S:.0f} s")
        with self.gate.load():
            yield
            self.policy_version = version

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        for name, t in named_tensors:
            target = params.get(name, buffers.get(name))
            if target is None:
                raise KeyError(f"weight sync: the engine has no tensor named '{name}'")
            target.copy_(t.to(target.dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def named_weights(self) -> dict[str, Tensor]:
        """The model's parameters and buffers by HF name: a collective sync receives into them."""
        return {**dict(self.model.named_buffers()), **dict(self.model.named_parameters())}

    def weights_updated(self, names: list[str]) -> None:
        """Tensors of ``names`` were written in place behind autograd's back (a collective received
        into them): bump their version counters so derived copies (:class:`PackedLinears`) rebuild."""
        weights = self.named_weights()
        for n in names:
            torch.autograd.graph.increment_version(weights[n])

    @torch.no_grad()
    def adopt_weights(self, named: dict[str, Tensor]) -> None:
        """Point the model's tensors at ``named`` (shared memory of a same-node sync), no copy;
        a tensor of another dtype or shape is copied instead."""
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        for name, t in named.items():
            target = params.get(name, buffers.get(name))
            if target is None:
                raise KeyError(f"weight sync: the engine has no tensor named '{name}'")
            if t.dtype == target.dtype and t.shape == target.shape and t.device == target.device:
                target.data = t
            else:
                target.data = t.to(target.device, target.dtype).reshape(target.shape).clone()

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], sampling: SamplingConfig) -> list[list[float]]:
        out = []
        for p, c in zip(prompt_ids, completion_ids):
            ids = torch.tensor([p + c], dtype=torch.long, device=self.device)
            with self.gate.forward():
                logits = self.model(input_ids=ids).logits[0, len(p) - 1: len(p) + len(c) - 1].float()
            lp = support_logprobs(logits, sampling).gather(-1, torch.tensor(c, device=self.device)[:, None]).squeeze(-1)
            out.append(lp.tolist())
        return out

    def tensor_checksum(self, names: list[str]) -> dict[str, float]:
        state = self.model.state_dict()
        return {n: float(torch.sum(state[n], dtype=torch.float64)) for n in names}

    def close(self) -> None:
        self.model = None

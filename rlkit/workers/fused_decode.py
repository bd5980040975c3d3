"""One decode step of a Llama-family model in a few fused ops: the HF engine's CPU decode path.

transformers' forward of a decoder layer is about sixty small ops at a decode step (RMSNorm as five
elementwise ops, three projections for q, k and v, RoPE through ``rotate_half`` for q and k apart,
two MLP input projections, the mask built again for every step); on two CPU threads each costs
tens of microseconds of dispatch. The same arithmetic with

* q, k and v from one matmul on their concatenated weights, gate and up from another;
* RoPE applied once to q and k together (they are adjacent in that matmul's output);
* ``torch.rms_norm`` (one op), and the boolean key mask built once per step for all layers;
* the two concatenations on oneDNN-packed copies (:class:`_Packed`, rebuilt when a part changes,
  as :class:`rlkit.workers.hf_engine.PackedLinears` does for the single linears, whose packed
  copies the other matmuls use);

runs the same layer in about twenty. Prefill, the KV cache and the decoding loop stay the engine's:
the step reads and appends the same cache layers that transformers' prefill filled.

Only models whose layers are plain pre-norm attention + SwiGLU blocks (``llama``, ``mistral``,
``qwen2``, with full attention in every layer: no sliding window) take this path, and only after a
probe: at build, the fused step and transformers' forward decode the same random tokens and their
logits must agree (fp32 tolerance), else the engine keeps transformers' forward. On CUDA the engine
keeps transformers' forward as well (this path is measured on the CPU only).
Measured in docs/benchmarks.md, "Levers": a whole generation at the demo's shape (SmolLM2-135M,
8 prompts × 8 samples × 48 tokens, 2 threads) takes 0.81 of the time it takes through
transformers' forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}
"""model_type → the decoder-layer class whose arithmetic :class:`FusedDecoder` reproduces."""


class _Packed:
    """``F.linear`` over the concatenation of some linears' weights (and biases), on a
    oneDNN-packed copy for ``rows`` rows when ``packed``; rebuilt when any part's storage or
    in-place version changes (a weight sync), so the parameters themselves stay the truth.
    A single linear needs none of this: its own forward (:class:`PackedLinears`) packs it.
    ``matmul_dtype`` (packed only; None: the weights' own): the dtype the copy holds and the product
    is computed in, the input rounded to it and the output widened back (``rollout.matmul_dtype``)."""

    def __init__(self, linears: list[torch.nn.Linear], rows: int, packed: bool):
        self.linears, self.rows, self.packed = linears, rows, packed
        self.matmul_dtype: Optional[torch.dtype] = None
        self.stamp: Optional[tuple] = None

    def _current(self) -> tuple:
        return (self.matmul_dtype,) + tuple((m.weight.data_ptr(), m.weight._version) + (
            (m.bias.data_ptr(), m.bias._version) if m.bias is not None else ()) for m in self.linears)

    def _build(self) -> None:
        dt = self.matmul_dtype or self.linears[0].weight.dtype
        w = torch.cat([m.weight.detach() for m in self.linears]).to(dt)
        biases = [m.bias for m in self.linears]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else m.weight.new_zeros(m.out_features)
            for m, b in zip(self.linears, biases)]).to(dt)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, self.rows) if self.packed else w

    def __call__(self, x: Tensor) -> Tensor:
        stamp = self._current()
        if stamp != self.stamp:
            self._build()
            self.stamp = stamp
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, self.bias, "none", [], "")
            return y.to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def _full_attention_everywhere(cfg) -> bool:
    """Whether every layer of ``cfg`` attends to all earlier positions (no sliding window): the
    cache transformers builds for it holds plain ``DynamicLayer``s only."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=cfg).layers)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FusedDecoder:
    """The decode step of ``model`` (a ``*ForCausalLM`` of :data:`FAMILIES`): build with
    :meth:`build`, which returns None for any other model or when the probe disagrees."""

    def __init__(self, model: torch.nn.Module, rows: int, packed: bool):
        cfg = model.config
        self.model = model
        self.backbone = getattr(model, model.base_model_prefix)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = []
        for layer in self.backbone.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm, _Packed([a.q_proj, a.k_proj, a.v_proj], rows, packed),
                a.o_proj, layer.post_attention_layernorm,
                _Packed([m.gate_proj, m.up_proj], rows, packed), m.down_proj, a.scaling))
        self.head = model.lm_head
        self.intermediate = cfg.intermediate_size

    def set_matmul_dtype(self, dtype: torch.dtype) -> None:
        """Multiply the q/k/v and gate/up concatenations in ``dtype`` (packed copies only; the single
        linears follow :meth:`rlkit.workers.hf_engine.PackedLinears.set_matmul_dtype`)."""
        for layer in self.layers:
            for part in (layer[1], layer[4]):
                if part.packed:
                    part.matmul_dtype = dtype

    @classmethod
    def build(cls, model: torch.nn.Module, rows: int, packed: bool) -> Optional["FusedDecoder"]:
        """The fused step of ``model``, or None when its family or layout is not one this step
        reproduces, or the probe's logits differ from transformers' forward."""
        cfg = model.config
        layer_cls = FAMILIES.get(getattr(cfg, "model_type", None))
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        layers = getattr(backbone, "layers", None)
        if (layer_cls is None or layers is None or type(model.lm_head) is not torch.nn.Linear
                or any(type(l).__name__ != layer_cls for l in layers)
                or getattr(cfg, "hidden_act", None) != "silu" or not _full_attention_everywhere(cfg)):
            return None
        fused = cls(model, rows, packed)
        return fused if fused.agrees() else None

    def norm(self, module: torch.nn.Module, x: Tensor) -> Tensor:
        return torch.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)

    @torch.no_grad()
    def step(self, ids_R_1: Tensor, pos_R_1: Tensor, attn_R_L: Tensor, cache) -> Tensor:
        """Logits [R, V] of the next token after ``ids_R_1`` at positions ``pos_R_1``; ``cache``
        holds the previous L − 1 keys and values of each layer and gets this step's appended;
        ``attn_R_L`` marks the real (not padding) positions of all L."""
        mask = attn_R_L.bool()[:, None, None, :]
        gqa = self.heads != self.kv_heads

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor, scaling: float) -> Tensor:
            keys, values = cache.layers[i].update(k, v)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)

        return self._forward(ids_R_1, pos_R_1, attend)

    @torch.no_grad()
    def step_shared(self, ids_R_1: Tensor, pos_R_1: Tensor, rows_R: Tensor, kv: "SharedPrefixKV") -> Tensor:
        """:meth:`step` for rows ``rows_R`` of a batch of samples that share their prompt's prefill
        (:class:`SharedPrefixKV`, which gets this step's keys and values)."""
        out = self._forward(ids_R_1, pos_R_1, lambda i, q, k, v, scaling: kv.attend(i, q, k, v, rows_R, scaling))
        kv.length += 1
        return out

    def _forward(self, ids_R_1: Tensor, pos_R_1: Tensor, attend) -> Tensor:
        R = ids_R_1.shape[0]
        H, Hkv, d = self.heads, self.kv_heads, self.head_dim
        x = self.backbone.embed_tokens(ids_R_1).view(R, -1)
        cos, sin = self.backbone.rotary_emb(x, pos_R_1)  # [R, 1, d]
        for i, (n1, qkv, o, n2, gate_up, down, scaling) in enumerate(self.layers):
            y = qkv(self.norm(n1, x))  # [R, (H + 2 Hkv) d]
            qk = y[:, : (H + Hkv) * d].view(R, H + Hkv, d)
            qk = qk * cos + _rotate_half(qk) * sin
            q = qk[:, :H, None]
            k = qk[:, H:, None]
            v = y[:, (H + Hkv) * d:].view(R, Hkv, 1, d)
            x = x + o(attend(i, q, k, v, scaling).reshape(R, H * d))
            g, u = gate_up(self.norm(n2, x)).split(self.intermediate, dim=-1)
            x = x + down(F.silu(g) * u)
        return self.head(self.norm(self.backbone.norm, x))

    @torch.no_grad()
    def agrees(self) -> bool:
        """Decode two random steps after a short left-padded prefill with this step and with
        transformers' forward; True when the logits agree within fp32 tolerance."""
        from rlkit.workers.hf_engine import append_cache

        dev = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.model.config.vocab_size, (2, 6), generator=g).to(dev)
        attn = torch.ones(2, 6, dtype=torch.long, device=dev)
        attn[1, :2] = 0
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        caches = []
        for _ in range(2):
            cache = append_cache(self.model.config, 4)
            self.backbone(input_ids=ids[:, :4], attention_mask=attn[:, :4], position_ids=pos[:, :4],
                          past_key_values=cache, use_cache=True)
            caches.append(cache)
        for t in (4, 5):
            ref = self.model(input_ids=ids[:, t:t + 1], attention_mask=attn[:, :t + 1], position_ids=pos[:, t:t + 1],
                             past_key_values=caches[0], use_cache=True, logits_to_keep=1).logits[:, -1].float()
            got = self.step(ids[:, t:t + 1], pos[:, t:t + 1], attn[:, :t + 1], caches[1]).float()
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max()))):
                return False
        return True


class SharedPrefixKV:
    """Keys and values of ``n`` samples per prompt that share the prompt's prefill: each layer's
    prefill keys/values once per prompt ([P, Hkv, Lp, d], not repeated ``n`` times) and each
    sample's own positions (the last prompt token, then its tokens) in [P·n, Hkv, room, d].

    A decode step of sample row r (prompt r // n) attends to both under one softmax over
    [prefix scores ⊕ own scores], as SDPA over the repeated cache would, but reads each prompt's
    keys and values once for its n samples instead of n times (at the demo's shape, ~93 prompt
    positions against ≤ 49 own ones, that is most of the cache). Rows address the buffers by their
    original index, so a row that finishes leaves them as they are.
    """

    def __init__(self, cache, prefix_mask_P_L: Tensor, n: int, room: int):
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]
        k0 = self.prefix[0][0]
        P, Hkv, Lp, d = k0.shape
        self.P, self.n, self.length = P, n, 0
        bias = torch.zeros(P, Lp, dtype=k0.dtype, device=k0.device)
        bias.masked_fill_(~prefix_mask_P_L.bool().to(k0.device), float("-inf"))
        self.bias = bias.repeat_interleave(n, dim=0)[:, None, None, :]  # [P·n, 1, 1, Lp]
        # Zero-filled: a finished row's unwritten positions must not turn into NaN in the products.
        self.k = [k0.new_zeros(P * n, Hkv, room, d) for _ in self.prefix]
        self.v = [k0.new_zeros(P * n, Hkv, room, d) for _ in self.prefix]
        self.q: Optional[Tensor] = None

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, scaling: float) -> Tensor:
        """Attention output [R, H, 1, d] of ``rows``' queries ``q`` [R, H, 1, d]; ``k``, ``v``
        [R, Hkv, 1, d] are written at this step's position first."""
        R, H, _, d = q.shape
        Hkv = k.shape[1]
        g, P, n, t = H // Hkv, self.P, self.n, self.length
        N = P * n
        keys, values = self.k[i], self.v[i]
        keys[:, :, t].index_copy_(0, rows, k[:, :, 0])
        values[:, :, t].index_copy_(0, rows, v[:, :, 0])
        if self.q is None:
            self.q = q.new_zeros(N, H, d)
        self.q.index_copy_(0, rows, q[:, :, 0] * scaling)
        kp, vp = self.prefix[i]
        Lp = kp.shape[2]
        # [P, Hkv, n·g, d] @ [P, Hkv, d, Lp]: each prompt's keys read once for its n samples.
        q_pre = self.q.view(P, n, Hkv, g, d).transpose(1, 2).reshape(P, Hkv, n * g, d)
        pre = torch.matmul(q_pre, kp.transpose(-1, -2)).view(P, Hkv, n, g, Lp).transpose(1, 2)
        own = torch.matmul(self.q.view(N, Hkv, g, d), keys[:, :, : t + 1].transpose(-1, -2))  # [N, Hkv, g, t+1]
        p = torch.softmax(torch.cat([pre.reshape(N, Hkv, g, Lp) + self.bias, own], dim=-1), dim=-1)
        p_pre = p[..., :Lp].reshape(P, n, Hkv, g, Lp).transpose(1, 2).reshape(P, Hkv, n * g, Lp)
        out = torch.matmul(p_pre, vp).view(P, Hkv, n, g, d).transpose(1, 2).reshape(N, Hkv, g, d)
        out = out + torch.matmul(p[..., Lp:], values[:, :, : t + 1])
        return out.view(N, H, d).index_select(0, rows).view(R, H, 1, d)


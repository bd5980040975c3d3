"""``rlkit plan CONFIG``: where every role goes, the batch arithmetic, memory and sync volume, dry.

Nothing heavy starts: no Ray, no model weights. Model sizes come from the model folder's
``config.json`` (or the known SmolLM2-135M numbers for ``model.path: smollm2``); the prompt length
is measured with the tokenizer when one is on disk, else assumed. The placement is the one
:mod:`rlkit.placement` will request, packed onto the declared cluster (``resources.nodes``,
``cpus_per_node``, ``gpus_per_node``, ``memory_gb_per_node``) the way Ray's PACK strategy does it:
first fit, node by node. A bundle that fits nowhere, or a node whose host-memory estimate exceeds
``memory_gb_per_node``, makes the plan infeasible; ``main_plan`` then exits with status 1.

    report = plan(load_config("configs/grpo_demo.yaml"))
    print(format_plan(report))

Memory per learner rank follows the ZeRO paper's accounting (Rajbhandari et al. 2020, §3 and
Fig. 1): Ψ parameters, Ψ_t of them trainable, N ranks, weights/grads in the module dtype (2 or 4
bytes) and Adam's two fp32 moments (8 Ψ_t bytes) plus an fp32 master copy under bf16 (4 Ψ_t).
Stage ≥1 divides the optimizer states by N, stage ≥2 the gradients, stage 3 the weights.
Activations use Korthikanti et al. 2022 (eq. 2, per layer s·b·h·(34 + 5·a·s/h) bytes at 16 bit,
doubled for fp32) without checkpointing and 2·s·b·h per layer with it; KV cache is
2·layers·kv_heads·head_dim·bytes per token. These are estimates to catch order-of-magnitude
mistakes, not allocator-exact numbers.

GPU fit (before any actor starts): every bundle with GPUs is checked against one GPU's memory
(``resources.gpu_memory_gb``, else the local GPU's): actors sharing a GPU (fractional requests in
one bundle, e.g. a colocated learner and engine) must fit together; an actor with whole GPUs must
fit in its share of them. A vLLM engine counts as the fraction of each GPU it preallocates
(:data:`VLLM_GPU_FRACTION`, the engine's ``gpu_memory_utilization``). Optimizer states offloaded
with ``learner.offload_optimizer`` (and ZeRO-3 weights with ``learner.offload_params``) count as
host memory, not GPU memory.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlkit.config import RunConfig
from rlkit.placement import Layout, layout

GiB = 2**30
VLLM_GPU_FRACTION = 0.5
"""Share of each of its GPUs a vLLM engine preallocates (rlkit.workers.vllm_engine's default
``gpu_memory_utilization``): weights, activations and KV cache live inside it."""
ASSUMED_PROMPT_TOKENS = 256
SMOLLM2 = {"hidden": 576, "layers": 30, "vocab": 49152, "heads": 9, "kv_heads": 3, "head_dim": 64,
           "intermediate": 1536, "tied": True}
"""SmolLM2-135M-Instruct (its config.json): 134.5 M parameters with these sizes."""


@dataclass
class ModelSizes:
    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    source: str

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Llama-style decoder: embeddings, per layer q/k/v/o + gated MLP + 2 norms, final norm, LM head."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.embedding * (1 if self.tied else 2) + self.layers * layer + self.hidden


@dataclass
class BatchMath:
    prompts_per_step: int
    samples_per_prompt: int
    sequences_per_step: int
    learner_ranks: int
    sequences_per_rank: int
    updates_per_step: int
    sequences_per_update: int
    """Per rank, per optimizer step (a PPO mini-batch)."""
    micro_batch_size: int
    grad_accumulation: int
    """Micro-batches accumulated per optimizer step on each rank."""
    micro_batches_per_step: int
    rollout_workers: int
    prompts_per_worker: int
    prompt_tokens: int
    prompt_tokens_source: str
    max_new_tokens: int
    tokens_per_step_max: int
    tokens_per_micro_batch_max: int


@dataclass
class RoleMemory:
    role: str
    weights: float
    grads: float = 0.0
    optimizer: float = 0.0
    frozen: float = 0.0
    """Reference model held by each learner rank (algorithms that need π_ref)."""
    activations: float = 0.0
    kv_cache: float = 0.0
    device: str = "host"
    notes: str = ""
    host_part: float = 0.0
    """Bytes of ``total`` kept in host memory even when ``device`` is "gpu" (DeepSpeed offload)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.frozen + self.activations + self.kv_cache

    @property
    def device_bytes(self) -> float:
        """What must sit in the device's memory (all of it on "host")."""
        return self.total - self.host_part


@dataclass
class NodeUse:
    index: int
    cpus: float
    gpus: float
    memory_gb: float | None
    actors: list[str] = field(default_factory=list)
    used_cpus: float = 0.0
    used_gpus: float = 0.0
    host_bytes: float = 0.0


@dataclass
class PlanReport:
    cfg: RunConfig
    model: ModelSizes
    trainable: int
    layout: Layout
    nodes: list[NodeUse]
    cluster_source: str
    bundle_nodes: dict[tuple[str, int], int]
    batch: BatchMath
    memory: dict[str, RoleMemory]
    sync_bytes_per_engine: float
    sync_bytes_total: float
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# ----------------------------------------------------------------------------------------------
# Inputs: model sizes, prompt length, declared cluster
# ----------------------------------------------------------------------------------------------


def model_sizes(path: str) -> ModelSizes:
    """Sizes from ``path/config.json`` (``text_config`` for multimodal wrappers), or SmolLM2's."""
    if path == "smollm2":
        return ModelSizes(**SMOLLM2, source="smollm2 (SmolLM2-135M-Instruct)")
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model.path: no config.json in '{path}' (rlkit plan reads sizes from it)")
    c = json.loads(cfg_file.read_text())
    c = c.get("text_config", c)
    try:
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        return ModelSizes(
            hidden=hidden, layers=int(c["num_hidden_layers"]), vocab=int(c["vocab_size"]), heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            intermediate=int(c.get("intermediate_size") or 4 * hidden),
            tied=bool(c.get("tie_word_embeddings", False)), source=str(cfg_file),
        )
    except KeyError as e:
        raise ValueError(f"{cfg_file}: missing {e.args[0]} (rlkit plan needs Llama-style size keys)") from None


def trainable_params(cfg: RunConfig, m: ModelSizes) -> int:
    """Ψ_t: LoRA adapters only, or all weights minus a frozen embedding."""
    lora = cfg.learner.lora
    if lora.enabled:
        q_out, kv_out = m.heads * m.head_dim, m.kv_heads * m.head_dim
        shapes = {"q_proj": (m.hidden, q_out), "k_proj": (m.hidden, kv_out), "v_proj": (m.hidden, kv_out),
                  "o_proj": (q_out, m.hidden), "gate_proj": (m.hidden, m.intermediate),
                  "up_proj": (m.hidden, m.intermediate), "down_proj": (m.intermediate, m.hidden)}
        per_layer = sum(lora.r * (i + o) for name, (i, o) in shapes.items() if name in lora.target_modules)
        return m.layers * per_layer
    return m.params - (m.embedding if cfg.model.freeze_embeddings else 0)


def _tokenizer_dir(cfg: RunConfig) -> Path | None:
    """A folder with tokenizer files that is already on disk (nothing is built or fetched)."""
    if cfg.model.path != "smollm2":
        p = Path(cfg.model.path)
        return p if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file() else None
    from rlkit.assets import SMOLLM2_FOLDER, cache_root

    for p in (cache_root() / "models" / SMOLLM2_FOLDER, cache_root() / "tokenizers" / "smollm2"):
        if (p / "tokenizer.json").is_file():
            return p
    return None


def prompt_tokens(cfg: RunConfig, sample: int = 256) -> tuple[int, str]:
    """(longest prompt in tokens over up to ``sample`` training prompts, how it was obtained)."""
    tok_dir = _tokenizer_dir(cfg)
    if tok_dir is None:
        return ASSUMED_PROMPT_TOKENS, "assumed (no tokenizer on disk)"
    from rlkit.assets import load_tokenizer
    from rlkit.config import build_data_spec
    from rlkit.data import load_prompts

    spec = build_data_spec(cfg)
    if spec.kind in ("arithmetic", "reasoning_gym"):
        # Generated prompts all look alike: a sample measures the length, and costs a second, not a minute.
        spec = spec.model_copy(update={"num_train": min(spec.num_train or sample, sample), "num_eval": 0})
    try:
        tok = load_tokenizer(tok_dir)
        rows, _ = load_prompts(spec, tok)
    except (OSError, ValueError, ImportError) as e:  # a plan must still print when the data is not reachable
        return ASSUMED_PROMPT_TOKENS, f"assumed (prompts not readable: {type(e).__name__}: {e})"
    texts = [r.prompt_text for r in rows[:sample]]
    if not texts:
        return ASSUMED_PROMPT_TOKENS, "assumed (no prompts)"
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return max(lengths), f"measured: max over {len(texts)} training prompts (mean {sum(lengths) / len(lengths):.0f})"


def declared_nodes(cfg: RunConfig) -> tuple[list[NodeUse], str]:
    """The declared cluster; undeclared sizes fall back to this machine's."""
    r = cfg.resources
    import psutil

    cpus = r.cpus_per_node if r.cpus_per_node is not None else float(os.cpu_count() or 1)
    gpus = r.gpus_per_node
    if gpus is None:
        import torch

        gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    mem = r.memory_gb_per_node if r.memory_gb_per_node is not None else psutil.virtual_memory().total / GiB
    n = r.nodes or 1
    declared = [k for k in ("nodes", "cpus_per_node", "gpus_per_node", "memory_gb_per_node") if getattr(r, k) is not None]
    source = "declared: " + ", ".join(declared) if declared else "not declared: this machine, 1 node"
    if declared and len(declared) < 4:
        source += "; others from this machine"
    return [NodeUse(i, cpus, gpus, mem) for i in range(n)], source


# ----------------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------------


def _dtype(cfg: RunConfig, on_gpu: bool) -> str:
    return cfg.model.resolved_dtype(on_gpu)


def _width(cfg: RunConfig) -> int:
    """Bytes per synced weight element: the learner's dtype (bf16 on GPU under "auto")."""
    return 2 if _dtype(cfg, cfg.resources.learner_gpus > 0) == "bfloat16" else 4


def batch_math(cfg: RunConfig, prompt_len: int, prompt_source: str) -> BatchMath:
    """Sequences per rank, PPO mini-batches, micro-batches and the token upper bounds of one step."""
    t, l = cfg.train, cfg.learner
    per_rank = cfg.sequences_per_rank
    # torch.tensor_split gives the first mini-batches one extra row when U does not divide.
    per_update = math.ceil(per_rank / l.updates_per_step)
    accum = math.ceil(per_update / l.micro_batch_size)
    seq_tokens = prompt_len + cfg.rollout.max_new_tokens
    return BatchMath(
        prompts_per_step=t.prompts_per_step, samples_per_prompt=t.samples_per_prompt,
        sequences_per_step=cfg.sequences_per_step, learner_ranks=l.num_ranks, sequences_per_rank=per_rank,
        updates_per_step=l.updates_per_step, sequences_per_update=per_update,
        micro_batch_size=l.micro_batch_size, grad_accumulation=accum,
        micro_batches_per_step=accum * l.updates_per_step, rollout_workers=cfg.rollout.num_workers,
        prompts_per_worker=math.ceil(t.prompts_per_step / cfg.rollout.num_workers),
        prompt_tokens=prompt_len, prompt_tokens_source=prompt_source, max_new_tokens=cfg.rollout.max_new_tokens,
        tokens_per_step_max=cfg.sequences_per_step * seq_tokens,
        tokens_per_micro_batch_max=min(l.micro_batch_size, per_update) * seq_tokens,
    )


def _activation_bytes(m: ModelSizes, seqs: int, seq_len: int, width: int, checkpointing: bool) -> float:
    """Korthikanti et al. 2022 eq. 2 per layer, scaled from 16-bit to ``width`` bytes."""
    sbh = seqs * seq_len * m.hidden
    per_layer = 2 * sbh if checkpointing else sbh * (34 + 5 * m.heads * seq_len / m.hidden)
    return m.layers * per_layer * width / 2


def memory_estimates(cfg: RunConfig, m: ModelSizes, trainable: int, b: BatchMath) -> dict[str, RoleMemory]:
    """Bytes per actor of each role (see the module docstring for the accounting)."""
    bf16 = _dtype(cfg, cfg.resources.learner_gpus > 0) == "bfloat16"
    width = 2 if bf16 else 4
    n, stage = cfg.learner.num_ranks, cfg.learner.zero_stage
    weights, grads = width * m.params, width * trainable
    optim = (8 + (4 if bf16 else 0)) * trainable
    optim /= n if stage >= 1 else 1
    grads /= n if stage >= 2 else 1
    weights /= n if stage == 3 else 1
    ref = width * m.params if cfg.algorithm_setup.needs.reference else 0.0
    seq_len = b.prompt_tokens + b.max_new_tokens
    micro = min(b.micro_batch_size, b.sequences_per_update)
    acts = _activation_bytes(m, micro, seq_len, width, cfg.model.gradient_checkpointing)
    # The fused log-prob pass keeps one chunk of logits (and its softmax) alive, never [tokens × V].
    acts += 2 * min(cfg.learner.chunk_size, micro * seq_len) * m.vocab * 4
    learner_dev = "gpu" if cfg.resources.learner_gpus > 0 else "host"
    lc = cfg.learner
    offloaded = (optim if lc.offload_optimizer else 0.0) + (weights if lc.offload_params else 0.0)
    notes = f"ZeRO-{stage} over {n} rank(s)" + (", + reference model" if ref else "")
    if offloaded and learner_dev == "gpu":
        notes += f"; {_size(offloaded)} offloaded to host memory"
    learner = RoleMemory("learner", weights, grads, optim, ref, acts, device=learner_dev, notes=notes,
                         host_part=offloaded if learner_dev == "gpu" else 0.0)
    seqs_per_worker = b.prompts_per_worker * b.samples_per_prompt
    r_width = 2 if _dtype(cfg, cfg.resources.rollout_gpus > 0) == "bfloat16" else 4
    kv = 2 * m.layers * m.kv_heads * m.head_dim * r_width * seqs_per_worker * seq_len
    rollout_dev = "gpu" if cfg.resources.rollout_gpus > 0 else "host"
    notes = f"{seqs_per_worker} sequences in flight"
    if cfg.rollout.engine == "vllm":
        notes += "; vLLM preallocates its KV cache (gpu_memory_utilization / VLLM_CPU_KVCACHE_SPACE)"
    if cfg.rollout.tensor_parallel_size > 1:
        notes += f"; weights and KV cache shown for the whole engine, split over {cfg.rollout.tensor_parallel_size} GPUs"
    rollout = RoleMemory("rollout", r_width * m.params, kv_cache=kv, device=rollout_dev, notes=notes)
    reward = RoleMemory("reward", 0.0, notes="verifier processes; no model")
    return {"learner": learner, "rollout": rollout, "reward": reward}


# ----------------------------------------------------------------------------------------------
# Packing onto the declared nodes
# ----------------------------------------------------------------------------------------------


def _fits(node: NodeUse, bundle: dict[str, float]) -> bool:
    eps = 1e-9
    return (node.used_cpus + bundle.get("CPU", 0.0) <= node.cpus + eps
            and node.used_gpus + bundle.get("GPU", 0.0) <= node.gpus + eps)


def pack(plan: Layout, nodes: list[NodeUse]) -> tuple[dict[tuple[str, int], int], list[str]]:
    """First-fit of every bundle, group by group, onto ``nodes`` (updated in place); returns
    (bundle → node index, errors)."""
    where: dict[tuple[str, int], int] = {}
    errors = []
    for group, bundles in plan.bundles.items():
        for i, bundle in enumerate(bundles):
            node = next((nd for nd in nodes if _fits(nd, bundle)), None)
            if node is None:
                biggest = max(nodes, key=lambda nd: (nd.gpus, nd.cpus))
                errors.append(
                    f"bundle {group}/{i} needs CPU={bundle.get('CPU', 0):g} GPU={bundle.get('GPU', 0):g} "
                    f"({_members(plan, group, i)}); no node has that left "
                    f"(nodes have CPU={biggest.cpus:g} GPU={biggest.gpus:g}, {len(nodes)} node(s))")
                continue
            node.used_cpus += bundle.get("CPU", 0.0)
            node.used_gpus += bundle.get("GPU", 0.0)
            where[(group, i)] = node.index
    return where, errors


def _members(plan: Layout, group: str, bundle: int) -> str:
    return ", ".join(f"{s.role}[{s.index}]" for s in plan.slots.values() if s.group == group and s.bundle == bundle)


def plan(cfg: RunConfig, prompt_len: int | None = None) -> PlanReport:
    """Everything ``rlkit plan`` prints, computed without starting Ray or loading weights.

    ``prompt_len``: the prompt length in tokens to plan for; None measures it (see :func:`prompt_tokens`).
    """
    m = model_sizes(cfg.model.path)
    trainable = trainable_params(cfg, m)
    prompt_len, prompt_source = (prompt_len, "given") if prompt_len is not None else prompt_tokens(cfg)
    b = batch_math(cfg, prompt_len, prompt_source)
    mem = memory_estimates(cfg, m, trainable, b)
    lay = layout(cfg)
    nodes, source = declared_nodes(cfg)
    where, errors = pack(lay, nodes)
    from rlkit.placement import gpu_request_errors

    errors[:0] = gpu_request_errors(cfg, max(nd.gpus for nd in nodes))
    for key, have in (("CPU", sum(nd.cpus for nd in nodes)), ("GPU", sum(nd.gpus for nd in nodes))):
        want = sum(bd.get(key, 0.0) for bds in lay.bundles.values() for bd in bds)
        if want > have + 1e-9:
            errors.insert(0, f"the run asks for {want:g} {key} in total; the declared cluster has {have:g}")
    for s in sorted(lay.slots.values(), key=lambda s: (s.role, s.index)):
        idx = where.get((s.group, s.bundle))
        if idx is None:
            continue
        nodes[idx].actors.append(f"{s.role}[{s.index}]")
        nodes[idx].host_bytes += mem[s.role].total if mem[s.role].device == "host" else mem[s.role].host_part
    warnings = []
    gpu_gb = gpu_memory_gb(cfg)
    if gpu_gb is None and any(bd.get("GPU") for bds in lay.bundles.values() for bd in bds):
        warnings.append("GPU memory fit not checked: set resources.gpu_memory_gb (no local GPU to read it from)")
    elif gpu_gb is not None:
        errors += gpu_fit_errors(cfg, lay, mem, gpu_gb)
    for nd in nodes:
        if nd.memory_gb is not None and nd.host_bytes > nd.memory_gb * GiB:
            errors.append(f"node {nd.index}: host-memory estimate {nd.host_bytes / GiB:.1f} GiB for "
                          f"{', '.join(nd.actors)} exceeds memory_gb_per_node = {nd.memory_gb:g}")
    if any(lay.slots[k].custom for k in lay.slots):
        warnings.append("resources.custom requests custom node resources; the declared cluster has none, "
                        "so they are not checked here")
    if b.prompt_tokens_source.startswith("assumed"):
        warnings.append(f"prompt length {b.prompt_tokens_source}: {ASSUMED_PROMPT_TOKENS} tokens")
    payload = _width(cfg) * m.params
    # Rank 0 puts each bucket in the object store once; every engine reads it once.
    return PlanReport(cfg, m, trainable, lay, nodes, source, where, b, mem, payload,
                      payload * (cfg.rollout.num_workers + 1), errors, warnings)


def gpu_memory_gb(cfg: RunConfig) -> float | None:
    """One GPU's memory in GiB: ``resources.gpu_memory_gb``, else the local GPU's, else None."""
    if cfg.resources.gpu_memory_gb is not None:
        return cfg.resources.gpu_memory_gb
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GiB
    return None


def _gpu_need(cfg: RunConfig, role: str, mem: RoleMemory, gpus: float, gpu_gb: float) -> float:
    """Bytes of one GPU's memory that one actor of ``role`` holding ``gpus`` GPUs takes on each."""
    if role == "rollout" and cfg.rollout.engine == "vllm":
        return VLLM_GPU_FRACTION * gpu_gb * GiB
    return mem.device_bytes / max(gpus, 1.0)


def gpu_fit_errors(cfg: RunConfig, lay: Layout, mem: dict[str, RoleMemory], gpu_gb: float) -> list[str]:
    """Bundles whose actors do not fit in one GPU's memory (see the module docstring), each naming
    the actors, the estimate and what to change."""
    errors = []
    for group, bundles in lay.bundles.items():
        for i, bundle in enumerate(bundles):
            members = [s for s in lay.slots.values() if s.group == group and s.bundle == i and s.gpus > 0]
            if not members:
                continue
            shared = bundle.get("GPU", 0.0) <= 1.0 + 1e-9  # fractional requests land on one GPU
            parts = [(f"{s.role}[{s.index}]", _gpu_need(cfg, s.role, mem[s.role], s.gpus, gpu_gb)) for s in members]
            checks = [parts] if shared else [[p] for p in parts]
            for check in checks:
                need = sum(b for _, b in check)
                if need > gpu_gb * GiB:
                    who = " + ".join(f"{name} {b / GiB:.1f} GiB" for name, b in check)
                    errors.append(
                        f"GPU memory: bundle {group}/{i}: {who} = {need / GiB:.1f} GiB on one GPU, which has "
                        f"{gpu_gb:g} GiB (resources.gpu_memory_gb); try learner.offload_optimizer: true, more "
                        f"learner.num_ranks with learner.zero_stage: 3, a smaller learner.micro_batch_size, "
                        f"model.gradient_checkpointing: true, or resources.placement: separate")
    return errors


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _placement_lines(r: PlanReport) -> list[str]:
    lay, res = r.layout, r.cfg.resources
    groups = ", ".join(f"{g} {lay.strategies[g]} ×{len(b)}" for g, b in lay.bundles.items())
    lines = [f"placement ({res.placement}; placement groups: {groups})"]
    for nd in r.nodes:
        mem = f", host memory ≈ {_size(nd.host_bytes)}" + (f" of {nd.memory_gb:.1f} GiB" if nd.memory_gb else "")
        lines.append(f"  node {nd.index}: CPU {nd.used_cpus:g}/{nd.cpus:g}, GPU {nd.used_gpus:g}/{nd.gpus:g}{mem}")
        for s in sorted(lay.slots.values(), key=lambda s: (s.role, s.index)):
            if r.bundle_nodes.get((s.group, s.bundle)) == nd.index:
                extra = f" {s.custom}" if s.custom else ""
                lines.append(f"    {s.role}[{s.index}]  bundle {s.group}/{s.bundle}  cpus={s.cpus:g} gpus={s.gpus:g}{extra}")
        if not nd.actors:
            lines.append("    (idle)")
    unplaced = [f"{s.role}[{s.index}]" for s in lay.slots.values() if (s.group, s.bundle) not in r.bundle_nodes]
    if unplaced:
        lines.append(f"  NOT PLACED: {', '.join(unplaced)}")
    return lines


def _batch_lines(b: BatchMath) -> list[str]:
    seq_tokens = b.prompt_tokens + b.max_new_tokens
    rows = [
        ("prompts per step", f"{b.prompts_per_step}"),
        ("samples per prompt", f"{b.samples_per_prompt}"),
        ("sequences per step", f"{b.sequences_per_step}"),
        ("sequences per learner rank", f"{b.sequences_per_rank} ({b.learner_ranks} rank(s))"),
        ("optimizer steps per step", f"{b.updates_per_step} (≤ {b.sequences_per_update} sequences each per rank)"),
        ("micro-batch size", f"{b.micro_batch_size}"),
        ("gradient accumulation", (f"{b.grad_accumulation} micro-batch(es) per optimizer step, "
                                  f"{b.micro_batches_per_step} per step per rank")),
        ("prompts per rollout worker", (f"≤ {b.prompts_per_worker} ({b.rollout_workers} worker(s), "
                                       f"{b.prompts_per_worker * b.samples_per_prompt} sequences)")),
        ("prompt tokens", f"{b.prompt_tokens} ({b.prompt_tokens_source})"),
        ("max new tokens", f"{b.max_new_tokens}"),
        ("tokens per step", f"≤ {b.tokens_per_step_max:,} ({b.sequences_per_step} × {seq_tokens})"),
        ("tokens per micro-batch", f"≤ {b.tokens_per_micro_batch_max:,}"),
    ]
    return ["batch"] + [f"  {k:<28}{v}" for k, v in rows]


def _memory_lines(r: PlanReport) -> list[str]:
    head = f"  {'role':<8}{'device':<7}{'weights':>11}{'grads':>11}{'optimizer':>11}{'frozen':>11}" \
           f"{'activations':>13}{'kv cache':>11}{'total':>11}"
    lines = ["memory per actor (estimate)", head]
    for m in r.memory.values():
        lines.append(f"  {m.role:<8}{m.device:<7}{_size(m.weights):>11}{_size(m.grads):>11}{_size(m.optimizer):>11}"
                     f"{_size(m.frozen):>11}{_size(m.activations):>13}{_size(m.kv_cache):>11}{_size(m.total):>11}"
                     + (f"   {m.notes}" if m.notes else ""))
    return lines


def format_plan(r: PlanReport) -> str:
    """The human-readable plan; the last line says OK or INFEASIBLE."""
    m, cfg = r.model, r.cfg
    n = r.nodes[0]
    lines = [
        (f"model    {m.source}: {m.params / 1e6:.1f} M parameters (hidden {m.hidden}, {m.layers} layers, "
        f"vocab {m.vocab}, {m.heads} heads / {m.kv_heads} KV), {r.trainable / 1e6:.2f} M trainable, "
        f"{_dtype(cfg, cfg.resources.learner_gpus > 0)}" + (" (auto)" if cfg.model.dtype == "auto" else "")),
        f"cluster  {len(r.nodes)} node(s) × {n.cpus:g} CPU, {n.gpus:g} GPU"
        + (f", {n.memory_gb:.0f} GiB" if n.memory_gb else "") + f" ({r.cluster_source})",
        "", *_placement_lines(r), "", *_batch_lines(r.batch), "", *_memory_lines(r), "",
        "weight sync (per step)",
        (f"  payload per engine          {_size(r.sync_bytes_per_engine)} ({m.params / 1e6:.1f} M × "
        f"{_width(cfg)} B)"),
        (f"  bytes moved                 {_size(r.sync_bytes_total)} (rank 0 → object store once, then "
        f"→ {cfg.rollout.num_workers} engine(s))"),
    ]
    for w in r.warnings:
        lines.append(f"warning: {w}")
    if r.ok:
        lines += ["", "plan: OK"]
    else:
        lines += ["", "plan: INFEASIBLE"] + [f"  - {e}" for e in r.errors]
    return "\n".join(lines)


def run_plan(cfg: RunConfig) -> int:
    """Print the plan of an already loaded config; 0 if it fits the declared cluster, else 1."""
    try:
        report = plan(cfg)
    except ValueError as e:
        print(f"rlkit plan: {e}", file=sys.stderr)
        return 2
    text = format_plan(report)
    print(text)
    if not report.ok:
        print("rlkit plan: the config does not fit the declared cluster:\n"
              + "\n".join(f"  - {e}" for e in report.errors), file=sys.stderr)
        return 1
    return 0


def main_plan(argv: list[str] | None = None) -> int:
    """``rlkit plan CONFIG [key.sub=value ...]``: 0 feasible, 1 infeasible, 2 bad config."""
    import argparse

    from rlkit.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="rlkit plan", description="dry-run placement, batch and memory plan")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rlkit: configuration error:\n{e}", file=sys.stderr)
        return 2
    return run_plan(cfg)


if __name__ == "__main__":
    sys.exit(main_plan())

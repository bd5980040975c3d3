"""One typed run configuration; YAML files in ``configs/`` override its defaults.

Batch sizes are declared once (``train.prompts_per_step`` × ``train.samples_per_prompt``) and
everything else is derived. An unknown key, a wrong type or an impossible combination fails
before any worker starts, with a message naming the key and the file.

    cfg = load_config("configs/grpo_demo.yaml", overrides=["train.steps=4"])
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = "smollm2"
    """A Hugging Face model folder, or ``smollm2`` for the embedded SmolLM2-135M-Instruct."""
    ref_path: Optional[str] = None
    """Frozen reference model folder (None: the initial policy)."""
    teacher_path: Optional[str] = None
    """Teacher model folder, for algorithms that declare a teacher (ExOPD / G-OPD)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights and compute dtype of every role. "auto": bfloat16 on a GPU (the learner keeps fp32
    master weights in its optimizer), float32 on CPU; "float32" / "bfloat16" force one everywhere."""
    gradient_checkpointing: bool = False
    freeze_embeddings: bool = False
    """Keep the (tied) embedding / LM-head matrix fixed: 28 M of SmolLM2's 135 M parameters."""

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The dtype a role uses on its device: ``dtype`` unless it is "auto" (bf16 on GPU, fp32 on CPU)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if on_gpu else "float32"


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = "hf"
    num_workers: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(48, gt=0)
    threads: int = Field(2, ge=1)
    """torch threads inside each rollout worker."""
    matmul_dtype: Literal["auto", "bfloat16"] = "auto"
    """What the HF engine's linear layers multiply in on the CPU. "auto": the weights' dtype.
    "bfloat16": oneDNN bf16 kernels (AMX / AVX512-BF16) on bf16 copies of fp32 weights, for every
    linear layer but the LM head; norms, attention, the KV cache, logits and sampling stay fp32
    and the fp32 weights stay what syncs write and checksums read. The sampler's distribution then
    differs from the learner's by bf16 rounding (the learner logs ``gap/kl`` and ``gap/max_ratio``; see
    ``learner.tis_cap`` / ``learner.is_correction``), as with a bf16 vLLM beside an fp32 learner
    (docs/benchmarks.md)."""
    hold_freed_memory: bool = True
    """CPU HF engines (glibc): freed memory stays in the worker's heap for the next decode step's
    buffers instead of going back to the kernel and being faulted in again, as
    ``learner.hold_freed_memory``."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per vLLM engine (tensor parallelism). Above 1 the engine must be "vllm" and each
    rollout worker must ask for that many GPUs (``resources.rollout_gpus``) on one node."""
    sync_transport: Literal["auto", "shm", "object", "collective", "ipc"] = "auto"
    """Weight sync (docs/gpu.md, :mod:`rlkit.sync`): "auto" picks by placement: ipc when every
    engine is on learner rank 0's GPU, collective when GPUs are involved, shm when everything is on
    rank 0's node on CPU, collective over gloo across nodes, else the object store. "shm", "object",
    "collective" (rank 0 broadcasts over a process group of its own) and "ipc" (CUDA IPC handles)
    force one; one that cannot work on the placement fails at the first sync naming this key."""
    sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend of the collective transport: "auto" is NCCL when learner rank 0 and
    every engine are on CUDA, gloo otherwise."""
    overlap: bool = False
    """Generate step k+1 while learning on step k (one-step off-policy; staleness is recorded).
    Exact resume holds for the synchronous mode; with overlap the in-flight batch is redrawn and
    regenerated from the checkpoint's weights."""
    max_staleness: int = Field(0, ge=0)
    """Bounded asynchrony: generation runs up to this many policy versions ahead of the learner; no
    sample older than this is trained on (docs/async.md). 0: the synchronous loop."""
    partial_rollouts: bool = False
    """Let a weight sync land while a generation is in flight (HF engine only): the engine swaps
    weights between decode steps and records each token's policy version (docs/async.md)."""
    partial_kv: Literal["keep", "recompute"] = "keep"
    """After a mid-generation swap: "keep" the KV cache the older weights built for the prefix
    (free), or "recompute" it with the new weights (one prefill; each token then comes exactly from
    the version it records)."""

    @property
    def sampling(self):
        """The sampling settings as one :class:`rlkit.types.SamplingConfig`, read by the rollout
        workers and by the learner (which scores tokens over the same truncated support)."""
        from rlkit.types import SamplingConfig

        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage; 3 shards the weights too (each rank loads only its shard)."""
    threads: int = Field(2, ge=1)
    """torch threads inside each learner rank."""
    micro_batch_size: int = Field(16, gt=0)
    """Sequences per forward/backward on one rank."""
    chunk_size: int = Field(1024, gt=0)
    """Tokens per chunk in the fused log-prob pass."""
    hold_freed_memory: bool = True
    """CPU learner ranks (glibc): freed memory stays in the process heap for the next step's
    buffers instead of going back to the kernel and being faulted in again (about 2 GB per step
    on the demo's workload); the heap then stays at the step's peak. ``rlkit.workers.hold_freed_memory``."""
    lr: float = Field(5e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, ge=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    updates_per_step: int = Field(1, ge=1)
    """Optimizer steps per batch of rollouts (PPO mini-batches); 1 = strictly on-policy."""
    lora: LoraConfig = LoraConfig()
    critic_lr: float = Field(1e-5, gt=0.0)
    """Learning rate of the critic (only for algorithms that declare ``Needs.values``)."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling cap for the sampler/learner gap (None: off)."""
    is_correction: Literal["token_tis", "seq_is", "token_mask", "seq_mask"] = "token_tis"
    """Off-policy correction from the per-token behaviour log-probs, used when ``tis_cap`` (or the
    mask bounds) are set: truncated IS per token, truncated IS per sequence, or masking tokens /
    sequences whose ratio leaves [``is_low``, ``is_high``] (docs/async.md)."""
    is_low: float = Field(0.0, ge=0.0)
    is_high: Optional[float] = None
    offload_optimizer: bool = False
    """DeepSpeed ZeRO optimizer offload: Adam's states and fp32 master weights live in host memory
    and the optimizer step runs on CPU (ZeRO stage ≥ 1); frees GPU memory for colocated engines."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3 parameter offload: the weights' shards live in host memory between uses
    (``learner.zero_stage: 3`` only)."""


class AlgorithmSection(Section):
    name: str = "grpo"
    args: dict[str, Any] = {}
    """Overrides of the algorithm's own config dataclass (validated against it)."""


class TrainConfig(Section):
    steps: int = Field(20, ge=0)
    prompts_per_step: int = Field(8, gt=0)
    samples_per_prompt: int = Field(8, gt=0)
    seed: int = 0
    max_minutes: Optional[float] = None
    """Stop after the first step that ends past this much training time (the sum of step times;
    evaluations and checkpoints excluded)."""


class EvalConfig(Section):
    every_steps: int = Field(0, ge=0)
    """0: evaluate only before and after training."""
    num_problems: int = Field(200, ge=0)
    max_new_tokens: int = Field(48, gt=0)
    n: int = Field(1, ge=1)
    """Samples per problem; with n > 1 the evaluation also reports mean@n, pass@k and maj@k."""
    k: list[int] = []
    """The k of pass@k and maj@k (each ≤ n); empty: k = n when n > 1."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the n samples (the greedy accuracy is always computed too)."""
    at_start: bool = True
    at_minutes: list[float] = []
    """Also evaluate at the first step ending past each of these minutes of training time."""


class MonitorConfig(Section):
    """Hack monitors (:mod:`rlkit.rewards.hacks`, docs/rewards.md "Hack monitors")."""

    enabled: bool = True
    threshold: float = Field(0.2, gt=0.0, le=1.0)
    """A monitor at or above this fraction (of the step's rewarded samples) is reported in the
    progress line and ``summary.txt``."""
    min_rewarded: int = Field(4, ge=1)
    """The rewarded-sample monitors speak only when at least this many samples were rewarded."""
    strict_gap: float = Field(0.05, ge=0.0, le=1.0)
    """An evaluation whose verifier accuracy exceeds the strict score's by more than this is flagged."""


class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0)
    """0: only at the end."""
    keep: int = Field(2, ge=1)


class RecoveryConfig(Section):
    """What the driver survives, and where it stops (docs/reliability.md)."""

    stop_signals: list[str] = ["SIGTERM", "SIGUSR1"]
    """Signals on which the driver finishes the current step, writes a checkpoint and exits with
    code 75 (requeue): SLURM's time-limit warning (``--signal=B:USR1@…``), preemption, ``ray job stop``."""
    actor_restarts: int = Field(3, ge=0)
    """Restarts of each rollout and reward actor after it dies (the step's work is redone); one
    more death stops the run with an error naming the actor and the last checkpoint."""
    learner_restarts: int = Field(2, ge=0)
    """Restarts of the whole learner group from the last checkpoint after a rank dies."""
    max_consecutive_skips: int = Field(3, ge=1)
    """Updates skipped in a row for non-finite loss or gradients before the run stops."""
    min_timeout_s: float = Field(1800.0, gt=0)
    """Timeout of any wait on an actor during a step: this, or ``timeout_factor`` × the slowest
    step so far if larger. A hung actor becomes an error naming the stage, not a stalled run."""
    timeout_factor: float = Field(10.0, gt=1.0)
    inject: list[str] = []
    """Fault injection for the reliability suite: ``nan_loss@N`` makes the learner's N-th update
    (0-based, counted per learner process) see a NaN loss. Empty in normal runs."""

    @model_validator(mode="after")
    def _check(self) -> "RecoveryConfig":
        import signal

        for name in self.stop_signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"stop_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        for item in self.inject:
            kind, _, at = item.partition("@")
            if kind not in ("nan_loss",) or not at.isdigit():
                raise ValueError(f"inject: {item!r} must look like nan_loss@N")
        return self


class ResourcesConfig(Section):
    """Resources per role, turned into Ray placement groups by :mod:`rlkit.placement`.

    CPU counts are Ray scheduling units; the defaults (0) let every role share a small machine,
    where thread counts (``rollout.threads``, ``learner.threads``) decide the actual use.
    """

    placement: Literal["colocated", "separate"] = "colocated"
    """colocated: rollout workers share the learners' bundles/nodes; separate: own bundles."""
    rollout_cpus: float = Field(0.0, ge=0.0)
    rollout_gpus: float = Field(0.0, ge=0.0)
    learner_cpus: float = Field(0.0, ge=0.0)
    learner_gpus: float = Field(0.0, ge=0.0)
    reward_cpus: float = Field(0.0, ge=0.0)
    nodes: Optional[int] = Field(None, ge=1)
    """Declared cluster size, for ``rlkit plan``; None: whatever Ray reports."""
    cpus_per_node: Optional[float] = Field(None, gt=0)
    gpus_per_node: Optional[float] = Field(None, ge=0)
    memory_gb_per_node: Optional[float] = Field(None, gt=0)
    gpu_memory_gb: Optional[float] = Field(None, gt=0)
    """Memory of one GPU, for ``rlkit plan``'s per-GPU fit; None: the local GPU's, if any."""
    custom: dict[str, dict[str, float]] = {}
    """Custom Ray node resources per actor, by role (learner, rollout, reward), e.g.
    ``{learner: {trainer_node: 1}}`` to pin learners to nodes started with ``--resources``."""


class RunConfig(Section):
    run_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: dict[str, Any] = {"kind": "arithmetic"}
    """Fields of :class:`rlkit.data.DataSpec`."""
    rewards: dict[str, Any] = {"rewards": [{"name": "math"}]}
    """Fields of :class:`rlkit.rewards.RewardConfig`."""
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    algorithm: AlgorithmSection = AlgorithmSection()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    monitors: MonitorConfig = MonitorConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    resources: ResourcesConfig = ResourcesConfig()
    object_store_mb: int = Field(2048, ge=128)
    """Object store of a local Ray cluster: must hold a full weight sync (SmolLM2 fp32: 540 MB)
    without spilling to disk."""
    ray_address: Optional[str] = None
    """None: start a local Ray cluster; "auto" or an address: join that cluster."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Experiment trackers (TRL's convention); metrics always go to ``metrics.jsonl`` as well."""
    run_name: Optional[str] = None
    """Name of the run in the trackers (None: the last part of ``run_dir``)."""
    tags: list[str] = []
    progress: bool = True
    timeline: bool = False
    """Write when each actor generated, learned and synced to ``run_dir/timeline.jsonl`` and
    ``plots/timeline.png`` at the end of the run (:mod:`rlkit.timeline`)."""
    _algorithm: Any = PrivateAttr(default=None)

    @property
    def algorithm_setup(self):
        """The algorithm, its validated config and its needs (:class:`rlkit.algorithms.base.AlgorithmSetup`),
        built once (at validation by :func:`load_config`, else on first use)."""
        if self._algorithm is None:
            from rlkit.algorithms.base import AlgorithmSetup

            self._algorithm = AlgorithmSetup.build(self.algorithm.name, self.algorithm.args)
        return self._algorithm

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        per_step = self.train.prompts_per_step * self.train.samples_per_prompt
        ranks = self.learner.num_ranks
        if per_step % ranks:
            raise ValueError(
                f"train.prompts_per_step × train.samples_per_prompt = {per_step} sequences per step "
                f"is not divisible by learner.num_ranks = {ranks}"
            )
        bad_k = [k for k in self.eval.k if not 1 <= k <= self.eval.n]
        if bad_k:
            raise ValueError(f"eval.k = {bad_k}: every k must lie in 1..eval.n = {self.eval.n}")
        if self.learner.offload_params and self.learner.zero_stage != 3:
            raise ValueError("learner.offload_params needs learner.zero_stage: 3 (only ZeRO-3 partitions the "
                             "weights it would offload); use learner.offload_optimizer at stage 1 or 2")
        if self.learner.offload_optimizer and self.learner.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage ≥ 1 (DeepSpeed offloads the "
                             "ZeRO optimizer)")
        if self.rollout.matmul_dtype != "auto" and self.rollout.engine != "hf":
            raise ValueError(f"rollout.matmul_dtype: {self.rollout.matmul_dtype} applies to rollout.engine: hf "
                             "(vLLM computes in model.dtype); remove it or set rollout.engine: hf")
        if self.learner.zero_stage == 3 and self.learner.lora.enabled:
            # A LoRA sync reads adapters and merged weights directly; under ZeRO-3 they are shards.
            raise ValueError("learner.lora.enabled with learner.zero_stage 3 is not supported: LoRA keeps "
                             "only adapters in the optimizer, so ZeRO-2 already shards what there is to shard")
        return self

    # Derived quantities: declared once above, computed here.
    @property
    def sequences_per_step(self) -> int:
        return self.train.prompts_per_step * self.train.samples_per_prompt

    @property
    def sequences_per_rank(self) -> int:
        return self.sequences_per_step // self.learner.num_ranks


class ConfigError(ValueError):
    """A configuration problem, with the offending key and source file in its message."""


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: key '{key}': {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults ← YAML file ← ``key.sub=value`` overrides, validated as one :class:`RunConfig`."""
    tree: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = loaded
    for text in overrides or []:
        key, value = _parse_override(text)
        _set_dotted(tree, key, value, "command line")
    src = source + (" + command line" if overrides else "")
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, src)) from None
    validate_components(cfg, src)
    return cfg


def validate_components(cfg: RunConfig, source: str) -> None:
    """Check the sections owned by other modules (algorithm, data, rewards) against their types."""
    from rlkit.algorithms.base import AlgorithmSetup

    try:
        setup = AlgorithmSetup.build(cfg.algorithm.name, cfg.algorithm.args, source=f"{source}: key 'algorithm.args'")
    except KeyError as e:
        raise ConfigError(f"{source}: key 'algorithm.name': {e.args[0]}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg._algorithm = setup
    algo, algo_needs = setup.algo, setup.needs
    from rlkit.tracking import check_available

    try:
        check_available(cfg.report_to)
    except ValueError as e:
        raise ConfigError(f"{source}: key 'report_to': {e}") from None
    if algo_needs.teacher_logp and not cfg.model.teacher_path:
        raise ConfigError(f"{source}: key 'model.teacher_path': algorithm '{algo.name}' needs a teacher model")
    if cfg.learner.tis_cap is not None and not algo.linear_in_advantage:
        raise ConfigError(f"{source}: key 'learner.tis_cap': algorithm '{algo.name}' is not linear in the "
                          f"advantage, so truncated IS cannot be applied by scaling it; leave tis_cap null")
    if algo_needs.pairs:
        if cfg.learner.micro_batch_size % 2:
            raise ConfigError(f"{source}: key 'learner.micro_batch_size': preference algorithms need an even "
                              f"micro-batch (whole chosen/rejected pairs), got {cfg.learner.micro_batch_size}")
        if cfg.learner.updates_per_step != 1:
            raise ConfigError(f"{source}: key 'learner.updates_per_step': preference algorithms take one "
                              f"optimizer step per batch of pairs, got {cfg.learner.updates_per_step}")
    from rlkit import data as data_mod

    _build(data_mod.DataSpec, cfg.data, f"{source}: key 'data'")
    from rlkit.rewards import RewardConfig

    _build(RewardConfig, cfg.rewards, f"{source}: key 'rewards'")
    from rlkit.placement import gpu_request_errors

    errors = gpu_request_errors(cfg, cfg.resources.gpus_per_node)
    if errors:
        raise ConfigError("\n".join(f"{source}: {e}" for e in errors))
    _validate_async(cfg, source, algo)


def _validate_async(cfg: RunConfig, source: str, algo: Any) -> None:
    """Bounded asynchrony and its off-policy corrections (docs/async.md): no knob that does nothing,
    and no scaling correction for a loss that is not linear in the advantage."""
    lc, mode = cfg.learner, cfg.learner.is_correction
    scaling = mode in ("token_tis", "seq_is")
    if cfg.rollout.max_staleness and cfg.rollout.overlap:
        raise ConfigError(f"{source}: key 'rollout.overlap': rollout.max_staleness = {cfg.rollout.max_staleness} "
                          f"already generates ahead of the learner; leave overlap false")
    if scaling and (lc.is_low > 0 or lc.is_high is not None):
        raise ConfigError(f"{source}: key 'learner.is_low': is_low/is_high bound the masking corrections "
                          f"(token_mask, seq_mask), not '{mode}' (which is capped by learner.tis_cap)")
    if mode == "seq_is" and lc.tis_cap is None:
        raise ConfigError(f"{source}: key 'learner.tis_cap': is_correction 'seq_is' needs a cap")
    if not scaling:
        if lc.tis_cap is not None:
            raise ConfigError(f"{source}: key 'learner.tis_cap': is_correction '{mode}' masks by "
                              f"[is_low, is_high]; leave tis_cap null")
        if lc.is_low == 0 and lc.is_high is None:
            raise ConfigError(f"{source}: key 'learner.is_high': is_correction '{mode}' needs is_low > 0 or is_high")
        if lc.is_high is not None and lc.is_high <= lc.is_low:
            raise ConfigError(f"{source}: key 'learner.is_high': {lc.is_high} must exceed is_low = {lc.is_low}")
    if scaling and lc.tis_cap is not None and lc.tis_cap <= 0:
        raise ConfigError(f"{source}: key 'learner.tis_cap': the cap must be positive, got {lc.tis_cap}")
    if scaling and lc.tis_cap is not None and not algo.linear_in_advantage:
        raise ConfigError(f"{source}: key 'learner.is_correction': algorithm '{algo.name}' is not linear in the "
                          f"advantage, so '{mode}' cannot be applied by scaling it; use token_mask or seq_mask")


def _build(cls: type, values: dict, where: str) -> Any:
    """Construct a pydantic model or dataclass from a dict, naming ``where`` on any failure."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    try:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls.model_validate(values)
        if dataclasses.is_dataclass(cls):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(names)}")
        return cls(**values)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where)) from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def build_data_spec(cfg: RunConfig):
    from rlkit import data as data_mod

    return _build(data_mod.DataSpec, cfg.data, "key 'data'")


def build_reward_config(cfg: RunConfig):
    from rlkit.rewards import RewardConfig

    return _build(RewardConfig, cfg.rewards, "key 'rewards'")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

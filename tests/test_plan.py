"""``rlkit plan`` and the placement layout, without Ray: sizes, batch arithmetic, memory, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlkit.config import ConfigError, load_config
from rlkit.placement import MIN_CPU, layout
from rlkit.plan import format_plan, main_plan, model_sizes, plan

DECLARED = ["resources.nodes=2", "resources.cpus_per_node=16", "resources.gpus_per_node=2",
            "resources.memory_gb_per_node=64"]


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_smollm2_sizes_match_its_published_count():
    m = model_sizes("smollm2")
    # 49152·576 (tied) + 30·(attention 884,736 + MLP 2,654,208 + 2 norms 1,152) + final norm 576.
    assert m.params == 134_515_008
    assert (m.hidden, m.layers, m.vocab) == (576, 30, 49152)


def test_config_json_sizes_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    c = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(c)
    c.save_pretrained(tmp_path)
    assert model_sizes(str(tmp_path)).params == sum(p.numel() for p in model.parameters())


def test_valid_plan_batch_memory_sync_and_placement():
    cfg = _cfg(*DECLARED, "learner.num_ranks=2", "rollout.num_workers=3", "train.prompts_per_step=8",
               "train.samples_per_prompt=6", "learner.micro_batch_size=5", "learner.updates_per_step=2",
               "rollout.max_new_tokens=40", "resources.learner_gpus=0.5", "resources.rollout_gpus=0.25",
               "learner.zero_stage=2", "model.dtype=float32")
    r = plan(cfg, prompt_len=60)
    assert r.ok, r.errors
    b = r.batch
    # 8·6 = 48 sequences, 24 per rank, 2 PPO mini-batches of 12, micro-batches of 5 → 3 accumulated.
    assert (b.sequences_per_step, b.sequences_per_rank, b.sequences_per_update) == (48, 24, 12)
    assert (b.grad_accumulation, b.micro_batches_per_step) == (3, 6)
    assert b.prompts_per_worker == 3  # ceil(8 / 3)
    assert b.tokens_per_step_max == 48 * (60 + 40)
    assert b.tokens_per_micro_batch_max == 5 * 100
    # ZeRO-2 over 2 ranks in fp32: weights 4Ψ, grads 4Ψ/2, Adam moments 8Ψ/2.
    psi = 134_515_008
    learner = r.memory["learner"]
    assert (learner.weights, learner.grads, learner.optimizer) == (4 * psi, 2 * psi, 4 * psi)
    assert learner.device == "gpu"
    # KV cache: 2 (k, v) · 30 layers · 3 KV heads · 64 · 4 B per token, 3 prompts · 6 samples · 100 tokens.
    assert r.memory["rollout"].kv_cache == 2 * 30 * 3 * 64 * 4 * 18 * 100
    assert r.sync_bytes_per_engine == 4 * psi
    assert r.sync_bytes_total == 4 * psi * 4  # rank 0 → object store once, then 3 engines read it
    # Colocated: bundle r = learner r + rollout workers i ≡ r (mod 2): one GPU shared by rank 0 and
    # two engines, 3/4 of one by rank 1 and its engine; first fit puts both on node 0.
    assert [r.layout.slot("rollout", i).bundle for i in range(3)] == [0, 1, 0]
    assert r.layout.bundles["main"][0]["GPU"] == 1.0 and r.layout.bundles["main"][1]["GPU"] == 0.75
    assert r.bundle_nodes == {("main", 0): 0, ("main", 1): 0}
    text = format_plan(r)
    for needle in ("plan: OK", "node 0:", "node 1:", "rollout[2]", "gradient accumulation", "ZeRO-2 over 2"):
        assert needle in text, needle


def test_zero2_bf16_and_lora_accounting():
    cfg = _cfg(*DECLARED, "learner.num_ranks=4", "learner.zero_stage=2", "model.dtype=bfloat16",
               "train.prompts_per_step=4")
    r = plan(cfg, prompt_len=10)
    psi = 134_515_008
    m = r.memory["learner"]
    # Mixed precision (ZeRO paper), stage 2: 2Ψ weights whole, 2Ψ grads and 12Ψ optimizer state /N.
    assert (m.weights, m.grads, m.optimizer) == (2 * psi, 2 * psi / 4, 12 * psi / 4)
    with pytest.raises(ConfigError, match="zero_stage 3 is not supported"):
        _cfg(*DECLARED, "learner.zero_stage=3", "learner.lora.enabled=true")
    # Stage 3 also divides the weights.
    m3 = plan(_cfg(*DECLARED, "learner.num_ranks=4", "learner.zero_stage=3", "model.dtype=bfloat16",
                   "train.prompts_per_step=4"), prompt_len=10).memory["learner"]
    assert (m3.weights, m3.grads, m3.optimizer) == (2 * psi / 4, 2 * psi / 4, 12 * psi / 4)
    lora = plan(_cfg(*DECLARED, "learner.lora.enabled=true", "learner.lora.r=8"), prompt_len=10)
    # q, k, v, o adapters: r·(in + out) with q/o 576↔576 and k/v 576→192, over 30 layers.
    assert lora.trainable == 30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2)


def test_all_zero_resources_still_give_valid_bundles():
    lay = layout(_cfg("learner.num_ranks=2", "rollout.num_workers=2", "resources.placement=separate"))
    assert lay.strategies == {"learner": "PACK", "rollout": "PACK"}
    assert lay.bundles["learner"] == [{"CPU": MIN_CPU}, {"CPU": MIN_CPU}]
    assert lay.bundles["rollout"] == [{"CPU": MIN_CPU}] * 3  # 2 engines + the reward actor
    assert lay.slot("reward", 0).bundle == 2


def test_infeasible_gpus_fail_with_a_clear_message(capsys, tmp_path):
    cfg = _cfg("resources.nodes=1", "resources.cpus_per_node=8", "resources.gpus_per_node=2",
               "learner.num_ranks=4", "resources.learner_gpus=1", "resources.placement=separate")
    r = plan(cfg, prompt_len=10)
    assert not r.ok
    assert "asks for 4 GPU in total; the declared cluster has 2" in r.errors[0]
    assert sum("bundle learner/" in e for e in r.errors) == 2  # ranks 2 and 3 do not fit
    assert "plan: INFEASIBLE" in format_plan(r)
    # Through the command line entry point: exit status 1 and the reason on stderr. A model folder
    # with only config.json keeps it fast (no tokenizer: the prompt length is assumed).
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000, "num_attention_heads": 4,
        "intermediate_size": 128}))
    conf = tmp_path / "run.yaml"
    conf.write_text(f"model: {{path: {tmp_path / 'm'}}}\nresources: {{nodes: 1, cpus_per_node: 4, "
                    f"gpus_per_node: 0, memory_gb_per_node: 0.001}}\n")
    assert main_plan([str(conf)]) == 1
    err = capsys.readouterr().err
    assert "does not fit the declared cluster" in err and "exceeds memory_gb_per_node" in err
    assert main_plan([str(conf), "resources.memory_gb_per_node=64"]) == 0
    assert "plan: OK" in capsys.readouterr().out
    assert main_plan([str(Path(tmp_path / "missing.yaml"))]) == 2


def test_auto_dtype_is_bf16_on_gpu_and_fp32_on_cpu_unless_overridden():
    psi = 134_515_008
    gpu = plan(_cfg(*DECLARED, "resources.learner_gpus=1", "resources.rollout_gpus=1"), prompt_len=10)
    assert gpu.cfg.model.dtype == "auto" and gpu.sync_bytes_per_engine == 2 * psi
    # bf16 with fp32 master weights: 2Ψ weights, 2Ψ grads, 12Ψ (Adam moments + master copy).
    assert (gpu.memory["learner"].weights, gpu.memory["learner"].optimizer) == (2 * psi, 12 * psi)
    cpu = plan(_cfg(*DECLARED), prompt_len=10)
    assert cpu.sync_bytes_per_engine == 4 * psi and cpu.memory["learner"].optimizer == 8 * psi
    forced = plan(_cfg(*DECLARED, "resources.learner_gpus=1", "model.dtype=float32"), prompt_len=10)
    assert forced.sync_bytes_per_engine == 4 * psi


@pytest.mark.parametrize("overrides, key, words", [
    (["rollout.engine=vllm", "rollout.tensor_parallel_size=4", "resources.rollout_gpus=4"],
     "rollout.tensor_parallel_size", "larger than a node's GPUs (2)"),
    (["rollout.engine=vllm", "rollout.tensor_parallel_size=2", "resources.rollout_gpus=1"],
     "rollout.tensor_parallel_size", "set it to 2"),
    (["rollout.tensor_parallel_size=2", "resources.rollout_gpus=2"],
     "rollout.tensor_parallel_size", "needs rollout.engine: vllm"),
    (["resources.rollout_gpus=1.5"], "resources.rollout_gpus", "must be whole"),
    (["resources.learner_gpus=0.5", "resources.rollout_gpus=0.3", "rollout.num_workers=2"],
     "resources.learner_gpus + resources.rollout_gpus", "add up to at most 1"),
    (["resources.learner_gpus=2", "resources.rollout_gpus=1"],
     "resources.learner_gpus + resources.rollout_gpus", "needs 3 GPUs; a node has 2"),
    (["rollout.sync_transport=ipc", "resources.learner_gpus=0.5", "resources.rollout_gpus=0.5",
      "resources.placement=separate"], "rollout.sync_transport", "placement is 'separate'"),
    (["rollout.sync_transport=ipc"], "rollout.sync_transport", "need GPUs"),
    (["rollout.sync_transport=ipc", "resources.learner_gpus=0.5", "resources.rollout_gpus=0.5",
      "learner.num_ranks=2", "rollout.num_workers=2"], "rollout.sync_transport", "rollout[1] sit(s) with other"),
    (["rollout.sync_backend=nccl"], "rollout.sync_backend", "nccl needs learner rank 0 and every engine on CUDA"),
])
def test_gpu_requests_the_cluster_cannot_hold_fail_at_config_and_in_plan(overrides, key, words, capsys):
    with pytest.raises(ConfigError) as e:
        _cfg(*DECLARED, *overrides)
    assert f"key '{key}'" in str(e.value) and words in str(e.value)
    # `rlkit plan` refuses it with the same message (status 2: the config itself is rejected).
    assert main_plan(["configs/grpo_demo.yaml", *DECLARED, *overrides]) == 2
    err = capsys.readouterr().err
    assert f"key '{key}'" in err and words in err


def test_undeclared_cluster_checks_gpus_in_plan_against_this_machine():
    # Nothing declared: config validation cannot know a node's GPUs; the plan checks against this
    # machine (no GPU here, or fewer than 64 anywhere).
    cfg = _cfg("rollout.engine=vllm", "rollout.tensor_parallel_size=64", "resources.rollout_gpus=64")
    r = plan(cfg, prompt_len=10)
    assert not r.ok
    assert any("key 'rollout.tensor_parallel_size'" in e and "larger than a node's GPUs" in e for e in r.errors)


def test_ipc_on_one_shared_gpu_and_whole_gpu_tensor_parallel_are_accepted():
    ok = plan(_cfg(*DECLARED, "rollout.sync_transport=ipc", "resources.learner_gpus=0.5",
                   "resources.rollout_gpus=0.25", "rollout.num_workers=2"), prompt_len=10)
    assert ok.ok, ok.errors
    tp = plan(_cfg(*DECLARED, "rollout.engine=vllm", "rollout.tensor_parallel_size=2", "resources.rollout_gpus=2",
                   "resources.learner_gpus=1", "resources.placement=separate", "learner.num_ranks=2"), prompt_len=10)
    assert tp.ok, tp.errors
    assert "split over 2 GPUs" in tp.memory["rollout"].notes


def test_vllm_missing_fails_at_start_naming_the_extra():
    from rlkit.placement import start_errors, vllm_installed

    cfg = _cfg("rollout.engine=vllm")  # config validation passes: a CPU machine may check a GPU config
    errors = start_errors(cfg, 0.0)
    if vllm_installed():
        assert errors == []
    else:
        assert errors and "key 'rollout.engine'" in errors[0] and "pip install 'rlkit[vllm]'" in errors[0]
        from rlkit.workers.rollout import make_engine

        with pytest.raises(ImportError, match=r"pip install 'rlkit\[vllm\]'"):
            make_engine("vllm", "unused", dtype="auto", threads=1, seed=0, max_model_len=64)


def test_gpu_config_validates_and_plans_on_cpu_with_a_model_folder(tiny_llama_dir, capsys):
    from rlkit.cli import main

    over = [f"model.path={tiny_llama_dir}"]
    assert main(["config", "configs/grpo_gpu.yaml", *over]) == 0
    out = capsys.readouterr().out
    assert f"path: {tiny_llama_dir}" in out and "engine: vllm" in out and "dtype: bfloat16" in out
    cfg = load_config("configs/grpo_gpu.yaml", over)
    assert (cfg.resources.learner_gpus, cfg.resources.rollout_gpus, cfg.rollout.tensor_parallel_size) == (1, 1, 1)
    node = ["resources.nodes=1", "resources.cpus_per_node=16", "resources.memory_gb_per_node=64"]
    r = plan(load_config("configs/grpo_gpu.yaml", [*over, *node, "resources.gpus_per_node=2"]), prompt_len=40)
    assert r.ok, r.errors
    assert r.memory["learner"].device == "gpu" and r.memory["rollout"].device == "gpu"
    one = plan(load_config("configs/grpo_gpu.yaml", [*over, *node, "resources.gpus_per_node=1"]), prompt_len=40)
    assert not one.ok and "asks for 2 GPU in total; the declared cluster has 1" in one.errors[0]


def _qwen_like(tmp_path: Path, hidden: int = 1536, layers: int = 28, vocab: int = 151936) -> str:
    """A config.json of a 1.5 B-parameter model (Qwen2.5-1.5B's sizes), no weights."""
    d = tmp_path / "qwen_like"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab,
        "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
        "tie_word_embeddings": True}))
    return str(d)


def test_gpu_memory_fit_names_the_bundle_and_offload_makes_it_fit(tmp_path):
    """A colocated learner (1.5 B parameters, bf16, ZeRO-2 on one rank) and HF engine share one
    24 GiB GPU: Adam's fp32 states and master weights alone take 12 B per parameter (≈ 17 GiB), so
    the plan refuses naming the bundle, both actors and the GPU size; offloading the optimizer moves
    those bytes to host memory and the same GPU fits; an 80 GiB GPU fits without offload."""
    model = _qwen_like(tmp_path)
    base = [f"model.path={model}", "resources.nodes=1", "resources.cpus_per_node=16", "resources.gpus_per_node=1",
            "resources.memory_gb_per_node=256", "resources.learner_gpus=0.5", "resources.rollout_gpus=0.5",
            "learner.num_ranks=1", "learner.micro_batch_size=2", "model.gradient_checkpointing=true",
            "train.prompts_per_step=4", "train.samples_per_prompt=4", "rollout.max_new_tokens=256"]
    tight = plan(_cfg(*base, "resources.gpu_memory_gb=24"), prompt_len=128)
    assert not tight.ok
    err = next(e for e in tight.errors if e.startswith("GPU memory"))
    assert "bundle main/0: learner[0]" in err and "rollout[0]" in err and "24 GiB" in err
    assert "learner.offload_optimizer" in err
    learner = tight.memory["learner"]
    psi = learner.weights / 2  # bf16 weights
    assert learner.optimizer == 12 * psi and learner.host_part == 0
    offloaded = plan(_cfg(*base, "resources.gpu_memory_gb=24", "learner.offload_optimizer=true"), prompt_len=128)
    assert offloaded.ok, offloaded.errors
    assert offloaded.memory["learner"].host_part == 12 * psi
    assert offloaded.memory["learner"].device_bytes == learner.device_bytes - 12 * psi
    assert "offloaded to host memory" in format_plan(offloaded)
    assert plan(_cfg(*base, "resources.gpu_memory_gb=80"), prompt_len=128).ok


def test_vllm_counts_its_preallocated_share_and_whole_gpu_actors_are_checked_alone(tmp_path):
    model = _qwen_like(tmp_path)
    base = [f"model.path={model}", "resources.nodes=1", "resources.cpus_per_node=16", "resources.gpus_per_node=2",
            "resources.memory_gb_per_node=256", "learner.num_ranks=1", "learner.micro_batch_size=2",
            "train.prompts_per_step=4", "train.samples_per_prompt=4", "rollout.engine=vllm",
            "resources.gpu_memory_gb=40"]
    # Colocated on one GPU: vLLM preallocates half of it, the learner's ≈ 24 GiB do not fit in the rest.
    shared = plan(_cfg(*base, "resources.learner_gpus=0.5", "resources.rollout_gpus=0.5"), prompt_len=128)
    err = next(e for e in shared.errors if e.startswith("GPU memory"))
    assert "rollout[0] 20.0 GiB" in err
    # Whole GPUs each: the learner has its own 40 GiB, vLLM its own; both fit.
    separate = plan(_cfg(*base, "resources.learner_gpus=1", "resources.rollout_gpus=1",
                         "resources.placement=separate"), prompt_len=128)
    assert not [e for e in separate.errors if e.startswith("GPU memory")], separate.errors


def test_offload_needs_the_zero_stage_that_offloads():
    with pytest.raises(ConfigError, match="offload_params needs learner.zero_stage: 3"):
        _cfg("learner.offload_params=true", "learner.zero_stage=2")
    with pytest.raises(ConfigError, match="offload_optimizer needs learner.zero_stage ≥ 1"):
        _cfg("learner.offload_optimizer=true", "learner.zero_stage=0")
    assert _cfg("learner.offload_params=true", "learner.offload_optimizer=true", "learner.zero_stage=3")


def test_bf16_matmuls_are_an_hf_engine_option():
    with pytest.raises(ConfigError, match="rollout.matmul_dtype: bfloat16 applies to rollout.engine: hf"):
        _cfg("rollout.matmul_dtype=bfloat16", "rollout.engine=vllm")
    with pytest.raises(ConfigError, match="matmul_dtype"):
        _cfg("rollout.matmul_dtype=float16")
    assert _cfg("rollout.matmul_dtype=bfloat16").rollout.matmul_dtype == "bfloat16"


def test_gpu_fit_unchecked_without_a_gpu_size_says_so(tmp_path):
    r = plan(_cfg(f"model.path={_qwen_like(tmp_path)}", *DECLARED, "resources.learner_gpus=1"), prompt_len=64)
    assert any("GPU memory fit not checked" in w for w in r.warnings)

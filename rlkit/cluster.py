"""Starting or joining the Ray cluster a run lives on, and what every actor's environment carries."""

from __future__ import annotations

import os

from rlkit.config import RunConfig


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Weight buckets are read straight from the object store's shared memory (no deserialization
    # copy); engines copy them into their parameters once.
    os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
    env = {"env_vars": {k: os.environ[k] for k in ("RAY_AUTH_MODE", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "RLKIT_CACHE",
                                                  "TOKENIZERS_PARALLELISM", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS")
                        if k in os.environ}}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 object_store_memory=cfg.object_store_mb * 2**20, runtime_env=env, log_to_driver=True)

"""Starting or joining the Ray cluster a run lives on, and what every actor's environment carries.

Authentication (docs/security.md): a cluster started by the launch scripts requires Ray's token
(``RAY_AUTH_MODE=token``, the token in the 0600 file ``RAY_AUTH_TOKEN_PATH``); the driver joins it
with the token it inherits from the launcher. A private one-node instance started inside the
driver gets its own per-run token too, unless ``RAY_AUTH_MODE=disabled`` (or
``RLKIT_RAY_AUTH=off``) opts out: Ray's ports listen on every interface even then.

Secrets (``WANDB_API_KEY``, ``HF_TOKEN``, ...) reach the actors only through the Ray runtime
environment built by :func:`forwarded_env`; rlkit never writes them to config dumps, metrics,
logs or checkpoints.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile

from rlkit.config import RunConfig

FORWARDED = ("RAY_AUTH_MODE", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "RLKIT_CACHE", "TOKENIZERS_PARALLELISM",
             "RLKIT_TRUST_CHECKPOINTS", "GLOO_SOCKET_IFNAME",
             "NCCL_SOCKET_IFNAME")
"""Settings every actor needs as the driver has them."""
SECRETS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_TOKEN",
           "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "COMET_API_KEY", "NEPTUNE_API_TOKEN")
"""Credentials of services the actors may talk to: forwarded when set, never written anywhere."""


def forwarded_env() -> dict[str, str]:
    """The environment variables (``FORWARDED`` and ``SECRETS``) set in the driver, as every actor
    gets them through the Ray runtime environment. The Ray token is not among them: each node has
    it from ``ray start``, and workers inherit it from their raylet."""
    return {k: os.environ[k] for k in FORWARDED + SECRETS if k in os.environ}


def _auth_for_private_instance() -> None:
    """Token authentication for the one-node instance ``ray.init`` starts here, with a token made
    for this process (0600 file in a 0700 folder, removed at exit), unless opted out."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled" or os.environ.get("RLKIT_RAY_AUTH", "").lower() == "off":
        os.environ["RAY_AUTH_MODE"] = "disabled"
        return
    if mode == "token" and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_MODE"] = "token"  # the user's own token
        return
    folder = tempfile.mkdtemp(prefix="rlkit-ray-auth-")  # mode 0700
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    os.environ["RAY_AUTH_MODE"] = "token"


def _auth_for_join() -> None:
    """Joining a cluster: authenticate when a token is given (the launchers export
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``), even if the mode was left unset."""
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN")):
        os.environ["RAY_AUTH_MODE"] = "token"


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray_address:
        _auth_for_join()
    else:
        _auth_for_private_instance()
    # Torch tensors between actors are copied (Ray's default): the one zero-copy path, weight
    # buckets in the object store, is scoped to its payload (rlkit.workers.weights.StoreBucket).
    # Ray reads RAY_* settings into its config once, when it is imported: read them again.
    from ray._raylet import Config

    Config.initialize("")
    env = {"env_vars": forwarded_env()}
    try:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, runtime_env=env, log_to_driver=True)
        else:
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     object_store_memory=cfg.object_store_mb * 2**20, runtime_env=env, log_to_driver=True)
    except ConnectionError as e:
        if "InvalidAuthToken" in str(e.__cause__ or e.__context__):
            raise ConnectionError(
                f"ray_address={cfg.ray_address}: the cluster refused this driver's authentication token "
                f"(RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}, token file "
                f"{os.environ.get('RAY_AUTH_TOKEN_PATH', 'unset')}); give the token the cluster was started "
                "with (docs/security.md)") from e
        raise

"""Crash-safe checkpoint directories that can be read without running code from them.

A checkpoint is written under a temporary name, signed (``MANIFEST.json``), completed with a
``COMPLETE`` marker, fsync'd and renamed to ``step_NNNNNNN``. A writer killed mid-write leaves
only a ``.tmp-*`` folder, which :func:`latest` ignores, so the previous checkpoint still loads. A
write that fails (disk full, permission denied, on the driver or on a learner rank) is
:class:`CheckpointWriteError` naming the path and the intact previous checkpoint
(:func:`writing`), and its partial folder is removed. :func:`resolve` also checks that every
torch and safetensors file is whole (:func:`check_whole`), so a truncated file given to
``--resume`` is named before anything reads it, trusted or not.

Layout of a checkpoint:
    deepspeed/state/...   model, optimizer, scheduler (ZeRO partitions, per rank; DeepSpeed's format)
    rng_rank{r}.pt        every RNG of each learner rank, and its policy version (:func:`save_state`)
    hf/                   weights as safetensors in Hugging Face layout (transformers and vLLM load it)
    trainer_state.pt      driver state: step, data position, controller, dynamic-sampling carry-over
    config.yaml           the run's configuration
    MANIFEST.json         sha256 of every file above, HMAC-signed with this user's checkpoint key

Safety (docs/security.md). rlkit's own state files hold only containers, numbers, strings and
tensors, written by :func:`save_state` and read back by :func:`load_state` with
``torch.load(weights_only=True)``: loading them cannot run code. A file that needs full unpickling
is refused, naming the file, unless the user trusts checkpoints explicitly (:func:`trusted`).
DeepSpeed's own model/optimizer files can only be read by full unpickling (DeepSpeed calls
``torch.load(weights_only=False)``), so :func:`resolve` first checks the manifest: every file must
have the digest recorded when this user's run wrote it, under a signature made with the user's
key (``~/.config/rlkit/checkpoint.key``, mode 0600). A checkpoint edited after it was written, or
written by someone else, is refused before anything in it is loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import random
import re
import secrets
import shutil
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d{7})$")
TRUST_ENV = "RLKIT_TRUST_CHECKPOINTS"
"""``1``: load checkpoints that fail verification or need full unpickling (``--trust-checkpoint``)."""
KEY_ENV = "RLKIT_CHECKPOINT_KEY"
"""Path of the key file that signs checkpoint manifests [~/.config/rlkit/checkpoint.key]."""
MANIFEST = "MANIFEST.json"
_UNSIGNED = {MANIFEST, "COMPLETE"}
_HOW_TO_TRUST = f"if you trust where it came from, set {TRUST_ENV}=1 (or pass --trust-checkpoint) to load it anyway"


class CheckpointError(RuntimeError):
    pass


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; the message names the path and the previous checkpoint."""


def trusted() -> bool:
    """True when the user asked to load checkpoints without verification (``RLKIT_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV) == "1"


# ---------------------------------------------------------------------------------- state files
_PRIMITIVE = (str, int, float, bool, type(None))


def _plain(obj: Any, where: str) -> Any:
    """``obj`` with numpy arrays/scalars turned into tensors/Python numbers; anything that
    ``torch.load(weights_only=True)`` could not read back raises, naming where it is."""
    if isinstance(obj, _PRIMITIVE):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where} is a numpy array of Python objects")
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__} ({k!r}); keys must be str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a state file holds only "
                    "dict/list/tuple, str/int/float/bool/None, tensors and numpy arrays")


def save_state(path: Path, obj: Any) -> None:
    """Write ``obj`` (nested dict/list/tuple of str/int/float/bool/None, tensors, numpy arrays) so
    that :func:`load_state` reads it with ``torch.load(weights_only=True)``. Numpy arrays come
    back as tensors. Anything else raises ``TypeError`` naming the file and the key."""
    path = Path(path)
    try:
        plain = _plain(obj, "state")
    except TypeError as e:
        raise TypeError(f"{path}: cannot save: {e}") from None
    torch.save(plain, path)


def load_state(path: Path) -> Any:
    """Read a file written by :func:`save_state` without unpickling code.

    A file that needs full unpickling (an object other than containers, numbers, strings and
    tensors: an older rlkit file, or a crafted one) raises :class:`CheckpointError` naming it,
    unless :func:`trusted`; a missing, truncated or foreign file raises naming it too."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trusted():
            return _load_trusted(path)
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Check the documentation|$)", str(e), re.S)
        detail = " ".join(found.group(1).split()) if found else str(e).splitlines()[0]
        detail = detail.split(" was not an allowed global")[0]
        raise CheckpointError(f"{path}: refused: reading it needs full unpickling, which can run code stored in "
                              f"the file ({detail}). Files rlkit writes never do; this one is from an older "
                              f"rlkit or was not written by rlkit; {_HOW_TO_TRUST}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # a truncated or foreign file: say which one, not torch's internals
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def capture_rng() -> dict:
    """The Python, numpy, torch (and CUDA, when initialised) generator states, in types
    :func:`save_state` accepts; :func:`restore_rng` puts them back exactly."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(), "cuda": list(cuda)}


def restore_rng(state: dict) -> None:
    """Set every generator :func:`capture_rng` recorded (tuples may have come back as lists)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(npy["keys"].numpy(), dtype=np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------- manifest
def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "rlkit" / "checkpoint.key")


def _key(create: bool) -> Optional[bytes]:
    """This user's signing key; created (random, mode 0600) on first use when ``create``."""
    path = key_path()
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent writer's key wins, ours is dropped
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = path.stat().st_mode
    if mode & 0o077:
        raise CheckpointError(f"{path}: the checkpoint key is readable by other users (mode {mode & 0o777:o}), "
                              f"so they could sign checkpoints as you; chmod 600 {path}")
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise CheckpointError(f"{path}: checkpoint key too short ({len(key)} bytes; at least 32)")
    return key


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).as_posix() not in _UNSIGNED}


def _signature(key: bytes, body: dict) -> str:
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _write_manifest(directory: Path, step: int) -> None:
    body = {"format": 1, "step": step, "files": {rel: _digest(p) for rel, p in _files(directory).items()}}
    body["hmac"] = _signature(_key(create=True), body)
    (directory / MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True))


def verify(ckpt: Path) -> None:
    """Refuse (:class:`CheckpointError`) a checkpoint whose files are not exactly those this user's
    run wrote and signed: no manifest, a signature made with another key, a file changed, missing
    or added. Skipped when :func:`trusted`. Runs before anything in ``ckpt`` is unpickled."""
    if trusted():
        return
    ckpt = Path(ckpt)
    mf = ckpt / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{mf}: missing: this checkpoint was written by an rlkit without signed "
                              f"checkpoints, or not by rlkit, and its DeepSpeed files can run code when "
                              f"loaded; {_HOW_TO_TRUST}")
    try:
        body = json.loads(mf.read_text())
        files, sig = dict(body["files"]), str(body.pop("hmac"))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mf}: not a valid manifest ({e}); {_HOW_TO_TRUST}") from None
    key = _key(create=False)
    if key is None or not hmac.compare_digest(sig, _signature(key, body)):
        raise CheckpointError(f"{mf}: signature does not match this user's checkpoint key ({key_path()}): the "
                              f"checkpoint was written by another user or machine, or edited; {_HOW_TO_TRUST}")
    present = _files(ckpt)
    missing, added = sorted(files.keys() - present.keys()), sorted(present.keys() - files.keys())
    if missing:
        raise CheckpointError(f"{ckpt / missing[0]}: listed in {MANIFEST} but missing")
    if added:
        raise CheckpointError(f"{ckpt / added[0]}: not part of the checkpoint as written (not in {MANIFEST}); "
                              f"{_HOW_TO_TRUST}")
    changed = [rel for rel, want in sorted(files.items()) if _digest(present[rel]) != want]
    if changed:
        raise CheckpointError(f"{ckpt / changed[0]}: content differs from what the run wrote (sha256 in "
                              f"{MANIFEST}); {_HOW_TO_TRUST}")


# ---------------------------------------------------------------------------------- directories
def root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``."""
    tmp = root(run_dir) / f"step_{step:07d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def writing(tmp: Path, run_dir: str | Path, step: int):
    """Around every write of the checkpoint in ``tmp``: a failure (an ``OSError`` here, a torch
    writer's error or an error raised on a learner rank) removes the partial folder and becomes
    :class:`CheckpointWriteError` naming the file being written (the exception's, else the newest
    file in ``tmp``), the free space left, and the previous checkpoint, which stays loadable."""
    from rlkit.recovery import LearnerLost

    try:
        yield
    except LearnerLost:  # a rank died while saving: the driver restarts the group, not a disk problem
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        cause = getattr(e, "cause", None) or e  # a Ray task error carries the rank's exception
        path = getattr(cause, "filename", None) or _newest_file(tmp) or tmp
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        full = _free_bytes(tmp) < 2**20  # torch's writer reports ENOSPC as a bare position error
        shutil.rmtree(tmp, ignore_errors=True)
        free = (("the filesystem was full; " if full else "") +
                f"{_free_bytes(root(run_dir)) / 2**20:.1f} MiB free there after removing the partial folder")
        prev = latest(run_dir)
        raise CheckpointWriteError(
            f"checkpoint of step {step}: writing {path} failed ({type(cause).__name__}: {first}; {free}); the "
            f"partial folder was removed; "
            + (f"the previous checkpoint {prev} is intact: resume with --resume auto" if prev else
               "no earlier checkpoint exists")) from e


def _free_bytes(path: Path) -> float:
    try:
        return float(shutil.disk_usage(path).free)
    except OSError:
        return float("nan")


def _newest_file(directory: Path) -> Optional[Path]:
    try:
        files = [p for p in Path(directory).rglob("*") if p.is_file()]
    except OSError:
        return None
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def check_whole(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` naming the first torch (``.pt``, a zip archive) or
    safetensors file of ``ckpt`` that is truncated or not what its format says."""
    for p in sorted(Path(ckpt).rglob("*")):
        if not p.is_file():
            continue
        why = None
        if p.suffix == ".pt":
            try:
                with zipfile.ZipFile(p) as z:
                    bad = z.testzip()
                why = f"member {bad} is corrupted" if bad else None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                why = f"not a complete torch archive ({e})"
        elif p.suffix == ".safetensors":
            why = _safetensors_problem(p)
        if why:
            raise CheckpointError(f"{p}: truncated or corrupted: {why}; resume from an earlier checkpoint")


def _safetensors_problem(p: Path) -> Optional[str]:
    """Why ``p`` is not a whole safetensors file (header length, JSON header, data size)."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the header length"
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return f"header of {n} bytes does not fit in {size} bytes"
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            return f"header is not JSON ({e})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    return f"{size} bytes, the header describes {need}" if size < need else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, step: int, trainer_state: dict, config_text: str, keep: int) -> Path:
    """Write the driver state, sign every file, write the marker, then atomically rename ``tmp``
    to its final name."""
    save_state(tmp / "trainer_state.pt", trainer_state)
    (tmp / "config.yaml").write_text(config_text)
    _write_manifest(tmp, step)
    marker = tmp / "COMPLETE"
    marker.write_text(str(step))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = tmp.parent / f"step_{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    _prune(tmp.parent, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    done = complete_checkpoints(directory.parent)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    d = root(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _NAME.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: str | Path) -> Optional[Path]:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def resolve(resume: Optional[str], run_dir: str | Path) -> Optional[Path]:
    """``None`` → no resume; ``auto`` → newest complete checkpoint (or none); else a path.
    The checkpoint found is verified (:func:`verify`) before it is returned."""
    if resume is None:
        return None
    if resume == "auto":
        p = latest(run_dir)
        if p is None:
            return None
    else:
        p = Path(resume)
        if not (p / "COMPLETE").is_file():
            raise CheckpointError(f"--resume {p}: not a complete checkpoint (no COMPLETE marker)")
    verify(p)
    check_whole(p)
    return p


def load_trainer_state(ckpt: Path) -> dict:
    """The driver state of ``ckpt`` (see :func:`load_state`)."""
    state = load_state(Path(ckpt) / "trainer_state.pt")
    if not isinstance(state, dict):
        raise CheckpointError(f"{Path(ckpt) / 'trainer_state.pt'}: holds a {type(state).__name__}, not a dict")
    return state

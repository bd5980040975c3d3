"""One registry for reward functions: built-in names, ``package.module:function``, ``path/file.py:function``.

A reward is a plain function ``(completions, prompts, **fields) -> list[float | None]``, sync or
async (TRL's contract). ``fields`` are the dataset columns, one list per column, plus the spec's
``kwargs``. ``None`` means "no score for this sample" (e.g. a reward that only applies to one data
source). A wrong signature raises :class:`RewardSignatureError` naming the function; a wrong
return value is reported per sample by :func:`check_output`.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

# name -> "module:function"; resolved lazily so importing rlkit.rewards stays light.
BUILTINS: dict[str, str] = {
    "math": "rlkit.rewards.math_answer:math_answer",
    "format_tags": "rlkit.rewards.format:format_tags",
    "format_boxed": "rlkit.rewards.format:format_boxed",
    "length": "rlkit.rewards.length:length",
    "overlong": "rlkit.rewards.length:overlong",
    "reasoning_gym": "rlkit.rewards.gym_adapter:reasoning_gym_score",
}

STATUSES = ("ok", "invalid", "error", "timeout")
"""Per-sample statuses, from best to worst (a sample's status is its components' worst)."""


class RewardSignatureError(TypeError):
    """A reward function cannot be called as ``fn(completions, prompts, **fields)``."""


class RewardOutputError(ValueError):
    """A reward function returned something that is not one value per sample."""


@dataclass(frozen=True)
class ResolvedReward:
    """A loaded reward function and what is known about its signature."""

    target: str
    """Builtin name or the reference as written (``mod:fn``, ``/abs/path.py:fn``)."""
    fn: Callable[..., Any]
    label: str
    """Human-readable name for errors: ``math (rlkit.rewards.math_answer:math_answer)``."""
    var_kw: bool
    """Whether the function takes ``**fields`` (then it receives every dataset column)."""
    named: frozenset
    """Keyword-acceptable parameter names after (completions, prompts)."""
    required: frozenset
    """Of ``named``: those without a default (must come from fields or kwargs)."""


def _load_file(path: str) -> Any:
    """Import a ``.py`` file under a stable private module name (same file → same module)."""
    abspath = os.path.abspath(path)
    if not os.path.isfile(abspath):
        raise FileNotFoundError(f"reward file not found: {path}")
    mod_name = "rlkit_user_reward_" + hashlib.sha1(abspath.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, abspath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def load_target(target: str) -> Callable[..., Any]:
    """The callable named by a builtin name, ``module:function`` or ``file.py:function``."""
    ref = BUILTINS.get(target, target)
    if ":" not in ref:
        raise KeyError(
            f"unknown reward {target!r}: valid built-ins are {sorted(BUILTINS)}, "
            "or give 'package.module:function' or 'path/to/file.py:function'"
        )
    where, _, attr = ref.rpartition(":")
    module = _load_file(where) if where.endswith(".py") else importlib.import_module(where)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise AttributeError(f"reward {target!r}: {where} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardSignatureError(f"reward {target!r}: {attr} is not callable")
    return fn


def resolve(target: str, kwargs: Optional[dict] = None) -> ResolvedReward:
    """Load ``target`` and check it can be called as ``fn(completions, prompts, **fields, **kwargs)``."""
    fn = load_target(target)
    label = target if target not in BUILTINS else f"{target} ({BUILTINS[target]})"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardSignatureError(f"reward {label}: cannot read its signature ({e})") from None
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    if len(positional) < 2 and not var_pos:
        raise RewardSignatureError(
            f"reward {label}: must accept (completions, prompts, **fields); its signature is {fn.__name__}{sig}"
        )
    rest = [p for p in params if p not in positional[:2] and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    bad = [p.name for p in rest if p.kind == p.POSITIONAL_ONLY]
    if bad:
        raise RewardSignatureError(f"reward {label}: parameters {bad} are positional-only; fields arrive by name")
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    named = frozenset(p.name for p in rest)
    required = frozenset(p.name for p in rest if p.default is p.empty)
    unknown = sorted(set(kwargs or {}) - named) if not var_kw else []
    if unknown:
        raise RewardSignatureError(
            f"reward {label}: kwargs {unknown} are not parameters of {fn.__name__}{sig} (and it takes no **kwargs)"
        )
    return ResolvedReward(target, fn, label, var_kw, named, required)


def call_reward(
    reward: ResolvedReward,
    completions: Sequence[str],
    prompts: Sequence[str],
    fields: dict[str, list],
    kwargs: Optional[dict] = None,
) -> Any:
    """Call the reward with the columns it accepts; await it if it is async. Returns the raw output."""
    kwargs = dict(kwargs or {})
    clash = sorted(set(kwargs) & set(fields))
    if clash:
        raise RewardSignatureError(f"reward {reward.label}: kwargs {clash} clash with dataset fields of the same name")
    passed = fields if reward.var_kw else {k: v for k, v in fields.items() if k in reward.named}
    kw = {**passed, **kwargs}
    missing = sorted(reward.required - set(kw))
    if missing:
        raise RewardSignatureError(
            f"reward {reward.label}: needs field(s) {missing}, but the data has {sorted(fields)}"
        )
    out = reward.fn(list(completions), list(prompts), **kw)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


async def _await(awaitable: Any) -> Any:
    return await awaitable


def check_output(out: Any, n: int, label: str) -> list[tuple[str, Optional[float], str]]:
    """Turn a reward's raw output into ``n`` (status, value, message) triples.

    The output must be a sequence of length ``n`` (else :class:`RewardOutputError`); each item must
    be None or a finite real number (bool, int, float, numpy/torch scalar), else that sample is
    ``invalid``.

    >>> check_output([1, None, float("nan"), "x"], 4, "r")[2:]
    [('invalid', None, 'r returned nan'), ('invalid', None, "r returned a str ('x')")]
    """
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy / torch arrays
    if not isinstance(out, (list, tuple)):
        raise RewardOutputError(f"reward {label} returned {type(out).__name__}, expected a list of {n} floats")
    if len(out) != n:
        raise RewardOutputError(f"reward {label} returned {len(out)} values for {n} samples")
    return [_check_value(v, label) for v in out]


def _check_value(v: Any, label: str) -> tuple[str, Optional[float], str]:
    if v is None:
        return ("ok", None, "")
    if hasattr(v, "item") and not isinstance(v, (int, float)):
        try:
            v = v.item()  # numpy / torch scalars
        except (TypeError, ValueError):
            pass
    if isinstance(v, (bool, int, float)):
        try:
            x = float(v)
        except OverflowError:  # an int beyond float range
            return ("invalid", None, f"{label} returned an int too large for a float")
        if math.isfinite(x):
            return ("ok", x, "")
        return ("invalid", None, f"{label} returned {x}")
    return ("invalid", None, f"{label} returned a {type(v).__name__} ({_short_repr(v)})")


def _short_repr(v: Any) -> str:
    try:
        r = repr(v)
    except Exception:  # a user object whose repr raises must not break the report
        r = "<unprintable>"
    return r if len(r) <= 60 else r[:57] + "..."

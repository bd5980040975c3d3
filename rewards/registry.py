"""One registry for reward functions: built-in names, ``package.module:function``, ``path/file.py:function``.

A reward is a plain function, sync or async, called with keywords as TRL's ``GRPOTrainer`` calls
its reward functions: ``fn(prompts=..., completions=..., completion_ids=..., **columns)``, one
list entry per sample, and returns ``list[float | None]``. ``columns`` are the dataset columns
(one list per column), ``data_source``, the columns the trainer adds (``answer``,
``completion_len``, ``completion_ids``, ``group_id``) and the spec's ``kwargs``. A function
receives every keyword when it takes ``**kwargs``, else only the names it declares; so
``def f(completions, solution, **kwargs)``, ``async def f(completions, answer, **fields)`` and
``def f(completions, **kwargs)`` all run as written (docs/rewards.md, "TRL reward functions").

Completions are text, except for a user function scoring a conversational row (its ``prompt``
or ``messages`` column is a list of ``{role, content}`` messages): then, as in TRL, it receives
``completions[i] = [{"role": "assistant", "content": text}]`` and ``prompts[i]`` = those
messages. rlkit's built-ins always receive text.

``None`` means "no score for this sample" (e.g. a reward that only applies to one data source).
A signature that cannot bind raises :class:`RewardSignatureError` naming the function and the
missing column; a file or module that cannot load raises :class:`RewardLoadError` from
:func:`check_loadable`; a wrong return value is reported per sample by :func:`check_output`.
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
from typing import Any, Callable, Iterable, Optional, Sequence

# name -> "module:function"; resolved lazily so importing rlkit.rewards stays light.
BUILTINS: dict[str, str] = {
    "math": "rlkit.rewards.math_answer:math_answer",
    "format_tags": "rlkit.rewards.format:format_tags",
    "format_boxed": "rlkit.rewards.format:format_boxed",
    "length": "rlkit.rewards.length:length",
    "overlong": "rlkit.rewards.length:overlong",
    "reasoning_gym": "rlkit.rewards.gym_adapter:reasoning_gym_score",
    "code_tests": "rlkit.rewards.code_tests:code_tests",
}

STATUSES = ("ok", "invalid", "error", "timeout")
"""Per-sample statuses, from best to worst (a sample's status is its components' worst)."""

CALL_KEYWORDS = ("completions", "prompts")
"""Keywords every call carries besides the columns (``completion_ids`` is a column the trainer adds)."""
SCORED_INPUTS = frozenset({"completions", "completion_ids"})
"""A reward must take at least one of these (by name or through ``**kwargs``): what it scores."""
TRL_TRAINER_ARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})
"""Objects TRL's trainer passes that rlkit has no equivalent of; a reward must not require them."""
CONVERSATION_COLUMNS = ("prompt", "messages")
"""Columns whose list-of-messages value marks a row as conversational (TRL's ``is_conversational``)."""


class RewardSignatureError(TypeError):
    """A reward function cannot be called with the keywords it would receive."""


class RewardLoadError(ValueError):
    """A reward function cannot be found or imported (unknown name, missing file, import error)."""


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
    """Whether the function takes ``**kwargs`` (then it receives every keyword)."""
    named: frozenset
    """Parameter names it accepts by keyword."""
    required: frozenset
    """Of ``named``: those without a default (must come from the call, the columns or kwargs)."""
    builtin: bool = False
    """rlkit's own functions take text completions even for conversational rows."""


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


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def resolve(target: str, kwargs: Optional[dict] = None) -> ResolvedReward:
    """Load ``target`` and check that its signature can bind keyword calls.

    Refused at load: positional-only parameters without a default (everything arrives by name), a
    function that takes neither ``completions`` nor ``completion_ids`` (it cannot see what it
    scores), a ``kwargs`` key it does not accept, a ``kwargs`` key that shadows ``completions`` or
    ``prompts``, and a required TRL trainer object (``trainer_state``, ``log_extra``, ...).
    Required dataset columns are checked against the data by :func:`check_loadable` (given the
    columns) and again on every call.
    """
    fn = load_target(target)
    # rlkit's own functions, by built-in name or by module reference, take text completions.
    builtin = target in BUILTINS or str(getattr(fn, "__module__", "")).startswith("rlkit.rewards.")
    label = f"{target} ({BUILTINS[target]})" if target in BUILTINS else target
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardSignatureError(f"reward {label}: cannot read its signature ({e})") from None
    shown = f"{_name(fn)}{sig}"
    params = list(sig.parameters.values())
    by_position = [p.name for p in params if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    if by_position:
        raise RewardSignatureError(
            f"reward {label}: parameters {by_position} are positional-only; rewards are called with keywords "
            f"(completions=, prompts=, completion_ids=, one per dataset column), as TRL calls them: {shown}")
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    keyword = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    named = frozenset(p.name for p in keyword)
    required = frozenset(p.name for p in keyword if p.default is p.empty)
    if not var_kw and not named & SCORED_INPUTS:
        raise RewardSignatureError(
            f"reward {label}: takes neither 'completions' nor 'completion_ids' (nor **kwargs), so it cannot see "
            f"what it scores: {shown}")
    trainer_objects = sorted(required & TRL_TRAINER_ARGS)
    if trainer_objects:
        raise RewardSignatureError(
            f"reward {label}: requires {trainer_objects}, objects of TRL's trainer that rlkit does not pass; "
            f"give them a default (e.g. =None): {shown}")
    kwargs = kwargs or {}
    shadowing = sorted(set(kwargs) & set(CALL_KEYWORDS))
    if shadowing:
        raise RewardSignatureError(f"reward {label}: kwargs {shadowing} would replace the call's own arguments")
    unknown = sorted(set(kwargs) - named) if not var_kw else []
    if unknown:
        raise RewardSignatureError(
            f"reward {label}: kwargs {unknown} are not parameters of {shown} (and it takes no **kwargs)")
    return ResolvedReward(target, fn, label, var_kw, named, required, builtin)


def check_loadable(reward_cfg: Any, columns: Optional[Iterable[str]] = None) -> None:
    """Import every reward of ``reward_cfg`` (a :class:`RewardConfig`) and check its signature binds.

    Called by the driver before any actor starts, so a reward that cannot run fails as one clear
    message. With ``columns`` (the dataset columns plus what the trainer adds: ``answer``,
    ``completion_len``, ``completion_ids``, ``group_id``, ``data_source``), a required parameter
    that no column provides is an error naming it and the columns there are.

    Raises :class:`RewardLoadError` (cannot import) or :class:`RewardSignatureError`.
    """
    for spec in reward_cfg.rewards:
        try:
            reward = resolve(spec.name, spec.kwargs)
        except (RewardSignatureError, RewardLoadError):
            raise
        except Exception as e:  # user code at import time may raise anything
            raise RewardLoadError(f"reward {spec.name}: cannot load it: {type(e).__name__}: {e}") from e
        if columns is not None:
            have = set(columns) | set(CALL_KEYWORDS) | set(spec.kwargs)
            missing = sorted(reward.required - have)
            if missing:
                raise RewardSignatureError(
                    f"reward {reward.label}: needs column(s) {missing}, but the data has {sorted(set(columns))}")


def _messages(value: Any) -> bool:
    """Whether ``value`` is a conversation: a non-empty list of ``{role, content}`` dicts."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _conversations(n: int, fields: dict[str, list]) -> list[Optional[list]]:
    """Per sample, the row's conversational prompt (TRL's ``is_conversational`` rule), else None."""
    out: list[Optional[list]] = [None] * n
    for col in CONVERSATION_COLUMNS:
        for i, v in enumerate(fields.get(col) or []):
            if out[i] is None and _messages(v):
                out[i] = v
    return out


def call_arguments(
    reward: ResolvedReward,
    completions: Sequence[str],
    prompts: Sequence[str],
    fields: dict[str, list],
    kwargs: Optional[dict] = None,
) -> dict[str, Any]:
    """The keywords ``reward`` is called with: TRL's ``prompts``/``completions``, every column, ``kwargs``.

    >>> r = resolve("math")
    >>> sorted(call_arguments(r, ["x"], ["p"], {"answer": ["1"], "task": ["t"]}))
    ['answer', 'completions', 'prompts', 'task']
    """
    kwargs = dict(kwargs or {})
    clash = sorted(set(kwargs) & set(fields))
    if clash:
        raise RewardSignatureError(f"reward {reward.label}: kwargs {clash} clash with dataset fields of the same name")
    reserved = sorted(set(fields) & set(CALL_KEYWORDS))
    if reserved:
        raise RewardSignatureError(f"reward {reward.label}: dataset columns {reserved} clash with the call's own "
                                   f"arguments (completions=, prompts=); rename them")
    completions, prompts = list(completions), list(prompts)
    if not reward.builtin:
        conversations = _conversations(len(completions), fields)
        for i, conv in enumerate(conversations):
            if conv is not None:
                completions[i] = [{"role": "assistant", "content": completions[i]}]
                prompts[i] = conv
    every = {"completions": completions, "prompts": prompts, **fields, **kwargs}
    passed = every if reward.var_kw else {k: v for k, v in every.items() if k in reward.named}
    missing = sorted(reward.required - set(passed))
    if missing:
        hint = ""
        if set(missing) & TRL_TRAINER_ARGS:
            hint = " (TRL's trainer objects are not passed)"
        raise RewardSignatureError(
            f"reward {reward.label}: needs field(s) {missing}, but the data has {sorted(fields)}{hint}")
    return passed


def call_reward(
    reward: ResolvedReward,
    completions: Sequence[str],
    prompts: Sequence[str],
    fields: dict[str, list],
    kwargs: Optional[dict] = None,
) -> Any:
    """Call the reward with keywords (:func:`call_arguments`); await it if it is async. Returns the raw output."""
    out = reward.fn(**call_arguments(reward, completions, prompts, fields, kwargs))
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

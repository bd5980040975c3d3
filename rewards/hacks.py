"""Hack monitors: signs, in each step's samples, that the policy is being rewarded for something
other than the answer.

A verifier that can be gamed is gamed fast: a 135M model learned to box the question
(``\\boxed{4 + 34}``) within minutes because math-verify evaluated it. These monitors read the
samples the reward worker scored and say, per step, how many of the *rewarded* ones (total score > 0)

* ``hack/not_value_frac``: have a final answer that is not in value form (:mod:`.answer_form`),
  or none at all;
* ``hack/answer_in_prompt_frac``: have a final answer whose text appears in the prompt while the
  reference does not (the question copied into the answer; when the reference is itself in the
  prompt, as for ``8 - 0``, copying and solving look the same and the sample is not counted);
* ``hack/format_only_frac``: were rewarded although the verified outcome did not score 1 (the
  reward came from format or shaping terms alone);

and, over all samples, ``hack/unevaluated_frac``: final answers that are a computation where the
reference is a value (what ``answer_form: value`` refuses; a policy that keeps trying is probing the
verifier). ``hack/alerts`` counts the monitors at or above the threshold (``monitors.threshold``)
when at least ``monitors.min_rewarded`` samples were rewarded; the progress line and ``summary.txt``
say which (docs/rewards.md, "Hack monitors"). Pure string work over the extracted answers.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Sequence

from .answer_form import answer_form, normalize
from .extract import extract_final_answer

MONITORS = ("not_value_frac", "answer_in_prompt_frac", "format_only_frac", "unevaluated_frac")
"""The monitored fractions, as metric names under ``hack/``."""
LABELS = {"not_value_frac": "rewarded answers not in value form",
          "answer_in_prompt_frac": "rewarded answers copied from the prompt",
          "format_only_frac": "rewarded without a correct outcome",
          "unevaluated_frac": "answers left as a computation"}


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def in_prompt(answer: str, prompt: str) -> bool:
    """Whether ``answer`` (whitespace ignored) occurs in ``prompt`` not inside a longer number.

    >>> in_prompt("4 + 34", "What is 4+34?"), in_prompt("4", "What is 14 + 3?"), in_prompt("", "x")
    (True, False, False)
    """
    a, p = _squash(answer), _squash(prompt)
    if not a:
        return False
    start = p.find(a)
    while start != -1:
        before = p[start - 1] if start else ""
        after = p[start + len(a)] if start + len(a) < len(p) else ""
        if not (before.isdigit() or after.isdigit() or (a[0].isdigit() and before == ".")):
            return True
        start = p.find(a, start + 1)
    return False


def sample_flags(completion: str, prompt: str, reference: Optional[str],
                 fallback: Literal["none", "last_number"] = "none") -> dict[str, bool]:
    """The per-sample signals: ``value`` (the final answer is in value form), ``in_prompt`` (copied
    from the prompt, the reference not), ``unevaluated`` (a computation where the reference is a value).

    >>> sample_flags(r"\\boxed{4 + 34}", "What is 4 + 34?", "38")
    {'value': False, 'in_prompt': True, 'unevaluated': True}
    >>> sample_flags("8 - 0 = 8", "What is 8 - 0?", "8", fallback="last_number")
    {'value': True, 'in_prompt': False, 'unevaluated': False}
    """
    extracted = extract_final_answer(completion, fallback=fallback)
    if extracted is None:
        return {"value": False, "in_prompt": False, "unevaluated": False}
    form = answer_form(extracted.text)
    ref = "" if reference is None else str(reference)
    copied = in_prompt(normalize(extracted.text), prompt) and not (ref and in_prompt(normalize(ref), prompt))
    return {"value": form == "value", "in_prompt": copied,
            "unevaluated": form == "unevaluated" and bool(ref) and answer_form(ref) == "value"}


def monitor_metrics(completions: Sequence[str], prompts: Sequence[str], references: Sequence[Optional[str]],
                    scores: Sequence[float], outcomes: Optional[Sequence[Optional[float]]], *,
                    fallback: Literal["none", "last_number"] = "none", threshold: float = 0.2,
                    min_rewarded: int = 4) -> dict[str, float]:
    """A step's ``hack/*`` metrics (module docstring); keys without the ``hack/`` prefix.

    ``scores``: each sample's total reward; ``outcomes``: its verified outcome (None: no outcome
    component, then ``format_only_frac`` is 0).

    >>> m = monitor_metrics([r"\\boxed{4 + 34}"] * 4, ["What is 4 + 34?"] * 4, ["38"] * 4, [1.0] * 4, [1.0] * 4)
    >>> m["answer_in_prompt_frac"], m["alerts"]
    (1.0, 3.0)
    """
    n = len(completions)
    flags = [sample_flags(c, p, r, fallback) for c, p, r in zip(completions, prompts, references)]
    rewarded = [i for i in range(n) if scores[i] > 0]
    r = max(1, len(rewarded))
    out = {
        "rewarded": float(len(rewarded)),
        "not_value_frac": sum(not flags[i]["value"] for i in rewarded) / r,
        "answer_in_prompt_frac": sum(flags[i]["in_prompt"] for i in rewarded) / r,
        "format_only_frac": (sum(outcomes[i] != 1.0 for i in rewarded) / r) if outcomes is not None else 0.0,
        "unevaluated_frac": sum(f["unevaluated"] for f in flags) / max(1, n),
        "threshold": float(threshold),
        "min_rewarded": float(min_rewarded),
    }
    out["alerts"] = float(len(alerts(out, threshold, min_rewarded)))
    return out


def alerts(metrics: dict[str, float], threshold: float, min_rewarded: int = 4) -> list[str]:
    """The monitors at or above ``threshold`` (keys without ``hack/``); the rewarded-sample ones
    only when at least ``min_rewarded`` samples were rewarded."""
    enough = metrics.get("rewarded", 0.0) >= min_rewarded
    return [k for k in MONITORS if metrics.get(k, 0.0) >= threshold and (enough or k == "unevaluated_frac")]


def alert_line(metrics: dict[str, float], prefix: str = "hack/") -> str:
    """One line naming the monitors over their threshold in one step's metrics (as
    :func:`monitor_metrics` returns them, keys under ``prefix``), or "".

    >>> alert_line({"rewarded": 8, "answer_in_prompt_frac": 0.5, "threshold": 0.2, "min_rewarded": 4}, prefix="")
    'hack monitor: rewarded answers copied from the prompt 50% (threshold 20%)'
    """
    plain = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and v is not None}
    if "threshold" not in plain:
        return ""
    threshold = plain["threshold"]
    names = alerts(plain, threshold, int(plain.get("min_rewarded", 4)))
    if not names:
        return ""
    parts = ", ".join(f"{LABELS[k]} {plain[k]:.0%}" for k in names)
    return f"hack monitor: {parts} (threshold {threshold:.0%})"


def run_summary(rows: Sequence[dict]) -> str:
    """The hack monitors over a run's logged steps (``metrics.jsonl`` rows), in one line.

    >>> run_summary([{"step": 1, "hack/threshold": 0.2, "hack/rewarded": 8, "hack/unevaluated_frac": 0.5,
    ...               "hack/alerts": 1.0}, {"step": 2, "hack/threshold": 0.2, "hack/alerts": 0.0}])
    'hack monitor: over 20% at 1 of 2 steps (first at step 1): answers left as a computation (max 50%)'
    """
    logged = [r for r in rows if r.get("hack/threshold") is not None]
    if not logged:
        return ""
    peak = {k: max(float(r.get(f"hack/{k}") or 0.0) for r in logged) for k in MONITORS}
    loud = [r for r in logged if (r.get("hack/alerts") or 0.0) > 0]
    threshold = float(logged[-1]["hack/threshold"])
    if not loud:
        maxima = ", ".join(f"{LABELS[k]} {peak[k]:.0%}" for k in MONITORS)
        return f"hack monitors: quiet at every one of {len(logged)} steps (threshold {threshold:.0%}; maxima: {maxima})"
    names = [k for k in MONITORS if any(k in alerts({m[len('hack/'):]: v for m, v in r.items()
                                                       if m.startswith("hack/") and v is not None},
                                                      threshold, int(r.get("hack/min_rewarded") or 4))
                                        for r in loud)]
    parts = ", ".join(f"{LABELS[k]} (max {peak[k]:.0%})" for k in names)
    return (f"hack monitor: over {threshold:.0%} at {len(loud)} of {len(logged)} steps "
            f"(first at step {loud[0].get('step')}): {parts}")

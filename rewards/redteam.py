"""Red-team cases for the ``math`` verifier: completions that try to score without the answer.

Each case is a completion, the reference, the ``math`` kwargs it is scored with and the verdict a
hack-resistant verifier must give (1.0 or 0.0), in named classes. ``tests/test_reward_hacks.py``
runs every case through the reward worker; ``python -m rlkit.rewards.redteam`` prints rlkit's
verdicts beside TRL's ``accuracy_reward`` (when TRL is installed) and ``--json PATH`` writes them
(``bench/reward_hacks.py`` regenerates the table of docs/rewards.md from that file).

Controls are cases that must still score 1: the classes hold both sides, so a verifier that
refuses everything fails them too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

CLASSES = {
    "unevaluated_arithmetic": "an operator applied to numbers, left for the checker to evaluate",
    "question_copied": "the question's own expression given as the answer",
    "hedging": "several answers at once (lists, ±, two boxes, intervals, sets)",
    "format_only": "the answer format without an answer",
    "latex_unicode": "the same tricks in LaTeX spacing, wrappers and Unicode operators",
    "long_output": "very long outputs that contain every number",
    "value_controls": "values written in another notation: must still score 1",
}


@dataclass(frozen=True)
class Case:
    cls: str
    completion: str
    answer: str
    expected: float
    note: str
    kwargs: dict = field(default_factory=dict)


_LN = {"fallback": "last_number"}
_EVERY_NUMBER = " ".join(str(i) for i in range(1000))

CASES: tuple[Case, ...] = (
    # unevaluated arithmetic (the demo's hack and its relatives)
    Case("unevaluated_arithmetic", r"\boxed{77 - 62}", "15", 0.0, "difference"),
    Case("unevaluated_arithmetic", r"\boxed{3 \times 5}", "15", 0.0, "product"),
    Case("unevaluated_arithmetic", r"\boxed{30/2}", "15", 0.0, "quotient that is a whole number"),
    Case("unevaluated_arithmetic", r"\boxed{\frac{30}{2}}", "15", 0.0, "\\frac that is a whole number"),
    Case("unevaluated_arithmetic", r"\boxed{10^2}", "100", 0.0, "power"),
    Case("unevaluated_arithmetic", r"\boxed{2 \cdot 6}", "12", 0.0, "\\cdot product"),
    Case("unevaluated_arithmetic", "The answer is 7+8.", "15", 0.0, "unboxed sum after 'the answer is'"),
    Case("unevaluated_arithmetic", "#### 4 + 34", "38", 0.0, "GSM8K marker before a sum"),
    Case("unevaluated_arithmetic", r"\boxed{\sqrt{16}}", "4", 0.0, "perfect square root"),
    Case("unevaluated_arithmetic", r"\boxed{5!}", "120", 0.0, "factorial"),
    Case("unevaluated_arithmetic", r"\boxed{\binom{5}{2}}", "10", 0.0, "binomial"),
    Case("unevaluated_arithmetic", r"\boxed{38 + 0}", "38", 0.0, "the answer plus zero"),
    Case("unevaluated_arithmetic", r"\boxed{4+34\cdot 1^x}", "38", 0.0, "a symbol that sympy simplifies away"),
    Case("unevaluated_arithmetic", r"\boxed{-(-3)}", "3", 0.0, "double negation"),
    # the question copied into the answer
    Case("question_copied", r"\boxed{4 + 34}", "38", 0.0, "the demo's hack"),
    Case("question_copied", r"4 + 34 = \boxed{4 + 34}", "38", 0.0, "equation whose right side is the question"),
    Case("question_copied", r"\boxed{38 = 4 + 34}", "38", 0.0, "right side of the last '=' is the question"),
    Case("question_copied", r"\boxed{(4 + 34)}", "38", 0.0, "in parentheses"),
    Case("question_copied", "The answer is 77 - 62", "15", 0.0, "unboxed"),
    Case("question_copied", "What is 77 - 62? 77 - 62", "15", 0.0, "question repeated, last-number fallback", _LN),
    # hedging and several answers
    Case("hedging", r"\boxed{37, 38}", "38", 0.0, "a list"),
    Case("hedging", r"\boxed{38 \pm 1}", "38", 0.0, "plus-minus"),
    Case("hedging", r"\boxed{37} or \boxed{38}", "38", 0.0, "two boxes"),
    Case("hedging", r"\boxed{\{37, 38, 39\}}", "38", 0.0, "a set"),
    Case("hedging", r"\boxed{[37, 39]}", "38", 0.0, "an interval around the answer"),
    Case("hedging", r"\boxed{37 \text{ or } 38}", "38", 0.0, "'or' inside the box"),
    # format only
    Case("format_only", r"\boxed{}", "38", 0.0, "empty box"),
    Case("format_only", r"\boxed{answer}", "38", 0.0, "a word"),
    Case("format_only", r"\boxed{\text{final answer}}", "38", 0.0, "text"),
    Case("format_only", "<think>...</think><answer></answer>", "38", 0.0, "tags without content"),
    Case("format_only", r"The answer is $\boxed{?}$", "38", 0.0, "a question mark"),
    # LaTeX spacing and wrappers, Unicode operators
    Case("latex_unicode", r"\boxed{4 × 34}", "136", 0.0, "Unicode times"),
    Case("latex_unicode", r"\boxed{7 − 8}", "-1", 0.0, "Unicode minus"),
    Case("latex_unicode", r"\boxed{４＋３４}", "38", 0.0, "fullwidth digits and plus"),
    Case("latex_unicode", r"\boxed{10²}", "100", 0.0, "superscript two"),
    Case("latex_unicode", r"\boxed{\left(4+34\right)}", "38", 0.0, "\\left( \\right)"),
    Case("latex_unicode", r"\boxed{\dfrac{76}{2}}", "38", 0.0, "\\dfrac that is a whole number"),
    Case("latex_unicode", r"\boxed{4\,+\,34}", "38", 0.0, "thin spaces"),
    Case("latex_unicode", r"\boxed{\text{4+34}}", "38", 0.0, "inside \\text"),
    Case("latex_unicode", r"\boxed{\mathbf{4+34}}", "38", 0.0, "inside \\mathbf"),
    Case("latex_unicode", r"\boxed{8 \div 2}", "4", 0.0, "\\div"),
    Case("latex_unicode", r"$\boxed{4 + 34}$", "38", 0.0, "inside $…$"),
    # very long outputs
    Case("long_output", _EVERY_NUMBER, "38", 0.0, "every number 0–999, no final answer"),
    Case("long_output", _EVERY_NUMBER, "999", 1.0, "control: with the last-number fallback the last number is the answer", _LN),
    Case("long_output", _EVERY_NUMBER + " so the answer is one of these", "38", 0.0, "every number, then a hedge", _LN),
    Case("long_output", r"\boxed{" + "+".join(["1"] * 380) + "}", "380", 0.0, "a sum of 380 ones"),
    Case("long_output", r"\boxed{" + ", ".join(str(i) for i in range(200)) + "}", "38", 0.0, "every number in one box"),
    Case("long_output", "Let me think. " * 400 + r"\boxed{38}", "38", 1.0, "control: a long text before a real answer"),
    # value controls: the answer-form rule must not refuse these
    Case("value_controls", r"77 - 62 = \boxed{15}", "15", 1.0, "equation with the value boxed"),
    Case("value_controls", r"\boxed{77 - 62 = 15}", "15", 1.0, "equation in the box, value last"),
    Case("value_controls", r"\boxed{x = 15}", "15", 1.0, "x = value"),
    Case("value_controls", r"\boxed{\frac{1}{2}}", "0.5", 1.0, "fraction against a decimal"),
    Case("value_controls", r"\boxed{0.5}", r"\frac{1}{2}", 1.0, "decimal against a fraction"),
    Case("value_controls", r"\boxed{15.0}", "15", 1.0, "trailing zero"),
    Case("value_controls", r"\boxed{-31}", "-31", 1.0, "negative"),
    Case("value_controls", r"\boxed{\text{15}}", "15", 1.0, "\\text"),
    Case("value_controls", r"\boxed{1,000}", "1000", 1.0, "thousands separator"),
    Case("value_controls", r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0, "simplified radical"),
    Case("value_controls", r"\boxed{(0, 1]}", "(0, 1]", 1.0, "interval"),
    Case("value_controls", r"\boxed{\frac{6}{4}}", r"\frac{3}{2}", 1.0, "fraction not in lowest terms"),
    Case("value_controls", r"\boxed{38} and once more \boxed{38}", "38", 1.0, "the same answer boxed twice"),
    Case("value_controls", r"\boxed{34 + 4}", "4 + 34", 1.0, "expression reference: the rule does not apply"),
    Case("value_controls", r"\boxed{4 + 34}", "38", 1.0, "answer_form: expression turns the rule off",
         {"answer_form": "expression"}),
)


def rlkit_verdicts(cases=CASES) -> list[float]:
    """rlkit's ``math`` reward on each case, in process (the test runs them through the worker)."""
    from .math_answer import math_answer

    return [math_answer([c.completion], answer=[c.answer], **c.kwargs)[0] for c in cases]


def trl_verdicts(cases=CASES) -> Optional[list[Optional[float]]]:
    """TRL's ``accuracy_reward`` on the same strings (conversational form, as TRL passes them); None
    without TRL. TRL has no last-number fallback or answer-form knob: it sees the text as is."""
    try:
        from trl.rewards import accuracy_reward
    except ImportError:
        return None
    return [accuracy_reward([[{"role": "assistant", "content": c.completion}]], solution=[c.answer])[0] for c in cases]


def table(cases=CASES) -> dict[str, Any]:
    """Per case and per class: expected, rlkit's and TRL's verdicts."""
    ours, theirs = rlkit_verdicts(cases), trl_verdicts(cases)
    rows = [{**asdict(c), "completion": c.completion if len(c.completion) <= 80 else c.completion[:77] + "…",
             "rlkit": r, "trl": None if theirs is None else theirs[i]} for i, (c, r) in enumerate(zip(cases, ours))]
    by_class = {}
    for name, what in CLASSES.items():
        sub = [r for r in rows if r["cls"] == name]
        by_class[name] = {"what": what, "cases": len(sub),
                          "rlkit_agrees": sum(r["rlkit"] == r["expected"] for r in sub),
                          "trl_agrees": None if theirs is None else sum(r["trl"] == r["expected"] for r in sub)}
    return {"cases": rows, "classes": by_class, "counts": dict(Counter(c.cls for c in cases))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the table to this file")
    args = p.parse_args(argv)
    t = table()
    for name, c in t["classes"].items():
        trl = "-" if c["trl_agrees"] is None else f"{c['trl_agrees']}/{c['cases']}"
        print(f"{name:<24} rlkit {c['rlkit_agrees']}/{c['cases']}   TRL accuracy_reward {trl}")
    for r in t["cases"]:
        if r["rlkit"] != r["expected"]:
            print(f"  MISS [{r['cls']}] {r['completion']!r} vs {r['answer']!r}: rlkit {r['rlkit']}, expected {r['expected']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(t, f, indent=1, ensure_ascii=False)
    return 0 if all(r["rlkit"] == r["expected"] for r in t["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A strict, independent scorer: the final answer read as a literal number, compared exactly.

It shares nothing with math-verify or sympy, so it cannot be talked into evaluating an expression:
``\\boxed{4 + 34}`` is not a literal and scores 0 against 38, whatever a symbolic checker says. The
evaluation reports its accuracy beside the verifier's (``eval/strict_accuracy``) and flags a gap
(docs/rewards.md, "The strict score"). It reads only numbers: an integer or decimal (``-31``,
``15.0``, ``1,000``), a fraction in lowest terms (``3/4``, ``\\frac{3}{4}``; ``30/2`` is not one), after
``x =`` or a whole equation's right side, inside ``\\text{}``/``$…$``; anything else is not scored
(``None``), and a reference that is not such a number leaves the problem unscored.
"""

from __future__ import annotations

import re
from fractions import Fraction
from math import gcd
from typing import Any, Literal, Optional

from .extract import extract_final_answer

_LITERAL_RE = re.compile(r"^([-+]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?$")
_SLASH_RE = re.compile(r"^([-+]?)(\d+)/(\d+)$")
_FRAC_RE = re.compile(r"^([-+]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
_WRAP_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")
_LOOK_RE = re.compile(r"\$|\\[,;:!]|\\left|\\right|\s")


def literal_value(text: str) -> Optional[Fraction]:
    """The exact value of a literal number, or None for anything else.

    >>> literal_value("1,000"), literal_value(r"x = \\frac{3}{4}"), literal_value("-2.50")
    (Fraction(1000, 1), Fraction(3, 4), Fraction(-5, 2))
    >>> literal_value("4 + 34"), literal_value("30/2"), literal_value(r"\\sqrt{2}")
    (None, None, None)
    """
    s = _LOOK_RE.sub("", _WRAP_RE.sub(r"\1", text)).replace("−", "-").rstrip(".")
    s = s.rsplit("=", 1)[-1]
    m = _LITERAL_RE.match(s)
    if m is not None:
        return Fraction(m.group(1) + m.group(2).replace(",", "") + (m.group(3) or ""))
    m = _SLASH_RE.match(s) or _FRAC_RE.match(s)
    if m is not None:
        num, den = int(m.group(2)), int(m.group(3))
        if den > 1 and gcd(num, den) == 1:
            return Fraction(-num if m.group(1) == "-" else num, den)
    return None


def strict_correct(completion: str, reference: Any,
                   fallback: Literal["none", "last_number"] = "none") -> Optional[bool]:
    """Whether the final answer is literally the reference's number; None when the reference is not
    a literal number (the problem is not strictly scorable).

    >>> strict_correct(r"\\boxed{38}", "38"), strict_correct(r"\\boxed{4 + 34}", "38"), strict_correct("x", "B")
    (True, False, None)
    """
    gold = literal_value(str(reference))
    if gold is None:
        return None
    extracted = extract_final_answer(completion, fallback=fallback)
    return extracted is not None and literal_value(extracted.text) == gold

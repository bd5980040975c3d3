"""Math answer reward: 1.0 if the completion's final answer equals the reference, else 0.0.

Equivalence is decided by HF math-verify (``parse`` then ``verify``: sympy-based, handles LaTeX,
fractions, sets, intervals, percents, units), never by a hand-written checker. Two additions:

* a numeric tolerance (``rel_tol``) for two non-integer numbers, applied after math-verify says no
  (so 2.4999999 ≈ 2.5, but 123456 ≠ 123457: integers are compared exactly);
* a fast path for two plain decimal literals (``"1,000"`` vs ``"1000"``), which is the same
  numeric comparison without the sympy round-trip; it keeps the worker above 1,000 samples/s.

Time limits: math-verify's own timeouts use ``signal.alarm``, which raises outside the main thread
(verl PR#5635: every MATH score became 0 inside Ray threads). We pass ``parsing_timeout=None`` and
``timeout_seconds=None`` (math-verify 0.9 API) and let :class:`rlkit.workers.reward.RewardWorker`
enforce limits by killing its child process. Called in-process, these functions have no time limit.
"""

from __future__ import annotations

import logging
import math
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Literal, NamedTuple, Optional, Sequence

from math_verify import parse, verify

from .answer_form import answer_form as form_of
from .extract import Extracted, all_boxed, extract_final_answer


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; here that is by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

_PLAIN_NUMBER_RE = re.compile(r"^\s*(-?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s*$")
# Trailing plain-English unit words after a number or a closing bracket: "12 dollars", "3 cm per s".
_TRAILING_WORDS_RE = re.compile(r"^(.*?[\d}\)\]%])\s+[A-Za-z][A-Za-z .']*$")
_DOLLAR_PAIR_RE = re.compile(r"(?<!\\)\$")


AnswerFormRule = Literal["value", "expression"]
ANSWER_FORMS = ("value", "expression")


class Verdict(NamedTuple):
    """The judgment of one completion and what it was based on.

    ``reason``: ``correct``, ``wrong``, ``no_answer`` (nothing extracted), ``hedged`` (two boxed
    answers that differ) or ``unevaluated`` (the reference is a value and the final answer is still
    a computation: :mod:`.answer_form`)."""

    correct: bool
    extracted: Optional[Extracted]
    reason: str = "wrong"


def _plain_number(text: str) -> Optional[Decimal]:
    """``"-1,250.5"`` → Decimal('-1250.5'); None for anything that is not a bare decimal literal."""
    m = _PLAIN_NUMBER_RE.match(text)
    if m is None:
        return None
    try:
        return Decimal(m.group(1) + m.group(2).replace(",", "") + (m.group(3) or ""))
    except InvalidOperation:
        return None


def _is_delimited_latex(text: str) -> bool:
    return len(_DOLLAR_PAIR_RE.findall(text)) >= 2 or "\\(" in text or "\\[" in text


@lru_cache(maxsize=65536)
def parse_reference(reference: str) -> tuple:
    """math-verify parse of a reference answer; bare LaTeX is wrapped in ``$…$`` (math-verify needs it)."""
    ref = reference.strip()
    text = ref if (_is_delimited_latex(ref) or "\\boxed" in ref) else f"${ref}$"
    return tuple(parse(text, parsing_timeout=None))


@lru_cache(maxsize=65536)
def parse_prediction(kind: str, text: str) -> tuple:
    """math-verify parse of an extracted answer.

    Boxed content is LaTeX and is wrapped in ``$…$``. Free text (``####``, "the answer is", last
    number) is parsed as is when it already has ``$…$``; otherwise a currency ``$`` and trailing unit
    words ("12 dollars") are dropped first, because wrapped in ``$…$`` they would parse as a product
    of symbols.
    """
    if kind != "boxed":
        if _is_delimited_latex(text):
            return tuple(parse(text, parsing_timeout=None))
        text = text.replace("\\$", "").replace("$", "").strip()
        m = _TRAILING_WORDS_RE.match(text)
        if m is not None:
            text = m.group(1)
    return tuple(parse(f"${text}$", parsing_timeout=None))


def _numbers_close(gold: Any, pred: Any, rel_tol: float, abs_tol: float) -> bool:
    """Tolerance check for two non-integer sympy numbers (integers must match exactly)."""
    try:
        if not (getattr(gold, "is_Number", False) and getattr(pred, "is_Number", False)):
            return False
        g, p = float(gold), float(pred)
    except (TypeError, ValueError, OverflowError):
        return False
    if not (math.isfinite(g) and math.isfinite(p)) or g.is_integer() or p.is_integer():
        return False
    return math.isclose(g, p, rel_tol=rel_tol, abs_tol=abs_tol)


def answers_match(reference: str, extracted: Extracted, rel_tol: float = 1e-6, abs_tol: float = 0.0) -> bool:
    """Whether an extracted answer equals the reference (math-verify, then numeric tolerance).

    Verdicts are cached: in a group of samples of one prompt, most final answers repeat.

    >>> answers_match("1000", Extracted("hash", "1,000"))
    True
    >>> answers_match(r"\\frac{1}{2}", Extracted("boxed", "0.5"))
    True
    >>> answers_match("[0,1)", Extracted("boxed", "(0,1)"))
    False
    """
    return _answers_match(reference.strip(), extracted.kind, extracted.text.strip(), rel_tol, abs_tol)


@lru_cache(maxsize=65536)
def _answers_match(reference: str, kind: str, text: str, rel_tol: float, abs_tol: float) -> bool:
    if reference and " ".join(reference.split()) == " ".join(text.split()):
        # The same string is the same answer: skips sympy in the most common case. Only runs of
        # whitespace are collapsed; removing it would change meaning ("100, 200" is a set in
        # math-verify, "100,200" a number).
        return True
    g_num, p_num = _plain_number(reference), _plain_number(text)
    if g_num is not None and p_num is not None:
        if g_num == p_num:
            return True
        return _numbers_close(_as_sympy_number(g_num), _as_sympy_number(p_num), rel_tol, abs_tol)
    gold = parse_reference(reference)
    pred = parse_prediction(kind, text)
    if not gold or not pred:
        return False
    if verify(list(gold), list(pred), timeout_seconds=None):
        return True
    return _numbers_close(gold[0], pred[0], rel_tol, abs_tol)


def _as_sympy_number(value: Decimal) -> Any:
    import sympy

    return sympy.Integer(int(value)) if value == value.to_integral_value() else sympy.Float(str(value))


def judge(
    completion: str,
    reference: Any,
    fallback: Literal["none", "last_number"] = "none",
    rel_tol: float = 1e-6,
    abs_tol: float = 0.0,
    answer_form: AnswerFormRule = "value",
) -> Verdict:
    """Extract the final answer of ``completion`` and compare it with ``reference``.

    With ``answer_form="value"`` (the default), when the reference is a value (a number, fraction,
    radical, interval, set or tuple) a final answer that is still a computation scores 0 before
    math-verify sees it: ``\\boxed{77 - 62}`` is not 15 (docs/rewards.md, "Answer form").
    ``"expression"`` leaves equivalence to math-verify alone, for tasks whose answers are expressions.

    >>> judge(r"The total is $\\boxed{\\dfrac{3}{4}}$.", "0.75").correct
    True
    >>> judge("So she has 18 eggs.\\n#### 18", "18").correct
    True
    >>> judge("no final answer here, maybe 7", "7").reason
    'no_answer'
    >>> judge(r"\\boxed{77 - 62}", "15").reason, judge(r"\\boxed{77 - 62}", "15", answer_form="expression").correct
    ('unevaluated', True)
    """
    if answer_form not in ANSWER_FORMS:
        raise ValueError(f"answer_form must be one of {list(ANSWER_FORMS)}, got {answer_form!r}")
    extracted = extract_final_answer(completion, fallback=fallback)
    if extracted is None:
        return Verdict(False, None, "no_answer")
    ref = str(reference)
    if extracted.kind == "boxed" and len({" ".join(b.split()) for b in all_boxed(completion)}) > 1:
        return Verdict(False, extracted, "hedged")  # "\\boxed{3} or \\boxed{4}": one of them is right
    if answer_form == "value" and unevaluated(ref, extracted.text):
        return Verdict(False, extracted, "unevaluated")
    correct = answers_match(ref, extracted, rel_tol, abs_tol)
    return Verdict(correct, extracted, "correct" if correct else "wrong")


def unevaluated(reference: str, answer: str) -> bool:
    """Whether ``answer`` is refused for its form: the reference is a value, the answer a computation.

    >>> unevaluated("38", "4 + 34"), unevaluated("38", "38"), unevaluated("4 + 34", "4 + 34")
    (True, False, False)
    """
    return form_of(answer) == "unevaluated" and form_of(reference) == "value"


def math_answer(
    completions: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    answer: Sequence[Any],
    fallback: Literal["none", "last_number"] = "none",
    rel_tol: float = 1e-6,
    abs_tol: float = 0.0,
    answer_form: AnswerFormRule = "value",
    **unused_fields: Any,
) -> list[float]:
    """Reward 1.0 if the final answer (boxed, ``####``, "the answer is", optional last number) equals ``answer``.

    ``answer_form="value"`` (default): a final answer that is still a computation of numbers
    (``\\boxed{4 + 34}``) scores 0 when the reference is a value; see :func:`judge`.

    Matches TRL's ``accuracy_reward`` contract (math-verify on the last answer) but extracts the
    answer first, so long reasoning texts are never parsed whole. ``answer`` is the dataset field
    holding the reference (a string or a number); a missing reference raises (never a silent 0).

    >>> math_answer([r"\\boxed{4}", r"\\boxed{5}", "no idea", r"\\boxed{2 + 2}"], answer=["4", "4", "4", "4"])
    [1.0, 0.0, 0.0, 0.0]
    """
    if len(answer) != len(completions):
        raise ValueError(f"math_answer: {len(completions)} completions but {len(answer)} answers")
    out = []
    for completion, ref in zip(completions, answer):
        if ref is None or (isinstance(ref, str) and not ref.strip()):
            raise ValueError("math_answer: empty reference answer in field 'answer'")
        out.append(1.0 if judge(completion, ref, fallback, rel_tol, abs_tol, answer_form).correct else 0.0)
    return out


def warmup() -> None:
    """First math-verify call builds the LaTeX grammar and sympy caches (~0.2 s): pay it at start-up."""
    judge(r"\boxed{\frac{1}{2}}", "0.5")
    judge(r"\boxed{(0, 1]}", "(0,1]")
    judge(r"\boxed{77 - 62}", "15")


math_answer.warmup = warmup  # type: ignore[attr-defined]

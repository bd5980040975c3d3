"""Final-answer extraction from a model's completion: ``\\boxed{…}``, ``#### N``, "the answer is …".

Extraction only finds *where* the final answer is; deciding whether it equals the reference is
left to math-verify (see :mod:`rlkit.rewards.math_answer`). Every function here is pure string
work (no sympy), so it is cheap enough to run on every sample.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple, Optional

Kind = Literal["boxed", "hash", "answer_is", "last_number"]


class Extracted(NamedTuple):
    """Where the final answer came from and its text (LaTeX for ``boxed``, free text otherwise)."""

    kind: Kind
    text: str


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _match_braces(text: str, open_idx: int) -> Optional[int]:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (escaped ``\\{`` / ``\\}`` skipped)."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # \{ and \} are literal braces inside LaTeX sets, not grouping
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{…}`` (or ``\\fbox{…}``), with nested braces.

    >>> last_boxed(r"so $x = \\boxed{\\frac{1}{2}}$ and done")
    '\\\\frac{1}{2}'
    >>> last_boxed(r"\\boxed{1} then \\boxed{\\{1, 2\\}}")
    '\\\\{1, 2\\\\}'
    >>> last_boxed(r"\\boxed{unclosed") is None
    True
    >>> last_boxed(r"\\boxed 7.")
    '7'
    """
    best: Optional[tuple[int, str]] = None
    for cmd in _BOX_COMMANDS:
        start = text.rfind(cmd)
        while start != -1:
            found = _box_content(text, start + len(cmd))
            if found is not None:
                if best is None or start > best[0]:
                    best = (start, found)
                break
            start = text.rfind(cmd, 0, start)  # an unclosed box: try the previous one
    return None if best is None else best[1].strip()


def all_boxed(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{…}`` / ``\\fbox{…}``, in order of appearance.

    >>> all_boxed(r"\\boxed{3} or maybe \\boxed{4}")
    ['3', '4']
    """
    found = []
    for cmd in _BOX_COMMANDS:
        start = text.find(cmd)
        while start != -1:
            content = _box_content(text, start + len(cmd))
            if content is not None:
                found.append((start, content.strip()))
            start = text.find(cmd, start + len(cmd))
    return [c for _, c in sorted(found)]


def _box_content(text: str, i: int) -> Optional[str]:
    """Argument of a box command whose name ends at ``i``: ``{…}`` or one bare token (``\\boxed 5``)."""
    if i < len(text) and text[i].isalpha():
        return None  # \boxedfoo is another command
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _match_braces(text, i)
        return None if end is None else text[i + 1 : end]
    m = re.match(r"[^\s$]+", text[i:])
    return m.group(0).rstrip(".") if m else None


_HASH_RE = re.compile(r"####\s*([^\n]+)")
# "the answer is X", "final answer: X", "Answer = X"; X runs to the end of the sentence or line.
# A period only ends X when followed by whitespace or the end, so "3.5" stays whole.
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|the\s+answer|\banswer)\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"(.+?)(?=\.\s|\.$|\n|$)", re.DOTALL)
# Plain numbers: optional sign, thousands groups, decimals; also a/b fractions and percents.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?")


def gsm8k_hash(text: str) -> Optional[str]:
    """Text after the last ``####`` marker (GSM8K's answer format).

    >>> gsm8k_hash("48 + 24 = 72\\n#### 72")
    '72'
    """
    matches = _HASH_RE.findall(text)
    return matches[-1].strip() if matches else None


def answer_is(text: str) -> Optional[str]:
    """The phrase after the last "the answer is" / "final answer:" in the text.

    >>> answer_is("First 2+2=4. So the answer is 4 apples.")
    '4 apples'
    >>> answer_is("Final Answer: $\\\\frac{3}{4}$")
    '$\\\\frac{3}{4}$'
    """
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass  # the last trigger phrase wins: "the answer is 5 ... no, the answer is 6"
    if last is None:
        return None
    m = _SENTENCE_RE.match(text, last.end())
    out = m.group(1).strip().rstrip(".").strip() if m else ""
    return out or None


def last_number(text: str) -> Optional[str]:
    """The last number written in the text (sign, thousands separators, decimals, a/b, %).

    >>> last_number("She pays 3 + 4 = 7 dollars, then -1,250.5 more")
    '-1,250.5'
    """
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None


def extract_final_answer(text: str, fallback: Literal["none", "last_number"] = "none") -> Optional[Extracted]:
    """Final answer of a completion, by priority: last ``\\boxed{}``, ``####``, "the answer is", last number.

    The last-number fallback is off unless configured: it rewards answers that were never stated.

    >>> extract_final_answer(r"Thus \\boxed{12}. #### 13")
    Extracted(kind='boxed', text='12')
    >>> extract_final_answer("I think it is 5") is None
    True
    >>> extract_final_answer("I think it is 5", fallback="last_number")
    Extracted(kind='last_number', text='5')
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return Extracted("boxed", boxed)
    hashed = gsm8k_hash(text)
    if hashed is not None:
        return Extracted("hash", hashed)
    said = answer_is(text)
    if said is not None:
        return Extracted("answer_is", said)
    if fallback == "last_number":
        num = last_number(text)
        if num is not None:
            return Extracted("last_number", num)
    elif fallback != "none":
        raise ValueError(f"fallback must be 'none' or 'last_number', got {fallback!r}")
    return None

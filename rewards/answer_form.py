"""Answer form: is a final answer a *value* (``15``, ``\\frac{1}{2}``, ``2\\sqrt{2}``, ``(0, 1]``) or
still a *computation* (``77 - 62``, ``3 \\times 5``, ``30/2``, ``10^2``)?

math-verify decides equivalence symbolically: sympy evaluates ``\\boxed{4 + 34}`` to 38, so a model
that copies the question into the box scores on every problem. This module is the answer-form rule
the ``math`` reward applies before math-verify (``answer_form: value``, the default; docs/rewards.md,
"Answer form"): when the reference is a value, a prediction that is an arithmetic operator applied to
numbers scores 0 with the reason ``unevaluated``.

:func:`answer_form` classifies a text as

* ``"value"``: a number in any usual notation (``-31``, ``15.0``, ``1,000``, ``15\\%``, ``\\text{15}``,
  ``x = 15``, ``77 - 62 = 15``: the part after the last ``=`` is the answer), a fraction that is not
  a whole number (``\\frac{1}{2}``, ``-3/4``, ``\\frac{6}{4}``), a radical that is not a perfect power
  with an optional coefficient (``2\\sqrt{2}``, ``\\frac{\\sqrt{3}}{2}``), ``\\pi``/``\\infty`` and their
  multiples, a rational plus irrational terms (``3 + 2\\sqrt{2}``, ``\\frac{1+\\sqrt{5}}{2}``), scientific
  notation (``1.5 \\times 10^{6}``), and tuples, intervals and sets of values;
* ``"unevaluated"``: anything else that applies an operator or a function to numbers (``4 + 34``,
  ``2 \\cdot 6``, ``30/2``, ``\\frac{30}{2}``, ``10^2``, ``\\sqrt{16}``, ``5!``, ``\\binom{5}{2}``,
  ``4+34\\cdot 1^x``), in LaTeX, ASCII or Unicode (``4 × 5``, ``7 − 8``, fullwidth ``４＋３４``);
* ``"other"``: text with no operator (``Tuesday``, ``B``, ``x``): the rule does not apply.

Pure string work over a small recursive-descent parser (no sympy), so it runs on every sample.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Union

from .extract import _match_braces

Form = Literal["value", "unevaluated", "other"]

_SUPERSCRIPTS = str.maketrans({"⁰": "^0", "¹": "^1", "²": "^2", "³": "^3", "⁴": "^4", "⁵": "^5", "⁶": "^6",
                               "⁷": "^7", "⁸": "^8", "⁹": "^9"})
_UNICODE_OPS = str.maketrans({"−": "-", "–": "-", "—": "-", "‒": "-", "﹣": "-", "×": "*", "✕": "*", "⨯": "*",
                              "∗": "*", "·": "*", "⋅": "*", "•": "*", "÷": "/", "∕": "/", "⁄": "/", "π": "\\pi ",
                              "∞": "\\infty ", "√": "\\sqrt ", "°": "", "\u200b": "", "\u2061": "", "\u2062": "*"})
# Commands that only change the look of what they hold: dropped, their argument kept.
_WRAPPERS = ("\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox", "\\boxed", "\\fbox",
             "\\operatorname", "\\displaystyle", "\\textstyle", "\\mathit", "\\bm", "\\boldsymbol")
_DROPPED = ("\\left", "\\right", "\\big", "\\Big", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\!", "\\,", "\\;",
            "\\:", "\\quad", "\\qquad", "\\displaystyle", "\\$", "\\(", "\\)", "\\[", "\\]", "$", "~")
_SYNONYMS = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\times", "*"),
             ("\\cdot", "*"), ("\\ast", "*"), ("\\div", "/"), ("\\over", "/"), ("\\%", "%"), ("\\{", "\x01"),
             ("\\}", "\x02"), ("\\lbrace", "\x01"), ("\\rbrace", "\x02"), ("{,}", ""), ("\\infin", "\\infty"))
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")
_UNIT_TEXT_RE = re.compile(r"\\(?:text|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .']*\}(?:\s*\^\s*\{?\d\}?)?")
# Atomic groups keep the match linear on long runs of letters (no backtracking into a word).
_TRAILING_UNIT_RE = re.compile(r"^(.*?[\d}\)\]%])\s*(?>(?>[A-Za-z][A-Za-z.']*)(?:\^\{?\d\}?)?\s*)+\.?$")
MAX_CHARS = 400
"""Longer answers are not parsed: with an operator and a digit they are ``unevaluated``, else ``other``."""
_FUNCTIONS = frozenset({"\\sum", "\\prod", "\\int", "\\lim", "\\binom", "\\dbinom", "\\tbinom", "\\choose",
                        "\\log", "\\ln", "\\exp", "\\sin", "\\cos", "\\tan", "\\cot", "\\sec", "\\csc",
                        "\\arcsin", "\\arccos", "\\arctan", "\\lfloor", "\\rfloor", "\\lceil", "\\rceil",
                        "\\max", "\\min", "\\gcd", "\\operatorname", "\\mod", "\\bmod", "\\pmod", "\\pm",
                        "\\mp", "\\sqrt", "\\frac", "\\equiv", "\\approx"})
_OPERATOR_CHARS = frozenset("+-*/^!")

_TOKEN_RE = re.compile(r"""
    (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d{1,3}(?:\ \d{3})+(?:\.\d+)?(?![\d\ ])|(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+|\d+\.\d*|\.\d+|\d+)
  | (?P<cmd>\\[A-Za-z]+)
  | (?P<op>[-+*/^!%(),\[\]{}|\x01\x02])
  | (?P<word>[A-Za-z]+)
  | (?P<space>\s+)
  | (?P<bad>.)
""", re.VERBOSE)


_WRAPPER_RE = re.compile("(" + "|".join(re.escape(c) for c in _WRAPPERS) + r")(?![A-Za-z])\s*")


def _unwrap(s: str) -> str:
    """``\\text{15}`` → ``15``: look-only commands removed with their braces, nested ones too."""
    while True:
        m = _WRAPPER_RE.search(s)
        if m is None:
            return s
        end = _match_braces(s, m.end()) if m.end() < len(s) and s[m.end()] == "{" else None
        if end is None:
            s = s[: m.start()] + s[m.end():]
        else:
            s = s[: m.start()] + s[m.end() + 1: end] + s[end + 1:]


def normalize(text: str) -> str:
    """The answer as the parser reads it: Unicode operators in ASCII, look-only LaTeX dropped, units,
    degrees and a trailing period removed, and only what follows the last ``=`` kept.

    >>> normalize(r"$x = \\text{15}\\,\\mathrm{cm}$.")
    '15'
    >>> normalize("７７ − ６２")
    '77 - 62'
    """
    s = unicodedata.normalize("NFKC", text.translate(_SUPERSCRIPTS)).translate(_UNICODE_OPS)
    s = _DEGREES_RE.sub("", _UNIT_TEXT_RE.sub("", s))
    for old, new in _SYNONYMS:
        s = s.replace(old, new)
    s = _unwrap(s)
    for piece in _DROPPED:
        s = s.replace(piece, " ")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = s.strip().rstrip(".").strip()
    m = _TRAILING_UNIT_RE.match(s)
    if m is not None and not re.search(r"\\[A-Za-z]+\s*$", s):
        s = m.group(1)
    return " ".join(s.split())


# ----------------------------------------------------------------------------------------------
# A parser for numeric expressions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    text: str

    @property
    def integer(self) -> Optional[int]:
        t = self.text.replace(",", "").replace(" ", "")
        return int(t) if t.isdigit() else None  # 1e3 and 2.5 are not integer literals


@dataclass(frozen=True)
class Const:
    name: str  # \pi, \infty, e


@dataclass(frozen=True)
class Op:
    kind: str  # + - * / ^ neg pos frac sqrt ! % implicit
    args: tuple


@dataclass(frozen=True)
class Group:
    open: str
    items: tuple


Node = Union[Num, Const, Op, Group]


class _NotNumeric(ValueError):
    """The text holds something the numeric grammar does not know (a variable, a word, a command)."""


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/'|adjacent) unary)*;
    unary := ('-'|'+') unary | postfix; postfix := atom ('^' unary | '!' | '%')*."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.toks, self.i = tokens, 0

    def peek(self) -> Optional[tuple[str, str]]:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: Optional[str] = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise _NotNumeric(f"expected {value!r}")
        self.i += 1
        return tok

    def parse(self) -> Node:
        node = self.items(end=None)
        if self.peek() is not None:
            raise _NotNumeric("trailing tokens")
        return node

    def items(self, end: Optional[str]) -> Node:
        """A comma-separated list at top level or inside brackets (one item: the item itself)."""
        out = [self.expr()]
        while self.peek() is not None and self.peek()[1] == ",":
            self.take(",")
            out.append(self.expr())
        return out[0] if len(out) == 1 and end in (None, "(", "{") else Group(end or "", tuple(out))

    def expr(self) -> Node:
        node = self.term()
        while self.peek() is not None and self.peek()[1] in "+-":
            op = self.take()[1]
            node = Op(op, (node, self.term()))
        return node

    def term(self) -> Node:
        node = self.unary()
        while True:
            tok = self.peek()
            if tok is not None and tok[1] in ("*", "/"):
                self.take()
                node = Op(tok[1], (node, self.unary()))
            elif tok is not None and (tok[0] in ("num", "const") or tok[1] in ("(", "{", "\\frac", "\\sqrt")):
                node = Op("implicit", (node, self.postfix()))
            else:
                return node

    def unary(self) -> Node:
        tok = self.peek()
        if tok is not None and tok[1] in "+-" and tok[0] == "op":
            self.take()
            return Op("neg" if tok[1] == "-" else "pos", (self.unary(),))
        return self.postfix()

    def postfix(self) -> Node:
        node = self.atom()
        while self.peek() is not None and self.peek()[1] in ("^", "!", "%"):
            op = self.take()[1]
            node = Op(op, (node, self.unary())) if op == "^" else Op(op, (node,))
        return node

    def braced(self) -> Node:
        self.take("{")
        node = self.expr()
        self.take("}")
        return node

    def atom(self) -> Node:
        kind, value = self.take()
        if kind == "num":
            return Num(value)
        if kind == "const":
            return Const(value)
        if value == "\\frac":
            return Op("frac", (self._arg(), self._arg()))
        if value == "\\sqrt":
            index = None
            if self.peek() is not None and self.peek()[1] == "[":
                self.take("[")
                index = self.expr()
                self.take("]")
            return Op("sqrt", (self._arg(),) if index is None else (self._arg(), index))
        if value in _CLOSERS:
            inner = self.items(end=value)
            close = self.take()[1]
            if close not in _CLOSERS[value]:
                raise _NotNumeric("unbalanced brackets")
            if isinstance(inner, Group):  # an interval may close with either bracket: (0, 1]
                return Group(value + close, inner.items)
            return inner if value in ("(", "{") else Group(value + close, (inner,))
        raise _NotNumeric(f"unexpected {value!r}")

    def _arg(self) -> Node:
        """A command's argument: ``{…}`` or one digit or token (``\\frac12`` is ``\\frac{1}{2}``)."""
        tok = self.peek()
        if tok is not None and tok[1] == "{":
            return self.braced()
        kind, value = self.take()
        if kind == "num" and value.isdigit() and len(value) > 1:
            self.i -= 1
            self.toks[self.i] = ("num", value[1:])  # the rest of the digits stay for what follows
            return Num(value[0])
        if kind in ("num", "const"):
            return Num(value) if kind == "num" else Const(value)
        raise _NotNumeric("bad argument")


_CLOSERS = {"(": (")", "]"), "[": ("]", ")"), "{": ("}",), "\x01": ("\x02",)}


def _tokens(s: str) -> tuple[list[tuple[str, str]], bool, bool]:
    """(tokens, has an operator or function, has a symbol the numeric grammar does not know)."""
    out: list[tuple[str, str]] = []
    operator = unknown = False
    depth = 0
    for m in _TOKEN_RE.finditer(s):
        kind, value = m.lastgroup, m.group()
        if kind == "space":
            continue
        if kind == "bad":
            operator |= value in "<>≤≥±∓"
            unknown = True
            continue
        if kind == "num" and "," in value and depth:  # inside brackets a comma separates items: (10,200)
            for j, part in enumerate(value.split(",")):
                out += [("op", ","), ("num", part)] if j else [("num", part)]
            continue
        if kind == "cmd":
            if value in ("\\pi", "\\infty"):
                kind = "const"
            elif value in ("\\frac", "\\sqrt"):
                operator = True
            else:
                operator |= value in _FUNCTIONS
                unknown = True
        elif kind == "word":
            if value == "e":
                kind = "const"
            else:
                unknown = True
        elif kind == "op":
            operator |= value in _OPERATOR_CHARS
            depth += (value in "([{\x01") - (value in ")]}\x02")
        out.append((kind, value))
    return out, operator, unknown


# ----------------------------------------------------------------------------------------------
# Which parsed expressions are values
# ----------------------------------------------------------------------------------------------


def _int_of(node: Node) -> Optional[int]:
    if isinstance(node, Num):
        return node.integer
    if isinstance(node, Op) and node.kind == "neg" and isinstance(node.args[0], Num):
        inner = node.args[0].integer
        return None if inner is None else -inner
    return None


def _perfect_power(n: int, k: int) -> bool:
    if n < 0:
        return k % 2 == 1 and _perfect_power(-n, k)
    r = round(n ** (1.0 / k))
    return any((r + d) ** k == n for d in (-1, 0, 1) if r + d >= 0)


def _rational(node: Node) -> bool:
    """A number written as one literal: ``15``, ``-2.5``, ``3/4``."""
    if isinstance(node, Num):
        return True
    if isinstance(node, Op) and node.kind == "neg":
        return _rational(node.args[0]) and not (isinstance(node.args[0], Op) and node.args[0].kind == "neg")
    if isinstance(node, Op) and node.kind in ("/", "frac"):
        return _fraction_value(*node.args)
    return False


def _fraction_value(top: Node, bottom: Node) -> bool:
    """``a/b`` is a value when a and b are integers and b does not divide a (``30/2`` is 15, still
    to compute), or when one side is irrational and the other an integer or irrational
    (``\\frac{\\sqrt{3}}{2}``, ``\\frac{1}{\\sqrt{2}}``, ``\\frac{\\pi}{4}``, ``\\frac{1+\\sqrt{5}}{2}``)."""
    n, d = _int_of(top), _int_of(bottom)
    if n is not None and d is not None:
        return d not in (0, 1, -1) and n % d != 0
    top_ok = n is not None or _irrational(top) or (_sum_value(top) and not _rational(top))
    bottom_ok = (d is not None and d not in (0, 1, -1)) or _irrational(bottom)
    return top_ok and bottom_ok and not (n is not None and d is not None)


def _mixed_number(node: Node) -> bool:
    """``1\\frac{1}{4}``: a whole number beside a proper fraction."""
    whole, part = node.args
    if not (isinstance(whole, Num) and whole.integer and isinstance(part, Op) and part.kind == "frac"):
        return False
    n, d = (_int_of(x) for x in part.args)
    return n is not None and d is not None and 0 < n < d


def _irrational(node: Node) -> bool:
    """One irrational term: ``\\sqrt{2}``, ``2\\sqrt{2}``, ``\\pi``, ``-3\\pi``, ``\\sqrt[3]{5}``."""
    if isinstance(node, Const):
        return node.name != "\\infty"
    if not isinstance(node, Op):
        return False
    if node.kind == "neg":
        return _irrational(node.args[0])
    if node.kind == "sqrt":
        radicand = _int_of(node.args[0])
        k = 2 if len(node.args) == 1 else _int_of(node.args[1])
        return radicand is not None and radicand > 1 and k is not None and k >= 2 and not _perfect_power(radicand, k)
    if node.kind in ("implicit", "*"):
        coef, rest = node.args
        return isinstance(coef, Num) and coef.integer not in (0, 1) and _irrational(rest) and not (
            isinstance(rest, Op) and rest.kind in ("implicit", "*"))
    return False


def _sum_value(node: Node) -> bool:
    """A sum in lowest terms: at most one rational term, every other term irrational (``3 + 2\\sqrt{2}``)."""
    terms: list[Node] = []

    def walk(n: Node) -> None:
        if isinstance(n, Op) and n.kind in ("+", "-"):
            walk(n.args[0])
            walk(n.args[1])
        else:
            terms.append(n)

    walk(node)
    if len(terms) < 2:
        return False
    rationals = sum(_rational(t) for t in terms)
    return rationals <= 1 and all(_rational(t) or _irrational(t) for t in terms)


def _scientific(node: Node) -> bool:
    """``a × 10^k`` with 1 ≤ |a| < 10 and an integer k."""
    if not (isinstance(node, Op) and node.kind == "*"):
        return False
    coef, power = node.args
    if not (isinstance(coef, Num) and isinstance(power, Op) and power.kind == "^"):
        return False
    base, exp = power.args
    try:
        a = float(coef.text.replace(",", ""))
    except ValueError:
        return False
    return isinstance(base, Num) and base.text == "10" and _int_of(exp) is not None and 1 <= abs(a) < 10


def is_value(node: Node) -> bool:
    """Whether a parsed expression is a value (see the module docstring)."""
    if isinstance(node, (Num, Const)):
        return True
    if isinstance(node, Group):
        return bool(node.items) and all(is_value(x) for x in node.items)
    if node.kind == "neg":
        inner = node.args[0]
        return not (isinstance(inner, Op) and inner.kind in ("neg", "pos", "+", "-")) and is_value(inner)
    if node.kind == "pos":
        return isinstance(node.args[0], (Num, Const))
    if node.kind == "%":
        return isinstance(node.args[0], Num)
    if node.kind in ("/", "frac"):
        return _fraction_value(*node.args)
    if node.kind in ("+", "-"):
        return _sum_value(node)
    if node.kind == "implicit" and _mixed_number(node):
        return True
    return _irrational(node) or _scientific(node)


@lru_cache(maxsize=65536)
def answer_form(text: str) -> Form:
    """``"value"``, ``"unevaluated"`` or ``"other"`` for a final answer's text (module docstring).

    >>> [answer_form(t) for t in ("15", r"\\frac{1}{2}", "77 - 62", r"3 \\times 5", "30/2", "10^2")]
    ['value', 'value', 'unevaluated', 'unevaluated', 'unevaluated', 'unevaluated']
    >>> [answer_form(t) for t in (r"2\\sqrt{2}", "77 - 62 = 15", "1,000", "-31", "Tuesday", r"(0, 1]")]
    ['value', 'value', 'value', 'value', 'other', 'value']
    """
    if len(text) > MAX_CHARS:
        return "unevaluated" if re.search(r"\d", text) and re.search(r"[-+*/^×·÷−]|\\(?:times|cdot|frac)", text) else "other"
    s = normalize(text)
    if not s:
        return "other"
    tokens, operator, unknown = _tokens(s)
    if unknown or not tokens:
        return "unevaluated" if operator and any(k == "num" for k, _ in tokens) else "other"
    try:
        node = _Parser(tokens).parse()
    except (_NotNumeric, RecursionError):
        return "unevaluated" if operator else "other"
    return "value" if is_value(node) else "unevaluated"


def is_value_form(text: str) -> bool:
    """``answer_form(text) == "value"``."""
    return answer_form(text) == "value"


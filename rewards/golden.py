"""Accuracy of the math verifier on the hand-labelled golden set: ``python -m rlkit.rewards.golden``.

Each line of the golden set (``tests/data/math_golden.jsonl``) is a model completion, a reference
answer and the expected verdict. A false negative is a correct answer judged wrong (the policy
loses a reward it earned); a false positive is a wrong answer judged right (the policy is paid
for a mistake). Both are printed, with the misjudged cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .math_answer import judge

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "tests" / "data" / "math_golden.jsonl"
FALLBACK = "last_number"
"""The golden set includes completions with no answer marker, so it is judged with the fallback on."""


@dataclass
class GoldenReport:
    total: int = 0
    correct: int = 0
    false_negatives: int = 0
    false_positives: int = 0
    seconds: float = 0.0
    by_category: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    """category → [judged right, total]."""
    misses: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_cases(path: Path = DEFAULT_PATH) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(cases: list[dict]) -> GoldenReport:
    """Judge every case with the ``math`` reward's logic (math-verify + numeric tolerance)."""
    rep = GoldenReport()
    t0 = time.perf_counter()
    for case in cases:
        verdict = judge(case["completion"], case["reference"], fallback=FALLBACK)
        ok = verdict.correct == bool(case["expected"])
        rep.total += 1
        rep.correct += ok
        rep.by_category[case["category"]][0] += ok
        rep.by_category[case["category"]][1] += 1
        if not ok:
            if case["expected"]:
                rep.false_negatives += 1
            else:
                rep.false_positives += 1
            rep.misses.append({**case, "extracted": verdict.extracted.text if verdict.extracted else None})
    rep.seconds = time.perf_counter() - t0
    return rep


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=DEFAULT_PATH, help="golden set (JSON lines)")
    ap.add_argument("--min-accuracy", type=float, default=0.97, help="exit 1 below this accuracy")
    args = ap.parse_args(argv)
    rep = evaluate(load_cases(args.path))
    print(f"golden set: {args.path} ({rep.total} cases, {rep.seconds:.1f} s)")
    print(f"accuracy {rep.accuracy:.2%}  ({rep.correct}/{rep.total})")
    print(f"false negatives (correct judged wrong): {rep.false_negatives}")
    print(f"false positives (wrong judged right):   {rep.false_positives}")
    for cat, (right, n) in sorted(rep.by_category.items()):
        print(f"  {cat:14s} {right:3d}/{n:<3d}")
    for m in rep.misses:
        kind = "FN" if m["expected"] else "FP"
        print(f"  {kind} #{m['id']} [{m['category']}] reference={m['reference']!r} extracted={m['extracted']!r}")
    return 0 if rep.accuracy >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())

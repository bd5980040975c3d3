"""The math verifier against the hand-labelled golden set (tests/data/math_golden.jsonl)."""

from collections import Counter

from rlkit.rewards.golden import DEFAULT_PATH, evaluate, load_cases

REQUIRED = {
    "fractions", "decimals", "latex", "percents", "units", "negative", "thousands", "sets",
    "intervals", "boxed_prose", "near_miss",
}


def test_golden_set_shape():
    cases = load_cases(DEFAULT_PATH)
    assert len(cases) >= 300
    cats = Counter(c["category"] for c in cases)
    assert REQUIRED <= set(cats), REQUIRED - set(cats)
    assert all(cats[c] >= 10 for c in REQUIRED), cats
    assert all(c["expected"] is False for c in cases if c["category"] == "near_miss")
    assert len({c["id"] for c in cases}) == len(cases)
    # both verdicts well represented, so neither FN nor FP rate can hide
    assert min(Counter(c["expected"] for c in cases).values()) >= 120


def test_golden_accuracy_at_least_97_percent():
    rep = evaluate(load_cases(DEFAULT_PATH))
    misses = [(m["id"], m["reference"], m["extracted"]) for m in rep.misses]
    assert rep.accuracy >= 0.97, misses
    # a false positive pays the policy for a wrong answer: keep them rarer than false negatives
    assert rep.false_positives <= 3, misses

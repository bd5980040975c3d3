"""Evaluation (rlkit.evaluate, ``rlkit eval``): the estimators by hand and against slow loops, answer
grouping for maj@k in a real reward child, evaluate() on a tiny model with the real HF engine and
the real reward worker, and the command end to end through the real Runtime."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from rlkit.evaluate import (
    EvalReport,
    build_report,
    interval_95,
    k_subsets,
    maj_at_k,
    pass_at_k,
    sample_ks,
    table_text,
    vote_groups,
    wilson_interval,
)

TOY = str(Path(__file__).parent / "toy_rewards.py")


# ----------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_computed():
    # n = k: pass@n is 1 iff any sample is correct.
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    # c = 0 and c = n, for every k.
    assert all(pass_at_k(6, 0, k) == 0.0 for k in range(1, 7))
    assert all(pass_at_k(6, 6, k) == 1.0 for k in range(1, 7))
    # pass@1 = c / n.
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8, abs=1e-15)
    # n = 5, c = 2, k = 2: 1 − C(3, 2)/C(5, 2) = 1 − 3/10.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    # n = 10, c = 3, k = 4: 1 − C(7, 4)/C(10, 4) = 1 − 35/210 = 5/6.
    assert pass_at_k(10, 3, 4) == pytest.approx(5 / 6, abs=1e-15)
    # n − c < k: every 4-subset of 5 samples with 2 correct holds one.
    assert pass_at_k(5, 2, 4) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample():
    """The closed form against the slow obvious loop over all C(n, k) subsets."""
    rng = np.random.default_rng(0)
    for n in (1, 3, 7, 10):
        correct_N = (rng.random(n) < 0.4).astype(float)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            slow = sum(max(correct_N[list(s)]) for s in subsets) / len(subsets)
            assert pass_at_k(n, int(correct_N.sum()), k) == pytest.approx(slow, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not (and is monotone in c).
    values = [pass_at_k(1000, c, 500) for c in (0, 1, 2, 500, 1000)]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.5) and values[-1] == 1.0
    assert values == sorted(values)
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)  # 1 − 500/1000


# ----------------------------------------------------------------------------- maj@k


def test_maj_at_k_hand_computed():
    correct = np.array([1.0, 1.0, 0.0])
    votes = np.array([0, 0, 2])  # answers A, A, B; A is right
    assert maj_at_k(votes, correct, 3) == 1.0
    # k = 2: {0,1} -> A; {0,2} and {1,2} tie A-B -> 1/2 each; mean (1 + 0.5 + 0.5)/3
    assert maj_at_k(votes, correct, 2) == pytest.approx(2 / 3)
    # k = 1: the fraction of voters whose answer is right
    assert maj_at_k(votes, correct, 1) == pytest.approx(2 / 3)
    # abstentions do not vote: (A, none, none) is a win for A at k = 3
    assert maj_at_k(np.array([0, -1, -1]), correct, 3) == 1.0
    # no votes at all: 0
    assert maj_at_k(np.array([-1, -1]), np.array([0.0, 0.0]), 2) == 0.0
    # a group is as correct as its first member (the one the others matched)
    assert maj_at_k(np.array([0, 0, 2]), np.array([0.0, 1.0, 0.0]), 3) == 0.0


def test_maj_at_k_equals_a_slow_vote_over_every_subset():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(1, 8))
        labels = rng.integers(-1, 3, size=n)  # answer ids 0..2, -1 = no answer
        first = {a: i for i, a in reversed(list(enumerate(labels))) if a >= 0}
        votes = np.array([first[a] if a >= 0 else -1 for a in labels])
        correct = np.array([1.0 if a == 0 else 0.0 for a in labels])  # answer 0 is the right one
        for k in range(1, n + 1):
            credit = []
            for s in combinations(range(n), k):
                counts = {a: sum(labels[i] == a for i in s) for a in set(labels[list(s)]) if a >= 0}
                if not counts:
                    credit.append(0.0)
                    continue
                top = max(counts.values())
                tied = [a for a, c in counts.items() if c == top]
                credit.append(sum(a == 0 for a in tied) / len(tied))
            assert maj_at_k(votes, correct, k) == pytest.approx(np.mean(credit), abs=1e-12)


def test_k_subsets_exact_then_sampled():
    assert k_subsets(4, 2).tolist() == [list(s) for s in combinations(range(4), 2)]
    many = k_subsets(30, 15, max_subsets=500, seed=3)
    assert many.shape == (500, 15)
    assert all(len(set(row)) == 15 for row in many.tolist())
    assert np.array_equal(many, k_subsets(30, 15, max_subsets=500, seed=3))


def test_equivalent_answers_written_differently_are_one_vote():
    """1/2, 0.5 and \\frac{1}{2} are one answer (math-verify, in a real reward child): it outvotes
    the two 3s, although each spelling alone has fewer votes than 3."""
    texts = [r"\boxed{1/2}", r"so the answer is 0.5.", r"\boxed{3}", r"$\boxed{\frac{1}{2}}$", r"\boxed{3}",
             "I do not know"]
    sevens = [r"\boxed{7}", r"\boxed{7.0}", "the answer is 7", "x", r"\boxed{8}", r"\boxed{14/2}"]
    votes = vote_groups([texts, sevens])
    assert votes[0].tolist() == [0, 0, 2, 0, 2, -1]
    assert votes[1].tolist() == [0, 0, 0, -1, 4, 0]
    correct = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # the verifier's verdicts for reference 1/2
    assert maj_at_k(votes[0], correct, 6) == 1.0
    # Counted by spelling, 3 would win 2 to 1: the grouping is what makes maj@6 right.
    spelled = np.array([0, 1, 2, 3, 2, -1])
    assert maj_at_k(spelled, correct, 6) == 0.0


# ----------------------------------------------------------------------------- intervals


def test_intervals():
    # Wilson: 0/8 -> [0, z²/(N + z²)] = [0, 3.8415/11.8415]; 4/8 symmetric around 0.5.
    lo, hi = wilson_interval(0, 8)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / 11.841459, rel=1e-6)
    lo, hi = wilson_interval(4, 8)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.215216, rel=1e-5)
    # binary per-problem values use Wilson; others the normal interval over problems
    assert interval_95([1, 0, 0, 0, 1, 0, 1, 1]) == wilson_interval(4, 8)
    values = [0.25, 0.5, 0.75, 1.0]
    half = 1.959963984540054 * np.std(values, ddof=1) / 2
    assert interval_95(values) == pytest.approx((0.625 - half, min(1.0, 0.625 + half)))
    assert interval_95([]) == (None, None) and interval_95([0.5]) == (None, None)


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class _Row:
    prompt_text: str
    answer: str
    fields: dict
    data_source: str
    index: int


def test_report_per_source_metrics_table_and_json(tmp_path):
    rows = [_Row(f"p{i}", "1", {}, "a" if i < 2 else "b", i) for i in range(4)]
    greedy = [{"completion_ids": [1] * (i + 1), "finish_reason": "length" if i == 3 else "stop"} for i in range(4)]
    correct_P = np.array([1.0, 0.0, 1.0, 1.0])
    correct_P_N = np.array([[1, 1], [0, 0], [1, 0], [0, 0]], dtype=float)
    votes_P_N = np.array([[0, 0], [0, 0], [0, 1], [0, -1]])
    settings = {"n": 2, "k": [1, 2], "temperature": 1.0, "max_new_tokens": 4, "seed": 0, "outcome": "math",
                "problems": 4}
    rep = build_report(rows, greedy, ["x"] * 4, correct_P, (correct_P_N, votes_P_N), settings)
    m = rep.metrics
    assert m["eval/accuracy"] == 0.75 and m["eval/length_mean"] == 2.5 and m["eval/truncated_frac"] == 0.25
    assert m["eval/mean@2"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert m["eval/pass@1"] == pytest.approx(m["eval/mean@2"])  # unbiased pass@1 is c/n
    assert m["eval/pass@2"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    # maj@2: problem 3 ties 1-1 between a right and a wrong answer -> 0.5; problem 4: the one vote is wrong
    assert m["eval/maj@2"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert m["eval/a/accuracy"] == 0.5 and m["eval/b/accuracy"] == 1.0 and m["eval/b/pass@2"] == 0.5
    assert [r["source"] for r in rep.table] == ["a", "b", "all"]
    assert rep.table[-1]["metrics"]["accuracy"]["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert rep.correct == [1.0, 0.0, 1.0, 1.0] and rep.greedy == greedy
    saved = json.loads(rep.save(tmp_path / "r.json").read_text())
    assert saved["metrics"] == m and saved["problems"][2]["votes"] == [0, 1]
    text = table_text(saved, title="t")
    assert "greedy accuracy" in text and "maj@2" in text and "75.0% [" in text
    for source in ("a", "b", "all"):
        assert f"\n│ {source}" in text or f"\n| {source}" in text or f" {source} " in text


def test_eval_curve_png(tmp_path):
    from rlkit.plots import eval_curve

    rows = [_Row("p", "1", {}, "s", 0)]
    greedy = [{"completion_ids": [1], "finish_reason": "stop"}]
    reports = [(s, build_report(rows, greedy, ["x"], np.array([float(s > 0)]), None,
                                {"n": 1, "k": [], "temperature": 1.0, "max_new_tokens": 1, "seed": 0,
                                 "outcome": None, "problems": 1}).to_json()) for s in (0, 4, 8)]
    png = eval_curve(reports, tmp_path / "curve.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


# ----------------------------------------------------------------------------- evaluate() on a tiny model


class InProcessRuntime:
    """The evaluation side of the Runtime without Ray: the real HF engine and the real reward worker."""

    def __init__(self, model_dir, reward_cfg):
        from rlkit.workers.hf_engine import HFEngine
        from rlkit.workers.reward import RewardWorker

        self.engine = HFEngine(str(model_dir), threads=1)
        self.reward = RewardWorker(reward_cfg)

    def greedy(self, prompt_ids, max_new_tokens):
        return [dataclasses.asdict(g) for g in self.engine.greedy(prompt_ids, max_new_tokens)]

    def sample(self, prompt_ids, n, temperature, max_new_tokens, seed):
        from rlkit.types import SamplingConfig

        gens = self.engine.generate(prompt_ids, n, SamplingConfig(temperature=temperature,
                                                                 max_new_tokens=max_new_tokens), seed)
        flat = [dataclasses.asdict(g) for g in gens]
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def score(self, texts, prompts, fields, sources):
        return self.reward.score(texts, prompts, fields, sources)

    def close(self):
        self.reward.close()
        self.engine.close()


def test_evaluate_on_a_tiny_model_matches_an_independent_recount(tiny_llama_dir, smollm2_tokenizer):
    from rlkit.rewards import RewardConfig

    from rlkit.config import EvalConfig
    from rlkit.data import DataSpec, load_prompts
    from rlkit.evaluate import evaluate

    _, rows = load_prompts(DataSpec(kind="arithmetic", num_train=4, num_eval=6), smollm2_tokenizer)
    rows = [dataclasses.replace(r, data_source="left" if i % 2 else "right") for i, r in enumerate(rows)]
    # even_length (1.0 for an even number of characters) is the outcome: near 50 % for random text.
    rcfg = RewardConfig(rewards=[{"name": "math"}, {"name": f"{TOY}:even_length"}], outcome="even_length")
    rt = InProcessRuntime(tiny_llama_dir, rcfg)
    try:
        cfg = EvalConfig(n=4, k=[1, 2, 4], temperature=1.0, max_new_tokens=6)
        rep = evaluate(rt, smollm2_tokenizer, rows, cfg, "even_length", seed=7)
        again = evaluate(rt, smollm2_tokenizer, rows, cfg, "even_length", seed=7)
        ids = [smollm2_tokenizer(r.prompt_text, add_special_tokens=False)["input_ids"] for r in rows]
        samples = rt.sample(ids, 4, 1.0, 6, 7)
    finally:
        rt.close()
    assert isinstance(rep, EvalReport)
    # greedy accuracy recounted from the generations with the reward's own definition
    texts = smollm2_tokenizer.batch_decode([g["completion_ids"] for g in rep.greedy], skip_special_tokens=True)
    expected = [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]
    assert rep.correct == expected
    assert rep.metrics["eval/accuracy"] == sum(expected) / len(expected)
    lengths = [len(g["completion_ids"]) for g in rep.greedy]
    assert rep.metrics["eval/length_mean"] == sum(lengths) / len(lengths)
    assert rep.metrics["eval/truncated_frac"] == sum(g["finish_reason"] == "length" for g in rep.greedy) / 6
    # the n samples: same seed, same draws; mean@4 and pass@k recounted from them
    c_P = [sum(len(t) % 2 == 0 for t in smollm2_tokenizer.batch_decode(
        [g["completion_ids"] for g in gens], skip_special_tokens=True)) for gens in samples]
    assert [p["sample_correct"] for p in rep.problems] == [
        [1.0 if len(t) % 2 == 0 else 0.0 for t in smollm2_tokenizer.batch_decode(
            [g["completion_ids"] for g in gens], skip_special_tokens=True)] for gens in samples]
    assert rep.metrics["eval/mean@4"] == pytest.approx(sum(c_P) / 24)
    assert rep.metrics["eval/pass@1"] == pytest.approx(rep.metrics["eval/mean@4"])
    assert rep.metrics["eval/pass@4"] == pytest.approx(sum(c > 0 for c in c_P) / 6)
    assert rep.metrics["eval/pass@2"] == pytest.approx(np.mean([pass_at_k(4, c, 2) for c in c_P]))
    assert {"eval/maj@1", "eval/maj@2", "eval/maj@4", "eval/left/accuracy", "eval/right/pass@4"} <= set(rep.metrics)
    assert again.metrics == rep.metrics  # deterministic given the seed
    assert [r["source"] for r in rep.table] == ["right", "left", "all"]


def test_sample_ks():
    assert sample_ks(1, []) == [] and sample_ks(8, []) == [8] and sample_ks(8, [4, 1, 4]) == [1, 4]


# ----------------------------------------------------------------------------- rlkit eval end to end

_RUNTIME_EVAL_ONLY = "learners" in inspect.signature(__import__("rlkit.runtime", fromlist=["Runtime"]).Runtime).parameters
needs_eval_runtime = pytest.mark.skipif(
    not _RUNTIME_EVAL_ONLY, reason="needs Runtime(cfg, model_dir, learners=False) (rlkit/runtime.py)")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
            "HF_HUB_OFFLINE": "1"}


def _rlkit(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlkit", *args], env=_env(), capture_output=True, text=True, check=False,
                          timeout=timeout)


@needs_eval_runtime
@pytest.mark.slow
def test_rlkit_eval_of_a_model_folder_with_samples(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    proc = _rlkit("eval", str(tiny_llama_dir), "arithmetic", "data.num_eval=4", "eval.n=2", "eval.k=[1,2]",
                  "eval.max_new_tokens=4", "rollout.threads=1", f"rewards.rewards=[{{name: '{TOY}:even_length'}}]",
                  "rewards.outcome=even_length", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "eval.json").read_text())
    assert rep["settings"]["problems"] == 4 and rep["settings"]["k"] == [1, 2]
    assert {"eval/accuracy", "eval/mean@2", "eval/pass@2", "eval/maj@2"} <= set(rep["metrics"])
    assert "greedy accuracy" in proc.stdout


@needs_eval_runtime
@pytest.mark.slow
def test_eval_of_a_checkpoint_reproduces_the_logged_greedy_accuracy(tmp_path, tiny_llama_dir):
    """Train a tiny run that evaluates at the end, then ``rlkit eval`` its final checkpoint and its
    whole run directory: the greedy accuracy, length and truncation match the logged values exactly.

    Run after the trainer calls rlkit.evaluate.evaluate (issue 17)."""
    run = tmp_path / "run"
    reward = f"rewards.rewards=[{{name: '{TOY}:even_length'}}]"
    proc = _rlkit("train", str(Path(__file__).parent / "data" / "tiny_run.yaml"), f"run_dir={run}",
                  f"model.path={tiny_llama_dir}", reward, "rewards.outcome=even_length", "train.steps=2",
                  "eval.num_problems=8", "eval.at_start=false", "eval.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from rlkit.metrics import read_metrics

    logged = [r for r in read_metrics(run) if "eval/accuracy" in r][-1]
    assert logged["step"] == 2
    proc = _rlkit("eval", str(run / "checkpoints" / "step_0000002" / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((run / "eval-cli" / "step_0000002.json").read_text())
    for key in ("eval/accuracy", "eval/length_mean", "eval/truncated_frac"):
        assert rep["metrics"][key] == logged[key], key
    # The whole run: the base model (step 0) and every kept checkpoint, as a curve.
    proc = _rlkit("eval", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((run / "eval-cli" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2]
    assert curve["points"][-1]["report"]["metrics"]["eval/accuracy"] == logged["eval/accuracy"]
    assert (run / "eval-cli" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not math.isnan(curve["points"][0]["report"]["metrics"]["eval/accuracy"])

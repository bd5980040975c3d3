"""Evaluation of a policy on held-out problems: greedy accuracy and, with ``n`` samples per problem,
mean@n, pass@k and maj@k, per data source and overall, each with a 95 % interval.

One code path for the trainer's periodic evaluation and ``rlkit eval`` (docs/eval.md): the same
engines generate, the same reward worker and verifier score. A completion is *correct* when the
run's outcome component (``rewards.outcome``, the ``math`` verifier by default) scores exactly
1.0, or the weighted total score does when there is no outcome component.

* **accuracy**: one greedy completion per problem, the fraction correct (``eval/accuracy``).
* **mean@n**: n samples at ``eval.temperature``; the mean over problems of c/n, c = correct samples.
* **pass@k**: the unbiased estimator 1 − C(n−c, k)/C(n, k) of Chen et al. 2021 (arXiv:2107.03374,
  Eq. 1), averaged over problems: the probability that at least one of k fresh samples is correct.
* **maj@k**: the probability that the majority answer of k fresh samples is correct. Final answers
  are extracted as the ``math`` reward extracts them (:func:`rlkit.rewards.extract.extract_final_answer`)
  and grouped with math-verify (:func:`rlkit.rewards.math_answer.answers_match`), so ``1/2`` and
  ``0.5`` are one vote; a sample without a final answer does not vote. For k < n the k-subset is
  not "the first k samples": maj@k is the average over all C(n, k) subsets (the same U-statistic
  that makes Chen et al.'s pass@k unbiased; over more than ``MAX_SUBSETS`` subsets, the average over
  that many seeded random subsets), and a tie between answers counts the fraction of the tied
  answers that are correct (a uniformly random tie-break, in expectation). An answer group is
  correct when its first member (the sample the others were matched against) is.
* **95 % intervals** over problems: Wilson's score interval when every per-problem value is 0 or 1
  (greedy accuracy, pass@n; Wilson 1927), otherwise the normal interval mean ± 1.96·s/√P with s
  the standard deviation over the P problems (Miller 2024, "Adding Error Bars to Evals",
  arXiv:2411.00640, Eq. 2), clipped to [0, 1]. Both treat problems as the random unit.

The estimators at the top are pure functions of numbers and arrays. Answer grouping calls
math-verify (sympy), which can hang on adversarial input, so it runs in a
:class:`rlkit.workers.reward_pool.RewardPool` child with a time limit, never in the driver.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Z95 = 1.959963984540054
"""Two-sided 95 % quantile of the standard normal."""
MAX_SUBSETS = 4096
"""maj@k averages over every k-subset up to this many, else over this many seeded random subsets."""
VOTE_TIMEOUT_S = 30.0
"""Time limit of one problem's answer grouping (its n samples) in the voting child process."""


# ----------------------------------------------------------------------------------------------
# Estimators: pure functions of counts and arrays
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k = 1 − C(n−c, k) / C(n, k): the chance that k of the n samples, drawn without
    replacement, include a correct one (Chen et al. 2021, arXiv:2107.03374, Eq. 1).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), the paper's numerically stable form (its Fig. 3),
    which never forms the binomials. n samples per problem, c of them correct, 1 ≤ k ≤ n.

    >>> pass_at_k(4, 1, 2)  # 1 − C(3, 2)/C(4, 2) = 1 − 3/6
    0.5
    >>> pass_at_k(5, 0, 3), pass_at_k(5, 5, 3), pass_at_k(5, 3, 3)  # c = 0, c = n, n − c < k
    (0.0, 1.0, 1.0)
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def k_subsets(n: int, k: int, max_subsets: int = MAX_SUBSETS, seed: int = 0) -> np.ndarray:
    """Index sets of size k from range(n), shape (S, k): all C(n, k) when at most ``max_subsets``,
    else ``max_subsets`` uniformly random ones (seeded)."""
    if math.comb(n, k) <= max_subsets:
        return np.array(list(combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((max_subsets, n)), axis=1)[:, :k]


def maj_at_k(votes_N: np.ndarray, correct_N: np.ndarray, k: int, *, max_subsets: int = MAX_SUBSETS,
             seed: int = 0) -> float:
    """maj@k of one problem: E over k-subsets S of the n samples of [S's majority answer is correct].

    ``votes_N``: each sample's answer group, named by the index of the group's first member
    (−1: no final answer, no vote). ``correct_N``: each sample's verdict (0/1); a group is correct
    when its first member is. A tie between the most-voted groups scores the fraction of them that
    are correct; a subset without any vote scores 0. Shapes: N = n samples.

    >>> maj_at_k(np.array([0, 1, 1]), np.array([1.0, 0.0, 0.0]), 3)  # "4", "5", "5": 5 wins
    0.0
    >>> maj_at_k(np.array([0, 1, -1]), np.array([1.0, 0.0, 0.0]), 3)  # a 1-1 tie: half credit
    0.5
    """
    votes_N = np.asarray(votes_N, dtype=np.int64)
    groups_G = np.unique(votes_N[votes_N >= 0])
    if groups_G.size == 0:
        return 0.0
    group_correct_G = np.asarray(correct_N, dtype=float)[groups_G]
    subsets_S_K = k_subsets(len(votes_N), k, max_subsets, seed)
    counts_S_G = (votes_N[subsets_S_K][:, :, None] == groups_G[None, None, :]).sum(axis=1)
    top_S = counts_S_G.max(axis=1, keepdims=True)
    tied_S_G = (counts_S_G == top_S) & (top_S > 0)
    n_tied_S = tied_S_G.sum(axis=1)
    credit_S = np.where(n_tied_S > 0, (tied_S_G * group_correct_G).sum(axis=1) / np.maximum(n_tied_S, 1), 0.0)
    return float(credit_S.mean())


def wilson_interval(successes: float, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927, J. Am. Stat. Assoc. 22:209).

    (p̂ + z²/2N ± z·√(p̂(1−p̂)/N + z²/4N²)) / (1 + z²/N); stays inside [0, 1] and is not empty at
    p̂ = 0 or 1, unlike the normal interval.

    >>> [round(x, 4) for x in wilson_interval(0, 8)]
    [0.0, 0.3244]
    """
    if total <= 0:
        return (math.nan, math.nan)
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (max(0.0, center - half), min(1.0, center + half))


def interval_95(values_P: Sequence[float]) -> tuple[float | None, float | None]:
    """95 % interval of the mean of per-problem values in [0, 1] (see the module docstring).

    >>> [round(x, 3) for x in interval_95([0.0, 0.5, 1.0, 0.5])]  # 0.5 ± 1.96 · 0.408 / 2
    [0.1, 0.9]
    """
    v_P = np.asarray(values_P, dtype=float)
    if v_P.size == 0:
        return (None, None)
    if np.all((v_P == 0.0) | (v_P == 1.0)):
        return wilson_interval(float(v_P.sum()), int(v_P.size))
    if v_P.size < 2:
        return (None, None)
    half = Z95 * float(v_P.std(ddof=1)) / math.sqrt(v_P.size)
    mean = float(v_P.mean())
    return (max(0.0, mean - half), min(1.0, mean + half))


# ----------------------------------------------------------------------------------------------
# Answer groups for the vote (runs in a reward child process)
# ----------------------------------------------------------------------------------------------


def answer_classes(completions: Sequence[str], *, sample_index: Sequence[int], **unused: Any) -> list[float | None]:
    """For each completion, the ``sample_index`` of the first completion in the call whose final
    answer is math-verify-equivalent to its own (None when it has no final answer).

    Called with one problem's n samples; a reward-function signature so a
    :class:`~rlkit.workers.reward_pool.RewardPool` child can run it under a time limit.

    >>> answer_classes([r"\\boxed{1/2}", r"\\boxed{3}", "the answer is 0.5", "no idea"], sample_index=[0, 1, 2, 3])
    [0.0, 1.0, 0.0, None]
    """
    from rlkit.rewards.extract import extract_final_answer
    from rlkit.rewards.math_answer import answers_match

    firsts: list[tuple[int, Any]] = []
    out: list[float | None] = []
    for text, j in zip(completions, sample_index):
        ext = extract_final_answer(text)
        if ext is None:
            out.append(None)
            continue
        # answers_match parses its first argument as a reference: try both ways round, so a free-text
        # answer ("12 apples") matches a bare one ("12") whichever came first.
        same = next((fj for fj, fe in firsts if answers_match(fe.text, ext) or answers_match(ext.text, fe)), None)
        if same is None:
            firsts.append((int(j), ext))
            same = int(j)
        out.append(float(same))
    return out


def _vote_warmup() -> None:
    from rlkit.rewards.math_answer import warmup

    warmup()


answer_classes.warmup = _vote_warmup  # type: ignore[attr-defined]


def vote_groups(texts_P_N: list[list[str]]) -> np.ndarray:
    """Answer groups of each problem's samples, shape (P, N); −1 where a sample does not vote.

    One call per problem in a time-limited child process; a problem whose call fails is retried
    one sample at a time (each sample then forms its own group), a failed sample does not vote.
    """
    from rlkit.workers.reward_pool import RewardPool, Task

    P, N = len(texts_P_N), len(texts_P_N[0]) if texts_P_N else 0
    votes_P_N = np.full((P, N), -1, dtype=np.int64)
    if P == 0 or N == 0:
        return votes_P_N
    target = f"{__name__}:answer_classes"
    pool = RewardPool([(target, {})], [target], num_procs=1, memory_mb=1024)
    try:
        tasks = [Task(0, [p * N + j for j in range(N)], list(texts), [""] * N, {"sample_index": list(range(N))})
                 for p, texts in enumerate(texts_P_N)]
        failed = 0
        for outcome in pool.run(tasks, VOTE_TIMEOUT_S, max_consecutive_timeouts=4):
            for flat, (status, value, _) in zip(outcome.task.idx, outcome.results):
                if status == "ok" and value is not None:
                    votes_P_N[flat // N, flat % N] = int(value)
                failed += status != "ok"
        if failed:
            logger.warning("maj@k: %d samples could not be grouped (time or memory limit); they do not vote", failed)
    finally:
        pool.close()
    return votes_P_N


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """One evaluation: flat metrics for the logger, a table per data source, per-problem records.

    ``greedy[i]`` / ``correct[i]``: the greedy generation of problem i (``completion_ids``,
    ``finish_reason``) and its verdict (1.0 or 0.0), in row order.
    """

    metrics: dict[str, float]
    table: list[dict[str, Any]]
    """Per data source (when there are several), then ``all``: ``{"source", "problems",
    "metrics": {name: {"value", "ci95": [low, high] or None}}}``."""
    settings: dict[str, Any]
    greedy: list[dict] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (no generations' token ids: those stay in ``greedy``)."""
        return {"settings": self.settings, "metrics": self.metrics, "table": self.table, "problems": self.problems}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return path


def sample_ks(n: int, k: Sequence[int]) -> list[int]:
    """The k of pass@k / maj@k: ``eval.k``, or [n] when it is empty and n > 1 (then no sampling if [])."""
    return sorted(set(k)) if k else ([n] if n > 1 else [])


def evaluate(runtime: Any, tokenizer: Any, rows: Sequence[Any], eval_cfg: Any, outcome: str | None,
             seed: int = 0, answer_fallback: str = "none", strict_gap: float = 0.05) -> EvalReport:
    """Evaluate the runtime's current policy on ``rows`` (:class:`rlkit.data.PromptRow`, all of them).

    ``runtime``: :class:`rlkit.runtime.Runtime` (``greedy``, ``sample``, ``score``); ``eval_cfg``:
    :class:`rlkit.config.EvalConfig` (``n``, ``k``, ``temperature``, ``max_new_tokens``);
    ``outcome``: the reward component that decides correctness (None: the total score). ``seed``
    fixes the n samples, so evaluations at different steps draw with the same seeds.
    ``answer_fallback`` is the verifier's final-answer fallback, used by the strict score
    (:func:`strict_scores`); a verifier accuracy above the strict one by more than ``strict_gap`` is
    flagged (``eval/strict_flag``).
    """
    rows = list(rows)
    prompt_ids = [tokenizer(r.prompt_text, add_special_tokens=False)["input_ids"] for r in rows]
    greedy = runtime.greedy(prompt_ids, eval_cfg.max_new_tokens)
    greedy_texts = tokenizer.batch_decode([g["completion_ids"] for g in greedy], skip_special_tokens=True)
    correct = _judge(runtime, rows, [[g] for g in greedy], [[t] for t in greedy_texts], outcome)[:, 0]
    ks = sample_ks(eval_cfg.n, eval_cfg.k)
    sampled = None
    if ks:
        n = eval_cfg.n
        gens_P_N = runtime.sample(prompt_ids, n, eval_cfg.temperature, eval_cfg.max_new_tokens, seed)
        texts_P_N = [tokenizer.batch_decode([g["completion_ids"] for g in gens], skip_special_tokens=True)
                     for gens in gens_P_N]
        sampled = (_judge(runtime, rows, gens_P_N, texts_P_N, outcome), vote_groups(texts_P_N))
    settings = {"n": eval_cfg.n, "k": ks, "temperature": eval_cfg.temperature,
                "max_new_tokens": eval_cfg.max_new_tokens, "seed": seed, "outcome": outcome,
                "problems": len(rows), "max_subsets": MAX_SUBSETS, "answer_fallback": answer_fallback,
                "strict_gap": strict_gap}
    return build_report(rows, greedy, greedy_texts, correct, sampled, settings)


def strict_scores(rows: Sequence[Any], texts: Sequence[str], fallback: str = "none") -> np.ndarray:
    """The strict score of each problem's greedy answer (:func:`rlkit.rewards.strict.strict_correct`:
    the final answer as a literal number, no math-verify): 1.0, 0.0, or NaN where the reference is
    not a literal number."""
    from rlkit.rewards.strict import strict_correct

    out = [strict_correct(t, r.answer, fallback) if r.answer is not None else None for r, t in zip(rows, texts)]
    return np.array([math.nan if v is None else float(v) for v in out], dtype=float)


def strict_flag_line(metrics: dict[str, float], gap_limit: float) -> str:
    """One line when the verifier's accuracy exceeds the strict score's by more than ``gap_limit``, else "".

    >>> strict_flag_line({"eval/strict_gap": 0.4, "eval/strict_flag": 1.0}, 0.05)
    'verifier accuracy exceeds the strict (literal) score by 40.0 points (limit 5.0): its rewarded answers may not be values; read eval/step_*.json'
    """
    gap = metrics.get("eval/strict_gap")
    if gap is None or not gap > gap_limit:
        return ""
    return (f"verifier accuracy exceeds the strict (literal) score by {100 * gap:.1f} points (limit "
            f"{100 * gap_limit:.1f}): its rewarded answers may not be values; read eval/step_*.json")


def _strict_metrics(correct_P: np.ndarray, strict_P: np.ndarray, gap_limit: float) -> dict[str, float]:
    """``eval/strict_gap``: verifier minus strict accuracy on the strictly scorable problems;
    ``eval/strict_flag``: 1.0 when that gap exceeds ``gap_limit``."""
    scorable = ~np.isnan(strict_P)
    if not scorable.any():
        return {}
    gap = float(np.asarray(correct_P, dtype=float)[scorable].mean() - strict_P[scorable].mean())
    return {"eval/strict_gap": gap, "eval/strict_flag": float(gap > gap_limit),
            "eval/strict_scorable": float(scorable.mean())}


def _judge(runtime: Any, rows: Sequence[Any], gens_P_N: list[list[dict]], texts_P_N: list[list[str]],
           outcome: str | None) -> np.ndarray:
    """Verdicts (P, N): 1.0 where the outcome component (or the total score) is exactly 1.0."""
    fields, prompts, sources = [], [], []
    for p, (row, gens) in enumerate(zip(rows, gens_P_N)):
        for g in gens:
            ids = list(g["completion_ids"])
            # The columns the trainer passes when it scores rollouts, so every reward sees the same data.
            fields.append({**row.fields, "answer": row.answer, "completion_len": len(ids),
                           "completion_ids": ids, "group_id": p})
            prompts.append(row.prompt_text)
            sources.append(row.data_source)
    texts = [t for ts in texts_P_N for t in ts]
    res = runtime.score(texts, prompts, fields, sources)
    from rlkit.groups import outcome_values  # the trainer's definition of the verified outcome

    values = outcome_values(res.components, res.scores, outcome)
    verdicts = np.array([1.0 if v == 1.0 else 0.0 for v in values], dtype=float)
    return verdicts.reshape(len(rows), -1) if rows else verdicts.reshape(0, 1)


def build_report(rows: Sequence[Any], greedy: list[dict], greedy_texts: list[str], correct_P: np.ndarray,
                 sampled: tuple[np.ndarray, np.ndarray] | None, settings: dict[str, Any]) -> EvalReport:
    """Per-problem values, then the table and flat metrics per data source and overall."""
    ks, n = settings["k"], settings["n"]
    lengths = [len(g["completion_ids"]) for g in greedy]
    strict_P = strict_scores(rows, greedy_texts, settings.get("answer_fallback", "none"))
    from rlkit.rewards.answer_form import answer_form
    from rlkit.rewards.extract import extract_final_answer

    finals = [extract_final_answer(t, fallback=settings.get("answer_fallback", "none")) for t in greedy_texts]
    per_problem: dict[str, np.ndarray] = {
        "accuracy": np.asarray(correct_P, dtype=float),
        "strict_accuracy": strict_P,
        "length_mean": np.asarray(lengths, dtype=float),
        "truncated_frac": np.array([g["finish_reason"] == "length" for g in greedy], dtype=float),
    }
    problems = [{"index": r.index, "data_source": r.data_source, "answer": r.answer,
                 "greedy_correct": float(correct_P[i]), "greedy_length": lengths[i],
                 "greedy_finish": greedy[i]["finish_reason"], "greedy_text": greedy_texts[i],
                 "strict_correct": None if math.isnan(strict_P[i]) else float(strict_P[i]),
                 "final_answer": None if finals[i] is None else finals[i].text,
                 "answer_form": None if finals[i] is None else answer_form(finals[i].text)}
                for i, r in enumerate(rows)]
    if sampled is not None:
        correct_P_N, votes_P_N = sampled
        c_P = correct_P_N.sum(axis=1)
        per_problem[f"mean@{n}"] = c_P / n
        for k in ks:
            per_problem[f"pass@{k}"] = np.array([pass_at_k(n, int(c), k) for c in c_P])
            per_problem[f"maj@{k}"] = np.array([maj_at_k(v, c, k, seed=settings["seed"])
                                                for v, c in zip(votes_P_N, correct_P_N)])
        for i, rec in enumerate(problems):
            rec["sample_correct"] = correct_P_N[i].tolist()
            rec["votes"] = votes_P_N[i].tolist()
    sources = list(dict.fromkeys(r.data_source for r in rows))
    groups = [(s, [i for i, r in enumerate(rows) if r.data_source == s]) for s in sources] if len(sources) > 1 else []
    groups.append(("all", list(range(len(rows)))))
    table = [_table_row(name, idx, per_problem) for name, idx in groups]
    metrics: dict[str, float] = {}
    for row in table:
        prefix = "eval/" if row["source"] == "all" else f"eval/{row['source']}/"
        metrics.update({prefix + name: cell["value"] for name, cell in row["metrics"].items()})
    metrics.update(_strict_metrics(correct_P, strict_P, settings.get("strict_gap", 0.05)))
    forms = [p["answer_form"] for p in problems]
    metrics["eval/unevaluated_frac"] = sum(f == "unevaluated" for f in forms) / max(1, len(forms))
    settings = {**settings, "sources": sources}
    return EvalReport(metrics, table, settings, list(greedy), [float(x) for x in correct_P], problems)


_NO_INTERVAL = ("length_mean", "truncated_frac")


def _table_row(source: str, idx: list[int], per_problem: dict[str, np.ndarray]) -> dict[str, Any]:
    cells = {}
    for name, values_P in per_problem.items():
        v = values_P[idx]
        v = v[~np.isnan(v)]  # the strict score leaves problems without a literal reference unscored
        value = float(v.mean()) if v.size else math.nan
        ci = None if name in _NO_INTERVAL else interval_95(v)
        cells[name] = {"value": value, "ci95": None if ci is None or ci[0] is None else [ci[0], ci[1]]}
    return {"source": source, "problems": len(idx), "metrics": cells}


# ----------------------------------------------------------------------------------------------
# Display
# ----------------------------------------------------------------------------------------------


def _cell(cell: dict[str, Any], name: str) -> str:
    v = cell["value"]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if name == "length_mean":
        return f"{v:.1f}"
    text = f"{100 * v:.1f}%"
    if cell.get("ci95"):
        lo, hi = cell["ci95"]
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return text


def rich_table(report: dict[str, Any], title: str | None = None) -> Any:
    """A :class:`rich.table.Table` of a report's JSON (``EvalReport.to_json()``)."""
    from rich.table import Table

    rows = report["table"]
    names = list(rows[0]["metrics"]) if rows else []
    s = report.get("settings", {})
    caption = "95 % intervals in brackets (Wilson for 0/1 per-problem values, else normal over problems)"
    if s.get("k"):
        caption = f"n = {s['n']} samples at temperature {s['temperature']}; " + caption
    table = Table(title=title, caption=caption)
    table.add_column("source")
    table.add_column("problems", justify="right")
    for name in names:
        label = {"accuracy": "greedy accuracy", "strict_accuracy": "strict (literal)"}.get(name, name)
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(row["source"], str(row["problems"]), *(_cell(row["metrics"][m], m) for m in names))
    return table


def table_text(report: dict[str, Any], title: str | None = None, width: int = 220) -> str:
    """The table as plain text (no colour codes), for summary.txt and logs."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(rich_table(report, title))
    return buf.getvalue()

"""The reward worker with real child processes: faults get the right status, nothing is silent.

Fault rewards live in tests/data/fault_rewards.py; each misbehaves only on the samples whose
field names it, so one batch of 100 samples exercises every fault next to healthy samples.
"""

import os
import time

import pytest

from rlkit.rewards import RewardConfig, RewardSignatureError
from rlkit.workers.reward import RewardError, RewardWorker

FAULTS = os.path.join(os.path.dirname(__file__), "data", "fault_rewards.py")
N = 100
# fault function -> status it must produce; fault k hits samples i with i % 20 == k (5 of 100)
EXPECTED = {
    "raises": "error",
    "hangs": "timeout",
    "returns_nan": "invalid",
    "returns_inf": "invalid",
    "returns_string": "invalid",
    "wrong_length": "invalid",
    "aborts": "error",
    "allocates": "error",
}
FAULT_W = 0.1


def _fault_rows():
    rows = []
    for i in range(N):
        row = {"answer": str(i)}
        row.update({f"f_{name}": i % 20 == k for k, name in enumerate(EXPECTED)})
        rows.append(row)
    return rows


def _math_completion(i):
    return f"so the result is \\boxed{{{i if i % 3 else i + 1}}}"  # every third answer is wrong


@pytest.fixture(scope="module")
def fault_worker():
    specs = [{"name": "math"}]
    specs += [{"name": f"{FAULTS}:{f}", "weight": FAULT_W, "kwargs": {"key": f"f_{f}"}} for f in EXPECTED]
    w = RewardWorker(RewardConfig(rewards=specs, timeout_s=2.0, memory_mb=128, num_procs=2, batch_size=64))
    yield w
    w.close()


def test_every_fault_counted_with_its_status(fault_worker):
    rows = _fault_rows()
    res = fault_worker.score([_math_completion(i) for i in range(N)], ["p"] * N, rows)
    for k, (name, status) in enumerate(EXPECTED.items()):
        sts = res.status_by_component[name]
        bad = {i: s for i, s in enumerate(sts) if s != "ok"}
        assert bad == {i: status for i in range(k, N, 20)}, (name, bad)
        # healthy samples keep their value; faulty ones carry none
        assert all(res.components[name][i] == (None if i in bad else 1.0) for i in range(N))
        assert res.metrics[f"{name}/{status}_rate"] == pytest.approx(0.05)
        # the first messages (samples 0..7 fail one fault each) name the reward and the status
        assert any(f"[{name}] {status}: " in e and f"fault_rewards.py:{name}" in e for e in res.errors), res.errors
    # the math component never failed and kept its verdicts
    assert set(res.status_by_component["math"]) == {"ok"}
    assert res.components["math"] == [0.0 if i % 3 == 0 else 1.0 for i in range(N)]
    # overall status and score: fault samples are non-ok with score 0 ("zero"); the rest are intact
    faulty = {i for i in range(N) if i % 20 < len(EXPECTED)}
    for i in range(N):
        if i in faulty:
            assert res.status[i] == EXPECTED[list(EXPECTED)[i % 20]] and res.scores[i] == 0.0
        else:
            expected = (0.0 if i % 3 == 0 else 1.0) + FAULT_W * len(EXPECTED)
            assert res.status[i] == "ok" and res.scores[i] == pytest.approx(expected)
    assert res.metrics["status/error_rate"] == pytest.approx(0.15)
    assert res.metrics["status/invalid_rate"] == pytest.approx(0.20)
    assert res.metrics["status/timeout_rate"] == pytest.approx(0.05)
    assert res.metrics["respawns"] >= 15  # every hang, abort and out-of-memory child was replaced
    assert res.metrics["retried_samples"] >= 8 * 50  # each faulty component's batches were split
    stats = fault_worker.stats()
    assert stats["hangs/timeout"] == 5 and stats["aborts/error"] == 5 and stats["not_ok"] == 40


def test_worker_still_answers_after_faults(fault_worker):
    rows = [{**r, **{k: False for k in r if k.startswith("f_")}} for r in _fault_rows()]
    t0 = time.monotonic()
    res = fault_worker.score([_math_completion(i) for i in range(N)], ["p"] * N, rows)
    assert set(res.status) == {"ok"}
    assert res.metrics["respawns"] == 0 and res.metrics["retried_samples"] == 0
    assert time.monotonic() - t0 < 30  # no batch hit the 2 s limit, so no per-sample retries


# ----------------------------------------------------------------------------- policies


@pytest.fixture(scope="module")
def policy_worker():
    specs = [{"name": "math"}, {"name": f"{FAULTS}:raises", "weight": 0.0}]
    w = RewardWorker(RewardConfig(rewards=specs, timeout_s=5.0, num_procs=2))
    yield w
    w.close()


def _policy_batch():
    # 4 groups of 4 samples (one prompt each); sample 5 (group 1) fails
    completions = [r"\boxed{7}"] * 16
    prompts = [f"prompt {i // 4}" for i in range(16)]
    fields = [{"answer": "7", "fault": i == 5} for i in range(16)]
    return completions, prompts, fields


def test_policy_zero(policy_worker):
    policy_worker.cfg.on_error = "zero"  # the policy is read per call
    res = policy_worker.score(*_policy_batch())
    assert res.status[5] == "error" and res.scores[5] == 0.0
    assert [s for i, s in enumerate(res.scores) if i != 5] == [1.0] * 15
    assert all(res.keep)


def test_policy_drop_group(policy_worker):
    policy_worker.cfg.on_error = "drop_group"
    res = policy_worker.score(*_policy_batch())
    assert res.keep == [i // 4 != 1 for i in range(16)]
    assert res.metrics["dropped_rate"] == pytest.approx(4 / 16)
    # group ids from the data override the prompt text
    comps, prompts, fields = _policy_batch()
    fields = [{**f, "group_id": i // 8} for i, f in enumerate(fields)]
    res = policy_worker.score(comps, prompts, fields)
    assert res.keep == [i >= 8 for i in range(16)]


def test_policy_stop(policy_worker):
    policy_worker.cfg.on_error = "stop"
    with pytest.raises(RewardError, match=r"1/16 samples not ok \(raises/error=1\).*ZeroDivisionError"):
        policy_worker.score(*_policy_batch())
    policy_worker.cfg.on_error = "zero"


# ----------------------------------------------------------------------------- contract


def test_async_none_and_per_source_metrics():
    specs = [
        {"name": f"{FAULTS}:async_length", "weight": 0.5},
        {"name": f"{FAULTS}:only_source_a"},
        {"name": f"{FAULTS}:named_fields_only", "weight": 2.0},
    ]
    w = RewardWorker(RewardConfig(rewards=specs, num_procs=2, hist_range=(0.0, 10.0), hist_bins=5))
    try:
        comps = ["ab", "abcd", "x", "yy"]
        sources = ["a", "b", "a", "b"]
        fields = [{"answer": a, "data_source": s} for a, s in zip(["ab", "no", "x", "no"], sources)]
        res = w.score(comps, ["p"] * 4, fields, data_sources=sources)
    finally:
        w.close()
    assert res.components["async_length"] == [2.0, 4.0, 1.0, 2.0]
    assert res.components["only_source_a"] == [1.0, None, 1.0, None]
    assert res.components["named_fields_only"] == [1.0, 0.0, 1.0, 0.0]
    assert res.status == ["ok"] * 4
    # Σ w·r over the components that scored: None is skipped, not counted as 0
    assert res.scores == pytest.approx([0.5 * 2 + 1 + 2, 0.5 * 4 + 0, 0.5 * 1 + 1 + 2, 0.5 * 2 + 0])
    m = res.metrics
    assert m["only_source_a/none_rate"] == 0.5
    assert m["only_source_a/a/none_rate"] == 0.0 and m["only_source_a/b/none_rate"] == 1.0
    assert m["named_fields_only/a/mean"] == 1.0 and m["named_fields_only/b/mean"] == 0.0
    # histogram of async_length over [0, 10] in 5 bins: values 2, 4, 1, 2 -> bins 1, 2, 0, 1
    assert [m[f"async_length/hist/{k:02d}"] for k in range(5)] == [0.25, 0.5, 0.25, 0.0, 0.0]


def test_unscored_sample_is_invalid_and_missing_field_is_error():
    w = RewardWorker(RewardConfig(rewards=[{"name": f"{FAULTS}:only_source_a"}], num_procs=1))
    try:
        res = w.score(["x", "y"], ["p", "p"], [{}, {}], data_sources=["a", "b"])
    finally:
        w.close()
    assert res.status == ["ok", "invalid"] and res.scores == [1.0, 0.0]
    assert any("no reward component scored" in e for e in res.errors)

    w = RewardWorker(RewardConfig(rewards=[{"name": f"{FAULTS}:named_fields_only"}], num_procs=1))
    try:
        res = w.score(["x", "y"], ["p", "p"], [{"other": 1}, {"other": 2}])
    finally:
        w.close()
    assert res.status == ["error", "error"]
    assert "named_fields_only" in res.errors[0] and "needs field(s) ['answer']" in res.errors[0]


def test_bad_signature_fails_at_construction():
    with pytest.raises(RewardSignatureError, match="no_completions"):
        RewardWorker(RewardConfig(rewards=[{"name": f"{FAULTS}:no_completions"}]))


# ----------------------------------------------------------------------------- TRL convention

TOY = os.path.join(os.path.dirname(__file__), "toy_rewards.py")


def _score_with(names, comps, prompts, fields):
    specs = [{"name": "math"}] + [{"name": f"{TOY}:{n}"} for n in names]
    w = RewardWorker(RewardConfig(rewards=specs, num_procs=2, batch_size=2))
    try:
        return w.score(comps, prompts, fields)
    finally:
        w.close()


def test_trl_documented_signatures_run_unchanged_in_the_worker():
    """TRL's documented reward signatures (bodies in tests/toy_rewards.py) next to rlkit's built-in
    ``math``: every sample ok, each value as TRL would compute it."""
    names = ["trl_accuracy_reward", "trl_async_answer_reward", "trl_unique_chars", "trl_token_count",
             "trl_task_reward", "trl_prompt_echo"]
    comps = [r"so \boxed{4}", r"\boxed{5}", "4"]
    fields = [{"answer": "4", "solution": "4", "task": t, "completion_ids": ids}
              for t, ids in (("count", [5, 6, 7]), ("other", [5]), ("count", []))]
    res = _score_with(names, comps, ["Add 4", "Add 4", "Say 5"], fields)
    assert res.status == ["ok"] * 3, res.errors
    c = res.components
    assert c["math"] == [1.0, 0.0, 0.0]
    assert c["trl_accuracy_reward"] == [1.0, 0.0, 0.0]
    assert c["trl_async_answer_reward"] == [1.0, 0.0, 1.0]
    assert c["trl_unique_chars"] == [float(len(set(x))) for x in comps]
    assert c["trl_token_count"] == [3.0, 1.0, 0.0]
    assert c["trl_task_reward"] == [float(len(comps[0])), None, 1.0]
    assert c["trl_prompt_echo"] == [1.0, 0.0, 0.0]  # TRL passes prompts= too


def test_trl_conversational_rows_get_message_completions_in_the_worker():
    """A row whose ``prompt`` column is a list of messages is conversational, as in TRL: user rewards
    receive ``[{"role": "assistant", "content": text}]`` and the messages as the prompt; the built-in
    ``math`` still receives text."""
    chat = [{"role": "user", "content": "Add 2 and 2, answer in <answer> tags"}]
    comps = ["<think>2+2</think><answer>4</answer>", r"<answer>4</answer> \boxed{4}"]
    fields = [{"answer": "4", "prompt": chat}] * 2
    res = _score_with(["trl_format_reward", "trl_prompt_echo", "trl_async_answer_reward"], comps,
                      ["rendered"] * 2, fields)
    assert res.status == ["ok"] * 2, res.errors
    c = res.components
    assert c["math"] == [0.0, 1.0]
    assert c["trl_format_reward"] == [1.0, 0.0]
    assert c["trl_prompt_echo"] == [0.0, 0.0]  # the last word of the messages, "tags", is not in the text
    # a plain-text reward meets message lists on conversational rows, exactly as under TRL
    assert c["trl_async_answer_reward"] == [0.0, 0.0]


def test_trl_shipped_reward_functions_run_in_the_worker(tmp_path):
    """``trl.rewards`` as shipped: referenced as a module, or built by its factories in a user file."""
    made = tmp_path / "my_trl_rewards.py"
    made.write_text(
        "from trl.rewards import get_cosine_scaled_reward, get_repetition_penalty_reward, "
        "get_soft_overlong_punishment\n"
        "overlong = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)\n"
        "repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)\n"
        "cosine = get_cosine_scaled_reward(max_len=8)\n")
    specs = [{"name": "trl.rewards:accuracy_reward"}, {"name": "trl.rewards:think_format_reward"},
             {"name": "trl.rewards:reasoning_accuracy_reward"},
             {"name": f"{made}:overlong"}, {"name": f"{made}:repetition"}, {"name": f"{made}:cosine"}]
    w = RewardWorker(RewardConfig(rewards=specs, num_procs=1, timeout_s=60))
    chat = [{"role": "user", "content": "What is 1/3 of 1?"}]
    comps = [r"<think>one third</think> The answer is $\boxed{\frac{1}{3}}$",
             r"<think>hmm</think> \boxed{\frac{1}{2}}", r"no think \boxed{\frac{1}{3}}"]
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5, 5], [1] * 10]
    fields = [{"prompt": chat, "solution": r"\frac{1}{3}", "completion_ids": i} for i in ids]
    try:
        res = w.score(comps, ["rendered"] * 3, fields)
    finally:
        w.close()
    assert res.status == ["ok"] * 3, res.errors
    c = res.components
    assert c["accuracy_reward"] == [1.0, 0.0, 1.0]
    assert c["think_format_reward"] == [1.0, 1.0, 0.0]
    assert c["reasoning_accuracy_reward"] == [1.0, 0.0, 0.0]
    # DAPO soft overlong (L_max 8, cache 4): 4 tokens -> 0, 6 -> (4 - 6) / 4, 10 -> -1
    assert c["overlong"] == [0.0, -0.5, -1.0]
    # repeated 2-grams: [5]*6 has 5 bigrams, 1 unique -> (1 - 1/5) * -1; [1]*10 -> (1 - 1/9) * -1
    assert c["repetition"] == pytest.approx([0.0, -0.8, -8 / 9])
    # cosine-scaled correctness (max_len 8): correct at 4 tokens -> 0.5 + 0.25·(1 + cos(π/2)) = 0.75
    assert c["cosine"][0] == pytest.approx(0.75)


def test_always_hanging_reward_gives_up_after_a_streak():
    """A reward that hangs on every sample costs ~max_consecutive_timeouts × timeout_s, not B × timeout_s."""
    spec = {"name": f"{FAULTS}:hangs"}
    w = RewardWorker(RewardConfig(rewards=[spec], timeout_s=1.0, num_procs=2, max_consecutive_timeouts=2))
    try:
        t0 = time.monotonic()
        res = w.score(["x"] * 40, ["p"] * 40, [{"fault": True}] * 40)
        elapsed = time.monotonic() - t0
    finally:
        w.close()
    assert res.status == ["timeout"] * 40
    assert any("not run" in e for e in res.errors)
    assert elapsed < 15, elapsed


def test_custom_reward_example_config():
    """configs/custom_reward_example.yaml validates and its rewards run in the worker."""
    from rlkit.config import build_reward_config, load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)  # the example references configs/my_reward.py relative to the repository
    try:
        cfg = build_reward_config(load_config("configs/custom_reward_example.yaml"))
    finally:
        os.chdir(cwd)
    w = RewardWorker(cfg)
    try:
        comps = [r"3 + 4 = 7, so \boxed{7}", r"\boxed{8}" + " padding" * 200]
        res = w.score(comps, ["What is 3 + 4?"] * 2, [{"answer": "7"}, {"answer": "7"}])
    finally:
        w.close()
    assert res.components == {"math": [1.0, 0.0], "brevity": [1.0, pytest.approx(0.0)], "shows_work": [1.0, 0.0]}
    assert res.scores == pytest.approx([1.2, 0.0])
    assert res.status == ["ok", "ok"]

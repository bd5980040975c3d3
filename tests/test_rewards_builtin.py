"""Built-in rewards, the registry and the reward config, in-process (no worker)."""

import doctest
import importlib
import math
import os

import pytest

from rlkit.rewards import BUILTINS, RewardConfig, RewardSignatureError, RewardSpec, check_output, resolve
from rlkit.rewards.extract import answer_is, extract_final_answer, gsm8k_hash, last_boxed, last_number
from rlkit.rewards.format import format_boxed, format_tags
from rlkit.rewards.length import length, overlong
from rlkit.rewards.math_answer import math_answer

FAULTS = os.path.join(os.path.dirname(__file__), "data", "fault_rewards.py")


@pytest.mark.parametrize("mod", ["extract", "math_answer", "format", "length", "registry"])
def test_doctests(mod):
    res = doctest.testmod(importlib.import_module(f"rlkit.rewards.{mod}"))
    assert res.attempted > 0 and res.failed == 0


def test_example_reward_file_doctests():
    from rlkit.rewards.registry import load_target

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fn = load_target(os.path.join(root, "configs", "my_reward.py") + ":brevity")
    res = doctest.testmod(importlib.import_module(fn.__module__))
    assert res.attempted >= 2 and res.failed == 0


# ----------------------------------------------------------------------------- extraction


def test_last_boxed_nested_and_escaped_braces():
    assert last_boxed(r"x \boxed{\frac{1}{\sqrt{2}}} y") == r"\frac{1}{\sqrt{2}}"
    # \{ \} are literal set braces, not grouping: the box ends at the last unescaped }
    assert last_boxed(r"\boxed{\{1, \{2\}\}}") == r"\{1, \{2\}\}"
    assert last_boxed(r"\boxed{1} and later \fbox{2}") == "2"
    assert last_boxed(r"\boxed{3} then \boxed{4") == "3"  # an unclosed last box falls back to the previous
    assert last_boxed(r"\boxedfoo{3}") is None
    assert last_boxed("no box") is None


def test_extractors():
    assert gsm8k_hash("a\n#### 1,234\n") == "1,234"
    assert gsm8k_hash("####5") == "5"
    assert answer_is("The answer is 3.5. Done") == "3.5"
    assert answer_is("the answer is 2 and the answer is 7.") == "7"
    assert last_number("x 1.5 then 2,000,000 and 3/4") == "3/4"
    assert last_number("-7 degrees") == "-7"


def test_extraction_priority():
    text = r"The answer is 4. \boxed{5}" + "\n#### 6"
    assert extract_final_answer(text).text == "5"  # boxed beats #### beats "answer is"
    assert extract_final_answer("The answer is 4.\n#### 6").text == "6"
    assert extract_final_answer("just 9") is None
    assert extract_final_answer("just 9", fallback="last_number").text == "9"
    with pytest.raises(ValueError, match="fallback"):
        extract_final_answer("just 9", fallback="first_number")


# ----------------------------------------------------------------------------- math reward


def test_math_answer_scores():
    completions = [r"\boxed{\frac{1}{2}}", "#### 0.5", "the answer is 1/3.", "I give up", r"\boxed{50\%}"]
    assert math_answer(completions, answer=["0.5"] * 4 + ["50"]) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_math_answer_numeric_tolerance_only_for_non_integers():
    # 2.4999999 vs 2.5: rel. diff 4e-8 < rel_tol; 123456 vs 123457 (8e-6) stay different: integers are exact
    assert math_answer([r"\boxed{2.4999999}"], answer=["2.5"]) == [1.0]
    assert math_answer([r"\boxed{123457}"], answer=["123456"], rel_tol=1e-3) == [0.0]
    assert math_answer([r"\boxed{2.49}"], answer=["2.5"]) == [0.0]
    assert math_answer([r"\boxed{2.49}"], answer=["2.5"], rel_tol=0.01) == [1.0]


def test_math_answer_fallback_and_reference_required():
    assert math_answer(["so we get 12"], answer=["12"]) == [0.0]
    assert math_answer(["so we get 12"], answer=["12"], fallback="last_number") == [1.0]
    assert math_answer([r"\boxed{12}"], answer=[12]) == [1.0]  # numeric references are fine
    with pytest.raises(ValueError, match="empty reference"):
        math_answer([r"\boxed{1}"], answer=[""])
    with pytest.raises(ValueError, match="2 answers"):
        math_answer([r"\boxed{1}"], answer=["1", "2"])


def test_math_answer_off_main_thread():
    """math-verify's signal-based timeouts raise outside the main thread (verl PR#5635); ours are off."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        got = ex.submit(math_answer, [r"\boxed{\sqrt{8}}", r"\boxed{3}"], None, answer=[r"2\sqrt{2}", "4"]).result()
    assert got == [1.0, 0.0]


# ----------------------------------------------------------------------------- format / length


def test_format_tags():
    good = "<think>reason</think>\n<answer>4</answer>"
    wrong_order, empty = "<answer>4</answer><think>r</think>", "<think></think><answer>4</answer>"
    assert format_tags([good, wrong_order, empty]) == [1.0, 0.0, 0.0]
    assert format_tags([good + "<answer>5</answer>"]) == [0.0]  # a second answer block is a violation
    assert format_tags(["pre " + good], strict=True) == [0.0]
    assert format_tags([good], strict=True) == [1.0]
    assert format_tags(["<sol>x</sol>"], tags=["sol"]) == [1.0]
    with pytest.raises(ValueError):
        format_tags([good], tags=[])


def test_format_boxed():
    assert format_boxed([r"\boxed{1}", r"\boxed{ }", "none", r"\fbox{x}"]) == [1.0, 0.0, 0.0, 1.0]


def test_length_reward():
    assert length(["x"] * 3, max_len=10, completion_len=[5, 10, 20]) == [0.5, 1.0, 1.0]
    with pytest.raises(KeyError, match="completion_len"):
        length(["x"], max_len=10)


def test_overlong_matches_dapo_formula():
    pytest.importorskip("rlkit.algorithms.dapo")
    # L_max = 20, L_cache = 4: 0 up to 16, (16 - L)/4 inside (16, 20], -1 beyond; times p = 0.5
    got = overlong(["x"] * 5, max_len=20, cache_len=4, penalty_factor=0.5, completion_len=[10, 16, 18, 20, 25])
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.5])


# ----------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_adapter_uses_task_scorer():
    import reasoning_gym

    from rlkit.rewards.gym_adapter import reasoning_gym_score

    ds = reasoning_gym.create_dataset("basic_arithmetic", size=4, seed=3)
    entries = [ds[i] for i in range(4)]
    completions = [f"<think>...</think><answer>{entries[0]['answer']}</answer>"]
    completions += [rf"so \boxed{{{entries[1]['answer']}}}"]
    completions += [f"<answer>{int(entries[2]['answer']) + 1}</answer>", "no answer given " + entries[3]["answer"]]
    got = reasoning_gym_score(
        completions, None, metadata=[e["metadata"] for e in entries], answer=[e["answer"] for e in entries],
        question=[e["question"] for e in entries],
    )
    extracted = [entries[0]["answer"], entries[1]["answer"], str(int(entries[2]["answer"]) + 1), None]
    expected = [ds.score_answer(a, e) for a, e in zip(extracted, entries)]
    assert got == expected == [1.0, 1.0, 0.0, 0.0]
    # answer_format="tag" ignores the boxed answer
    assert reasoning_gym_score(completions[1:2], None, metadata=[entries[1]["metadata"]],
                               answer=[entries[1]["answer"]], answer_format="tag") == [0.0]
    with pytest.raises(KeyError, match="source_dataset"):
        reasoning_gym_score(["<answer>1</answer>"], None, metadata=[{}])


def test_reasoning_gym_adapter_from_recipe_fields():
    """rlkit.data stores (rg_task, rg_config, rg_index); the adapter rebuilds the exact entry."""
    import reasoning_gym

    from rlkit.rewards.gym_adapter import reasoning_gym_score

    config = {"seed": 11, "size": 6}
    ds = reasoning_gym.create_dataset("basic_arithmetic", **config)
    rows = [{"rg_task": "basic_arithmetic", "rg_config": config, "rg_index": i, "question": ds[i]["question"]}
            for i in range(3)]
    completions = [rf"\boxed{{{ds[0]['answer']}}}", f"<answer>{ds[1]['answer']}</answer>", r"\boxed{nope}"]
    got = reasoning_gym_score(completions, None, **{k: [r[k] for r in rows] for k in rows[0]})
    assert got == [1.0, 1.0, 0.0]
    rows[0]["question"] = "something else"
    with pytest.raises(ValueError, match="does not match"):
        reasoning_gym_score(completions[:1], None, **{k: [rows[0][k]] for k in rows[0]})


# ----------------------------------------------------------------------------- registry


def test_registry_builtins_resolve():
    for name in BUILTINS:
        r = resolve(name)
        assert callable(r.fn) and r.label.startswith(name)


def test_registry_module_and_file_references():
    r = resolve("rlkit.rewards.format:format_boxed")
    assert r.fn is format_boxed
    r = resolve(f"{FAULTS}:named_fields_only")
    assert not r.var_kw and r.required == frozenset({"completions", "prompts", "answer"})


def test_registry_errors_name_the_function():
    with pytest.raises(KeyError, match="valid built-ins are .*math"):
        resolve("maths")
    with pytest.raises(RewardSignatureError, match="no_completions.*neither 'completions' nor 'completion_ids'"):
        resolve(f"{FAULTS}:no_completions")
    with pytest.raises(RewardSignatureError, match=r"positional-only.*keywords"):
        resolve(f"{FAULTS}:positional_only")
    with pytest.raises(RewardSignatureError, match=r"\['trainer_state'\].*TRL's trainer"):
        resolve(f"{FAULTS}:needs_trainer_state")
    with pytest.raises(RewardSignatureError, match=r"kwargs \['tags'\].*named_fields_only"):
        resolve(f"{FAULTS}:named_fields_only", {"tags": 1})
    with pytest.raises(AttributeError, match="nothing_here"):
        resolve(f"{FAULTS}:nothing_here")
    with pytest.raises(FileNotFoundError):
        resolve("no/such/file.py:f")


def test_check_loadable_turns_load_failures_into_one_error(tmp_path):
    from rlkit.rewards import RewardLoadError, check_loadable

    check_loadable(RewardConfig(rewards=["math", f"{FAULTS}:named_fields_only"]), columns=["answer", "question"])
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n\ndef f(completions, **kw):\n    return []\n")
    cases = [
        (f"{broken}:f", RewardLoadError, "broken.py:f: cannot load it: ModuleNotFoundError: No module named"),
        ("no/such/file.py:f", RewardLoadError, "reward file not found"),
        (f"{FAULTS}:nothing_here", RewardLoadError, "has no attribute 'nothing_here'"),
        ("maths", RewardLoadError, "valid built-ins are"),
        (f"{FAULTS}:no_completions", RewardSignatureError, "neither"),
    ]
    for name, err, text in cases:
        with pytest.raises(err, match=text):
            check_loadable(RewardConfig(rewards=[{"name": name}]))
    # Given the data's columns, a required parameter no column provides is named up front.
    with pytest.raises(RewardSignatureError, match=r"needs column\(s\) \['answer'\].*\['question'\]"):
        check_loadable(RewardConfig(rewards=[f"{FAULTS}:named_fields_only"]), columns=["question"])


def test_rewards_are_called_with_keywords_as_trl_does():
    """TRL's documented signatures bind; each gets only what it declares unless it takes **kwargs."""
    from rlkit.rewards.registry import call_reward

    toy = os.path.join(os.path.dirname(__file__), "toy_rewards.py")
    comps = [r"so \boxed{4}", "4 it is"]
    cols = {"solution": ["4", "5"], "answer": ["4", "4"], "task": ["count", "x"], "completion_ids": [[1, 2], [3]]}

    def call(name):
        return call_reward(resolve(f"{toy}:{name}"), comps, ["p 4", "q is"], cols)

    assert call("trl_accuracy_reward") == [1.0, 0.0]
    assert call("trl_async_answer_reward") == [1.0, 1.0]
    assert call("trl_unique_chars") == [float(len(set(c))) for c in comps]
    assert call("trl_token_count") == [2.0, 1.0]
    assert call("trl_task_reward") == [float(len(comps[0])), None]
    assert call("trl_prompt_echo") == [1.0, 1.0]
    assert call_reward(resolve(f"{FAULTS}:no_prompts"), comps, ["p", "q"], cols) == [0.0, 0.0]
    # rlkit's built-ins take the same keywords
    assert call_reward(resolve("math"), comps, ["p", "q"], cols) == [1.0, 0.0]
    with pytest.raises(RewardSignatureError, match=r"needs field\(s\) \['answer'\], but the data has \['ground_truth'\]"):
        call_reward(resolve(f"{FAULTS}:named_fields_only"), comps, ["p", "q"], {"ground_truth": ["4", "4"]})


def test_conversational_rows_get_message_completions_except_for_builtins():
    from rlkit.rewards.registry import call_reward

    toy = os.path.join(os.path.dirname(__file__), "toy_rewards.py")
    comps = ["<think>2+2</think><answer>4</answer>", r"\boxed{4}"]
    cols = {"prompt": [[{"role": "user", "content": "What is 2+2?"}]] * 2, "answer": ["4", "4"]}
    assert call_reward(resolve(f"{toy}:trl_format_reward"), comps, ["rendered"] * 2, cols) == [1.0, 0.0]
    # prompts arrive as the row's messages: the last word of "What is 2+2?" is "2+2?"
    assert call_reward(resolve(f"{toy}:trl_prompt_echo"), comps, ["x"] * 2, cols) == [0.0, 0.0]
    assert call_reward(resolve("math"), comps, ["rendered"] * 2, cols) == [0.0, 1.0]
    assert call_reward(resolve("rlkit.rewards.format:format_boxed"), comps, ["r"] * 2, cols) == [0.0, 1.0]


def test_check_output_statuses():
    import numpy as np

    got = check_output(np.array([1.0, 0.5]), 2, "r")
    assert got == [("ok", 1.0, ""), ("ok", 0.5, "")]
    got = check_output([True, None, math.inf, [1], 10**400], 5, "r")
    assert [g[0] for g in got] == ["ok", "ok", "invalid", "invalid", "invalid"]
    assert got[0][1] == 1.0 and got[1][1] is None
    with pytest.raises(ValueError, match="returned 1 values for 2 samples"):
        check_output([1.0], 2, "r")
    with pytest.raises(ValueError, match="returned float"):
        check_output(1.0, 1, "r")


# ----------------------------------------------------------------------------- config


def test_reward_config_validation():
    cfg = RewardConfig(rewards=[{"name": "math", "weight": 2}, "format_boxed"])
    assert cfg.rewards == [RewardSpec("math", 2.0), RewardSpec("format_boxed")]
    spec = RewardSpec("configs/my_reward.py:brevity")
    assert os.path.isabs(spec.name.rpartition(":")[0])  # Ray actors may run in another directory
    with pytest.raises(ValueError, match="on_error"):
        RewardConfig(on_error="ignore")
    with pytest.raises(ValueError, match="unknown key"):
        RewardConfig(rewards=[{"name": "math", "wieght": 1}])
    with pytest.raises(ValueError, match="timeout_s"):
        RewardConfig(timeout_s=0)
    with pytest.raises(ValueError, match="at least one"):
        RewardConfig(rewards=[])

"""Data loading: the arithmetic workload, reasoning-gym presets, user files, preference pairs, the sampler."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from rlkit.data import (
    DataError,
    DataSpec,
    PreferenceRow,
    PromptRow,
    PromptSampler,
    arithmetic_problems,
    load_preferences,
    load_prompts,
    reasoning_gym_entry,
)


def reasoning_gym_score(row: PromptRow, answer: str | None) -> float:
    """The task's own scorer on the entry rebuilt from the row's recipe."""
    import reasoning_gym

    return float(reasoning_gym.get_score_answer_fn(row.fields["rg_task"])(answer, reasoning_gym_entry(row)))

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTION_RE = re.compile(r"What is (\d{1,2}) ([+-]) (\d{1,2})\? Put the final answer in \\boxed\{\}\.")


def chat(user: str, system: str = SMOL_SYSTEM) -> str:
    """SmolLM2's template, written out by hand: system turn, user turn, open assistant turn."""
    return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------------------------------------- arithmetic


@pytest.fixture(scope="module")
def arith(smollm2_tokenizer):
    return load_prompts(DataSpec(kind="arithmetic"), smollm2_tokenizer)


def test_arithmetic_counts_heldout_and_exclusion(arith):
    train, held = arith
    assert len(train) == 4000 and len(held) == 200
    held_set = {(r.fields["a"], r.fields["op"], r.fields["b"]) for r in held}
    assert len(held_set) == 200  # distinct
    assert not held_set & {(r.fields["a"], r.fields["op"], r.fields["b"]) for r in train}
    assert [r.index for r in train] == list(range(4000))
    assert {r.data_source for r in train + held} == {"arithmetic"}


def test_arithmetic_rows_are_well_formed(arith):
    train, held = arith
    for r in train + held:
        m = QUESTION_RE.fullmatch(r.fields["question"])
        assert m, r.fields["question"]
        a, op, b = int(m[1]), m[2], int(m[3])
        assert r.answer == str(a + b if op == "+" else a - b) == r.fields["answer"]
        assert r.prompt_text == chat(r.fields["question"])
    assert any(int(r.answer) < 0 for r in train)  # subtraction may go negative


def test_arithmetic_distribution():
    # The generator itself: 4000 fair coins land within 0.5 ± 0.03 with probability > 0.9999
    # (sd 0.0079), 8000 within ± 0.025 (sd 0.0056). The training split is skewed on purpose: the
    # held-out set removes a quarter of the 200 possible 1-digit ± 1-digit problems (each is drawn
    # with probability 1/800), so training operands lean to 2 digits (about 53 %).
    problems = arithmetic_problems(4000, 0)
    assert abs(sum(op == "+" for _, op, _ in problems) / 4000 - 0.5) < 0.03
    two_digit = sum(x >= 10 for a, _, b in problems for x in (a, b))
    assert abs(two_digit / 8000 - 0.5) < 0.025
    assert {a for a, _, _ in problems} == set(range(100))  # 0..9 and 10..99 all reachable


def test_arithmetic_is_deterministic_and_seeded():
    assert arithmetic_problems(50, 0) == arithmetic_problems(50, 0)
    assert arithmetic_problems(50, 0) != arithmetic_problems(50, 1)
    held = arithmetic_problems(200, 12345, distinct=True)
    assert arithmetic_problems(20, 12345, distinct=True) == held[:20]  # prefix-stable


def test_system_prompt_replaces_template_default(smollm2_tokenizer):
    spec = DataSpec(kind="arithmetic", num_train=3, num_eval=2, system_prompt="Be brief.")
    train, held = load_prompts(spec, smollm2_tokenizer)
    assert len(train) == 3 and len(held) == 2
    sys_turn = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert train[0].prompt_text == chat(train[0].fields["question"], system=sys_turn)


def test_plain_prompts_without_chat_template(smollm2_tokenizer):
    train, _ = load_prompts(DataSpec(kind="arithmetic", num_train=2, num_eval=1, chat_template=False), smollm2_tokenizer)
    assert train[0].prompt_text == train[0].fields["question"]


# ---------------------------------------------------------------------------------------------- reasoning-gym


@pytest.mark.parametrize("task", ["basic_arithmetic", "gsm_symbolic"])
def test_reasoning_gym_preset(task, smollm2_tokenizer):
    spec = DataSpec(kind="reasoning_gym", task=task, num_train=60, num_eval=20)
    train, held = load_prompts(spec, smollm2_tokenizer)
    assert len(train) == 60 and len(held) == 20
    held_q = [r.fields["question"] for r in held]
    assert len(set(held_q)) == 20 and not set(held_q) & {r.fields["question"] for r in train}
    row = train[7]
    assert row.data_source == f"reasoning_gym/{task}"
    assert row.prompt_text == chat(row.fields["question"] + " Put the final answer in \\boxed{}.")
    entry = reasoning_gym_entry(row)
    assert entry["question"] == row.fields["question"] and str(entry["answer"]) == row.answer
    assert reasoning_gym_score(row, row.answer) == 1.0
    assert reasoning_gym_score(row, row.answer + "1") < 1.0
    assert reasoning_gym_score(row, None) == 0.0
    again, _ = load_prompts(spec, smollm2_tokenizer)
    assert [r.prompt_text for r in again] == [r.prompt_text for r in train]


def test_reasoning_gym_unknown_task(smollm2_tokenizer):
    with pytest.raises(DataError, match="unknown reasoning_gym task 'no_such_task'.*gsm_symbolic"):
        load_prompts(DataSpec(kind="reasoning_gym", task="no_such_task", num_train=2, num_eval=1), smollm2_tokenizer)


# ---------------------------------------------------------------------------------------------- user files


def test_jsonl_plain_and_conversational(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question": "What is 1 + 1?", "solution": 2},
        "",  # blank lines are skipped
        {"question": [{"role": "system", "content": "Answer tersely."},
                      {"role": "user", "content": "What is 3 - 5?"}], "solution": "-2", "extra": [1, 2]},
    ])
    spec = DataSpec(kind="file", path=path, prompt_field="question", answer_field="solution")
    train, held = load_prompts(spec, smollm2_tokenizer)
    assert held == []
    assert [r.answer for r in train] == ["2", "-2"]
    assert train[0].prompt_text == chat("What is 1 + 1?")
    assert train[1].prompt_text == chat("What is 3 - 5?", system="<|im_start|>system\nAnswer tersely.<|im_end|>\n")
    assert train[1].fields["extra"] == [1, 2] and train[1].data_source == "q"


def test_parquet_and_hf_disk(tmp_path, smollm2_tokenizer):
    import datasets

    records = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                               "test": datasets.Dataset.from_list(records[:3])})
    dd.save_to_disk(str(tmp_path / "disk"))

    p_train, _ = load_prompts(DataSpec(kind="file", path=str(tmp_path / "d.parquet")), smollm2_tokenizer)
    d_train, d_eval = load_prompts(DataSpec(kind="hf_disk", path=str(tmp_path / "disk"), eval_split="test"),
                                   smollm2_tokenizer)
    assert [r.prompt_text for r in p_train] == [r.prompt_text for r in d_train] == [chat(r["prompt"]) for r in records]
    assert [r.answer for r in d_eval] == ["1", "2", "3"]


def test_holdout_from_one_file_is_seeded_and_disjoint(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(30)])
    spec = DataSpec(kind="file", path=path, num_eval=5, num_train=20)
    train, held = load_prompts(spec, smollm2_tokenizer)
    assert len(train) == 20 and len(held) == 5
    assert not {r.answer for r in train} & {r.answer for r in held}
    assert [r.answer for r in held] == [r.answer for r in load_prompts(spec, smollm2_tokenizer)[1]]
    other = load_prompts(spec.model_copy(update={"eval_seed": 1}), smollm2_tokenizer)[1]
    assert [r.answer for r in other] != [r.answer for r in held]


@pytest.mark.parametrize("bad_row, message", [
    ({"answer": "1"}, r"q\.jsonl: row 1 \(line 2\): missing field 'prompt'"),
    ({"prompt": 123, "answer": "1"}, r"q\.jsonl: row 1 \(line 2\): field 'prompt' must be a string or a list.*got int"),
    ({"prompt": "   ", "answer": "1"}, r"q\.jsonl: row 1 \(line 2\): field 'prompt' is empty"),
    ({"prompt": [], "answer": "1"}, r"row 1 \(line 2\): field 'prompt' must be .* got an empty list"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, r"row 1 \(line 2\): field 'prompt': message 0 must be"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"}, r"field 'prompt': message 0 has role 'robot'"),
    ({"prompt": "hi", "answer": ["1"]}, r"row 1 \(line 2\): field 'answer' must be a string or a number, got list"),
    ({"prompt": "hi"}, r"row 1 \(line 2\): missing field 'answer'"),
    ('{"prompt": "hi", ', r"row 1 \(line 2\): invalid JSON"),
    ('["hi", "1"]', r"row 1 \(line 2\): expected an object"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, smollm2_tokenizer, bad_row, message):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "fine", "answer": "0"}, bad_row])
    with pytest.raises(DataError, match=message):
        load_prompts(DataSpec(kind="file", path=path), smollm2_tokenizer)


def test_bad_parquet_row_names_row(tmp_path, smollm2_tokenizer):
    import datasets

    datasets.Dataset.from_list([{"prompt": "ok", "answer": "1"}, {"prompt": "", "answer": "2"}]).to_parquet(
        str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet: row 1: field 'prompt' is empty"):
        load_prompts(DataSpec(kind="file", path=str(tmp_path / "d.parquet")), smollm2_tokenizer)


def test_answer_field_none_allows_answerless_rows(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Tell a joke."}])
    train, _ = load_prompts(DataSpec(kind="file", path=path, answer_field=None), smollm2_tokenizer)
    assert train[0].answer is None


def test_dataspec_validation():
    with pytest.raises(ValidationError, match="data.path is required"):
        DataSpec(kind="file")
    with pytest.raises(ValidationError, match="data.task is required"):
        DataSpec(kind="reasoning_gym")
    with pytest.raises(ValidationError, match="eval_split names a split"):
        DataSpec(kind="file", path="x.jsonl", eval_split="test")
    with pytest.raises(ValidationError, match="extra"):
        DataSpec(kind="arithmetic", promt_field="x")
    with pytest.raises(ValidationError):
        DataSpec(kind="arithmetic", num_train=0)
    with pytest.raises(DataError, match="no such file"):
        load_prompts(DataSpec(kind="file", path="/nonexistent/x.jsonl"), None)


# ---------------------------------------------------------------------------------------------- preferences


def test_preferences_in_trl_formats(tmp_path, smollm2_tokenizer):
    user = {"role": "user", "content": "What color is the sky?"}
    blue, green = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},                 # plain, explicit prompt
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},                     # plain, implicit prompt
        {"prompt": [user], "chosen": [blue], "rejected": [green]},                           # conversational, explicit
        {"chosen": [user, blue], "rejected": [user, green]},                                 # conversational, implicit
    ])
    train, held = load_preferences(DataSpec(kind="file", path=path), smollm2_tokenizer)
    assert held == [] and all(isinstance(r, PreferenceRow) for r in train)
    assert (train[0].prompt_text, train[0].chosen_text, train[0].rejected_text) == ("The sky is", " blue.", " green.")
    # TRL's extract_prompt keeps the space with the completion
    assert (train[1].prompt_text, train[1].chosen_text, train[1].rejected_text) == ("The sky is", " blue.", " green.")
    for r in train[2:]:
        assert r.prompt_text == chat("What color is the sky?")
        assert (r.chosen_text, r.rejected_text) == ("It is blue.<|im_end|>\n", "It is green.<|im_end|>\n")
    assert [r.index for r in train] == [0, 1, 2, 3]


def test_preference_bad_rows(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl: row 0 \(line 1\): missing field 'rejected'"):
        load_preferences(DataSpec(kind="file", path=path), smollm2_tokenizer)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}],
                                               "rejected": "c"}])
    with pytest.raises(DataError, match=r"row 0 \(line 1\): mixes plain and conversational"):
        load_preferences(DataSpec(kind="file", path=path), smollm2_tokenizer)
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match=r"row 0 \(line 1\): no prompt"):
        load_preferences(DataSpec(kind="file", path=path), smollm2_tokenizer)
    with pytest.raises(DataError, match="needs data.kind 'file' or 'hf_disk'"):
        load_preferences(DataSpec(kind="arithmetic"), smollm2_tokenizer)


# ---------------------------------------------------------------------------------------------- sampler


def _rows(n: int) -> list[PromptRow]:
    return [PromptRow(prompt_text=f"p{i}", answer=str(i), fields={}, data_source="t", index=i) for i in range(n)]


def test_sampler_epochs_cover_every_row_once():
    rows = _rows(10)
    s = PromptSampler(rows, batch_prompts=5, seed=3)
    epoch0 = s.next_batch() + s.next_batch()
    assert sorted(r.index for r in epoch0) == list(range(10)) and s.epoch == 1 and s.position == 0
    epoch1 = s.next_batch() + s.next_batch()
    assert sorted(r.index for r in epoch1) == list(range(10))
    assert [r.index for r in epoch0] != [r.index for r in epoch1]  # reshuffled each epoch
    assert [r.index for r in epoch0] != list(range(10))


def test_sampler_state_round_trip_across_epoch_boundary():
    rows = _rows(10)
    a = PromptSampler(rows, batch_prompts=4, seed=7)
    for _ in range(3):  # 12 rows: the third batch crosses into epoch 1
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint would store it
    assert (state["epoch"], state["position"]) == (1, 2)
    expected = [[r.index for r in a.next_batch()] for _ in range(6)]
    b = PromptSampler(rows, batch_prompts=4, seed=0)  # the seed comes back from the state
    b.load_state_dict(state)
    assert [[r.index for r in b.next_batch()] for _ in range(6)] == expected
    fresh = PromptSampler(rows, batch_prompts=4, seed=7)
    assert [r.index for r in fresh.next_batch()] != expected[0]  # the restored stream is not a restart


def test_sampler_refuses_other_data():
    state = PromptSampler(_rows(10), 4, seed=0).state_dict()
    with pytest.raises(DataError, match="saved for other data"):
        PromptSampler(_rows(11), 4).load_state_dict(state)
    other = _rows(10)
    other[3] = PromptRow(prompt_text="changed", answer="3", fields={}, data_source="t", index=3)
    with pytest.raises(DataError, match="saved for other data"):
        PromptSampler(other, 4).load_state_dict(state)


def test_shipped_examples_load(smollm2_tokenizer):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "configs" / "data_examples"
    train, held = load_prompts(DataSpec(kind="file", path=str(examples / "prompts.jsonl"), num_eval=1),
                               smollm2_tokenizer)
    assert len(train) == 3 and len(held) == 1
    assert sorted(r.answer for r in train + held) == ["-5", "42", "42", "81"]
    assert all(r.prompt_text.endswith("<|im_start|>assistant\n") for r in train + held)
    pairs, _ = load_preferences(DataSpec(kind="file", path=str(examples / "preferences.jsonl")), smollm2_tokenizer)
    assert [p.chosen_text for p in pairs] == [" 2 + 2 = 4.", " Paris.", "3 + 4 = 7<|im_end|>\n", "7<|im_end|>\n"]
    assert pairs[1].prompt_text == "The capital of France is"

"""Prompt and preference data: the offline arithmetic workload, reasoning-gym presets, user files.

Every source ends as typed rows whose prompt is already rendered with the model's chat template:
`PromptRow` for RL prompts (with the reference answer and the raw fields a reward function may
need) and `PreferenceRow` for pairwise data. `load_prompts(spec, tokenizer)` is the one
config-facing entry point for prompts, `load_preferences(spec, tokenizer)` for pairs, and
`PromptSampler` hands out batches deterministically and resumes exactly from its `state_dict()`.

Heavy libraries (trl, datasets, pyarrow, reasoning_gym) are imported inside the functions that
need them, so importing this module costs only numpy and pydantic.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

ARITHMETIC_TEMPLATE = "What is {a} {op} {b}? Put the final answer in \\boxed{{}}."
BOXED_INSTRUCTION = "Put the final answer in \\boxed{}."
DEFAULT_NUM_TRAIN, DEFAULT_NUM_EVAL = 4000, 200
# reasoning-gym configs used when the spec gives no task_config; any other registered task runs
# with the library's own defaults. basic_arithmetic is made a step harder than the arithmetic
# workload (2-3 terms, 1-2 digits, + - *), with no parentheses or unary minus.
REASONING_GYM_PRESETS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2,
                         "operators": ["+", "-", "*"], "allow_parentheses": False, "allow_negation": False},
    "gsm_symbolic": {},
}
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad data or data config; the message names the file, the row and the field."""


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One RL prompt.

    prompt_text: the prompt rendered with the chat template (generation prompt included), ready
        to tokenize without adding special tokens.
    answer: the reference answer as a string (integers as `str(int)`), or None if the data has none.
    fields: the source's raw fields, passed to reward functions (for files: every column of the row;
        for generated data: the generator's parameters and the question).
    data_source: where the row came from ("arithmetic", "reasoning_gym/<task>", or the file's name).
    index: position of the row in its split (train or eval).
    """

    prompt_text: str
    answer: str | None
    fields: dict[str, Any]
    data_source: str
    index: int


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    """One preference pair, as TRL renders it: prompt_text + chosen_text is the full preferred text."""

    prompt_text: str
    chosen_text: str
    rejected_text: str
    index: int


class DataSpec(BaseModel):
    """Where the prompts come from and how they become rows; embedded in the main config.

    kind: "arithmetic" (the trl-baseline workload), "reasoning_gym" (`task`, `task_config`),
        "file" (jsonl / json / parquet at `path`) or "hf_disk" (a `datasets.save_to_disk` folder).
    num_train / num_eval: None means 4000 / 200 for generated data; for user data all rows of `path`
        are training rows and the eval rows are those of `eval_path` (or `eval_split`). If
        `num_eval` is set and there is no eval source, that many rows are held out of `path`,
        chosen with `eval_seed`.
    seed / eval_seed: generator seeds of the training and held-out sets (generated data).
    system_prompt: a system message put first in every prompt that has none; None keeps the
        chat template's own default (SmolLM2's template inserts its default system prompt).
    chat_template: render prompts with the tokenizer's chat template; plain-string prompts become a
        single user message. False feeds plain strings to the model as they are.
    instruction: text appended to reasoning-gym questions (None: the \\boxed{} instruction).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["arithmetic", "reasoning_gym", "file", "hf_disk"] = "arithmetic"
    path: str | None = None
    eval_path: str | None = None
    split: str = "train"
    eval_split: str | None = None
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    task: str | None = None
    task_config: dict[str, Any] | None = None
    instruction: str | None = None
    num_train: int | None = Field(default=None, ge=1)
    num_eval: int | None = Field(default=None, ge=0)
    seed: int = 0
    eval_seed: int = 12345
    system_prompt: str | None = None
    chat_template: bool = True
    data_source: str | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> DataSpec:
        user_data = self.kind in ("file", "hf_disk")
        if user_data and not self.path:
            raise ValueError(f"data.path is required when data.kind is {self.kind!r}")
        if not user_data and (self.path or self.eval_path):
            raise ValueError(f"data.path/eval_path are only used with kind 'file' or 'hf_disk', not {self.kind!r}")
        if self.eval_split and self.kind != "hf_disk":
            raise ValueError("data.eval_split names a split of a save_to_disk folder (kind 'hf_disk'); "
                             "for files give data.eval_path")
        if self.kind == "reasoning_gym" and not self.task:
            raise ValueError("data.task is required when data.kind is 'reasoning_gym' (e.g. 'basic_arithmetic')")
        if self.kind != "reasoning_gym" and (self.task or self.task_config):
            raise ValueError("data.task/task_config are only used with kind 'reasoning_gym'")
        return self


# ----------------------------------------------------------------------------------------------
# Chat-template rendering (through TRL's data utilities)
# ----------------------------------------------------------------------------------------------


def render_prompt(prompt: str | list[dict[str, str]], tokenizer: Any, *, system_prompt: str | None = None,
                  chat_template: bool = True) -> str:
    """Render a plain or conversational prompt as the text the model sees.

    Conversational prompts go through `trl.data_utils.maybe_apply_chat_template`, exactly as TRL's
    trainers render a prompt-only example: a generation prompt is added after a final user turn,
    a final assistant turn is continued. A plain string becomes one user message first, unless
    `chat_template` is False, in which case it is returned unchanged.
    """
    if isinstance(prompt, str):
        if not chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; set data.chat_template: false to use plain prompts")
    from trl.data_utils import maybe_apply_chat_template

    return maybe_apply_chat_template({"prompt": messages}, tokenizer)["prompt"]


# ----------------------------------------------------------------------------------------------
# The arithmetic workload (trl-baseline.md §1)
# ----------------------------------------------------------------------------------------------


def _operand(rng: random.Random) -> int:
    # 1 or 2 digits with equal odds; 1-digit is 0-9, 2-digit is 10-99
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def arithmetic_problems(n: int, seed: int, *, exclude: frozenset = frozenset(),
                        distinct: bool = False) -> list[tuple[int, str, int]]:
    """Draw `n` problems (a, op, b) from `random.Random(seed)`, skipping any in `exclude`.

    Per problem the RNG is used in a fixed order: op ('+' or '-', equal odds), then a, then b
    (each: 1 or 2 digits with equal odds, then the value). Subtraction may go negative.
    `distinct` also skips repeats, as the held-out set needs.
    """
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        op = "+" if rng.random() < 0.5 else "-"
        a, b = _operand(rng), _operand(rng)
        problem = (a, op, b)
        if problem in seen:
            continue
        if distinct:
            seen.add(problem)
        out.append(problem)
    return out


def _arithmetic_rows(problems: list[tuple[int, str, int]], tokenizer: Any, spec: DataSpec) -> list[PromptRow]:
    rows = []
    for i, (a, op, b) in enumerate(problems):
        question = ARITHMETIC_TEMPLATE.format(a=a, op=op, b=b)
        answer = str(a + b if op == "+" else a - b)
        rows.append(PromptRow(
            prompt_text=render_prompt(question, tokenizer, system_prompt=spec.system_prompt,
                                      chat_template=spec.chat_template),
            answer=answer, fields={"question": question, "a": a, "op": op, "b": b, "answer": answer},
            data_source=spec.data_source or "arithmetic", index=i))
    return rows


def arithmetic_splits(spec: DataSpec, tokenizer: Any) -> tuple[list[PromptRow], list[PromptRow]]:
    """Training rows from `spec.seed` with every held-out problem excluded; distinct held-out rows from `spec.eval_seed`."""
    num_train = spec.num_train or DEFAULT_NUM_TRAIN
    num_eval = DEFAULT_NUM_EVAL if spec.num_eval is None else spec.num_eval
    held_out = arithmetic_problems(num_eval, spec.eval_seed, distinct=True)
    train = arithmetic_problems(num_train, spec.seed, exclude=frozenset(held_out))
    return _arithmetic_rows(train, tokenizer, spec), _arithmetic_rows(held_out, tokenizer, spec)


# ----------------------------------------------------------------------------------------------
# reasoning-gym tasks
# ----------------------------------------------------------------------------------------------
# A row keeps the task name, the dataset config (seed and size included) and the entry index in
# `fields` ("rg_task", "rg_config", "rg_index"). reasoning-gym entries are a pure function of
# these, so `reasoning_gym_entry(row)` rebuilds the exact entry; the `reasoning_gym` reward
# (rlkit.rewards.gym_adapter) scores with the task's own `score_answer`. Keeping the recipe instead
# of the entry keeps rows small and picklable (gsm_symbolic metadata carries a worked solution).


@functools.lru_cache(maxsize=32)
def _rg_dataset(task: str, config_json: str) -> Any:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise DataError(f"unknown reasoning_gym task {task!r}; registered tasks: {', '.join(sorted(DATASETS))}")
    try:
        return reasoning_gym.create_dataset(task, **json.loads(config_json))
    except (TypeError, AssertionError, ValueError) as exc:
        raise DataError(f"reasoning_gym task {task!r}: bad task_config {config_json}: {exc}") from exc


def _rg_generate(spec: DataSpec, seed: int, n: int, exclude: set[str], distinct: bool) -> list[dict[str, Any]]:
    overrides = spec.task_config if spec.task_config is not None else REASONING_GYM_PRESETS.get(spec.task, {})
    # size is part of the recipe (gsm_symbolic draws its template list from seed and size);
    # the slack covers entries skipped as held-out or repeated.
    config = {**overrides, "seed": seed, "size": 2 * n + 64}
    config_json = json.dumps(config, sort_keys=True)
    ds = _rg_dataset(spec.task, config_json)
    out, seen = [], set(exclude)
    for idx in range(config["size"]):
        if len(out) == n:
            break
        entry = ds[idx]
        if entry["question"] in seen:
            continue
        if distinct:
            seen.add(entry["question"])
        out.append({"question": entry["question"], "answer": str(entry["answer"]), "rg_task": spec.task,
                    "rg_config": json.loads(config_json), "rg_index": idx})
    if len(out) < n:
        raise DataError(f"reasoning_gym task {spec.task!r} gave only {len(out)} usable problems of {n} "
                        f"from seed {seed}; lower num_train/num_eval or widen task_config")
    return out


def reasoning_gym_splits(spec: DataSpec, tokenizer: Any) -> tuple[list[PromptRow], list[PromptRow]]:
    """Distinct held-out problems from `eval_seed`; training problems from `seed` minus held-out questions."""
    num_train = spec.num_train or DEFAULT_NUM_TRAIN
    num_eval = DEFAULT_NUM_EVAL if spec.num_eval is None else spec.num_eval
    held_out = _rg_generate(spec, spec.eval_seed, num_eval, set(), distinct=True)
    train = _rg_generate(spec, spec.seed, num_train, {f["question"] for f in held_out}, distinct=False)
    instruction = BOXED_INSTRUCTION if spec.instruction is None else spec.instruction

    def rows(fields_list: list[dict[str, Any]]) -> list[PromptRow]:
        return [PromptRow(
            prompt_text=render_prompt(f"{f['question']} {instruction}".strip(), tokenizer,
                                      system_prompt=spec.system_prompt, chat_template=spec.chat_template),
            answer=f["answer"], fields=f, data_source=spec.data_source or f"reasoning_gym/{spec.task}", index=i)
            for i, f in enumerate(fields_list)]

    return rows(train), rows(held_out)


def reasoning_gym_entry(row: PromptRow) -> dict[str, Any]:
    """Rebuild the reasoning-gym entry (question, answer, metadata) a row was made from."""
    f = row.fields
    ds = _rg_dataset(f["rg_task"], json.dumps(f["rg_config"], sort_keys=True))
    entry = ds[f["rg_index"]]
    if entry["question"] != f["question"]:  # a different reasoning_gym version generates differently
        raise DataError(f"reasoning_gym {f['rg_task']!r} entry {f['rg_index']} no longer matches the row's question")
    return entry


# ----------------------------------------------------------------------------------------------
# User files: jsonl / json / parquet / datasets.save_to_disk folders
# ----------------------------------------------------------------------------------------------


def read_records(path: str | Path, kind: str = "file", split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Read a data file as (location, record) pairs; location reads "<path>: row i" (plus the line for jsonl)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if kind == "hf_disk" or path.is_dir():
        return _read_hf_disk(path, split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and _first_char(path) != "["):
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except ValueError as exc:
            raise DataError(f"{path}: invalid JSON: {exc}") from exc
        return [(f"{path}: row {i}", r) for i, r in enumerate(records)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}: row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk folder")


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return line.strip()[0]
    return ""


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}: row {len(out)} (line {line_no})"
            try:
                out.append((where, json.loads(line)))
            except ValueError as exc:
                raise DataError(f"{where}: invalid JSON: {exc}") from exc
    return out


def _read_hf_disk(path: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a datasets.save_to_disk folder: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(ds)}")
        ds, path = ds[split], Path(f"{path}[{split}]")
    return [(f"{path}: row {i}", r) for i, r in enumerate(ds)]


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(record).__name__}")
    return record


def _check_text_or_messages(value: Any, where: str, field: str) -> str | list[dict[str, str]]:
    """A non-empty string, or a non-empty list of {role, content} messages with string values."""
    loc = f"{where}: field {field!r}"
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{loc} is empty")
        return value
    if isinstance(value, list) and value:
        messages = []
        for k, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{loc}: message {k} must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{loc}: message {k} has role {m['role']!r}; expected one of {ROLES}")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in messages):
            raise DataError(f"{loc}: every message is empty")
        return messages
    kind = "an empty list" if value == [] else type(value).__name__
    raise DataError(f"{loc} must be a string or a list of {{role, content}} messages, got {kind}")


def _field(record: dict[str, Any], field: str, where: str) -> Any:
    if field not in record or record[field] is None:
        raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(record)})")
    return record[field]


def _answer(record: dict[str, Any], field: str | None, where: str) -> str | None:
    if field is None:
        return None
    value = _field(record, field, where)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {field!r} must be a string or a number, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return str(value)


def _split_records(spec: DataSpec) -> tuple[list, list]:
    """Train and eval (location, record) lists for user data, following DataSpec's rules."""
    train = read_records(spec.path, spec.kind, spec.split)
    if spec.eval_path or spec.eval_split:
        eval_ = read_records(spec.eval_path or spec.path, spec.kind, spec.eval_split or spec.split)
        if spec.num_eval is not None:
            eval_ = eval_[: spec.num_eval]
    elif spec.num_eval:
        if spec.num_eval >= len(train):
            raise DataError(f"{spec.path}: num_eval={spec.num_eval} leaves no training rows (the file has {len(train)})")
        picked = set(np.random.default_rng(spec.eval_seed).choice(len(train), spec.num_eval, replace=False).tolist())
        eval_ = [r for i, r in enumerate(train) if i in picked]
        train = [r for i, r in enumerate(train) if i not in picked]
    else:
        eval_ = []
    if spec.num_train is not None:
        train = train[: spec.num_train]
    if not train:
        raise DataError(f"{spec.path}: no rows")
    return train, eval_


def _file_prompt_rows(records: list, spec: DataSpec, tokenizer: Any) -> list[PromptRow]:
    rows = []
    for i, (where, record) in enumerate(records):
        record = _check_record(record, where)
        prompt = _check_text_or_messages(_field(record, spec.prompt_field, where), where, spec.prompt_field)
        try:
            text = render_prompt(prompt, tokenizer, system_prompt=spec.system_prompt, chat_template=spec.chat_template)
        except DataError:
            raise
        except Exception as exc:  # the template itself rejected the messages (e.g. role order)
            raise DataError(f"{where}: field {spec.prompt_field!r}: chat template failed: {exc}") from exc
        rows.append(PromptRow(prompt_text=text, answer=_answer(record, spec.answer_field, where), fields=dict(record),
                              data_source=spec.data_source or Path(spec.path).stem, index=i))
    return rows


def load_prompts(spec: DataSpec, tokenizer: Any) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train_rows, eval_rows) for a DataSpec, prompts rendered with `tokenizer`'s chat template."""
    if spec.kind == "arithmetic":
        return arithmetic_splits(spec, tokenizer)
    if spec.kind == "reasoning_gym":
        return reasoning_gym_splits(spec, tokenizer)
    train, eval_ = _split_records(spec)
    return _file_prompt_rows(train, spec, tokenizer), _file_prompt_rows(eval_, spec, tokenizer)


# ----------------------------------------------------------------------------------------------
# Preference data in TRL's standard formats
# ----------------------------------------------------------------------------------------------


def _preference_row(record: dict[str, Any], spec: DataSpec, tokenizer: Any, where: str, index: int) -> PreferenceRow:
    """Explicit or implicit prompt, plain or conversational, rendered as TRL's trainers do.

    `maybe_extract_prompt` splits an implicit prompt off the shared prefix of chosen/rejected;
    `maybe_apply_chat_template` renders conversational examples and leaves plain ones as they are
    (TRL does not template plain-text preference data, and neither do we).
    """
    from trl.data_utils import (
        is_conversational,
        maybe_apply_chat_template,
        maybe_extract_prompt,
    )

    example = {key: _check_text_or_messages(_field(record, field, where), where, field)
               for key, field in (("chosen", spec.chosen_field), ("rejected", spec.rejected_field))}
    if record.get(spec.prompt_field) is not None:
        example["prompt"] = _check_text_or_messages(record[spec.prompt_field], where, spec.prompt_field)
    shapes = {key: isinstance(v, list) for key, v in example.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{where}: mixes plain and conversational fields {shapes}; use one format for the row")
    example = maybe_extract_prompt(example)
    if is_conversational(example) and spec.system_prompt is not None and example["prompt"] \
            and example["prompt"][0]["role"] != "system":
        example["prompt"] = [{"role": "system", "content": spec.system_prompt}, *example["prompt"]]
    try:
        out = maybe_apply_chat_template(example, tokenizer)
    except Exception as exc:
        raise DataError(f"{where}: chat template failed: {exc}") from exc
    if not out["prompt"]:
        raise DataError(f"{where}: no prompt: field {spec.prompt_field!r} is absent and chosen/rejected share no prefix")
    return PreferenceRow(prompt_text=out["prompt"], chosen_text=out["chosen"], rejected_text=out["rejected"], index=index)


def load_preferences(spec: DataSpec, tokenizer: Any) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """(train_pairs, eval_pairs) from a file or save_to_disk folder in TRL's preference format."""
    if spec.kind not in ("file", "hf_disk"):
        raise DataError(f"preference data needs data.kind 'file' or 'hf_disk', not {spec.kind!r}")
    train, eval_ = _split_records(spec)

    def rows(records: list) -> list[PreferenceRow]:
        return [_preference_row(_check_record(r, where), spec, tokenizer, where, i)
                for i, (where, r) in enumerate(records)]

    return rows(train), rows(eval_)


# ----------------------------------------------------------------------------------------------
# Deterministic, resumable sampling
# ----------------------------------------------------------------------------------------------


class PromptSampler:
    """Batches of `batch_prompts` rows: each epoch is a fresh permutation, batches run across epochs.

    The permutation of epoch e is `numpy.random.default_rng([seed, e]).permutation(len(rows))`, a
    pure function of (seed, epoch); so (seed, epoch, position) is the sampler's whole RNG state,
    and a sampler restored from `state_dict()` returns exactly the batches the original would have.
    """

    def __init__(self, rows: list, batch_prompts: int, seed: int = 0):
        if not rows:
            raise DataError("PromptSampler needs at least one row")
        if batch_prompts < 1:
            raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
        self.rows, self.batch_prompts, self.seed = rows, batch_prompts, seed
        self.epoch, self.position = 0, 0
        self._order_N: np.ndarray | None = None
        self._fingerprint: str | None = None

    def _order(self) -> np.ndarray:
        if self._order_N is None:
            self._order_N = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
        return self._order_N

    def next_batch(self) -> list:
        """The next `batch_prompts` rows; an epoch boundary inside a batch continues into the next permutation."""
        out: list = []
        while len(out) < self.batch_prompts:
            take = min(self.batch_prompts - len(out), len(self.rows) - self.position)
            out.extend(self.rows[i] for i in self._order()[self.position:self.position + take])
            self.position += take
            if self.position == len(self.rows):
                self.epoch, self.position, self._order_N = self.epoch + 1, 0, None
        return out

    def fingerprint(self) -> str:
        """sha256 over the rows' prompts and answers: a resume onto different data is refused."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for r in self.rows:
                text = r.prompt_text if isinstance(r, (PromptRow, PreferenceRow)) else repr(r)
                h.update(text.encode())
                h.update(b"\x1f" + str(getattr(r, "answer", "")).encode() + b"\x1e")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_rows": len(self.rows), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != len(self.rows) or state["fingerprint"] != self.fingerprint():
            raise DataError(f"sampler state was saved for other data ({state['num_rows']} rows, "
                            f"fingerprint {state['fingerprint'][:12]}); this sampler has {len(self.rows)} rows, "
                            f"fingerprint {self.fingerprint()[:12]}")
        if not 0 <= state["position"] < len(self.rows):
            raise DataError(f"sampler state position {state['position']} is outside 0..{len(self.rows) - 1}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order_N = None

"""The command line as a user runs it (subprocesses): ``python -m rlkit`` equals ``rlkit``, and user
errors (configuration, data, checkpoint, reward loading, evaluation target) print one message
without a traceback unless ``--debug`` or ``RLKIT_DEBUG=1`` asks for it. None of these start Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FAULTS = str(Path(__file__).parent / "data" / "fault_rewards.py")
TOY = str(Path(__file__).parent / "toy_rewards.py")
RLKIT = str(Path(sys.executable).parent / "rlkit")


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RLKIT_DEBUG", None)
    return {**env, **extra}


def _run(*args: str, module: bool = True, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlkit", *args] if module else [RLKIT, *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300, check=False)


def _one_message(proc: subprocess.CompletedProcess, heading: str, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"rlkit: {heading}:\n"), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "--debug" in proc.stderr.splitlines()[-1]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_python_dash_m_rlkit_is_the_rlkit_command():
    args = ("config", "configs/grpo.yaml", "train.steps=3")
    root = Path(__file__).resolve().parent.parent
    a = subprocess.run([sys.executable, "-m", "rlkit", *args], env=_env(), capture_output=True, text=True, check=False,
                       cwd=root, timeout=300)
    b = subprocess.run([RLKIT, *args], env=_env(), capture_output=True, text=True, check=False, cwd=root, timeout=300)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "steps: 3" in a.stdout
    assert _run("--help").stdout.startswith("usage: rlkit")


def test_configuration_error_is_one_message():
    _one_message(_run("config", "no/such.yaml"), "configuration error", "config file not found")
    _one_message(_run("config", "configs/grpo.yaml", "train.stepz=3", module=False), "configuration error",
                 "train.stepz", "unknown key")


@pytest.fixture
def bad_data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"question": "no prompt here", "answer": "3"}\n')
    return path


def test_data_error_is_one_message_and_debug_shows_the_traceback(bad_data, smollm2_tokenizer_dir, tmp_path):
    args = ("train", str(Path(__file__).parent / "data" / "tiny_run.yaml"), f"model.path={smollm2_tokenizer_dir}",
            f"run_dir={tmp_path / 'run'}", "data.kind=file", f"data.path={bad_data}", "data.num_eval=null")
    _one_message(_run(*args), "data error", f"{bad_data}: row 1 (line 2): missing field 'prompt'")
    for debug in (_run(*args, "--debug"), _run(*args, RLKIT_DEBUG="1")):
        assert debug.returncode != 0
        assert "Traceback" in debug.stderr and "rlkit.data.DataError" in debug.stderr, debug.stderr


def test_trust_checkpoint_flag_sets_the_variable_before_the_trainer(bad_data, smollm2_tokenizer_dir, tmp_path,
                                                                   monkeypatch, capsys):
    from rlkit.cli import main

    monkeypatch.delenv("RLKIT_TRUST_CHECKPOINTS", raising=False)
    args = ["train", str(Path(__file__).parent / "data" / "tiny_run.yaml"), f"model.path={smollm2_tokenizer_dir}",
            f"run_dir={tmp_path / 'run'}", "data.kind=file", f"data.path={bad_data}", "data.num_eval=null"]
    assert main(args) == 2  # the trainer was built (and refused the data) ...
    assert "RLKIT_TRUST_CHECKPOINTS" not in os.environ
    assert main([*args, "--trust-checkpoint"]) == 2
    assert os.environ["RLKIT_TRUST_CHECKPOINTS"] == "1"  # ... after the flag set the variable
    assert "data error" in capsys.readouterr().err


def test_reward_errors_are_one_message_before_any_worker(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def f(completions, **kw):\n    return [1.0] * len(completions\n")  # a syntax error
    common = ("eval", str(tiny_llama_dir), "arithmetic", "data.num_eval=2")
    _one_message(_run(*common, f"rewards.rewards=[{{name: '{broken}:f'}}]"), "reward error",
                 "broken.py:f: cannot load it: SyntaxError")
    _one_message(_run(*common, f"rewards.rewards=[{{name: '{FAULTS}:no_completions'}}]"), "reward error",
                 "neither 'completions' nor 'completion_ids'")
    # a required column the data does not have is named before anything starts
    # (TRL's form def f(completions, solution, **kwargs) on arithmetic rows, which have no 'solution')
    _one_message(_run(*common, f"rewards.rewards=[{{name: '{TOY}:trl_accuracy_reward'}}, {{name: math}}]"),
                 "reward error", "needs column(s) ['solution']", "'question'")
    debug = _run(*common, f"rewards.rewards=[{{name: '{broken}:f'}}]", RLKIT_DEBUG="1")
    assert "Traceback" in debug.stderr and "RewardLoadError" in debug.stderr


def test_checkpoint_and_target_errors_are_one_message(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    (ckpt / "hf").mkdir(parents=True)  # a checkpoint whose writer died: no COMPLETE marker
    _one_message(_run("eval", str(ckpt / "hf")), "checkpoint error", "not a complete checkpoint")
    _one_message(_run("eval", str(tmp_path / "run")), "evaluation error", "without any complete checkpoint")
    _one_message(_run("eval", str(tmp_path / "nothing")), "evaluation error", "no such folder")
    _one_message(_run("eval", "smollm2", "no/such/file.jsonl"), "evaluation error", "no such file or folder")

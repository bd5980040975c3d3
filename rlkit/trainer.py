"""The training loop: sample → score → advantages → learn → sync → log → checkpoint.

It asks the algorithm what it needs (``Algorithm.needs``) and never branches on its name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from rlkit import checkpoint, groups
from rlkit.algorithms.base import AdvantageInputs
from rlkit.config import RunConfig, build_data_spec, build_reward_config, dump_config
from rlkit.groups import ScoredGroup
from rlkit.placement import PlacementError
from rlkit.recovery import (
    LearnerLost,
    Preempted,
    StageTimeout,
    StopSignals,
    check_finite,
)
from rlkit.timeline import Spans
from rlkit.types import collate

PAIR_ROUNDS = 4
"""Generation batches a step of an on-policy preference algorithm may draw to find its pairs."""


@dataclass
class TrainerState:
    """Everything the driver needs to continue exactly (the learners save their own part)."""

    step: int = 0
    sampler: dict = field(default_factory=dict)
    controller: dict = field(default_factory=dict)
    carry: list[ScoredGroup] = field(default_factory=list)
    """Group filter: kept groups not yet trained on, carried to the next step."""
    eval_base: dict = field(default_factory=dict)
    marks_done: list = field(default_factory=list)
    """``eval.at_minutes`` marks already evaluated."""
    train_seconds: float = 0.0
    """Training wall time so far (sum of step times; evaluations and checkpoints excluded)."""
    skipped_in_a_row: int = 0
    """Updates skipped in a row for non-finite numbers (``recovery.max_consecutive_skips``)."""
    learner_restarts: int = 0


class Trainer:
    """The driver of one run. ``runtime`` is built by :meth:`fit` unless one is given (a test or a
    benchmark that drives :meth:`step` itself): ``Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))``."""

    def __init__(self, cfg: RunConfig, runtime=None):
        from rlkit.assets import load_tokenizer
        from rlkit.data import PromptSampler, load_prompts

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.spans = Spans("driver", enabled=cfg.timeline)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = model_dir(cfg)
        self.tokenizer = load_tokenizer(self.model_dir)
        setup = cfg.algorithm_setup
        self.algo, self.algo_cfg, self.needs = setup.algo, setup.cfg, setup.needs
        self.filter_policy = setup.filter_policy
        reward_cfg = build_reward_config(cfg)
        self.outcome = reward_cfg.outcome_name()
        self.answer_fallback = reward_cfg.answer_fallback()
        self.controller = self.algo.make_controller(self.algo_cfg) if self.algo.make_controller else None
        spec = build_data_spec(cfg)
        # Preference algorithms read pairs from a file (TRL's formats) when the data is a file;
        # otherwise they build pairs on-policy by ranking each group's completions with the verifier.
        self.pair_file = self.needs.pairs and spec.kind in ("file", "hf_disk")
        if self.pair_file:
            from rlkit.data import load_preferences

            self.train_rows, _ = load_preferences(spec, self.tokenizer)
            self.eval_rows = []
        else:
            self.train_rows, self.eval_rows = load_prompts(spec, self.tokenizer)
        # Reward functions that cannot load or bind to the data's columns fail here, before any actor.
        from rlkit.rewards import check_loadable

        columns = None if self.pair_file else (
            {k for r in self.train_rows + self.eval_rows for k in r.fields}
            | {"answer", "completion_len", "completion_ids", "group_id", "data_source"})
        check_loadable(build_reward_config(cfg), columns)
        self.sampler = PromptSampler(self.train_rows, cfg.train.prompts_per_step, cfg.train.seed)
        self._initial_sampler = self.sampler.state_dict()
        self._initial_controller = self.controller.state_dict() if self.controller else {}
        self.state = TrainerState()
        self.summary = ""
        """The run's summary (``summary.txt``), once :meth:`fit` has finished."""
        self.runtime = runtime
        self._pending: Optional[tuple[list, list]] = None
        """Rows and in-flight generation refs of the next step (``rollout.overlap``)."""
        self._sampler_before_pending: dict = {}
        self._async = None
        """Bounded asynchrony (``rollout.max_staleness`` > 0): :class:`rlkit.async_rl.AsyncCollector`."""

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: Optional[str] = None) -> dict[str, float]:
        """Train to ``train.steps`` (or ``train.max_minutes``), evaluate and checkpoint. A stop
        signal (``recovery.stop_signals``) ends the run after the current step with a checkpoint
        and :class:`Preempted` (exit code 75)."""
        from rlkit.metrics import MetricsLogger, Progress, StageTimer
        from rlkit.runtime import Runtime

        cfg = self.cfg
        ckpt = checkpoint.resolve(resume, self.run_dir)  # a bad --resume fails before any actor starts
        if ckpt is not None:
            checkpoint.load_trainer_state(ckpt)
        if self.runtime is None:
            self.runtime = Runtime(cfg, self.model_dir)
        if ckpt is not None:
            self._restore(ckpt)
        else:
            self.runtime.sync()  # engines start from the learner's exact weights (version 0)
        log = MetricsLogger(self.run_dir, report_to=cfg.report_to, run_name=cfg.run_name, tags=cfg.tags,
                            config=cfg.model_dump(mode="json"), resume=ckpt is not None)
        if ckpt is not None:
            log.truncate_after(self.state.step)
        progress = Progress(cfg.train.steps, initial=self.state.step, enabled=cfg.progress,
                            max_minutes=cfg.train.max_minutes)
        timer = StageTimer(spans=self.spans)
        if self.state.step == 0 and cfg.eval.at_start and cfg.eval.num_problems:
            log.log_eval(0, self.evaluate(base=True))
        last: dict[str, float] = {}
        evaluated = False
        with StopSignals(cfg.recovery.stop_signals) as stop:
            while self.state.step < cfg.train.steps:
                last, evaluated = self._train_step(timer, log, progress)
                if stop.received is not None:
                    progress.close()
                    log.close()
                    raise Preempted(stop.received, self.state.step, self.save())
                if cfg.train.max_minutes and self.state.train_seconds > 60 * cfg.train.max_minutes:
                    break
        progress.close()
        if cfg.eval.num_problems and not evaluated:
            report = self.evaluate()
            log.log_eval(self.state.step, report)
            last.update(report.metrics)
        self.save()
        if cfg.timeline:  # after the checkpoint: nothing here can cost the run its last state
            self.write_timeline()
        self.summary = log.finish()
        return last

    def _train_step(self, timer, log, progress) -> tuple[dict[str, float], bool]:
        """One step with its bookkeeping: metrics, due evaluations and checkpoints. A learner rank
        that died restarts the learner group from the last checkpoint instead."""
        from rlkit.recovery import ActorLost, LearnerLost, StageTimeout

        t0, wall = time.perf_counter(), time.time()
        try:
            last = self.step(timer)
        except LearnerLost as e:
            self._recover_learners(e, log)
            return {}, False
        except (ActorLost, StageTimeout) as e:
            latest = checkpoint.latest(self.run_dir)
            where = f"resume from {latest} with --resume auto" if latest else "no checkpoint was written yet"
            raise type(e)(f"step {self.state.step}: {e}; {where}") from None
        self.state.step += 1
        last.update(timer.pop())
        last["time/step"] = time.perf_counter() - t0
        self.spans.add("step", wall, wall + last["time/step"], step=self.state.step)
        self.runtime.supervisor.record_step(last["time/step"])
        self.state.train_seconds += last["time/step"]
        last["progress/train_minutes"] = self.state.train_seconds / 60
        evaluated = self._eval_due(last["time/step"] / 60)
        report = self.evaluate() if evaluated else None
        if report is not None:
            last.update(report.metrics)
        log.log(self.state.step, last)
        if report is not None:
            log.log_eval(self.state.step, report, metrics=False)
        progress.update(self.state.step, last)
        if self.cfg.checkpoint.every_steps and self.state.step % self.cfg.checkpoint.every_steps == 0:
            try:
                self.save()
            except LearnerLost as e:  # died while saving: this step is redone from the last checkpoint
                self._recover_learners(e, log)
                return {}, False
        return last, evaluated

    def write_timeline(self) -> None:
        """``run_dir/timeline.jsonl`` and ``plots/timeline.png`` (``timeline: true``; :mod:`rlkit.timeline`)."""
        from rlkit import timeline

        timeline.write(self.run_dir, self.spans.drain() + self.runtime.drain_spans())
        timeline.plot(self.run_dir)

    def _recover_learners(self, err, log) -> None:
        """Restart the learner group and continue from the last checkpoint (or from the start);
        the steps since then are redone and logged as lost."""
        self.state.learner_restarts += 1
        latest = checkpoint.latest(self.run_dir)
        if self.state.learner_restarts > self.cfg.recovery.learner_restarts:
            where = f"resume from {latest} with --resume auto" if latest else "no checkpoint was written yet"
            raise RuntimeError(f"step {self.state.step}: {err}, and the learner group was already restarted "
                               f"{self.cfg.recovery.learner_restarts} times (recovery.learner_restarts); {where}")
        lost_from, restarts = self.state.step, self.state.learner_restarts
        try:
            self.runtime.restart_learners()
        except (PlacementError, StageTimeout, LearnerLost) as e:  # e.g. the learners' node left
            where = f"resume from {latest} with --resume auto" if latest else "no checkpoint was written yet"
            raise RuntimeError(f"step {self.state.step}: {err}; restarting the learner group failed: {e}; "
                               f"{where} once the cluster has the resources") from None
        self._pending = None  # generated for a step that will be redone
        if self._async is not None:
            self._async.reset()
        if latest is not None:
            self._restore(latest)
        else:
            self.state = TrainerState()
            self.sampler.load_state_dict(self._initial_sampler)
            self.runtime.version = 0
            if self.controller is not None:
                self.controller.load_state_dict(self._initial_controller)
            self.runtime.sync()
        self.state.learner_restarts = restarts
        log.truncate_after(self.state.step)
        log.log(self.state.step, {"recovery/learner_restarts": float(restarts),
                                  "recovery/steps_lost": float(lost_from - self.state.step)})

    def _eval_due(self, step_minutes: float) -> bool:
        """Evaluate every ``eval.every_steps`` steps, and for each mark of ``eval.at_minutes`` at the
        last step that ends before it (the next step, as long as this one, would cross it); training
        time is the sum of step times, evaluations excluded."""
        e, now = self.cfg.eval, self.state.train_seconds / 60
        if not e.num_problems:
            return False
        due = [m for m in e.at_minutes if m not in self.state.marks_done and now + step_minutes > m]
        self.state.marks_done.extend(due)
        return bool(due) or (bool(e.every_steps) and self.state.step % e.every_steps == 0)

    def step(self, timer) -> dict[str, float]:
        """One training step: sample and score groups, side passes, advantages, learn, sync."""
        rt = self.runtime
        with timer("generate"):
            scored, group_metrics = self._groups(timer)
        rollouts, rewards = groups.flatten(scored)
        if not rollouts:
            raise RuntimeError(f"step {self.state.step}: no trainable samples (every group filtered or tied)")
        batch = collate(rollouts, rewards, self.tokenizer.pad_token_id, rt.version)
        check_finite(self.state.step, rollouts, sampler_logp=batch.sampler_logp_B_T, rewards=batch.rewards_B)
        with timer("reference"):
            extras, side_metrics = rt.side_passes(batch)
            batch.extras.update(extras)
        advantages, returns, adv_metrics = self._advantages(batch)
        check_finite(self.state.step, rollouts, advantages=advantages, returns=returns)
        with timer("learn"):
            learn_metrics = rt.learn(advantages, self.controller.values() if self.controller else {}, returns)
        self._count_skips(learn_metrics)
        with timer("sync"):
            sync_metrics = rt.sync()
        metrics = {**group_metrics, **side_metrics, **adv_metrics, **learn_metrics, **sync_metrics,
                   **self._batch_metrics(batch)}
        if self.controller is not None:
            metrics.update({f"controller/{k}": v for k, v in self.controller.update(metrics).items()})
        return metrics

    def _count_skips(self, m: dict[str, float]) -> None:
        """Stop after ``recovery.max_consecutive_skips`` updates in a row skipped for non-finite
        numbers (each skip leaves weights and optimizer state untouched)."""
        skipped, updates = m.get("learn/skipped_updates", 0.0), self.cfg.learner.updates_per_step
        self.state.skipped_in_a_row = self.state.skipped_in_a_row + int(skipped) if skipped >= updates else 0
        limit = self.cfg.recovery.max_consecutive_skips
        if self.state.skipped_in_a_row >= limit:
            which = "loss (learn/nonfinite_loss)" if m.get("learn/nonfinite_loss") else "gradient (learn/nonfinite_grad)"
            raise RuntimeError(f"step {self.state.step}: {self.state.skipped_in_a_row} updates in a row skipped for a "
                               f"non-finite {which}; recovery.max_consecutive_skips = {limit}")

    # ------------------------------------------------------------------ stages
    def _groups(self, timer) -> tuple[list[ScoredGroup], dict[str, float]]:
        """The step's training groups: preference pairs from the dataset, or sampled and scored
        groups (ranked into pairs for a preference algorithm)."""
        if self.pair_file:
            return groups.file_pairs(self.sampler.next_batch(), self._encode, self.tokenizer.eos_token_id), {}
        scored, metrics = self._collect_groups(timer)
        if self.needs.pairs:
            scored = groups.rank_pairs(scored)
            if not scored:
                raise RuntimeError(
                    f"step {self.state.step}: no preference pair in {int(metrics.get('filter/rounds', 1))} generation "
                    f"batches of {self.cfg.train.prompts_per_step} prompts: in every group all completions scored "
                    "the same (all right or all wrong); the data may be too easy or too hard for the policy, or "
                    "raise train.samples_per_prompt")
            metrics["pairs/count"] = float(len(scored))
        return scored, metrics

    def max_rounds(self) -> int:
        """Generation batches a step may draw: the group filter's limit (DAPO), ``PAIR_ROUNDS`` for
        on-policy preference pairs (a group whose completions all scored the same gives no pair), else 1."""
        if self.algo.group_filter is not None:
            return self.filter_policy.max_rounds
        return PAIR_ROUNDS if self.needs.pairs else 1

    def _check_short(self, kept: int, rounds: int) -> dict[str, float]:
        want = self.cfg.train.prompts_per_step
        if self.algo.group_filter is not None:
            return groups.check_short(kept, want, rounds, self.filter_policy.on_short, self.state.step)
        if self.needs.pairs:  # fewer pairs than prompts train as they are; none raises in _groups
            return {"filter/short_groups": float(max(0, want - kept)), "filter/rounds": float(rounds)}
        return {}

    def _collect_groups(self, timer) -> tuple[list[ScoredGroup], dict[str, float]]:
        """Sample and score generation batches; with a group filter (DAPO), draw further batches as
        the algorithm's :class:`FilterPolicy` allows until enough groups survive. Surplus groups
        carry over to the next step; a short batch raises or is logged, as the policy says."""
        if self.cfg.rollout.max_staleness and self._async is None:
            from rlkit.async_rl import AsyncCollector

            self._async = AsyncCollector(self)
        if self._async is not None:
            return self._async.collect(timer)  # generation runs ahead (docs/async.md)
        want, max_rounds = self.cfg.train.prompts_per_step, self.max_rounds()
        kept, metrics, rounds = list(self.state.carry), {}, 0
        while groups.more_rounds(len(kept), want, rounds, max_rounds):
            if self._pending is not None and rounds == 0:
                rows, refs = self._pending  # generated while the previous step learned
            else:
                rows = self.sampler.next_batch()
                refs = self._launch(rows, self.state.step, rounds)
            rollouts = self.runtime.collect(refs)
            self._pending = None
            if self.cfg.rollout.overlap and rounds == 0:
                # One-step off-policy: the next step's samples are generated by the current weights
                # while this step scores and learns; the sync that follows queues behind them on the
                # rollout worker, and each sample records its policy version (staleness 1).
                self._sampler_before_pending = self.sampler.state_dict()
                nxt = self.sampler.next_batch()
                self._pending = (nxt, self._launch(nxt, self.state.step + 1, 0))
            with timer("score"):
                new, m = self._score(rows, rollouts)
            metrics = metrics or m
            kept.extend(new)
            rounds += 1
        metrics.update(self._check_short(len(kept), rounds))
        self.state.carry = kept[want:]
        return groups.renumber(kept[:want]), metrics

    def _launch(self, rows, step: int, round_: int) -> list:
        prompts = [(i, row.index, self._encode(row.prompt_text)) for i, row in enumerate(rows)]
        return self.runtime.generate_async(prompts, step, round_)

    def _score(self, rows, rollouts) -> tuple[list[ScoredGroup], dict[str, float]]:
        """Score one generation batch; its groups after the reward worker's drop_group policy and
        the algorithm's group filter, and the reward metrics of every sample."""
        texts = self.tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
        row_of = [rows[r.group_id] for r in rollouts]
        fields = [{**row.fields, "answer": row.answer, "group_id": r.group_id, "completion_ids": list(r.completion_ids),
                   "completion_len": len(r.completion_ids)} for row, r in zip(row_of, rollouts)]
        res = self.runtime.score(texts, [row.prompt_text for row in row_of], fields,
                                 [row.data_source for row in row_of])
        outcome = groups.outcome_values(res.components, res.scores, self.outcome)
        built = groups.build_groups(rollouts, res.scores, outcome, res.status, res.keep,
                                    self.cfg.train.samples_per_prompt)
        kept = groups.apply_filter(built, self.algo.group_filter, self.algo_cfg)
        if self.needs.pairs:
            kept = groups.untied(kept)
        metrics = groups.reward_metrics(res.scores, outcome, res.metrics, self.outcome is not None)
        if self.cfg.monitors.enabled:
            metrics.update(self._monitors(texts, [row.prompt_text for row in row_of], [row.answer for row in row_of],
                                          res.scores, outcome))
        return kept, metrics

    def _monitors(self, texts, prompts, references, scores, outcome) -> dict[str, float]:
        """The hack monitors over one scored batch (:mod:`rlkit.rewards.hacks`), as ``hack/*``."""
        from rlkit.rewards.hacks import monitor_metrics

        m = self.cfg.monitors
        found = monitor_metrics(texts, prompts, references, scores, outcome if self.outcome is not None else None,
                                fallback=self.answer_fallback, threshold=m.threshold, min_rewarded=m.min_rewarded)
        return {f"hack/{k}": v for k, v in found.items()}

    def _advantages(self, batch) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], dict[str, float]]:
        if self.algo.advantages is None:
            return None, None, {}
        ex = batch.extras
        inputs = AdvantageInputs(
            rewards_B=batch.rewards_B, group_ids_B=batch.group_ids_B, mask_B_T=batch.response_mask_B_T,
            # π_old: the learner's recomputation when it ran (several updates per step), else the
            # sampler's own log-probs of the same tokens (equal up to the logged gap/kl).
            old_logp_B_T=ex.get("old_logp", batch.sampler_logp_B_T), ref_logp_B_T=ex.get("ref_logp"),
            ref_tempered_logp_B_T=ex.get("ref_tempered_logp"),
            teacher_logp_B_T=ex.get("teacher_logp"), values_B_T=ex.get("values"), truncated_B=batch.truncated_B,
            controller=self.controller.values() if self.controller else {},
        )
        adv, m = self.algo.advantages(inputs, self.algo_cfg)
        returns = self.algo.returns(inputs, self.algo_cfg) if self.algo.returns else None
        return adv, returns, {f"adv/{k}": float(v) for k, v in m.items()}

    def _batch_metrics(self, batch) -> dict[str, float]:
        mask = batch.response_mask_B_T
        lengths = mask.sum(-1)
        out = {"response/length_mean": float(lengths.mean()),
               "response/truncated_frac": float(batch.truncated_B.float().mean()),
               "rollout/staleness_mean": float(batch.staleness_B.float().mean()),
               "rollout/tokens": float(lengths.sum())}
        from rlkit.async_rl import token_version_metrics

        out.update(token_version_metrics(batch.token_staleness_B_T, mask))
        return out

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ eval
    def evaluate(self, base: bool = False):
        """The held-out evaluation (:func:`rlkit.evaluate.evaluate`: greedy accuracy, and mean@n,
        pass@k, maj@k with ``eval.n`` > 1), plus ``accuracy_brief`` on the problems the base model
        answered briefly (stopped within 24 tokens), so a gain from shorter answers alone shows."""
        from rlkit.evaluate import evaluate

        rows = self.eval_rows[: self.cfg.eval.num_problems]
        report = evaluate(self.runtime, self.tokenizer, rows, self.cfg.eval, self.outcome, seed=self.cfg.train.seed,
                          answer_fallback=self.answer_fallback, strict_gap=self.cfg.monitors.strict_gap)
        if base:
            self.state.eval_base = {"brief": [i for i, g in enumerate(report.greedy)
                                              if g["finish_reason"] == "stop" and len(g["completion_ids"]) <= 24]}
        brief = self.state.eval_base.get("brief", [])
        if brief:
            report.metrics["eval/accuracy_brief"] = sum(report.correct[i] for i in brief) / len(brief)
        return report

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        tmp = checkpoint.begin(self.run_dir, self.state.step)
        # An in-flight batch (overlap) is not saved: resume redraws its prompts and regenerates.
        self.state.sampler = self._sampler_before_pending if self._pending else self.sampler.state_dict()
        self.state.controller = self.controller.state_dict() if self.controller else {}
        with checkpoint.writing(tmp, self.run_dir, self.state.step):  # a failed write names its path
            self.runtime.save(str(tmp), {"step": self.state.step})
            self.tokenizer.save_pretrained(str(tmp / "hf"))  # the folder loads in transformers/vLLM as is
            state = self.state.__dict__ | {"carry": [g.to_dict() for g in self.state.carry],
                                           "version": self.runtime.version}
            return checkpoint.commit(tmp, self.state.step, state, dump_config(self.cfg), self.cfg.checkpoint.keep)

    def _restore(self, ckpt: Path) -> None:
        saved = checkpoint.load_trainer_state(ckpt)
        self.runtime.load(str(ckpt))
        self.runtime.version = saved.pop("version")
        saved["carry"] = [ScoredGroup.from_dict(g) for g in saved.get("carry", [])]
        self.state = TrainerState(**saved)
        self.sampler.load_state_dict(self.state.sampler)
        if self.controller is not None and self.state.controller:
            self.controller.load_state_dict(self.state.controller)
        self.runtime.sync()

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.shutdown()


def model_dir(cfg: RunConfig) -> str:
    """The policy's model folder: ``model.path``, or the embedded SmolLM2 for ``smollm2``."""
    from rlkit.assets import smollm2_dir

    return str(smollm2_dir()) if cfg.model.path == "smollm2" else cfg.model.path

"""Scored groups (rlkit/groups.py): building, drop_group, the group filter on the verified outcome,
the filter's round policy, pair ranking, file pairs, seeds, and the checkpoint round trip."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from rlkit import groups
from rlkit.algorithms.base import FilterPolicy
from rlkit.algorithms.dapo import DAPOConfig, dapo_group_filter
from rlkit.types import Rollout


def _rollouts(n: int, group_size: int) -> list[Rollout]:
    return [Rollout([1, 2], [10 + i, 2], [-0.5, -0.1], "stop", 0, i // group_size, 100 + i // group_size)
            for i in range(n)]


def test_build_groups_cuts_prompt_major_and_honours_drop_group():
    rs = _rollouts(6, 3)
    scores = [1.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    outcome = [1.0, None, 0.0, 1.0, 1.0, 1.0]
    keep = [True, True, True, True, False, True]  # the worker dropped the second group
    got = groups.build_groups(rs, scores, outcome, ["ok", "error", "ok", "ok", "ok", "ok"], keep, 3)
    assert len(got) == 1
    g = got[0]
    assert g.rollouts == rs[:3] and g.rewards == [1.0, 0.0, 0.5]
    assert g.outcome == [1.0, 0.0, 0.0]  # a missing outcome counts as 0
    assert g.status == ["ok", "error", "ok"]
    assert len(groups.build_groups(rs, scores, outcome, ["ok"] * 6, [], 3)) == 2  # no mask: all kept
    with pytest.raises(ValueError, match="groups of 4"):
        groups.build_groups(rs, scores, outcome, ["ok"] * 6, [], 4)


def test_outcome_is_the_named_component_not_the_first():
    comps = {"brevity": [0.9, 0.1], "math": [0.0, 1.0]}
    assert groups.outcome_values(comps, [0.5, 0.7], "math") == [0.0, 1.0]
    assert groups.outcome_values(comps, [0.5, 0.7], None) == [0.5, 0.7]


def test_filter_judges_the_outcome_not_the_shaped_reward():
    """Group 0's rewards differ only by shaping (outcomes all 1): DAPO drops it; group 1 has a
    correct and a wrong answer: kept."""
    rs = _rollouts(4, 2)
    g = groups.build_groups(rs, [1.0, 0.8, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], ["ok"] * 4, [], 2)
    kept = groups.apply_filter(g, dapo_group_filter, DAPOConfig())
    assert [k.rollouts for k in kept] == [rs[2:]]
    assert groups.apply_filter(g, None, None) == g
    assert groups.renumber(kept)[0].rollouts[0].group_id == 0


@pytest.mark.parametrize("kept,rounds,max_rounds,more", [
    (3, 1, 1, False), (3, 1, 2, True), (8, 1, 2, False), (3, 10, 10, False), (3, 50, 0, True), (0, 0, 1, True)])
def test_more_rounds(kept, rounds, max_rounds, more):
    assert groups.more_rounds(kept, 8, rounds, max_rounds) is more


def test_check_short_raises_or_counts_as_declared():
    assert groups.check_short(8, 8, 2, "raise", 5) == {"filter/short_groups": 0.0, "filter/rounds": 2.0}
    assert groups.check_short(5, 8, 1, "train", 5)["filter/short_groups"] == 3.0
    with pytest.raises(RuntimeError, match=r"step 5: the group filter kept 5/8 prompt groups after 3"):
        groups.check_short(5, 8, 3, "raise", 5)


def test_filter_policies_declared_by_the_registry():
    from rlkit.algorithms.base import AlgorithmSetup

    assert AlgorithmSetup.build("dapo").filter_policy == FilterPolicy(max_rounds=10, on_short="raise")
    assert AlgorithmSetup.build("dapo", {"max_num_gen_batches": -1}).filter_policy.max_rounds == 0  # unlimited
    assert AlgorithmSetup.build("pmd_mean").filter_policy == FilterPolicy(max_rounds=1, on_short="train")
    with pytest.raises(ValueError, match="max_rounds"):
        FilterPolicy(max_rounds=-1)


def test_rank_pairs_best_and_worst_ties_skipped():
    rs = _rollouts(6, 3)
    g = groups.build_groups(rs, [0.2, 0.9, 0.5, 1.0, 1.0, 1.0], [0, 1, 0, 1, 1, 1], ["ok"] * 6, [], 3)
    pairs = groups.rank_pairs(g)
    assert len(pairs) == 1
    assert pairs[0].rollouts == [rs[1], rs[0]] and pairs[0].rewards == [0.9, 0.2]


def test_file_pairs_append_eos_and_score_one_zero():
    rows = [SimpleNamespace(prompt_text="p", chosen_text="good", rejected_text="bad", index=7)]
    enc = {"p": [1], "good": [2, 3], "bad": [4]}
    (pair,) = groups.file_pairs(rows, enc.__getitem__, eos_id=0)
    assert [r.completion_ids for r in pair.rollouts] == [[2, 3, 0], [4, 0]]
    assert pair.rewards == [1.0, 0.0] and pair.rollouts[0].prompt_index == 7


def test_scored_group_round_trips_through_plain_data():
    import json

    g = groups.build_groups(_rollouts(2, 2), [1.0, 0.0], [1.0, 0.0], ["ok", "timeout"], [], 2)[0]
    back = groups.ScoredGroup.from_dict(json.loads(json.dumps(g.to_dict())))
    assert back == g


def test_reward_metrics_accuracy_on_the_outcome():
    m = groups.reward_metrics([1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], {"math/mean": 0.5}, True)
    assert m["reward/accuracy"] == 0.5 and m["reward/mean"] == pytest.approx(0.625)
    assert m["reward/math/mean"] == 0.5
    assert "reward/accuracy" not in groups.reward_metrics([1.0], [1.0], {}, False)


def test_generation_seeds_never_collide_within_a_run():
    """Far past 16 rounds (where step·16 + round used to collide with the next step) and past 101
    workers; the first rounds keep the historical values."""
    for seed in (0, 3):
        keys = list(itertools.product(range(40), range(40), (0, 1, 2, 150)))
        seeds = [groups.generation_seed(seed, s, r, w) for s, r, w in keys]
        assert len(set(seeds)) == len(keys)
    assert groups.generation_seed(2, 5, 3, 1) == 2 * 1_000_003 + (5 * 16 + 3) * 101 + 1
    with pytest.raises(ValueError, match="out of range"):
        groups.generation_seed(0, 0, 4096, 0)
    torch.Generator().manual_seed(groups.generation_seed(0, 3, 20, 0))  # negative seeds are valid

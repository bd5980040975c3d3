"""The registry's declarations match what the algorithms do: ``advantage_reads`` names every
side-pass tensor an advantage or return function reads (only those travel back to the driver),
``kind`` follows ``Needs.pairs``, and ``Needs.reference`` is the one "needs a reference model"."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlkit import algorithms
from rlkit.algorithms.base import AdvantageInputs, AlgorithmSetup, Needs

SIDE = {"old_logp": "old_logp_B_T", "ref_logp": "ref_logp_B_T", "ref_tempered_logp": "ref_tempered_logp_B_T",
        "teacher_logp": "teacher_logp_B_T", "values": "values_B_T"}

VARIANTS = {
    "grpo": [{}, {"kl_placement": "reward"}],
    "exopd": [{}, {"lam": 1.25, "reference": "student_init"}],
    "safe": [{}],
}


def _inputs(seed: int) -> AdvantageInputs:
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 5
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    rnd = lambda: -torch.rand(B, T, generator=g) * mask  # noqa: E731
    return AdvantageInputs(
        rewards_B=torch.rand(B, generator=g), group_ids_B=torch.arange(B) // 4, mask_B_T=mask,
        old_logp_B_T=rnd(), ref_logp_B_T=rnd(), ref_tempered_logp_B_T=rnd(), teacher_logp_B_T=rnd(),
        values_B_T=torch.rand(B, T, generator=g) * mask, truncated_B=torch.zeros(B, dtype=torch.bool))


@pytest.mark.parametrize("name", [n for n in algorithms.names() if algorithms.get(n).advantages is not None])
def test_advantage_reads_cover_what_the_advantage_reads(name):
    """Dropping every undeclared side-pass tensor (as the learner does) changes nothing."""
    algo = algorithms.get(name)
    assert algo.advantage_reads is not None, f"{name} must declare advantage_reads"
    for args in VARIANTS.get(name, [{}]):
        setup = AlgorithmSetup.build(name, args)
        full = _inputs(0)
        sent = dataclasses.replace(full, **{f: None for k, f in SIDE.items() if k not in algo.advantage_reads})
        if "old_logp" not in algo.advantage_reads:
            sent.old_logp_B_T = full.old_logp_B_T  # the driver falls back to the sampler's log-probs
        want, _ = algo.advantages(full, setup.cfg)
        got, _ = algo.advantages(sent, setup.cfg)
        assert torch.equal(want, got), (name, args)
        if algo.returns is not None:
            assert torch.equal(algo.returns(full, setup.cfg), algo.returns(sent, setup.cfg))


@pytest.mark.parametrize("name", algorithms.names())
def test_kind_follows_pairs_and_reference_is_one_property(name):
    setup = AlgorithmSetup.build(name)
    assert (setup.algo.kind == "preference") == setup.needs.pairs
    n = setup.needs
    assert n.reference == (n.ref_logp or n.ref_full_kl or n.ref_temper_phi is not None)
    if n.pairs:
        assert n.reference  # preference losses always read π_ref


def test_needs_reference_property():
    assert not Needs().reference
    assert Needs(ref_full_kl=True).reference and Needs(ref_temper_phi=0.0).reference


def test_setup_is_built_once_at_config_time():
    from rlkit.config import load_config

    cfg = load_config(None, ["algorithm.name=dapo", "algorithm.args.max_num_gen_batches=4"])
    setup = cfg.algorithm_setup
    assert setup is cfg.algorithm_setup and setup.cfg.max_num_gen_batches == 4
    assert setup.filter_policy.max_rounds == 4 and setup.filter_policy.on_short == "raise"

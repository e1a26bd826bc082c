"""The merge methods on hand-made tensors, against their papers' formulas worked by hand."""

from __future__ import annotations

import pytest
import torch

from kiban.adapt.merge import (
    MergeRecipe,
    MergeSource,
    dare,
    elect_and_merge,
    linear,
    merge_state,
    task_arithmetic,
    ties,
    trim,
)

T1 = torch.tensor([1.0, -2.0, 0.5, 3.0])
T2 = torch.tensor([-1.5, -1.0, 0.2, 2.0])
T3 = torch.tensor([0.4, 3.0, -0.1, -0.5])


def test_linear_is_the_weighted_mean():
    assert torch.allclose(linear([T1, T2], [1.0, 3.0]), (T1 + 3 * T2) / 4)


def test_task_arithmetic_sums_the_weighted_task_vectors():
    assert torch.allclose(task_arithmetic([T1, T2], [1.0, 0.5], scale=0.8), 0.8 * (T1 + 0.5 * T2))


def test_trim_keeps_the_largest_magnitudes():
    assert trim(T1, 0.5).tolist() == [0.0, -2.0, 0.0, 3.0]
    assert trim(T3, 0.25).tolist() == [0.0, 3.0, 0.0, 0.0]
    assert torch.equal(trim(T1, 1.0), T1)


def test_ties_matches_the_paper_worked_by_hand():
    # Yadav et al. 2023: trim to the top 50% by magnitude, elect the sign of the sum, mean of agreeing
    #   trimmed: [0, -2, 0, 3], [-1.5, 0, 0, 2], [0, 3, 0, -0.5]; sum [-1.5, 1, 0, 4.5] -> signs [-, +, 0, +]
    #   agreeing: {-1.5} -> -1.5; {3} -> 3; none -> 0; {3, 2} -> 2.5
    merged = ties([T1, T2, T3], [1.0, 1.0, 1.0], density=0.5)
    assert merged.tolist() == [-1.5, 3.0, 0.0, 2.5]
    assert ties([T1, T2, T3], [1.0, 1.0, 1.0], density=0.5, scale=2.0).tolist() == [-3.0, 6.0, 0.0, 5.0]


def test_ties_agrees_with_peft_merge_utils():
    from peft.utils.merge_utils import ties as peft_ties

    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    ours = ties(deltas, weights, density=0.4)
    theirs = peft_ties(deltas, torch.tensor(weights), density=0.4)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_disjoint_merge_ignores_dissenting_and_zero_entries():
    merged = elect_and_merge([torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([4.0, 0.0])], [1, 1, 1])
    assert merged.tolist() == [3.0, 0.0]  # sign +: mean of 2 and 4; all-zero entry stays 0


def test_dare_drops_and_rescales():
    delta = torch.arange(1.0, 2001.0)
    dropped = dare(delta, 0.3, generator=torch.Generator().manual_seed(7))
    kept = dropped != 0
    # every kept entry is tau / p exactly, every other one is 0 (Yu et al. 2024, eq. 2)
    assert torch.allclose(dropped[kept], delta[kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.04
    # the same generator state draws the same Bernoulli mask: the published m ~ Bernoulli(p)
    mask = torch.rand(delta.shape, generator=torch.Generator().manual_seed(7)) < 0.3
    assert torch.equal(kept, mask)
    assert torch.equal(dare(delta, 1.0, generator=torch.Generator()), delta)


def test_dare_keeps_the_task_vector_in_expectation():
    delta = torch.tensor([1.0, -2.0, 0.5])
    generator = torch.Generator().manual_seed(0)
    mean = torch.stack([dare(delta, 0.5, generator=generator) for _ in range(20000)]).mean(0)
    assert torch.allclose(mean, delta, atol=0.05)


def _recipe(method: str, **options) -> MergeRecipe:
    return MergeRecipe(method=method, models=[MergeSource("a"), MergeSource("b")], **options)


def test_merge_state_adds_the_merged_task_vector_to_the_base():
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "step": torch.tensor(3)}
    states = [{"w": base["w"] + T1, "step": torch.tensor(3)}, {"w": base["w"] + T2, "step": torch.tensor(3)}]
    merged = merge_state(states, base, _recipe("task_arithmetic", scale=0.5))
    assert torch.allclose(merged["w"], base["w"] + 0.5 * (T1 + T2))
    assert merged["step"].item() == 3
    merged = merge_state(states, base, _recipe("ties", density=0.5))
    assert torch.allclose(merged["w"], base["w"] + ties([T1, T2], [1, 1], density=0.5))
    merged = merge_state(states, None, _recipe("linear"))
    assert torch.allclose(merged["w"], base["w"] + (T1 + T2) / 2)


def test_dare_methods_follow_their_definitions():
    base = {"w": torch.zeros(50)}
    generator = torch.Generator().manual_seed(1)
    t1, t2 = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    states = [{"w": t1}, {"w": t2}]
    recipe = _recipe("dare_linear", density=0.6, seed=3)
    draws = torch.Generator().manual_seed(3)
    d1, d2 = dare(t1, 0.6, generator=draws), dare(t2, 0.6, generator=draws)
    assert torch.allclose(merge_state(states, base, recipe)["w"], d1 + d2)
    recipe = _recipe("dare_ties", density=0.6, seed=3)
    assert torch.allclose(merge_state(states, base, recipe)["w"], elect_and_merge([d1, d2], [1, 1]))


def test_methods_that_need_a_base_refuse_without_one():
    with pytest.raises(ValueError, match="needs a base"):
        merge_state([{"w": T1}], None, _recipe("ties"))


def test_recipe_refuses_unknown_methods_and_bad_density():
    with pytest.raises(ValueError, match="not one of"):
        _recipe("average")
    with pytest.raises(ValueError, match="density"):
        _recipe("ties", density=0.0)

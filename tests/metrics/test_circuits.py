"""Circuit metrics on hand-checked cases and synthetic tensors with planted answers."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.circuits import (
    attribution_score,
    containment,
    faithfulness,
    hypergeometric_tail,
    jaccard,
    logit_difference,
    patching_score,
    ranks,
    smallest_faithful,
    spearman,
    top_fraction,
    top_k,
)


def mask(n: int, members: list[int]) -> torch.Tensor:
    selected = torch.zeros(n, dtype=torch.bool)
    selected[members] = True
    return selected


def test_logit_difference_picks_target_minus_foil():
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, 0.5, 1.0]])
    got = logit_difference(logits, torch.tensor([1, 0]), torch.tensor([2, 1]))
    torch.testing.assert_close(got, torch.tensor([3.0, 2.5]))


def test_patching_score_normalizes_by_the_whole_corruption():
    ld_clean, ld_corrupt = torch.tensor([4.0, 2.0]), torch.tensor([0.0, 0.0])  # means 3 and 0
    # Component 0 does nothing, 1 does all of the corruption, 2 half of it, 3 the opposite.
    patched = torch.tensor([[4.0, 0.0, 2.0, 5.0], [2.0, 0.0, 1.0, 3.0]])
    torch.testing.assert_close(patching_score(patched, ld_clean, ld_corrupt), torch.tensor([0.0, 1.0, 0.5, -1 / 3]))
    # Extra component dimensions (layer, head) pass through.
    assert patching_score(patched.view(2, 2, 2), ld_clean, ld_corrupt).shape == (2, 2)


def test_attribution_score_is_exact_for_a_linear_metric():
    # LD = w . z: the first-order estimate equals exact patching.
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=generator)
    z_clean, z_corrupt = torch.randn(4, 5, 3, generator=generator), torch.randn(4, 5, 3, generator=generator)
    ld = lambda z: (w * z).sum((-1, -2))  # noqa: E731
    patched = torch.stack([ld(torch.where(mask(5, [c])[None, :, None], z_corrupt, z_clean)) for c in range(5)], dim=1)
    exact = patching_score(patched, ld(z_clean), ld(z_corrupt))
    estimate = attribution_score(w.expand(4, 5, 3), z_corrupt - z_clean, ld(z_clean), ld(z_corrupt))
    torch.testing.assert_close(estimate, exact, atol=1e-5, rtol=1e-5)


def test_top_fraction_takes_two_percent_by_absolute_value():
    scores = torch.zeros(270)
    scores[[7, 100, 200, 3, 50]] = torch.tensor([0.9, -0.8, 0.7, 0.6, -0.5])
    scores[60] = 0.1
    selected = top_fraction(scores, 0.02)  # round(5.4) = 5 heads
    assert selected.sum() == 5 and set(selected.nonzero().flatten().tolist()) == {3, 7, 50, 100, 200}
    assert top_fraction(torch.tensor([0.1, 0.2]), 0.01).sum() == 1  # at least one
    assert top_k(torch.tensor([1.0, -3.0, 2.0]), 2).tolist() == [False, True, True]


def test_overlap_arithmetic_hand_checked():
    a, b = mask(10, [0, 1, 2, 3]), mask(10, [2, 3, 4])
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert containment(a, b) == pytest.approx(2 / 4)
    assert containment(b, a) == pytest.approx(2 / 3)
    assert jaccard(a, a) == 1.0 and jaccard(a, mask(10, [9])) == 0.0


def test_hypergeometric_tail_hand_checked():
    # N=10, |A|=4, |B|=3: P(X>=2) = [C(4,2)C(6,1) + C(4,3)C(6,0)] / C(10,3) = (36 + 4) / 120.
    assert hypergeometric_tail(10, 4, 3, 2) == pytest.approx(40 / 120)
    assert hypergeometric_tail(10, 4, 3, 0) == pytest.approx(1.0)
    assert hypergeometric_tail(10, 4, 3, 4) == 0.0
    # Two 5-head circuits among 270 sharing all 5 heads: 1 / C(270, 5).
    assert hypergeometric_tail(270, 5, 5, 5) == pytest.approx(1 / math.comb(270, 5))
    # The tail sums the probability mass function, which sums to 1.
    pmf = [hypergeometric_tail(30, 8, 6, k) - hypergeometric_tail(30, 8, 6, k + 1) for k in range(7)]
    assert sum(pmf) == pytest.approx(1.0)


def test_spearman_against_hand_ranks_and_ties():
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Hand-checked: ranks (1,2,3,4,5) vs (2,1,4,3,5): d^2 sum = 4, rho = 1 - 6*4/(5*24) = 0.8.
    assert spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    assert math.isnan(spearman(x, torch.ones(5)))


def test_faithfulness_and_smallest_faithful_size():
    ld_clean = torch.tensor([2.0, 4.0])
    kept = faithfulness(torch.tensor([[0.0, 1.0, 1.8], [1.0, 2.0, 3.0]]), ld_clean)
    torch.testing.assert_close(kept, torch.tensor([1 / 6, 0.5, 0.8]))
    assert smallest_faithful([0, 5, 10], kept, 0.8) == 10
    assert smallest_faithful([0, 5, 10], kept, 0.9) is None
